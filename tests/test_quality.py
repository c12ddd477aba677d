import math

import pytest

from streams.quality import coverage, hit_rate, mrr, ndcg, rank_of, summarize


def test_metrics_on_a_hand_computed_case():
    ranks = [1, 3, 11, 2]
    assert hit_rate(ranks, 10) == 0.75
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3)) / 4)
    assert mrr(ranks) == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 2) / 4)
    assert coverage([[1, 2], [2, 3]], 10) == 0.3
    assert summarize(ranks, [[1]], 4)["n"] == 4


def test_rank_of_excludes_and_counts_ties_against():
    scores = [0.0, 0.9, 0.5, 0.9, 0.1]
    assert rank_of(scores, 2) == 3
    assert rank_of(scores, 2, excluded=[1, 3]) == 1
    assert rank_of(scores, 1) == 2  # tie with row 3 counted against


def test_empty_inputs_are_zero():
    assert hit_rate([]) == ndcg([]) == mrr([]) == 0.0


def test_mean_ci_and_difference_ci_follow_the_normal_approximation():
    import math

    from streams.quality import difference_ci, mean_ci

    values = [0.0, 1.0] * 50  # mean 0.5, sample sd ~0.5025
    mean, low, high = mean_ci(values)
    assert mean == 0.5
    assert high - mean == pytest.approx(1.96 * math.sqrt(0.25 * 100 / 99 / 100))
    diff, low, high = difference_ci(values, [1.0] * 100)  # b has no spread
    assert diff == 0.5 and low > 0 and high == pytest.approx(0.5 + (mean_ci(values)[2] - 0.5))
