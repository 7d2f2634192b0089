"""Statistics of pairwise evaluations: paired bootstrap CIs, win rates with ties and the
length-controlled win rate of AlpacaEval 2.0.

An *outcome* is model A's score on one prompt: 1 A better, 0 B better, 0.5 a tie (a judge
that leans one way may give 0.75 or 0.25). Everything is plain numpy and seeded.

Length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval"): a logistic
GLM of "A preferred" on an intercept and the length term
``tanh((len_A - len_B) / std(len_A - len_B))`` is fitted, and the win rate is predicted
with the length term set to 0, i.e. the win rate A would have at equal lengths. With one
pair of models the GLM's model term is the intercept; the per-instruction difficulty term
of the paper needs several models per instruction and is not fitted here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_BOOTSTRAP = 1000


def _outcomes(outcomes) -> np.ndarray:
    scores = np.asarray(outcomes, np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"outcomes must be a non-empty 1-D sequence, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
        raise ValueError("outcomes must lie in [0, 1] (1 A better, 0.5 tie, 0 B better)")
    return scores


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` row indices drawn with replacement (seeded)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_boot >= 1, got {n} and {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(samples, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap ``samples`` (percentile method)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(np.asarray(samples, np.float64), [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    statistic: Callable[..., np.ndarray],
    *arrays,
    n_boot: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap CI of ``statistic(*arrays)``.

    The same resampled rows are taken from every array (they are paired: one row per
    prompt). ``statistic`` is vectorized: it receives arrays with a leading resample axis,
    ``[n_boot, n, ...]``, and returns ``[n_boot]`` values.
    """
    columns = [np.asarray(a) for a in arrays]
    if not columns:
        raise ValueError("bootstrap_ci needs at least one array")
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"paired arrays differ in length: {[len(c) for c in columns]}")
    index_rn = bootstrap_indices(n, n_boot, seed)
    values = np.asarray(statistic(*(c[index_rn] for c in columns)), np.float64)
    if values.shape != (n_boot,):
        raise ValueError(f"statistic returned shape {values.shape}, expected ({n_boot},)")
    return percentile_interval(values, confidence)


def win_counts(outcomes) -> dict:
    """``win_rate`` (the mean outcome: ties count half), ``wins``, ``ties``, ``losses`` and
    ``n`` of A. A leaning judge verdict (0.75 / 0.25) counts as a win / loss in the counts
    and at its own weight in the rate."""
    scores = _outcomes(outcomes)
    return {
        "win_rate": float(scores.mean()),
        "wins": int(np.sum(scores > 0.5)),
        "ties": int(np.sum(scores == 0.5)),
        "losses": int(np.sum(scores < 0.5)),
        "n": int(scores.size),
    }


def fit_logistic(
    features_nf, targets_n, *, l2: float = 1e-4, max_iter: int = 100, tol: float = 1e-10
) -> np.ndarray:
    """Coefficients of a logistic regression by Newton's method (IRLS).

    ``features_nf`` is ``[..., n, f]`` and ``targets_n`` ``[..., n]`` with values in [0, 1]
    (soft targets: a tie is 0.5); leading axes are independent fits (e.g. bootstrap
    replicates). ``l2`` (a ridge on every coefficient, scaled by n) keeps the fit finite when
    the data separate, e.g. when A wins every prompt.
    """
    x = np.asarray(features_nf, np.float64)
    y = np.asarray(targets_n, np.float64)
    if x.shape[:-1] != y.shape:
        raise ValueError(f"features {x.shape} and targets {y.shape} disagree")
    n, f = x.shape[-2:]
    beta = np.zeros(x.shape[:-2] + (f,))
    ridge = l2 * n * np.eye(f)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.einsum("...nf,...f->...n", x, beta)))
        grad = np.einsum("...nf,...n->...f", x, y - p) - l2 * n * beta
        hess = np.einsum("...nf,...n,...ng->...fg", x, p * (1 - p), x) + ridge
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    return beta


def length_feature(len_a, len_b, transform: str = "tanh") -> np.ndarray:
    """The GLM's length term: ``(len_a - len_b) / std``, through tanh as AlpacaEval 2.0 does
    (``transform="tanh"``) or not (``"linear"``). Zero when all differences are equal.
    Works on ``[..., n]`` arrays (std over the last axis)."""
    delta = np.asarray(len_a, np.float64) - np.asarray(len_b, np.float64)
    std = delta.std(axis=-1, keepdims=True)
    scaled = np.where(std > 0, delta / np.where(std > 0, std, 1.0), 0.0)
    if transform == "tanh":
        return np.tanh(scaled)
    if transform == "linear":
        return scaled
    raise ValueError(f"length transform must be 'tanh' or 'linear', got {transform!r}")


def _lc_win_rate(outcomes, len_a, len_b, transform: str, l2: float) -> np.ndarray:
    """The LC win rate of ``[..., n]`` arrays: logistic(intercept) of the fitted GLM."""
    length = length_feature(len_a, len_b, transform)
    features = np.stack([np.ones_like(length), length], axis=-1)
    beta = fit_logistic(features, outcomes, l2=l2)
    return 1.0 / (1.0 + np.exp(-beta[..., 0]))


def length_controlled_win_rate(
    outcomes, len_a, len_b, *, transform: str = "tanh", l2: float = 1e-4
) -> dict:
    """A's length-controlled win rate (module docstring) and the fitted coefficients."""
    scores = _outcomes(outcomes)
    len_a, len_b = np.asarray(len_a, np.float64), np.asarray(len_b, np.float64)
    if not len(scores) == len(len_a) == len(len_b):
        raise ValueError(
            f"got {len(scores)} outcomes, {len(len_a)} lengths of A and {len(len_b)} of B"
        )
    length = length_feature(len_a, len_b, transform)
    beta = fit_logistic(np.stack([np.ones_like(length), length], axis=-1), scores, l2=l2)
    return {
        "lc_win_rate": float(1.0 / (1.0 + np.exp(-beta[0]))),
        "intercept": float(beta[0]),
        "length_coef": float(beta[1]),
    }


def compare_outcomes(
    outcomes,
    len_a: Sequence[float],
    len_b: Sequence[float],
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
    transform: str = "tanh",
    l2: float = 1e-4,
) -> dict:
    """Everything a model-vs-model report needs: win rate (ties half) with its paired
    bootstrap CI, wins/ties/losses, the length-controlled win rate with its CI (the GLM is
    refitted on every replicate) and the mean lengths."""
    scores = _outcomes(outcomes)
    lc = length_controlled_win_rate(scores, len_a, len_b, transform=transform, l2=l2)
    boot = {"n_boot": n_boot, "confidence": confidence, "seed": seed}
    return {
        **win_counts(scores),
        "win_rate_ci": list(bootstrap_ci(lambda s: s.mean(axis=-1), scores, **boot)),
        "lc_win_rate": lc["lc_win_rate"],
        "lc_win_rate_ci": list(
            bootstrap_ci(
                lambda s, a, b: _lc_win_rate(s, a, b, transform, l2), scores, len_a, len_b,
                **boot,
            )
        ),
        "length_coef": lc["length_coef"],
        "mean_length_a": float(np.mean(len_a)),
        "mean_length_b": float(np.mean(len_b)),
    }
