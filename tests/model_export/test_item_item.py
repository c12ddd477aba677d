"""The item-item model (EASE): its closed form, its sparse table, its validation choice."""
import numpy as np
import torch

from model_export import item_item
from model_export.item_item import ItemItemConfig
from streams.inference import pad_left


def _dense_ease(seqs, n_rows, l2):
    x = np.zeros((len(seqs), n_rows))
    for i, s in enumerate(seqs):
        x[i, s] = 1.0
    g = x.T @ x + l2 * np.eye(n_rows)
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def _seqs(n_users=60, n_rows=12, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.choice(np.arange(1, n_rows), size=rng.integers(2, 7), replace=False))
            for _ in range(n_users)]


def test_fit_is_the_closed_form_kept_to_each_rows_strongest_successors():
    seqs, n_rows = _seqs(), 12
    table = item_item.fit(seqs, n_rows, 1.0, ItemItemConfig(neighbours=4))
    # row 0 (padding) never occurs: the dense form over rows 1.. only
    dense = _dense_ease([[r - 1 for r in s] for s in seqs], n_rows - 1, table.l2)
    for row in range(1, n_rows):
        expected = np.sort(dense[row - 1])[::-1][:4]
        np.testing.assert_allclose(np.sort(table.weights[row])[::-1], expected, rtol=1e-3,
                                   atol=1e-5)
        for to, w in zip(table.rows[row], table.weights[row]):
            assert abs(dense[row - 1, to - 1] - w) < 1e-4
        assert not table.weights[row][table.rows[row] == row].any()  # never its own successor
    assert not table.weights[0].any()


def test_rows_beyond_max_items_get_no_successors():
    seqs = [[1, 2, 3]] * 10 + [[1, 2]] * 5 + [[4, 1]]
    table = item_item.fit(seqs, 6, 1.0, ItemItemConfig(neighbours=2, max_items=3))
    assert not table.weights[4].any() and not table.weights[5].any()  # row 4: least chosen
    assert table.weights[1].any()
    assert 4 not in table.rows[1][table.weights[1] != 0]


def test_scores_sum_the_windows_successors():
    rows = torch.tensor([[0, 0], [1, 2], [2, 2]])
    w = torch.tensor([[0.0, 0.0], [0.5, 0.25], [1.0, 2.0]])
    hist, mask = (torch.from_numpy(a) for a in
                  pad_left([np.array([1]), np.array([2, 1, 2]), np.array([])], 2))
    assert hist.tolist() == [[0, 1], [1, 2], [0, 0]]
    out = item_item.scores(rows, w, hist, mask, 3, torch.tensor(1.0))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.25],
                                                  [0.0, 0.5, 3.25],
                                                  [0.0, 0.0, 0.0]]))
    # half-life 1: the newest item counts in full, the one before it half
    decayed = item_item.scores(rows, w, hist, mask, 3, torch.tensor(item_item.decay_of(1.0)))
    torch.testing.assert_close(decayed, torch.tensor([[0.0, 0.5, 0.25],
                                                      [0.0, 0.25, 0.125 + 3.0],
                                                      [0.0, 0.0, 0.0]]))


def test_the_choice_switches_the_model_off_where_it_does_not_help():
    """Validation targets the item-item model cannot predict (a row nobody's window leads
    to) and a short-term vector that finds them: weight 0, the GPT's scores alone."""
    n_rows, d = 12, 4
    seqs = _seqs(n_rows=n_rows)
    item_emb = torch.zeros(n_rows, d)
    item_emb[11, 0] = 10.0  # only the short-term vector points at row 11
    val_seqs = [np.array([1, 2, 3])] * 8
    h_s = torch.zeros(8, d)
    h_s[:, 0] = 1.0
    choice = item_item.choose([[r for r in s if r != 11] for s in seqs], n_rows, 5, h_s,
                              torch.zeros(8, d), item_emb, val_seqs, torch.full((8,), 11),
                              [np.array([1, 2, 3])] * 8,
                              ItemItemConfig(l2_scales=(1.0,), weights=(0.0, 50.0)))
    assert choice.weight == 0.0


def test_cooccurrence_is_xtx_whatever_the_batching():
    rng = np.random.default_rng(3)
    columns = [rng.choice(np.arange(-1, 9), size=rng.integers(1, 6), replace=False)
               for _ in range(40)]
    x = np.zeros((40, 9))
    for i, cols in enumerate(columns):
        x[i, cols[cols >= 0]] = 1.0
    for max_pairs in (1, 7, 1 << 24):  # a flush after every row, every few rows, once
        np.testing.assert_array_equal(item_item.cooccurrence(columns, 9, max_pairs), x.T @ x)


def test_the_runtimes_numpy_scores_are_the_graphs():
    """`streams.inference.item_item_scores` (the offline ranking) computes what
    `item_item.scores` (exported in fusion.onnx) does, decay included."""
    from streams.inference import item_item_scores

    table = item_item.fit(_seqs(), 12, 1.0, ItemItemConfig(neighbours=3))
    hist, mask = (torch.from_numpy(a) for a in
                  pad_left([np.array([1, 2, 3]), np.array([4]), np.array([5, 5])], 4))
    for half_life in (1e9, 2.0):
        decay = item_item.decay_of(half_life)
        expected = item_item.scores(torch.from_numpy(table.rows), torch.from_numpy(table.weights),
                                    hist, mask, 12, torch.tensor(decay))
        got = item_item_scores(table.rows, table.weights, hist.numpy(), mask.numpy(), decay, 12)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
