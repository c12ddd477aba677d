import numpy as np

from streams.longterm.store import history_entry, parse_entry, parse_vector


def test_history_entries_carry_event_weights():
    assert history_entry("42", 1.0) == "42"
    assert parse_entry(history_entry("42", 0.5)) == ("42", 0.5)
    assert parse_entry("a\tb\t2") == ("a\tb", 2.0)
    assert parse_entry("plain") == ("plain", 1.0)


def test_parse_vector_rejects_other_models_and_shapes():
    vec = np.ones(4, np.float32).tobytes()
    assert parse_vector([vec, b"3", b"1000", b"m"], "m", 4).version == 3
    assert parse_vector([vec, b"3", b"1000", b"other"], "m", 4) is None
    assert parse_vector([vec, b"3", b"1000", b"m"], "m", 8) is None
    assert parse_vector([None, None, None, None], "m", 4) is None
