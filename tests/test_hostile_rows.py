"""Hostile dataset rows: every reader (SFT, RM/DPO pairs, RL prompts, evaluation) either
stops with an error naming the file, the row and the key, or with ``data.skip_invalid``
skips the row and counts it where the other skipped rows are counted."""

import json
import os

import pytest

from jaxpt.data import (
    DataError,
    build_preference_pipeline,
    build_sft_pipeline,
    encode_prompt,
    load_examples,
    load_tokenizer,
)

ONE_SHARD = {"shard_index": 0, "shard_count": 1}
USER, ASSISTANT = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
GOOD = {
    "sft": {"messages": [USER, ASSISTANT]},
    "preference": {"prompt": "q", "chosen": "yes", "rejected": "no"},
    "prompt": {"prompt": "What is 1+2?", "answer": "3"},
}
SURROGATE, NUL = "\udcff", "\x00"  # what the JSON texts "\udcff" and "\u0000" decode to


def chat(content, role="user"):
    return {"messages": [{"role": role, "content": content}, ASSISTANT]}


def pair_of_messages(prompt="q", chosen="yes", rejected="no"):
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


# (kind, the bad line: a row to write as JSON, or raw bytes, what the error says)
RAW_LINES = [
    (b"{oops", "invalid JSON"),
    (b'{"messages": "\xff"}', "not UTF-8 text (byte 14: 0xff)"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nested too deeply"),
    (b'{"margin": ' + b"1" * 5000 + b"}", "invalid JSON: Exceeds the limit"),
    ([1, 2], "expected a JSON object, got list"),
    ("text", "expected a JSON object, got str"),
]
HOSTILE = [
    *[("sft", line, expected) for line, expected in RAW_LINES],
    ("sft", chat("a" + SURROGATE), "'messages[0].content' contains a lone surrogate U+DCFF"),
    ("sft", chat("\ud800", role="assistant"), "'messages[0].content' contains a lone surrogate"),
    ("sft", chat("x" + NUL), "'messages[0].content' contains a NUL character (U+0000)"),
    ("sft", chat(7), "'messages[0].content' must be a string, got int"),
    ("sft", chat(["a"]), "'messages[0].content' must be a string, got list"),
    ("sft", chat(None), "'messages[0].content' must be a string, got NoneType"),
    ("sft", chat("a", role=5), "unknown role 5"),
    ("sft", chat("a", role=["user"]), "unknown role ['user']"),
    ("sft", {"messages": []}, "'messages' must be a non-empty list"),
    ("sft", {"messages": [USER, dict(ASSISTANT, **{SURROGATE: 1})]}, "a key of 'messages[1]'"),
    (
        "sft",
        {"prompt": [USER], "completion": [dict(ASSISTANT, content=SURROGATE)]},
        "'completion[0].content' contains a lone surrogate",
    ),
    ("sft", {"prompt": "q", "completion": "a" + NUL}, "'completion' contains a NUL"),
    *[("preference", line, expected) for line, expected in RAW_LINES],
    ("preference", dict(GOOD["preference"], chosen=SURROGATE), "'chosen' contains a lone"),
    ("preference", dict(GOOD["preference"], prompt=NUL), "'prompt' contains a NUL"),
    ("preference", pair_of_messages(prompt=SURROGATE), "'prompt[0].content' contains a lone"),
    ("preference", pair_of_messages(rejected=SURROGATE), "'rejected[0].content' contains a"),
    ("preference", dict(GOOD["preference"], rejected="yes"), "'chosen' and 'rejected' are iden"),
    ("preference", pair_of_messages(rejected="yes"), "'chosen' and 'rejected' are identical"),
    ("preference", {"prompt": "", "chosen": SURROGATE, "rejected": "no"}, "'chosen' contains"),
    ("preference", {"prompt": "", "chosen": "a", "rejected": "a"}, "are identical"),
    # TRL's implicit-prompt rows (whole conversations in chosen/rejected) need a prompt here.
    ("preference", {"chosen": [USER, ASSISTANT], "rejected": [USER]}, "field(s) 'prompt'"),
    *[("prompt", line, expected) for line, expected in RAW_LINES],
    ("prompt", {"prompt": "q" + SURROGATE}, "'prompt' contains a lone surrogate U+DCFF"),
    ("prompt", {"prompt": [dict(USER, content=SURROGATE)]}, "'prompt[0].content' contains"),
    ("prompt", {"prompt": "q", "answer": "3" + SURROGATE}, "'answer' contains a lone"),
    ("prompt", {"prompt": "q", "tests": [{"in": NUL}]}, "'tests[0].in' contains a NUL"),
    ("prompt", {"prompt": ""}, "'prompt' must be a non-empty string"),
    ("prompt", {"prompt": None}, "'prompt' must be a non-empty string"),
    ("prompt", {"prompt": []}, "'prompt' must be a non-empty list"),
    ("prompt", {"prompt": [USER, ASSISTANT]}, "must not end with an assistant turn"),
]


def write_rows(path, rows) -> str:
    """A .jsonl file of ``rows`` (bytes are written as they are); returns its path."""
    lines = [row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def prompt_rows(tmp_path, path, skip_invalid):
    """The GRPO task's train prompts of ``path`` and the run summary, as a run reads them."""
    from jaxpt.config import load_config
    from jaxpt.tasks.base import RunContext
    from jaxpt.tasks.rollout import prompt_rows

    config = load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "grpo_arith.yaml"),
        [
            f"output_dir={tmp_path}",
            f"data.train={path}",
            "data.eval=null",
            "data.eval_fraction=0",
            f"data.skip_invalid={str(skip_invalid).lower()}",
        ],
    )
    ctx = RunContext(config=config, mesh=None, rules={}, output_dir=str(tmp_path))
    return prompt_rows(ctx, "train"), ctx.summary


def read(kind, path, tok, tmp_path, skip_invalid):
    """(kept rows, skipped count, skip reasons) through the reader each task uses."""
    if kind == "prompt":
        rows, summary = prompt_rows(tmp_path, path, skip_invalid)
        skipped = summary.get("data", {}).get("train_skipped_invalid", 0)
        return len(rows), skipped, summary.get("data_skip_reasons", [])
    build = build_sft_pipeline if kind == "sft" else build_preference_pipeline
    pipeline = build(
        path, tok, seq_len=64, batch_size=1, skip_invalid=skip_invalid, num_epochs=1, **ONE_SHARD
    )
    return pipeline.stats.examples, pipeline.stats.skipped_invalid, pipeline.skip_reasons


@pytest.mark.parametrize("kind,bad_row,expected", HOSTILE)
def test_hostile_row_is_named_or_skipped_and_counted(tmp_path, tok, kind, bad_row, expected):
    good = GOOD[kind]
    path = write_rows(tmp_path / "data.jsonl", [good, good, bad_row, good])
    with pytest.raises(DataError) as error:
        read(kind, path, tok, tmp_path, skip_invalid=False)
    assert f"{path}: row 2 (line 3): " in str(error.value)
    assert expected in str(error.value)
    kept, skipped, reasons = read(kind, path, tok, tmp_path, skip_invalid=True)
    assert (kept, skipped) == (3, 1)
    assert reasons == [str(error.value)]


def test_in_memory_rows_are_checked_the_same_way(tok):
    rows = [GOOD["sft"], chat(SURROGATE)]
    with pytest.raises(DataError, match=r"<memory>: row 1: 'messages\[0\].content' contains a"):
        build_sft_pipeline(rows, tok, seq_len=64, batch_size=1, **ONE_SHARD)
    pipeline = build_sft_pipeline(
        rows, tok, seq_len=64, batch_size=1, skip_invalid=True, **ONE_SHARD
    )
    assert (pipeline.stats.rows_read, pipeline.stats.skipped_invalid) == (2, 1)


def test_valid_unusual_text_is_kept(tmp_path, tok):
    # A surrogate *pair* escape is one valid character; U+2028 and U+0085 may stand unescaped
    # inside JSON strings; a BOM and CRLF line ends come from Windows tools.
    texts = ["\U0001f600 é 中", "line\u2028separator", "next\x85line", "tab\tand\rreturn"]
    rows = [chat(text) for text in texts]
    body = "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    assert '"\\ud83d\\ude00' in json.dumps(rows[0])  # how an ASCII-only writer stores it
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    for name in ("a.jsonl", "b.json", "c.jsonl"):
        loaded = load_examples(tmp_path / name)
        assert [r["messages"][0]["content"] for r in loaded.rows] == texts, name
    pipeline = build_sft_pipeline(tmp_path / "a.jsonl", tok, seq_len=64, batch_size=1, **ONE_SHARD)
    assert (pipeline.stats.examples, pipeline.stats.skipped_invalid) == (4, 0)


def test_invalid_utf8_json_array_file_is_named(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[{"messages": "\xff"}]')
    with pytest.raises(DataError, match=r"rows.json: not UTF-8 text \(byte 15: 0xff\)"):
        load_examples(path)


def test_huge_row_is_truncated_or_dropped_and_counted(tmp_path, tok):
    # No length limit on rows: a long one is cut to max_length, or dropped, like any other.
    huge = {"messages": [USER, dict(ASSISTANT, content="y" * 50_000)]}
    path = write_rows(tmp_path / "data.jsonl", [GOOD["sft"], huge])
    kwargs = dict(seq_len=64, batch_size=1, num_epochs=1, **ONE_SHARD)
    kept = build_sft_pipeline(path, tok, **kwargs)
    assert (kept.stats.truncated, kept.stats.examples) == (1, 2)
    dropped = build_sft_pipeline(path, tok, overflow="drop", **kwargs)
    assert (dropped.stats.dropped_too_long, dropped.stats.examples) == (1, 1)


def test_eval_command_names_a_hostile_row(tmp_path, capsys):
    from jaxpt.cli.eval import main

    path = write_rows(tmp_path / "eval.jsonl", [GOOD["prompt"], {"prompt": "q", "answer": NUL}])
    assert main(["--model", "jaxpt-tiny", "--data", path]) == 2
    assert f"eval: {path}: row 1 (line 2): 'answer' contains a NUL" in capsys.readouterr().err


def test_encode_prompt_rejects_text_that_is_not_unicode(tok):
    # Prompts typed on a command line reach here without a dataset: Python turns bytes that
    # are not UTF-8 in argv into lone surrogates.
    with pytest.raises(DataError, match=r"'prompt' contains a lone surrogate U\+DCFF"):
        encode_prompt(tok, "What is 1+2?" + SURROGATE)
    with pytest.raises(DataError, match=r"'prompt\[1\].content' contains a NUL"):
        encode_prompt(tok, [{"role": "system", "content": "s"}, dict(USER, content=NUL)])
