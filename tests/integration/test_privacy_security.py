"""Privacy (forget a user) and the security of the parts, on the real broker and Redis."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, settings_env, unique_settings
from helpers import collect, make_events, send
from test_recovery import final_states

from streams.bundle import load_bundle
from streams.kafka.clients import ensure_topics
from streams.local.stack import LocalRedis, free_port
from streams.longterm.refresher import LongTermRefresher
from streams.longterm.store import hist_key, redis_client, vec_key

pytestmark = pytest.mark.integration


def test_forget_erases_state_history_and_vector(stack, quick_bundle, workers):
    settings = unique_settings(stack, quick_bundle)
    ensure_topics(settings, stack["kafka"])
    workers(settings)
    bundle = load_bundle(quick_bundle)
    items = bundle.items.item_ids[:10]
    user = "forget-me"
    events = [e.__class__(e.event_id, user, e.item_id, "click", e.ts) for e in make_events(5, items=items)]
    send(settings, events)
    collect(settings, settings.topic_recommendations, 5)
    client = redis_client(stack["redis"], None, 5.0, asyncio_client=False)
    LongTermRefresher(client, bundle).refresh_once()
    assert client.exists(hist_key(user)) and client.exists(vec_key(user))

    done = subprocess.run([sys.executable, "-m", "streams", "forget", user], env=settings_env(settings),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and final_states(settings, 1, timeout=5).get(user, 0) is not None:
        time.sleep(0.5)
    assert final_states(settings, 1)[user] is None  # tombstone in the changelog
    assert not client.exists(hist_key(user)) and not client.exists(vec_key(user))

    later = [e.__class__(f"later-{i}", user, items[i], "click", e.ts + 10) for i, e in enumerate(events[:2])]
    send(settings, later)
    out = collect(settings, settings.topic_recommendations, 7)
    assert {r["event_id"] for r in out} >= {e.event_id for e in later}
    state = final_states(settings, 1)[user]
    assert state["n_events"] == 2 and state["event_ids"] == ["later-0", "later-1"]  # fresh start
    assert client.lrange(hist_key(user), 0, -1) == [items[0].encode(), items[1].encode()]
    client.close()


def test_redis_password_is_used_and_never_logged(stack, quick_bundle, workers, tmp_path):
    secret = "s3cret-pw-123"
    redis = LocalRedis(tmp_path / "redis", password=secret)
    redis.start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/0"
        settings = unique_settings(stack, quick_bundle, redis_url=url, redis_password=secret)
        ensure_topics(settings, stack["kafka"])
        worker = workers(settings)
        send(settings, make_events(5, items=load_bundle(quick_bundle).items.item_ids[:5]))
        out = collect(settings, settings.topic_recommendations, 5)
        assert len(out) == 5 and not any(r["degraded"] for r in out)  # authenticated
        client = redis_client(url, secret, 5.0, asyncio_client=False)
        assert client.scard("is:dirty") >= 1
        client.close()
        printed = subprocess.run([sys.executable, "-m", "streams", "settings"],
                                 env=settings_env(settings), capture_output=True, text=True, cwd=ROOT)
        assert secret not in printed.stdout and '"redis_password": "***"' in printed.stdout
        assert secret.encode() not in worker.log_path.read_bytes()

        wrong = unique_settings(stack, quick_bundle, redis_url=url, redis_password="wrong")
        ensure_topics(wrong, stack["kafka"])
        workers(wrong)
        send(wrong, make_events(3, items=load_bundle(quick_bundle).items.item_ids[:5]))
        out = collect(wrong, wrong.topic_recommendations, 3)
        assert len(out) == 3 and all(r["degraded"] for r in out)  # refused, yet still serving
    finally:
        redis.stop()


def test_dashboard_off_loopback_requires_a_token(stack):
    from streams.errors import ConfigError
    from streams.tools.dashboard.server import check_binding

    with pytest.raises(ConfigError, match="DASHBOARD_TOKEN"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", "tok")
    check_binding("127.0.0.1", None)

    port = free_port()
    settings = unique_settings(stack, dashboard_port=port, dashboard_token="tok-123")
    proc = subprocess.Popen([sys.executable, "-m", "streams", "dashboard"], env=settings_env(settings),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/api/snapshot"
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                urllib.request.urlopen(url, timeout=1)
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.2)
        assert status == 401
        assert urllib.request.urlopen(url + "?token=tok-123", timeout=5).status == 200
        request = urllib.request.Request(url, headers={"Authorization": "Bearer tok-123"})
        assert urllib.request.urlopen(request, timeout=5).status == 200
    finally:
        proc.terminate()
        proc.wait(10)
