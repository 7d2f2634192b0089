"""RLAIF labels: judge verdicts -> preference rows that the rm/dpo readers take, ties and
position bias dropped and counted, label accuracy against a ground truth, the CLI."""

import json
import math
import re

import pytest

from jaxpt.cli.label import main as label_main
from jaxpt.data import load_examples
from jaxpt.judges import PairwiseJudge, combine
from jaxpt.judges.labeling import arithmetic_answer_pairs, label_summary, preference_rows


def _row(i, prompt="What is 1+1?"):
    return {"id": f"p{i}", "prompt": prompt, "response_a": f"a{i}", "response_b": f"b{i}",
            "better": "a"}


def test_decisive_verdicts_become_rows_and_ties_and_position_bias_are_dropped():
    rows = [_row(i) for i in range(5)]
    verdicts = [
        combine("Verdict: A", "Verdict: B"),  # a in both orders
        combine("Verdict: B", "Verdict: A"),  # b in both orders
        combine("Verdict: A", "Verdict: A"),  # position bias: first answer both times -> tie
        combine("Verdict: tie", "Verdict: tie"),
        combine("Verdict: A", "Verdict: tie"),  # a at half weight: decisive, not consistent
    ]
    out = preference_rows(rows, verdicts)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in out] == [
        ("p0", "a0", "b0"), ("p1", "b1", "a1"), ("p4", "a4", "b4")]
    assert [r["judge_consistent"] for r in out] == [True, True, False]
    consistent = preference_rows(rows, verdicts, consistent_only=True)
    assert [r["id"] for r in consistent] == ["p0", "p1"]
    summary = label_summary(rows, verdicts, len(out), "better")
    assert summary["ties"] == 2 and summary["written"] == 3
    # Decisive labels: a, b, a against truth a, a, a -> 2 of 3 right; consistent: 1 of 2.
    assert summary["label_accuracy"] == pytest.approx(2 / 3)
    assert summary["label_accuracy_consistent"] == pytest.approx(0.5)
    assert summary["decisive_frac"] == pytest.approx(0.6)
    assert math.isnan(label_summary(rows[:1], [verdicts[3]], 0, "better")["label_accuracy"])


def test_conversation_prompts_get_assistant_turns_that_the_preference_reader_loads(tmp_path):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    out = preference_rows([_row(0, messages)], [combine("Verdict: B", "Verdict: A")])
    assert out[0]["chosen"] == [{"role": "assistant", "content": "b0"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    loaded = load_examples(str(path), "preference")
    assert loaded.rows[0]["chosen"][-1]["content"] == "b0"


def _answer_aware_judge(texts):
    """Prefers the answer whose final '#### n' equals the true sum in the question."""
    replies = []
    for text in texts:
        a, b = map(int, re.search(r"What is (\d+)\+(\d+)", text).groups()) if re.search(
            r"What is (\d+)\+(\d+)", text) else (None, None)
        finals = re.findall(r"#### (-?\d+)", text)
        if a is None or len(finals) < 2:
            replies.append("Verdict: tie")
            continue
        replies.append("Verdict: A" if int(finals[0]) == a + b else "Verdict: B")
    return replies


def test_arithmetic_pairs_labelled_by_a_perfect_judge_are_all_right(tmp_path):
    rows = [r for r in arithmetic_answer_pairs(40, seed=3) if "+" in str(r["prompt"])]
    assert rows and {r["better"] for r in rows} == {"a", "b"}  # both orders occur
    judge = PairwiseJudge(generator=_answer_aware_judge)
    verdicts = judge([r["prompt"] for r in rows], [r["response_a"] for r in rows],
                     [r["response_b"] for r in rows])
    out = preference_rows(rows, verdicts)
    summary = label_summary(rows, verdicts, len(out), "better")
    assert summary["label_accuracy"] == 1.0 and summary["agreement"] == 1.0
    assert summary["written"] == len(rows)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    assert len(load_examples(str(path), "preference").rows) == len(rows)


def test_cli_writes_rows_and_a_json_summary(tmp_path, tiny_dir, capsys):
    out = tmp_path / "prefs.jsonl"
    verdicts = tmp_path / "verdicts.jsonl"
    code = label_main(["--judge", tiny_dir, "--in", "arithmetic", "-n", "4", "--out", str(out),
                       "--max-new-tokens", "4", "--batch-size", "8", "--verdicts", str(verdicts)])
    assert code == 0
    rows = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert len(rows) == 4 and {"reply_ab", "reply_ba", "winner", "better"} <= set(rows[0])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["written"] == len(out.read_text().splitlines())
    for key in ("agreement", "position_bias", "ties", "label_accuracy", "unparsed"):
        assert key in summary


def test_cli_names_the_row_that_lacks_a_response(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(_row(0)) + "\n" + json.dumps({"prompt": "x", "response_a": "y"})
                     + "\n")
    code = label_main(["--judge", "unused", "--in", str(pairs), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "row 1 has no 'response_b'" in capsys.readouterr().err
