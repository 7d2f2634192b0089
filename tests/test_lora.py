"""LoRA: only adapters train, merged and PEFT exports match the adapted model, PEFT adapters
load both ways, the reference of DPO/GRPO is the base with adapters off (no copy), resume
is exact, and bad settings are errors naming the key."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from tiny import SFT_TINY, sft_overrides, train_rows

from jaxpt.checkpoint import Checkpointer
from jaxpt.config import ConfigError, load_config
from jaxpt.loop import run, setup, train
from jaxpt.models import from_pretrained
from jaxpt.models.lora import (
    LoRAParam,
    LoRASpec,
    adapted,
    adapter_sites,
    add_adapters,
    enable_dropout,
)
from jaxpt.state import num_params, reference_model

pytestmark = pytest.mark.usefixtures("one_device_runs")

RANK, ALPHA = 4, 8
IDS = np.array([[5, 17, 42, 99, 3, 64, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
# Every projection of the tiny Llama (hidden 32, 2 heads, 1 kv head of 16, mlp 64), 2 layers:
# rank * (in + out) per projection.
ALL_ADAPTER_PARAMS = 2 * RANK * (
    (32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32)
)
ATOL = 1e-5  # float32 logits of the same weights, jaxpt vs transformers (tests/test_models)


@nnx.jit
def _forward(model, ids):
    return model(ids)


def jax_logits(model, mesh, ids=IDS) -> np.ndarray:
    with jax.set_mesh(mesh):
        return np.asarray(_forward(model, ids))


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def hf_base(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def lora_overrides(output_dir, model_path, **extra):
    return sft_overrides(output_dir, model_path, **{
        "model.dtype": "float32", "data.eval": "null", "train.log_every": 1,
        "checkpoint.every": 2, "optim.lr": 1e-2, "optim.warmup_steps": 0,
        "lora.rank": RANK, "lora.alpha": ALPHA, **extra,
    })


def base_params(model_dir):
    return nnx.state(from_pretrained(model_dir), nnx.Param)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_dir, one_device_runs):
    """Four SFT steps with LoRA (dropout on), both exports; (run, result)."""
    out = str(tmp_path_factory.mktemp("lora_sft"))
    config = load_config(SFT_TINY, lora_overrides(out, tiny_dir, **{
        "train.max_steps": 4, "lora.dropout": 0.1, "lora.export": "both",
    }))
    with setup(config) as prepared:
        result = train(prepared)
    return prepared, result


def test_sft_trains_only_the_adapters(sft_run, tiny_dir):
    prepared, result = sft_run
    state = prepared.state
    assert result.summary["params"] == ALL_ADAPTER_PARAMS == num_params(state.params)
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(state.params))
    # The optimizer holds moments of the adapters only.
    assert num_params(state.opt_state) <= 2 * ALL_ADAPTER_PARAMS + 16
    base = nnx.to_flat_state(base_params(tiny_dir))
    frozen = dict(nnx.to_flat_state(nnx.filter_state(state.rest, nnx.Param)))
    assert len(base) == len(frozen)
    for path, value in base:
        np.testing.assert_array_equal(np.asarray(frozen[path][...]), np.asarray(value[...]))
    sites = adapter_sites(state.model())
    assert len(sites) == 2 * 7  # one per layer of each projection, sharing stacked adapters
    b_norms = [float(np.abs(np.asarray(lora.b[...][layer])).max()) for lora, layer in sites.values()]
    assert min(b_norms) > 0  # every layer's B moved off its zero init


def test_checkpoint_holds_adapters_not_the_base(sft_run):
    _, result = sft_run
    checkpointer = Checkpointer(result.checkpoint_dir)
    saved = checkpointer.manager.metadata(4).item_metadata["state"]
    checkpointer.close()
    names = list(jax.tree_util.tree_flatten_with_path(saved)[0])
    flat = [jax.tree_util.keystr(path) for path, _ in names]
    assert any("lora" in n for n in flat)
    assert not [n for n in flat if n.endswith("'weight']")], flat


def test_merged_export_matches_the_adapted_model(sft_run):
    prepared, result = sft_run
    ours = jax_logits(prepared.state.model(), prepared.mesh)
    theirs = hf_logits(hf_base(result.hf_dir))
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)


def test_peft_export_loads_in_peft_with_the_same_logits(sft_run, tiny_dir):
    prepared, result = sft_run
    adapter_dir = os.path.join(result.output_dir, "adapter")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == RANK
    assert config["lora_alpha"] == ALPHA and config["task_type"] == "CAUSAL_LM"
    assert config["lora_dropout"] == 0.1 and config["bias"] == "none"
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (RANK, 32) and b.shape == (16, RANK)
    import peft  # here, not at collection: it imports much of transformers

    model = peft.PeftModel.from_pretrained(hf_base(tiny_dir), adapter_dir).eval()
    ours = jax_logits(prepared.state.model(), prepared.mesh)
    np.testing.assert_allclose(hf_logits(model), ours, atol=ATOL, rtol=0)
    # The adapters matter: the base alone is far from the adapted model.
    assert np.abs(hf_logits(hf_base(tiny_dir)) - ours).max() > 100 * ATOL


def test_resume_with_lora_is_exact(sft_run, tmp_path, tiny_dir):
    _, full = sft_run
    out = str(tmp_path / "resumed")
    config = load_config(SFT_TINY, lora_overrides(out, tiny_dir, **{
        "train.max_steps": 4, "lora.dropout": 0.1, "export.hf": "false",
    }))
    assert run(config, stop_after_step=2).step == 2
    assert run(config).step == 4
    a, b = train_rows(full.output_dir), train_rows(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "tokens"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_training_continues_from_our_own_adapter(sft_run, tmp_path, tiny_dir):
    prepared, result = sft_run
    config = load_config(SFT_TINY, lora_overrides(str(tmp_path), tiny_dir, **{
        "train.max_steps": 1, "lora.rank": 0, "lora.alpha": "null",
        "lora.init_adapter": os.path.join(result.output_dir, "adapter"),
    }))
    with setup(config) as resumed:
        assert num_params(resumed.state.params) == ALL_ADAPTER_PARAMS
        for path, value in nnx.to_flat_state(resumed.state.params):
            np.testing.assert_array_equal(
                np.asarray(value[...]),
                np.asarray(dict(nnx.to_flat_state(prepared.state.params))[path][...]),
            )


@pytest.fixture(scope="module")
def peft_written_adapter(tmp_path_factory, tiny_dir):
    """An adapter written by peft itself on q_proj/v_proj, with random non-zero B."""
    import peft

    torch.manual_seed(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(hf_base(tiny_dir), config).eval()
    path = str(tmp_path_factory.mktemp("peft_adapter"))
    model.save_pretrained(path)
    return path, hf_logits(model)


def test_adapter_written_by_peft_loads_with_the_same_logits(peft_written_adapter, tmp_path,
                                                            tiny_dir):
    adapter_dir, expected = peft_written_adapter
    config = load_config(SFT_TINY, lora_overrides(str(tmp_path), tiny_dir, **{
        "train.max_steps": 1, "lora.rank": 0, "lora.alpha": "null",
        "lora.init_adapter": adapter_dir,
    }))
    with setup(config) as prepared:
        model = prepared.state.model()
        assert sorted(adapted(model)) == [
            f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
        ]
        np.testing.assert_allclose(jax_logits(model, prepared.mesh), expected, atol=ATOL, rtol=0)


def test_adapter_that_does_not_fit_is_an_error_naming_it(peft_written_adapter, tmp_path,
                                                         tiny_dir):
    adapter_dir, _ = peft_written_adapter
    base = lora_overrides(str(tmp_path), tiny_dir, **{
        "train.max_steps": 1, "lora.init_adapter": adapter_dir,
    })
    with pytest.raises(ConfigError, match=r"'lora.rank' \(8\) differs from the adapter's \(4\)"):
        setup(load_config(SFT_TINY, base + ["lora.rank=8"]))
    # Our targets adapt more projections than the file holds weights for.
    with pytest.raises(ConfigError, match=r"lora.init_adapter.*no tensor for .*k_proj\.lora_A"):
        setup(load_config(SFT_TINY, base + ["lora.targets=[q_proj,k_proj,v_proj]"]))


def test_grpo_with_lora_keeps_no_reference_copy(tmp_path, tiny_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n"
                               for i in range(16)))
    values = {
        "task": "grpo", "output_dir": str(tmp_path / "grpo"), "model.path": tiny_dir,
        "model.dtype": "float32", "data.train": str(prompts), "data.eval": "null",
        "train.max_steps": 1, "train.batch_size": 8, "grpo.num_generations": 4,
        "grpo.max_prompt_length": 16, "grpo.max_completion_length": 8, "grpo.beta": 0.1,
        "grpo.rewards": "[{name: math}]",
        "logging.progress": "false", "logging.tensorboard": "false", "export.hf": "false",
        "lora.rank": RANK, "lora.alpha": ALPHA, "lora.targets": "[q_proj,v_proj]",
    }
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    with setup(config) as prepared:
        state = prepared.state
        assert state.ref_params is None
        adapter_count = 2 * RANK * ((32 + 32) + (32 + 16))  # q_proj, v_proj
        assert num_params(state.params) == adapter_count
        # Params in the whole train state: the base once, the adapters and their moments.
        base_count = num_params(base_params(tiny_dir))
        assert num_params(nnx.filter_state(state.rest, nnx.Param)) == base_count
        batch, _ = prepared.source.next(state)
        state, metrics = prepared.jit_step(batch)(state, prepared.put_batch(batch))
        assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
        # Non-zero adapters: the policy leaves the base, its reference stays on it.
        model = state.model()
        for lora in adapted(model).values():
            lora.b[...] = lora.b[...] * 0 + 0.05  # keeps its sharding
        policy = jax_logits(model, prepared.mesh)
        reference = jax_logits(reference_model(model, None), prepared.mesh)
        base = jax_logits(from_pretrained(tiny_dir, mesh=prepared.mesh), prepared.mesh)
        np.testing.assert_array_equal(reference, base)
        assert np.abs(policy - base).max() > 1e-3


def test_dpo_with_lora_keeps_no_reference_copy_and_steps(tmp_path, tiny_dir):
    values = {
        "task": "dpo", "output_dir": str(tmp_path), "model.path": tiny_dir,
        "model.dtype": "float32", "data.train": "arithmetic", "data.eval": "null",
        "data.seq_len": 80, "data.arithmetic.num_train": 32, "train.max_steps": 1,
        "train.batch_size": 8, "dpo.precompute_ref": "false", "logging.progress": "false",
        "logging.tensorboard": "false", "lora.rank": RANK, "lora.targets": "'self_attn'",
    }
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    with setup(config) as prepared:
        state = prepared.state
        assert state.ref_params is None
        assert num_params(state.params) == 2 * RANK * ((32 + 32) * 2 + (32 + 16) * 2)
        batch, _ = prepared.source.next(state)
        state, metrics = prepared.jit_step(batch)(state, prepared.put_batch(batch))
        # Adapters start at zero: the policy is its reference, every margin is 0.
        np.testing.assert_allclose(float(metrics["loss"]), np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize(("override", "message"), [
    ("lora.rank=-1", "'lora.rank' must be >= 0"),
    ("lora.dropout=1.0", r"'lora.dropout' must be in \[0, 1\)"),
    ("lora.alpha=0", "'lora.alpha' must be > 0"),
    ("lora.export=gguf", "'lora.export' must be one of"),
    ("lora.targets='('", "'lora.targets': bad regex"),
    ("lora.targets=[]", "'lora.targets' must be a regex or a non-empty list"),
    ("lora.init_adapter=/no/such/adapter", "'lora.init_adapter'.*not a directory"),
    ("lora.rnak=4", "unknown config key 'lora.rnak'; did you mean 'lora.rank'"),
])
def test_bad_lora_config_names_the_key(override, message, tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match=message):
        load_config(SFT_TINY, lora_overrides(str(tmp_path), tiny_dir) + [override])


def test_targets_matching_nothing_is_an_error(tmp_path, tiny_dir):
    config = load_config(SFT_TINY, lora_overrides(str(tmp_path), tiny_dir, **{
        "train.max_steps": 1, "lora.targets": "'layers\\.7\\.'",
    }))
    with pytest.raises(ConfigError, match=r"'lora.targets'.*match no projection.*model\.layers"):
        setup(config)


@nnx.jit
def _set_b(model, value):
    for lora in adapted(model).values():
        lora.b[...] = lora.b[...] * 0 + value


@nnx.jit
def _forward_with_dropout(model, key, ids):
    """A train step's forward: a copy of ``model`` (the key stays in this step) with dropout."""
    model = nnx.merge(*nnx.split(model), copy=True)
    enable_dropout(model, key)
    return model(ids)


def test_dropout_acts_in_train_steps_only(tiny_dir, mesh1):
    with jax.set_mesh(mesh1):
        model = from_pretrained(tiny_dir, mesh=mesh1)
        add_adapters(model, LoRASpec(RANK, ALPHA, dropout=0.5, targets=("q_proj",)), seed=0,
                     mesh=mesh1)
        _set_b(model, 0.05)
        plain = np.asarray(_forward(model, IDS))
        np.testing.assert_array_equal(np.asarray(_forward(model, IDS)), plain)  # no key: no dropout
        dropped = [np.asarray(_forward_with_dropout(model, jax.random.key(seed), IDS))
                   for seed in (0, 1)]
        assert np.abs(dropped[0] - plain).max() > 1e-4
        assert np.abs(dropped[0] - dropped[1]).max() > 1e-4


def test_adapters_on_some_layers_export_only_those(tiny_dir, mesh1, tmp_path):
    """Stacked layers keep stacked adapters; a layer the targets skip holds zeros that the
    forward ignores and the PEFT export leaves out."""
    from jaxpt.models.peft_io import write_adapter

    with jax.set_mesh(mesh1):
        model = from_pretrained(tiny_dir, mesh=mesh1, scan_layers=True)
        paths = add_adapters(model, LoRASpec(RANK, ALPHA, targets=r"layers\.1\.self_attn\.q_proj"),
                             seed=0, mesh=mesh1)
        assert paths == ["model.layers.1.self_attn.q_proj"] == list(adapted(model))
        lora = model.model.layers.self_attn.q_proj.lora
        assert lora.a.shape == (2, 32, RANK) and lora.layers == (1,)
        assert not np.asarray(lora.a[...][0]).any()
        lora.b[...] = lora.b[...] * 0 + 0.05
        ours = jax_logits(model, mesh1)
        write_adapter(model, str(tmp_path), base_model=tiny_dir, dropout=0.0)
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(tensors) == [
        f"base_model.model.model.layers.1.self_attn.q_proj.lora_{side}.weight" for side in "AB"
    ]
    import peft

    theirs = hf_logits(peft.PeftModel.from_pretrained(hf_base(tiny_dir), str(tmp_path)).eval())
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
