"""Score (prompt, response) pairs with a trained reward model (for PPO and evaluation).

``load_reward_model(dir)`` reads a ``...ForSequenceClassification`` checkpoint (what the
``rm`` task exports) and its tokenizer. Pairs are tokenized exactly as the ``rm`` task's
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
        from jaxpt.sharding import batch_sharding, replicated

        self.tokenizer = tokenizer
        self.mesh = mesh
        data_ways = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
        self.batch_size = -(-batch_size // data_ways) * data_ways  # divides over the batch axes
        self.max_length = max_length or model.config.max_position_embeddings
        self.pad_token_id = model.pad_token_id if model.pad_token_id is not None else 0
        graphdef, self.params, rest = nnx.split(model, nnx.Param, ...)

        def forward(params, ids_bt, segment_bt):
            scores_bl = nnx.merge(graphdef, params, rest)(ids_bt, segment_ids=segment_bt)
            return scores_bl[:, 0]

        rows = batch_sharding(mesh, 2)
        self._forward = jax.jit(
            forward,
            in_shardings=(state_shardings(self.params, mesh), rows, rows),
            out_shardings=replicated(mesh),
        )

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
        sequences = [list(s)[-self.max_length :] for s in sequences]
        scores = np.zeros(len(sequences), np.float32)
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
            out_b = self._forward(self.params, ids_bt, segment_bt)
            scores[chunk] = np.asarray(out_b.addressable_data(0))[: len(chunk)]
        return scores

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
) -> RewardModel:
    """A ``RewardModel`` from an exported reward-model dir (weights, config, tokenizer).

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
    return RewardModel(model, tokenizer, mesh=mesh, batch_size=batch_size, max_length=max_length)
