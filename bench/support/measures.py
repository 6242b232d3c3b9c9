"""Measurements more than one benchmark reports: this process's resident memory, nearest-rank percentiles."""

from __future__ import annotations

import os
from pathlib import Path


def current_rss_mb() -> float:
    """This process's resident set size in MiB, read from /proc (Linux)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0..100) of `values`: always one of the measured values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
