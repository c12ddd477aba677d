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
