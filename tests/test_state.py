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
    assert state["event_ids"] == ["e3", "e4", "e5", "e6"]
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
