"""Typed run configuration: dataclass schema + YAML file + ``a.b=c`` overrides (OmegaConf).

One frozen dataclass per section. The root schema is assembled when a config loads, from
the shared sections plus one section per task registered at that moment (``sft``, ``rm``,
``dpo``, ... and any a user's module added with ``jaxpt.tasks.register_task``), so a task
adds its options by declaring its own dataclass. Unknown keys, wrong types and missing
required values are ``ConfigError``s naming the key and the closest valid one.

The root key ``imports`` (a list of module names) is read first and its modules imported
before the rest is validated: that is how a run brings in its own tasks and model families
(``imports: [mypkg.tasks]`` makes ``task: my_task`` and a ``my_task:`` section valid). The
key is saved with the resolved config, so a resumed run imports the same modules.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import os
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

field = dataclasses.field


class ConfigError(ValueError):
    """A config problem; the message names the offending key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = "jaxpt-tiny"  # preset name (random init), HF checkpoint dir or hub name
    tokenizer: str | None = None  # None: the model dir's, else the shipped one
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights (and optimizer state) dtype
    remat: str = "none"  # none | full | dots_saveable | dots | dots_no_batch | offload
    scan_layers: bool | None = None  # one lax.scan over layers (null: from 8 layers on)
    # auto: cuDNN on GPU, splash on TPU where shapes allow (else XLA), einsum on CPU
    attention_impl: str = "auto"  # auto | einsum | xla | cudnn | splash
    # Mixture-of-experts models: weights of the router losses added to the task's loss.
    moe_aux_loss_weight: float | None = None  # load balancing; null: router_aux_loss_coef
    moe_z_loss_weight: float = 0.0  # router z-loss


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1
    expert: int = 1  # MoE expert parallelism: experts (and tokens) split over this axis
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)  # LOGICAL_RULES overrides
    dcn_data: int | None = None  # multi-slice TPU: slices the data axis spans (None: all)

    def axis_sizes(self) -> dict[str, int]:
        """The mesh axes' sizes, as ``jaxpt.sharding.make_mesh`` takes them."""
        return {"data": self.data, "fsdp": self.fsdp, "expert": self.expert,
                "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class ArithmeticSection:
    """The shipped arithmetic task, generated into ``<output_dir>/data`` (no download)."""

    num_train: int = 20000  # -1: every train problem (operand-range tasks)
    num_test: int = 256  # -1: every held-out problem (operand-range tasks)
    min_digits: int = 1
    max_digits: int = 3
    min_operand: int = 0  # with max_operand: operands uniform in [min_operand, max_operand]
    max_operand: int | None = None
    negative_answers: bool = False  # keep a - b with a < b
    question: str = "What is {a}{op}{b}?"
    system: str | None = None  # a system turn before the question ("" = an empty one)
    style: str = "worked"  # worked (column by column, "#### x") | answer (the number alone)
    test_fraction: float = 0.1  # share of problems (by hash) that are held out
    dropped_carry_rate: float = 0.0  # train solutions that forget a carry (a sloppy teacher)
    near_duplicate_rate: float = 0.0  # train rows that get a reworded copy (noise to curate)
    ops: list[str] = dataclasses.field(default_factory=lambda: ["+", "-"])  # of + - *
    tool_skip_rate: float = 0.0  # style tool: train traces that skip the calculator and guess
    step_error_rate: float = 0.5  # step-labelled solutions (task: prm) with a mistake
    step_mistakes: list[str] = dataclasses.field(  # their kinds: drop_carry | slip
        default_factory=lambda: ["drop_carry"])
    seed: int = 0

    def __post_init__(self):
        from jaxpt.data.arithmetic import STEP_MISTAKES

        try:
            self.task()
        except ValueError as error:
            raise ConfigError(f"config section 'data.arithmetic': {error}") from None
        if not 0 <= self.step_error_rate <= 1:
            raise ConfigError("config key 'data.arithmetic.step_error_rate' must be in [0, 1], "
                              f"got {self.step_error_rate}")
        if not self.step_mistakes or not set(self.step_mistakes) <= set(STEP_MISTAKES):
            raise ConfigError(f"config key 'data.arithmetic.step_mistakes' must be a non-empty "
                              f"subset of {list(STEP_MISTAKES)}, got {list(self.step_mistakes)}")

    def task(self):
        """The ``jaxpt.data.ArithmeticTask`` these keys describe."""
        from jaxpt.data.arithmetic import ArithmeticTask

        fields = {f.name for f in dataclasses.fields(ArithmeticTask)}
        return ArithmeticTask(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class ReasoningGymSection:
    """A reasoning-gym task (``data.train`` / ``data.eval: reasoning_gym``): procedural
    problems generated in memory as RL prompt rows, scored by the task's own checker (reward
    ``reasoning_gym``). Needs the reasoning-gym package (the ``examples`` extra)."""

    task: str | None = None  # a reasoning-gym task: chain_sum, basic_arithmetic, ...
    size: int = 1000  # training problems
    # Problem i of seed s is drawn from s + i, so the eval rows' range must not meet the
    # training one: [seed, seed + size) and [eval_seed, eval_seed + eval_size).
    seed: int = 0
    eval_size: int = 100  # held-out problems (data.eval: reasoning_gym)
    eval_seed: int | None = None  # null: jaxpt.data.reasoning_gym.HELD_OUT_SEED (as jaxpt.eval)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the task's own
    # Appended to each question; null: ask for the answer in <answer> tags, "": nothing.
    instruction: str | None = None
    system: str | None = None  # a system turn before the question

    def __post_init__(self):
        from jaxpt.data.reasoning_gym import HELD_OUT_SEED, seed_ranges_overlap

        for key in ("size", "eval_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'data.reasoning_gym.{key}' must be >= 1, got "
                                  f"{getattr(self, key)}")
        eval_seed = HELD_OUT_SEED if self.eval_seed is None else self.eval_seed
        if min(self.seed, eval_seed) < 0:
            raise ConfigError("config keys 'data.reasoning_gym.seed' and 'eval_seed' must be >= 0")
        if seed_ranges_overlap(self.seed, self.size, eval_seed, self.eval_size):
            raise ConfigError(
                f"config key 'data.reasoning_gym.eval_seed' ({eval_seed}): its {self.eval_size} "
                f"problems overlap the {self.size} training problems of seed {self.seed} (problem "
                "i of seed s is drawn from s + i); leave it null or move it past seed + size"
            )


@dataclasses.dataclass(frozen=True)
class DataSection:
    # .jsonl/.json/.parquet file, dataset dir, hub name, "arithmetic" or "reasoning_gym"
    train: str = MISSING
    train_split: str = "train"
    eval: str | None = None  # same kinds as `train`; None: eval_fraction of train, or none
    eval_split: str = "test"
    eval_fraction: float = 0.0  # held out from `train` when `eval` is unset
    seq_len: int = 512
    max_length: int | None = None  # per example; default seq_len
    packing: bool = True
    completion_only: bool = True
    truncation: str = "truncate"  # truncate | drop
    skip_invalid: bool = False
    num_workers: int = 0
    shuffle: bool = True
    arithmetic: ArithmeticSection = dataclasses.field(default_factory=ArithmeticSection)
    reasoning_gym: ReasoningGymSection = dataclasses.field(default_factory=ReasoningGymSection)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    max_steps: int = MISSING
    batch_size: int = 8  # global, in sequences
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: only at the start and the end
    eval_batches: int = 8
    eval_at_start: bool = True
    # A step whose loss or gradient is NaN/inf is skipped (params and optimizer state kept);
    # after this many in a row the run stops with an error, keeping the last finite
    # checkpoint and exporting nothing. 0: never stop (keep skipping).
    max_nonfinite_steps: int = 10
    # LM-head positions per chunk when a loss turns hidden states into token log-probs:
    # peak logits memory [batch, chunk, vocab] instead of [batch, seq, vocab]; 0: all at once.
    logits_chunk_size: int = 0
    # Generation evals (entries as in an eval config's `tasks`, see jaxpt.evals.tasks),
    # logged as eval/<task>/<metric>; run every eval_tasks_every steps (0: train.eval_every).
    eval_tasks: list[Any] = dataclasses.field(default_factory=list)
    eval_tasks_every: int = 0


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500  # 0: only at the end (and on preemption)
    keep: int = 2
    async_save: bool = True  # `async` is a Python keyword
    resume: bool = True  # resume from the latest checkpoint in `directory`
    # Where checkpoints live; default <output_dir>/checkpoints. May be a gs:// URL, which
    # every host of a multi-host run reads and writes (the other outputs stay local).
    directory: str | None = None


@dataclasses.dataclass(frozen=True)
class WandbSection:
    project: str | None = None  # wandb is used only when set
    name: str | None = None
    entity: str | None = None


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = True
    progress: bool = True
    wandb: WandbSection = dataclasses.field(default_factory=WandbSection)


@dataclasses.dataclass(frozen=True)
class ExportSection:
    hf: bool = True  # write <output_dir>/hf at the end
    dtype: str | None = None  # None: keep param_dtype


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """Multi-process runs (``jax.distributed``); unset keys come from the environment
    (``JAXPT_COORDINATOR_ADDRESS``, ``JAXPT_NUM_PROCESSES``, ``JAXPT_PROCESS_ID``) or from
    JAX's own detection (Cloud TPU, SLURM, Open MPI). See ``jaxpt.distributed``."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None  # default: every local device
    initialization_timeout: int = 300  # seconds to wait for every process to join


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """Low-rank adapters on the projections; the base weights stay frozen (every task)."""

    rank: int = 0  # 0: off (train every weight)
    alpha: float | None = None  # scale = alpha / rank; None: alpha = rank (or the adapter's)
    dropout: float = 0.0  # on the adapters' input, train steps only
    # Regex searched in projection paths (model.layers.3.self_attn.q_proj) or a list of
    # module names like PEFT's target_modules ([q_proj, v_proj]); None: every attention and
    # MLP projection (or, with init_adapter, the adapter's).
    targets: Any = None
    init_adapter: str | None = None  # a PEFT LoRA adapter dir to continue training from
    export: str = "merged"  # merged (an HF dir) | peft (an adapter dir) | both
    seed: int | None = None  # adapter init; None: the run's seed


@dataclasses.dataclass(frozen=True)
class RlSection:
    """What every RL task (grpo, ppo) shares about its rollouts."""

    # The sampler's log-probs and the trainer's recomputed ones differ (another kernel, dtype
    # or batch shape); tis: each token's loss times min(w, cap), mis: times w, or 0 where
    # w > cap, with w = pi_trainer / pi_sampler; none: the sampler's log-probs are the old policy
    importance_correction: str = "none"
    importance_cap: float = 2.0
    # MoE policies (grpo, ppo): the sampler records each token's experts per layer and the
    # policy's training forwards route the rollout's tokens to them (reference: its own)
    routing_replay: bool = False
    # Asynchronous RL (jaxpt.tasks.rl.placement, jaxpt.tasks.rl.pipeline). The sampler runs
    # max_staleness policy versions ahead of the update it feeds: rollout i is sampled with
    # the weights after rollout i - k trained (0: synchronous, as without the key).
    max_staleness: int = 0
    # Split placement: the rollout engine and the train step on their own devices, each
    # with its own mesh (None for both: colocated on every device). A count takes the
    # first (train) or last (rollout) devices, a list names global device ids; one of the
    # two may be left out to take the rest.
    train_devices: Any = None
    rollout_devices: Any = None
    # The rollout mesh's axis sizes ({tensor: 2}); unnamed axes 1, data takes the rest.
    rollout_mesh: dict[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class EnvsSection:
    """Multi-turn episodes (grpo, ppo): each rollout row is an episode of an environment
    (``jaxpt.envs``) instead of one completion."""

    # tools (jaxpt.envs.ToolEnv: the row's prompt, the tools below, done when a turn calls
    # none) | openenv | reasoning_gym | an import path pkg.mod:MyEnv; None: single-turn
    # (unless tools are given, which mean spec tools)
    spec: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # the env's arguments
    # Tools the policy may call: built-in names (calculator, python) or pkg.mod:function
    tools: list[str] = dataclasses.field(default_factory=list)
    max_turns: int = 8  # assistant turns per episode
    max_turn_tokens: int | None = None  # per turn; None: what the episode's budget leaves
    max_parallel: int = 8  # environment steps (tool calls) running at once
    tool_timeout_s: float = 10.0  # wall time per tool call (the python tool's sandbox limit)
    max_tool_output_chars: int = 2000  # a result past this is cut (head and tail kept)
    max_tool_calls_per_turn: int = 8  # calls past this get an error result, unrun
    parser: str = "auto"  # tool-call format: auto (from the chat template) | hermes | ...
    # the evaluator also scores episodes whose tools are withheld (eval_accuracy_no_tools)
    eval_without_tools: bool = False

    def enabled(self) -> bool:
        return self.spec is not None or bool(self.tools)


BASE_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "mesh": MeshSection,
    "data": DataSection,
    "train": TrainSection,
    "optim": OptimSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "export": ExportSection,
    "lora": LoraSection,
    "distributed": DistributedSection,
    "rl": RlSection,
    "envs": EnvsSection,
}

CHOICES = {
    "model.remat": ("none", "full", "dots_saveable", "dots", "dots_no_batch", "offload"),
    "data.truncation": ("truncate", "drop"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "lora.export": ("merged", "peft", "both"),
    "model.attention_impl": ("auto", "einsum", "xla", "cudnn", "splash"),
    "rl.importance_correction": ("none", "tis", "mis"),
}


ROOT_KEYS = ("task", "output_dir", "seed", "imports")


@functools.cache
def _make_schema(task_sections: tuple[tuple[str, type], ...]) -> type:
    # Keyed on the registry's content: a task registered later gets a new schema.
    return make_schema(dict(task_sections))


def make_schema(task_sections: dict[str, type]) -> type:
    """The root config dataclass: shared keys, shared sections, one section per task."""
    fields = [
        ("task", str, field(default="sft")),
        ("output_dir", str, field(default=MISSING)),
        ("seed", int, field(default=0)),
        # Modules imported before the config is validated (their tasks, model families).
        ("imports", list[str], field(default_factory=list)),
    ]
    for name, cls in BASE_SECTIONS.items():
        fields.append((name, cls, field(default_factory=cls)))
    for name, cls in task_sections.items():
        if name in BASE_SECTIONS or name in ROOT_KEYS:
            raise ConfigError(
                f"task {name!r} cannot be registered: its config section would replace the "
                f"root config key {name!r}"
            )
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"task {name!r}: its config_cls {cls!r} is not a dataclass")
        fields.append((name, cls, field(default_factory=cls)))
    return dataclasses.make_dataclass("Config", fields, frozen=True)


def current_schema() -> type:
    """The root config dataclass for the tasks registered now."""
    return _make_schema(tuple(_task_sections().items()))


def _task_sections() -> dict[str, type]:
    from jaxpt.tasks import config_sections

    return config_sections()


def _valid_keys(node) -> list[str]:
    if OmegaConf.is_dict(node):
        return [str(k) for k in node]
    return []


def _parent(schema, full_key: str):
    node = schema
    for part in full_key.split(".")[:-1]:
        if not OmegaConf.is_dict(node) or part not in node:
            return None
        node = node[part]
    return node


def explain_config_error(error: OmegaConfBaseException, schema) -> ConfigError:
    full_key = str(getattr(error, "full_key", "") or getattr(error, "key", "") or "?")
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        parent = _parent(schema, full_key)
        leaf = full_key.split(".")[-1]
        prefix = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        candidates = _valid_keys(parent) if parent is not None else []
        close = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.5)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        if not close and candidates:
            hint = f"; valid keys here: {', '.join(prefix + c for c in candidates)}"
        return ConfigError(f"unknown config key '{full_key}'{hint}")
    if isinstance(error, MissingMandatoryValue):
        return ConfigError(f"missing required config key '{full_key}'")
    if isinstance(error, ValidationError):
        message = str(error).split("\n")[0]
        return ConfigError(f"bad value for config key '{full_key}': {message}")
    return ConfigError(f"config key '{full_key}': {str(error).splitlines()[0]}")


def _check_choices_and_ranges(config) -> None:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}{hint}")
    positive = {
        "train.max_steps": config.train.max_steps,
        "train.batch_size": config.train.batch_size,
        "train.grad_accum_steps": config.train.grad_accum_steps,
        "train.log_every": config.train.log_every,
        "data.seq_len": config.data.seq_len,
        "checkpoint.keep": config.checkpoint.keep,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ConfigError(
            f"config key 'train.batch_size' ({config.train.batch_size}) must be divisible by "
            f"'train.grad_accum_steps' ({config.train.grad_accum_steps})"
        )
    if config.train.logits_chunk_size < 0:
        raise ConfigError(
            "config key 'train.logits_chunk_size' must be >= 0 (0: no chunking), got "
            f"{config.train.logits_chunk_size}"
        )
    if config.train.max_nonfinite_steps < 0:
        raise ConfigError(
            "config key 'train.max_nonfinite_steps' must be >= 0 (0: never stop), got "
            f"{config.train.max_nonfinite_steps}"
        )
    if config.train.eval_tasks_every < 0:
        raise ConfigError("config key 'train.eval_tasks_every' must be >= 0 (0: eval_every)")
    if config.train.eval_tasks:
        from jaxpt.evals.tasks import parse_tasks

        try:
            parse_tasks(config.train.eval_tasks, "train.eval_tasks")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    generated = {config.data.train, config.data.eval}
    if "reasoning_gym" in generated and config.data.reasoning_gym.task is None:
        raise ConfigError("config key 'data.reasoning_gym.task' names the reasoning-gym task "
                          "that data.train / data.eval: reasoning_gym generates (e.g. chain_sum)")
    if not 0.0 <= config.data.eval_fraction < 1.0:
        raise ConfigError("config key 'data.eval_fraction' must be in [0, 1)")
    if "://" in config.output_dir:
        raise ConfigError(
            f"config key 'output_dir' ({config.output_dir!r}) must be a local path: metrics, "
            "completions, data files and the HF export are written there with plain file "
            "I/O. Put checkpoints on shared storage with checkpoint.directory="
            f"{config.output_dir.rstrip('/')}/checkpoints and keep output_dir local"
        )
    if config.optim.lr < 0 or config.optim.warmup_steps < 0:
        raise ConfigError("config keys 'optim.lr' and 'optim.warmup_steps' must be >= 0")
    if config.rl.importance_cap < 1:
        raise ConfigError(
            f"config key 'rl.importance_cap' must be >= 1, got {config.rl.importance_cap}"
        )
    if config.rl.max_staleness < 0:
        raise ConfigError(
            f"config key 'rl.max_staleness' must be >= 0, got {config.rl.max_staleness}"
        )
    if config.envs.enabled():
        if config.task not in ("grpo", "ppo"):
            raise ConfigError(f"config section 'envs' (multi-turn episodes) applies to the grpo "
                              f"and ppo tasks, not {config.task!r}")
        for key in ("max_turns", "max_parallel", "max_tool_calls_per_turn"):
            if getattr(config.envs, key) < 1:
                raise ConfigError(f"config key 'envs.{key}' must be >= 1, got "
                                  f"{getattr(config.envs, key)}")
        if config.envs.max_turn_tokens is not None and config.envs.max_turn_tokens < 1:
            raise ConfigError("config key 'envs.max_turn_tokens' must be >= 1 or null")
        if config.envs.tool_timeout_s <= 0:
            raise ConfigError("config key 'envs.tool_timeout_s' must be > 0")
    asynchronous = [k for k in ("max_staleness", "train_devices", "rollout_devices")
                    if getattr(config.rl, k) not in (None, 0)]
    if asynchronous and config.task not in ("grpo", "ppo"):
        raise ConfigError(
            f"config key 'rl.{asynchronous[0]}' (asynchronous rollouts) applies to the grpo "
            f"and ppo tasks, not {config.task!r}"
        )


def _check_lora(config) -> None:
    """The ``lora`` section's values (whether ``targets`` matches a projection is checked
    when the model is built)."""
    import re

    lora = config.lora
    if lora.rank < 0:
        raise ConfigError(f"config key 'lora.rank' must be >= 0 (0: off), got {lora.rank}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {lora.dropout}")
    if lora.alpha is not None and lora.alpha <= 0:
        raise ConfigError(f"config key 'lora.alpha' must be > 0, got {lora.alpha}")
    targets = lora.targets
    if isinstance(targets, (list, tuple)):
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f"config key 'lora.targets' must be a regex or a non-empty list of module "
                f"names, got {list(targets)!r}"
            )
    elif targets is not None:
        if not isinstance(targets, str) or not targets:
            raise ConfigError(
                f"config key 'lora.targets' must be a regex or a list of module names, "
                f"got {targets!r}"
            )
        try:
            re.compile(targets)
        except re.error as error:
            raise ConfigError(f"config key 'lora.targets': bad regex {targets!r}: {error}") from None
    if lora.init_adapter is not None and not os.path.isdir(lora.init_adapter):
        raise ConfigError(
            f"config key 'lora.init_adapter': {lora.init_adapter!r} is not a directory"
        )
    if (lora.rank or lora.init_adapter) and config.task == "rm":
        raise ConfigError(
            "config key 'lora.rank': LoRA is not available for task 'rm' (its score head "
            "would stay untrained); set lora.rank=0"
        )


def _raw_layers(path, overrides, values) -> list:
    """The YAML file, ``values`` and the dotted overrides as untyped OmegaConf layers."""
    layers = []
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if values:
        layers.append(OmegaConf.create(values))
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    return layers


def _imports_of(layers) -> list[str]:
    """The ``imports`` key of the untyped layers (the last one that sets it wins)."""
    imports = None
    for layer in layers:
        if OmegaConf.is_dict(layer) and "imports" in layer:
            imports = layer["imports"]
    if imports is None:
        return []
    if OmegaConf.is_list(imports):
        imports = OmegaConf.to_container(imports, resolve=True)
    if not isinstance(imports, list) or not all(isinstance(m, str) and m for m in imports):
        raise ConfigError(
            f"config key 'imports' must be a list of module names, e.g. [mypkg.tasks], "
            f"got {imports!r}"
        )
    return imports


def import_modules(module_names) -> None:
    """Import each module (a user's tasks, model families); a failure is a ``ConfigError``
    that names the ``imports`` key and the module."""
    for name in module_names:
        try:
            importlib.import_module(name)
        except Exception as error:
            raise ConfigError(
                f"config key 'imports': cannot import module {name!r}: "
                f"{type(error).__name__}: {error}"
            ) from error


def import_config_modules(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    values: dict | None = None,
) -> list[str]:
    """Import the modules a config lists under ``imports`` (as ``load_config`` does before
    it validates the rest, e.g. for ``--help`` to list their tasks); their names."""
    try:
        names = _imports_of(_raw_layers(path, overrides, values))
    except OmegaConfBaseException as error:
        raise explain_config_error(error, None) from None
    import_modules(names)
    return names


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    values: dict | None = None,
):
    """Parse a YAML file, then ``values`` (a dict), then ``a.b=c`` overrides, into the typed,
    validated root config. The modules named by the ``imports`` key are imported first, so
    the schema includes the tasks they register."""
    from jaxpt.tasks import available_tasks, get_task

    schema = None
    try:
        layers = _raw_layers(path, overrides, values)
        import_modules(_imports_of(layers))
        schema = OmegaConf.structured(current_schema())
        merged = OmegaConf.merge(schema, *layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise explain_config_error(error, schema) from None
    if config.task not in available_tasks():
        close = difflib.get_close_matches(config.task, available_tasks(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if not close:
            hint = "; a task of your own needs its module listed in the config key 'imports'"
        raise ConfigError(
            f"config key 'task': unknown task {config.task!r} "
            f"(available: {', '.join(available_tasks())}){hint}"
        )
    _check_choices_and_ranges(config)
    _check_lora(config)
    check = get_task(config.task).check_config
    if check is not None:
        check(config)
    return config


def config_from_dict(values: dict):
    """The typed config from a plain dict (e.g. one saved with a checkpoint)."""
    return load_config(None, values=values)


def to_dict(config) -> dict:
    """A plain, YAML/JSON-friendly dict of a config."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def replace(config, *overrides: str):
    """A validated copy of ``config`` with ``a.b=c`` overrides applied."""
    return load_config(None, list(overrides), values=to_dict(config))
