import json

import pytest

from model_export import data


def test_movielens_loader_orders_by_time_and_reads_titles(tmp_path):
    (tmp_path / "u.item").write_text(
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
        "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0\n",
        encoding="latin-1")
    (tmp_path / "u.data").write_text("1\t2\t3\t200\n1\t1\t5\t100\nbad line\n1\t9\t4\t50\n2\t1\t4\t10\n")
    ds = data.load_movielens(tmp_path)
    assert [(i.user_id, i.item_id, i.ts) for i in ds.interactions] == [
        ("1", "1", 100), ("1", "2", 200), ("2", "1", 10)]
    assert ds.skipped == {"malformed_line": 1, "unknown_item": 1}
    assert ds.items["1"]["title"] == "Toy Story (1995)"
    assert ds.items["2"]["text"] == "GoldenEye (1995). Action, Adventure, Thriller"


def test_missing_movielens_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DataError, match="u.data"):
        data.load_movielens(tmp_path)


def test_generic_jsonl_log_with_catalog_and_bad_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"user_id": "a", "item_id": "x", "timestamp": 5_000_000_000_000},
            {"user_id": "a", "item_id": "y", "timestamp": 4, "event_type": "view"},
            {"user_id": "a", "item_id": "zz", "timestamp": 6}, {"user_id": "a"}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    catalog = tmp_path / "items.csv"
    catalog.write_text("item_id,text\nx,Item X\ny,Item Y\n")
    ds = data.load_log(log, catalog)
    assert [(i.item_id, i.ts, i.event_type) for i in ds.interactions] == [
        ("y", 4, "view"), ("x", 5_000_000_000, "click")]
    assert ds.skipped == {"unknown_item": 1, "malformed_line": 2}


def write_movielens_csv(folder):
    """MovieLens' current layout, written by the test (never MovieLens data)."""
    folder.mkdir(exist_ok=True)
    (folder / "movies.csv").write_text('movieId,title,genres\n1,Film One (1999),Comedy|Drama\n'
                                       '2,"Film, Two (2001)",(no genres listed)\n')
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        "7,2,4.0,1000\n7,1,3.5,900\n8,1,5.0,950\n")
    return folder


@pytest.mark.parametrize("as_file", [False, True])
def test_movielens_current_layout_is_read_from_the_folder_or_its_ratings_csv(tmp_path, as_file):
    folder = write_movielens_csv(tmp_path / "ml-latest-small")
    ds = data.load_any(folder / "ratings.csv" if as_file else folder)
    assert [(i.user_id, i.item_id, i.ts) for i in ds.interactions] == [
        ("7", "1", 900), ("7", "2", 1000), ("8", "1", 950)]
    assert ds.items["1"]["text"] == "Film One (1999). Comedy, Drama"
    assert ds.items["2"] == {"title": "Film, Two (2001)", "text": "Film, Two (2001). "}
    assert ds.name == "ml-latest-small" and not ds.skipped


def test_a_log_with_unknown_columns_names_what_was_expected_and_found(tmp_path):
    log = tmp_path / "events.csv"
    log.write_text("who,what,when\na,x,1\nb,y,2\n")
    with pytest.raises(data.DataError) as err:
        data.load_any(log)
    message = str(err.value)
    assert "user_id,item_id,timestamp" in message and "['what', 'when', 'who']" in message
    assert "first bad line 2: {'who': 'a', 'what': 'x', 'when': '1'}" in message
    assert "\n" not in message


def test_a_folder_of_neither_movielens_layout_mentions_the_generic_format(tmp_path):
    with pytest.raises(data.DataError, match="neither MovieLens layout.*user_id,item_id,timestamp"):
        data.load_any(tmp_path)
    with pytest.raises(data.DataError, match="not found: --data"):
        data.load_any(tmp_path / "missing")


def test_a_log_without_catalog_warns_which_rows_lose_their_meaning(tmp_path, caplog):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\na,x,1\na,y,2\n")
    data.load_log(log)
    assert any("no --catalog" in r.message and "bert_text" in r.message for r in caplog.records)


def test_duplicates_are_dropped_and_counted(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\na,x,1\na,x,1\na,y,2\n")
    ds = data.load_log(log)
    assert len(ds.interactions) == 2 and ds.skipped == {"duplicate": 1}


def test_leave_one_out_split():
    ds = data.synthetic(n_users=5, n_items=40, events_per_user=10, seed=3)
    split = data.leave_one_out(ds)
    seqs = data.user_sequences(ds)
    for user, seq in seqs.items():
        assert split.test[user] == seq[-1] and split.valid[user] == seq[-2]
        assert split.train[user] == seq[:-2]
        assert [i.ts for i in seq] == sorted(i.ts for i in seq)


def test_synthetic_stream_has_planted_sessions():
    ds = data.synthetic(n_users=20, n_items=80, n_topics=8, events_per_user=24, seed=0)
    same_topic = total = 0
    for seq in data.user_sequences(ds).values():
        for a, b in zip(seq, seq[1:]):
            total += 1
            same_topic += (int(a.item_id) - int(b.item_id)) % 8 == 0
    assert same_topic / total > 0.7  # consecutive items mostly share a topic
    assert data.synthetic(seed=1).content_hash() == data.synthetic(seed=1).content_hash()


def catalog_with_unused_items(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\na,x,1\na,y,2\nb,x,3\n")
    catalog = tmp_path / "items.csv"
    catalog.write_text("item_id,text\nx,Item X\ny,Item Y\nz,Item Z\nw,Item W\n")
    return log, catalog


def test_catalog_items_never_in_the_log_are_counted_and_can_be_left_out(tmp_path):
    ds = data.load_log(*catalog_with_unused_items(tmp_path))
    assert data.never_chosen(ds) == 2 and len(ds.items) == 4
    cut = data.items_in_log(ds)
    assert sorted(cut.items) == ["x", "y"] and cut.interactions == ds.interactions
    assert data.never_chosen(cut) == 0 and len(ds.items) == 4  # the original is untouched


def test_the_cli_warns_of_unused_catalog_items_and_restricts_on_request(tmp_path, caplog):
    import argparse

    from model_export.__main__ import _dataset

    log, catalog = catalog_with_unused_items(tmp_path)
    args = argparse.Namespace(data=str(log), catalog=str(catalog), min_user_interactions=0,
                              min_item_interactions=0, items_in_log=False)
    assert len(_dataset(args).items) == 4
    assert any("2 of the catalog's 4 items never occur" in r.message and "--items-in-log" in r.message
               for r in caplog.records)
    caplog.clear()
    args.items_in_log = True
    assert sorted(_dataset(args).items) == ["x", "y"]
    assert not any("never occur" in r.message for r in caplog.records)


def test_quality_reads_the_catalog_and_writes_under_the_datasets_name(tmp_path, monkeypatch):
    import model_export.quality
    from model_export.__main__ import main

    log, catalog = catalog_with_unused_items(tmp_path)
    seen = {}

    def fake_quality(dataset, seeds, out, rebuild=True, long_cfg=None):
        seen.update(items=dict(dataset.items), seeds=seeds, out=out, long_cfg=long_cfg)
        return {"ndcg@10": {}, "best_fused": "fused_fixed", "best_fused_gain_vs_gpt": 0.0,
                "paired_vs_gpt_pooled": {}}

    monkeypatch.setattr(model_export.quality, "quality", fake_quality)
    monkeypatch.chdir(tmp_path)
    assert main(["quality", "--data", str(log), "--catalog", str(catalog), "--seeds", "3"]) == 0
    assert seen["seeds"] == [3] and str(seen["out"]) == f"artifacts/quality-{log.stem}"
    assert seen["long_cfg"] == {"n_layer": 0}  # the pooled tower unless --long-layers
    assert (tmp_path / f"artifacts/quality-{log.stem}.json").is_file()
    texts = {item["text"] for item in seen["items"].values()}
    assert texts == {"Item X", "Item Y", "Item Z", "Item W"}
