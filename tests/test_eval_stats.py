"""Evaluation statistics: bootstrap CIs, win rates with ties, the length-controlled win rate,
Bradley-Terry and Elo ratings, annotator agreement, and the human-eval results reader."""

import json
import math

import numpy as np
import pytest

from jaxpt.evals.ratings import (
    annotator_agreement,
    bradley_terry,
    cohen_kappa,
    elo,
    elo_averaged,
    fleiss_kappa,
    rating_table,
    to_elo_scale,
)
from jaxpt.evals.stats import (
    bootstrap_ci,
    compare_outcomes,
    fit_logistic,
    length_controlled_win_rate,
    win_counts,
)
from jaxpt.human import read_pairs, read_results, summarize


def test_win_counts_ties_count_half():
    result = win_counts([1, 1, 0.5, 0, 1, 0.5])
    assert result == {"win_rate": 4 / 6, "wins": 3, "ties": 2, "losses": 1, "n": 6}
    assert win_counts([0.75, 0.25])["win_rate"] == 0.5  # a judge's half-weight verdicts
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_counts([1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        win_counts([])


def test_bootstrap_is_paired_and_seeded():
    x = np.arange(20.0)
    diff = lambda a, b: (a - b).mean(axis=-1)
    # Resampling the same rows of both arrays: a - b is constant, so the CI is a point.
    assert bootstrap_ci(diff, x, x + 3.0, n_boot=200) == pytest.approx((-3.0, -3.0))
    mean = lambda a: a.mean(axis=-1)
    assert bootstrap_ci(mean, x, seed=1) == bootstrap_ci(mean, x, seed=1)
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci(diff, x, x[:5])


def test_bootstrap_ci_coverage_near_nominal():
    """300 experiments of 60 Bernoulli(0.3) outcomes: the 90% CI covers 0.3 about 90% of
    the time (the percentile bootstrap runs a little under nominal at this size)."""
    rng = np.random.default_rng(0)
    covered = 0
    for seed in range(300):
        sample = (rng.random(60) < 0.3).astype(float)
        lo, hi = bootstrap_ci(lambda s: s.mean(axis=-1), sample, n_boot=400,
                              confidence=0.9, seed=seed)
        covered += lo <= 0.3 <= hi
    assert 0.8 <= covered / 300 <= 0.97


def test_logistic_fit_matches_known_coefficients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=20_000)
    y = (rng.random(x.size) < 1 / (1 + np.exp(-(0.5 + 1.5 * x)))).astype(float)
    beta = fit_logistic(np.stack([np.ones_like(x), x], -1), y, l2=0.0)
    np.testing.assert_allclose(beta, [0.5, 1.5], atol=0.1)
    # Separable data (A always wins) stays finite thanks to the ridge.
    beta = fit_logistic(np.ones((10, 1)), np.ones(10))
    assert np.isfinite(beta).all() and 1 / (1 + np.exp(-beta[0])) > 0.95


def test_length_control_removes_a_planted_length_bias():
    """Equal quality, a judge that prefers the longer answer, A answers longer: the raw
    win rate is far from 0.5, the length-controlled one is near it."""
    rng = np.random.default_rng(2)
    n = 600
    len_a = rng.normal(300, 80, n).clip(10)
    len_b = rng.normal(220, 80, n).clip(10)
    p_a = 1 / (1 + np.exp(-(len_a - len_b) / 40))
    outcomes = (rng.random(n) < p_a).astype(float)
    result = compare_outcomes(outcomes, len_a, len_b, n_boot=300)
    assert result["win_rate"] > 0.65
    assert result["win_rate_ci"][0] > 0.6
    assert abs(result["lc_win_rate"] - 0.5) < 0.08
    assert result["lc_win_rate_ci"][0] < 0.5 < result["lc_win_rate_ci"][1]
    assert result["length_coef"] > 1
    # A model that really is better keeps its edge after length control.
    better = (rng.random(n) < 1 / (1 + np.exp(-(1.5 + (len_a - len_b) / 40)))).astype(float)
    assert length_controlled_win_rate(better, len_a, len_b)["lc_win_rate"] > 0.7


def test_length_control_with_equal_lengths_and_ties():
    # Equal lengths: no length signal, the LC win rate is the plain one (ridge aside).
    result = compare_outcomes([1, 0.5, 0.5, 0], [5, 5, 5, 5], [5, 5, 5, 5], n_boot=50)
    assert result["win_rate"] == 0.5 and result["ties"] == 2
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    all_ties = compare_outcomes([0.5] * 8, range(8), range(8, 0, -1), n_boot=50)
    assert all_ties["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert all_ties["win_rate_ci"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="lengths"):
        length_controlled_win_rate([1, 0], [1], [1, 2])


def _simulate(strengths, games, seed, ties=0.0):
    rng = np.random.default_rng(seed)
    names = list(strengths)
    comparisons = []
    for _ in range(games):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + np.exp(strengths[b] - strengths[a]))
        u = rng.random()
        score = 0.5 if u < ties else float(rng.random() < p)
        comparisons.append((a, b, score))
    return comparisons


def test_bradley_terry_recovers_a_planted_ranking():
    truth = {"alpha": 1.2, "beta": 0.4, "gamma": 0.0, "delta": -0.5, "eps": -1.1}
    fit = bradley_terry(_simulate(truth, 4000, seed=3))
    assert sorted(fit, key=fit.get, reverse=True) == list(truth)
    centred = np.array(list(truth.values())) - np.mean(list(truth.values()))
    np.testing.assert_allclose([fit[m] for m in truth], centred, atol=0.2)
    assert sum(fit.values()) == pytest.approx(0.0, abs=1e-9)
    # On the Elo scale: 400/ln(10) points per unit of log-strength, mean 1000.
    elo_scale = to_elo_scale([fit[m] for m in truth])
    assert elo_scale.mean() == pytest.approx(1000.0)


def test_bradley_terry_ties_and_few_games():
    # Only ties: everyone is equal.
    fit = bradley_terry([("a", "b", 0.5), ("b", "c", 0.5), ("a", "c", 0.5)])
    np.testing.assert_allclose(list(fit.values()), 0.0, atol=1e-6)
    # Two players, 3 wins to 1: the plain MLE is log(3); the prior shrinks it a little.
    games = [("a", "b", 1.0)] * 3 + [("a", "b", 0.0)]
    exact = bradley_terry(games, prior=0.0)
    assert exact["a"] - exact["b"] == pytest.approx(math.log(3), abs=1e-6)
    shrunk = bradley_terry(games)
    assert 0 < shrunk["a"] - shrunk["b"] < math.log(3)
    # A newcomer who won its only game: finite, top, but not absurdly far ahead.
    few = bradley_terry([("a", "b", 1.0)] * 5 + [("a", "b", 0.0)] * 5 + [("new", "a", 1.0)])
    assert few["new"] == max(few.values()) and few["new"] - few["a"] < 3
    with pytest.raises(ValueError, match="itself"):
        bradley_terry([("a", "a", 1.0)])
    with pytest.raises(ValueError, match="at least one win"):
        bradley_terry([("a", "b", 1.0)], prior=0.0)


def test_elo_basic_properties():
    one = elo([("a", "b", 1.0)], k=32)
    assert one == {"a": 1016.0, "b": 984.0}  # equal ratings: expected 0.5, K/2 moves
    assert elo([("a", "b", 0.5)]) == {"a": 1000.0, "b": 1000.0}
    games = _simulate({"x": 1.0, "y": 0.0, "z": -1.0}, 300, seed=4)
    ratings = elo(games, k=16)
    assert sum(ratings.values()) == pytest.approx(3000.0)  # zero-sum
    assert ratings["x"] > ratings["y"] > ratings["z"]
    # Order matters for sequential Elo; averaging over orders is seeded and stable.
    assert elo([("a", "b", 1.0), ("a", "b", 0.0)]) != elo([("a", "b", 0.0), ("a", "b", 1.0)])
    averaged = elo_averaged(games, num_orders=10, seed=0)
    assert averaged == elo_averaged(games, num_orders=10, seed=0)
    assert averaged["x"] > averaged["y"] > averaged["z"]


def test_rating_table_cis_contain_the_estimate():
    table = rating_table(_simulate({"x": 0.8, "y": 0.0, "z": -0.8}, 600, seed=5), n_boot=60)
    for row in table.values():
        assert row["bt_ci"][0] <= row["bt"] <= row["bt_ci"][1]
        assert row["wins"] + row["ties"] + row["losses"] == row["games"]
    assert table["x"]["bt_ci"][0] > table["z"]["bt_ci"][1]


def test_kappas_on_crafted_data():
    # 10 items; 8 agreements; rater 1 says yes 5 times, rater 2 says yes 5 times:
    # p_o = 0.8, p_e = 0.5, kappa = 0.6.
    r1 = ["y"] * 5 + ["n"] * 5
    r2 = ["y"] * 4 + ["n"] + ["y"] + ["n"] * 4
    assert cohen_kappa(r1, r2) == pytest.approx(0.6)
    assert cohen_kappa(r1, r1) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["y", "y"], ["y", "y"]))
    # Fleiss on the same two raters: p_bar = 0.8, p_e = 0.5 -> 0.6 as well.
    assert fleiss_kappa(list(zip(r1, r2))) == pytest.approx(0.6)
    # Wikipedia-style hand example: 3 raters, 4 items.
    items = [["a", "a", "a"], ["a", "a", "b"], ["b", "b", "b"], ["a", "b", "b"]]
    p_bar = (1 + 1 / 3 + 1 + 1 / 3) / 4
    p_e = 0.5**2 + 0.5**2
    assert fleiss_kappa(items) == pytest.approx((p_bar - p_e) / (1 - p_e))
    found = annotator_agreement({"1": {"ann": "a", "bob": "a"}, "2": {"ann": "a", "bob": "b"},
                                 "3": {"ann": "b"}})
    assert found["overlapping_items"] == 2 and found["percent_agreement"] == 0.5
    assert "cohen_kappa" in found
    assert annotator_agreement({"1": {"ann": "a"}}) is None


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row(item, annotator, choice, left="m1", right="m2"):
    return {"id": item, "left_model": left, "right_model": right, "choice": choice,
            "annotator": annotator, "note": "", "timestamp": "2026-01-01T00:00:00Z"}


def test_results_reader_dedupes_and_summarizes(tmp_path):
    ann = _write(tmp_path / "ann.jsonl", [_row("1", "ann", "left"), _row("2", "ann", "right"),
                                          _row("1", "ann", "tie")])
    bob = _write(tmp_path / "bob.jsonl", [_row("1", "bob", "tie"),
                                          _row("2", "bob", "left", left="m2", right="m1")])
    rows, replaced = read_results([ann, bob])
    assert replaced == 1 and len(rows) == 4
    summary = summarize([ann, bob], n_boot=20)
    # Both annotators: item 1 tie, item 2 m2 wins. Full agreement.
    assert summary["agreement"]["percent_agreement"] == 1.0
    assert summary["models"]["m2"]["wins"] == 2 and summary["models"]["m1"]["ties"] == 2
    assert summary["models"]["m2"]["bt"] > summary["models"]["m1"]["bt"]


def test_bad_input_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_row("1", "ann", "left")) + "\n" + json.dumps(
        _row("2", "ann", "better")) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: 'choice'"):
        read_results([str(bad)])
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 1: not JSON"):
        read_results([str(bad)])
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "1", "choice": "left"}) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl: line 1: missing 'left_model'"):
        read_results([str(missing)])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "response_a": "x", "response_b": "y"}) + "\n"
                     + json.dumps({"prompt": "q", "response_a": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl: line 2: missing 'response_b'"):
        read_pairs(str(pairs))
