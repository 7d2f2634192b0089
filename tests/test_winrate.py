"""``python -m jaxpt.winrate``: tiny random models judged by a tiny reward model (and a fake
LLM judge), the JSON line, the files it writes, and a model against itself tying."""

import json
import os
import re

import numpy as np
import pytest

from jaxpt.cli import winrate as winrate_cli
from jaxpt.evals.winrate import judge_outcomes, reward_model_outcomes
from jaxpt.judges import PairwiseJudge

KEYS = {"win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "wins", "ties", "losses",
        "n", "mean_length_a", "mean_length_b", "mean_tokens_a", "mean_tokens_b"}


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A second tiny random causal LM (another seed), so A and B answer differently."""
    from tiny import TINY

    from jaxpt.data import load_tokenizer
    from jaxpt.models import init_model, save_pretrained

    path = str(tmp_path_factory.mktemp("other_model"))
    save_pretrained(init_model(TINY, seed=1), path)
    load_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    """A tiny reward model: the tiny LM's trunk with a seeded random score head."""
    from jaxpt.data import load_tokenizer
    from jaxpt.models.classifier import classifier_from_pretrained, save_classifier

    path = str(tmp_path_factory.mktemp("tiny_rm"))
    save_classifier(classifier_from_pretrained(tiny_dir, seed=3, pad_token_id=0), path)
    load_tokenizer().save_pretrained(path)
    return path


def _run(capsys, *argv) -> dict:
    assert winrate_cli.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_model_against_itself_ties_and_files_are_written(tiny_dir, rm_dir, tmp_path, capsys):
    out = tmp_path / "self"
    result = _run(
        capsys, "--model-a", tiny_dir, "--model-b", tiny_dir, "--prompts", "arithmetic",
        "--reward-model", rm_dir, "--num-prompts", "6", "--max-new-tokens", "8",
        "--bootstrap", "50", "--output-dir", str(out),
    )
    assert KEYS <= set(result)
    assert result["n"] == 6 and result["ties"] == 6 and result["wins"] == result["losses"] == 0
    assert result["win_rate"] == 0.5 and result["win_rate_ci"] == [0.5, 0.5]
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert result["mean_length_a"] == result["mean_length_b"]
    assert json.loads((out / "results.json").read_text())["win_rate"] == 0.5
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["response_a"] == r["response_b"] for r in rows)
    assert all(r["reward_a"] == r["reward_b"] and r["score_a"] == 0.5 for r in rows)

    # samples.jsonl is a pairs file for the human-eval page as it is.
    from jaxpt.human import read_pairs

    pairs = read_pairs(str(out / "samples.jsonl"))
    assert [p["id"] for p in pairs] == [r["id"] for r in rows]


def test_two_models_from_a_prompts_file(tiny_dir, other_dir, rm_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?"}) + "\n"
                               for i in range(5)))
    result = _run(
        capsys, "--model-a", other_dir, "--model-b", tiny_dir, "--prompts", str(prompts),
        "--reward-model", rm_dir, "--max-new-tokens", "8", "--bootstrap", "50",
        "--output-dir", str(tmp_path / "ab"),
    )
    assert result["n"] == 5 and result["wins"] + result["ties"] + result["losses"] == 5
    rows = [json.loads(line) for line in (tmp_path / "ab" / "samples.jsonl").read_text()
            .splitlines()]
    # Each row's outcome agrees with its rewards (A wins iff its reward is clearly higher).
    for row in rows:
        diff = row["reward_a"] - row["reward_b"]
        expected = 1.0 if diff > 1e-4 else 0.0 if diff < -1e-4 else 0.5
        assert row["score_a"] == expected
    assert result["win_rate"] == pytest.approx(np.mean([r["score_a"] for r in rows]))
    lo, hi = result["win_rate_ci"]
    assert lo <= result["win_rate"] <= hi


def test_llm_judge_cli_model_against_itself_ties(tiny_dir, capsys):
    """Identical answers make both judge prompts of a pair identical, so a deterministic
    judge names the same position twice: position bias, which the judge scores as a tie."""
    result = _run(
        capsys, "--model-a", tiny_dir, "--model-b", tiny_dir, "--prompts", "arithmetic",
        "--judge", tiny_dir, "--num-prompts", "2", "--max-new-tokens", "4",
        "--judge-max-new-tokens", "4", "--bootstrap", "20",
    )
    assert result["judge_kind"] == "llm_judge" and result["n"] == 2
    assert result["win_rate"] == 0.5 and result["ties"] == 2


def test_bad_prompts_file_is_named(tiny_dir, rm_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    code = winrate_cli.main(["--model-a", tiny_dir, "--model-b", tiny_dir, "--prompts",
                             str(bad), "--reward-model", rm_dir])
    assert code == 2
    assert re.search(r"bad\.jsonl: row 1.*'prompt'", capsys.readouterr().err)


class _FakeRM:
    def score(self, prompts, responses):
        return np.array([len(r) for r in responses], np.float32)


def test_reward_model_outcomes_by_hand():
    outcomes, a, b = reward_model_outcomes(_FakeRM(), ["p"] * 3, ["xx", "x", "x"],
                                           ["x", "xx", "y"])
    assert outcomes.tolist() == [1.0, 0.0, 0.5]
    assert a.tolist() == [2, 1, 1] and b.tolist() == [1, 2, 1]


def test_llm_judge_outcomes_are_both_orders_combined():
    """A fake judge that always prefers the answer saying "WINNER": consistent in both
    orders, so A gets 1 when A has it, 0 when B has it, a tie when neither does."""

    def generator(texts):
        replies = []
        for text in texts:
            first = text.split("[Answer A]")[1].split("[Answer B]")[0]
            second = text.split("[Answer B]")[1]
            verdict = "A" if "WINNER" in first else "B" if "WINNER" in second else "tie"
            replies.append(f"Verdict: {verdict}")
        return replies

    judge = PairwiseJudge(generator=generator)
    outcomes, verdicts = judge_outcomes(judge, ["q"] * 3, ["WINNER", "bad", "meh"],
                                        ["bad", "WINNER", "meh"])
    assert outcomes.tolist() == [1.0, 0.0, 0.5]
    assert all(v.consistent for v in verdicts)


def test_python_m_entry_point_exists():
    import jaxpt.winrate  # noqa: F401

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "jaxpt", "winrate.py")) as f:
        assert "jaxpt.cli.winrate import main" in f.read()
