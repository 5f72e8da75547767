"""The memory-bandwidth yardstick of the benchmarks (issue 18): an upper bound, so that no kernel
can read faster than it and a "ratio to roofline" stays at most 1. It is the best of three
readings in the same run: a plain read, a read with the kernels' prefetches, and a STREAM triad
(a = b + s * c, counted as STREAM counts it: three arrays' bytes). A single prefetching read of
the weights had read 28-31 GB/s where a triad reached 42-44 on the same machine, and the kernels
beat it (ratio 1.20).
"""
from __future__ import annotations

import platform
import time

import numpy as np

from expert_node import native
from expert_node.checkpoint import huge_page_buffer


def _best_rate(nbytes: int, fn, runs: int) -> float:
    fn()  # fault pages in, warm the threads
    best = 0.0
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def triad_gbps(n_floats: int = 1 << 26, runs: int = 7) -> float:
    """STREAM triad GB/s on three huge-page arrays of n_floats (256 MiB each by default: far past
    any last-level cache)."""
    a, b, c = (np.frombuffer(huge_page_buffer(4 * n_floats), np.float32, n_floats) for _ in range(3))
    b[:] = 1.0
    c[:] = 2.0
    return _best_rate(3 * 4 * n_floats, lambda: native.stream_triad(a, b, c, 3.0), runs)


def bandwidth(buffers, runs: int = 7) -> dict:
    """GB/s reading `buffers` (uint8 arrays: the weights as the engine holds them, or a big
    buffer) plainly and with prefetches, a triad beside them, and their best as "gbps"."""
    total = sum(b.nbytes for b in buffers)
    readings = {
        "read_gbps": _best_rate(total, lambda: [native.stream_read(b, prefetch=False) for b in buffers], runs),
        "prefetch_read_gbps": _best_rate(total, lambda: [native.stream_read(b, prefetch=True) for b in buffers], runs),
        "triad_gbps": triad_gbps(runs=runs),
    }
    readings["gbps"] = max(readings.values())
    return readings


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
