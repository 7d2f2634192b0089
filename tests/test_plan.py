"""`python -m jaxpt.plan`: per-device memory of the real train step, checked by hand."""

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest

from jaxpt.cli.plan import main as plan_main
from jaxpt.config import ConfigError, load_config
from jaxpt.planning.memory import format_plan, plan_memory
from jaxpt.planning.topology import TopologyError, get_topology, libtpu_available, parse_spec

# Every dimension divides 8, so each param with an `embed` axis shards 8 ways over fsdp.
V, D, F, L, N, K, H = 256, 64, 128, 2, 4, 2, 16
B, T = 16, 32
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
    "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
    "num_attention_heads": N, "num_key_value_heads": K, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256, "tie_word_embeddings": False, "hidden_act": "silu",
}


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan")
    (path / "model").mkdir()
    (path / "model" / "config.json").write_text(json.dumps(TINY))
    (path / "sft.yaml").write_text(
        f"task: sft\noutput_dir: {path / 'out'}\n"
        f"model: {{path: {path / 'model'}, dtype: float32, param_dtype: float32}}\n"
        f"data: {{train: arithmetic, seq_len: {T}}}\n"
        f"train: {{max_steps: 10, batch_size: {B}}}\n"
    )
    return path


@pytest.fixture(scope="module")
def sft_plan(tiny_config_dir):
    config = load_config(str(tiny_config_dir / "sft.yaml"))
    return plan_memory(config, get_topology("cpu:8", hbm_gib=1.0))


def test_sft_plan_matches_a_hand_count_on_cpu8(sft_plan):
    sharded = 2 * V * D + L * (N * H * D + 2 * K * H * D + D * N * H + 3 * D * F)
    replicated = (2 * L + 1) * D  # RMSNorm weights: no embed axis
    params = 4 * (sharded // 8 + replicated)
    assert sft_plan.params == params
    # AdamW: two float32 moments per param, plus a few int32 counters.
    assert 0 <= sft_plan.opt_state - 2 * params <= 64
    batch = 5 * 4 * B * T // 8  # five [B, T] 4-byte arrays, rows split 8 ways
    assert sft_plan.batch == batch
    step = sft_plan.train_step
    # XLA's argument bytes: state (params, moments, step, rng) + this device's batch rows.
    state = sft_plan.params + sft_plan.opt_state + 4 + 8
    assert step.argument == state + batch
    # The state is donated: the new one is written over it.
    assert step.alias == state
    # Activations: at least the float32 logits of this device's rows and their gradient.
    assert step.temp >= 2 * 4 * (B // 8) * T * V
    assert sft_plan.total == step.argument + step.output - step.alias + step.temp + (
        step.generated_code
    )
    assert sft_plan.hbm == 1024**3 and sft_plan.fits == (sft_plan.total <= 1024**3)
    assert sft_plan.mesh == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}


def test_cli_prints_json_and_suggests_when_it_does_not_fit(tiny_config_dir, capsys):
    code = plan_main([
        "--config", str(tiny_config_dir / "sft.yaml"), "--topology", "cpu:8",
        "--hbm-gib", "0.001", "--no-recheck", "model.remat=none",
    ])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["fits"] is False and result["topology"] == "cpu:8"
    assert result["total"] > result["hbm"] == int(0.001 * 1024**3)
    overrides = [s["overrides"] for s in result["suggestions"]]
    assert ["model.remat=full"] in overrides
    assert ["train.logits_chunk_size=512"] in overrides
    assert any("fits: NO" in line for line in lines)


def test_grpo_plan_compiles_the_sampler_and_keeps_state_resident(tiny_config_dir):
    config = load_config(str(tiny_config_dir / "sft.yaml"), [
        "task=grpo", "train.batch_size=16", "grpo.num_generations=4",
        "grpo.max_prompt_length=8", "grpo.max_completion_length=8", "grpo.beta=0.1",
    ])
    plan = plan_memory(config, get_topology("cpu:8"))
    assert plan.sampler is not None
    assert plan.ref_params == plan.params  # beta > 0 keeps a frozen copy, sharded alike
    assert plan.sampler_resident == plan.opt_state + plan.ref_params
    # The sampler reads the policy's params (plus the prompts).
    assert plan.sampler.argument >= plan.params
    assert plan.total >= plan.sampler.peak + plan.sampler_resident


def test_grpo_plan_sizes_the_page_pool_and_compiles_the_tpu_engine_step(tiny_config_dir):
    """On a v5e slice the engine's decode call compiles with the ragged paged attention
    kernel (head_dim 128, the kernel's tile) and its pool is every rollout row at its full
    length, counted by hand."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = get_topology("v5e:2x4")
    except TopologyError as error:
        pytest.skip(f"libtpu cannot describe v5e:2x4 here: {error}")
    model_dir = tiny_config_dir / "model128"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({**TINY, "head_dim": 128}))
    config = load_config(str(tiny_config_dir / "sft.yaml"), [
        "task=grpo", f"model.path={model_dir}", "train.batch_size=16",
        "grpo.num_generations=4", "grpo.max_prompt_length=24", "grpo.max_completion_length=40",
    ])
    plan = plan_memory(config, topology)
    engine = plan.engine
    assert engine.layout == "combined" and engine.program.generated_code > 0
    pages_per_row = (24 + 40) // engine.page_size
    assert engine.num_pages == 16 * pages_per_row + 1
    # [pages, page, 2 x kv heads, head_dim] float32 per layer.
    assert engine.bytes_per_token == L * 2 * K * 128 * 4
    assert engine.pool_bytes == engine.num_pages * engine.page_size * engine.bytes_per_token
    assert 0 < plan.tokens_in_flight_fit() < plan.hbm // engine.bytes_per_token
    assert "engine: KV page pool" in format_plan(plan)


def test_a_reused_rollout_is_planned_with_its_reference_logprobs_in_the_batch(tiny_config_dir):
    """With num_iterations > 1 and a KL term the reference forward runs once per rollout,
    beside it: the planned train step takes the log-probs in its batch, as the run does."""
    from jaxpt.planning.abstract import abstract_batch
    from jaxpt.sharding import make_mesh

    grpo = [
        "task=grpo", "train.batch_size=16", "grpo.num_generations=4",
        "grpo.max_prompt_length=8", "grpo.max_completion_length=8", "grpo.beta=0.1",
    ]
    mesh = make_mesh()
    sft_yaml = str(tiny_config_dir / "sft.yaml")
    once = load_config(sft_yaml, [*grpo, "grpo.num_iterations=1"])
    reused = load_config(sft_yaml, [*grpo, "grpo.num_iterations=2"])
    assert "ref_logprobs" not in abstract_batch(once, mesh)
    assert abstract_batch(reused, mesh)["ref_logprobs"].shape == (16, 8)
    plan = plan_memory(reused, get_topology("cpu:8"))
    assert plan.ref_params == plan.params  # the frozen copy still lives in the state


def test_bad_topologies_and_tasks_are_clear_errors(tiny_config_dir, monkeypatch):
    assert parse_spec("v5p:2x2x2") == ("v5p", (2, 2, 2))
    with pytest.raises(TopologyError, match="KIND:SHAPE"):
        parse_spec("v5e-8")
    with pytest.raises(TopologyError, match="unknown kind 'v9'"):
        parse_spec("v9:2x2")
    with pytest.raises(TopologyError, match="needs 64 CPU devices"):
        get_topology("cpu:64")
    # A task whose batches nothing describes (a user's, say) cannot be planned.
    from jaxpt import run_spec
    from jaxpt.tasks import get_task

    unplanned = dataclasses.replace(get_task("rm"), batch_spec=None)
    monkeypatch.setattr(run_spec, "get_task",
                        lambda name: unplanned if name == "rm" else get_task(name))
    config = load_config(str(tiny_config_dir / "sft.yaml"), ["task=rm"])
    with pytest.raises(ConfigError, match="memory plans cover distill, dpo, grpo, kto, online_dpo, ppo, prm, sft, not 'rm'"):
        plan_memory(config, get_topology("cpu:8"))
    missing = load_config(str(tiny_config_dir / "sft.yaml"), ["model.path=/nonexistent"])
    with pytest.raises(ConfigError, match="model.path"):
        plan_memory(missing, get_topology("cpu:8"))


@pytest.mark.skipif(not libtpu_available(), reason="libtpu not installed (pip install jaxpt[tpu])")
def test_sft_plan_compiles_for_a_v5e_slice(tiny_config_dir, sft_plan):
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = get_topology("v5e:2x4")
    except TopologyError as error:
        pytest.skip(f"libtpu cannot describe v5e:2x4 here: {error}")
    assert topology.num_devices == 8 and topology.hbm_bytes == 16 * 1024**3
    plan = plan_memory(load_config(str(tiny_config_dir / "sft.yaml")), topology)
    # Sharded state bytes do not depend on the backend; activations do.
    assert (plan.params, plan.opt_state, plan.batch) == (
        sft_plan.params, sft_plan.opt_state, sft_plan.batch
    )
    # TPU layouts pad small arrays to tiles: at least the state and the batch.
    assert plan.train_step.argument >= plan.params + plan.opt_state + plan.batch
    assert plan.train_step.generated_code > 0 and plan.fits
    np.testing.assert_equal(plan.device_kind, "TPU v5 lite")


def test_a_program_xla_refuses_to_fit_is_reported_as_not_fitting():
    """The TPU compiler rejects a program whose temporaries exceed HBM; the plan reports
    that as "does not fit" with the figure the error gives, instead of failing."""
    import jax

    from jaxpt.planning.memory import _compile, _required_bytes

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (16.39G) exceeds available HBM (15.75G).")
    assert _required_bytes(message) == int(16.39 * 1024**3)
    assert _required_bytes("Used 17.5G of 15.75G hbm. Exceeded hbm capacity") == int(
        17.5 * 1024**3)

    class Refused:
        def lower(self, *args, **kwargs):
            return self

        def compile(self):
            raise jax.errors.JaxRuntimeError(message)

    state = jax.ShapeDtypeStruct((1024, 256), np.float32)
    program = _compile(Refused(), state, "static")
    assert program.out_of_memory and "16.39G" in program.out_of_memory
    assert program.argument == 1024 * 256 * 4
    assert program.peak == 1024 * 256 * 4 + int(16.39 * 1024**3)

    class Broken(Refused):
        def compile(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        _compile(Broken(), state)


def test_a_lora_plan_keeps_optimizer_state_for_the_adapters_alone(tiny_config_dir):
    config = load_config(str(tiny_config_dir / "sft.yaml"), [
        "task=grpo", "train.batch_size=16", "grpo.num_generations=4", "lora.rank=4",
        "grpo.max_prompt_length=8", "grpo.max_completion_length=8", "grpo.beta=0.1",
    ])
    plan = plan_memory(config, get_topology("cpu:8"))
    # Adapters on all 7 projections of both layers: A [in, 4] and B [4, out].
    in_out = (D + N * H) + 2 * (D + K * H) + (N * H + D) + 3 * (D + F)
    adam_bytes = 2 * L * 4 * in_out * 4  # two float32 moments
    assert adam_bytes // 8 <= plan.opt_state <= adam_bytes + 1024
    # The frozen base is still held (in the state's non-trained part) ...
    assert plan.params >= (2 * V * D + L * (D * (2 * N * H + 2 * K * H) + 3 * D * F)) * 4 // 8
    # ... and no reference copy: the reference is the base with its adapters off.
    assert plan.ref_params == 0
    assert plan.sampler is not None and plan.train_step.peak > 0


@pytest.mark.parametrize("task", ["sft", "grpo"])
def test_the_memory_bench_compiles_the_plans_train_step(tiny_config_dir, tmp_path, task):
    """``python -m jaxpt.bench memory`` reports the program a plan measures, which is the
    loop's: the same state (non-finite counters, reference), shardings, gradient
    accumulation and batch."""
    from jaxpt.bench import memory

    model = str(tiny_config_dir / "model")
    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    args = parser.parse_args([
        "--task", task, "--model", model, "--batch-size", "4", "--seq-len", "32",
        "--prompt-len", "8", "--new-tokens", "8", "--generations", "2", "--beta", "0.1",
        "--dtype", "float32", f"model.path={model}", "train.grad_accum_steps=2",
    ])
    figures = memory.run(args)
    plan = plan_memory(memory.run_config(args, str(tmp_path)), get_topology("cpu:1"))
    step = plan.train_step
    assert plan.ref_params == (plan.params if task == "grpo" else 0)
    assert (figures["compiled_argument_bytes"], figures["compiled_output_bytes"],
            figures["compiled_alias_bytes"], figures["compiled_temp_bytes"]) == (
        step.argument, step.output, step.alias, step.temp)
    assert figures["compiled_peak_bytes"] == step.peak - step.generated_code
    # The state's bytes include the two int32 counts of skipped steps.
    assert step.alias == plan.params + plan.ref_params + plan.opt_state + 4 + 8


def test_an_moe_plan_suggests_an_expert_fsdp_split(tiny_config_dir):
    from jaxpt.planning.memory import expert_split, suggestions

    # The divisor of experts and devices nearest sqrt(devices), the larger on a tie.
    assert [expert_split(128, n) for n in (8, 16, 32, 64)] == [4, 4, 8, 8]
    assert expert_split(8, 16) == 4 and expert_split(8, 64) == 8 and expert_split(0, 8) == 1
    sft = str(tiny_config_dir / "sft.yaml")
    moe = load_config(sft, ["model.path=qwen3-30b-a3b"])
    last = suggestions(moe, num_devices=32)[-1][1]
    assert last == ["mesh.data=1", "mesh.tensor=1", "mesh.expert=8", "mesh.fsdp=-1"]
    # Running expert-parallel: fewer expert shards (more fsdp) come first.
    split = dataclasses.replace(moe, mesh=dataclasses.replace(moe.mesh, expert=32, fsdp=1))
    assert "mesh.expert=16" in suggestions(split, num_devices=32)[0][1]
    for config, devices in ((moe, None), (load_config(sft), 8)):
        assert not any("mesh.expert" in " ".join(o) for _, o in suggestions(config, devices))


def test_a_split_grpo_plan_plans_each_side_on_its_own_devices(tiny_config_dir, capsys):
    """rl.train_devices=4 rl.rollout_devices=4 on cpu:8: the train step on a 4-device
    fsdp mesh, the sampler on a 4-device data-parallel mesh holding the whole policy as
    synced (float32, as trained), two copies of its params with max_staleness 1, and the
    weight sync's bytes counted by hand from the param shapes."""
    from jaxpt.run_spec import check_batch_fits_mesh, run_mesh

    split = ["rl.train_devices=4", "rl.rollout_devices=4"]
    grpo = ["task=grpo", "train.batch_size=16", "grpo.num_generations=4",
            "grpo.max_prompt_length=8", "grpo.max_completion_length=8"]
    sft_yaml = str(tiny_config_dir / "sft.yaml")
    # The batch must split over the train mesh only: 12 rows fit 4 train devices, not 8.
    topology = get_topology("cpu:8")
    for overrides, fits in ((split, True), ([], False)):
        config = load_config(sft_yaml, [*grpo, "train.batch_size=12", *overrides])
        mesh = run_mesh(config, list(topology.devices))
        if fits:
            check_batch_fits_mesh(config, mesh)
        else:
            with pytest.raises(ConfigError, match="train.batch_size"):
                check_batch_fits_mesh(config, mesh)

    code = plan_main(["--config", sft_yaml, "--topology", "cpu:8", "--hbm-gib", "1",
                      *grpo, *split, "rl.max_staleness=1"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    # Extended, not renamed: every colocated key is still there.
    for key in ("topology", "num_devices", "mesh", "params", "opt_state", "ref_params",
                "batch", "train_step", "sampler", "sampler_resident", "engine", "total",
                "fits", "train_step_peak", "sampler_peak", "hbm", "suggestions"):
        assert key in result
    assert result["num_devices"] == 8 and result["train_devices"] == 4
    assert result["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    rollout = result["rollout"]
    assert rollout["num_devices"] == 4 and rollout["device_ids"] == [4, 5, 6, 7]
    assert rollout["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    # Every policy version moves the float32 params; a non-LoRA policy has no rest.
    weights = 2 * V * D + L * (N * H * D + 2 * K * H * D + D * N * H + 3 * D * F)
    params = 4 * (weights + (2 * L + 1) * D)
    sync = rollout["sync"]
    assert (sync["params_bytes"], sync["rest_bytes"]) == (params, 0)
    # Data-parallel rollout mesh: each rollout device receives (and holds) all of it.
    assert sync["per_device_bytes"] == rollout["params"] == rollout["policy"] == params
    assert sync["seconds_per_version"] is None  # no interconnect figure for CPU
    # Train side: the params sharded 4 ways over fsdp (norms replicated).
    assert result["params"] == 4 * (weights // 4 + (2 * L + 1) * D)
    # max_staleness 1: version v samples while v + 1 lands.
    assert rollout["max_staleness"] == 1 and rollout["params_copies"] == 2
    assert result["sampler_resident"] == params
    assert result["sampler"]["argument"] >= params
    assert rollout["total"] == max(result["sampler_peak"] + params, rollout["sync_peak"])
    assert result["train_total"] == result["train_step_peak"]
    assert result["total"] == max(result["train_total"], rollout["total"])
    assert result["fits"] == (result["train_fits"] and rollout["fits"])
    assert "weight sync:" in out and "rollout side fits" in out
