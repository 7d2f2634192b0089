"""PNG charts of training runs and evaluation results (matplotlib, Agg backend: no display).

A run dir holds ``metrics.jsonl``: one JSON object per line with ``step`` and any metrics
(train rows, ``eval_*`` rows and one-off rows such as data statistics; non-finite values
are written as strings; ``walltime`` is a row's timestamp, not a metric). ``plot_runs``
draws one panel per metric and one line per run: the raw values faint, their exponential
moving average (``ema_smooth``, TensorBoard's smoothing) over them.
``plot_results`` draws grouped bars from ``results.json`` files (``python -m jaxpt.eval
--output-dir``, ``python -m jaxpt.winrate --output-dir``); a metric's ``<name>_ci`` pair,
when present, becomes an error bar.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Sequence

# Panels drawn when no metrics are asked for: the first matches of each, in this order.
DEFAULT_METRICS = (
    "loss", "eval_loss", "reward", "eval_reward*", "kl", "*kl", "accuracy", "eval_accuracy",
    "token_accuracy", "eval_token_accuracy", "margin", "eval_margin",
    "completion_length/mean", "tokens_per_s",
)
# Row fields that are not metrics: the step and the write time (``jaxpt.metrics.WALLTIME``).
NOT_METRICS = ("step", "walltime")
SMOOTHING = 0.6  # TensorBoard's default weight
RAW_ALPHA = 0.25  # the raw line under a smoothed one
DEFAULT_RESULT_METRICS = ("accuracy", "*accuracy*", "pass@*", "maj@*", "win_rate", "lc_win_rate")
PANEL_INCHES = (5.0, 3.5)
DPI = 100


def metrics_path(run: str) -> str:
    """``run/metrics.jsonl`` for a run dir; a metrics file path as is."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no metrics.jsonl (is it a jaxpt run dir?)")
    return path


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)  # non-finite values are written as strings
    return None


def read_metrics(run: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` of a run's metrics file; errors name file and line."""
    path = metrics_path(run)
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_no}: not JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise TypeError(f"{path}: line {line_no}: expected an object with an int 'step'")
            for key, value in row.items():
                number = _number(value)
                if key not in NOT_METRICS and number is not None:
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(row["step"])
                    values.append(number)
    if not series:
        raise ValueError(f"{path}: no metrics")
    return series


def ema_smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with weight ``weight`` on the
    past, debiased (divided by ``1 - weight**n`` after ``n`` finite values) so the start is
    not pulled toward 0. Non-finite values are kept as they are and skipped by the average.
    ``weight`` 0 returns the values unchanged."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {weight}")
    smoothed, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        smoothed.append(last / (1 - weight**count))
    return smoothed


def choose_metrics(
    available: Sequence[str], requested: Sequence[str] | None,
    defaults: Sequence[str] = DEFAULT_METRICS,
) -> list[str]:
    """Metrics to draw, in pattern order: the matches of each requested name or glob (one
    that matches nothing is an error), or of the ``defaults`` patterns when none are asked
    for."""
    chosen: list[str] = []
    for pattern in requested or defaults:
        matches = sorted(fnmatch.filter(available, pattern))
        if requested and not matches:
            raise ValueError(
                f"no run has metric {pattern!r}; available: {', '.join(sorted(available))}"
            )
        chosen += [name for name in matches if name not in chosen]
    return chosen


def run_labels(runs: Sequence[str]) -> list[str]:
    """The shortest path tails that tell the runs apart (``sft``, or ``a/sft`` vs ``b/sft``)."""
    parts = [os.path.normpath(os.path.abspath(r)).split(os.sep) for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(runs)


def _figure(num_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, num_panels)
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI,
        squeeze=False,
    )
    for ax in axes.flat[num_panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:num_panels])


def plot_runs(
    runs: Sequence[str], out: str, metrics: Sequence[str] | None = None,
    smoothing: float = SMOOTHING,
) -> list[str]:
    """Draw the runs' curves into ``out`` (PNG): a grid of panels (3 per row, 500x350 px
    each), one line per run: with ``smoothing`` > 0 its ``ema_smooth`` over the raw values
    drawn faint (series of under 3 points are drawn raw only). Returns the metrics drawn."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    data = [read_metrics(r) for r in runs]
    available = sorted({k for series in data for k in series})
    if metrics is None:  # by default, only what was logged over time
        over_time = [k for k in available if any(len(s[k][0]) > 1 for s in data if k in s)]
        chosen = choose_metrics(over_time, None) or over_time[:9] or available[:9]
    else:
        chosen = choose_metrics(available, metrics)
    plt, fig, axes = _figure(len(chosen))
    # One color per run in every panel, whichever runs logged the panel's metric.
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes, chosen):
        for index, (label, series) in enumerate(zip(run_labels(runs), data)):
            if name in series:
                steps, values = series[name]
                color = colors[index % len(colors)]
                if smoothing and len(steps) >= 3:
                    ax.plot(steps, values, "-", linewidth=1.0, color=color, alpha=RAW_ALPHA)
                    ax.plot(steps, ema_smooth(values, smoothing), "-", label=label,
                            linewidth=1.2, color=color)
                    continue
                style = "o-" if len(steps) < 3 else "-"
                ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.2,
                        color=color)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return chosen


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_result(path: str) -> dict:
    """A results.json as one flat dict (nested objects become ``outer/inner`` keys). A
    captured CLI stdout also works: its last line is the result."""
    with open(path) as f:
        text = f.read().strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = json.loads(text.splitlines()[-1]) if text else None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a JSON results file ({error.msg})") from None
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object")
    return _flatten(data)


def _result_labels(paths: Sequence[str], results: Sequence[dict]) -> list[str]:
    """Bar labels: the shortest tails that tell the models apart (``sft/hf``), else the
    results files' paths."""
    models = [str(r.get("model") or r.get("model_a") or "") for r in results]
    if all(models) and len(set(models)) == len(models):
        return run_labels(models)
    return run_labels(paths)


def plot_results(
    paths: Sequence[str], out: str, metrics: Sequence[str] | None = None
) -> list[str]:
    """Grouped bars (one group per metric, one bar per results file) into ``out`` (PNG).
    Returns the metrics drawn."""
    import numpy as np

    results = [read_result(p) for p in paths]
    numeric = sorted({
        k for r in results for k, v in r.items()
        if _number(v) is not None and not isinstance(v, str)
    })
    if metrics:
        chosen = choose_metrics(numeric, metrics)
    else:
        chosen = choose_metrics(numeric, None, DEFAULT_RESULT_METRICS) or [
            k for k in numeric if k not in ("n", "eval_s")
        ]
    if not chosen:
        raise ValueError(f"no numeric metrics in {', '.join(paths)}")
    labels = _result_labels(paths, results)
    plt, fig, (ax,) = _figure(1)
    fig.set_size_inches(max(PANEL_INCHES[0], 1.2 * len(chosen) * max(1, len(paths)) / 2),
                        PANEL_INCHES[1])
    width = 0.8 / len(results)
    x = np.arange(len(chosen))
    for i, (label, result) in enumerate(zip(labels, results)):
        values = [_number(result.get(m)) for m in chosen]
        values = [math.nan if v is None else v for v in values]  # a missing bar, not 0
        errors = None
        cis = [result.get(f"{m}_ci") for m in chosen]
        if any(isinstance(c, list) and len(c) == 2 for c in cis):
            errors = np.array([
                [v - c[0], c[1] - v] if isinstance(c, list) and len(c) == 2 else [0.0, 0.0]
                for v, c in zip(values, cis)
            ]).T.clip(min=0)
        bars = ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, yerr=errors,
                      label=label, capsize=3)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, label_type="center")
    ax.set_xticks(x, chosen, fontsize=8, rotation=20 if len(chosen) > 4 else 0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return chosen
