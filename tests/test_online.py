import math

from streams.online import PrequentialEvaluator


def rec(event_id, user, item, items):
    return {"event_id": event_id, "user_id": user, "item_id": item,
            "items": [{"item_id": i, "score": 0.0} for i in items]}


def test_prequential_hits_misses_and_duplicates():
    ev = PrequentialEvaluator(k=3)
    assert ev.update(rec("1", "u", "a", ["b", "c", "d"])) is None  # first event: nothing to score
    assert ev.update(rec("2", "u", "c", ["x", "y", "z"])) == 2
    assert ev.update(rec("2", "u", "c", ["x", "y", "z"])) is None  # duplicate ignored
    assert ev.update(rec("3", "u", "q", ["x"])) == 4  # miss
    s = ev.summary()
    assert s["n"] == 2 and s["hr@3"] == 0.5
    assert math.isclose(s["ndcg@3"], (1 / math.log2(3)) / 2)
