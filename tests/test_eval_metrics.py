"""pass@k, maj@k and mean@k against hand computation."""

import pytest

from jaxpt.evals.sampled import (
    maj_at_k,
    majority_answer,
    mean_at_k,
    pass_at_k,
    sampled_metrics,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (10, 3, 1, 3 / 10),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (8, 1, 4, 1 - 35 / 70),  # 1 - C(7,4)/C(8,4)
        (10, 0, 1, 0.0),  # c = 0
        (10, 0, 10, 0.0),
        (10, 10, 1, 1.0),  # c = n
        (10, 1, 10, 1.0),  # k = n with one correct
        (5, 3, 3, 1.0),  # n - c < k: every draw of 3 holds a correct one
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200, no huge binomials
    ],
)
def test_pass_at_k_matches_the_closed_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_maj_at_k_counts_votes_and_breaks_ties_by_first_appearance():
    answers = ["3", "4", "3", None, "4"]
    scores = [1.0, 0.0, 1.0, 0.0, 0.0]
    assert maj_at_k(answers, scores, 1) == 1.0
    assert maj_at_k(answers, scores, 2) == 1.0  # 1-1 tie: "3" came first
    assert maj_at_k(answers, scores, 3) == 1.0  # "3" twice
    assert maj_at_k(answers, scores, 5) == 1.0  # 2-2 tie, the unanswered one abstains
    flipped = ["4", "3", "3", "4"]
    flipped_scores = [0.0, 1.0, 1.0, 0.0]
    assert maj_at_k(flipped, flipped_scores, 2) == 0.0  # tie: "4" came first
    assert maj_at_k(flipped, flipped_scores, 3) == 1.0  # "3" wins 2-1
    assert maj_at_k(flipped, flipped_scores, 4) == 0.0  # 2-2 tie again: "4"
    assert majority_answer(flipped) == 0


def test_maj_at_k_unparseable_answers_do_not_vote():
    assert maj_at_k([None, None, "5"], [0.0, 0.0, 1.0], 3) == 1.0
    assert maj_at_k([None, None, "5"], [0.0, 0.0, 1.0], 2) == 0.0  # nobody answered
    assert majority_answer([None, None]) is None
    with pytest.raises(ValueError, match="answers but"):
        maj_at_k(["1"], [1.0, 0.0], 1)


def test_mean_at_k():
    assert mean_at_k([1.0, 0.0, 1.0, 1.0], 2) == 0.5
    assert mean_at_k([1.0, 0.0, 1.0, 1.0], 4) == 0.75
    with pytest.raises(ValueError, match="k must be in"):
        mean_at_k([1.0], 2)


def test_sampled_metrics_average_over_problems():
    scores = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    answers = [["7", "8", "8", "7"], ["1", None, "2", "2"]]
    metrics = sampled_metrics(scores, answers, [1, 2, 4])
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 0) / 2)
    assert metrics["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # 1 - C(2,2)/C(4,2)
    assert metrics["pass@4"] == pytest.approx(0.5)
    assert metrics["mean@2"] == pytest.approx(0.25)
    assert metrics["maj@1"] == pytest.approx(0.5)
    assert metrics["maj@4"] == pytest.approx(0.5)  # "7" vs "8" tie: "7" first, correct
    assert "maj@1" not in sampled_metrics(scores, None, [1])  # no answers: no vote
    with pytest.raises(ValueError, match="same number of samples"):
        sampled_metrics([[1.0], [1.0, 0.0]], None, [1])
