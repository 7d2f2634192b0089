"""Curation steps that judge rows with a model: a reward model's score, a reference LM's
perplexity of the response.

Both follow the step contract of ``jaxpt.curation.base`` (``name``, ``__call__(rows) ->
(kept, [(removed row, reason)])``), load their model lazily on the first call, tokenize
each row once on the host and score the rows in bucketed batches (rows sorted by length,
padded to power-of-two lengths), so a dataset compiles a handful of programs, not one per
row. A row they cannot read (e.g. a conversation with no prompt before its assistant turn)
is removed with a reason that says why.
"""

from __future__ import annotations

import json
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.curation.base import CurationStep, Removed, row_kind


class UnscorableRow(ValueError):
    """A row a model filter cannot turn into (prompt, response) tokens."""


def is_preference_row(row: dict) -> bool:
    return row_kind(row) == "preference"


def prompt_and_response(row: dict):
    """(prompt, response) of an SFT row: the prompt as text or messages, the response as
    text or the messages after the prompt. A ``messages`` row's response starts at its last
    assistant turn."""
    from jaxpt.data.sources import RowProblem, normalize_sft_row

    try:
        row = normalize_sft_row({k: row[k] for k in ("messages", "prompt", "completion")
                                 if k in row})
    except RowProblem as problem:
        raise UnscorableRow(str(problem)) from None
    if "messages" not in row:
        return row["prompt"], row["completion"]
    messages, start = row["messages"], row["train_from"]
    if not start:
        start = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not start:
        raise UnscorableRow("no prompt before the assistant turn")
    return messages[:start], messages[start:]


def prompt_key(row: dict) -> str:
    """The prompt of a row as a canonical string: rows with equal keys share a prompt."""
    prompt = row["prompt"] if is_preference_row(row) else prompt_and_response(row)[0]
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def default_mesh():
    """Every device on the ``fsdp`` axis: weights and batches split over all of them."""
    from jaxpt.sharding import make_mesh

    return make_mesh()


# ---------------------------------------------------------------------------- reward model


class RewardModelFilter(CurationStep):
    """Remove rows a trained reward model (an ``rm`` task export) scores low.

    An SFT row's score is the reward of (prompt, response); a preference row's score is its
    margin, reward(prompt, chosen) - reward(prompt, rejected). ``threshold`` removes rows
    whose score is below it (for preference rows: pairs whose margin is below it, e.g. 0.0
    drops the pairs the reward model thinks are the wrong way round).
    ``top_k_per_prompt`` keeps only the k best-scoring rows among those sharing an identical
    prompt (ties keep the earlier row). With both, a row must pass both.

    Tokenization is the reward model's own (``RewardModel.tokenize``: as the ``rm`` task
    trained it); sequences over ``max_length`` keep their end, where the score is read.
    """

    name = "reward_model"

    def __init__(
        self,
        model: str,
        threshold: float | None = None,
        top_k_per_prompt: int | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        *,
        dtype: str = "float32",
        tokenizer: str | None = None,
        mesh=None,
    ):
        if threshold is None and top_k_per_prompt is None:
            raise ValueError("RewardModelFilter needs a threshold, a top_k_per_prompt or both")
        if top_k_per_prompt is not None and top_k_per_prompt < 1:
            raise ValueError(f"top_k_per_prompt must be >= 1, got {top_k_per_prompt}")
        self.model_path, self.threshold, self.top_k = model, threshold, top_k_per_prompt
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.tokenizer_path, self.mesh = tokenizer, mesh
        self._scorer = None

    @property
    def scorer(self):
        """The ``RewardModel``, loaded on first use."""
        if self._scorer is None:
            from jaxpt.rewards.reward_model import load_reward_model

            self._scorer = load_reward_model(
                self.model_path, mesh=self.mesh if self.mesh is not None else default_mesh(),
                dtype=self.dtype, batch_size=self.batch_size, max_length=self.max_length,
                tokenizer=self.tokenizer_path,
            )
        return self._scorer

    def score_rows(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Per row: the score (float64, NaN where unscorable), the rejected response's
        reward for preference rows (NaN otherwise), and why each unscorable row is."""
        from jaxpt.data.sources import DataError, RowProblem

        sequences, owners, problems = [], [], {}
        for index, row in enumerate(rows):
            try:
                if is_preference_row(row):
                    pairs = [(row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])]
                else:
                    pairs = [prompt_and_response(row)]
                ids = [self.scorer.tokenize(p, r) for p, r in pairs]
            except (UnscorableRow, RowProblem, DataError) as problem:
                problems[index] = str(problem)
                continue
            sequences.extend(ids)
            owners.extend((index, side) for side in range(len(ids)))
        rewards = self.scorer.score_token_ids(sequences) if sequences else np.zeros(0)
        first = np.full(len(rows), np.nan)
        second = np.full(len(rows), np.nan)
        for (index, side), reward in zip(owners, rewards.astype(np.float64)):
            (first if side == 0 else second)[index] = reward
        scores = np.where(np.isnan(second), first, first - second)
        return scores, second, problems

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        scores, rejected, problems = self.score_rows(rows)
        reasons: dict[int, str] = {i: f"cannot score: {p}" for i, p in problems.items()}
        if self.threshold is not None:
            for i in np.flatnonzero(scores < self.threshold):
                reasons[int(i)] = self._below(rows[i], scores[i], rejected[i])
        if self.top_k is not None:
            groups = defaultdict(list)
            for i, row in enumerate(rows):
                if i not in problems:
                    groups[prompt_key(row)].append(i)
            for members in groups.values():
                ranked = sorted(members, key=lambda i: (-scores[i], i))
                for rank, i in enumerate(ranked[self.top_k :], start=self.top_k + 1):
                    reasons.setdefault(i, f"rank {rank} of {len(members)} for its prompt "
                                          f"(top_k_per_prompt={self.top_k})")
        return _split(rows, reasons)

    def _below(self, row: dict, score: float, rejected: float) -> str:
        if is_preference_row(row):
            return (f"reward margin {score:.4g} (chosen {score + rejected:.4g} - rejected "
                    f"{rejected:.4g}) < threshold {float(self.threshold)}")
        return f"reward model score {score:.4g} < threshold {float(self.threshold)}"


# ------------------------------------------------------------------------------ perplexity


def masked_nll(model, ids_bt, segment_bt, mask_bt):
    """Sums of next-token NLL over the masked tokens of each row, and their counts [B].

    ``mask_bt[t]`` marks token ``t`` as scored (it is predicted from position ``t - 1``);
    rows are right-padded (``segment_bt`` 0 on padding).
    """
    from jaxpt.losses import token_logprobs

    logits_btv = model(ids_bt, segment_ids=segment_bt)
    logp_bt = token_logprobs(logits_btv[:, :-1], ids_bt[:, 1:])
    scored_bt = mask_bt[:, 1:].astype(jnp.float32)
    return -jnp.sum(logp_bt * scored_bt, axis=1), jnp.sum(scored_bt, axis=1)


class PerplexityFilter(CurationStep):
    """Remove rows whose response perplexity under a reference causal LM is out of range.

    The perplexity is exp(mean NLL) over the tokens the SFT task would train on: the chat
    rendering and assistant mask of ``jaxpt.data.chat.tokenize_sft`` (every assistant turn
    of a ``messages`` row; the completion and its EOS for plain text). A preference row is
    judged by its chosen response (rendered as DPO renders it). High perplexity flags
    garbled or off-distribution text, very low perplexity degenerate repetition.
    Sequences over ``max_length`` keep their end (the response), like the reward model.
    ``model`` is anything ``jaxpt.models.load_model`` takes (HF dir, hub name, preset, GGUF
    file or ``pkg:`` spec); the tokenizer is the model's (``tokenizer`` overrides it).
    """

    name = "perplexity"

    def __init__(
        self,
        model: str,
        max_perplexity: float | None = None,
        min_perplexity: float | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        *,
        dtype: str = "float32",
        tokenizer: str | None = None,
        mesh=None,
    ):
        if max_perplexity is None and min_perplexity is None:
            raise ValueError("PerplexityFilter needs max_perplexity, min_perplexity or both")
        self.model_path, self.max_ppl, self.min_ppl = model, max_perplexity, min_perplexity
        self.batch_size, self.max_length, self.dtype = batch_size, max_length, dtype
        self.tokenizer_path, self.mesh = tokenizer, mesh
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from jaxpt.data import tokenizer_for_model
            from jaxpt.models import load_model, state_shardings
            from jaxpt.sharding import batch_sharding, batch_shards, replicated

            mesh = self.mesh if self.mesh is not None else default_mesh()
            model = load_model(self.model_path, mesh=mesh, dtype=self.dtype)
            tokenizer = tokenizer_for_model(self.model_path, self.tokenizer_path)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            rows = batch_sharding(mesh, 2)
            forward = jax.jit(
                lambda p, *batch: masked_nll(nnx.merge(graphdef, p, rest), *batch),
                in_shardings=(state_shardings(params, mesh), rows, rows, rows),
                out_shardings=replicated(mesh),
            )
            ways = batch_shards(mesh)
            batch = -(-self.batch_size // ways) * ways  # divides over the batch axes
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            self._loaded = (tokenizer, forward, params, batch, int(pad))
        return self._loaded

    def tokenize(self, row: dict) -> tuple[list[int], list[int]]:
        """Token ids and the 0/1 mask of the scored (response) tokens of one row."""
        from jaxpt.data import chat
        from jaxpt.data.sources import normalize_preference_row, normalize_sft_row

        tokenizer = self._load()[0]
        if is_preference_row(row):
            pair = chat.tokenize_preference(normalize_preference_row(row), tokenizer)
            ids = list(pair["prompt_ids"]) + list(pair["chosen_ids"])
            mask = [0] * len(pair["prompt_ids"]) + list(pair["chosen_mask"])
        else:
            ids, mask = chat.tokenize_sft(normalize_sft_row(row), tokenizer)
            ids, mask = ids.tolist(), mask.astype(int).tolist()
        return ids[-self.max_length :], mask[-self.max_length :]

    def perplexities(self, rows: list[dict]) -> tuple[np.ndarray, dict[int, str]]:
        """Perplexity per row (NaN where it cannot be computed) and why for those rows."""
        from jaxpt.data.sources import DataError, RowProblem
        from jaxpt.rewards.reward_model import length_bucket

        _, forward, params, batch, pad = self._load()
        tokenized, problems = {}, {}
        for index, row in enumerate(rows):
            try:
                ids, mask = self.tokenize(row)
            except (RowProblem, DataError) as problem:
                problems[index] = str(problem)
                continue
            if not any(mask[1:]):
                problems[index] = f"no response tokens within max_length {self.max_length}"
                continue
            tokenized[index] = (ids, mask)
        nll = np.full(len(rows), np.nan)
        count = np.ones(len(rows))
        order = sorted(tokenized, key=lambda i: len(tokenized[i][0]))
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            length = length_bucket(max(len(tokenized[i][0]) for i in chunk), self.max_length)
            ids_bt = np.full((batch, length), pad, np.int32)
            segment_bt = np.zeros((batch, length), np.int32)
            mask_bt = np.zeros((batch, length), np.int32)
            for r, i in enumerate(chunk):
                ids, mask = tokenized[i]
                ids_bt[r, : len(ids)], mask_bt[r, : len(ids)] = ids, mask
                segment_bt[r, : len(ids)] = 1
            nll_b, count_b = jax.device_get(forward(params, ids_bt, segment_bt, mask_bt))
            nll[chunk], count[chunk] = nll_b[: len(chunk)], count_b[: len(chunk)]
        return np.exp(nll / count), problems

    def __call__(self, rows: list[dict]) -> tuple[list[dict], Removed]:
        perplexity, problems = self.perplexities(rows)
        reasons = {i: f"cannot score: {p}" for i, p in problems.items()}
        for i, ppl in enumerate(perplexity):
            if self.max_ppl is not None and ppl > self.max_ppl:
                reasons[i] = f"perplexity {format_perplexity(ppl)} > max {self.max_ppl:g}"
            elif self.min_ppl is not None and ppl < self.min_ppl:
                reasons[i] = f"perplexity {format_perplexity(ppl)} < min {self.min_ppl:g}"
        return _split(rows, reasons)


def format_perplexity(value: float) -> str:
    """One decimal from 100 up (812.4), four significant digits below (1.237)."""
    return f"{value:.1f}" if value >= 100 else f"{value:.4g}"


def _split(rows: list[dict], reasons: dict[int, str]) -> tuple[list[dict], Removed]:
    kept = [row for i, row in enumerate(rows) if i not in reasons]
    return kept, [(rows[i], reasons[i]) for i in sorted(reasons)]
