"""streams.inference over a real (quick) bundle: shapes, ranges, masking, cold start."""
import numpy as np
import pytest

from streams.bundle import MASKED_SCORE, load_bundle
from streams.inference import LongTermEncoder, Recommender, pad_left


@pytest.fixture(scope="module")
def bundle(quick_bundle):
    return load_bundle(quick_bundle)


def test_pad_left():
    rows, mask = pad_left([[1, 2, 3], [4]], max_len=2)
    assert rows.tolist() == [[2, 3], [0, 4]] and mask.tolist() == [[1, 1], [0, 1]]


@pytest.mark.parametrize("mode", ["fixed", "attention", "gate"])
def test_recommend_honours_k(bundle, mode):
    rec = Recommender(bundle)
    seqs = [[1, 2, 3], [5, 6]]
    ten = rec.recommend(seqs, [None, None], [1.0, 1.0], seqs, mode, 0.5, 10)
    three = rec.recommend(seqs, [None, None], [1.0, 1.0], seqs, mode, 0.5, 3)
    assert three.rows.shape == three.scores.shape == (2, 3)
    np.testing.assert_allclose(three.scores, ten.scores[:, :3], atol=1e-6)


def test_seen_mask_from_the_padded_sequences_equals_the_separate_one(bundle):
    rec = Recommender(bundle)
    seqs = [[1, 2, 3], [5], [6, 7, 7, 8, 9]]
    args = ([None] * 3, [1.0] * 3, "fixed", 0.5, 10)
    shared = rec.inputs(seqs, args[0], args[1], None, *args[2:]).fusion["seen_mask"]
    separate = rec.inputs(seqs, args[0], args[1], [list(s) for s in seqs], *args[2:])
    np.testing.assert_array_equal(shared, separate.fusion["seen_mask"])
    assert shared.sum(axis=1).tolist() == [4, 2, 5]  # distinct seen rows + row 0 (padding)
    assert shared[2, [0, 6, 7, 8, 9]].tolist() == [1] * 5 and shared[2, 1] == 0


@pytest.mark.parametrize("mode", ["fixed", "attention", "gate"])
def test_recommend_shapes_ranges_and_masking(bundle, mode):
    rec = Recommender(bundle)
    lt = LongTermEncoder(bundle, with_text_encoder=False)
    seqs = [[1, 2, 3], [5], list(range(1, 40))]
    longs = [lt.encode([s])[0] for s in seqs[:2]] + [None]
    out = rec.recommend(seqs, longs, [3.0, 0.0, 100.0], seqs, mode, 0.5, 10)
    d = bundle.dims["d_model"]
    assert out.fused.shape == (3, d) and out.rows.shape == (3, 10) and out.scores.shape == (3, 10)
    assert np.all((out.alpha >= 0) & (out.alpha <= 1))
    assert out.alpha[2] == 1.0  # no long-term vector: short-term only
    for seq, rows in zip(seqs, out.rows):
        assert not set(rows.tolist()) & set(seq) and 0 not in rows
    assert np.all(np.diff(out.scores, axis=1) <= 1e-6)
    if mode == "fixed":
        assert np.allclose(out.alpha[:2], 0.5)


def test_pooled_long_term_respects_event_weights(bundle):
    lt = LongTermEncoder(bundle, with_text_encoder=False)
    only_first = lt.pooled([[1]])
    ignoring_second = lt.pooled([[1, 2]], event_weights=[[1.0, 0.0]])
    assert np.allclose(only_first, ignoring_second, atol=1e-5)
    assert not np.allclose(lt.pooled([[1, 2]]), only_first)


def test_text_construction_runs_the_bert(bundle):
    lt = LongTermEncoder(bundle)
    vecs = lt.encode([[1, 2], [3]], "text")
    assert vecs.shape == (2, bundle.dims["d_model"]) and np.isfinite(vecs).all()


def test_masked_rows_fill_top_k_only_when_too_few_are_unseen_and_carry_masked_score(bundle):
    """The worker leaves out rows scored MASKED_SCORE: fusion.onnx must use exactly that value."""
    rec = Recommender(bundle)
    n_rows = bundle.items.n_rows
    seen = [list(range(1, n_rows - 3))]  # every item but the last three
    batch = rec.recommend([seen[0][-5:]], [None], [0.0], seen, "fixed", 0.5, 10)
    assert sorted(batch.rows[0, :3].tolist()) == [n_rows - 3, n_rows - 2, n_rows - 1]
    assert (batch.scores[0, :3] > MASKED_SCORE / 2).all()
    assert (batch.scores[0, 3:] == MASKED_SCORE).all()


def test_cold_start_is_popularity_minus_seen(bundle):
    rec = Recommender(bundle)
    rows, scores = rec.popular([[int(np.argmax(rec.popularity))]], 5)
    assert int(np.argmax(rec.popularity)) not in rows[0]
    assert np.all(np.diff(scores[0]) <= 0)


@pytest.mark.parametrize("half_life", [1e9, 7.0])
def test_per_event_update_equals_a_refresh_over_the_whole_history(bundle, half_life):
    """The worker's update of a refreshed vector with the events after it gives the vector
    the refresher would compute now (histories within the model's window)."""
    from streams.inference import LongTermUpdate, LongTermUpdater

    lt = LongTermEncoder(bundle, with_text_encoder=False)
    updater = LongTermUpdater(bundle)
    assert lt.incremental and updater.enabled
    lt.model_half_life = half_life  # the same bundle, read with another decay
    updater.decay = np.float32(0.5 ** (1.0 / half_life))
    history = [3, 17, 5, 5, 40, 8, 22, 9, 31]
    weights = [1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 3.0, 1.0, 1.0]
    full = lt.model_parts([history], [weights])
    for newer in (1, 4):
        old = lt.model_parts([history[:-newer]], [weights[:-newer]])
        rows = np.array([history[-newer:]])
        pooled = updater.pooled(old.pooled, old.weight, rows, np.array([weights[-newer:]],
                                                                      dtype=np.float32))
        np.testing.assert_allclose(pooled, full.pooled, atol=1e-5)
        np.testing.assert_allclose(updater.run(pooled), full.h_l, atol=1e-4)
    # through the recommender: the updated vector is what the fusion scores with
    rec = Recommender(bundle)
    update = LongTermUpdate(old.pooled[0], float(old.weight[0]),
                            list(zip(history[-4:], weights[-4:])))
    rec.updater.decay = updater.decay
    served = rec.recommend([history[-5:]], [old.h_l[0]], [1.0], None, "fixed", 0.0, 5, [update])
    fresh = rec.recommend([history[-5:]], [full.h_l[0]], [1.0], None, "fixed", 0.0, 5)
    np.testing.assert_allclose(served.fused, fresh.fused, atol=1e-4)
    stale = rec.recommend([history[-5:]], [old.h_l[0]], [1.0], None, "fixed", 0.0, 5)
    assert np.abs(stale.fused - fresh.fused).max() > 1e-3  # the update did change something


def test_explanations_split_each_score_into_its_three_parts(bundle):
    rec = Recommender(bundle)
    lt = LongTermEncoder(bundle, with_text_encoder=False)
    seqs = [[1, 2, 3], [5, 6]]
    h_l = lt.model_parts(seqs).h_l
    out = rec.recommend(seqs, list(h_l), [1.0, 1.0], None, "fixed", 0.6, 5,
                        item_item_weight=1.5)
    short = out.short_term_parts(rec.item_emb)
    h_s = rec.short_term.encode(seqs)
    e = rec.item_emb[out.rows]  # (B, K, D)
    np.testing.assert_allclose(short, 0.6 * np.einsum("bd,bkd->bk", h_s, e), atol=1e-4)
    long_part = 0.4 * np.einsum("bd,bkd->bk", h_l, e)
    assert np.abs(out.item_item).max() > 0  # the quick bundle's table reaches these users
    np.testing.assert_allclose(short + long_part + out.item_item, out.scores, atol=1e-4)


def test_the_evaluations_item_item_scores_are_the_fusion_graphs(bundle):
    """The offline evaluation ranks every item with numpy's item-item scores; the worker's
    lists come from fusion.onnx's: the same numbers."""
    rec = Recommender(bundle)
    seqs = [[1, 2, 3], [5, 6, 6], [7]]
    out = rec.recommend(seqs, [None] * 3, [1.0] * 3, None, "fixed", 1.0, 10,
                        item_item_weight=2.0)
    full = rec.item_item_scores(seqs, 2.0)
    np.testing.assert_allclose(np.take_along_axis(full, out.rows, axis=1), out.item_item,
                               atol=1e-5)
    np.testing.assert_allclose(rec.item_item_scores(seqs, 0.5), full / 4, atol=1e-6)
