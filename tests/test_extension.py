"""Extending jaxpt from a user's own modules, outside the package: a task and a model family
(tests/plugins/jaxpt_ext_demo) registered on import, brought in by a config's ``imports``,
trained by name through the train CLI's ``main`` (what ``python -m jaxpt.train`` runs; the
shim itself is test_cli's) and from Python, exported and read back."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from flax import nnx
from tiny import ROOT, TINY, train_rows

import jaxpt.models as jm
from jaxpt import config as config_lib
from jaxpt import tasks as tasks_lib
from jaxpt.cli.train import main as train_main
from jaxpt.config import ConfigError, load_config
from jaxpt.models import families
from jaxpt.models.safetensors_io import SafetensorsFile

PLUGINS = os.path.join(ROOT, "tests", "plugins")
TASK_YAML = os.path.join(PLUGINS, "smoothed_sft.yaml")
ARCH_YAML = os.path.join(PLUGINS, "tiny_gelu.yaml")
TINY_GELU = {
    **TINY, "architectures": ["TinyGeluForCausalLM"], "model_type": "tiny_gelu",
    "hidden_act": "gelu_pytorch_tanh",
}
IDS = np.arange(12, dtype=np.int32).reshape(2, 6) * 7 % 128
pytestmark = pytest.mark.usefixtures("one_device_runs")
_REGISTRIES = []  # the task and family registries before this module


def _forget_plugins():
    """The registries as they were before this module, its plugin modules unimported."""
    for name in [m for m in sys.modules if m.split(".")[0] == "jaxpt_ext_demo"]:
        del sys.modules[name]
    saved_tasks, saved_families = _REGISTRIES
    tasks_lib.TASKS.clear()
    tasks_lib.TASKS.update(saved_tasks)
    families._FAMILIES.clear()
    families._FAMILIES.update(saved_families)


@pytest.fixture(scope="module", autouse=True)
def plugins_importable():
    """The plugin package on ``sys.path`` (as PYTHONPATH puts it for a process); the
    task and family registries as they were once the module is done."""
    _REGISTRIES[:] = [dict(tasks_lib.TASKS), dict(families._FAMILIES)]
    sys.path.insert(0, PLUGINS)
    yield
    sys.path.remove(PLUGINS)
    _forget_plugins()


@pytest.fixture(scope="module")
def gelu_dir(tmp_path_factory):
    """A random TinyGeluForCausalLM checkpoint with the shipped tokenizer."""
    import jaxpt_ext_demo.tiny_gelu  # noqa: F401  (registers the family)

    from jaxpt.data import load_tokenizer

    path = str(tmp_path_factory.mktemp("tiny_gelu"))
    jm.save_pretrained(jm.init_model(TINY_GELU, seed=0), path)
    load_tokenizer().save_pretrained(path)
    return path


def _train_cli(*args: str) -> int:
    """The exit status of ``python -m jaxpt.train ARGS``'s ``main``, run in this process
    (on one CPU device, ``one_device_runs``: in a subprocess, importing jax and compiling
    cost ~10 s more) as a fresh process would run it: the plugin modules not yet imported
    nor registered, so that the config's ``imports`` must bring them."""
    _forget_plugins()
    return train_main(list(args))


def _resume_in_process(output_dir: str, mesh, max_steps: int):
    """The run's saved config.yaml loaded from Python (its ``imports`` included) and
    trained on to ``max_steps``: ``jaxpt.loop.run`` on the test's one-device mesh. Returns
    the result and the trained model."""
    from jaxpt.loop import setup, train

    saved = load_config(os.path.join(output_dir, "config.yaml"))
    config = config_lib.replace(saved, f"train.max_steps={max_steps}")
    with setup(config, mesh=mesh) as run:
        result = train(run)
        state = run.state
        model = nnx.merge(state.graphdef, state.params, state.rest)
        logits = np.asarray(model(IDS))
    return saved, result, logits


def test_a_users_task_trains_by_name(tiny_dir, tmp_path):
    out = str(tmp_path / "run")
    assert _train_cli(
        "--config", TASK_YAML, f"output_dir={out}", f"model.path={tiny_dir}",
        "smoothed_sft.smoothing=0.2",
    ) == 0
    assert "jaxpt_ext_demo.smoothed_sft" in sys.modules  # the config's imports brought it
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval_loss" in r]
    assert evals and np.isfinite(evals[-1]["eval_loss"])  # the task's own evaluator

    # What a resumed run reads: the saved config brings its imports and task section.
    saved = load_config(os.path.join(out, "config.yaml"))
    assert saved.task == "smoothed_sft" and saved.imports == ["jaxpt_ext_demo.smoothed_sft"]
    assert saved.smoothed_sft.smoothing == 0.2


def test_a_users_model_family_trains_exports_and_reads_back(gelu_dir, tmp_path, mesh1):
    out = str(tmp_path / "run")
    assert _train_cli("--config", ARCH_YAML, f"output_dir={out}", f"model.path={gelu_dir}") == 0
    assert "jaxpt_ext_demo.tiny_gelu" in sys.modules
    assert len(train_rows(out)) == 3 and all(np.isfinite(r["loss"]) for r in train_rows(out))

    _, result, trained_logits = _resume_in_process(out, mesh1, max_steps=4)
    assert result.step == 4
    with open(os.path.join(result.hf_dir, "config.json")) as f:
        exported = json.load(f)
    assert exported["architectures"] == ["TinyGeluForCausalLM"]
    assert exported["model_type"] == "tiny_gelu"
    assert exported["hidden_act"] == "gelu_pytorch_tanh"
    names = SafetensorsFile(os.path.join(result.hf_dir, "model.safetensors")).keys()
    assert "model.layers.1.ffn.gate_proj.weight" in names  # the family's tensor names
    assert not any(".mlp." in name for name in names)

    reloaded = jm.from_pretrained(result.hf_dir)
    assert reloaded.config.architecture == "TinyGeluForCausalLM"
    assert reloaded.config.hidden_act == "gelu_pytorch_tanh" and reloaded.config.qk_norm
    np.testing.assert_allclose(np.asarray(reloaded(IDS)), trained_logits, rtol=1e-5, atol=1e-5)
    initial_logits = np.asarray(jm.from_pretrained(gelu_dir)(IDS))
    assert np.abs(initial_logits - trained_logits).max() > 1e-3  # the export is the trained one


def test_a_family_reads_its_config_and_its_flags_reach_the_model(gelu_dir):
    family = jm.get_family("TinyGeluForCausalLM")
    assert jm.SUPPORTED_ARCHITECTURES[:4] == (
        "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
    )
    assert "TinyGeluForCausalLM" in jm.SUPPORTED_ARCHITECTURES
    assert jm.get_family("TinyGeluForSequenceClassification") is family
    assert jm.get_family("Qwen3ForCausalLM").qk_norm and jm.get_family("Qwen2ForCausalLM").qkv_bias

    # Read by architecture alone: the family's config class stands in for transformers'.
    config = jm.config_from_hf({k: v for k, v in TINY_GELU.items() if k != "model_type"})
    assert (config.architecture, config.hidden_act, config.qk_norm) == (
        "TinyGeluForCausalLM", "gelu_pytorch_tanh", True,
    )
    assert type(jm.hf_config_from_dict(TINY_GELU)).__name__ == "TinyGeluConfig"
    with pytest.raises(jm.UnsupportedArchitectureError, match="'relu6'"):
        jm.config_from_hf({**TINY_GELU, "hidden_act": "relu6"})

    assert jm.register_family(family) is family  # again: a no-op
    with pytest.raises(ValueError, match="TinyGeluForCausalLM"):
        jm.register_family(dataclasses.replace(family, qk_norm=False))

    # The activation is the model's: the same weights with silu give other logits.
    model = jm.from_pretrained(gelu_dir)
    silu = jm.init_model(dataclasses.replace(model.config, hidden_act="silu"), seed=0)
    nnx.update(silu, nnx.state(model))
    assert np.abs(np.asarray(model(IDS)) - np.asarray(silu(IDS))).max() > 1e-4


def test_help_lists_the_configs_tasks_and_a_bad_import_names_key_and_module(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", TASK_YAML, "--help"])
    assert exit_info.value.code == 0
    assert "  smoothed_sft " in capsys.readouterr().out.split("tasks (config key 'task'):")[1]

    missing = "imports=[jaxpt_ext_demo.nope]"
    with pytest.raises(ConfigError, match=r"config key 'imports'.*'jaxpt_ext_demo\.nope'"):
        load_config(TASK_YAML, [missing])
    assert train_main(["--config", TASK_YAML, missing]) == 2
    assert "config error: config key 'imports'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'imports' must be a list of module names"):
        load_config(TASK_YAML, ["imports=jaxpt_ext_demo.smoothed_sft"])
    with pytest.raises(ConfigError, match=r"'smoothed_sft\.smoothing' must be in \[0, 1\)"):
        load_config(TASK_YAML, ["smoothed_sft.smoothing=1.5"])
