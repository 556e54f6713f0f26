"""Benchmark scripts: each prints JSON as its last line and compares variants in one run."""
