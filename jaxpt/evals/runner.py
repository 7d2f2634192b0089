"""Run eval tasks: encode prompts, generate (greedy and/or n samples), score, and reduce to
metrics; write ``results.json`` and ``samples.jsonl``; print a table.

Metrics of one task: ``accuracy`` (greedy; mean@1 of the samples when the task turns the
greedy pass off), ``n`` (problems) and, with ``num_samples`` > 1 at a temperature,
``pass@k``, ``mean@k``, (for scorers that extract an answer) ``maj@k`` and, for each reward
model in the task's ``rerank``, ``best@k/<name>`` (best-of-k by that model) for each ``k``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from jaxpt.evals.sampled import best_at_k, sampled_metrics
from jaxpt.evals.scorers import get_scorer
from jaxpt.evals.tasks import EvalExample, EvalTask, load_task_examples

log = logging.getLogger("jaxpt")


@dataclasses.dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    samples: list[dict]  # one per scored completion (see ``evaluate_task``)


def task_sampler(tokenizer, task: EvalTask, *, temperature: float, num_samples: int,
                 eos_token_id=None, model_path: str | None = None):
    """The ``PromptSampler`` of one pass over ``task``: its prompts through the chat template
    or not (``task.chat``), ``num_samples`` completions each at ``temperature``."""
    from jaxpt.sampling import PromptSampler

    return PromptSampler(
        tokenizer, max_new_tokens=task.max_new_tokens, temperature=temperature,
        top_p=task.top_p if temperature > 0 else None, num_samples=num_samples,
        model_path=model_path, eos_token_id=eos_token_id, chat=task.chat,
    )


def _generate_texts(model, tokenizer, prompts, task: EvalTask, *, temperature, num_samples,
                    eos_token_id, model_path, batch_size, seed) -> tuple[list[str], list[int]]:
    """Completions of ``prompts`` (texts or messages) prompt-major (``num_samples`` per
    prompt), all of a prompt's samples in one launch; each cut before the task's first stop
    string. The chunk from prompt ``begin`` draws with ``seed + begin``."""
    sampler = task_sampler(tokenizer, task, temperature=temperature, num_samples=num_samples,
                           eos_token_id=eos_token_id, model_path=model_path)
    ids = [sampler.encode(p) for p in prompts]
    per_batch = max(1, batch_size // num_samples)
    texts, lengths = [], []
    for samples in sampler.sample_in_chunks(model, ids, seed=seed, chunk_size=per_batch):
        texts += [_cut(text, task.stop) for text in samples.texts]
        lengths += samples.lengths
        log.info("%s: %d/%d prompts x %d %s", task.name, len(texts) // num_samples,
                 len(prompts), num_samples, "sampled" if temperature > 0 else "greedy")
    return texts, lengths


def _cut(text: str, stops: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def _score(task: EvalTask, examples, texts: list[str], per_prompt: int):
    scorer = get_scorer(task.scorer)
    rows = []
    for example in examples:
        row = {**example.row, "answer": example.answer} if task.answer_field else example.row
        rows.extend([row] * per_prompt)
    return scorer, scorer.score(texts, rows)


def evaluate_task(
    model,
    tokenizer,
    task: EvalTask,
    examples: Sequence[EvalExample] | None = None,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    model_path: str | None = None,
    batch_size: int = 64,
) -> TaskResult:
    """Generate and score ``task`` (its examples loaded unless given) with ``model``.

    Each sample record holds the example ``id``, ``sample`` (index among the n samples, or
    None for the greedy completion), ``greedy``, the ``prompt``, the ``completion``,
    ``scored`` (the extracted answer, or the program that ran without its tests) and
    ``score``. Generation uses the task's own seed: it touches no other random state.
    Generation stops at ``eos_token_id`` (default: ``jaxpt.data.eos_token_ids(tokenizer,
    model_path)``).
    """
    if examples is None:
        examples = load_task_examples(task)
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples")
    start = time.perf_counter()
    prompts = [e.prompt for e in examples]
    generation = {"eos_token_id": eos_token_id, "model_path": model_path,
                  "batch_size": batch_size, "seed": task.seed}
    metrics: dict[str, float] = {}
    samples: list[dict] = []
    lengths: list[int] = []

    def record(texts, scored, greedy: bool, per_prompt: int) -> None:
        for i, (text, result) in enumerate(zip(texts, scored)):
            example = examples[i // per_prompt]
            samples.append({
                "task": task.name, "id": example.id,
                "sample": None if greedy else i % per_prompt, "greedy": greedy,
                "prompt": example.prompt, "completion": text, "answer": example.answer,
                "scored": result.scored, "score": result.score,
            })

    if task.greedy or not task.sampled:
        texts, lens = _generate_texts(
            model, tokenizer, prompts, task, temperature=0.0, num_samples=1, **generation
        )
        _, scored = _score(task, examples, texts, 1)
        record(texts, scored, True, 1)
        lengths += lens
        metrics["accuracy"] = float(np.mean([s.score >= 1.0 for s in scored]))
    if task.sampled:
        n = task.num_samples
        texts, lens = _generate_texts(
            model, tokenizer, prompts, task, temperature=task.temperature, num_samples=n,
            **generation,
        )
        scorer, scored = _score(task, examples, texts, n)
        record(texts, scored, False, n)
        lengths += lens
        scores = [[s.score for s in scored[p * n : (p + 1) * n]] for p in range(len(examples))]
        answers = None
        if scorer.votes:
            answers = [[s.scored for s in scored[p * n : (p + 1) * n]]
                       for p in range(len(examples))]
        sampled = sampled_metrics(scores, answers, task.k)
        metrics.setdefault("accuracy", sampled.get("mean@1", float(np.mean(scores))))
        metrics.update(sampled)
        sample_prompts = [e.prompt for e in examples for _ in range(n)]
        for name, path in task.rerank.items():
            ranks = reranker(path).score(sample_prompts, texts)
            for sample, rank in zip(samples[-len(texts):], ranks):
                sample.setdefault("rerank", {})[name] = float(rank)
            for k in task.k:
                metrics[f"best@{k}/{name}"] = float(np.mean([
                    best_at_k(scores[p], ranks[p * n : (p + 1) * n], k)
                    for p in range(len(examples))]))
    metrics["n"] = len(examples)
    metrics["mean_completion_tokens"] = float(np.mean(lengths))
    metrics["eval_s"] = round(time.perf_counter() - start, 3)
    return TaskResult(task.name, metrics, samples)


_RERANKERS: dict = {}


def reranker(path: str):
    """The reward model (``rm`` or ``prm`` export) at ``path``, loaded once per process."""
    if path not in _RERANKERS:
        from jaxpt.rewards import load_reward_model

        if not os.path.isdir(path):
            raise FileNotFoundError(f"rerank: no reward model dir at {path}")
        _RERANKERS[path] = load_reward_model(path, batch_size=64)
    return _RERANKERS[path]


def evaluate_tasks(model, tokenizer, tasks: Sequence[EvalTask], **kwargs) -> list[TaskResult]:
    """``evaluate_task`` for each task, in order."""
    return [evaluate_task(model, tokenizer, task, **kwargs) for task in tasks]


def summary(results: Sequence[TaskResult], model: str, *, flat: bool) -> dict:
    """The result object the CLI prints and saves: one task's metrics flat (``flat``, with
    ``task`` and ``model``), else ``{"model": ..., task_name: {metrics}, ...}``."""
    if flat:
        (result,) = results
        return {"task": result.name, "model": model, **result.metrics}
    return {"model": model, **{r.name: r.metrics for r in results}}


def write_results(output_dir: str, results: Sequence[TaskResult], summary_json: dict) -> None:
    """``results.json`` (``summary_json``, see ``summary``) and ``samples.jsonl`` (one row
    per scored completion, all tasks)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary_json, f, indent=2)
        f.write("\n")
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        for result in results:
            f.writelines(json.dumps(sample) + "\n" for sample in result.samples)


def format_table(results: Sequence[TaskResult]) -> str:
    """A readable table: one row per task, one column per metric."""
    names = []
    for result in results:
        names += [k for k in result.metrics if k not in names and k != "eval_s"]
    header = ["task", *names]
    rows = [[r.name, *(_cell(r.metrics.get(k)) for k in names)] for r in results]
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def print_table(results: Sequence[TaskResult], file=None) -> None:
    print(format_table(results), file=file or sys.stderr, flush=True)


def training_metrics(results: Sequence[TaskResult]) -> dict[str, float]:
    """Task metrics named for a training run's log: ``eval/<task>/<metric>``."""
    return {
        f"eval/{r.name}/{k}": float(v) for r in results for k, v in r.metrics.items()
        if k != "eval_s"
    }


def make_training_evaluator(config, ctx):
    """``(state) -> {"eval/<task>/<metric>": value}`` for a training config's
    ``train.eval_tasks`` (None when it names none), with the run's tokenizer (``ctx``, a
    ``jaxpt.tasks.RunContext``). Examples are loaded once, here; generation uses each task's
    own seed, so evaluating changes no training RNG or data state."""
    from jaxpt.data import tokenizer_for_model
    from jaxpt.evals.tasks import parse_tasks

    tasks = parse_tasks(list(config.train.eval_tasks), "train.eval_tasks")
    if not tasks:
        return None
    if ctx.tokenizer is None:
        ctx.tokenizer = tokenizer_for_model(config.model.path, config.model.tokenizer)
    tokenizer = ctx.tokenizer
    loaded = [(task, load_task_examples(task)) for task in tasks]

    def evaluate(state) -> dict[str, float]:
        model = state.model()
        results = [
            evaluate_task(model, tokenizer, task, examples, model_path=config.model.path)
            for task, examples in loaded
        ]
        return training_metrics(results)

    return evaluate
