"""Data layer: tokenizer, example sources and validation, chat masks, Grain pipelines, and the
arithmetic task."""

from jaxpt.data.arithmetic import (
    arithmetic_eval_rows,
    generate_examples,
    generate_preference_pairs,
    generate_step_rows,
    make_problem,
    write_jsonl,
)
from jaxpt.data.chat import encode_prompt
from jaxpt.data.pipeline import (
    DataStats,
    Pipeline,
    build_preference_pipeline,
    build_sft_pipeline,
    build_step_pipeline,
    build_unpaired_pipeline,
    eval_batches,
)
from jaxpt.data.sources import DataError, LoadedExamples, load_examples
from jaxpt.data.tokenizer import eos_token_ids, load_tokenizer, tokenizer_for_model

__all__ = [
    "DataError",
    "DataStats",
    "LoadedExamples",
    "Pipeline",
    "arithmetic_eval_rows",
    "build_preference_pipeline",
    "build_sft_pipeline",
    "build_step_pipeline",
    "build_unpaired_pipeline",
    "encode_prompt",
    "eos_token_ids",
    "eval_batches",
    "generate_examples",
    "generate_preference_pairs",
    "generate_step_rows",
    "load_examples",
    "load_tokenizer",
    "make_problem",
    "tokenizer_for_model",
    "write_jsonl",
]
