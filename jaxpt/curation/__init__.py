"""Data curation: a pipeline of steps that filter a dataset's rows, each reporting what it
removed and why. ``python -m jaxpt.curate --config configs/curate_X.yaml`` runs one.

Steps by config ``type`` (``STEP_TYPES``): chat_structure, exact_dedup, near_dedup,
decontaminate, length, format, language (``text_filters``); reward_fn (``reward_filter``);
reward_model, perplexity (``model_filters``, which load a model).
"""

from jaxpt.curation.base import (
    CurationStep,
    RowFilter,
    StepReport,
    field_text,
    normalize_text,
    prompt_text,
    response_text,
    row_text,
    validate_row,
    words,
)
from jaxpt.curation.pipeline import (
    STEP_TYPES,
    CurationConfig,
    build_step,
    build_steps,
    curate,
    load_curation_config,
    read_input,
    run_pipeline,
    write_rows,
)

__all__ = [
    "STEP_TYPES",
    "CurationConfig",
    "CurationStep",
    "RowFilter",
    "StepReport",
    "build_step",
    "build_steps",
    "curate",
    "field_text",
    "load_curation_config",
    "normalize_text",
    "prompt_text",
    "read_input",
    "response_text",
    "row_text",
    "run_pipeline",
    "validate_row",
    "words",
    "write_rows",
]
