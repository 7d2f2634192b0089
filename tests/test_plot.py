"""``python -m jaxpt.plot``: training curves of run dirs and bars of eval results as PNGs."""

import json
import math
import os

import pytest
from PIL import Image

from jaxpt.cli import plot as plot_cli
from jaxpt.evals.plots import choose_metrics, ema_smooth, read_metrics, run_labels


def _fake_run(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def _grpo_like(path, scale):
    rows = [{"step": 0, "data/examples": 100.0}, {"step": 0, "eval_accuracy": 0.1}]
    rows += [
        {"step": s, "loss": scale / s, "reward": 0.1 * s, "kl": 0.01 * s, "accuracy": 0.05 * s,
         "completion_length/mean": 20.0 + s, "tokens_per_s": 1000.0, "grad_norm": "nan"}
        for s in range(1, 8)
    ]
    rows.append({"step": 7, "eval_accuracy": 0.5})
    return _fake_run(path, rows)


def _last(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plot_two_fake_runs_default_metrics(tmp_path, capsys):
    a = _grpo_like(tmp_path / "exp1" / "grpo", 1.0)
    b = _grpo_like(tmp_path / "exp2" / "grpo", 2.0)
    out = tmp_path / "curves.png"
    assert plot_cli.main([a, b, "--out", str(out)]) == 0
    drawn = _last(capsys)["metrics"]
    # Defaults: only metrics logged over time, in the preferred order; one-off rows left out.
    assert drawn == ["loss", "reward", "kl", "accuracy", "eval_accuracy",
                     "completion_length/mean", "tokens_per_s"]
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (3 * 500, 3 * 350)  # 7 panels: a 3 x 3 grid of 500x350 px
    assert run_labels([a, b]) == ["exp1/grpo", "exp2/grpo"]
    # The nan written as a string is read as a float, not dropped or fatal.
    steps, values = read_metrics(a)["grad_norm"]
    assert len(steps) == 7 and all(math.isnan(v) for v in values)


def test_plot_selected_metrics_and_globs(tmp_path, capsys):
    run = _grpo_like(tmp_path / "run", 1.0)
    out = tmp_path / "two.png"
    assert plot_cli.main([run, "--out", str(out), "--metrics", "loss,eval_*"]) == 0
    assert _last(capsys)["metrics"] == ["loss", "eval_accuracy"]
    with Image.open(out) as image:
        assert image.size == (2 * 500, 350)
    assert plot_cli.main([run, "--out", str(out), "--metrics", "loss,nope"]) == 2
    assert "no run has metric 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no run has metric"):
        choose_metrics(["loss"], ["kl"])


def _pixels_near(image, rgb, box) -> int:
    import numpy as np

    pixels = np.asarray(image.convert("RGB").crop(box), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).sum(-1) < 40).sum())


def test_a_run_keeps_its_color_in_panels_other_runs_did_not_log(tmp_path, capsys):
    # Only the second run logs "kl": its line there must be the second run's color (orange
    # in matplotlib's default cycle), as in the "loss" panel, not the first color (blue).
    a = _fake_run(tmp_path / "a", [{"step": s, "loss": 1.0 / s} for s in range(1, 6)])
    b = _fake_run(tmp_path / "b", [{"step": s, "loss": 2.0 / s, "kl": 0.1 * s}
                                   for s in range(1, 6)])
    out = tmp_path / "colors.png"
    assert plot_cli.main([a, b, "--out", str(out), "--metrics", "loss,kl"]) == 0
    blue, orange = (31, 119, 180), (255, 127, 14)
    with Image.open(out) as image:
        loss_panel, kl_panel = (0, 0, 500, 350), (500, 0, 1000, 350)
        assert _pixels_near(image, blue, loss_panel) > 50
        assert _pixels_near(image, orange, loss_panel) > 50
        assert _pixels_near(image, orange, kl_panel) > 50
        assert _pixels_near(image, blue, kl_panel) == 0


def test_plot_a_real_run_metrics_file(tmp_path, tiny_dir, one_device_runs, capsys):
    """The metrics file a real (seconds-long) SFT run of the tiny model writes."""
    from tiny import SFT_TINY, sft_overrides

    from jaxpt.config import load_config
    from jaxpt.loop import run

    run_dir = str(tmp_path / "sft")
    run(load_config(SFT_TINY, sft_overrides(run_dir, tiny_dir, **{
        "train.max_steps": 3, "train.log_every": 1, "train.eval_batches": 1})))
    out = tmp_path / "real.png"
    assert plot_cli.main([run_dir, "--out", str(out)]) == 0
    drawn = _last(capsys)["metrics"]
    assert drawn[:2] == ["loss", "eval_loss"] and "tokens_per_s" in drawn
    assert len(read_metrics(run_dir)["loss"][0]) == 3
    with Image.open(out) as image:
        image.verify()


def test_plot_eval_results_bars(tmp_path, capsys):
    first = tmp_path / "a" / "results.json"
    second = tmp_path / "b" / "results.json"
    first.parent.mkdir()
    second.parent.mkdir()
    first.write_text(json.dumps({"model": "runs/x/sft/hf", "accuracy": 0.4, "n": 100,
                                 "pass@4": 0.6}))
    second.write_text(json.dumps({"model": "runs/x/grpo/hf", "accuracy": 0.55, "n": 100,
                                  "pass@4": 0.7}))
    out = tmp_path / "bars.png"
    assert plot_cli.main(["--eval", str(first), str(second), "--out", str(out)]) == 0
    assert _last(capsys)["metrics"] == ["accuracy", "pass@4"]
    with Image.open(out) as image:
        image.verify()
    # A win-rate results file: its *_ci pairs become error bars.
    winrate = tmp_path / "w.json"
    winrate.write_text(json.dumps({"model_a": "a", "win_rate": 0.6, "win_rate_ci": [0.5, 0.7],
                                   "lc_win_rate": 0.55, "lc_win_rate_ci": [0.45, 0.65]}))
    assert plot_cli.main(["--eval", str(winrate), "--out", str(out)]) == 0
    assert _last(capsys)["metrics"] == ["win_rate", "lc_win_rate"]


def test_plot_errors(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert plot_cli.main([str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert "empty_run: no metrics.jsonl" in capsys.readouterr().err
    broken = _fake_run(tmp_path / "broken", [{"step": 1, "loss": 1.0}])
    with open(os.path.join(broken, "metrics.jsonl"), "a") as f:
        f.write("{oops\n")
    assert plot_cli.main([broken, "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl: line 2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        plot_cli.main(["--out", str(tmp_path / "x.png")])  # neither runs nor --eval


def test_ema_smoothing_is_tensorboards_debiased_average():
    # weight 0.6: last = 0.6 * last + 0.4 * value, shown as last / (1 - 0.6**n).
    # 1: 0.4 / 0.4 = 1; 2: (0.24 + 0.8) / 0.64 = 1.625; nan kept, not averaged;
    # 4: (0.624 + 1.6) / 0.784 = 2.2244 / 0.784.
    smoothed = ema_smooth([1.0, 2.0, math.nan, 4.0], 0.6)
    assert smoothed[:2] == pytest.approx([1.0, 1.625])
    assert math.isnan(smoothed[2])
    assert smoothed[3] == pytest.approx(2.224 / 0.784)
    assert ema_smooth([3.0, 1.0], 0.0) == [3.0, 1.0]  # 0: off
    with pytest.raises(ValueError, match="smoothing"):
        ema_smooth([1.0], 1.0)


def test_smoothed_line_over_a_faint_raw_one(tmp_path, capsys):
    noisy = [{"step": s, "loss": 1.0 + (s % 2), "walltime": 1e9 + s} for s in range(1, 21)]
    run = _fake_run(tmp_path / "noisy", noisy)
    assert "walltime" not in read_metrics(run)  # a timestamp, not a metric
    smooth, raw = tmp_path / "smooth.png", tmp_path / "raw.png"
    assert plot_cli.main([run, "--out", str(smooth)]) == 0
    assert _last(capsys)["metrics"] == ["loss"]
    assert plot_cli.main([run, "--out", str(raw), "--smoothing", "0"]) == 0
    blue, panel = (31, 119, 180), (0, 0, 500, 350)
    with Image.open(smooth) as a, Image.open(raw) as b:
        # The zig-zag drawn at full color covers far more pixels than its smoothed line.
        assert 50 < _pixels_near(a, blue, panel) < _pixels_near(b, blue, panel) / 2
    with pytest.raises(SystemExit):
        plot_cli.main([run, "--out", str(raw), "--smoothing", "1"])


def test_sft_and_rl_accuracies_get_their_own_panels(tmp_path, capsys):
    sft = _fake_run(tmp_path / "sft", [
        {"step": s, "loss": 1.0 / s, "token_accuracy": 0.1 * s, "eval_token_accuracy": 0.1 * s}
        for s in range(1, 4)
    ])
    grpo = _grpo_like(tmp_path / "grpo", 1.0)
    assert plot_cli.main([sft, grpo, "--out", str(tmp_path / "both.png")]) == 0
    drawn = _last(capsys)["metrics"]
    assert {"accuracy", "eval_accuracy", "token_accuracy", "eval_token_accuracy"} <= set(drawn)
