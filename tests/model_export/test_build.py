"""A quick build on synthetic data: the bundle is complete and the models learned something."""
import numpy as np
import pytest

from model_export import data
from model_export.item_item import ItemItemConfig
from model_export.evaluate import default_rows, evaluate
from streams.bundle import FILES, load_bundle
from streams.errors import BundleError


def test_quick_bundle_is_complete_and_fused_beats_popularity(quick_bundle):
    bundle = load_bundle(quick_bundle)
    for name in FILES.values():
        assert (quick_bundle / name).is_file()
    m = bundle.manifest["metrics"]
    assert set(m) == set(default_rows(bundle))
    assert m["gpt"]["ndcg@10"] > 2 * m["popularity"]["ndcg@10"]
    assert m["fused_gate"]["ndcg@10"] > m["popularity"]["ndcg@10"]
    assert m["bert"]["ndcg@10"] > m["popularity"]["ndcg@10"]
    assert bundle.manifest["parity"] == {"short_term.onnx": "ok", "text_encoder.onnx": "ok",
                                         "fusion.onnx": "ok", "long_term.onnx": "ok",
                                         "long_term_head.onnx": "ok"}
    assert bundle.manifest["item_item"]["weight"] in bundle.manifest["item_item"]["config"]["weights"]


def test_evaluate_counts_unknown_items_instead_of_scoring_them(quick_bundle):
    ds = data.synthetic(n_users=30, n_items=240, events_per_user=30, seed=1)
    test_item = data.user_sequences(ds)["3"][-1]
    ds.interactions = [data.Interaction(i.user_id, "ghost", i.ts) if i == test_item else i
                       for i in ds.interactions]
    result = evaluate(quick_bundle, ds, progress=False, rows=("popularity", "gpt"))
    assert result["skipped"] == {"unknown_target_item": 1}
    assert result["n_users"] == 29
    for row in result["models"].values():
        assert 0 <= row["hr@10"] <= 1 and 0 <= row["coverage@10"] <= 1


def test_evaluate_scores_the_recent_items_the_worker_holds(quick_bundle, monkeypatch):
    """The GPT reads its newest max_len items by itself; the rest of what the worker passes
    (the fusion's history, the attention weight's N) is its state's recent items, up to
    hist_len. The evaluation must pass the same, not the GPT's window."""
    from streams.inference import Recommender

    lengths, recommend = [], Recommender.recommend

    def spy(self, sequences, *args, **kwargs):
        lengths.extend(len(s) for s in sequences)
        return recommend(self, sequences, *args, **kwargs)

    monkeypatch.setattr(Recommender, "recommend", spy)
    dims = load_bundle(quick_bundle).dims
    ds = data.synthetic(n_users=20, n_items=240, events_per_user=45, seed=2)
    evaluate(quick_bundle, ds, progress=False, rows=("gpt", "fused_attention"))
    assert dims["max_len"] < max(lengths) <= dims["hist_len"]


def test_corrupt_or_missing_bundle_names_the_file(quick_bundle, tmp_path):
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle(tmp_path / "nowhere")
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(quick_bundle, copy)
    (copy / "fusion.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="fusion.onnx"):
        load_bundle(copy)
    (copy / "fusion.onnx").unlink()
    with pytest.raises(BundleError, match="fusion.onnx"):
        load_bundle(copy)


def test_fused_beats_both_towers_when_the_taste_lies_beyond_the_short_window(tmp_path):
    """Synthetic users with a stable taste (3 of 12 topics) and short random sessions; the
    GPT reads 3 items, so the taste is beyond its window: fusion must beat both alone."""
    from model_export.build import build
    from model_export.train import TrainConfig
    from model_export.train_long_term import LongTermTrainConfig

    ds = data.synthetic(n_users=300, n_items=240, n_topics=12, events_per_user=40,
                        session_len=3, walk=False, taste=3, in_taste=0.9, seed=1)
    manifest = build(ds, tmp_path / "b", {"max_len": 3},
                     TrainConfig(epochs=12, fusion_epochs=3, progress=False),
                     long_train=LongTermTrainConfig(max_epochs=10, half_lives=(1e9,),
                                                    use_text=(True,), progress=False))
    m = {name: row["ndcg@10"] for name, row in manifest["metrics"].items()}
    best = max(m[name] for name in ("fused_fixed", "fused_gate"))
    assert best > 1.03 * m["gpt"] and best > 1.5 * m["long_pooled"], m
    # the build chose to use a long-term part: the long-term vector or the item-item scores
    assert manifest["fixed_alpha"] < 1.0 or manifest["item_item"]["weight"] > 0


def test_the_served_models_are_refit_on_what_is_known_before_the_test_item(quick_bundle):
    """The choices come from validation; the served GPT and tower learned the validation
    items too (their epochs as chosen), never a test item."""
    import torch

    from model_export.build import user_rows
    from model_export.long_term import LongTermConfig, LongTermModel

    long_term = load_bundle(quick_bundle).manifest["long_term"]
    assert long_term["refit"] is True and long_term["epochs"] >= 1
    ds = data.synthetic(n_users=200, n_items=240, events_per_user=30, seed=1)
    split = data.leave_one_out(ds)
    row_of = {it: i for i, it in enumerate(sorted({x.item_id for x in ds.interactions}), 1)}
    seqs, times = user_rows(split, row_of, with_valid=True)
    user = next(iter(split.valid))
    index = list(split.train).index(user)
    assert seqs[index][-1] == row_of[split.valid[user].item_id]
    assert len(seqs[index]) == len(split.train[user]) + 1 == len(times[index])
    saved = torch.load(quick_bundle / "long_term.pt")
    model = LongTermModel(LongTermConfig(**saved["config"]), saved["state_dict"]["text_emb"])
    model.load_state_dict(saved["state_dict"])  # the refit weights load into the served config


def test_the_text_profile_row_on_a_sample_scores_those_users_as_all_would(quick_bundle):
    from model_export.evaluate import Protocol, profile_sample, test_cases

    ds = data.synthetic(n_users=40, n_items=240, events_per_user=30, seed=4)
    rows = ("gpt", "bert_text")
    sampled = evaluate(quick_bundle, ds, progress=False, rows=rows,
                       protocol=Protocol(text_profile_users=12))
    assert sampled["protocol"]["users_per_row"] == {"gpt": 40, "bert_text": 12}
    # the same 12 users evaluated alone: the same bert_text figures, and gpt on them is the
    # base of the paired comparison
    cases, _ = test_cases(load_bundle(quick_bundle), ds)
    users = sorted(data.user_sequences(ds))
    assert len(cases) == len(users) == 40
    keep = {users[i] for i in profile_sample(40, Protocol(text_profile_users=12))}
    alone_ds = data.Dataset(ds.name, [it for it in ds.interactions if it.user_id in keep], ds.items)
    alone = evaluate(quick_bundle, alone_ds, progress=False, rows=rows)
    assert alone["n_users"] == 12 and alone["protocol"]["users_per_row"]["bert_text"] == 12
    assert sampled["models"]["bert_text"] == pytest.approx(alone["models"]["bert_text"], abs=1e-9)
    assert sampled["paired_vs_gpt"]["bert_text"] == alone["paired_vs_gpt"]["bert_text"]


def test_quick_builds_one_item_item_setting_without_refit_or_the_text_profile_row(
        monkeypatch, tmp_path):
    import model_export.build
    from model_export.__main__ import main

    seen = {}

    def fake_build(dataset, out, gpt_cfg, cfg, **kw):
        seen.update(kw, refit=cfg.refit)
        return {"version": "v", "items": {"ranked": 1, "never_in_log": 0}, "metrics": {}}

    monkeypatch.setattr(model_export.build, "build", fake_build)
    assert main(["build", "--data", "synthetic", "--quick", "--out", str(tmp_path)]) == 0
    grid = seen["item_cfg"]
    assert len(grid.l2_scales) * len(grid.half_lives) == 1 and not seen["refit"]
    assert "bert_text" not in seen["evaluate_rows"] and "fused_fixed" in seen["evaluate_rows"]
    assert main(["build", "--data", "synthetic", "--out", str(tmp_path)]) == 0
    assert seen["evaluate_rows"] is None and seen["refit"]


def test_a_small_catalog_of_short_histories_builds_and_a_tiny_one_is_refused(tmp_path):
    """Logs we do not have: no user with more than 10 items (the gate has no held-out tail)
    and fewer than 100 items (a recommendation then holds at most the catalog); a catalog of
    10 items or fewer cannot be ranked at 10 and is refused in one line."""
    from model_export import data
    from model_export.build import BuildError, build
    from model_export.train import TrainConfig
    from model_export.train_long_term import LongTermTrainConfig
    from streams.bundle import load_bundle

    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(60):
        for t, item in enumerate(rng.choice(40, size=int(rng.integers(4, 9)), replace=False)):
            rows.append(f"u{u},i{item},{1_700_000_000 + 60 * t}")
    log = tmp_path / "short.csv"
    log.write_text("\n".join(rows) + "\n")
    cfg = TrainConfig(epochs=2, fusion_epochs=1, gate_epochs=1, refit=False, progress=False)
    fast = LongTermTrainConfig(max_epochs=1, half_lives=(1e9,), use_text=(False,), progress=False)
    manifest = build(data.load_any(log), tmp_path / "bundle", {"max_len": 20}, cfg,
                     long_train=fast, item_cfg=ItemItemConfig(l2_scales=(1.0,), half_lives=(1e9,)),
                     evaluate_rows=("gpt", "fused_fixed"))
    assert manifest["dims"]["max_k"] == 40
    assert load_bundle(tmp_path / "bundle").dims["max_k"] == 40
    assert 0.0 <= manifest["metrics"]["fused_fixed"]["ndcg@10"] <= 1.0

    tiny = tmp_path / "tiny.csv"
    tiny.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{i},{1_700_000_000 + i}\n" for u in range(5) for i in range(6)))
    with pytest.raises(BuildError, match="6 items; a recommender needs more than 10"):
        build(data.load_any(tiny), tmp_path / "tiny-bundle", {"max_len": 20}, cfg,
              long_train=fast)
