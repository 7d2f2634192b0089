"""Read example rows from files, the hub or memory, and validate them.

Supported row formats (extra columns are ignored):

SFT, conversational      {"messages": [{"role": ..., "content": ...}, ...]}  (>= 1 assistant turn)
SFT, prompt/completion   {"prompt": str, "completion": str}, or TRL-style
                         {"prompt": [messages], "completion": [messages]}
Preference               {"prompt", "chosen", "rejected"}: all plain strings, or a message list
                         for the prompt and message lists (with an assistant turn) for both
                         responses; optional "margin" number (absent -> 0.0).
Prompt (RL)              {"prompt": str | [messages]} plus any other columns (e.g. "answer"),
                         which are kept and passed to reward functions.
Unpaired (KTO)           {"prompt", "completion", "label"}: prompt and completion as for
                         preference responses, label true (desirable) or false (undesirable);
                         a preference row is read as two unpaired rows (chosen: true,
                         rejected: false).
Step-labelled (PRM)      {"prompt": str | [messages], "completions": [str, ...] (the steps of
                         one response), "labels": [bool, ...] (one per step: is it right)}

Validated rows are normalised to one of:
    {"messages": [{"role", "content"}], "train_from": int}   # loss only on messages[train_from:]
    {"prompt": str, "completion": str}
    {"prompt": str | messages, "chosen": str | messages, "rejected": ..., "margin": float}
    {"prompt": str | messages, **other columns}
    {"prompt": str | messages, "completion": str | messages, "label": bool}
    {"prompt": str | messages, "completions": [str], "labels": [bool]}

Every string in the fields a row kind reads (every column of a prompt row) must be clean
text: a lone surrogate or a NUL character rejects the row, as does a preference pair whose
responses are identical. Bad rows are errors, or skipped and counted with `skip_invalid`.
"""

import codecs
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
RowKind = Literal["sft", "preference", "prompt", "unpaired", "steps"]


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the source and the row."""


class RowProblem(Exception):
    """Internal: what is wrong with one row (turned into a DataError with file and row)."""


@dataclasses.dataclass
class LoadedExamples:
    """Validated, normalised rows and how many were read and skipped."""

    rows: list[dict]
    source: str
    num_read: int
    num_skipped: int
    skip_reasons: list[str]  # the first few, for logging


def load_examples(
    source: str | Path | list[dict],
    kind: RowKind = "sft",
    split: str = "train",
    skip_invalid: bool = False,
) -> LoadedExamples:
    """Load and validate rows from a .jsonl/.json/.parquet file, a hub dataset or a list of dicts.

    A bad row raises DataError naming the source and the 0-based row index, unless
    `skip_invalid`, in which case it is dropped and counted in `num_skipped`.
    """
    normalize = {
        "sft": normalize_sft_row,
        "preference": normalize_preference_row,
        "prompt": normalize_prompt_row,
        "unpaired": normalize_unpaired_row,
        "steps": normalize_step_row,
    }[kind]
    name = "<memory>" if isinstance(source, list) else str(source)
    rows, reasons, num_read = [], [], 0
    for index, where, row in read_rows(source, split):
        num_read += 1
        try:
            if isinstance(row, RowProblem):
                raise row
            normalized = normalize(row)
            check_text(_fields_read(kind, row))
            if kind in ("preference", "unpaired") and "chosen" in row and (
                row["chosen"] == row["rejected"]
            ):
                raise RowProblem("'chosen' and 'rejected' are identical: nothing to prefer")
            if kind == "unpaired":  # a preference row gives two
                rows.extend(normalized)
            else:
                rows.append(normalized)
        except RowProblem as problem:
            message = f"{name}: row {index}{where}: {problem}"
            if not skip_invalid:
                raise DataError(message) from None
            reasons.append(message)
    return LoadedExamples(rows, name, num_read, len(reasons), reasons[:20])


def read_rows(source, split: str) -> Iterator[tuple[int, str, Any]]:
    """Yield (row index, location hint, row dict or RowProblem) from any supported source."""
    if isinstance(source, list):
        yield from ((i, "", row) for i, row in enumerate(source))
        return
    path = Path(source)
    if path.suffix in FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        if path.suffix == ".parquet":
            yield from _read_with_datasets("parquet", str(path))
        elif path.suffix in (".jsonl", ".json"):
            yield from _read_json(path)
        else:
            raise DataError(f"{source}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")
        return
    import datasets  # only hub and directory users pay for the import

    try:  # a hub name, or a local directory of data files
        dataset = datasets.load_dataset(str(source), split=split)
    except Exception as error:
        raise DataError(f"{source}: could not load dataset split {split!r}: {error}") from error
    yield from ((i, "", row) for i, row in enumerate(dataset))


def _read_with_datasets(builder: str, path: str) -> Iterator[tuple[int, str, Any]]:
    import datasets

    dataset = datasets.load_dataset(builder, data_files=path, split="train")
    yield from ((i, "", row) for i, row in enumerate(dataset))


def _read_json(path: Path) -> Iterator[tuple[int, str, Any]]:
    # Parsed here rather than by `datasets`: Arrow rejects a whole file when one row has a
    # differently typed field, without saying which row; we want to name (or skip) that row.
    # A leading BOM is written by some Windows tools; json rejects it.
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if path.suffix == ".json" and data.lstrip().startswith(b"["):
        rows = _parse_json(data)
        if isinstance(rows, RowProblem):
            raise DataError(f"{path}: {rows}")
        yield from ((i, "", row) for i, row in enumerate(rows))
        return
    index = 0
    # Lines end at "\n" only: str.splitlines also splits at U+2028, U+0085 and other
    # characters that JSON allows unescaped inside strings.
    for line_number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        yield index, f" (line {line_number})", _parse_json(line)
        index += 1


def _parse_json(data: bytes) -> Any:
    """The value of one JSON text, or a RowProblem saying why there is none."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        return RowProblem(f"not UTF-8 text (byte {error.start}: {data[error.start]:#04x})")
    except RecursionError:
        return RowProblem("invalid JSON: nested too deeply")
    except ValueError as error:  # JSONDecodeError, or an integer too long to convert
        return RowProblem(f"invalid JSON: {error}")


def normalize_sft_row(row: Any) -> dict:
    """Validate one SFT row and return its normalised form; raise RowProblem if it is bad."""
    _require_dict(row)
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        _require_assistant(messages, "messages")
        return {"messages": messages, "train_from": 0}
    if "prompt" not in row or "completion" not in row:
        raise RowProblem("needs a 'messages' field, or both 'prompt' and 'completion'")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt_messages = _messages(prompt, "prompt")
        completion_messages = _messages(completion, "completion")
        _require_assistant(completion_messages, "completion")
        return {"messages": prompt_messages + completion_messages, "train_from": len(prompt)}
    raise RowProblem(
        "'prompt' and 'completion' must both be strings or both be message lists, got "
        f"{type(prompt).__name__} and {type(completion).__name__}"
    )


def normalize_preference_row(row: Any) -> dict:
    """Validate one preference row and return its normalised form; raise RowProblem if bad."""
    _require_fields(row, ("prompt", "chosen", "rejected"))
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    elif all(isinstance(x, list) for x in (prompt, chosen, rejected)):
        out = {"prompt": _messages(prompt, "prompt")}
        for field in ("chosen", "rejected"):
            out[field] = _messages(row[field], field)
            _require_assistant(out[field], field)
    else:
        kinds = ", ".join(type(x).__name__ for x in (prompt, chosen, rejected))
        raise RowProblem(
            "'prompt', 'chosen' and 'rejected' must all be strings or all be message lists, "
            f"got {kinds}"
        )
    out["margin"] = _margin(row.get("margin"))
    return out


def normalize_unpaired_row(row: Any) -> list[dict]:
    """Validate one unpaired row (or a preference row, split in two) and return the
    normalised rows; raise RowProblem if it is bad."""
    _require_dict(row)
    if "chosen" in row or "rejected" in row:
        pair = normalize_preference_row(row)
        return [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
                for side in ("chosen", "rejected")]
    _require_fields(row, ("prompt", "completion", "label"),
                    " (or a preference row's 'chosen' and 'rejected')")
    prompt, completion, label = row["prompt"], row["completion"], row["label"]
    if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
        label = bool(label)
    else:
        raise RowProblem(f"'label' must be true (desirable) or false (undesirable), got {label!r}")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"prompt": prompt, "completion": completion, "label": label}]
    if isinstance(prompt, list) and isinstance(completion, list):
        completion = _messages(completion, "completion")
        _require_assistant(completion, "completion")
        return [{"prompt": _messages(prompt, "prompt"), "completion": completion, "label": label}]
    raise RowProblem(
        "'prompt' and 'completion' must both be strings or both be message lists, got "
        f"{type(prompt).__name__} and {type(completion).__name__}"
    )


def normalize_step_row(row: Any) -> dict:
    """Validate one step-labelled row (a response as its steps, one label each)."""
    _require_fields(row, ("prompt", "completions", "labels"))
    prompt, steps, labels = row["prompt"], row["completions"], row["labels"]
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt")
    elif not isinstance(prompt, str):
        raise RowProblem(f"'prompt' must be a string or a message list, got {type(prompt).__name__}")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise RowProblem("'completions' must be a non-empty list of step strings")
    if not isinstance(labels, list) or len(labels) != len(steps):
        count = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise RowProblem(f"'labels' must be a list of one label per step ({len(steps)}), "
                         f"got {count}")
    for i, label in enumerate(labels):
        if not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
            raise RowProblem(f"'labels[{i}]' must be true (a right step) or false, got {label!r}")
    return {"prompt": prompt, "completions": list(steps), "labels": [bool(x) for x in labels]}


def normalize_prompt_row(row: Any) -> dict:
    """Validate one RL prompt row (other columns kept for reward functions)."""
    _require_dict(row)
    if "prompt" not in row:
        raise RowProblem("missing field 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise RowProblem("'prompt' must not end with an assistant turn")
    elif not isinstance(prompt, str) or not prompt:
        raise RowProblem(f"'prompt' must be a non-empty string or a message list, got {prompt!r}")
    return {**row, "prompt": prompt}


def _fields_read(kind: RowKind, row: dict) -> dict:
    """The columns of a valid row that its kind uses: all of them for prompt rows, whose other
    columns go to reward functions."""
    if kind == "prompt":
        return row
    if kind == "steps":
        keys = ("prompt", "completions")
    elif kind == "sft" or (kind == "unpaired" and "chosen" not in row):
        keys = ("messages",) if "messages" in row else ("prompt", "completion")
    else:
        keys = ("prompt", "chosen", "rejected")
    return {key: row[key] for key in keys}


def check_text(value: Any, path: str = "") -> None:
    """Raise RowProblem naming the key path (e.g. `messages[1].content`) of the first string
    under `value`, dict keys included, that is not clean text: see `text_problem`."""
    stack = [(path, value)]
    while stack:  # not recursive: a row may nest as deep as the JSON parser allows
        where, item = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise RowProblem(f"'{where}' {problem}")
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                name = key if isinstance(key, str) else str(key)
                problem = text_problem(name)
                if problem:
                    raise RowProblem(f"a key of '{where or 'the row'}' {problem}")
                children.append((f"{where}.{name}" if where else name, child))
            stack.extend(reversed(children))  # report the first bad string in file order
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(f"{where}[{i}]", child) for i, child in enumerate(item)]))


def text_problem(text: str) -> str | None:
    """Why `text` cannot be trained on, or None. A lone surrogate (U+D800..U+DFFF: JSON's
    `\\udcff` escape allows one, but it is not Unicode text) fails UTF-8 encoding and
    tokenizers; a NUL character marks binary or corrupt data and ends C strings."""
    nul = text.find("\x00")
    if nul >= 0:
        return f"contains a NUL character (U+0000) at character {nul}"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(text[error.start])
            return (
                f"contains a lone surrogate U+{code:04X} at character {error.start}, "
                "which is not valid Unicode text"
            )
    return None


def _require_dict(row: Any) -> None:
    if not isinstance(row, dict):
        raise RowProblem(f"expected a JSON object, got {type(row).__name__}")


def _require_fields(row: Any, keys: tuple[str, ...], hint: str = "") -> None:
    """A RowProblem unless ``row`` is an object holding every key of ``keys``."""
    _require_dict(row)
    missing = [k for k in keys if k not in row]
    if missing:
        raise RowProblem(f"missing field(s) {', '.join(map(repr, missing))}{hint}")


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowProblem(f"'{field}' must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowProblem(f"'{field}[{i}]' must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowProblem(f"'{field}[{i}]' has unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise RowProblem(
                f"'{field}[{i}].content' must be a string, got {type(content).__name__}"
            )
        messages.append({"role": role, "content": content})
    return messages


def _require_assistant(messages: list[dict], field: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem(f"'{field}' has no assistant turn to train on")


def _margin(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem(f"'margin' must be a finite number, got {value!r}")
    return float(value)
