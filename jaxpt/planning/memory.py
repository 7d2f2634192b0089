"""Per-device memory of a run's compiled programs, before any weights exist.

The train step is the one ``jaxpt.loop`` jits (``make_train_step`` + the task's loss, the
state's shardings, the state donated); GRPO also compiles its rollout sampler (prefill and
the decode loop, ``jaxpt.sampling.engine``) and the continuous-batching engine's decode
call over a page pool sized for its rollout rows (``jaxpt.sampling.continuous``). Both are lowered from sharded
``ShapeDtypeStruct``s and compiled for the target devices; XLA's ``memory_analysis`` then
gives what each device holds while the program runs.
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
    sampler_resident: int  # train state bytes that stay put while the sampler runs
    hbm: int
    engine: EnginePlan | None = None

    @property
    def total(self) -> int:
        """The larger of the train step's peak and the rollout's (sampler + idle state)."""
        rollout = 0 if self.sampler is None else self.sampler.peak + self.sampler_resident
        return max(self.train_step.peak, rollout)

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
        return d

    def tokens_in_flight_fit(self) -> int:
        """KV tokens the engine's pool could hold in the memory its rollout leaves free
        (device memory less the idle train state and the engine step's other bytes)."""
        if self.engine is None:
            return 0
        program = self.engine.program
        others = program.peak - self.engine.pool_bytes + self.sampler_resident
        return max(self.hbm - others, 0) // max(self.engine.bytes_per_token, 1)


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


def compile_sampler(run: AbstractRun) -> ProgramMemory:
    """Compile GRPO's rollout sampler: ``batch_size / num_generations`` prompts of
    ``max_prompt_length``, ``num_generations`` samples each, ``max_completion_length``
    new tokens, with the policy's params as the rollout passes them."""
    cfg, mesh = run.ctx.config.grpo, run.ctx.mesh
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
    state = run.state
    return _compile(
        _sample_jit, _StaticGraph(state.graphdef), (state.params, state.rest), ids, ids, key,
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


def compile_engine(run: AbstractRun, platform: str) -> EnginePlan:
    """Compile the engine's decode call (``jaxpt.sampling.continuous``) for GRPO's rollout
    rows, with the KV pool laid out for ``platform`` (TPU: the ragged paged attention
    kernel's layout, which the step calls)."""
    from jaxpt.models.paged import PagedKVCache, default_layout
    from jaxpt.sampling.continuous import Engine, _decode

    cfg, mesh = run.ctx.config.grpo, run.ctx.mesh
    rows = run.ctx.config.train.batch_size
    page = Engine.default_page_size()
    pages_per_seq = -(-(cfg.max_prompt_length + cfg.max_completion_length) // page)
    num_pages = rows * pages_per_seq + 1
    state = run.state
    model_config = _merge(state.graphdef, (state.params, state.rest)).config  # abstract
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
        _decode, _StaticGraph(state.graphdef), (state.params, state.rest), pool,
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


def plan_memory(config, topology) -> MemoryPlan:
    """Compile ``config``'s train step (and GRPO's sampler) for ``topology``'s devices."""
    mesh = run_mesh(config, devices=list(topology.devices))
    rules = merged_rules(config.mesh.rules)
    with use_rules(rules):
        # Outside set_mesh: optax builds its state tree eagerly, and TPU topology devices
        # cannot run anything.
        run = abstract_run(config, mesh, rules)
    with jax.set_mesh(mesh), use_rules(rules), attention_platform(topology.platform):
        train = compile_train_step(run)
        sampler = compile_sampler(run) if config.task == "grpo" else None
        engine = compile_engine(run, topology.platform) if config.task == "grpo" else None
    params = bytes_per_device(run.state.params) + bytes_per_device(run.state.rest)
    opt_state = bytes_per_device(run.state.opt_state)
    ref = bytes_per_device(run.state.ref_params) if run.state.ref_params is not None else 0
    return MemoryPlan(
        topology=topology.name, device_kind=topology.device_kind,
        num_devices=topology.num_devices, mesh={k: int(v) for k, v in mesh.shape.items()},
        params=params, opt_state=opt_state, ref_params=ref,
        batch=bytes_per_device(run.batch), train_step=train, sampler=sampler,
        sampler_resident=(opt_state + ref) if sampler is not None else 0,
        hbm=topology.hbm_bytes, engine=engine,
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


def suggestions(config, num_devices: int | None = None) -> list[tuple[str, list[str]]]:
    """Concrete changes that lower the peak, most effective first, as (why, overrides).
    With ``num_devices``, an MoE model also gets its expert/fsdp split: fewer expert
    shards first when it runs expert-parallel (memory), else, last, the balanced split
    of ``expert_split`` (traffic: smaller per-layer expert all-gathers)."""
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
    if plan.sampler is not None:
        rows += [
            ("sampler: arguments (params)", plan.sampler.argument),
            ("sampler: KV cache/temps", plan.sampler.temp),
            ("sampler: peak + resident opt/ref", plan.sampler.peak + plan.sampler_resident),
        ]
    if plan.engine is not None:
        rows += [
            (f"engine: KV page pool ({plan.engine.num_pages} pages of {plan.engine.page_size})",
             plan.engine.pool_bytes),
            ("engine: decode step peak", plan.engine.program.peak),
        ]
    rows += [("TOTAL (peak)", plan.total), (f"HBM per device ({plan.device_kind})", plan.hbm)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{plan.topology}: {plan.num_devices} devices, mesh {plan.mesh}"]
    lines += [f"  {name:<{width}}  {gib(value):10.3f} GiB" for name, value in rows]
    for name, program in (("train step", plan.train_step), ("sampler", plan.sampler)):
        if program is not None and program.out_of_memory:
            lines.append(f"  {name}: XLA could not fit it (figures are a lower bound): "
                         f"{program.out_of_memory}")
    if plan.engine is not None:
        lines.append(f"  engine: pool of {plan.engine.pool_tokens} tokens "
                     f"({plan.engine.bytes_per_token} B each); {plan.tokens_in_flight_fit()} "
                     "tokens in flight fit beside the idle train state")
    lines.append(f"  fits: {'yes' if plan.fits else 'NO'}"
                 f" ({100 * plan.total / max(plan.hbm, 1):.0f}% of memory)")
    return "\n".join(lines)


__all__ = [
    "EnginePlan", "MemoryPlan", "ProgramMemory", "compile_engine", "compile_sampler", "compile_train_step", "format_plan",
    "gib", "plan_memory", "suggestions",
]
