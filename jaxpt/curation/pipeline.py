"""A curation run: its config, its steps by name, reading the rows, running the steps in
order, and writing the kept rows and the report.

    input: data/sft.jsonl        # .jsonl/.json/.parquet file, dataset dir or hub name
    kind: sft                    # sft | preference | prompt: the rules rows are checked with
    output: data/sft.clean.jsonl # .jsonl, .json or .parquet (the format follows the suffix)
    steps:
      - exact_dedup                              # a type alone: its defaults
      - {type: near_dedup, threshold: 0.8}
      - {type: length, name: short_prompts, fields: prompt, max_words: 200}

Every key can be overridden as ``key=value`` (``steps.1.threshold=0.9``), as for training.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from jaxpt.config import ConfigError
from jaxpt.curation.base import KINDS, CurationStep, StepReport, read_raw_rows, validate_row
from jaxpt.data.sources import DataError, RowProblem

logger = logging.getLogger(__name__)

STEP_TYPES: dict[str, str] = {
    "chat_structure": "jaxpt.curation.text_filters:ChatStructureFilter",
    "exact_dedup": "jaxpt.curation.text_filters:ExactDedup",
    "near_dedup": "jaxpt.curation.text_filters:NearDedup",
    "decontaminate": "jaxpt.curation.text_filters:Decontaminate",
    "length": "jaxpt.curation.text_filters:LengthFilter",
    "format": "jaxpt.curation.text_filters:FormatFilter",
    "language": "jaxpt.curation.text_filters:LanguageFilter",
    "reward_fn": "jaxpt.curation.reward_filter:RewardFnFilter",
    "reward_model": "jaxpt.curation.model_filters:RewardModelFilter",
    "perplexity": "jaxpt.curation.model_filters:PerplexityFilter",
    "judge": "jaxpt.curation.judge_filter:JudgeFilter",
}
OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")


# ------------------------------------------------------------------------------ steps


def build_step(spec: str | Mapping[str, Any], where: str = "steps[?]") -> CurationStep:
    """The step a config entry describes: ``{"type": t, "name": optional, **options}`` (or
    the type alone) -> ``STEP_TYPES[t](**options)``. Problems are ``ConfigError``s naming
    ``where`` (the entry's place, e.g. ``steps[2]``) and the type."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ConfigError(f"config key '{where}' needs a 'type' ({_valid_types()}), got {spec!r}")
    options = dict(spec)
    step_type, name = options.pop("type"), options.pop("name", None)
    if step_type not in STEP_TYPES:
        close = difflib.get_close_matches(str(step_type), STEP_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"config key '{where}.type': unknown step type {step_type!r} ({_valid_types()}){hint}"
        )
    module_name, class_name = STEP_TYPES[step_type].split(":")
    try:
        step_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"config key '{where}': step type {step_type!r} is not available: {error}"
        ) from None
    _check_options(step_class, options, f"config key '{where}' ({step_type})")
    try:
        step = step_class(**options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config key '{where}' ({step_type}): {error}") from None
    if name is not None:
        step.name = str(name)
    return step


def build_steps(specs: Sequence[Any]) -> list[CurationStep]:
    """The steps of a config's ``steps`` list, with names made unique (``length``,
    ``length_2``) so the report can key on them."""
    steps, seen = [], {"load"}
    for i, spec in enumerate(specs):
        step = build_step(spec, f"steps[{i}]")
        base, n = step.name, 2
        while step.name in seen:
            step.name, n = f"{base}_{n}", n + 1
        seen.add(step.name)
        steps.append(step)
    return steps


def _valid_types() -> str:
    return "valid types: " + ", ".join(STEP_TYPES)


def _check_options(step_class: type, options: dict, where: str) -> None:
    parameters = inspect.signature(step_class).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = [name for name in parameters if name != "self"]
    for option in options:
        if option not in valid:
            close = difflib.get_close_matches(option, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown option {option!r} (options: {', '.join(valid) or 'none'}){hint}"
            )


def run_pipeline(
    rows: list[dict],
    steps: Sequence[CurationStep],
    max_samples: int = 5,
    row_numbers: Sequence[int] | None = None,
) -> tuple[list[dict], list[StepReport]]:
    """Run ``steps`` in order; the kept rows and one report per step. Samples in the reports
    carry each removed row's number: ``row_numbers[i]`` for ``rows[i]`` (default ``i``)."""
    row_numbers = range(len(rows)) if row_numbers is None else row_numbers
    numbers = {id(row): number for row, number in zip(rows, row_numbers)}
    reports = []
    for step in steps:
        start = time.perf_counter()
        kept, removed = step(rows)
        seconds = time.perf_counter() - start
        if len(kept) + len(removed) != len(rows):
            raise RuntimeError(
                f"curation step {step.name!r} returned {len(kept)} kept and {len(removed)} "
                f"removed rows for {len(rows)} rows in"
            )
        report = StepReport.from_removed(
            step.name, len(rows), removed, max_samples, lambda row: numbers.get(id(row)), seconds
        )
        logger.info("%s: %d -> %d rows (%.1fs)", step.name, len(rows), len(kept), seconds)
        reports.append(report)
        rows = kept
    return rows, reports


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    input: str = MISSING  # .jsonl/.json/.parquet file, dataset directory or hub name
    output: str = MISSING  # .jsonl, .json or .parquet
    kind: str = "sft"  # sft | preference | prompt: how rows are validated when read
    split: str = "train"  # for hub datasets and dataset directories
    report: str | None = None  # None: <output>.report.json
    skip_invalid: bool = False  # drop (and report) rows that fail validation, else stop
    max_samples: int = 5  # removed rows kept per step in the report
    steps: list[Any] = dataclasses.field(default_factory=list)

    @property
    def report_path(self) -> str:
        return self.report or f"{self.output}.report.json"


def load_curation_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> CurationConfig:
    """Parse a YAML file and ``key=value`` overrides (``steps.0.threshold=0.9`` reaches into
    the steps list) into a validated ``CurationConfig``."""
    schema = OmegaConf.structured(CurationConfig)
    try:
        merged = schema.copy()
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(schema, OmegaConf.load(path))
        OmegaConf.set_readonly(merged, False)  # a frozen dataclass schema is read-only
        for override in overrides:
            key, sep, raw = override.partition("=")
            if not sep or not key:
                raise ConfigError(f"overrides must look like key=value, got {override!r}")
            # Parsed as training overrides are (1e-4 is a float, [a, b] a list).
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
            # A step given by its type alone becomes {type: ...}, so `steps.0.x=1` adds
            # an option instead of replacing the step.
            merged.steps = [{"type": s} if isinstance(s, str) else s for s in merged.steps]
            OmegaConf.update(merged, key, value, merge=False)
        config = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, TypeError) as error:
        raise _explain(error) from None
    _validate(config)
    return dataclasses.replace(config, steps=OmegaConf.to_container(OmegaConf.create(config.steps)))


def _explain(error: Exception) -> ConfigError:
    key = str(getattr(error, "full_key", "") or "?")
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and "." not in key:
        valid = [f.name for f in dataclasses.fields(CurationConfig)]
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return ConfigError(f"unknown config key '{key}'{hint}")
    if isinstance(error, MissingMandatoryValue):
        return ConfigError(f"missing required config key '{key}'")
    return ConfigError(f"config key '{key}': {str(error).splitlines()[0]}")


def _validate(config: CurationConfig) -> None:
    if config.kind not in KINDS:
        raise ConfigError(f"config key 'kind' must be one of {KINDS}, got {config.kind!r}")
    if Path(config.output).suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(
            f"config key 'output' must end in one of {OUTPUT_SUFFIXES}, got {config.output!r}"
        )
    if config.max_samples < 0:
        raise ConfigError(f"config key 'max_samples' must be >= 0, got {config.max_samples}")
    same = Path(config.input).is_file() and Path(config.output).resolve() == Path(
        config.input
    ).resolve()
    if same:
        raise ConfigError(f"config key 'output' ({config.output}) would overwrite the input")


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass
class InputRows:
    """Rows as read (extra columns kept), their row numbers in the source, and the report
    of the rows dropped as invalid (``skip_invalid``)."""

    rows: list[dict]
    row_numbers: list[int]
    num_read: int
    report: StepReport


def read_input(
    source: str | Path, kind: str, split: str = "train", skip_invalid: bool = False,
    max_samples: int = 5,
) -> InputRows:
    """Read and validate rows with the training pipelines' readers and rules, keeping each
    row as read. A bad row raises ``DataError`` naming the source and row, unless
    ``skip_invalid``: then it goes to the ``load`` report."""
    rows, numbers, invalid, num_read = [], [], [], 0
    for index, where, row in read_raw_rows(source, split):
        num_read += 1
        try:
            if isinstance(row, RowProblem):
                raise row
            validate_row(row, kind)
        except RowProblem as problem:
            if not skip_invalid:
                raise DataError(f"{source}: row {index}{where}: {problem}") from None
            as_read = row if isinstance(row, dict) else None  # unparsable rows have no dict
            invalid.append((index, as_read, f"invalid {kind} row: {problem}"))
            continue
        rows.append(row)
        numbers.append(index)
    report = StepReport.from_removed(
        "load", num_read, [(row, reason) for _, row, reason in invalid], max_samples
    )
    for sample, (index, _, _) in zip(report.samples, invalid):
        sample["index"] = index
    return InputRows(rows, numbers, num_read, report)


# ---------------------------------------------------------------------------- writing


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` as .jsonl (one object a line), .json (one list) or .parquet, by the
    suffix; through a temporary file, so a failed write leaves no half file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise DataError(
                f"{path}: the rows do not fit one parquet schema ({error}); write .jsonl instead"
            ) from None
        pq.write_table(table, partial)
    else:
        with partial.open("w", encoding="utf-8") as out:
            if path.suffix == ".json":
                json.dump(rows, out, default=str)
            else:
                for row in rows:
                    out.write(json.dumps(row, default=str) + "\n")
    os.replace(partial, path)
    return path


def write_report(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ a run


def curate(config: CurationConfig, steps: Sequence[CurationStep] | None = None) -> dict:
    """Read the input, run the steps, write the kept rows and the report; the report dict
    (``summary`` is what the command prints last)."""
    steps = build_steps(config.steps) if steps is None else steps
    start = time.perf_counter()
    loaded = read_input(
        config.input, config.kind, config.split, config.skip_invalid, config.max_samples
    )
    logger.info("read %d rows from %s (%d invalid)", loaded.num_read, config.input,
                loaded.report.removed)
    kept, reports = run_pipeline(loaded.rows, steps, config.max_samples, loaded.row_numbers)
    reports = [loaded.report, *reports]
    write_rows(config.output, kept)
    summary = {
        "input_rows": loaded.num_read,
        "output_rows": len(kept),
        "removed": {report.name: report.removed for report in reports},
        "output": config.output,
        "report": config.report_path,
    }
    report = {
        "summary": summary,
        "seconds": round(time.perf_counter() - start, 3),
        "steps": [r.to_dict() for r in reports],
        "config": dataclasses.asdict(config),
    }
    write_report(config.report_path, report)
    return report
