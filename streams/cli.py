"""`python -m streams <command>`: a thin CLI over the library."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from streams.config import Settings
from streams.errors import InterestStreamError

log = logging.getLogger(__name__)


def cmd_settings(settings: Settings, args) -> int:
    print(json.dumps(settings.public_dict(), indent=2))
    return 0


def cmd_install(settings: Settings, args) -> int:
    """Install what the local stack needs: the Kafka jars (Maven) and Debian's redis-server."""
    from streams.local.stack import ensure_kafka_installed, ensure_redis_installed

    print(f"kafka jars: {ensure_kafka_installed()}")
    print(f"redis-server: {ensure_redis_installed()}")
    return 0


def cmd_up(settings: Settings, args) -> int:
    """Start the local Kafka and Redis and keep them up until Ctrl-C."""
    from streams.kafka.clients import ensure_topics
    from streams.local.stack import LocalStack

    stack = LocalStack(settings.state_dir / "local")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        endpoints = stack.start()
        ensure_topics(settings, endpoints["kafka"])
        print(f"KAFKA_BOOTSTRAP_SERVERS={endpoints['kafka']}")
        print(f"REDIS_URL={endpoints['redis']}")
        print(f"Kafka ready in {stack.kafka.ready_seconds:.1f}s. Ctrl-C stops both.", flush=True)
        stop.wait()
    finally:
        stack.stop()
    return 0


def _faust_argv(settings: Settings) -> list[str]:
    level = {"warning": "warn", "critical": "crit"}.get(settings.log_level.lower(), settings.log_level.lower())
    return ["streams", "worker", "--loglevel", level, "--web-port", str(settings.web_port),
            "--web-bind", settings.web_host]


def cmd_worker(settings: Settings, args) -> int:
    """Run the Faust worker (validates the bundle and the broker first)."""
    from streams.bundle import load_bundle

    # a missing or corrupt bundle: clear error, exit 2
    for bundle_dir in [a.bundle_dir for a in settings.arms()] or [settings.bundle_dir]:
        load_bundle(bundle_dir)
    from streams.kafka.clients import ensure_topics
    from streams.worker import app as app_module

    ensure_topics(settings, app_module.resolve_kafka(settings), state=True)
    if settings.processing_guarantee == "exactly_once":
        from streams.worker.transactions import check_transactions

        check_transactions(settings, app_module.app)  # a broker without them: one-line error
    from streams.worker.pipeline import EXIT_CRASHED, health, serving

    serving()
    sys.argv = _faust_argv(settings)
    try:
        app_module.app.main()
    except SystemExit as exc:  # Faust's worker always ends with one, code 0 after a stop
        code = exc.code
    if not health.ok:
        print(f"error: the worker's agent crashed ({health.reason}); see the log above",
              file=sys.stderr)
        return EXIT_CRASHED
    return code if isinstance(code, int) else 0


def cmd_refresher(settings: Settings, args) -> int:
    from streams.bundle import load_bundle
    from streams.local.endpoints import resolve_redis
    from streams.longterm.refresher import LongTermRefresher
    from streams.longterm.store import redis_client

    arms = settings.arms()
    bundle = load_bundle(arms[0].bundle_dir if arms else settings.bundle_dir)
    url = resolve_redis(settings)
    if not url:
        raise InterestStreamError("no Redis: set REDIS_URL or start the local one (`python -m streams up`)")
    if args.metrics_port:
        from prometheus_client import start_http_server

        from streams.metrics import REGISTRY

        start_http_server(args.metrics_port, addr=settings.web_host, registry=REGISTRY)
    client = redis_client(url, settings.redis_password, timeout=5.0, asyncio_client=False)
    refresher = LongTermRefresher(client, bundle, construction=args.construction,
                                  location=settings.bundle_dir, arms=arms, salt=settings.ab_salt)
    if args.once:
        print(f"refreshed {refresher.refresh_once()} users")
        return 0
    refresher.run_forever(settings.long_term_refresh_s, watch_s=settings.bundle_watch_s)
    return 0


def cmd_models(settings: Settings, args) -> int:
    """What each worker serves now: GET /models of each one (a JSON line per worker)."""
    import urllib.error
    import urllib.request

    failed = 0
    for url in args.worker or [f"http://{settings.web_host}:{settings.web_port}"]:
        base = url if "://" in url else f"http://{url}"
        try:
            with urllib.request.urlopen(f"{base.rstrip('/')}/models", timeout=5) as reply:
                answer = json.loads(reply.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            print(f"error: no worker answers at {base} ({exc}); give its WEB_HOST:WEB_PORT "
                  "with --worker", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({"worker": base, **answer}))
    return 2 if failed else 0


def _bootstrap(settings: Settings) -> str:
    from streams.local.endpoints import resolve_kafka

    return resolve_kafka(settings)


def cmd_replay(settings: Settings, args) -> int:
    """Publish a recorded stream (u.data, CSV or JSONL) to the events topic."""
    from tqdm import tqdm

    from streams.kafka.clients import ensure_topics, produce, producer
    from streams.tools.replay import Pacer, parse_time, read_recorded, replay

    # the file first: a wrong path is told before anything waits on a broker
    events = list(read_recorded(args.file, args.limit, parse_time(args.start), parse_time(args.end)))
    bootstrap = _bootstrap(settings)
    ensure_topics(settings, bootstrap)
    prod = producer(settings, bootstrap)
    prefix = args.user_prefix

    def send(event):
        user = f"{prefix}{event.user_id}" if prefix else event.user_id
        if prefix:
            event = event.__class__(event.event_id, user, event.item_id, event.event_type, event.ts)
        produce(prod, settings.topic_events, user.encode(), event.to_json())

    pacer = Pacer(speed=None if args.max else args.speed, rate=None if args.max else args.rate)
    with tqdm(total=len(events), unit="ev", desc="replay", disable=args.quiet) as bar:
        summary = replay(events, send, pacer, restamp=not args.keep_ts, progress=bar)
    summary["undelivered"] = prod.flush(30)
    print(json.dumps(summary))
    return 0 if summary["errors"] == 0 and summary["undelivered"] == 0 else 1


def cmd_record(settings: Settings, args) -> int:
    """Write a topic to JSONL."""
    from pathlib import Path

    from tqdm import tqdm

    from streams.kafka.clients import consumer
    from streams.tools.record import group_id, record

    reset = "earliest" if args.from_beginning else "latest"
    cons = consumer(settings, _bootstrap(settings), group_id(), **{"auto.offset.reset": reset})
    with tqdm(unit="rec", desc=f"record {args.topic}", disable=args.quiet) as bar:
        n = record(cons, args.topic, Path(args.out), args.limit, args.idle_timeout, progress=bar)
    print(json.dumps({"topic": args.topic, "written": n, "out": args.out}))
    return 0


def cmd_dashboard(settings: Settings, args) -> int:
    from streams.tools.dashboard import run

    run(settings, _bootstrap(settings))
    return 0


def cmd_evaluate_stream(settings: Settings, args) -> int:
    from streams.tools.evaluate_stream import evaluate_stream

    if args.arms:
        from streams.arms import parse_arms

        parse_arms(args.arms)  # a bad spec: one line, before anything starts
    result = evaluate_stream(settings, args.data, test_share=args.test_share, limit=args.limit,
                             arms=args.arms)
    print(json.dumps(result, indent=2))
    return 0


def cmd_passthrough(settings: Settings, args) -> int:
    from streams.bench import passthrough
    from streams.kafka.clients import ensure_topics

    ensure_topics(settings, _bootstrap(settings))
    sys.argv = _faust_argv(settings)
    passthrough.app.main()
    return 0


def cmd_bench(settings: Settings, args) -> int:
    from streams.bench.run import run_bench

    return run_bench(settings, args)


def cmd_forget(settings: Settings, args) -> int:
    """Erase a user: a control record on the control topic, keyed to the user's partition
    (the worker tombstones the state and erases Redis), and Redis erased here at once too."""
    from streams.events import forget_record
    from streams.kafka.clients import ensure_topics, producer
    from streams.local.endpoints import resolve_redis
    from streams.longterm.store import forget_user, redis_client

    bootstrap = _bootstrap(settings)
    ensure_topics(settings, bootstrap)
    prod = producer(settings, bootstrap)
    prod.produce(settings.topic_control, key=args.user_id.encode(),
                 value=forget_record(args.user_id, args.requester, settings.control_secret))
    undelivered = prod.flush(30)
    result = {"user_id": args.user_id, "requester": args.requester,
              "control_sent": undelivered == 0, "control_topic": settings.topic_control}
    url = resolve_redis(settings)
    if url:  # also at once, in case no worker is running now
        client = redis_client(url, settings.redis_password, 5.0, asyncio_client=False)
        found = forget_user(client, args.user_id)
        client.close()
        # found 0: nothing was there (never seen, or a worker had erased it already)
        result.update(redis_erased=True, redis_keys_found=found)
    print(json.dumps(result))
    return 0 if undelivered == 0 else 1


def cmd_demo(settings: Settings, args) -> int:
    from streams.tools.demo import run_demo

    return run_demo(settings, events=args.events, rate=args.rate, quick=args.quick)


COMMANDS = {
    "settings": (cmd_settings, "print the effective settings (secrets masked)"),
    "install": (cmd_install, "install the local Kafka broker (Maven Central) and redis-server"),
    "up": (cmd_up, "start the local Kafka broker and Redis and keep them running"),
    "worker": (cmd_worker, "run the stream worker (Faust agent)"),
    "refresher": (cmd_refresher, "recompute long-term vectors of users marked dirty, periodically"),
    "replay": (cmd_replay, "publish a recorded stream (u.data, CSV, JSONL) to the events topic"),
    "record": (cmd_record, "write a topic to a JSONL file"),
    "dashboard": (cmd_dashboard, "serve the live dashboard over recommendations and events.dlq"),
    "evaluate-stream": (cmd_evaluate_stream,
                        "replay ml-100k through the running system: online vs offline metrics"),
    "passthrough": (cmd_passthrough, "benchmark baseline: decode, encode, send (no model, no Redis)"),
    "bench": (cmd_bench, "benchmarks: throughput vs passthrough, latency, inference, resources"),
    "forget": (cmd_forget, "erase a user's short-term state, long history and long-term vector"),
    "demo": (cmd_demo, "everything end to end: broker, Redis, models, worker, refresher, events"),
    "models": (cmd_models, "what each running worker serves: bundle version, fusion mode, swaps"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streams",
        description="interest-stream: real-time recommendations fusing short- and long-term interests.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also with LOG_LEVEL=DEBUG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=help_, description=help_)
               for name, (_, help_) in COMMANDS.items()}
    parsers["refresher"].add_argument("--once", action="store_true", help="one pass, then exit")
    parsers["refresher"].add_argument("--construction", choices=("model", "pooled", "text"),
                                      help="override the bundle's long-term construction")
    parsers["refresher"].add_argument("--metrics-port", type=int, default=0,
                                      help="serve Prometheus /metrics on this port")
    parsers["models"].add_argument("--worker", action="append", metavar="HOST:PORT",
                                   help="a worker's web address (repeat for each; default: "
                                        "WEB_HOST:WEB_PORT)")
    parsers["demo"].add_argument("--events", type=int, default=0,
                                 help="headless: send N events, wait for N outputs, exit")
    parsers["demo"].add_argument("--rate", type=float, default=20.0, help="events per second")
    parsers["demo"].add_argument("--quick", action="store_true",
                                 help="build a quick bundle if none exists (seconds, not minutes)")
    rp = parsers["replay"]
    rp.add_argument("file")
    pace = rp.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, help="X times real time (gaps over 5 s compressed)")
    pace.add_argument("--rate", type=float, help="events per second")
    pace.add_argument("--max", action="store_true", help="as fast as possible (default)")
    rp.add_argument("--limit", type=int)
    rp.add_argument("--start", help="first event time (epoch s/ms or ISO date)")
    rp.add_argument("--end", help="stop before this time (epoch s/ms or ISO date)")
    rp.add_argument("--keep-ts", action="store_true",
                    help="keep the recorded ts (default: stamp each event with the send time)")
    rp.add_argument("--user-prefix", default="", help="prefix user ids (e.g. to remap users)")
    rp.add_argument("--quiet", action="store_true")
    rc = parsers["record"]
    rc.add_argument("topic")
    rc.add_argument("--out", required=True)
    rc.add_argument("--from-beginning", action="store_true")
    rc.add_argument("--limit", type=int)
    rc.add_argument("--idle-timeout", type=float, default=5.0, help="stop after S seconds without records")
    rc.add_argument("--quiet", action="store_true")
    parsers["forget"].add_argument("user_id")
    parsers["forget"].add_argument("--requester", default=_default_requester(),
                                   help="who asks (logged by the worker; default: user@host)")
    bp = parsers["bench"]
    bp.add_argument("--json", default="artifacts/bench.json")
    bp.add_argument("--events", type=int, default=100_000, help="events of the throughput runs")
    bp.add_argument("--rounds", type=int, default=2,
                    help="rounds of the throughput arms (passthrough, pipeline without and with long-term vectors; best of each) and of the swap arms, alternated")
    bp.add_argument("--rates", default="500,1000,2000", help="latency runs, events/s")
    bp.add_argument("--duration", type=float, default=60.0, help="seconds per latency run")
    bp.add_argument("--users", type=int, default=100_000, help="users of the state-size run (0: skip)")
    bp.add_argument("--soak", type=float, default=0, help="soak run of S seconds (0: none)")
    bp.add_argument("--soak-rate", type=float, default=1000.0)
    bp.add_argument("--skip", default="", help="comma list of phases to skip: "
                    "throughput,latency,exactly_once,swap,inference,state")
    es = parsers["evaluate-stream"]
    es.add_argument("--data", default=str(settings_default_data()), help="u.data or a log file")
    es.add_argument("--test-share", type=float, default=0.1,
                    help="the last share of events (by time) that is scored; the rest warms up")
    es.add_argument("--limit", type=int, help="replay only the first N events")
    es.add_argument("--arms", help="A/B arms, as AB_ARMS (name[=weight]:bundle_dir[@mode],...): "
                                   "online metrics per arm, each against the first")
    return parser


def _default_requester() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user name in this environment (some containers)
        return "unknown"


def settings_default_data():
    return Settings().data_dir / "u.data"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("LOG_LEVEL", "").upper() == "DEBUG"
    try:
        settings = Settings.from_env()
        logging.basicConfig(level=settings.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return COMMANDS[args.command][0](settings, args)
    except InterestStreamError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
