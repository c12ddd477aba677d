"""`python -m streams worker` whose scoring fails for events whose id starts with "poison":
a processing fault injected by the tests from outside the product's code."""
import sys

from streams.worker import pipeline
from streams.cli import main

real_score = pipeline.score


def score(prepared):
    if any(p.event.event_id.startswith("poison") for p in prepared.pending):
        raise RuntimeError("injected fault")
    return real_score(prepared)


pipeline.score = score
sys.exit(main(["worker"]))
