"""Replay, record, /metrics and the dashboard against the real broker and worker."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import numpy as np
import pytest
from conftest import ROOT, settings_env, unique_settings
from helpers import collect, copy_bundle

from streams.bundle import load_bundle
from streams.kafka.clients import ensure_topics
from streams.tools.replay import read_recorded

pytestmark = pytest.mark.integration


def cli(settings, *args, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams", *args],
                          env={**settings_env(settings), **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def write_log(path: Path, items, n=60, users=4) -> Path:
    rows = [{"user_id": f"r{i % users}", "item_id": items[(i * 5) % len(items)],
             "timestamp": 1_700_000_000 + (n - i) * 7, "event_type": "click"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_replay_worker_record_round_trip(stack, quick_bundle, workers, tmp_path):
    settings = unique_settings(stack, quick_bundle)
    ensure_topics(settings, stack["kafka"])
    worker = workers(settings)
    log = write_log(tmp_path / "log.jsonl", load_bundle(quick_bundle).items.item_ids[:30])
    done = cli(settings, "replay", str(log), "--rate", "200", "--keep-ts", "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["sent"] == 60 and summary["errors"] == 0 and summary["undelivered"] == 0
    assert summary["seconds"] >= 59 / 200 * 0.9  # paced, not all at once

    recs = collect(settings, settings.topic_recommendations, 60)
    expected = list(read_recorded(log))
    assert {r["event_id"] for r in recs} == {e.event_id for e in expected}

    recording = tmp_path / "events.jsonl"
    done = cli(settings, "record", settings.topic_events, "--out", str(recording),
               "--from-beginning", "--idle-timeout", "3", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["written"] == 60
    replayed = list(read_recorded(recording))
    assert sorted(replayed, key=lambda e: e.event_id) == sorted(expected, key=lambda e: e.event_id)

    # a second replay is recognised as the same events: the state counts each once
    assert cli(settings, "replay", str(log), "--max", "--keep-ts", "--quiet").returncode == 0
    collect(settings, settings.topic_recommendations, 120)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{worker.env['WEB_PORT']}/metrics").read().decode()
    assert "events_in_total 120.0" in metrics
    assert "recommendations_out_total 120.0" in metrics
    assert "events_duplicate_total 60.0" in metrics
    assert "inference_seconds_count" in metrics and "redis_seconds_bucket" in metrics
    # start-up's objects are frozen (no full-collection pauses over them), and it is visible
    frozen = re.search(r"^python_gc_frozen_objects (\S+)$", metrics, re.M)
    assert frozen and float(frozen.group(1)) > 10_000, frozen
    assert 'python_gc_collections_total{generation="2"}' in metrics


def test_dashboard_in_a_real_browser(stack, quick_bundle, workers, tmp_path):
    from streams.local.stack import free_port

    settings = unique_settings(stack, quick_bundle, dashboard_port=free_port())
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    env = settings_env(settings)
    dash = subprocess.Popen([sys.executable, "-m", "streams", "dashboard"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{settings.dashboard_port}/"
    items = load_bundle(quick_bundle).items.item_ids[:30]
    feeder = None
    try:
        _wait_http(url)
        log = write_log(tmp_path / "log.jsonl", items, n=1500, users=10)
        feeder = subprocess.Popen([sys.executable, "-m", "streams", "replay", str(log), "--rate", "40",
                                   "--quiet"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        from helpers import send
        send(settings, raw=[b"{broken", b"[]"])
        time.sleep(4)
        first = _snapshot(url)
        time.sleep(3)
        second = _snapshot(url)
        assert second["total"] > first["total"] > 0  # numbers change while events flow
        assert second["dlq"] == {"invalid_json": 1, "not_an_object": 1}
        assert second["latency_ms"]["emitted"]["p50"] is not None
        from browser import Browser

        browser = Browser(tmp_path / "chrome")
        shot = tmp_path / "dashboard.png"
        try:
            total = "document.getElementById('total').textContent"
            page = "document.querySelector('main').innerText"
            rate = "document.querySelector('#chartRate polyline')?.getAttribute('points')"
            lines = "document.querySelectorAll('#chartLatency polyline').length"
            first, rate1, second, rate2, latency_lines, text = browser.visit(
                url, [(3, total), (0, rate), (7, total), (0, rate), (0, lines), (0, page)], shot)
        finally:
            browser.close()
        assert first and second and int(second.split()[0]) > int(first.split()[0])
        # the time series draw from live data and move on: 5-s steps, so 2 points or more
        assert rate1 and rate2 and rate2 != rate1 and len(rate2.split()) >= 2
        assert latency_lines == 2  # p50 and p99
        assert "invalid_json" in text and "not_an_object" in text  # DLQ table from live data
        assert "user" in text and "r1" in text  # latest recommendations rendered
        assert browser.errors == [], browser.errors
        artifacts = ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "dashboard.png").write_bytes(shot.read_bytes())
    finally:
        if feeder:
            feeder.kill()
        dash.terminate()
        dash.wait(10)


def _wait_http(url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def _snapshot(url):
    return orjson.loads(urllib.request.urlopen(url + "api/snapshot").read())


def test_evaluate_stream_prints_online_beside_offline(stack, quick_bundle, tmp_path):
    settings = unique_settings(stack, quick_bundle)
    log = write_log(tmp_path / "log.jsonl", load_bundle(quick_bundle).items.item_ids[:30], n=300, users=6)
    done = cli(settings, "evaluate-stream", "--data", str(log), "--test-share", "0.5", timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["events"] == 300 and result["test_events"] == 150
    assert result["scored"] == 150  # every test event followed an earlier one of its user
    assert 0.0 <= result["online"]["hr@10"] <= 1.0
    assert set(result["offline"]) >= {"gpt", "fused_gate", "popularity"}


def test_bench_writes_its_json_and_table(stack, quick_bundle, tmp_path):
    """The harness end to end at toy size; its figures are `make bench`'s, not asserted here."""
    settings = unique_settings(stack, quick_bundle)
    # no MovieLens: synthetic events over the quick bundle's items (with MovieLens present the
    # harness would rebuild this synthetic bundle on it)
    env = {**settings_env(settings), "DATA_DIR": str(tmp_path / "no-data"),
           "STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "streams", "bench", "--json", str(out), "--events", "1000",
         "--rounds", "2", "--rates", "200", "--duration", "3", "--users", "300",
         "--skip", "inference"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    for agent in ("pipeline", "pipeline_short_term", "passthrough"):
        assert r[agent]["events"] == 1000 and len(r[agent]["rounds_events_per_s"]) == 2
        assert r[agent]["events_per_s"] == max(r[agent]["rounds_events_per_s"]) > 0
        # CPU of one thread over the run's span, in 10-ms ticks: at most one core, give or take
        # a tick or two over a toy run of a few hundred milliseconds
        assert 0.0 <= r[agent]["loop_cores"] <= 1.0 + 0.02 / r[agent]["seconds"] + 0.05
        # the same CPU seconds per event: cores x seconds / events (both rounded)
        per_event = r[agent]["loop_cores"] * r[agent]["seconds"] * 1e6 / 1000
        assert r[agent]["loop_us_per_event"] == pytest.approx(per_event, rel=0.1, abs=10)
    assert r["ratio"] == round(r["pipeline"]["events_per_s"] / r["passthrough"]["events_per_s"], 3)
    # the arm that prices the per-event update: the same worker, no user with a vector
    assert r["pipeline"]["long_term_users"] > 0 == r["pipeline_short_term"]["long_term_users"]
    assert r["long_term_loop_cost"] == round(r["pipeline"]["loop_us_per_event"] /
                                             r["pipeline_short_term"]["loop_us_per_event"] - 1, 3)
    assert "added by them" in done.stdout
    lat = r["latency"]["200"]
    assert lat["events"] == 600 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert r["pipeline"]["p99_ms"] == lat["p99_ms"]
    assert r["state"]["users"] == 300 and r["rss_mb"] > 0
    swap = r["swap"]  # per round a minute (here 3 s) without, then one with a swap in its middle
    assert swap["swaps"] == 2 and len(swap["steady"]) == len(swap["swap"]) == 2
    assert swap["p99_added_ms"] == round(float(np.median([x["p99_ms"] for x in swap["swap"]])) -
                                         float(np.median([x["p99_ms"] for x in swap["steady"]])), 1)
    assert "with a bundle swap" in done.stdout
    eos = r["exactly_once"]  # the worker in each guarantee, alternated; read read_committed
    for arm in ("at_least_once", "exactly_once", "exactly_once_per_batch"):
        assert eos[arm]["events"] == 1000 and len(eos[arm]["rounds_events_per_s"]) == 2
    assert eos["events_per_s_ratio"] == round(eos["exactly_once"]["events_per_s"]
                                              / eos["at_least_once"]["events_per_s"], 3)
    assert eos["per_batch_events_per_s_ratio"] == round(
        eos["exactly_once_per_batch"]["events_per_s"] / eos["at_least_once"]["events_per_s"], 3)
    assert eos["transaction_commit_ms"] == settings.transaction_commit_ms
    for name in ("at_least_once_latency_1000", "latency_1000", "per_batch_latency_1000"):
        assert eos[name]["events"] == 3000 and eos[name]["p99_ms"] > 0
        means = eos[name]["worker_means"]  # from the worker's /metrics: where the time goes
        assert 1 <= means["batch_size"] <= settings.batch_size and means["inference_ms"] > 0
        assert ("transaction_commit_ms" in means) == (name != "at_least_once_latency_1000")
    assert "latency @1000/s p50/p95/p99/max ms, at-least-once / exactly-once" in done.stdout
    assert "per batch @1000/s, means" in done.stdout
    assert "ratio pipeline/passthrough" in done.stdout and "latency @200/s" in done.stdout
    assert "event-loop thread cores" in done.stdout and "event-loop CPU us/event" in done.stdout
    assert r["loop_cpu_ratio"] == round(r["passthrough"]["loop_us_per_event"]
                                        / r["pipeline"]["loop_us_per_event"], 3)


def test_demo_twice_on_one_state_waits_for_its_worker_and_republishes_nothing(
        stack, quick_bundle, tmp_path):
    """Two headless demos in a row on the same state: each publishes its own events only (a
    stopped worker committed what it had published), and each sends its first event once
    its worker is ready."""
    settings = unique_settings(stack, quick_bundle, state_dir=tmp_path / "state")
    # no MovieLens: the demo serves the quick (synthetic) bundle instead of rebuilding it
    runs = [cli(settings, "demo", "--events", "40", "--rate", "100", timeout=300,
                DATA_DIR=str(tmp_path / "no-movielens")) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        lines = done.stdout.splitlines()
        ready = next(i for i, line in enumerate(lines) if line.startswith("worker ready in"))
        first = next(i for i, line in enumerate(lines) if line.startswith("[1] user"))
        assert ready < first
        assert "published 40 recommendations for 40 events" in done.stdout
    out = collect(settings, settings.topic_recommendations, 80, settle=3.0)
    assert len(out) == 80  # 40 per run: nothing of the first run was published again


def test_evaluate_stream_reports_each_arm_against_the_first(stack, quick_bundle, tmp_path):
    
    a = copy_bundle(quick_bundle, tmp_path / "a", "eval-A")
    b = copy_bundle(quick_bundle, tmp_path / "b", "eval-B")
    settings = unique_settings(stack, quick_bundle)
    log = write_log(tmp_path / "log.jsonl", load_bundle(quick_bundle).items.item_ids[:30], n=400,
                    users=40)
    done = cli(settings, "evaluate-stream", "--data", str(log), "--test-share", "0.5",
               "--arms", f"control:{a},treatment:{b}@gate", timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    arms = result["arms"]
    assert set(arms) == {"control", "treatment"}
    assert (arms["control"]["bundle"], arms["treatment"]["bundle"]) == ("eval-A", "eval-B")
    assert arms["control"]["users"] + arms["treatment"]["users"] == 40
    assert arms["control"]["events"] + arms["treatment"]["events"] == result["scored"]
    versus = arms["treatment"]["ndcg@10"]["vs_control"]
    low, high = versus["ci95"]
    assert low <= versus["difference"] <= high and versus["significant"] == (low > 0 or high < 0)
    assert "vs_control" not in arms["control"]["hr@10"]
