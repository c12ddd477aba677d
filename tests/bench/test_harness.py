"""The bench harness's pure parts (the harness end to end: tests/integration/test_tools.py)."""
from streams.bench.harness import means_between


def test_means_cover_only_what_was_observed_between_the_two_readings():
    before = {"batch_size": (10.0, 100.0), "inference_seconds": (10.0, 0.05),
              "transaction_commit_seconds": (0.0, 0.0)}
    after = {"batch_size": (14.0, 180.0), "inference_seconds": (14.0, 0.09),
             "transaction_commit_seconds": (0.0, 0.0)}
    # 4 batches of 80 events, 40 ms of inference; no commit (at-least-once): left out
    assert means_between(before, after) == {"batch_size": 20.0, "inference_ms": 10.0}
