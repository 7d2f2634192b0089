"""Multi-host training on JAX's multi-controller runtime: 2 processes x 4 CPU devices train
like 1 process x 8 devices on the same (data=2, fsdp=2, tensor=2) mesh (SFT and GRPO), a
2-process checkpoint resumes in 1 process, and SIGTERM on one host stops both at the same
saved step. Also the pieces on their own: mesh layout over hosts and slices (fake devices),
where the processes come from, and a gs:// checkpoint directory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny import (
    SFT_TINY,
    free_port,
    make_tiny_dir,
    one_device_env,
    sft_overrides,
    start_processes,
    train_rows,
    wait_processes,
)

from jaxpt.config import load_config
from jaxpt.distributed import distributed_args
from jaxpt.sharding import device_grid

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
GRPO_ARITH = os.path.join(ROOT, "configs", "grpo_arith.yaml")
WORKER = os.path.join(TESTS, "multihost_worker.py")
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
TIMEOUT_S = 900  # per launch: generous, compiling on a busy 2-core machine is slow


# ------------------------------------------------------------------ the launcher


def _start(processes: int, jobs: list, tmp_path, name: str) -> list[subprocess.Popen]:
    """``processes`` workers (8 // processes CPU devices each) running ``jobs`` together."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXPT_", "XLA_"))}
    env["XLA_FLAGS"] = one_device_env()["XLA_FLAGS"]  # the suite's compile settings
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    if processes > 1:
        env.update(JAXPT_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
                   JAXPT_NUM_PROCESSES=str(processes))
    # The suite's compilation cache, a directory per process count: a program compiled for
    # one layout of processes is never loaded in another.
    cache = os.path.join(os.environ.get("JAX_COMPILATION_CACHE_DIR", str(tmp_path)),
                         f"processes-{processes}")
    logs = [tmp_path / f"{name}_{i}.log" for i in range(processes)]
    return start_processes([sys.executable, WORKER, str(8 // processes), json.dumps(jobs), cache],
                           env, logs, ROOT)


def _wait(started: list[subprocess.Popen], tmp_path, name: str) -> list[str]:
    """Each worker's output, once all exited with 0 (else fail showing every log)."""
    logs = [tmp_path / f"{name}_{i}.log" for i in range(len(started))]
    return wait_processes(started, logs, TIMEOUT_S, f"{name}: a worker")


def _run(processes: int, jobs: list, tmp_path, name: str) -> list[str]:
    return _wait(_start(processes, jobs, tmp_path, name), tmp_path, name)


def _sft(out, model, **extra) -> list:
    values = {"train.max_steps": 3, "train.log_every": 1, "train.eval_batches": 1,
              "data.arithmetic.num_test": 16, "checkpoint.every": 2, "checkpoint.keep": 3,
              "checkpoint.async_save": "false", "optim.schedule": "constant", **MESH, **extra}
    return [SFT_TINY, sft_overrides(str(out), model, **values)]


def _grpo(out, model, prompts, **extra) -> list:
    values = {
        "output_dir": str(out), "model.path": model, "data.train": prompts, "data.eval": "null",
        "train.batch_size": 8, "train.max_steps": 2, "train.log_every": 1,
        "grpo.num_generations": 4, "grpo.max_prompt_length": 16,
        "grpo.max_completion_length": 8,
        "grpo.rewards": "[{fn: 'multihost_worker:digit_fraction'}]",
        "grpo.num_iterations": 2, "grpo.log_completions": 2, "grpo.eval_prompts": 0,
        "optim.lr": 3e-3, "logging.progress": "false", "logging.tensorboard": "false",
        "checkpoint.async_save": "false", **MESH, **extra,
    }
    return [GRPO_ARITH, [f"{k}={v}" for k, v in values.items()]]


def _params(hf_dir) -> dict:
    return load_file(os.path.join(hf_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same SFT and GRPO runs on 2 processes and on 1; then the 2-process SFT run's
    step-2 checkpoint resumed in 1 process. The 2 processes go on to a long SFT run (in
    ``stopped``) whose host 1, which writes no metrics, gets SIGTERM once host 0 logged a
    step: both should stop at one step (a job of its own would start two more processes)."""
    tmp = tmp_path_factory.mktemp("multihost")
    model = make_tiny_dir(str(tmp / "tiny"))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(16)
    ))
    stopped = tmp / "stopped"
    long_sft = _sft(stopped, model, **{"train.max_steps": 500, "checkpoint.every": 0})
    started = _start(2, [_sft(tmp / "sft2", model), _grpo(tmp / "grpo2", model, str(prompts)),
                         long_sft], tmp, "two")
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and all(p.poll() is None for p in started):
        if _logged_a_step(stopped):
            break
        time.sleep(0.2)
    started[1].send_signal(signal.SIGTERM)
    two = _wait(started, tmp, "two")
    resumed = tmp / "sft_resumed"
    shutil.copytree(tmp / "sft2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    shutil.rmtree(resumed / "hf")
    one = _run(1, [_sft(tmp / "sft1", model), _grpo(tmp / "grpo1", model, str(prompts)),
                   _sft(resumed, model)], tmp, "one")
    return types.SimpleNamespace(tmp=tmp, model=model, two=two, one=one, resumed=resumed,
                                 stopped=stopped)


# -------------------------------------------------------------- end to end


def _close(rows_a: list[dict], rows_b: list[dict], keys=("loss",)) -> None:
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert {k for k in keys if k in a} == {k for k in keys if k in b}
        for key in (k for k in keys if k in a):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4, err_msg=key)


@pytest.mark.slow
def test_sft_two_processes_match_one(runs):
    two, one = train_rows(str(runs.tmp / "sft2")), train_rows(str(runs.tmp / "sft1"))
    assert [r["step"] for r in one] == [1, 2, 3]
    # Same global batches: the same trained-token count every step, not just a close loss.
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    _close(two, one, keys=("loss", "grad_norm"))
    final_two, final_one = _params(runs.tmp / "sft2" / "hf"), _params(runs.tmp / "sft1" / "hf")
    assert final_two.keys() == final_one.keys()
    for name in final_one:
        np.testing.assert_allclose(final_two[name], final_one[name], rtol=1e-3, atol=1e-5,
                                   err_msg=name)
    evals = [[r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r] for d in (runs.tmp / "sft2", runs.tmp / "sft1")]
    _close(evals[0], evals[1], keys=("eval_loss",))
    assert sorted(os.listdir(runs.tmp / "sft2" / "checkpoints")) == ["2", "3"]


@pytest.mark.slow
def test_grpo_two_processes_match_one(runs):
    two, one = train_rows(str(runs.tmp / "grpo2")), train_rows(str(runs.tmp / "grpo1"))
    assert [r["step"] for r in one] == [1, 2]
    assert "reward" in one[0]  # step 2 reuses step 1's rollout (num_iterations=2)
    _close(two, one, keys=("loss", "grad_norm", "reward", "completion_length/mean"))
    # Only process 0 logs completions: one step's log_completions rows per rollout.
    for out in ("grpo2", "grpo1"):
        with open(runs.tmp / out / "completions.jsonl") as f:
            assert [json.loads(line)["step"] for line in f] == [1, 1]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one(runs):
    rows = train_rows(str(runs.resumed))
    assert [r["step"] for r in rows] == [1, 2, 3]
    _close(rows[2:], train_rows(str(runs.tmp / "sft1"))[2:])
    resumed, two = _params(runs.resumed / "hf"), _params(runs.tmp / "sft2" / "hf")
    for name in two:
        np.testing.assert_allclose(resumed[name], two[name], rtol=1e-3, atol=1e-5, err_msg=name)
    assert "resumed from" in runs.one[0]


def test_sigterm_on_one_host_stops_both_at_the_same_step(runs):
    stopped = [line for text in runs.two for line in text.splitlines()
               if line.startswith("preempted at step")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], runs.two
    step = int(stopped[0].split()[3].rstrip(";"))
    assert 1 <= step < 500
    assert os.listdir(runs.stopped / "checkpoints") == [str(step)]
    assert train_rows(str(runs.stopped))[-1]["step"] == step
    assert not (runs.stopped / "hf").exists()


def _logged_a_step(output_dir) -> bool:
    try:
        return bool(train_rows(str(output_dir)))
    except (OSError, ValueError):  # not there yet, or a line half written
        return False


# -------------------------------------------------------------- the pieces


class FakeDevice:
    def __init__(self, id, process_index, slice_index=None, platform="cpu"):
        self.id, self.process_index, self.platform = id, process_index, platform
        self.device_kind = platform
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"D{self.id}"


def _hosts(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index)(grid)


def test_device_grid_puts_data_across_hosts():
    # jax.devices() interleaves nothing here, but a host's devices must stay one data block
    # whatever order they come in.
    devices = [FakeDevice(i, p) for p in (1, 0) for i in range(4 * p, 4 * p + 4)]
    grid = device_grid([2, 2, 2], devices)
    assert grid.shape == (2, 2, 2)
    np.testing.assert_array_equal(_hosts(grid), [[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    # 4 hosts, data=2: data can't hold every host; hosts still fill whole fsdp blocks.
    devices = [FakeDevice(i, i // 2) for i in range(8)]
    np.testing.assert_array_equal(_hosts(device_grid([2, 2, 2], devices)),
                                  [[[0, 0], [1, 1]], [[2, 2], [3, 3]]])
    np.testing.assert_array_equal(_hosts(device_grid([4, 2, 1], devices))[:, 0, 0], [0, 1, 2, 3])


def test_device_grid_multislice_data_over_dcn():
    devices = [FakeDevice(i, i // 2, slice_index=i // 4) for i in range(8)]
    slices = lambda g: np.vectorize(lambda d: d.slice_index)(g)
    grid = device_grid([2, 4, 1], devices)
    np.testing.assert_array_equal(slices(grid)[:, :, 0], [[0, 0, 0, 0], [1, 1, 1, 1]])
    # dcn_data=1: the two slices split fsdp instead of data.
    grid = device_grid([2, 4, 1], devices, dcn_data=1)
    np.testing.assert_array_equal(slices(grid)[:, :, 0], [[0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="dcn_data=3"):
        device_grid([2, 4, 1], devices, dcn_data=3)
    with pytest.raises(ValueError, match="several TPU slices"):
        device_grid([2, 4, 1], [FakeDevice(i, 0) for i in range(8)], dcn_data=2)


def test_distributed_args_from_config_env_and_cluster():
    assert distributed_args(None, {}) is None  # one process: nothing to connect
    env = {"JAXPT_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAXPT_NUM_PROCESSES": "4",
           "JAXPT_PROCESS_ID": "2"}
    assert distributed_args(None, env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    section = load_config(SFT_TINY, ["output_dir=x", "distributed.process_id=3",
                                     "distributed.initialization_timeout=60"]).distributed
    assert distributed_args(section, env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        "initialization_timeout": 60}
    assert distributed_args(None, {**env, "JAXPT_NUM_PROCESSES": "1"}) is None
    with pytest.raises(ValueError, match="missing: distributed.process_id"):
        distributed_args(None, {k: v for k, v in env.items() if k != "JAXPT_PROCESS_ID"})
    with pytest.raises(ValueError, match=r"process_id \(4\) must be in \[0, num_processes=4\)"):
        distributed_args(None, {**env, "JAXPT_PROCESS_ID": "4"})
    # Clusters JAX sets up by itself: no arguments.
    assert distributed_args(None, {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == {}
    assert distributed_args(None, {"TPU_WORKER_HOSTNAMES": "h0"}) is None
    assert distributed_args(None, {"MEGASCALE_NUM_SLICES": "2"}) == {}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert distributed_args(None, slurm) == {}
    assert distributed_args(None, {**slurm, "SLURM_NTASKS": "1"}) is None


def test_gs_checkpoint_directory_passes_validation():
    from jaxpt.checkpoint import absolute_path
    from jaxpt.loop import checkpoint_directory

    config = load_config(SFT_TINY, ["output_dir=runs/sft",
                                    "checkpoint.directory=gs://bucket/runs/sft/checkpoints"])
    assert checkpoint_directory(config, "/abs/runs/sft") == "gs://bucket/runs/sft/checkpoints"
    default = load_config(SFT_TINY, ["output_dir=runs/sft"])
    assert checkpoint_directory(default, "/abs/runs/sft") == "/abs/runs/sft/checkpoints"
    assert absolute_path("runs/x") == os.path.join(os.getcwd(), "runs", "x")
