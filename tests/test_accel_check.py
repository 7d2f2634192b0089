"""The accelerator check (``python -m jaxpt.bench accel``) in its CPU mode: every phase
runs at tiny sizes and passes, its JSON and Markdown reports name each phase, and a phase
that fails or outruns its budget is recorded while the next one runs."""

import json
import time

import pytest

from jaxpt.bench import accel
from jaxpt.cli import bench

CHECKS = "attention,bf16_loss,paged_kernel,sharded_step"
BENCHMARKS = "sft,grpo,heavy_tail"


def test_the_phases_cover_checks_and_benchmarks():
    assert set(CHECKS.split(",")) | set(BENCHMARKS.split(",")) == set(accel.PHASES)


# Two halves, so that the suite's two workers run them side by side.
@pytest.mark.parametrize("phases", [CHECKS, BENCHMARKS])
def test_cpu_mode_runs_every_phase(phases, tiny_dir, tmp_path):
    args = bench.parse_args(["accel", "--model", tiny_dir, "--phases", phases,
                             "--out", str(tmp_path)])
    report = accel.run(args)
    assert report["size"] == "tiny" and report["environment"]["backend"] == "cpu"
    failures = {n: p.get("traceback") for n, p in report["phases"].items() if p["status"] != "ok"}
    assert report["failed"] == [] and not failures, failures
    assert list(report["phases"]) == phases.split(",")
    assert json.loads((tmp_path / "accel.json").read_text()) == report
    table = (tmp_path / "accel.md").read_text()
    for name in report["phases"]:
        assert f"| {name} | ok |" in table
    got = report["phases"]
    if phases == CHECKS:
        assert got["attention"]["implementations"] == ["xla", "splash"]
        assert got["attention"]["splash_bfloat16_grad_error"] < 0.06
        assert got["paged_kernel"]["kernel_error"] < 1e-4
        assert got["sharded_step"]["devices"] == 8  # the suite's emulated devices
        assert got["bf16_loss"]["step2_loss_error"] < 2e-2
    else:  # each phase holds its benchmark's whole JSON line
        assert {"tokens_per_s", "step_time_s", "mfu", "compile_s", "peak_rss_mb",
                "compiled_peak_bytes"} <= set(got["sft"])
        assert got["sft"]["tokens_per_s"] > 0 and got["sft"]["mfu"] is None  # no named peak
        assert {"step_time_s", "generate_s", "reward_s", "update_s", "peak_rss_mb",
                "phase_sum_s"} <= set(got["grpo"])
        assert got["grpo"]["generate_s"] > 0 and got["grpo"]["update_s"] > 0
        assert got["heavy_tail"]["recompiles"] == 0 and got["heavy_tail"]["useful_tokens"] > 0
        assert got["heavy_tail"]["transformers_device"] == "cpu"
        assert "| sft | ok |" in table and "peak_flops_source=none for 'cpu'" in table


def test_a_failed_or_late_phase_is_recorded_and_the_next_runs(tmp_path, monkeypatch, capsys):
    def broken(size, args):
        raise ValueError("kernel disagrees")

    def slow(size, args):
        time.sleep(5)
        return {}

    monkeypatch.setattr(accel, "PHASES", {"broken": broken, "slow": slow,
                                          "fine": lambda size, args: {"figure": 1.5}})
    budgets = {"broken": 10, "slow": 0.2, "fine": 10}
    monkeypatch.setitem(accel.SIZES, "tiny", accel.SIZES["tiny"].__class__(
        **{**accel.SIZES["tiny"].__dict__, "budgets": budgets}))
    assert bench.main(["accel", "--out", str(tmp_path)]) == 1  # a phase failed
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    phases = report["phases"]
    assert phases["broken"]["status"] == "failed"
    assert phases["broken"]["error"] == "ValueError: kernel disagrees"
    assert phases["slow"]["status"] == "timeout" and phases["slow"]["seconds"] < 4
    assert phases["fine"] == {"status": "ok", "figure": 1.5, "seconds": phases["fine"]["seconds"]}
    assert report["failed"] == ["broken", "slow"]
    table = (tmp_path / "accel.md").read_text()
    assert "| broken | failed |" in table and "ValueError: kernel disagrees" in table
    # Too little of the total budget left: the phase is skipped, not started.
    assert bench.main(["accel", "--out", str(tmp_path), "--total-budget", "1",
                       "--phases", "fine"]) == 0
    skipped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["phases"]["fine"]
    assert skipped["status"] == "skipped"
    with pytest.raises(SystemExit, match="unknown phases"):
        accel.run(bench.parse_args(["accel", "--phases", "nope", "--out", str(tmp_path)]))
