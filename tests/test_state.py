from streams.events import Event
from streams.state import empty_state, last_event_ts, recent_items, update_short_term


def ev(i, item="1", user="u"):
    return Event(f"e{i}", user, item, "click", 1000 + i)


def test_update_appends_and_caps():
    state = None
    for i in range(7):
        state, new = update_short_term(state, ev(i, item=str(i)), max_items=3, max_ids=4)
        assert new
    assert recent_items(state) == ["4", "5", "6"]
    assert list(state["event_ids"]) == ["e3", "e4", "e5", "e6"]
    assert state["n_events"] == 7 and last_event_ts(state) == 1006


def test_redelivered_event_changes_nothing():
    state, _ = update_short_term(None, ev(1), 5, 5)
    again, new = update_short_term(state, ev(1), 5, 5)
    assert not new and again == state and again["n_events"] == 1


def test_update_does_not_mutate_input():
    state = empty_state()
    update_short_term(state, ev(1), 5, 5)
    assert state == empty_state()
    assert last_event_ts(None) is None and recent_items(None) == []


def test_state_restored_from_the_changelog_updates_alike():
    """After a restore the state holds JSON lists; the next update works the same."""
    import orjson

    state = None
    for i in range(3):
        state, _ = update_short_term(state, ev(i, item=str(i)), max_items=3, max_ids=3)
    restored = orjson.loads(orjson.dumps(state))
    assert isinstance(restored["items"], list)
    a, _ = update_short_term(state, ev(9, item="9"), 3, 3)
    b, _ = update_short_term(restored, ev(9, item="9"), 3, 3)
    assert orjson.dumps(a) == orjson.dumps(b)
    assert recent_items(b) == ["1", "2", "9"] and list(b["event_ids"]) == ["e1", "e2", "e9"]


def test_state_is_invisible_to_the_cycle_collector():
    """Tuples of atoms, in a dict, are untracked once the collector has seen them: a full
    collection then costs nothing per user (the reason the state is built of tuples)."""
    import gc

    state = None
    for i in range(60):
        state, _ = update_short_term(state, ev(i, item=str(i)), max_items=50, max_ids=200)
    gc.collect()
    gc.collect()  # an outer tuple is untracked by the pass after the one that untracked its entries
    assert not gc.is_tracked(state["event_ids"]) and not gc.is_tracked(state["items"][0])
    assert not gc.is_tracked(state["items"]) and not gc.is_tracked(state)
