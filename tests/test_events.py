import base64
import json

import orjson
import pytest

from streams.events import Event, EventRules, Rejection, decode_event, dlq_record

NOW = 1_800_000_000_000
RULES = EventRules(event_types={"click", "view"}, known_items={"1", "2"}, max_payload_bytes=300,
                   max_future_skew_ms=60_000)


def encode(**fields):
    base = {"event_id": "e1", "user_id": "u1", "item_id": "1", "event_type": "click", "ts": NOW}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_valid_event_is_decoded_and_ids_normalised():
    assert decode_event(encode(user_id=42, item_id=2), RULES, NOW) == Event("e1", "42", "2", "click", NOW)


@pytest.mark.parametrize("payload,reason", [
    (None, "empty_payload"),
    (b"{", "invalid_json"),
    (b"\xff", "invalid_json"),
    (b"[]", "not_an_object"),
    (b"x" * 301, "payload_too_large"),
    (encode(ts=...), "missing_field"),
    (encode(user_id=True), "wrong_type"),
    (encode(user_id=""), "wrong_type"),
    (encode(item_id=1.5), "wrong_type"),
    (encode(event_type=3), "wrong_type"),
    (encode(event_type="buy"), "unknown_event_type"),
    (encode(ts="soon"), "wrong_type"),
    (encode(ts=-5), "invalid_ts"),
    (encode(ts=NOW + 61_000), "ts_in_future"),
    (encode(item_id="999"), "unknown_item"),
    (b'{"event_id":"e","user_id":"u","item_id":"1","event_type":"click","ts":NaN}', "invalid_json"),
    (b"[" * 200 + b"]" * 200, "payload_too_large"),
])
def test_bad_input_is_rejected_with_a_reason(payload, reason):
    result = decode_event(payload, RULES, NOW)
    assert isinstance(result, Rejection) and result.reason == reason, result


def test_deeply_nested_json_is_rejected_not_raised():
    rules = EventRules(event_types={"click"}, max_payload_bytes=10**6)
    result = decode_event(b"[" * 5000 + b"]" * 5000, rules, NOW)
    assert isinstance(result, Rejection)


def test_dlq_record_keeps_original_bytes():
    rec = orjson.loads(dlq_record(Rejection("invalid_json", "bad"), b"\xff\x00", "events", 3, 17, NOW))
    assert rec["reason"] == "invalid_json" and rec["payload_encoding"] == "base64"
    assert base64.b64decode(rec["payload"]) == b"\xff\x00"
    assert (rec["topic"], rec["partition"], rec["offset"]) == ("events", 3, 17)
    text = orjson.loads(dlq_record(Rejection("x", "y"), b'{"a":1}', "events", 0, 1, NOW))
    assert text["payload"] == '{"a":1}' and text["payload_encoding"] == "utf-8"
