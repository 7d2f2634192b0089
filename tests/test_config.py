"""Config parsing: YAML + overrides into typed sections, and errors that name the key."""

import dataclasses
import os

import pytest

from jaxpt.config import ConfigError, load_config, replace, to_dict
from jaxpt.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")


def test_yaml_and_overrides_are_typed():
    config = load_config(SFT_TINY, ["train.max_steps=7", "optim.lr=1e-3", "mesh.rules.embed=null"])
    assert config.task == "sft"
    assert config.train.max_steps == 7 and isinstance(config.train.max_steps, int)
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.data.train == "arithmetic"
    assert config.mesh.rules == {"embed": None}
    assert config.sft.z_loss == 0.0
    again = load_config(None, values=to_dict(config))
    assert again == config
    assert replace(config, "seed=3").seed == 3


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("trian.max_steps=3", "did you mean 'train'?"),
        ("train.max_step=3", "did you mean 'train.max_steps'?"),
        ("train.max_steps=abc", "bad value for config key 'train.max_steps'"),
        ("optim.schedule=cosin", "did you mean 'cosine'?"),
        ("task=sfft", "unknown task 'sfft'"),
        ("train.batch_size=6", "divisible by 'train.grad_accum_steps'"),
        (
            "data.arithmetic.dropped_carry_rate=2",
            "config section 'data.arithmetic': dropped_carry_rate must be in [0, 1]",
        ),
        (
            "output_dir=gs://bucket/run",
            "config key 'output_dir' ('gs://bucket/run') must be a local path",
        ),
    ],
)
def test_errors_name_the_key(override, expected):
    extra = ["train.grad_accum_steps=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as info:
        load_config(SFT_TINY, [override, *extra])
    assert expected in str(info.value)


def test_missing_required_keys():
    with pytest.raises(ConfigError, match="missing required config key 'output_dir'"):
        load_config(None, ["data.train=x.jsonl", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="'train.max_steps'"):
        load_config(None, ["data.train=x.jsonl", "output_dir=o"])


def test_cli_help_lists_tasks_and_reports_config_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "sft" in out and "supervised fine-tuning" in out
    assert main(["--config", SFT_TINY, "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_the_schema_follows_the_task_registry(monkeypatch):
    """A task registered after jaxpt was imported gets its section and its ``task`` value
    at the next load; a name that would shadow a root key is refused when configs load."""
    from jaxpt import tasks

    @dataclasses.dataclass(frozen=True)
    class EchoConfig:
        repeat: int = 1

    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    with pytest.raises(ConfigError, match=r"unknown task 'echo'.*config key 'imports'"):
        load_config(SFT_TINY, ["task=echo"])
    echo = tasks.register_task(
        dataclasses.replace(tasks.get_task("sft"), name="echo", config_cls=EchoConfig)
    )
    config = load_config(SFT_TINY, ["task=echo", "echo.repeat=3"])
    assert (config.task, config.echo.repeat, config.imports) == ("echo", 3, [])
    assert "echo" in tasks.available_tasks() and tasks.config_sections()["echo"] is EchoConfig
    assert load_config(None, values=to_dict(config)) == config

    assert tasks.register_task(echo) is echo  # again: a no-op
    assert tasks.register_task("jaxpt.tasks.sft") is tasks.get_task("sft")
    with pytest.raises(ValueError, match="'sft' is already registered"):
        tasks.register_task(dataclasses.replace(echo, name="sft"))
    with pytest.raises(ValueError, match="identifier"):
        tasks.register_task(dataclasses.replace(echo, name="my-task"))
    tasks.register_task(dataclasses.replace(echo, name="model"))
    with pytest.raises(ConfigError, match="would replace the root config key 'model'"):
        load_config(SFT_TINY)


def test_imports_must_be_module_names_that_import():
    with pytest.raises(ConfigError, match=r"config key 'imports': cannot import module 'no_such"):
        load_config(SFT_TINY, ["imports=[no_such_module_here]"])
    with pytest.raises(ConfigError, match="'imports' must be a list of module names"):
        load_config(SFT_TINY, ["imports=[1]"])
    config = load_config(SFT_TINY, ["imports=[json]"])
    assert config.imports == ["json"] and to_dict(config)["imports"] == ["json"]


GRPO_ARITH = os.path.join(ROOT, "configs", "grpo_arith.yaml")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.batch_size=30", "'train.batch_size' (30) counts completions"),
        ("grpo.loss_type=ppo", "config key 'grpo.loss_type' must be one of"),
        ("grpo.importance_level=seq", "config key 'grpo.importance_level'"),
        ("grpo.temperature=0", "config key 'grpo.temperature' must be > 0"),
        ("grpo.num_generations=0", "config key 'grpo.num_generations' must be >= 1"),
        ("grpo.rewards=[{name: no_such_reward}]", "config key 'grpo.rewards'"),
        ("grpo.max_sampling_rounds=3", "it needs 'grpo.dynamic_sampling: true'"),
        ("grpo.advantage_estimator=gae", "config key 'grpo.advantage_estimator' must be one of"),
    ],
)
def test_grpo_options_are_checked_when_the_config_loads(override, expected):
    # A ConfigError from load_config: before any model, tokenizer or data is touched.
    with pytest.raises(ConfigError) as info:
        load_config(GRPO_ARITH, ["output_dir=unused", override])
    assert expected in str(info.value)


def test_advantage_estimator_combinations_are_checked():
    from jaxpt.tasks.grpo import GrpoConfig

    with pytest.raises(ConfigError, match="'grpo.advantage_estimator'.*num_generations' >= 2"):
        GrpoConfig(advantage_estimator="rloo", num_generations=1)
    assert GrpoConfig(advantage_estimator="rloo", num_generations=2).advantage_estimator == "rloo"


@pytest.mark.parametrize("name", ["dpo", "rm"])
def test_examples_never_fall_back_to_a_random_model(tmp_path, monkeypatch, name):
    """The RM/DPO examples start from the quickstart's SFT model: without it, the run stops
    with an error that says how to make it (never a silent random init)."""
    from jaxpt.loop import run

    monkeypatch.chdir(tmp_path)  # no runs/quickstart here
    config = load_config(os.path.join(ROOT, "configs", f"{name}_tiny.yaml"))
    assert config.model.path == "runs/quickstart/sft/hf"
    with pytest.raises(ConfigError) as info:
        run(config)
    message = str(info.value)
    assert "model.path" in message and "make quickstart" in message
    assert not os.path.exists(tmp_path / f"runs/{name}_tiny/checkpoints")
