import numpy as np
import torch

from model_export import train_long_term as tlt
from model_export.gpt import GPTConfig, ItemGPT
from model_export.long_term import LongTermConfig


def test_the_tower_is_chosen_on_its_own_validation_score_not_the_fused_one(monkeypatch):
    """Four candidates whose fused scores rank them the other way round from their scores
    alone: the one best alone is kept, with its own best epoch for the refit."""
    alone = {(1e9, True): 0.069, (1e9, False): 0.0765, (50.0, True): 0.0775, (50.0, False): 0.075}
    fused = {(1e9, True): 0.1161, (1e9, False): 0.1139, (50.0, True): 0.1128, (50.0, False): 0.1136}
    epochs = {(1e9, True): 1, (1e9, False): 11, (50.0, True): 5, (50.0, False): 2}

    class Tower:
        def __init__(self, cfg):
            self.cfg = cfg

    def train_tower(cfg, text_emb, item_emb, seqs, val, tcfg):
        key = (cfg.half_life, cfg.use_text)
        return Tower(cfg), alone[key], epochs[key]

    monkeypatch.setattr(tlt, "train_tower", train_tower)
    monkeypatch.setattr(tlt.Validation, "h_l", lambda self, model: model)
    monkeypatch.setattr(tlt, "best_fixed_alpha", lambda h_s, tower, emb, val: (
        0.9, fused[(tower.cfg.half_life, tower.cfg.use_text)]))
    gpt = ItemGPT(GPTConfig(n_rows=5, d_model=8, n_head=2, n_layer=1, max_len=4))
    val = tlt.Validation.build(gpt, [[1, 2, 3], [2, 3]], [4, 1])
    base = LongTermConfig(n_rows=5, d_text=3, d_out=8)
    choice = tlt.choose_long_term(base, torch.zeros(5, 3), gpt, [[1, 2, 3], [2, 3, 4]], val,
                                  tlt.LongTermTrainConfig(progress=False))
    assert (choice.model.cfg.half_life, choice.model.cfg.use_text) == (50.0, True)
    assert choice.epochs == 5
    assert choice.valid["(layers=0, half_life=inf, text=True)"]["fused"] == 0.1161
    assert np.isclose(choice.valid["(layers=0, half_life=50, text=True)"]["alone"], 0.0775)


def _tiny_tower(ema_decay, epochs):
    """One optimiser step per epoch on three short sequences, with the same seed each call."""
    base = LongTermConfig(n_rows=6, d_text=3, d_out=8, d_model=8)
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([2, 3, 4, 5, 1]), np.array([5, 4, 3, 2])]
    tcfg = tlt.LongTermTrainConfig(max_epochs=epochs, epoch_examples=4, batch_size=4, seed=0,
                                   progress=False, ema_decay=ema_decay)
    torch.manual_seed(0)
    return tlt.train_tower(base, torch.randn(6, 3), torch.randn(6, 8), seqs, None,
                           tcfg)[0].state_dict()


def test_the_served_tower_is_the_moving_mean_of_its_weights():
    """The mean starts at the first step's weights; with a decay of 1 it stays there, so
    three steps serve what one step does. Without the mean, three steps serve trained on."""
    one, three = _tiny_tower(1.0, 1), _tiny_tower(1.0, 3)
    assert all(torch.equal(one[k], three[k]) for k in one)
    one, three = _tiny_tower(None, 1), _tiny_tower(None, 3)
    assert not torch.equal(one["head.out.weight"], three["head.out.weight"])


def test_each_bert_input_predicts_the_next_items_as_a_stale_vector_serves_them():
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([2, 3])]
    targets = tlt.future_targets(seqs, np.array([[0, 1], [0, 4], [1, 1]]), 3)
    assert targets.tolist() == [[2, 3, 4], [5, -100, -100], [3, -100, -100]]


def test_the_bert_kind_trains_on_several_targets_per_input_at_one_half_life(monkeypatch):
    """An epoch encodes epoch_examples / future_targets inputs; the pooled kind one target
    per input. The BERT kind is trained at the first half-life only (it has positions)."""
    seen_widths, tried = [], []
    original = tlt.future_targets

    def spy(seqs, examples, n):
        seen_widths.append((len(examples), n))
        return original(seqs, examples, n)

    monkeypatch.setattr(tlt, "future_targets", spy)
    seqs = [np.array([1, 2, 3, 4, 5] * 4), np.array([2, 3, 4, 5, 1] * 4)]
    for n_layer in (0, 1):
        seen_widths.clear()
        base = LongTermConfig(n_rows=6, d_text=3, d_out=8, d_model=8, n_layer=n_layer,
                              window=8)
        tcfg = tlt.LongTermTrainConfig(max_epochs=1, epoch_examples=16, batch_size=64,
                                       future_targets=4, progress=False)
        tlt.train_tower(base, torch.randn(6, 3), torch.randn(6, 8), seqs, None, tcfg)
        tried.append(seen_widths[:])
    assert tried == [[(16, 1)], [(4, 4)]]

    def train_tower(cfg, *args):
        tried.append(cfg.half_life)
        return cfg, 0.1, 1

    monkeypatch.setattr(tlt, "train_tower", train_tower)
    monkeypatch.setattr(tlt.Validation, "h_l", lambda self, model: model)
    monkeypatch.setattr(tlt, "best_fixed_alpha", lambda *a: (0.9, 0.1))
    gpt = ItemGPT(GPTConfig(n_rows=6, d_model=8, n_head=2, n_layer=1, max_len=4))
    val = tlt.Validation.build(gpt, [[1, 2, 3], [2, 3]], [4, 1])
    tried.clear()
    tlt.choose_long_term(LongTermConfig(n_rows=6, d_text=3, d_out=8, n_layer=2), torch.zeros(6, 3),
                         gpt, [[1, 2, 3], [2, 3, 4]], val, tlt.LongTermTrainConfig(progress=False))
    assert tried == [1e9, 1e9]  # text on and off, one half-life
