"""Benchmarks (`python -m streams bench`): the harness, the passthrough baseline, the soak."""
