"""Replay pacing and recorded-stream reading (pure logic, fake clock)."""
import json

from streams.events import Event
from streams.tools.record import record_line
from streams.tools.replay import Pacer, parse_time, read_recorded, replay


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def events(ts_list):
    return [Event(f"e{i}", "u", "1", "click", ts) for i, ts in enumerate(ts_list)]


def run(pacer, ts_list):
    clock, sent_at = FakeClock(), []
    summary = replay(events(ts_list), lambda e: sent_at.append(clock.now), pacer, restamp=False,
                     clock=clock, sleep=clock.sleep)
    return sent_at, summary


def test_speed_keeps_gaps_scaled_and_compresses_silences():
    sent_at, summary = run(Pacer(speed=10.0), [0, 10_000, 20_000, 10_000_000])
    assert sent_at == [0.0, 1.0, 2.0, 7.0]  # a 2.7-hour silence compressed to 5 s
    assert summary["sent"] == 4 and summary["errors"] == 0


def test_rate_and_max():
    assert run(Pacer(rate=4.0), [0, 0, 0, 0, 0])[0] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert run(Pacer(), [0, 10**9, 2 * 10**9])[0] == [0.0, 0.0, 0.0]


def test_read_recorded_orders_windows_and_limits(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t10\t5\t300\n2\t20\t3\t100\n1\t30\t4\t200\nbroken\n")
    got = list(read_recorded(path))
    assert [e.ts for e in got] == [100_000, 200_000, 300_000]
    assert got[0].event_id == list(read_recorded(path))[0].event_id  # deterministic ids
    assert [e.item_id for e in read_recorded(path, start_ms=150_000, end_ms=300_000)] == ["30"]
    assert len(list(read_recorded(path, limit=2))) == 2
    assert parse_time("1970-01-01T00:00:01") == 1000 and parse_time("2") == 2000


def test_record_line_keeps_json_and_wraps_the_rest():
    assert json.loads(record_line(b"k", b'{"a": 1}')) == {"a": 1}
    wrapped = json.loads(record_line(b"k", b"\xff"))
    assert wrapped == {"_raw_b64": "/w==", "_key": "k"}
