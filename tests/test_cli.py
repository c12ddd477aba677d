"""Wrong usages of `python -m streams` end with one line saying what to do, exit 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


def run(*args, env=None, timeout=60):
    env = dict(os.environ, **(env or {}))
    env.pop("LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "streams", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_replay_of_a_missing_file_says_so_before_any_broker(tmp_path):
    line = one_line_error(run("replay", str(tmp_path / "nope.csv"),
                              env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}))
    assert line.startswith("error: ") and "nope.csv: no such file" in line


@pytest.mark.parametrize("name,text,words", [
    ("notes.csv", "just some\ntext that is not a log\n", "line 2 is not an event"),
    ("log.jsonl", '{"user_id": "u", "item_id": "i", "ts": 1}\nnot json\n', "line 2 is not JSON"),
    ("log.csv", "user,item\nu,i\n", "expected user_id, item_id, ts"),
])
def test_replay_of_something_that_is_not_an_event_log(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    line = one_line_error(run("replay", str(path), env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}))
    assert words in line


def test_an_unreachable_broker_is_one_line_not_a_flood(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,ts\nu,i,1790000000000\n")
    done = run("replay", str(path), env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    line = one_line_error(done)
    assert "cannot reach Kafka at 127.0.0.1:9" in line and "KAFKA_BOOTSTRAP_SERVERS" in line


def test_debug_shows_the_traceback(tmp_path):
    done = run("--debug", "replay", str(tmp_path / "nope.csv"))
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_faust_worker_help_needs_no_broker(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["STATE_DIR"] = str(tmp_path)  # no local stack running there either
    done = subprocess.run([sys.executable, "-m", "faust", "-A", "streams.worker.pipeline", "worker", "--help"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
