"""Data layer: tokenizer, example sources and validation, chat masks, Grain pipelines, and the
arithmetic task."""

from jaxpt.data.arithmetic import (
    generate_examples,
    generate_preference_pairs,
    make_problem,
    write_jsonl,
)
from jaxpt.data.pipeline import (
    DataStats,
    Pipeline,
    build_preference_pipeline,
    build_sft_pipeline,
    eval_batches,
)
from jaxpt.data.sources import DataError, LoadedExamples, load_examples
from jaxpt.data.tokenizer import load_tokenizer

__all__ = [
    "DataError",
    "DataStats",
    "LoadedExamples",
    "Pipeline",
    "build_preference_pipeline",
    "build_sft_pipeline",
    "eval_batches",
    "generate_examples",
    "generate_preference_pairs",
    "load_examples",
    "load_tokenizer",
    "make_problem",
    "write_jsonl",
]
