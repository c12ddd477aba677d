"""What keeps a build's memory proportional to the data: samples and chunks that must not
change what is computed."""
import numpy as np
import pytest
import torch

from model_export import train
from model_export.train_long_term import NEG_INF, ndcg_at_10


def test_ndcg_in_chunks_equals_the_whole_matrix():
    gen = torch.Generator().manual_seed(0)
    h, items = torch.randn(50, 8, generator=gen), torch.randn(30, 8, generator=gen)
    targets = torch.randint(1, 30, (50,), generator=gen)
    seen = [np.array([(i * 7) % 29 + 1]) for i in range(50)]
    seen = [s[s != int(t)] for s, t in zip(seen, targets)]
    scores = h @ items.T
    scores[:, 0] = NEG_INF
    for i, rows in enumerate(seen):
        scores[i, torch.from_numpy(rows)] = NEG_INF
    rank = 1 + (scores > scores.gather(1, targets[:, None])).sum(1)
    whole = float(torch.where(rank <= 10, 1.0 / torch.log2(rank.float() + 1), 0.0).mean())
    assert ndcg_at_10(h, items, targets, seen, chunk=7) == pytest.approx(whole, abs=1e-6)
    assert ndcg_at_10(h, items, targets, seen, chunk=1024) == pytest.approx(whole, abs=1e-6)


def test_projection_examples_cover_every_position_once_or_a_seeded_sample():
    text = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    seqs = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10], [11, 3, 2]]
    every = train.projection_examples(seqs, text, 1000.0, max_len=3, max_examples=100, seed=0)
    # positions >= 1 of each sequence, each once: 6 + 1 + 0 + 2
    assert len(every.target) == 9
    assert sorted(every.target.tolist()) == sorted([2, 3, 4, 5, 6, 7, 9, 3, 2])
    first = train.pooled_prefixes(seqs[0], text, 1000.0)
    i = every.target.tolist().index(7)  # the target 7 follows the prefix [1..6]
    assert np.allclose(every.pooled[i].numpy(), first[5])
    sample = train.projection_examples(seqs, text, 1000.0, max_len=3, max_examples=4, seed=0)
    again = train.projection_examples(seqs, text, 1000.0, max_len=3, max_examples=4, seed=0)
    assert len(sample.target) == 4 and torch.equal(sample.pooled, again.pooled)
    rows = {tuple(r) for r in every.pooled.numpy().round(6).tolist()}
    assert all(tuple(r) in rows for r in sample.pooled.numpy().round(6).tolist())


def test_projection_examples_come_in_the_gpt_windows_order():
    """The order the projection trained in before it was sampled: the same batches, the
    same weights (ml-100k's figures unchanged to the last digit)."""
    rng = np.random.default_rng(1)
    text = rng.normal(size=(50, 6)).astype(np.float32)
    seqs = [list(rng.integers(1, 50, size=n)) for n in [0, 1, 2, 5, 21, 22, 23, 45, 3]]
    ex = train.projection_examples(seqs, text, 100.0, 20, 10**6, 0)
    pooled, target = [], []
    for seq in seqs:
        prefixes = train.pooled_prefixes(seq, text, 100.0) if len(seq) >= 2 else None
        for end in range(len(seq), 1, -20):  # windows, newest first; positions ascending
            for t in range(max(0, end - 21), end - 1):
                pooled.append(prefixes[t])
                target.append(seq[t + 1])
    assert ex.target.tolist() == target
    assert np.array_equal(ex.pooled.numpy(), np.stack(pooled))
