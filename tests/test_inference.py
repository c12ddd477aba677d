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
