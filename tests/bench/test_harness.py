"""The bench harness's pure parts (the harness end to end: tests/integration/test_tools.py)."""
from streams.bench.harness import means_between


def test_means_cover_only_what_was_observed_between_the_two_readings():
    before = {"batch_size": (10.0, 100.0), "inference_seconds": (10.0, 0.05),
              "transaction_commit_seconds": (0.0, 0.0)}
    after = {"batch_size": (14.0, 180.0), "inference_seconds": (14.0, 0.09),
             "transaction_commit_seconds": (0.0, 0.0)}
    # 4 batches of 80 events, 40 ms of inference; no commit (at-least-once): left out
    assert means_between(before, after) == {"batch_size": 20.0, "inference_ms": 10.0}


def test_the_workers_metrics_are_read_from_its_metrics_page():
    """`worker_totals` and the soak's lag read what the worker's /metrics page serves."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

    from streams.bench.harness import worker_totals
    from streams.bench.soak import lag_from_metrics

    registry = CollectorRegistry()
    Gauge("consumer_lag", "", registry=registry).set(12)
    batches = Histogram("batch_size", "", registry=registry, buckets=(8, 64))
    for size in (10, 30):
        batches.observe(size)

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert lag_from_metrics(port) == 12.0
        assert worker_totals(port, ("batch_size", "inference_seconds")) == {
            "batch_size": (2.0, 40.0), "inference_seconds": (0.0, 0.0)}
    finally:
        server.shutdown()
        server.server_close()
    assert lag_from_metrics(port) is None  # nothing serves there any more
