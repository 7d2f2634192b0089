"""Score (prompt, response) pairs with a trained reward model (for PPO and evaluation).

``load_reward_model(dir)`` reads a ``...ForSequenceClassification`` checkpoint (what the
``rm`` task exports) or a process reward model's ``...ForTokenClassification`` one (``prm``)
and its tokenizer. Pairs are tokenized exactly as the ``rm`` task's
data pipeline does (chat template for conversational prompts, EOS after plain text), so a
score is read at the same token it was trained at. Batches are padded to bucketed shapes
(batch_size rows, power-of-two lengths), so a stream of calls compiles a handful of times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

MIN_BUCKET = 32


def length_bucket(length: int, max_length: int) -> int:
    """The padded length for a sequence: the next power of two >= 32, capped at max_length."""
    return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max_length)


class RewardModel:
    """A jitted scorer around a ``SequenceClassifier`` and its tokenizer."""

    def __init__(self, model, tokenizer, *, mesh, batch_size: int = 16, max_length=None):
        from jaxpt.models.hf_io import state_shardings
        from jaxpt.sharding import batch_sharding, batch_shards, replicated

        self.tokenizer = tokenizer
        self.mesh = mesh
        data_ways = batch_shards(mesh)
        self.batch_size = -(-batch_size // data_ways) * data_ways  # divides over the batch axes
        self.max_length = max_length or model.config.max_position_embeddings
        self.pad_token_id = model.pad_token_id if model.pad_token_id is not None else 0
        graphdef, self.params, rest = nnx.split(model, nnx.Param, ...)
        read = self._read

        def forward(params, ids_bt, segment_bt):
            return read(nnx.merge(graphdef, params, rest)(ids_bt, segment_ids=segment_bt))

        rows = batch_sharding(mesh, 2)
        self._forward = jax.jit(
            forward,
            in_shardings=(state_shardings(self.params, mesh), rows, rows),
            out_shardings=replicated(mesh),
        )

    @staticmethod
    def _read(scores_bl):
        """What the jitted forward returns of the model's output: the reward [B]."""
        return scores_bl[:, 0]

    def tokenize(self, prompt, response) -> list[int]:
        """Token ids of one pair, as the rm task's pipeline builds them. ``prompt`` is text or a
        message list; ``response`` text (an assistant turn for chat prompts) or messages."""
        from jaxpt.data import chat
        from jaxpt.data.sources import normalize_preference_row

        if isinstance(prompt, list) and isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        row = normalize_preference_row({"prompt": prompt, "chosen": response, "rejected": response})
        pair = chat.tokenize_preference(row, self.tokenizer)
        return list(pair["prompt_ids"]) + list(pair["chosen_ids"])

    def score(self, prompts: Sequence, responses: Sequence) -> np.ndarray:
        """Rewards [N] (float32) of N (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return self.score_token_ids([self.tokenize(p, r) for p, r in zip(prompts, responses)])

    def score_token_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards [N] of already tokenized sequences (prompt + response, no padding).

        Sequences longer than ``max_length`` keep their end (where the score is read).
        """
        scores = np.zeros(len(sequences), np.float32)
        for chunk, out_b in self._run(sequences):
            scores[chunk] = out_b[: len(chunk)]
        return scores

    def _run(self, sequences):
        """Yield (indices, the forward's host output for them) over padded, bucketed
        batches of ``sequences`` (each cut to its last ``max_length`` tokens)."""
        sequences = [list(s)[-self.max_length :] for s in sequences]
        # Sort by length so each chunk pads to the smallest bucket it can.
        order = np.argsort([len(s) for s in sequences], kind="stable")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            length = length_bucket(max(len(sequences[i]) for i in chunk), self.max_length)
            ids_bt = np.full((self.batch_size, length), self.pad_token_id, np.int32)
            segment_bt = np.zeros((self.batch_size, length), np.int32)
            for row, i in enumerate(chunk):
                ids_bt[row, : len(sequences[i])] = sequences[i]
                segment_bt[row, : len(sequences[i])] = 1
            out = self._forward(self.params, ids_bt, segment_bt)
            yield chunk, np.asarray(out.addressable_data(0))

    __call__ = score


class ProcessRewardModel(RewardModel):
    """A jitted scorer around a process reward model (a two-label ``TokenClassifier``, what
    ``task: prm`` exports): a response is split into steps at ``separator``, each step's
    probability of being right is read as the model was trained to read it (``reading``:
    at the step's last token, or the product of the reply's token probabilities up to there;
    see ``jaxpt.losses.process``), and ``aggregate`` (min, prod or last) makes them one
    reward in [0, 1]. A response without steps scores 0."""

    def __init__(self, model, tokenizer, *, mesh, separator: str = "\n",
                 aggregate: str = "min", reading: str = "step_end", batch_size: int = 16,
                 max_length=None):
        from jaxpt.losses.process import AGGREGATES, READINGS

        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
        if not separator:
            raise ValueError("a process reward model needs a non-empty step separator")
        self.separator, self.aggregate, self.reading = separator, aggregate, reading
        super().__init__(model, tokenizer, mesh=mesh, batch_size=batch_size,
                         max_length=max_length)

    @staticmethod
    def _read(scores_btl):
        # log P(right) = -softplus(logit_bad - logit_good): unlike a log-softmax it keeps
        # its precision near 0, so confident steps still rank (float32 1 - p would be 0).
        return -jax.nn.softplus(scores_btl[..., 0] - scores_btl[..., 1])

    def steps(self, response) -> list[str]:
        """The steps of a response (text, or an assistant message list): its pieces between
        separators that are not blank."""
        from jaxpt.rewards.text import completion_text

        return [s for s in completion_text(response).split(self.separator) if s.strip()]

    def tokenize_steps(self, prompt, response) -> tuple[list[int], int, list[int]]:
        """Token ids of prompt + steps, as the prm task's pipeline builds them, where the
        steps start, and the position of each step's last token."""
        from jaxpt.data import chat

        steps = self.steps(response)
        row = {"prompt": prompt, "completions": steps, "labels": [True] * len(steps)}
        out = chat.tokenize_steps(row, self.tokenizer, self.separator)
        ids = list(out["prompt_ids"]) + list(out["completion_ids"])
        start = len(out["prompt_ids"])
        return ids, start, [start + t for t, m in enumerate(out["completion_mask"]) if m]

    def step_scores(self, prompts: Sequence, responses: Sequence) -> list[list[float]]:
        """Each response's steps' probabilities of being right (the reply up to each)."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.tokenize_steps(p, r) for p, r in zip(prompts, responses)]
        out: list[list[float]] = [[] for _ in encoded]
        for chunk, logp_bt in self._run([ids for ids, _, _ in encoded]):
            for row, i in enumerate(chunk):
                ids, start, ends = encoded[i]
                cut = max(0, len(ids) - self.max_length)  # _run keeps each sequence's end
                logp_t = logp_bt[row].astype(np.float64)
                if self.reading == "token_product":
                    reply_t = np.arange(len(logp_t)) >= max(start - cut, 0)
                    logp_t = np.cumsum(np.where(reply_t, logp_t, 0.0))
                out[i] = [float(np.exp(logp_t[t - cut])) for t in ends if t >= cut]
        return out

    def score(self, prompts: Sequence, responses: Sequence) -> np.ndarray:
        """Rewards [N] (float64): each response's step scores aggregated (0 without
        steps)."""
        reduce = {"min": min, "prod": math.prod, "last": lambda s: s[-1]}[self.aggregate]
        # float64: a confident step's 1 - p is below float32's resolution near 1, and
        # best-of-n ranks by these.
        return np.asarray([reduce(s) if s else 0.0 for s in self.step_scores(prompts, responses)],
                          np.float64)

    def score_token_ids(self, sequences):
        raise NotImplementedError("a process reward model scores text split into steps: "
                                  "use score(prompts, responses)")

    __call__ = score


def load_reward_model(
    path: str,
    *,
    mesh=None,
    rules=None,
    dtype: str = "float32",
    batch_size: int = 16,
    max_length: int | None = None,
    tokenizer=None,
    aggregate: str | None = None,
) -> RewardModel:
    """A ``RewardModel`` from an exported reward-model dir (weights, config, tokenizer), or a
    ``ProcessRewardModel`` from a process reward model's (``...ForTokenClassification``;
    its steps split at the config's ``step_separator``, default a newline, and aggregated by
    ``aggregate`` or the config's ``step_aggregate``, default min).

    ``mesh`` defaults to one device; ``tokenizer`` (name or object) defaults to the dir's.
    """
    from jaxpt.data import tokenizer_for_model
    from jaxpt.models.classifier import classifier_from_pretrained
    from jaxpt.sharding import make_mesh

    mesh = mesh if mesh is not None else make_mesh({}, devices=jax.devices()[:1])
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = tokenizer_for_model(path, tokenizer)
    model = classifier_from_pretrained(
        path, mesh=mesh, rules=rules, dtype=dtype, pad_token_id=tokenizer.pad_token_id
    )
    if model.kind == "token":
        from jaxpt.models.hf_io import hf_config_of

        config = hf_config_of(model)
        return ProcessRewardModel(
            model, tokenizer, mesh=mesh, batch_size=batch_size, max_length=max_length,
            separator=getattr(config, "step_separator", "\n"),
            reading=getattr(config, "step_reading", "step_end"),
            aggregate=aggregate or getattr(config, "step_aggregate", "min"),
        )
    return RewardModel(model, tokenizer, mesh=mesh, batch_size=batch_size, max_length=max_length)
