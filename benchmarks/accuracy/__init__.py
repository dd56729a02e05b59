"""Accuracy benchmark (issue 3): ``python -m benchmarks.accuracy.run --help``."""
