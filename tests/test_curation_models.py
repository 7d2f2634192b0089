"""Model-based curation: the reward-model and perplexity filters against independent
computations, and rejection sampling (best/worst picks, row formats, byte-exact resume)."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from tiny import TINY

from jaxpt.config import ConfigError
from jaxpt.curation.model_filters import (
    PerplexityFilter,
    RewardModelFilter,
    format_perplexity,
)
from jaxpt.curation.rejection import load_rejection_config, run_rejection_sampling
from jaxpt.data import generate_examples, load_tokenizer
from jaxpt.data.chat import tokenize_sft
from jaxpt.data.sources import normalize_sft_row
from jaxpt.models import from_pretrained
from jaxpt.models.classifier import init_classifier, save_classifier
from jaxpt.rewards import load_reward_model


def digit_count(prompts, completions, **kwargs):
    """A deterministic toy reward: how many digits a completion has."""
    return [float(sum(c.isdigit() for c in text)) for text in completions]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny random reward model (rm export layout) with the shipped tokenizer."""
    path = str(tmp_path_factory.mktemp("tiny_rm"))
    save_classifier(init_classifier(TINY, seed=1, pad_token_id=0), path)
    load_tokenizer().save_pretrained(path)
    return path


def _between(values, fraction=0.5) -> float:
    """A threshold halfway between two neighbouring values, far from both."""
    ordered = np.sort(np.asarray(values))
    i = int(fraction * (len(ordered) - 1))
    assert ordered[i + 1] - ordered[i] > 1e-4, "values too close for a clean threshold"
    return float((ordered[i] + ordered[i + 1]) / 2)


def _sft_rows():
    rows = generate_examples(6, seed=3, split="train")
    # Two more answers to the first prompt, so top-k has a group to rank.
    for text in ("#### 12", "I do not know."):
        rows.append({**rows[0], "id": f"alt-{text}",
                     "messages": rows[0]["messages"][:-1] + [{"role": "assistant", "content": text}]})
    rows.append({"prompt": "Say hi.", "completion": "hi", "id": "plain"})
    return rows


def test_reward_model_filter_matches_the_reward_model(rm_dir, mesh1):
    rows = _sft_rows()
    rm = load_reward_model(rm_dir, mesh=mesh1)
    pairs = [(r["messages"][:-1], r["messages"][-1]["content"]) if "messages" in r
             else (r["prompt"], r["completion"]) for r in rows]
    expected = np.array([rm.score([p], [c])[0] for p, c in pairs])

    threshold = _between(expected)
    rm_filter = RewardModelFilter(rm_dir, threshold=threshold)  # on all 8 devices
    kept, removed = rm_filter(rows)
    assert kept == [r for r, s in zip(rows, expected) if s >= threshold]
    assert len(removed) == sum(expected < threshold)
    for _, reason in removed:
        assert reason.startswith("reward model score ") and reason.endswith(f"< threshold {threshold}")

    no_prompt = {"messages": [{"role": "assistant", "content": "hi"}]}
    reason = "cannot score: no prompt before the assistant turn"
    assert rm_filter([no_prompt]) == ([], [(no_prompt, reason)])

    # Top-1 per prompt: of the three rows sharing the first prompt only the best stays.
    kept, removed = RewardModelFilter(rm_dir, top_k_per_prompt=1, batch_size=4)(rows)
    group = [0, 6, 7]
    best = group[int(np.argmax(expected[group]))]
    assert kept == [r for i, r in enumerate(rows) if i not in group or i == best]
    assert sorted(reason for _, reason in removed) == [
        "rank 2 of 3 for its prompt (top_k_per_prompt=1)",
        "rank 3 of 3 for its prompt (top_k_per_prompt=1)",
    ]

    # Preference rows: the margin chosen - rejected against the threshold.
    pref = [{"prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
             "rejected": [{"role": "assistant", "content": "#### 0"}], "n": i}
            for i, r in enumerate(rows[:6])]
    chosen = rm.score([p["prompt"] for p in pref], [p["chosen"][0]["content"] for p in pref])
    rejected = rm.score([p["prompt"] for p in pref], ["#### 0"] * len(pref))
    margin = chosen - rejected
    assert np.min(np.abs(margin)) > 1e-4
    kept, removed = RewardModelFilter(rm_dir, threshold=0.0)(pref)
    assert [p["n"] for p in kept] == [i for i in range(6) if margin[i] >= 0]
    assert all(reason.startswith("reward margin ") for _, reason in removed)


def _hand_perplexity(model, tokenizer, row) -> float:
    """exp(mean NLL) of the SFT-masked tokens, from one unpadded forward in float64."""
    ids, mask = tokenize_sft(normalize_sft_row(row), tokenizer)
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids[None]), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.flatnonzero(mask[1:]) + 1  # token t is predicted at position t - 1
    return float(np.exp(-np.mean(logp[targets - 1, ids[targets]])))


def test_perplexity_filter_matches_a_plain_forward(tiny_dir, mesh1):
    rows = _sft_rows()
    model, tokenizer = from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    expected = np.array([_hand_perplexity(model, tokenizer, r) for r in rows])

    ppl_filter = PerplexityFilter(tiny_dir, max_perplexity=1e9, batch_size=4)
    perplexity, problems = ppl_filter.perplexities(rows)
    assert not problems
    np.testing.assert_allclose(perplexity, expected, rtol=1e-5)

    limit = _between(expected)
    kept, removed = PerplexityFilter(tiny_dir, max_perplexity=limit, mesh=mesh1)(rows)
    assert kept == [r for r, p in zip(rows, expected) if p <= limit]
    for row, reason in removed:
        assert reason == f"perplexity {format_perplexity(expected[rows.index(row)])} > max {limit:g}"
    kept, _ = PerplexityFilter(tiny_dir, min_perplexity=limit)(rows)
    assert kept == [r for r, p in zip(rows, expected) if p >= limit]


def _config(tmp_path, name, model, **rejection):
    values = {
        "output_dir": str(tmp_path / name), "seed": 1,
        "model": {"path": model, "dtype": "float32"},
        "data": {"train": "arithmetic", "arithmetic": {"num_train": 10, "max_digits": 2}},
        "rejection": {
            "num_samples": 4, "prompts_per_chunk": 3, "max_prompt_length": 32,
            "max_completion_length": 8,
            "rewards": [{"name": "digits", "fn": "test_curation_models:digit_count"}],
            **rejection,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return str(path)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rejection_sampling_picks_best_and_resumes_byte_exact(tmp_path, tiny_dir, mesh8):
    config = load_rejection_config(_config(tmp_path, "full", tiny_dir))
    summary = run_rejection_sampling(config, mesh=mesh8)
    full = tmp_path / "full"
    samples, rows = _lines(full / "samples.jsonl"), _lines(full / "rows.jsonl")
    assert len(samples) == 10 == summary["prompts"] and summary["samples"] == 40
    assert summary["rows_written"] == len(rows) == 10 and summary["complete"]
    prompts = generate_examples(10, 0, "train", task=config.data.arithmetic.task())
    for sample, row, prompt in zip(samples, rows, prompts):
        texts = sample["completions"]
        assert sample["scores"]["digits"] == digit_count(None, texts)
        assert sample["total"] == sample["scores"]["digits"]
        assert sample["best"] == int(np.argmax(sample["total"]))
        assert row == {"id": prompt["id"], "answer": prompt["answer"],
                       "problem": prompt["problem"],
                       "messages": prompt["prompt"] + [
                           {"role": "assistant", "content": texts[sample["best"]]}]}
    totals = np.array([s["total"] for s in samples], np.float32)
    assert summary["mean_best_score"] == pytest.approx(totals.max(1).mean())
    assert summary["mean_score"] == pytest.approx(totals.mean())

    # Stopped after 2 of 4 chunks, then rerun: the same bytes as one uninterrupted run.
    config = load_rejection_config(_config(tmp_path, "resumed", tiny_dir))
    first = run_rejection_sampling(config, mesh=mesh8, max_chunks=2)
    assert first["prompts"] == 6 and not first["complete"]
    with open(tmp_path / "resumed" / "rows.jsonl", "a") as f:
        f.write('{"partial chunk of a crashed run')  # cut on resume
    second = run_rejection_sampling(config, mesh=mesh8)
    assert second == summary
    for name in ("rows.jsonl", "samples.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (full / name).read_bytes()
    # Another config cannot continue these files.
    other = load_rejection_config(_config(tmp_path, "resumed", tiny_dir, num_samples=2))
    with pytest.raises(ConfigError, match="another config"):
        run_rejection_sampling(other, mesh=mesh8)


def test_preference_mode_with_a_reward_model_through_the_cli(
    tmp_path, tiny_dir, rm_dir, mesh1, capsys
):
    from jaxpt.cli.rejection_sample import main

    path = _config(tmp_path, "pref", tiny_dir, mode="preference", reward_model=rm_dir,
                   reward_model_weight=0.5, min_margin=0.5)
    assert main(["--config", path]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    samples = _lines(tmp_path / "pref" / "samples.jsonl")
    rows = _lines(tmp_path / "pref" / "rows.jsonl")
    rm = load_reward_model(rm_dir, mesh=mesh1)
    written = [s for s in samples if s["written"]]
    assert summary["rows_written"] == len(rows) == len(written) > 0
    for sample in samples:
        texts = sample["completions"]
        rm_scores = rm.score([sample["prompt"]] * len(texts), texts)
        np.testing.assert_allclose(sample["scores"]["reward_model"], rm_scores, atol=1e-5)
        total = np.float32(digit_count(None, texts)) + np.float32(0.5) * np.float32(
            sample["scores"]["reward_model"])
        np.testing.assert_allclose(sample["total"], total, atol=1e-5)
        best, worst = sample["best"], sample["worst"]
        assert (best, worst) == (int(np.argmax(sample["total"])), int(np.argmin(sample["total"])))
        gap = sample["total"][best] - sample["total"][worst]
        assert sample["written"] == (gap >= 0.5 and texts[best] != texts[worst])
    for sample, row in zip(written, rows):
        texts = sample["completions"]
        assert row["prompt"] == sample["prompt"]
        assert row["chosen"] == [{"role": "assistant", "content": texts[sample["best"]]}]
        assert row["rejected"] == [{"role": "assistant", "content": texts[sample["worst"]]}]
    assert os.path.exists(tmp_path / "pref" / "state.json")
