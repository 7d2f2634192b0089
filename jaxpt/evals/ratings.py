"""Ratings from pairwise comparisons (Bradley-Terry, Elo) and inter-annotator agreement.

A comparison is ``(model_a, model_b, score_a)``: score_a 1 when A won, 0 when B won, 0.5
for a tie (a tie counts as half a win for each side). Ratings are reported on the Elo
scale: ``1000 + 400 * log10(strength)``, centred so the models average 1000.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from jaxpt.evals.stats import bootstrap_indices, percentile_interval

Comparison = tuple[str, str, float]
ELO_BASE = 1000.0
ELO_SCALE = 400.0


def _check(comparisons: Sequence[Comparison]) -> list[str]:
    """The models in ``comparisons`` (sorted); raises on a malformed comparison."""
    if not comparisons:
        raise ValueError("ratings need at least one comparison")
    for index, item in enumerate(comparisons):
        if len(item) != 3:
            raise ValueError(f"comparison {index}: expected (model_a, model_b, score_a)")
        a, b, score = item
        if a == b:
            raise ValueError(f"comparison {index}: a model compared with itself ({a!r})")
        if not 0 <= float(score) <= 1:
            raise ValueError(f"comparison {index}: score_a must be in [0, 1], got {score}")
    return sorted({c[0] for c in comparisons} | {c[1] for c in comparisons})


def to_elo_scale(log_strength) -> np.ndarray:
    """Natural-log strengths as Elo points, centred on 1000."""
    theta = np.asarray(log_strength, np.float64)
    return ELO_BASE + ELO_SCALE / math.log(10) * (theta - theta.mean(axis=-1, keepdims=True))


def bradley_terry(
    comparisons: Sequence[Comparison],
    *,
    prior: float = 0.5,
    max_iter: int = 10_000,
    tol: float = 1e-9,
) -> dict[str, float]:
    """Bradley-Terry log-strengths (natural log, mean 0) by the MM algorithm (Hunter 2004).

    ``P(i beats j) = p_i / (p_i + p_j)``; a tie is half a win for each side. ``prior``
    adds that many wins and as many losses against a virtual player of strength 1 to every
    model, so a model that won (or lost) all of its few games gets a large but finite
    rating; 0 is the plain maximum-likelihood fit (which then diverges).
    """
    models = _check(comparisons)
    index = {m: i for i, m in enumerate(models)}
    k = len(models)
    games_kk = np.zeros((k, k))
    wins_k = np.zeros(k)
    for a, b, score in comparisons:
        i, j = index[a], index[b]
        games_kk[i, j] += 1
        games_kk[j, i] += 1
        wins_k[i] += float(score)
        wins_k[j] += 1 - float(score)
    if prior <= 0 and (np.any(wins_k == 0) or np.any(wins_k == games_kk.sum(1))):
        raise ValueError("without a prior every model needs at least one win and one loss")
    strength_k = np.ones(k)
    for _ in range(max_iter):
        pair_kk = games_kk / (strength_k[:, None] + strength_k[None, :])
        denom_k = pair_kk.sum(axis=1) + 2 * prior / (strength_k + 1)
        new_k = (wins_k + prior) / denom_k
        new_k /= np.exp(np.log(new_k).mean())  # fix the scale: geometric mean 1
        change = np.max(np.abs(np.log(new_k) - np.log(strength_k)))
        strength_k = new_k
        if change < tol:
            break
    theta_k = np.log(strength_k)
    return dict(zip(models, (theta_k - theta_k.mean()).tolist()))


def elo(
    comparisons: Sequence[Comparison], *, k: float = 32.0, initial: float = ELO_BASE
) -> dict[str, float]:
    """Sequential Elo over ``comparisons`` in their order (``k`` points per full upset)."""
    models = _check(comparisons)
    rating = dict.fromkeys(models, float(initial))
    for a, b, score in comparisons:
        expected_a = 1.0 / (1.0 + 10 ** ((rating[b] - rating[a]) / ELO_SCALE))
        delta = k * (float(score) - expected_a)
        rating[a] += delta
        rating[b] -= delta
    return rating


def elo_averaged(
    comparisons: Sequence[Comparison], *, k: float = 32.0, num_orders: int = 100, seed: int = 0
) -> dict[str, float]:
    """Elo averaged over ``num_orders`` shuffled orders of the comparisons (seeded), which
    removes most of sequential Elo's dependence on the order games were played in."""
    rng = np.random.default_rng(seed)
    totals: Counter = Counter()
    for _ in range(num_orders):
        order = rng.permutation(len(comparisons))
        for model, value in elo([comparisons[i] for i in order], k=k).items():
            totals[model] += value
    return {m: totals[m] / num_orders for m in _check(comparisons)}


def record(comparisons: Sequence[Comparison]) -> dict[str, dict]:
    """Games, wins, ties and losses of every model."""
    table = {m: {"games": 0, "wins": 0, "ties": 0, "losses": 0} for m in _check(comparisons)}
    for a, b, score in comparisons:
        for model, mine in ((a, float(score)), (b, 1 - float(score))):
            row = table[model]
            row["games"] += 1
            row["wins" if mine > 0.5 else "losses" if mine < 0.5 else "ties"] += 1
    return table


def rating_table(
    comparisons: Sequence[Comparison],
    *,
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    k: float = 32.0,
    num_orders: int = 20,
) -> dict[str, dict]:
    """Per model: Bradley-Terry (Elo scale) and averaged-Elo ratings, each with a percentile
    bootstrap CI over resampled comparisons, and its record. ``n_boot=0`` skips the CIs."""
    bt = bradley_terry(comparisons)
    bt_elo = dict(zip(bt, to_elo_scale(list(bt.values())).tolist()))
    elo_mean = elo_averaged(comparisons, k=k, num_orders=num_orders, seed=seed)
    table = record(comparisons)
    samples: dict[str, dict[str, list]] = {m: {"bt": [], "elo": []} for m in table}
    if n_boot > 0:
        for rows in bootstrap_indices(len(comparisons), n_boot, seed):
            resampled = [comparisons[i] for i in rows]
            boot_bt = bradley_terry(resampled)
            boot_bt_elo = dict(zip(boot_bt, to_elo_scale(list(boot_bt.values())).tolist()))
            boot_elo = elo_averaged(resampled, k=k, num_orders=1, seed=int(rows[0]))
            for model in table:  # a model absent from a replicate has no rating there
                if model in boot_bt_elo:
                    samples[model]["bt"].append(boot_bt_elo[model])
                    samples[model]["elo"].append(boot_elo[model])
    for model, row in table.items():
        row["bt"], row["elo"] = bt_elo[model], elo_mean[model]
        for key in ("bt", "elo"):
            values = samples[model][key]
            row[f"{key}_ci"] = list(percentile_interval(values, confidence)) if values else None
    return table


# -- agreement ---------------------------------------------------------------------------------


def cohen_kappa(labels_1: Sequence[Hashable], labels_2: Sequence[Hashable]) -> float:
    """Cohen's kappa of two annotators' labels on the same items (NaN when chance agreement
    is 1, i.e. both always used one and the same label)."""
    if len(labels_1) != len(labels_2) or not labels_1:
        raise ValueError(f"need two equal, non-empty label lists, got {len(labels_1)} and "
                         f"{len(labels_2)}")
    n = len(labels_1)
    observed = sum(x == y for x, y in zip(labels_1, labels_2)) / n
    count_1, count_2 = Counter(labels_1), Counter(labels_2)
    expected = sum(count_1[c] * count_2[c] for c in count_1) / n**2
    return math.nan if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(labels_by_item: Sequence[Sequence[Hashable]]) -> float:
    """Fleiss' kappa over items that each have at least two labels (the number of raters
    may vary between items; NaN when chance agreement is 1)."""
    items = [list(labels) for labels in labels_by_item if len(labels) >= 2]
    if not items:
        raise ValueError("Fleiss' kappa needs items with at least two labels")
    per_item, totals = [], Counter()
    for labels in items:
        counts = Counter(labels)
        r = len(labels)
        per_item.append((sum(c * c for c in counts.values()) - r) / (r * (r - 1)))
        totals.update(counts)
    observed = float(np.mean(per_item))
    n_labels = sum(totals.values())
    expected = sum((c / n_labels) ** 2 for c in totals.values())
    return math.nan if expected == 1 else (observed - expected) / (1 - expected)


def annotator_agreement(labels: Mapping[Hashable, Mapping[str, Hashable]]) -> dict | None:
    """Agreement where items overlap. ``labels[item][annotator] = label``.

    Returns the number of overlapping items (two or more annotators), the raw percent
    agreement (the share of agreeing annotator pairs, averaged over those items), Fleiss'
    kappa, and Cohen's kappa when exactly two annotators share items; None if no item has
    two annotators.
    """
    shared = {item: by for item, by in labels.items() if len(by) >= 2}
    if not shared:
        return None
    pair_agreement = []
    for by in shared.values():
        values = list(by.values())
        pairs = [(x, y) for i, x in enumerate(values) for y in values[i + 1 :]]
        pair_agreement.append(sum(x == y for x, y in pairs) / len(pairs))
    annotators = sorted({a for by in shared.values() for a in by})
    result = {
        "annotators": annotators,
        "overlapping_items": len(shared),
        "percent_agreement": float(np.mean(pair_agreement)),
        "fleiss_kappa": fleiss_kappa([list(by.values()) for by in shared.values()]),
    }
    if len(annotators) == 2:
        first, second = annotators
        both = [by for by in shared.values() if first in by and second in by]
        result["cohen_kappa"] = cohen_kappa([b[first] for b in both], [b[second] for b in both])
    return result
