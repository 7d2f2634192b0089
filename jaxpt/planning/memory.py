"""Per-device memory of a run's compiled programs, before any weights exist.

The train step is the one ``jaxpt.loop`` jits (``make_train_step`` + the task's loss, the
state's shardings, the state donated); GRPO also compiles its rollout sampler (prefill and
the decode loop, ``jaxpt.sampling.engine``) and the continuous-batching engine's decode
call over a page pool sized for its rollout rows (``jaxpt.sampling.continuous``). Both are lowered from sharded
``ShapeDtypeStruct``s and compiled for the target devices; XLA's ``memory_analysis`` then
gives what each device holds while the program runs.

A split RL run (``rl.train_devices`` / ``rl.rollout_devices``, ``jaxpt.tasks.rl.placement``)
is planned per side: the train step on the train mesh, the sampler and the engine on the
rollout mesh over the policy's weights as ``WeightSync`` places them there, and the bytes
each policy version moves from one side to the other (``RolloutPlan``, ``SyncPlan``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.models.layers import attention_platform
from jaxpt.run_spec import AbstractRun, abstract_run, run_mesh
from jaxpt.sampling import SamplingConfig
from jaxpt.sampling.engine import _merge, _sample_jit, _StaticGraph
from jaxpt.sharding import merged_rules, named_sharding, replicated, rules_key, use_rules
from jaxpt.tasks.rl.placement import rollout_mesh as rl_rollout_mesh


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class ProgramMemory:
    """XLA's per-device figures for one compiled program, in bytes."""

    argument: int
    output: int
    alias: int  # outputs that reuse donated argument buffers
    temp: int  # activations, gradients, workspace
    generated_code: int
    compile_s: float
    # Set when XLA refused to compile because the program cannot fit the device; the
    # figures are then a lower bound: arguments plus what the error says is needed.
    out_of_memory: str | None = None

    @property
    def peak(self) -> int:
        """Live at once: inputs, outputs not written in place, temporaries, code."""
        return self.argument + self.output - self.alias + self.temp + self.generated_code

    @classmethod
    def of(cls, compiled, compile_s: float) -> ProgramMemory:
        m = compiled.memory_analysis()
        return cls(
            argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
            alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
            generated_code=int(m.generated_code_size_in_bytes), compile_s=round(compile_s, 2),
        )


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of a run on a topology and whether they fit its memory."""

    topology: str
    device_kind: str
    num_devices: int
    mesh: dict
    params: int
    opt_state: int
    ref_params: int
    batch: int
    train_step: ProgramMemory
    sampler: ProgramMemory | None
    # Colocated: train state bytes that stay put while the sampler runs. Split: the next
    # policy version's params landing on the rollout devices while the sampler runs
    # (rl.max_staleness > 0), else 0.
    sampler_resident: int
    hbm: int
    engine: EnginePlan | None = None
    # The rollout side of a split run (None: colocated, the train mesh samples). The
    # figures above (params, opt_state, train_step, ...) are then the train devices'; the
    # sampler and the engine are compiled on the rollout mesh.
    rollout: RolloutPlan | None = None
    train_devices: int = 0  # the devices the train mesh spans (split: the train side's)

    @property
    def rollout_total(self) -> int:
        """Per-device peak while rolling out: the sampler and what stays beside it (split:
        also the moment a new version lands beside the one in use)."""
        if self.sampler is None:
            return 0
        peak = self.sampler.peak + self.sampler_resident
        return peak if self.rollout is None else max(peak, self.rollout.sync_peak)

    @property
    def total(self) -> int:
        """The larger of the train step's peak and the rollout's (sampler + idle state)."""
        return max(self.train_step.peak, self.rollout_total)

    @property
    def train_fits(self) -> bool:
        return not self.train_step.out_of_memory and self.train_step.peak <= self.hbm

    @property
    def rollout_fits(self) -> bool:
        oom = self.sampler is not None and self.sampler.out_of_memory
        return not oom and self.rollout_total <= self.hbm

    @property
    def fits(self) -> bool:
        oom = self.train_step.out_of_memory or (self.sampler and self.sampler.out_of_memory)
        return not oom and self.total <= self.hbm

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total=self.total, fits=self.fits, train_step_peak=self.train_step.peak)
        if self.sampler is not None:
            d["sampler_peak"] = self.sampler.peak
        if self.engine is not None:
            d["engine"].update(pool_tokens=self.engine.pool_tokens,
                               tokens_in_flight_fit=self.tokens_in_flight_fit())
        if self.rollout is not None:
            d.update(train_total=self.train_step.peak, train_fits=self.train_fits)
            d["rollout"].update(total=self.rollout_total, fits=self.rollout_fits,
                                sync_peak=self.rollout.sync_peak)
            d["rollout"]["sync"].update(seconds_per_version=self.rollout.sync.seconds,
                                        first_seconds=self.rollout.sync.first_seconds)
        return d

    def tokens_in_flight_fit(self) -> int:
        """KV tokens the engine's pool could hold in the memory its rollout leaves free
        (device memory less the idle train state and the engine step's other bytes)."""
        if self.engine is None:
            return 0
        program = self.engine.program
        others = program.peak - self.engine.pool_bytes + self.sampler_resident
        return max(self.hbm - others, 0) // max(self.engine.bytes_per_token, 1)


@dataclasses.dataclass
class SyncPlan:
    """What ``WeightSync`` moves from the train devices to the rollout devices of a split
    run: the trainable params every policy version, the non-trainable rest (the frozen
    base under LoRA) once, each leaf in its train-side dtype."""

    params_bytes: int  # every version, the whole (global) trainable params
    rest_bytes: int  # once, the whole non-trainable rest
    per_device_bytes: int  # what each rollout device receives of the params per version
    rest_per_device_bytes: int  # ... and of the rest, once
    crossing_factor: float  # rollout devices / train devices: each train device sends
    # this many times what one rollout device receives (nothing is re-broadcast)
    ici_bytes_per_s: float | None  # one direction of a chip's ICI links (None: unknown)

    def _seconds(self, per_device: int) -> float | None:
        if not self.ici_bytes_per_s:
            return None
        busiest = per_device * max(1.0, self.crossing_factor)
        return round(busiest / self.ici_bytes_per_s, 6)

    @property
    def seconds(self) -> float | None:
        """A lower bound on each version's sync: the busiest chip's bytes at its full
        one-way ICI bandwidth (no hops, no contention on the links between the sides)."""
        return self._seconds(self.per_device_bytes)

    @property
    def first_seconds(self) -> float | None:
        """The same bound for the first sync, which also moves the rest."""
        return self._seconds(self.per_device_bytes + self.rest_per_device_bytes)


@dataclasses.dataclass
class RolloutPlan:
    """The rollout devices of a split RL run: their mesh, the policy as synced onto it
    (``WeightSync``: every leaf with its train PartitionSpec, in its train dtype) and the
    sync's volume. The sampler itself is ``MemoryPlan.sampler``, compiled here."""

    num_devices: int
    device_ids: list
    mesh: dict
    policy: int  # per device: one synced copy of the policy (params + rest)
    params: int  # per device: its trainable part, which every version replaces
    max_staleness: int
    # Copies of the trainable params the rollout devices hold while sampling: with
    # max_staleness > 0 the worker samples with version v while v + 1 lands.
    params_copies: int
    sync: SyncPlan

    @property
    def sync_peak(self) -> int:
        """Per device while a version lands: the old copy stays until the new one is in
        place (``WeightSync`` keeps the last version), even with max_staleness 0."""
        return self.policy + self.params


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _required_bytes(message: str) -> int | None:
    """What an XLA out-of-memory error says the program needs beyond its arguments: the
    temporaries ("HLO temporaries (16.39G)") or the overflow ("Used 17.2G of 15.75G")."""
    found = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\)", message)
    if found is None:
        found = re.search(r"Used ([\d.]+)([KMGT]?)i?B? of", message)
    if found is None:
        return None
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def _compile(fn, *args, **kwargs):
    start = time.perf_counter()
    try:
        compiled = fn.lower(*args, **kwargs).compile()
    except jax.errors.JaxRuntimeError as error:
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message or "memory" not in message.lower():
            raise
        # The compiler gives up on programs that cannot fit: that is the plan's answer.
        arrays = [x for x in jax.tree.leaves((args, kwargs))
                  if isinstance(x, jax.ShapeDtypeStruct)]
        arguments = bytes_per_device(arrays)
        needed = _required_bytes(message)
        return ProgramMemory(
            argument=arguments, output=0, alias=0,
            temp=needed if needed is not None else 0, generated_code=0,
            compile_s=round(time.perf_counter() - start, 2),
            out_of_memory=message.strip().splitlines()[-1][:300],
        )
    return ProgramMemory.of(compiled, time.perf_counter() - start)


def compile_train_step(run: AbstractRun) -> ProgramMemory:
    """Compile the loop's jitted train step (``AbstractRun.jit_step``) for ``run``'s
    abstract state and batch."""
    return _compile(run.jit_step(), run.state, run.batch)


def compile_sampler(run: AbstractRun, mesh=None, policy=None) -> ProgramMemory:
    """Compile GRPO's rollout sampler: ``batch_size / num_generations`` prompts of
    ``max_prompt_length``, ``num_generations`` samples each, ``max_completion_length``
    new tokens, with the policy's params as the rollout passes them: ``policy`` (params,
    rest) on ``mesh`` (default: the train state's, on the train mesh)."""
    cfg, mesh = run.ctx.config.grpo, mesh or run.ctx.mesh
    policy = policy or (run.state.params, run.state.rest)
    prompts = run.ctx.config.train.batch_size // cfg.num_generations
    sampling = SamplingConfig.make(
        max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, num_samples=cfg.num_generations,
    )
    sampling = dataclasses.replace(sampling, eos_token_ids=())
    shape = (prompts, cfg.max_prompt_length)
    # Replicated when the prompts do not divide over the batch axes, as the sampler's own
    # constraint does.
    ids = jax.ShapeDtypeStruct(shape, jnp.int32,
                               sharding=named_sharding(mesh, ("batch", None), shape))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))
    limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    eos = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=replicated(mesh))
    return _compile(
        _sample_jit, _StaticGraph(run.state.graphdef), policy, ids, ids, key,
        limit, eos, config=sampling, rules=rules_key(),
        # an MoE policy under rl.routing_replay also returns each token's experts
        record_routing=bool(run.ctx.config.rl.routing_replay),
    )


ENGINE_STEPS = 16  # decode steps per engine call, as Engine's default


@dataclasses.dataclass
class EnginePlan:
    """The continuous-batching engine's decode program for a run's rollouts, and its page
    pool: every rollout row at ``max_prompt_length + max_completion_length`` tokens."""

    program: ProgramMemory
    page_size: int
    num_pages: int
    pool_bytes: int  # per device (the pool is replicated)
    bytes_per_token: int
    layout: str  # "combined": attention is the TPU ragged paged attention kernel

    @property
    def pool_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size


def compile_engine(run: AbstractRun, platform: str, mesh=None, policy=None) -> EnginePlan:
    """Compile the engine's decode call (``jaxpt.sampling.continuous``) for GRPO's rollout
    rows, with the KV pool laid out for ``platform`` (TPU: the ragged paged attention
    kernel's layout, which the step calls); ``mesh`` and ``policy`` as in
    ``compile_sampler``."""
    from jaxpt.models.paged import PagedKVCache, default_layout
    from jaxpt.sampling.continuous import Engine, _decode

    cfg, mesh = run.ctx.config.grpo, mesh or run.ctx.mesh
    policy = policy or (run.state.params, run.state.rest)
    rows = run.ctx.config.train.batch_size
    page = Engine.default_page_size()
    pages_per_seq = -(-(cfg.max_prompt_length + cfg.max_completion_length) // page)
    num_pages = rows * pages_per_seq + 1
    model_config = _merge(run.state.graphdef, policy).config  # abstract
    dtype = jnp.dtype(run.ctx.config.model.dtype)
    layout = default_layout(platform, model_config.head_dim)
    pool = jax.eval_shape(
        lambda: PagedKVCache.init(model_config, num_pages, page, dtype, layout).pages
    )
    rep = replicated(mesh)
    put = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
    pool = jax.tree.map(put, pool)
    vec = lambda dtype=jnp.int32: jax.ShapeDtypeStruct((rows,), dtype, sharding=rep)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    sampling = SamplingConfig.make(temperature=cfg.temperature, top_p=cfg.top_p,
                                   top_k=cfg.top_k)
    program = _compile(
        _decode, _StaticGraph(run.state.graphdef), policy, pool,
        jax.ShapeDtypeStruct((rows, pages_per_seq), jnp.int32, sharding=rep),
        vec(), vec(), vec(), vec(),
        jax.ShapeDtypeStruct((rows, *key_data.shape), key_data.dtype, sharding=rep),
        vec(jnp.bool_), jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((4,), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        config=sampling, steps=ENGINE_STEPS, page_size=page, layout=layout, stops=(),
    )
    pool_bytes = bytes_per_device(pool)
    return EnginePlan(program, page, num_pages, pool_bytes,
                      pool_bytes // (num_pages * page), layout)


def synced_policy(run: AbstractRun, mesh) -> tuple:
    """(params, rest) of ``run``'s state as ``WeightSync`` puts them on a split run's
    rollout ``mesh``: the same shapes and dtypes, each leaf with its train PartitionSpec."""
    from jaxpt.tasks.rl.pipeline import WeightSync

    policy = (run.state.params, run.state.rest)
    shardings = WeightSync(mesh).target_shardings(policy)  # the sync's own placement rule
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        policy, shardings)


def _global_bytes(tree) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def plan_rollout(run: AbstractRun, mesh, policy, topology) -> RolloutPlan:
    """The rollout side of a split run on ``mesh`` with the synced ``policy``."""
    params, rest = policy
    k = run.ctx.config.rl.max_staleness
    train_devices, rollout_devices = run.ctx.mesh.devices.size, mesh.devices.size
    sync = SyncPlan(
        params_bytes=_global_bytes(params), rest_bytes=_global_bytes(rest),
        per_device_bytes=bytes_per_device(params), rest_per_device_bytes=bytes_per_device(rest),
        crossing_factor=rollout_devices / train_devices,
        ici_bytes_per_s=topology.ici_bytes_per_s,
    )
    return RolloutPlan(
        num_devices=rollout_devices, device_ids=[int(d.id) for d in mesh.devices.flat],
        mesh={name: int(size) for name, size in mesh.shape.items()},
        policy=bytes_per_device(policy), params=bytes_per_device(params), max_staleness=k,
        params_copies=2 if k > 0 else 1, sync=sync,
    )


def plan_memory(config, topology) -> MemoryPlan:
    """Compile ``config``'s train step (and GRPO's sampler) for ``topology``'s devices; a
    split GRPO run's sampler on its rollout devices (``MemoryPlan.rollout``)."""
    devices = list(topology.devices)
    mesh = run_mesh(config, devices=devices)  # a split run's train devices only
    samples = config.task == "grpo"
    rollout_mesh = rl_rollout_mesh(config, devices) if samples else None
    rules = merged_rules(config.mesh.rules)
    with use_rules(rules):
        # Outside set_mesh: optax builds its state tree eagerly, and TPU topology devices
        # cannot run anything.
        run = abstract_run(config, mesh, rules)  # checks the batch against the train mesh
    sample_mesh = rollout_mesh or mesh
    policy = synced_policy(run, rollout_mesh) if rollout_mesh is not None else None
    with jax.set_mesh(mesh), use_rules(rules), attention_platform(topology.platform):
        train = compile_train_step(run)
    sampler = engine = None
    if samples:
        with jax.set_mesh(sample_mesh), use_rules(rules), attention_platform(topology.platform):
            sampler = compile_sampler(run, sample_mesh, policy)
            engine = compile_engine(run, topology.platform, sample_mesh, policy)
    params = bytes_per_device(run.state.params) + bytes_per_device(run.state.rest)
    opt_state = bytes_per_device(run.state.opt_state)
    ref = bytes_per_device(run.state.ref_params) if run.state.ref_params is not None else 0
    rollout = None if policy is None else plan_rollout(run, rollout_mesh, policy, topology)
    if rollout is not None:  # the train state stays on the train devices
        resident = rollout.params if rollout.params_copies > 1 else 0
    else:
        resident = (opt_state + ref) if sampler is not None else 0
    return MemoryPlan(
        topology=topology.name, device_kind=topology.device_kind,
        num_devices=topology.num_devices, mesh={k: int(v) for k, v in mesh.shape.items()},
        params=params, opt_state=opt_state, ref_params=ref,
        batch=bytes_per_device(run.batch), train_step=train, sampler=sampler,
        sampler_resident=resident, hbm=topology.hbm_bytes, engine=engine,
        train_devices=int(mesh.devices.size), rollout=rollout,
    )


def _num_experts(config) -> int:
    """The experts per MoE layer of the run's model (0: dense or unknown)."""
    from jaxpt.models.config import config_from_hf
    from jaxpt.tasks import common

    try:
        return config_from_hf(common.hf_config_dict(config.model.path)).num_experts
    except Exception:  # noqa: BLE001 - a suggestion, never a failure
        return 0


def expert_split(num_experts: int, num_devices: int) -> int:
    """The expert-parallel degree a plan suggests for an MoE model: the divisor of both
    the experts and the devices nearest sqrt(devices) (the larger on a tie), fsdp taking
    the rest. Memory favours fsdp (the dense weights and their optimizer state shard over
    fsdp alone, so expert=devices replicates them); the experts' per-layer all-gathers
    favour the expert axis (each device gathers E/expert experts): measured with
    ``jaxpt.plan`` for Qwen3-30B-A3B SFT on a v5p-64, fsdp 32 needs 34.0 GiB per chip and
    expert 32 57.4 GiB. 1 for a dense model."""
    if not num_experts:
        return 1
    common = math.gcd(num_experts, num_devices)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    target = math.log(num_devices) / 2
    return min(divisors, key=lambda d: (round(abs(math.log(d) - target), 9), -d))


# Overrides that shrink the rollout side of a split run too, not only the train step.
_BOTH_SIDES = ("grpo.max_completion_length=", "model.param_dtype=")


def suggestions(
    config, num_devices: int | None = None, plan: MemoryPlan | None = None
) -> list[tuple[str, list[str]]]:
    """Concrete changes that lower the peak, most effective first, as (why, overrides).
    With ``num_devices``, an MoE model also gets its expert/fsdp split: fewer expert
    shards first when it runs expert-parallel (memory), else, last, the balanced split
    of ``expert_split`` (traffic: smaller per-layer expert all-gathers). With a split
    run's ``plan``, changes for the side that does not fit: the rollout side's first,
    then the train step's (only those that shrink both sides when the train side fits)."""
    if plan is None or plan.rollout is None:
        return _train_suggestions(config, num_devices)
    out = [] if plan.rollout_fits else _rollout_suggestions(config, plan)
    train = _train_suggestions(config, num_devices)
    if plan.train_fits:
        train = [(why, o) for why, o in train if all(x.startswith(_BOTH_SIDES) for x in o)]
    return out + [s for s in train if s not in out]


def _rollout_suggestions(config, plan: MemoryPlan) -> list[tuple[str, list[str]]]:
    out = []
    rollout = plan.rollout
    if rollout.num_devices > 1 and rollout.mesh.get("fsdp", 1) == 1:
        why = "shard the policy over the rollout devices (fsdp) instead of a whole copy on each"
        out.append((why, ["rl.rollout_mesh={fsdp: -1}"]))
    if rollout.params_copies > 1:
        why = "sample synchronously: no new version lands while the sampler runs"
        out.append((why, ["rl.max_staleness=0"]))
    return out


def _train_suggestions(config, num_devices: int | None) -> list[tuple[str, list[str]]]:
    out = []
    mesh = config.mesh
    num_experts = _num_experts(config) if num_devices else 0
    if num_experts and mesh.expert > 1:
        fewer = mesh.expert // 2
        why = (f"split the experts {fewer} ways instead of {mesh.expert}, fsdp over the rest "
               "(the dense weights shard over fsdp only)")
        out.append((why, ["mesh.data=1", "mesh.tensor=1", f"mesh.expert={fewer}",
                          "mesh.fsdp=-1"]))
    if mesh.data > 1 or mesh.tensor > 1:
        out.append(("shard params and optimizer state over every device (fsdp)",
                     ["mesh.data=1", "mesh.tensor=1", "mesh.fsdp=-1"]))
    if config.model.remat == "none":
        out.append(("recompute activations in the backward pass (remat)",
                    ["model.remat=full"]))
    train = config.train
    if train.logits_chunk_size == 0 and config.task in ("sft", "dpo", "kto", "grpo"):
        # The float32 logits and their gradient are [rows, seq, vocab]: with a 150k
        # vocabulary they outweigh a layer's activations many times over.
        out.append(("run the LM head 512 positions at a time (chunked logits)",
                    ["train.logits_chunk_size=512"]))
    per_shard = train.batch_size // max(1, train.grad_accum_steps)
    if per_shard % 2 == 0 and train.batch_size % (train.grad_accum_steps * 2) == 0:
        out.append(("halve the micro-batch (same global batch, twice the accumulation)",
                     [f"train.grad_accum_steps={train.grad_accum_steps * 2}"]))
    if config.task == "sft" and config.data.seq_len >= 256:
        out.append(("halve the sequence length", [f"data.seq_len={config.data.seq_len // 2}"]))
    if config.task == "grpo" and config.grpo.max_completion_length >= 128:
        out.append(("halve the completion budget",
                    [f"grpo.max_completion_length={config.grpo.max_completion_length // 2}"]))
    if config.model.param_dtype == "float32":
        out.append(("keep master weights in bfloat16 (optimizer state follows)",
                    ["model.param_dtype=bfloat16"]))
    experts = expert_split(num_experts, num_devices) if num_experts else 1
    if experts > 1 and mesh.expert == 1:
        why = (f"split the experts over {experts} devices (expert parallelism), fsdp over "
               "the rest: per-layer expert all-gathers shrink that many times")
        out.append((why, ["mesh.data=1", "mesh.tensor=1", f"mesh.expert={experts}",
                          "mesh.fsdp=-1"]))
    return out


def gib(n: int) -> float:
    return round(n / 1024**3, 3)


def format_plan(plan: MemoryPlan) -> str:
    """A per-device table of the plan, in GiB."""
    rows = [
        ("params (+ non-trainable)", plan.params),
        ("optimizer state", plan.opt_state),
        ("reference params", plan.ref_params),
        ("batch", plan.batch),
        ("train step: arguments", plan.train_step.argument),
        ("train step: outputs", plan.train_step.output),
        ("train step: aliased (donated)", -plan.train_step.alias),
        ("train step: grads/activations/temps", plan.train_step.temp),
        ("train step: generated code", plan.train_step.generated_code),
        ("train step: peak", plan.train_step.peak),
    ]
    if plan.sampler is not None and plan.rollout is None:
        rows += [
            ("sampler: arguments (params)", plan.sampler.argument),
            ("sampler: KV cache/temps", plan.sampler.temp),
            ("sampler: peak + resident opt/ref", plan.sampler.peak + plan.sampler_resident),
        ]
    if plan.sampler is not None and plan.rollout is not None:  # on the rollout devices
        rows += [
            ("rollout: synced policy (params + rest)", plan.rollout.policy),
            ("sampler: arguments (policy, prompts)", plan.sampler.argument),
            ("sampler: KV cache/temps", plan.sampler.temp),
            ("sampler: peak", plan.sampler.peak),
            (f"rollout: next version landing (max_staleness {plan.rollout.max_staleness})",
             plan.sampler_resident),
            ("rollout: while a version lands (2 copies)", plan.rollout.sync_peak),
        ]
    if plan.engine is not None:
        rows += [
            (f"engine: KV page pool ({plan.engine.num_pages} pages of {plan.engine.page_size})",
             plan.engine.pool_bytes),
            ("engine: decode step peak", plan.engine.program.peak),
        ]
    rollout = plan.rollout
    if rollout is not None:
        rows += [("train side: peak", plan.train_step.peak),
                 ("rollout side: peak", plan.rollout_total)]
    rows += [("TOTAL (peak)", plan.total), (f"HBM per device ({plan.device_kind})", plan.hbm)]
    width = max(len(name) for name, _ in rows)
    if rollout is None:
        lines = [f"{plan.topology}: {plan.num_devices} devices, mesh {plan.mesh}"]
    else:
        lines = [(f"{plan.topology}: {plan.num_devices} devices, split: train mesh {plan.mesh} "
                 f"on {plan.train_devices}, rollout mesh {rollout.mesh} on "
                 f"{rollout.num_devices} (ids {rollout.device_ids})")]
    lines += [f"  {name:<{width}}  {gib(value):10.3f} GiB" for name, value in rows]
    for name, program in (("train step", plan.train_step), ("sampler", plan.sampler)):
        if program is not None and program.out_of_memory:
            lines.append(f"  {name}: XLA could not fit it (figures are a lower bound): "
                         f"{program.out_of_memory}")
    if plan.engine is not None:
        lines.append(f"  engine: pool of {plan.engine.pool_tokens} tokens "
                     f"({plan.engine.bytes_per_token} B each); {plan.tokens_in_flight_fit()} "
                     "tokens in flight fit beside the "
                     + ("idle train state" if plan.rollout is None else "synced policy"))
    if rollout is not None:
        sync = rollout.sync
        copies = ("2 copies of the params while sampling: version v samples while v + 1 "
                  "lands" if rollout.params_copies > 1 else
                  "1 copy while sampling; 2 only while a version lands")
        lines.append(f"  rollout: max_staleness {rollout.max_staleness}: {copies}")
        speed = ("" if sync.seconds is None else
                 f", >= {1e3 * sync.seconds:.1f} ms per version at "
                 f"{sync.ici_bytes_per_s / 1e9:.0f} GB/s one-way ICI per chip")
        lines.append(f"  weight sync: {gib(sync.params_bytes):.3f} GiB of trainable params per "
                     f"policy version ({gib(sync.per_device_bytes):.3f} GiB into each rollout "
                     f"device{speed}); {gib(sync.rest_bytes):.3f} GiB of the rest once")
        for side, peak, ok in (("train", plan.train_step.peak, plan.train_fits),
                               ("rollout", plan.rollout_total, plan.rollout_fits)):
            lines.append(f"  {side} side fits: {'yes' if ok else 'NO'}"
                         f" ({100 * peak / max(plan.hbm, 1):.0f}% of memory)")
    lines.append(f"  fits: {'yes' if plan.fits else 'NO'}"
                 f" ({100 * plan.total / max(plan.hbm, 1):.0f}% of memory)")
    return "\n".join(lines)


__all__ = [
    "EnginePlan", "MemoryPlan", "ProgramMemory", "RolloutPlan", "SyncPlan", "compile_engine",
    "compile_sampler", "compile_train_step", "format_plan", "gib", "plan_memory", "plan_rollout",
    "suggestions", "synced_policy",
]
