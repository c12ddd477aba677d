"""The paired interval over users for a mean over seeds, and the ranks it is built from."""
import math

import pytest

from model_export import data
from model_export.evaluate import evaluate, paired_gain, pooled_paired_gain


def test_pooling_averages_each_users_gain_over_the_runs_before_the_interval():
    # rank 1 gains 1, rank 3 gains 0.5: user 0 wins in run 1, user 1 in run 2, user 2 never
    base = [3, 3, 3]
    runs = [([1, 3, 3], base), ([3, 1, 3], base)]
    diff = [0.25, 0.25, 0.0]  # each user's mean over the runs, against a base of 0.5
    mean = sum(diff) / 3
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in diff) / 2) / math.sqrt(3)
    got = pooled_paired_gain(runs)
    assert got["gain"] == round(mean / 0.5, 4)
    assert got["ci95"] == [round((mean - half) / 0.5, 4), round((mean + half) / 0.5, 4)]
    # one run pools to itself; runs over different users are refused
    assert pooled_paired_gain(runs[:1]) == paired_gain([1, 3, 3], base)
    with pytest.raises(ValueError):
        pooled_paired_gain([([1, 2], [1, 2]), ([1], [1])])


def test_evaluate_keeps_every_fully_scored_rows_ranks_in_case_order(quick_bundle):
    dataset = data.synthetic(n_users=200, n_items=240, events_per_user=30, seed=1)
    out = evaluate(quick_bundle, dataset, rows=("gpt", "fused_fixed"), progress=False,
                   keep_ranks=True)
    assert set(out["ranks"]) == {"gpt", "fused_fixed"}
    assert len(out["ranks"]["gpt"]) == out["n_users"]
    again = pooled_paired_gain([(out["ranks"]["fused_fixed"], out["ranks"]["gpt"])])
    assert again == out["paired_vs_gpt"]["fused_fixed"]
    assert "ranks" not in evaluate(quick_bundle, dataset, rows=("gpt",), progress=False)
