"""ONNX against torch at several batch sizes and lengths, with padding."""
import numpy as np
import torch

from model_export.export import export, fusion_cases, short_term_cases, validate
from model_export.fusion import FusionHead, InterestGate
from model_export.gpt import GPTConfig, ItemGPT, ShortTermHead
from streams.bundle import FUSION, SHORT_TERM
from streams.inference import make_session


def test_short_term_parity_even_when_left_in_training_mode(tmp_path):
    gpt = ItemGPT(GPTConfig(n_rows=60, max_len=16, dropout=0.5))
    head = ShortTermHead(gpt)
    head.train()  # the known trap: export must still produce (and leave) an eval-mode graph
    path = export(head, short_term_cases(60, 16)["B3xT7"], SHORT_TERM, tmp_path / "st.onnx")
    assert not head.training and not gpt.training
    assert validate(head, path, SHORT_TERM, short_term_cases(60, 16, seed=5)) == []


def test_served_head_equals_the_full_forwards_newest_position():
    """The exported head runs the last block for the newest position only; same numbers."""
    gpt = ItemGPT(GPTConfig(n_rows=60, max_len=16, n_layer=3)).eval()
    head = ShortTermHead(gpt).eval()
    for name, (rows, mask) in short_term_cases(60, 16, seed=3).items():
        with torch.no_grad():
            full = gpt(rows, mask)[:, -1, :]  # (B, C) from every position's states
            served = head(rows, mask)
        assert served.shape == full.shape, name
        assert torch.allclose(served, full, atol=1e-6), (name, (served - full).abs().max())


def test_padding_does_not_change_a_users_vector(tmp_path):
    gpt = ItemGPT(GPTConfig(n_rows=30, max_len=10)).eval()
    head = ShortTermHead(gpt)
    path = export(head, short_term_cases(30, 10)["B3xT7"], SHORT_TERM, tmp_path / "st.onnx")
    session = make_session(path)
    seq = np.array([[5, 9, 3]], dtype=np.int64)
    alone = session.run(None, {"item_rows": seq, "mask": np.ones((1, 3), np.float32)})[0]
    padded = np.array([[0, 0, 0, 5, 9, 3], [1, 2, 3, 4, 5, 6]], dtype=np.int64)
    mask = np.array([[0, 0, 0, 1, 1, 1], [1] * 6], dtype=np.float32)
    batch = session.run(None, {"item_rows": padded, "mask": mask})[0]
    assert np.abs(batch[0] - alone[0]).max() < 1e-5


def test_fusion_parity_and_ranges(tmp_path):
    torch.manual_seed(0)
    item_emb = torch.randn(80, 16)
    head = FusionHead(item_emb, InterestGate(16), 10, *_neighbours(80), neighbour_decay=0.9)
    cases = fusion_cases(80, 16, max_k=10)
    path = export(head, cases["B4xN10m2"], FUSION, tmp_path / "fu.onnx")
    assert validate(head, path, FUSION, cases) == []
    case = dict(zip(FUSION.inputs, cases["B32xN50m1"]))
    fused, alpha, scores, rows, item_part = head(*cases["B32xN50m1"])
    k = int(case["k"])
    assert fused.shape == (32, 16) and rows.shape == item_part.shape == (32, k)
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert torch.all(alpha[case["has_long"][:, 0] == 0] == 1.0)  # no long vector: short only
    assert case["seen_mask"].gather(1, rows).sum() == 0  # seen rows never recommended


def _neighbours(n_rows: int, k: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, n_rows, (n_rows, k), generator=gen)
    weights = torch.rand(n_rows, k, generator=gen)
    rows[0], weights[0] = 0, 0.0  # padding has no successors
    return rows, weights


def test_fusion_adds_the_item_item_scores_of_the_window_at_their_weight():
    """Each real history row adds its successors' weights (a row twice: twice); padding adds
    nothing; the graph's top_item_item is that share of each returned score."""
    torch.manual_seed(2)
    n_rows = 30
    nb_rows, nb_w = _neighbours(n_rows)
    head = FusionHead(torch.randn(n_rows, 8), InterestGate(8), 10, nb_rows, nb_w)
    case = dict(zip(FUSION.inputs, fusion_cases(n_rows, 8, max_k=10)["B4xN10m0"]))
    case["hist_rows"][0] = torch.tensor([0, 0, 0, 0, 0, 0, 0, 7, 7, 3])
    case["hist_mask"][0] = (case["hist_rows"][0] > 0).float()
    expected = torch.zeros(4, n_rows)
    for b in range(4):
        for row, real in zip(case["hist_rows"][b].tolist(), case["hist_mask"][b].tolist()):
            for to, w in zip(nb_rows[row].tolist(), nb_w[row].tolist()):
                expected[b, to] += real * w
    case["seen_mask"] = torch.zeros(4, n_rows)
    case["item_item_weight"] = torch.tensor([0.0])
    _, _, base, rows, off = head(*case.values())
    assert torch.all(off == 0)
    case["item_item_weight"] = torch.tensor([2.5])
    _, _, scores, rows, part = head(*case.values())
    torch.testing.assert_close(part, 2.5 * expected.gather(1, rows))
    _, _, base_all, base_rows, _ = head(*{**case, "item_item_weight": torch.tensor([0.0]),
                                          "k": torch.tensor([n_rows])}.values())
    plain = torch.zeros(4, n_rows).scatter(1, base_rows, base_all)
    torch.testing.assert_close(scores, (plain + 2.5 * expected).gather(1, rows))


def test_fusion_graph_returns_k_items_for_the_k_fed(tmp_path):
    torch.manual_seed(1)
    head = FusionHead(torch.randn(80, 16), InterestGate(16), 10, *_neighbours(80))
    cases = fusion_cases(80, 16, max_k=10)
    path = export(head, cases["B4xN10m2"], FUSION, tmp_path / "fu.onnx")
    session = make_session(path)
    feeds = {n: t.numpy() for n, t in zip(FUSION.inputs, cases["B32xN50m0"])}
    top = {}
    for k in (1, 3, 10):
        _, _, scores, rows, _ = session.run(None, dict(feeds, k=np.array([k], dtype=np.int64)))
        assert scores.shape == rows.shape == (32, k)
        assert np.all(np.diff(scores, axis=1) <= 0)  # best first
        top[k] = scores
    np.testing.assert_allclose(top[10][:, :3], top[3])  # a shorter list is the longer one's head
    np.testing.assert_allclose(top[3][:, :1], top[1])


def _long_term_model(n_layer: int, half_life: float = 1e9):
    from model_export.long_term import LongTermConfig, LongTermModel

    torch.manual_seed(n_layer)
    cfg = LongTermConfig(n_rows=70, d_text=12, d_out=16, window=24, n_layer=n_layer,
                         half_life=half_life, d_model=16, dropout=0.3)
    return LongTermModel(cfg, torch.randn(70, 12)).eval()


def test_long_term_parity_with_padding_for_the_pooled_tower_and_the_bert(tmp_path):
    from model_export.export import long_term_cases, long_term_head_cases
    from model_export.long_term import LongTermGraph, LongTermHeadGraph
    from streams.bundle import LONG_TERM, LONG_TERM_HEAD

    for n_layer in (0, 2):
        graph = LongTermGraph(_long_term_model(n_layer))
        graph.train()  # export must still give an eval-mode graph
        cases = long_term_cases(70, 24, seed=n_layer)
        path = export(graph, cases["B3xW7"], LONG_TERM, tmp_path / f"lt{n_layer}.onnx")
        assert validate(graph, path, LONG_TERM, long_term_cases(70, 24, seed=9)) == []
        head = LongTermHeadGraph(graph.model)
        path = export(head, long_term_head_cases(16)["B5"], LONG_TERM_HEAD, tmp_path / "h.onnx")
        assert validate(head, path, LONG_TERM_HEAD, long_term_head_cases(16, seed=4)) == []


def test_long_term_vector_ignores_padding():
    model = _long_term_model(2)
    rows = torch.tensor([[0, 0, 5, 9, 3], [1, 2, 3, 4, 5]])
    weights = (rows > 0).float()
    with torch.no_grad():
        batch = model(rows, weights)
        alone = model(rows[:1, 2:], weights[:1, 2:])
    assert torch.allclose(batch[0], alone[0], atol=1e-5)
