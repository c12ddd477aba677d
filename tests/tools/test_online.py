import math

from streams.tools.online import PrequentialEvaluator


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


def test_dashboard_latency_is_recent_old_events_count_as_late_and_series_step():
    from streams.tools.dashboard.server import BUCKET_S, DashboardState

    state = DashboardState(titles={"i1": "Title One"})
    now_ms = 1_800_000_000_000

    def rec(n, event_ts, item="i1"):
        return {"event_id": f"e{n}", "user_id": "u", "item_id": item, "items": [
            {"item_id": "i2", "score": 1.0, "title": "Two"}], "alpha": 0.5, "long_term": None,
            "event_ts": event_ts, "emitted_ts": event_ts + 5}

    state.on_recommendation(rec(0, now_ms - 1_000_000), now_ms)  # an old event replayed
    for n in range(1, 4):
        state.on_recommendation(rec(n, now_ms + n * 1000 * BUCKET_S - 20, item="i2"),
                                now_ms + n * 1000 * BUCKET_S)
    state.on_lag(7, now=(now_ms + 3 * 1000 * BUCKET_S) / 1000)
    snap = state.snapshot(now=(now_ms + 50_000 + 3 * 1000 * BUCKET_S) / 1000)
    assert snap["late"] == 1 and snap["total"] == 4
    assert snap["latency_ms"]["seen"]["p99"] == 20.0  # the old event left the 60-s window
    assert [p["per_s"] for p in snap["series"]] == [1 / BUCKET_S] * 4
    assert snap["series"][-1]["lag"] == 7 and snap["series"][-1]["p50"] == 20.0
    assert snap["latest"][-1]["item_title"] == "Title One"  # from the bundle's catalog
    assert snap["latest"][0]["item_title"] == "Two"  # learned from a recommendation


def test_arm_report_gives_each_arm_intervals_over_users_and_a_difference_against_control():
    from streams.tools.online import arm_report

    # control: 40 users, each hit at rank 1 half of the time; treatment: 40 users always hit
    scored = [("control", f"c{u}", 1 if e % 2 else 11) for u in range(40) for e in range(4)]
    scored += [("treatment", f"t{u}", 1) for u in range(40) for e in range(4)]
    report = arm_report(scored, 10, control="control")
    assert report["control"]["users"] == 40 and report["control"]["events"] == 160
    assert report["control"]["hr@10"]["mean"] == 0.5
    assert report["treatment"]["hr@10"]["mean"] == 1.0
    versus = report["treatment"]["hr@10"]["vs_control"]
    assert versus["difference"] == 0.5 and versus["significant"]
    # the same arm against itself: no significant difference
    same = arm_report([(arm, f"{arm}{u}", 1 if (u + e) % 2 else 11)
                       for arm in ("a", "b") for u in range(40) for e in range(3)], 10)
    assert not same["b"]["ndcg@10"]["vs_a"]["significant"]


def test_dashboard_reports_each_arm_when_outputs_carry_one():
    from streams.tools.dashboard.server import DashboardState

    state = DashboardState()
    assert state.snapshot()["arms"] == {}  # no arms: nothing to show
    for n in range(6):  # two users, one per arm; every next item was in the previous list
        for user, arm in (("u1", "control"), ("u2", "treatment")):
            state.on_recommendation({
                "event_id": f"{user}-{n}", "user_id": user, "item_id": f"i{n}", "arm": arm,
                "items": [{"item_id": f"i{n + 1}", "score": 1.0}], "alpha": 1.0,
                "long_term": None, "event_ts": 1, "emitted_ts": 2})
    arms = state.snapshot()["arms"]
    assert set(arms) == {"control", "treatment"} and arms["treatment"]["events"] == 5
    assert arms["control"]["hr@10"]["mean"] == 1.0
    assert arms["treatment"]["ndcg@10"]["vs_control"]["difference"] == 0.0
