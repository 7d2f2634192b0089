"""Metric writers: metrics.jsonl, TensorBoard (tensorboardX), optional W&B, a tqdm bar.

Only process 0 writes; on other processes every writer is a no-op. Each jsonl row carries
``walltime``: when it was written, in seconds since the epoch (TensorBoard's walltime). A
train row is written once its step's metrics are fetched, so consecutive train rows' times
are the wall time of a step, host work included (``jaxpt.bench.step_wall_times``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax

log = logging.getLogger(__name__)

WALLTIME = "walltime"  # the jsonl rows' write time: a timestamp, not a metric


def _scalar(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Fans ``write(step, metrics)`` out to jsonl, TensorBoard and W&B."""

    def __init__(self, output_dir: str, *, tensorboard=True, wandb_cfg=None, config=None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives with the writer
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tb"), flush_secs=10)
        if wandb_cfg is not None and wandb_cfg.project:
            import wandb  # optional dependency, imported only when asked for

            self._wandb = wandb.init(
                project=wandb_cfg.project, name=wandb_cfg.name, entity=wandb_cfg.entity,
                config=config, dir=output_dir, resume="allow",
            )

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (logged by a run that died before its next checkpoint)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        self._file.close()
        with open(self.path) as f:
            rows = [line for line in f if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(rows):
            with open(self.path, "w") as f:
                f.writelines(kept)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives with the writer

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        walltime = time.time()
        row = {"step": int(step)}
        row.update({k: _scalar(v) if not isinstance(v, str) else v for k, v in metrics.items()})
        numeric = {k: v for k, v in row.items() if isinstance(v, float) and k != "step"}
        row[WALLTIME] = walltime
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step, walltime=walltime)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """A tqdm bar over steps showing loss, lr and tokens/s (tqdm adds the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._bar = None
        self._tokens, self._time = 0, time.perf_counter()
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0,
            )

    def add_tokens(self, tokens: int) -> None:
        self._tokens += tokens

    def tokens_per_second(self) -> float | None:
        """Tokens per second since the last call (resets the window); None if none seen."""
        now = time.perf_counter()
        rate = self._tokens / max(now - self._time, 1e-9) if self._tokens else None
        self._tokens, self._time = 0, now
        return rate

    def update(self, steps: int = 1, **postfix) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                refresh=False,
            )
        self._bar.update(steps)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        elif jax.process_index() == 0:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
