"""Helpers the benchmarks in bench/ share; not a benchmark itself (`make bench` runs bench/*.py only)."""
