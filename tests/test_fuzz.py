"""Property-based fuzzing of the event decoder: it never raises, and what it accepts is sound."""
import math
import re
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.events import Event, EventRules, Rejection, decode_event, parse_control

NOW = 1_800_000_000_000
RULES = EventRules(event_types={"click", "view"}, known_items={"1", "2", "ü"},
                   max_payload_bytes=2048, max_future_skew_ms=60_000)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30)
ids = st.one_of(st.text(max_size=200), st.integers(), st.floats(), st.booleans(), st.none(),
                st.lists(st.integers(), max_size=2))
events = st.fixed_dictionaries({
    "event_id": ids, "user_id": ids, "item_id": st.sampled_from(["1", "2", "ü", "3", 1, 2.0]) | ids,
    "event_type": st.sampled_from(["click", "view", "buy", "", None, 1]),
    "ts": st.one_of(st.integers(min_value=-10**16, max_value=10**16), st.floats(allow_nan=False),
                    st.just(NOW), st.text(max_size=5))})


def check(result, raw):
    assert isinstance(result, (Event, Rejection))
    if isinstance(result, Event):
        assert len(raw) <= RULES.max_payload_bytes
        assert result.event_type in RULES.event_types and result.item_id in RULES.known_items
        assert 0 <= result.ts <= NOW + RULES.max_future_skew_ms
        assert result.user_id and result.event_id and result.user_id.isprintable()
    else:
        assert re.fullmatch(r"[a-z_]+", result.reason) and result.detail


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(raw):
    check(decode_event(raw, RULES, NOW), raw)
    parse_control(raw)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_random_json_never_raises(value):
    try:
        raw = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return
    check(decode_event(raw, RULES, NOW), raw)


@settings(max_examples=600, deadline=None)
@given(events)
def test_event_shaped_objects_are_accepted_only_when_valid(obj):
    try:
        raw = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return
    result = decode_event(raw, RULES, NOW)
    check(result, raw)
    if isinstance(obj["ts"], float) and not math.isfinite(obj["ts"]):
        assert isinstance(result, Rejection)


def test_huge_and_deep_payloads_are_rejected():
    assert decode_event(b"[" * 100_000, RULES, NOW).reason == "payload_too_large"
    big = EventRules(event_types={"click"}, max_payload_bytes=10**7)
    assert isinstance(decode_event(b"[" * 100_000 + b"]" * 100_000, big, NOW), Rejection)
    assert isinstance(decode_event(b'{"a":' * 5000 + b"1" + b"}" * 5000, big, NOW), Rejection)


def test_no_pickle_or_eval_on_input_paths():
    root = Path(__file__).resolve().parent.parent / "streams"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "pickle" not in text, path
        # Python's eval/exec, called bare or through builtins; a Redis pipeline's `.eval(` runs
        # a fixed Lua script (streams/longterm/store.py) and is not Python evaluation.
        assert not re.search(r"(?<![\w.])(eval|exec)\(|builtins\.(eval|exec)\b", text), path
        assert "SYNC_BATCH, " in text or ".eval(" not in text, path  # the only Redis EVAL
