"""Rejection sampling: sample n responses per prompt, score them, keep the best (and worst).

Prompts are read as GRPO reads them (``data.*``: a prompt file, a hub dataset or the shipped
``arithmetic`` task), in order, ``prompts_per_chunk`` at a time. Each chunk is one call of
the jitted sampler on the global mesh (``num_samples`` completions per prompt from one
prefill, the batch split over the mesh's batch axes), then scored by reward functions (the
``grpo.rewards`` spec format) and/or a reward model. ``mode: sft`` writes the best response
of each prompt whose score reaches ``min_score``; ``mode: preference`` writes the best as
chosen and the worst as rejected when best - worst reaches ``min_margin`` (and best > worst).

Files in ``output_dir`` (process 0 writes them):
  rows.jsonl     the curated rows: SFT ``{"messages": prompt + assistant}`` (plain
                 ``prompt``/``completion`` text for a tokenizer without a chat template) or
                 preference ``{"prompt", "chosen", "rejected"}``, plus the prompt row's
                 other columns (``messages`` aside: it is replaced)
  samples.jsonl  per prompt: every completion, its scores, which were picked (``log_samples``)
  state.json     after each chunk: prompts done, file sizes, running sums, the config

A chunk's sampling key is ``fold_in(key(seed), chunk index)``, so a rerun resumes after the
last complete chunk (cutting any partial append) and writes exactly the bytes an
uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxpt.config import ConfigError, DataSection, MeshSection, ModelSection
from jaxpt.tasks.rl.rewards import RewardSpec, reward_specs, score_completions

log = logging.getLogger(__name__)

MODES = ("sft", "preference")
ROWS_FILE, SAMPLES_FILE, STATE_FILE = "rows.jsonl", "samples.jsonl", "state.json"


@dataclasses.dataclass(frozen=True)
class RejectionSection:
    mode: str = "sft"  # sft: best response per prompt | preference: best vs worst
    num_samples: int = 8  # responses sampled per prompt
    prompts_per_chunk: int = 64  # prompts per sampler call; also the resume granularity
    max_prompts: int | None = None  # the first N prompts (None: all)
    max_prompt_length: int = 128  # longer prompts keep their end
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    rewards: list[RewardSpec] = dataclasses.field(
        default_factory=lambda: [RewardSpec(name="math")]
    )
    reward_model: str | None = None  # an rm export; its score is added to the total
    reward_model_weight: float = 1.0
    reward_model_batch_size: int = 32
    min_score: float | None = None  # sft: write a prompt's best only at this score or more
    min_margin: float = 0.0  # preference: write a pair only when best - worst >= this
    log_samples: bool = True  # samples.jsonl (every completion and its scores)

    def __post_init__(self):
        def fail(key, why):
            raise ConfigError(f"config key 'rejection.{key}' {why}")

        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}, got {self.mode!r}")
        for key in ("num_samples", "prompts_per_chunk", "max_prompt_length",
                    "max_completion_length", "reward_model_batch_size"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        if self.mode == "preference" and self.num_samples < 2:
            fail("num_samples", "must be >= 2 for preference pairs")
        if self.max_prompts is not None and self.max_prompts < 1:
            fail("max_prompts", f"must be >= 1 or null, got {self.max_prompts}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            fail("temperature", "must be >= 0 and 'rejection.top_p' in (0, 1]")
        if not self.rewards and self.reward_model is None:
            fail("rewards", "is empty and there is no 'rejection.reward_model' to score with")


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    output_dir: str = MISSING
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    rejection: RejectionSection = dataclasses.field(default_factory=RejectionSection)


def load_rejection_config(path: str | None = None, overrides: list[str] | None = None):
    """The typed config from a YAML file and ``a.b=c`` overrides; ConfigError names a key."""
    from jaxpt.config import explain_config_error
    from jaxpt.rewards import build_reward_fns

    schema = OmegaConf.structured(RejectionConfig)
    try:
        layers = [schema]
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"config file {path} does not exist")
            layers.append(OmegaConf.load(path))
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        config = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as error:
        raise explain_config_error(error, schema) from None
    try:
        build_reward_fns(reward_specs(config.rejection))
    except (ValueError, TypeError, ImportError, AttributeError) as error:
        raise ConfigError(f"config key 'rejection.rewards': {error}") from None
    return config


# --------------------------------------------------------------------------- selection


def pick(total_pn: np.ndarray, cfg: RejectionSection):
    """Per prompt: the best and worst sample (the first on ties) and whether a row is
    written, from the total scores [P, n]."""
    best_p, worst_p = total_pn.argmax(axis=1), total_pn.argmin(axis=1)
    best_score_p, worst_score_p = total_pn.max(axis=1), total_pn.min(axis=1)
    if cfg.mode == "sft":
        keep_p = np.ones(len(total_pn), bool)
        if cfg.min_score is not None:
            keep_p = best_score_p >= cfg.min_score
    else:
        gap_p = best_score_p - worst_score_p
        keep_p = (gap_p > 0) & (gap_p >= cfg.min_margin)
    return best_p, worst_p, keep_p


def output_row(row: dict, best: str, worst: str, mode: str, chat: bool) -> dict | None:
    """The curated row of a prompt row (see the module docstring); None when the pair's two
    texts are equal (nothing to prefer)."""
    extras = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    prompt = row["prompt"]
    if chat or isinstance(prompt, list):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        reply = lambda text: [{"role": "assistant", "content": text}]
        if mode == "sft":
            return {**extras, "messages": messages + reply(best)}
        return {**extras, "prompt": messages, "chosen": reply(best), "rejected": reply(worst)}
    if mode == "sft":
        return {**extras, "prompt": prompt, "completion": best}
    return {**extras, "prompt": prompt, "chosen": best, "rejected": worst}


# ------------------------------------------------------------------------------ the run


class _Outputs:
    """rows.jsonl, samples.jsonl and state.json of ``output_dir`` (process 0 only)."""

    def __init__(self, output_dir: str, config_dict: dict, writes: bool):
        self.dir, self.config, self.writes = output_dir, config_dict, writes
        self.paths = {name: os.path.join(output_dir, name) for name in (ROWS_FILE, SAMPLES_FILE)}
        self.state = {"prompts_done": 0, "chunks_done": 0, "rows_written": 0, "samples": 0,
                      "sum_best_score": 0.0, "sum_score": 0.0,
                      "bytes": {name: 0 for name in self.paths}}

    def open(self) -> int:
        """Read (or start) the state, cut the files to its sizes; the prompts done."""
        state_path = os.path.join(self.dir, STATE_FILE)
        if not self.writes:
            return 0
        if os.path.exists(state_path):
            with open(state_path) as f:
                saved = json.load(f)
            if saved.get("config") != self.config:
                raise ConfigError(
                    f"{self.dir} holds a rejection-sampling run with another config; use a "
                    "new output_dir (or delete it) to start over"
                )
            self.state = {k: saved[k] for k in self.state}
        else:
            existing = [p for p in self.paths.values() if os.path.exists(p)]
            if existing:
                raise ConfigError(f"{existing[0]} exists without {STATE_FILE}; use a new "
                                  "output_dir or delete it")
            os.makedirs(self.dir, exist_ok=True)
            self._save_state()
        for name, path in self.paths.items():
            with open(path, "ab") as f:  # a crash may have appended part of a chunk
                f.truncate(self.state["bytes"][name])
        return self.state["prompts_done"]

    def append(self, rows: list[dict], samples: list[dict], stats: dict) -> None:
        if not self.writes:
            return
        for name, items in ((ROWS_FILE, rows), (SAMPLES_FILE, samples)):
            with open(self.paths[name], "ab") as f:
                f.writelines((json.dumps(x, ensure_ascii=False) + "\n").encode() for x in items)
                f.flush()
                os.fsync(f.fileno())
                self.state["bytes"][name] = f.tell()
        for key, value in stats.items():
            self.state[key] += value
        self.state["chunks_done"] += 1
        self._save_state()

    def _save_state(self) -> None:
        path = os.path.join(self.dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({**self.state, "config": self.config}, f, indent=1)
        os.replace(path + ".tmp", path)


def _broadcast(value: int) -> int:
    """Process 0's ``value`` on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def rejection_sampler(config: RejectionConfig, tokenizer, mesh):
    """The ``PromptSampler`` of a run: ``num_samples`` completions per prompt, every chunk
    padded to ``prompts_per_chunk`` prompts (one compiled program), on ``mesh``."""
    from jaxpt.sampling import PromptSampler

    cfg = config.rejection
    return PromptSampler(
        tokenizer, model_path=config.model.path, max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        num_samples=cfg.num_samples, max_prompt_length=cfg.max_prompt_length,
        batch_size=cfg.prompts_per_chunk, mesh=mesh,
    )


def chunk_scores(runner, scorer, cfg: RejectionSection, chunk_rows, texts, tokenizer):
    """Scores by name (each [P * n], NaN = abstain) and the total [P, n]: the reward
    functions' weighted total plus ``reward_model_weight`` times the reward model's score
    of each pair, its prompt as the policy read it."""
    from jaxpt.sampling import prompt_as_seen

    n = cfg.num_samples
    rewards = score_completions(runner, chunk_rows, texts, n)
    scores, total = dict(rewards.scores), rewards.total.astype(np.float32)
    if scorer is not None:
        prompts = [prompt_as_seen(tokenizer, r["prompt"]) for r in chunk_rows for _ in range(n)]
        scores["reward_model"] = scorer.score(prompts, texts)
        total = total + np.float32(cfg.reward_model_weight) * scores["reward_model"]
    return scores, total.reshape(len(chunk_rows), n)


def chunk_records(cfg: RejectionSection, begin: int, chunk_rows, texts, scores, total_pn,
                  chat: bool) -> tuple[list[dict], list[dict]]:
    """The curated rows of a chunk and its ``samples.jsonl`` records."""
    n = cfg.num_samples
    best_p, worst_p, keep_p = pick(total_pn, cfg)
    written, samples = [], []
    for p, row in enumerate(chunk_rows):
        group = texts[p * n : (p + 1) * n]
        best, worst = group[best_p[p]], group[worst_p[p]]
        made = None
        if keep_p[p] and not (cfg.mode == "preference" and best == worst):
            made = output_row(row, best, worst, cfg.mode, chat)
            written.append(made)
        if cfg.log_samples:
            samples.append({
                "index": begin + p, "prompt": row["prompt"], "completions": group,
                "scores": {k: [_finite(v) for v in s[p * n : (p + 1) * n]]
                           for k, s in scores.items()},
                "total": [float(v) for v in total_pn[p]],
                "best": int(best_p[p]), "worst": int(worst_p[p]), "written": made is not None,
            })
    return written, samples


def run_rejection_sampling(config: RejectionConfig, *, mesh=None,
                           max_chunks: int | None = None) -> dict:
    """Sample, score and write the curated rows of ``config`` (see the module docstring),
    resuming an earlier run in ``config.output_dir``. ``max_chunks`` stops after that many
    chunks in this call (as if preempted). Returns the summary the CLI prints.

    The next chunk is dispatched to the devices before the current one is decoded and
    scored on the host, so sampling and reward scoring overlap.
    """
    from flax import nnx

    from jaxpt.rewards import RewardRunner, build_reward_fns
    from jaxpt.sharding import make_mesh, merged_rules, use_rules
    from jaxpt.tasks import common
    from jaxpt.tasks.base import RunContext

    cfg, m = config.rejection, config.mesh
    if mesh is None:
        mesh = make_mesh(m.axis_sizes())
    ctx = RunContext(config, mesh, merged_rules(m.rules), os.path.abspath(config.output_dir))
    config_dict = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(config))))
    config_dict.pop("mesh")  # samples do not depend on the mesh: resume on another one
    outputs = _Outputs(ctx.output_dir, config_dict, writes=ctx.is_main_process)
    start = _broadcast(outputs.open())

    with jax.set_mesh(mesh), use_rules(ctx.rules):
        train, _ = common.data_sources(ctx, "prompt")
        rows = common.load_rows(ctx, train, "prompt", config.data.train_split)
        rows = rows[: cfg.max_prompts] if cfg.max_prompts is not None else rows
        tokenizer = common.resolve_tokenizer(ctx)
        sampler = rejection_sampler(config, tokenizer, mesh)
        policy = nnx.split(common.build_causal_lm(ctx))
        runner = RewardRunner(build_reward_fns(reward_specs(cfg)))
        scorer = None
        if cfg.reward_model is not None:
            from jaxpt.rewards.reward_model import load_reward_model

            common.check_model_path("rejection.reward_model", cfg.reward_model)
            scorer = load_reward_model(cfg.reward_model, mesh=mesh, rules=ctx.rules,
                                       batch_size=cfg.reward_model_batch_size)
        chat = bool(getattr(tokenizer, "chat_template", None))
        size = cfg.prompts_per_chunk
        begins = list(range(start, len(rows), size))[:max_chunks]
        key = jax.random.key(config.seed)

        def launch(i: int):
            chunk_rows = rows[begins[i] : begins[i] + size]
            prompts = [sampler.encode(r["prompt"]) for r in chunk_rows]
            return sampler.launch(policy, prompts, jax.random.fold_in(key, begins[i] // size))

        pending = launch(0) if begins else None
        for i, begin in enumerate(begins):
            # Dispatch the next chunk first: the devices sample while the host scores.
            current, pending = pending, launch(i + 1) if i + 1 < len(begins) else None
            chunk_rows = rows[begin : begin + size]
            texts = sampler.collect(current).texts
            scores, total_pn = chunk_scores(runner, scorer, cfg, chunk_rows, texts, tokenizer)
            written, samples = chunk_records(cfg, begin, chunk_rows, texts, scores, total_pn,
                                             chat)
            outputs.append(written, samples, {
                "prompts_done": len(chunk_rows), "rows_written": len(written),
                "samples": total_pn.size, "sum_best_score": float(total_pn.max(axis=1).sum()),
                "sum_score": float(total_pn.sum()),
            })
            log.info("prompts %d-%d of %d: %d rows written, mean best score %.4g",
                     begin, begin + len(chunk_rows), len(rows), len(written),
                     float(total_pn.max(axis=1).mean()))
    return _summary(outputs.state, len(rows), ctx.summary)


def _finite(value) -> float | None:
    return None if np.isnan(value) else float(value)


def _summary(state: dict, num_prompts: int, data_summary: dict) -> dict:
    prompts, samples = state["prompts_done"], state["samples"]
    summary = {
        "prompts": prompts, "samples": samples, "rows_written": state["rows_written"],
        "mean_best_score": state["sum_best_score"] / prompts if prompts else None,
        "mean_score": state["sum_score"] / samples if samples else None,
        "chunks_done": state["chunks_done"], "complete": prompts >= num_prompts,
    }
    skipped = data_summary.get("data", {}).get("train_skipped_invalid")
    if skipped:
        summary["prompts_skipped_invalid"] = skipped
    return summary
