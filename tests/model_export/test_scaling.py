"""The scaling benchmark's parts: its log is what the generic loader reads, and its peak RSS
is the measured process's own."""
import json
import subprocess
import sys

import pytest

from model_export import data, scaling


def test_the_scaled_log_is_read_back_by_the_generic_loader(tmp_path):
    n = scaling.write_log_apart(tmp_path, users=12, items=40)
    ds = data.load_any(tmp_path / "log.csv", tmp_path / "items.csv")
    assert len(ds.interactions) == n == 12 * scaling.EVENTS_PER_USER
    assert len(ds.items) == 40 and not ds.skipped
    assert ds.items["3"]["text"] == data.synthetic(n_users=1, n_items=40).items["3"]["text"]


def measured_from_a_small_process(cmd: list[str], log_path) -> dict:
    """As `scaling` runs it: from a process that holds no data (pytest's is large by now, and
    a child's peak includes its starter's)."""
    code = ("import json, sys; from pathlib import Path; from model_export import scaling; "
            f"print(json.dumps(scaling.measured({cmd!r}, Path({str(log_path)!r}))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_peak_rss_is_the_child_process_own(tmp_path):
    big = measured_from_a_small_process([sys.executable, "-c", "b = b'x' * (300 * 2**20)"],
                                        tmp_path / "big.log")
    small = measured_from_a_small_process([sys.executable, "-c", "pass"], tmp_path / "small.log")
    assert big["peak_rss_mib"] >= 300 > small["peak_rss_mib"]
    with pytest.raises(data.DataError, match="exited with 3; see .*fail.log"):
        scaling.measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log")


def test_scales_are_multiples_of_users_and_items():
    assert scaling.parse_scale("100x10") == (100, 10)
    with pytest.raises(data.DataError, match="USERSxITEMS"):
        scaling.parse_scale("10")


def test_rows_of_other_scales_are_kept_and_ordered(tmp_path, monkeypatch):
    def fake_run(scale, root, full, epochs):  # the measured part is tested above
        u, i = scaling.parse_scale(scale)
        return {"scale": scale, "users": u, "items": i, "interactions": u * 100,
                "build": {"seconds": 1.0, "peak_rss_mib": 1}, "evaluate": {"seconds": 1.0, "peak_rss_mib": 1}}

    monkeypatch.setattr(scaling, "run_scale", fake_run)
    out = tmp_path / "scaling.json"
    scaling.scaling(["10x1"], tmp_path, out, None, False)
    rows = scaling.scaling(["1x1"], tmp_path, out, tmp_path / "plot.png", False)
    assert [r["scale"] for r in rows] == ["1x1", "10x1"]
    assert [r["scale"] for r in json.loads(out.read_text())] == ["1x1", "10x1"]
    assert (tmp_path / "plot.png").stat().st_size > 0
