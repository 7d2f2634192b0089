"""A rollout on the host, and the train-batch layout the RL losses read.

A ``Rollout`` holds one row per completion (prompt-major); ``train_batch`` lays each row out
as prompt + completion with next-token targets, so position ``t`` predicts
``input_ids[t + 1]`` and the completion's targets sit in ``completion_window``.
``minibatch_rows`` cuts a rollout into the seeded minibatches of PPO's epochs.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class Rollout:
    """One rollout on the host, one row per completion (prompt-major, ``samples_per_prompt``
    consecutive rows per prompt)."""

    prompt_ids: np.ndarray  # [B, Lp] left-padded prompt ids
    prompt_mask: np.ndarray  # [B, Lp] 1 on real prompt tokens
    tokens: np.ndarray  # [B, Lc] sampled ids (padding after each completion's length)
    lengths: np.ndarray  # [B] completion lengths (eos included)
    # [B, Lc] the tokens' log-probs under the trained policy, log_softmax(logits / T) with
    # no sampling filters or penalty (SampleArrays.policy_logprobs_bn): a ratio's old side
    logprobs: np.ndarray
    truncated: np.ndarray  # [B] no eos within the budget
    texts: list[str]  # decoded completions
    rows: list[dict]  # the dataset row of each completion
    rewards: Any  # jaxpt.rewards.runner.RewardBatch: total [B], per-function scores
    num_prompts: int
    # [B, Lp + Lc, L, k] int32 with rl.routing_replay: the experts each MoE layer routed
    # each prompt and completion token to while sampling (-1: none recorded)
    routing: np.ndarray | None = None
    # [B, Lc] multi-turn episodes: 1 on the policy's tokens, 0 on the environment's (tool
    # results, user turns), which get no loss; None: every completion token is the policy's
    policy_mask: np.ndarray | None = None
    transcripts: list | None = None  # each episode's turns, for completions.jsonl

    _ROW_ARRAYS = ("prompt_ids", "prompt_mask", "tokens", "lengths", "logprobs", "truncated")

    def take_groups(self, groups: Sequence[int]) -> Rollout:
        """The rows of prompts ``groups`` (indices into this rollout's prompts), in order."""
        g = len(self.lengths) // self.num_prompts
        rows = np.concatenate([np.arange(p * g, (p + 1) * g) for p in groups])
        return Rollout(
            **{name: getattr(self, name)[rows] for name in self._ROW_ARRAYS},
            texts=[self.texts[r] for r in rows], rows=[self.rows[r] for r in rows],
            rewards=self.rewards.take(rows), num_prompts=len(groups),
            routing=None if self.routing is None else self.routing[rows],
            policy_mask=None if self.policy_mask is None else self.policy_mask[rows],
            transcripts=None if self.transcripts is None else [self.transcripts[r] for r in rows],
        )

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """One rollout holding the prompts of ``parts`` in order."""
        return Rollout(
            **{name: np.concatenate([getattr(p, name) for p in parts])
               for name in Rollout._ROW_ARRAYS},
            texts=[t for p in parts for t in p.texts], rows=[r for p in parts for r in p.rows],
            rewards=type(parts[0].rewards).concat([p.rewards for p in parts]),
            num_prompts=sum(p.num_prompts for p in parts),
            routing=(None if parts[0].routing is None
                     else np.concatenate([p.routing for p in parts])),
            policy_mask=(None if parts[0].policy_mask is None
                         else np.concatenate([p.policy_mask for p in parts])),
            transcripts=(None if parts[0].transcripts is None
                         else [t for p in parts for t in p.transcripts]),
        )


def train_batch(rollout: Rollout, advantages_b: np.ndarray, keep_b: np.ndarray) -> dict:
    """Prompt + completion rows with next-token targets aligned to the loss.

    Position ``t`` predicts ``input_ids[t + 1]``; ``completion_mask[t]`` is 1 when that
    target is a generated token of a kept row (the policy's own, in an episode), and ``old_logprobs[t]`` is its log-prob
    under the policy that sampled it (``Rollout.logprobs``). A rollout with ``routing``
    also gives ``routing`` [B, T, L, k], aligned with ``input_ids``.
    """
    prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask
    lp, lc = prompt_ids.shape[1], rollout.tokens.shape[1]
    completion_valid = np.arange(lc)[None, :] < rollout.lengths[:, None]
    input_ids = np.concatenate([prompt_ids, rollout.tokens.astype(np.int32)], axis=1)
    segment_ids = np.concatenate([prompt_mask, completion_valid.astype(np.int32)], axis=1)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    target_ids = np.zeros_like(input_ids)
    target_ids[:, :-1] = input_ids[:, 1:]
    completion_mask = np.zeros(input_ids.shape, np.float32)
    policy_bn = completion_valid if rollout.policy_mask is None else (
        completion_valid & (rollout.policy_mask > 0))
    completion_mask[:, lp - 1 : lp - 1 + lc] = policy_bn * keep_b[:, None]
    old_logprobs = np.zeros(input_ids.shape, np.float32)
    old_logprobs[:, lp - 1 : lp - 1 + lc] = np.where(completion_valid, rollout.logprobs, 0.0)
    batch = {
        "input_ids": input_ids,
        "positions": positions,
        "segment_ids": segment_ids,
        "target_ids": target_ids,
        "completion_mask": completion_mask,
        "old_logprobs": old_logprobs,
        "advantages": advantages_b.astype(np.float32),
    }
    if rollout.routing is not None:
        batch["routing"] = rollout.routing.astype(np.int32)
    return batch


def sequence_rows(rollout: Rollout) -> dict:
    """Every row of ``train_batch`` without the policy-gradient fields (``old_logprobs``,
    ``advantages``): for losses over whole completions (distillation, online DPO)."""
    rows = len(rollout.lengths)
    batch = train_batch(rollout, np.zeros(rows, np.float32), np.ones(rows, bool))
    del batch["old_logprobs"], batch["advantages"]
    return batch


def completion_window(row_length: int, max_completion_length: int) -> slice:
    """The positions of a ``train_batch`` row whose targets are completion tokens: the
    completion buffer is the last ``max_completion_length`` ids, each predicted by the
    position before it."""
    return slice(row_length - max_completion_length - 1, row_length - 1)


def shares_prompts(batch: dict, max_completion_length: int, group: int) -> bool:
    """Whether each run of ``group`` rows of a host batch holds one prompt (ids and mask)."""
    if group <= 1 or len(batch["input_ids"]) % group:
        return False
    lp = batch["input_ids"].shape[1] - max_completion_length
    for key in ("input_ids", "segment_ids"):
        prompts = np.asarray(batch[key])[:, :lp].reshape(-1, group, lp)
        if not (prompts == prompts[:, :1]).all():
            return False
    return True


def minibatch_rows(
    num_rows: int, group: int, minibatches: int, iteration: int, *, seed
) -> np.ndarray:
    """Row indices of minibatch ``iteration % minibatches`` of epoch ``iteration //
    minibatches`` over a rollout of ``num_rows`` rows in groups of ``group``: each epoch is
    a fresh seeded shuffle of the groups (a group's rows stay together and in order), cut
    into ``minibatches`` equal parts, so an epoch visits every row exactly once."""
    epoch, part = divmod(iteration, minibatches)
    groups = num_rows // group
    order = np.random.default_rng((*np.atleast_1d(seed).tolist(), epoch)).permutation(groups)
    per_part = groups // minibatches
    picked = order[part * per_part : (part + 1) * per_part]
    return (picked[:, None] * group + np.arange(group)[None, :]).reshape(-1)


def encode_arrays(arrays: dict) -> str:
    """Host arrays as one text field of a checkpoint's JSON state (compressed npz)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode()


def decode_arrays(text: str) -> dict:
    """``encode_arrays``' arrays back."""
    with np.load(io.BytesIO(base64.b64decode(text))) as data:
        return {k: data[k] for k in data.files}
