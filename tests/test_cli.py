"""The command-line entry points: eval, generate, train, quickstart and the benchmarks.

Most run ``main(argv)`` in this process (compiled programs are shared); the ``python -m``
shims are checked once each, and ``jaxpt.train`` and ``jaxpt.quickstart`` in real
subprocesses.
"""

import io
import json
import os
import runpy
import subprocess
import sys

import pytest
from tiny import one_device_env

from jaxpt.cli import bench
from jaxpt.cli import eval as eval_cli
from jaxpt.cli import generate as generate_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# -- eval --------------------------------------------------------------------------------------


def test_eval_arithmetic_prints_accuracy_json(tiny_dir, capsys):
    argv = ["--model", tiny_dir, "--task", "arithmetic", "-n", "4", "--max-new-tokens", "4"]
    assert eval_cli.main(argv) == 0
    result = last_json(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["n"] == 4 and result["task"] == "arithmetic"


def test_eval_operand_range_task_with_the_last_number_scorer(tiny_dir, capsys):
    argv = ["--model", tiny_dir, "-n", "-1", "--max-operand", "3", "--negative-answers",
            "--style", "answer", "--question", "What is {a} {op} {b}?", "--system", "",
            "--test-fraction", "0.4", "--scorer", "last_number", "--max-new-tokens", "2"]
    assert eval_cli.main(argv) == 0
    out = capsys.readouterr()
    result = last_json(out.out)
    assert 0 < result["n"] < 32 and 0.0 <= result["accuracy"] <= 1.0  # a 0..3 task's test split
    assert '"role": "system"' in out.err  # the examples carry the empty system turn
    assert eval_cli.main(argv[:-4] + ["--scorer", "no_such_reward"]) == 2
    assert "--scorer" in capsys.readouterr().err
    assert eval_cli.main(["--model", tiny_dir, "-n", "500", "--max-operand", "3"]) == 2
    assert "use -1 for all of them" in capsys.readouterr().err


def test_eval_data_file(tiny_dir, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"What is {a}+{a}?", "answer": str(2 * a)} for a in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_cli.main(["--model", tiny_dir, "--data", str(path), "--max-new-tokens", "4"]) == 0
    result = last_json(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["n"] == 3 and result["task"] == str(path)


def test_eval_data_without_answer_names_file_and_row(tiny_dir, tmp_path, capsys):
    path = tmp_path / "no_answer.jsonl"
    rows = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+2?"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_cli.main(["--model", tiny_dir, "--data", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"{path}: row 1 has no 'answer'" in captured.err
    assert captured.out == ""


# -- generate ----------------------------------------------------------------------------------


def _greedy_reply(model_dir: str, messages: list[dict], max_new_tokens: int) -> str:
    """The reply the library's batch ``generate`` gives, decoded as the CLI prints it."""
    from jaxpt.data import encode_prompt, eos_token_ids, tokenizer_for_model
    from jaxpt.models import load_model
    from jaxpt.sampling import generate

    tokenizer = tokenizer_for_model(model_dir)
    out = generate(
        load_model(model_dir),
        [encode_prompt(tokenizer, messages)],
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_ids(tokenizer, model_dir),
    )
    return tokenizer.decode(out.tokens[0], skip_special_tokens=True)


def test_generate_prints_the_greedy_completion(tiny_dir, capsys):
    argv = ["--model", tiny_dir, "--prompt", "What is 12+30?", "--max-new-tokens", "6"]
    assert generate_cli.main(argv) == 0
    printed = capsys.readouterr().out
    expected = _greedy_reply(tiny_dir, [{"role": "user", "content": "What is 12+30?"}], 6)
    assert expected  # the tiny random model says something
    assert printed == expected + "\n"


def test_generate_chat_reads_turns_from_stdin(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nWhat is 2+2?\n"))
    assert generate_cli.main(["--model", tiny_dir, "--chat", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 3  # two turns, then end of input
    first_reply = out.split("> ")[1].removesuffix("\n")
    assert first_reply == _greedy_reply(tiny_dir, [{"role": "user", "content": "Hi"}], 4)


# -- train -------------------------------------------------------------------------------------


def _python_m(*args: str) -> subprocess.CompletedProcess:
    env = one_device_env()
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        check=False,
    )


def test_train_help_and_bad_key(capsys):
    """In-process (``python -m jaxpt.train`` runs this ``main``: see the shims' test)."""
    from jaxpt.cli.train import main as train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    tasks = capsys.readouterr().out.split("tasks (config key 'task'):")[1]
    for task in ("sft", "rm", "dpo", "grpo"):
        assert f"  {task} " in tasks
    assert train_main(["--config", SFT_TINY, "train.max_stepz=3"]) == 2
    stderr = capsys.readouterr().err
    assert "'train.max_stepz'" in stderr and "train.max_steps" in stderr


# runpy warns when the shim was imported before (test_config imports jaxpt.train).
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize(
    "module", ["jaxpt.train", "jaxpt.generate", "jaxpt.eval", "jaxpt.quickstart", "jaxpt.bench",
               "jaxpt.serve"]
)
def test_python_m_shims_run_the_cli(module, monkeypatch, capsys):
    """``python -m <module> --help`` through the shim's ``__main__`` block, in-process."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert f"usage: python -m {module}" in capsys.readouterr().out


# -- quickstart --------------------------------------------------------------------------------

# Every stage: tiny batches, a handful of problems, no checkpoints or TensorBoard.
QUICK = [
    "--max-steps", "2", "train.batch_size=8", "train.eval_batches=1", "data.seq_len=64",
    "data.arithmetic.num_train=64", "data.arithmetic.num_test=8", "grpo.eval_prompts=8",
    "grpo.num_generations=2", "grpo.max_completion_length=8", "checkpoint.every=0",
    "logging.tensorboard=false", "logging.progress=false",
]


@pytest.mark.slow
def test_python_m_quickstart_smoke(tmp_path):
    """A real ``python -m jaxpt.quickstart`` (one CPU device: twice as fast as the 8 emulated
    ones of this process)."""
    done = _python_m("jaxpt.quickstart", "--output-dir", str(tmp_path / "qs"), *QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json(done.stdout)
    assert set(result) == {
        "sft_accuracy", "grpo_accuracy", "n", "reward_first_20", "reward_last_20", "sft_model",
        "grpo_model",
    }
    assert 0.0 <= result["sft_accuracy"] <= 1.0 and 0.0 <= result["grpo_accuracy"] <= 1.0
    # Two steps: both windows are the mean reward of those steps (the math reward, 0..1).
    assert 0.0 <= result["reward_first_20"] == result["reward_last_20"] <= 1.0
    assert result["n"] == 8
    for key in ("sft_model", "grpo_model"):
        assert os.path.isfile(os.path.join(result[key], "config.json")), key


# -- benchmarks --------------------------------------------------------------------------------

# sft and grpo run (with their keys checked) in the accelerator check's CPU mode,
# tests/test_accel_check.py.
BENCHES = {
    "generate": (
        ["--batch-size", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"],
        {"tokens_per_s", "run_s", "compile_s", "recompiles", "peak_rss_mb"},
    ),
    "rm": (
        ["--batch-size", "8", "--seq-len", "16", "--repeats", "1"],
        {"pairs_per_s", "train_pairs_per_s", "compile_s", "peak_rss_mb"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_prints_one_json_line(name, tiny_dir, capsys):
    argv, keys = BENCHES[name]
    assert bench.main([name, "--model", tiny_dir, *argv]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["benchmark"] == name and result["model"] == tiny_dir
    assert keys <= set(result), keys - set(result)


def test_bench_generate_heavy_tail_compares_engine_and_static_sampler(tiny_dir, capsys):
    assert bench.main(["generate", "--model", tiny_dir, "--workload", "heavy-tail",
                       "--requests", "10", "--batch-size", "4", "--prompt-len", "6",
                       "--mean-tokens", "6", "--max-tokens", "24", "--rounds", "1",
                       "--page-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["workload"] == "heavy-tail" and len(result["engine_tokens_per_s"]) == 1
    assert result["useful_tokens"] >= 10 and result["longest"] <= 24
    assert result["recompiles"] == 0 and result["speedup_vs_static"] > 0
    # The engine's KV is what its rows hold; the static sampler's, every row at full length.
    assert 0 < result["kv_peak_bytes"] <= result["kv_pool_bytes"]
    assert result["kv_peak_fraction"] < 1


def test_bench_serve_streams_concurrent_clients(tiny_dir):
    from jaxpt.bench import serve

    # Run directly (not through main and capsys): uvicorn's loggers outlive the capture.
    args = bench.parse_args(["serve", "--model", tiny_dir, "--clients", "4", "--requests",
                             "6", "--prompt-len", "5", "--max-tokens", "7", "--slots", "4"])
    result = serve.run(args)
    assert result["generated_tokens"] <= 6 * 7
    assert result["tokens_per_s"] > 0 and result["ttft_p50_ms"] > 0
    assert {"itl_p50_ms", "itl_p99_ms", "ttft_p99_ms"} <= set(result)


@pytest.mark.slow
def test_bench_generate_splits_the_batch_over_cpu_devices(tiny_dir, capsys):
    argv, _ = BENCHES["generate"]
    assert bench.main(["generate", "--model", tiny_dir, *argv, "--cpu-devices", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["recompiles"] == 0
