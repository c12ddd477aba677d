import base64
import hashlib
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


@pytest.mark.parametrize("payload,reason,words", [
    (b"", "empty_payload", "0 bytes"),
    (encode(user_id="u" * 129), "id_too_long", "at most 128"),
    (b'{"event_id":"e","user_id":123456789012345678901234,"item_id":"1","event_type":"click",'
     b'"ts":1800000000000}', "wrong_type", "beyond 64 bits"),
    (encode(user_id="   "), "wrong_type", "blank"),
    (encode(ts=0), "invalid_ts", "seconds"),
    (encode(ts=1_700_000_000), "invalid_ts", "seconds"),
])
def test_rejections_say_what_is_wrong(payload, reason, words):
    result = decode_event(payload, RULES, NOW)
    assert isinstance(result, Rejection) and result.reason == reason and words in result.detail


def test_an_id_of_128_characters_and_a_recorded_1997_ts_are_accepted():
    assert isinstance(decode_event(encode(user_id="u" * 128), RULES, NOW), Event)
    assert isinstance(decode_event(encode(ts=874_965_758_000), RULES, NOW), Event)  # MovieLens


def test_unknown_extra_fields_are_read_as_an_event_even_control():
    assert decode_event(encode(control="forget", extra=[1]), RULES, NOW) == Event(
        "e1", "u1", "1", "click", NOW)


@pytest.mark.parametrize("payload", [
    bytes(range(128, 256)) * 7800,  # not UTF-8: base64
    b'"' * 990_000,  # JSON-escaped: twice the size
    b"\x01" * 990_000,  # escaped as \u0001: six times
    "é€😀".encode() * 110_000,  # multi-byte UTF-8, cut inside a character
])
def test_a_dlq_record_stays_small_whatever_the_payload(payload):
    from streams.events import DLQ_PAYLOAD_CAP

    raw = dlq_record(Rejection("payload_too_large", "big"), payload, "events", 0, 5, NOW,
                     key=payload[:5000])
    assert len(raw) < 500_000
    rec = orjson.loads(raw)
    assert rec["payload_truncated"] and rec["payload_size"] == len(payload)
    assert rec["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    if rec["payload_encoding"] == "base64":
        assert base64.b64decode(rec["payload"]) == payload[:DLQ_PAYLOAD_CAP]
    else:
        kept = rec["payload"].encode()
        assert payload.startswith(kept) and DLQ_PAYLOAD_CAP - 4 < len(kept) <= DLQ_PAYLOAD_CAP
    assert rec["key_size"] == 5000 and len(rec["key"]) <= 4 * 1024


def test_dlq_key_and_headers_are_bounded():
    from streams.events import dlq_headers, dlq_key

    assert dlq_key(None) is None and dlq_key(b"k") == b"k" and len(dlq_key(b"k" * 5000)) == 1024
    assert dlq_headers([("trace", b"1"), ("n", None)]) == [("trace", b"1"), ("n", b"")]
    assert dlq_headers([("big", b"x" * 70_000)]) is None and dlq_headers(None) is None
    # empty headers weigh their framing: a flood of them cannot push the record past 1 MB
    assert dlq_headers([("", b"")] * 100) is not None
    assert dlq_headers([("", b"")] * 300_000) is None


def test_routing_wants_the_user_id_as_key_in_its_murmur2_partition():
    from streams.events import check_routing, partition_for

    event = Event("e1", "user-7", "1", "click", NOW)
    home = partition_for(b"user-7", 4)
    assert check_routing(event, b"user-7", home, 4) is None
    assert check_routing(event, b"someone-else", home, 4).reason == "wrong_key"
    assert check_routing(event, None, home, 4).reason == "wrong_key"
    assert check_routing(event, b"user-7", (home + 1) % 4, 4).reason == "wrong_partition"
    # Java's Utils.murmur2 (Kafka's UtilsTest vectors) & 0x7fffffff, modulo the partitions
    for key, java in ((b"21", -973932308), (b"foobar", -790332482), (b"abc", 479470107)):
        assert partition_for(key, 1_000_003) == (java & 0x7FFFFFFF) % 1_000_003


def test_control_records_parse_or_say_why_not():
    from streams.events import Forget, forget_record, parse_control

    assert parse_control(forget_record("u1", "ops@host")) == Forget("u1", "ops@host")
    assert parse_control(b'{"control": "forget", "user_id": 5}') == Forget("5", "unknown")
    for bad in (None, b"", b"{", b"[]", b'{"control": "erase", "user_id": "u"}',
                b'{"control": "forget", "user_id": "  "}', b"x" * 5000):
        result = parse_control(bad)
        assert isinstance(result, Rejection) and result.reason == "invalid_control", bad


def test_with_a_secret_only_a_forget_signed_for_its_user_and_requester_is_accepted():
    import orjson

    from streams.events import Forget, forget_record, parse_control

    signed = forget_record("u1", "ops@host", secret="s3cret")
    assert parse_control(signed, "s3cret") == Forget("u1", "ops@host")
    assert parse_control(signed) == Forget("u1", "ops@host")  # no secret: the topic's ACL alone
    assert parse_control(forget_record("u1", "ops@host"), "s3cret").reason == "unsigned_control"
    assert parse_control(forget_record("u1", "ops@host", secret="guess"), "s3cret").reason == (
        "bad_signature")
    for field, value in (("user_id", "u2"), ("requester", "attacker")):  # a signature moved
        moved = {**orjson.loads(signed), field: value}
        assert parse_control(orjson.dumps(moved), "s3cret").reason == "bad_signature", field
