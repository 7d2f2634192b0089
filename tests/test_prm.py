"""Process reward models: step labels of the shipped arithmetic solutions, the step-row
format and its errors, the loss and first-bad-step metric by hand, a prm run whose export
transformers' token classifier reproduces, the scorer's aggregates, exact resume, and the
PRM as a best-of-n reranker in eval and as GRPO's reward."""

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from preference_helpers import ROOT, config_for, fast_overrides, train_rows
from tiny import sft_overrides

from jaxpt.config import load_config
from jaxpt.data import (
    DataError,
    build_step_pipeline,
    generate_step_rows,
    load_examples,
    load_tokenizer,
)
from jaxpt.data.arithmetic import Problem, solution_steps, step_labels, worked_solution
from jaxpt.evals import evaluate_task, parse_task
from jaxpt.evals.runner import reranker
from jaxpt.loop import run
from jaxpt.losses import first_bad_step, step_label_loss
from jaxpt.models import from_pretrained
from jaxpt.models.classifier import classifier_from_pretrained
from jaxpt.models.safetensors_io import SafetensorsFile
from jaxpt.rewards import load_reward_model
from jaxpt.step import StepContext
from jaxpt.tasks.prm import prm_loss

pytestmark = pytest.mark.usefixtures("one_device_runs")


def test_the_first_wrong_column_is_the_first_bad_step():
    problem = Problem(67, 34, "+")  # 7+4=11, 6+3+1=10 -> 101
    assert solution_steps(worked_solution(problem)) == ["7+4=11", "6+3+1=10", "#### 101"]
    assert step_labels(problem, ["7+4=11", "6+3+1=10", "#### 101"]) == [True] * 3
    # A dropped carry: the units line is right, the tens line forgets the "+1".
    assert step_labels(problem, ["7+4=11", "6+3=9", "#### 91"]) == [True, False, False]
    # A slip in the units: everything from there is bad, even a line that is locally right.
    assert step_labels(problem, ["7+4=12", "6+3+1=10", "#### 102"]) == [False] * 3
    # Extra steps after the answer are bad; whitespace around a step does not matter.
    assert step_labels(problem, [" 7+4=11 ", "6+3+1=10", "#### 101", "#### 101"]) == [
        True, True, True, False]
    rows = generate_step_rows(200, seed=0, split="test", max_digits=2, error_rate=0.5,
                              mistakes=("drop_carry", "slip"))
    for row in rows:
        a, op, b = _parse(row["problem"])
        assert row["labels"] == step_labels(Problem(a, b, op), row["completions"])
        # Labels are monotone: once bad, bad; a right answer line means all steps are right.
        assert row["labels"] == sorted(row["labels"], reverse=True)
        assert row["labels"][-1] == (row["completions"][-1] == f"#### {row['answer']}")
    wrong = sum(not r["labels"][-1] for r in rows)
    assert 70 <= wrong <= 130  # error_rate 0.5 of 200
    # The sloppy teacher's rows (the default): each wrong one forgot a carry or borrow, so
    # its first bad step is a column line whose reference takes one in ("x+y+1", "x-y-1")
    # and which has only two terms.
    sloppy = generate_step_rows(200, seed=0, split="test", max_digits=2)
    assert 20 <= sum(not r["labels"][-1] for r in sloppy) <= 100
    for row in sloppy:
        if all(row["labels"]):
            continue
        first_bad = row["labels"].index(False)
        a, op, b = _parse(row["problem"])
        expected = solution_steps(worked_solution(Problem(a, b, op)))[first_bad]
        written = row["completions"][first_bad]
        terms = [line.split("=")[0].count(op) + 1 for line in (expected, written)]
        assert terms == [3, 2], row
    with pytest.raises(ValueError, match="mistakes"):
        generate_step_rows(4, mistakes=("typo",))


def _parse(text):
    op = "+" if "+" in text else "-"
    a, b = text.split(op)
    return int(a), op, int(b)


def test_step_rows_bad_input_names_the_row():
    good = {"prompt": "2+2?", "completions": ["2+2=4", "#### 4"], "labels": [True, True]}
    assert load_examples([good], "steps").rows[0]["labels"] == [True, True]
    bad = [
        ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, "one label per step"),
        ({"prompt": "q", "completions": [], "labels": []}, "non-empty list of step strings"),
        ({"prompt": "q", "completions": ["a"], "labels": ["yes"]}, "'labels[0]'"),
        ({"prompt": "q", "completions": ["a"]}, "missing field(s) 'labels'"),
        ({"prompt": "q", "completions": ["a\x00"], "labels": [1]}, "NUL"),
    ]
    for row, message in bad:
        with pytest.raises(DataError, match=r"row 1.*" + re.escape(message)):
            load_examples([good, row], "steps")
    loaded = load_examples([good] + [row for row, _ in bad], "steps", skip_invalid=True)
    assert (len(loaded.rows), loaded.num_skipped) == (1, len(bad))


def test_step_row_layout_and_truncation():
    tiny_tokenizer = load_tokenizer(None)  # the shipped char-level one
    row = {"prompt": "ab", "completions": ["cd", "e"], "labels": [True, False]}
    batch = next(build_step_pipeline([row], tiny_tokenizer, seq_len=16, batch_size=2,
                                     shuffle=False, num_epochs=1))
    ids = batch["input_ids"][0]
    text = tiny_tokenizer.decode(ids[batch["segment_ids"][0] > 0])
    assert text == "ab" + "cd\n" + "e\n"
    labels = batch["step_labels"][0]
    # Each label sits on its step's separator, the last token of "cd\n" and "e\n".
    np.testing.assert_array_equal(np.nonzero(labels >= 0)[0], [4, 6])
    np.testing.assert_array_equal(labels[[4, 6]], [1, 0])
    # The second row pads the batch: all zeros, so the loss reads no step there.
    np.testing.assert_array_equal(batch["example_mask"], [1, 0])
    assert not batch["segment_ids"][1].any()
    # Too long: the last steps are cut with their labels, never a label without its step.
    short = next(build_step_pipeline([row], tiny_tokenizer, seq_len=6, batch_size=1,
                                     shuffle=False, num_epochs=1, max_prompt_length=2))
    np.testing.assert_array_equal(np.nonzero(short["step_labels"][0] >= 0)[0], [4])


def test_loss_and_first_bad_step_by_hand():
    # Two solutions; logits [B, T, 2]; labels at t = 1, 2, 3 of row 0 and t = 0, 2 of row 1.
    labels = np.array([[-1, 1, 1, 0], [1, -1, 0, -1]], np.int32)
    p_good = np.array([[0.5, 0.9, 0.3, 0.2], [0.8, 0.5, 0.6, 0.5]], np.float32)
    logits = np.stack([np.zeros_like(p_good), np.log(p_good / (1 - p_good))], -1)
    loss_bt, mask_bt, p_bt = step_label_loss(jnp.asarray(logits), jnp.asarray(labels))
    expected = -np.log([0.9, 0.3, 1 - 0.2, 0.8, 1 - 0.6])
    np.testing.assert_allclose(np.asarray(loss_bt)[labels >= 0], expected, rtol=1e-5)
    assert float(jnp.sum(jnp.where(mask_bt, 0, loss_bt))) == 0.0
    np.testing.assert_allclose(np.asarray(p_bt), p_good, rtol=1e-5)
    # Row 0: labelled first bad step is step 2, predicted (p < 0.5) step 1; row 1: step 1
    # labelled, none predicted (2 = the number of steps).
    np.testing.assert_array_equal(first_bad_step(jnp.asarray(labels == 0), mask_bt), [2, 1])
    np.testing.assert_array_equal(first_bad_step(p_bt < 0.5, mask_bt), [1, 2])

    class Stub:
        def __call__(self, input_ids, positions=None, segment_ids=None):
            return jnp.asarray(logits)

    # A third row pads the batch (all zeros, as a short batch is padded): it counts nothing.
    logits = np.concatenate([logits, np.zeros_like(logits[:1])])
    batch = {"input_ids": np.zeros((3, 4), np.int32), "positions": None,
             "segment_ids": np.array([[1] * 4, [1] * 4, [0] * 4], np.int32),
             "step_labels": np.concatenate([labels, np.zeros((1, 4), np.int32)]),
             "example_mask": np.array([1.0, 1.0, 0.0], np.float32)}
    out = prm_loss(Stub(), batch, StepContext(rng=None, step=0))
    np.testing.assert_allclose(out.numerator, expected.sum(), rtol=1e-5)
    assert float(out.denominator) == 5.0
    # Misses: row 0's good step at p 0.3, row 1's bad step at p 0.6.
    assert float(out.metrics["step_accuracy"]) == 3.0
    assert float(out.totals["first_bad_step_hits"]) == 0.0
    assert float(out.totals["solutions"]) == 2.0


def test_token_product_reading_and_outcome_only_labels_by_hand():
    # One row: a prompt token, then a reply of 4 tokens whose steps end at t = 2 and t = 4.
    p_token = np.array([[0.3, 0.9, 0.8, 0.5, 0.7]], np.float32)  # class-1 prob per token
    logits = np.stack([np.zeros_like(p_token), np.log(p_token / (1 - p_token))], -1)
    response = np.array([[0, 1, 1, 1, 1]], np.float32)
    labels = np.array([[-1, -1, 1, -1, 0]], np.int32)
    loss_bt, _, p_bt = step_label_loss(jnp.asarray(logits), jnp.asarray(labels),
                                       jnp.asarray(response), "token_product")
    # The prompt token's 0.3 does not count: the reply so far is right with 0.9 * 0.8, then
    # 0.9 * 0.8 * 0.5 * 0.7.
    np.testing.assert_allclose(np.asarray(p_bt)[0, [2, 4]], [0.72, 0.252], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(loss_bt)[0, [2, 4]], [-np.log(0.72), -np.log(0.748)],
                               rtol=1e-5)
    assert float(loss_bt[0, [0, 1, 3]].sum()) == 0.0

    class Stub:
        def __call__(self, input_ids, positions=None, segment_ids=None):
            return jnp.asarray(logits)

    batch = {"input_ids": np.zeros((1, 5), np.int32), "positions": None,
             "segment_ids": np.ones((1, 5), np.int32), "step_labels": labels,
             "response_mask": response, "example_mask": np.ones(1, np.float32)}
    ctx = StepContext(rng=None, step=0)
    outcome = prm_loss(Stub(), batch, ctx, last_step_only=True)  # the answer step's label only
    assert float(outcome.denominator) == 1.0
    np.testing.assert_allclose(outcome.numerator, -np.log(1 - 0.7), rtol=1e-5)
    product = prm_loss(Stub(), batch, ctx, reading="token_product")
    np.testing.assert_allclose(product.numerator, -np.log(0.72) - np.log(0.748), rtol=1e-5)


STEPS = {"train.max_steps": 4, "data.seq_len": 64}


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory, tiny_dir, one_device_runs):
    """A 4-step prm run on the tiny checkpoint (its export is a process reward model)."""
    out = str(tmp_path_factory.mktemp("prm") / "full")
    return out, run(config_for("prm", fast_overrides(out, tiny_dir, **STEPS)))


def test_prm_export_is_a_transformers_token_classifier_and_the_scorer_reads_it(prm_run):
    _, result = prm_run
    final = result.evals[-1]
    assert {"eval_loss", "eval_step_accuracy", "eval_first_bad_step_accuracy",
            "eval_solutions"} <= set(final)
    assert final["eval_solutions"] == 8.0 and 0 <= final["eval_first_bad_step_accuracy"] <= 1

    hf_dir = result.hf_dir
    hf = transformers.AutoModelForTokenClassification.from_pretrained(
        hf_dir, dtype=torch.float32).eval()
    assert hf.config.architectures == ["LlamaForTokenClassification"]
    assert hf.config.num_labels == 2 and hf.config.step_separator == "\n"
    rows = generate_step_rows(6, seed=0, split="test", max_digits=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    batch = next(build_step_pipeline(rows, tokenizer, seq_len=64, batch_size=6,
                                     shuffle=False, num_epochs=1))
    ours = classifier_from_pretrained(hf_dir)
    assert ours.kind == "token" and ours.score.bias is not None
    ids, segments = batch["input_ids"], batch["segment_ids"]
    ours_btl = np.asarray(ours(ids, positions=batch["positions"], segment_ids=segments))
    with torch.no_grad():
        theirs_btl = hf(torch.as_tensor(ids, dtype=torch.long),
                        attention_mask=torch.as_tensor(segments)).logits.numpy()
    real = segments > 0
    np.testing.assert_allclose(ours_btl[real], theirs_btl[real], atol=1e-4)
    with pytest.raises(ValueError, match="token classifier checkpoint"):
        classifier_from_pretrained(hf_dir, kind="sequence")

    # The scorer splits replies into steps as training did: per-step probabilities equal
    # transformers' softmax at each step's end, aggregated by min / prod / last.
    p_good = torch.softmax(torch.as_tensor(theirs_btl), -1)[..., 1].numpy()
    expected = [p_good[i][batch["step_labels"][i] >= 0] for i in range(len(rows))]
    replies = ["\n".join(r["completions"]) for r in rows]
    prompts = [r["prompt"] for r in rows]
    scorer = load_reward_model(hf_dir, batch_size=4)
    assert type(scorer).__name__ == "ProcessRewardModel" and scorer.aggregate == "min"
    for got, want in zip(scorer.step_scores(prompts, replies), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(scorer.score(prompts, replies), [w.min() for w in expected],
                               atol=1e-5)
    assert load_reward_model(hf_dir, aggregate="prod").aggregate == "prod"
    scorer.aggregate = "prod"  # the same compiled forward, another reduction
    np.testing.assert_allclose(scorer.score(prompts, replies), [w.prod() for w in expected],
                               atol=1e-5)
    scorer.aggregate = "last"
    np.testing.assert_allclose(scorer.score(prompts, replies), [w[-1] for w in expected],
                               atol=1e-5)
    assert scorer.score(prompts[:1], ["\n \n"])[0] == 0.0  # no steps: no credit


def test_prm_resumes_exactly(prm_run, tmp_path, tiny_dir):
    full, result = prm_run
    resumed = config_for("prm", fast_overrides(str(tmp_path / "resumed"), tiny_dir, **STEPS))
    assert run(resumed, stop_after_step=2).preempted
    second = run(resumed)
    assert second.step == 4
    a, b = train_rows(full), train_rows(str(tmp_path / "resumed"))
    for key in ("loss", "grad_norm", "step_accuracy"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    weights = [SafetensorsFile(os.path.join(d, "model.safetensors"))
               for d in (result.hf_dir, second.hf_dir)]
    for name in weights[0].keys():  # noqa: SIM118 (not a dict)
        np.testing.assert_array_equal(weights[0].array(name)[...], weights[1].array(name)[...])


def test_prm_reranks_best_of_n_in_eval_and_rewards_grpo(prm_run, tmp_path, tiny_dir):
    hf_dir = prm_run[1].hf_dir
    task = parse_task({"name": "arithmetic", "arithmetic": {"n": 4, "max_digits": 2},
                       "num_samples": 4, "temperature": 1.0, "max_new_tokens": 12,
                       "greedy": False, "k": [1, 4], "rerank": {"prm": hf_dir}})
    result = evaluate_task(from_pretrained(tiny_dir), load_tokenizer(tiny_dir), task)
    samples = result.samples
    assert len(samples) == 16 and all("prm" in s["rerank"] for s in samples)
    scorer = reranker(hf_dir)  # what the eval scored with (loaded once per process)
    assert scorer.aggregate == "min"
    np.testing.assert_allclose([s["rerank"]["prm"] for s in samples],
                               scorer.score([s["prompt"] for s in samples],
                                            [s["completion"] for s in samples]), atol=1e-6)
    for k in (1, 4):  # best@k by hand from the recorded scores
        picks = []
        for p in range(4):
            group = samples[p * 4 : p * 4 + k]
            best = max(range(k), key=lambda i: (group[i]["rerank"]["prm"], -i))
            picks.append(group[best]["score"] >= 1.0)
        assert result.metrics[f"best@{k}/prm"] == np.mean(picks)
    with pytest.raises(Exception, match="rerank"):
        parse_task({"name": "arithmetic", "rerank": {"prm": hf_dir}})  # greedy: nothing to pick

    # As GRPO's reward (no reward function beside it): every reward is a step aggregate.
    out = str(tmp_path / "grpo")
    grpo = load_config(os.path.join(ROOT, "configs", "grpo_arith.yaml"),
                       sft_overrides(out, tiny_dir, **{
                           "grpo.reward_model": hf_dir, "grpo.rewards": "[]",
                           "grpo.num_generations": 2, "grpo.max_prompt_length": 16,
                           "grpo.max_completion_length": 8, "grpo.eval_prompts": 0,
                           "data.eval": "null", "train.max_steps": 1, "train.log_every": 1}))
    run(grpo)
    (row,) = train_rows(out)
    assert 0.0 <= row["reward"] <= 1.0
    assert row["rewards/reward_model/mean"] == row["reward"]
