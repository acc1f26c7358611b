"""GPU timing helpers shared by the benchmarks (medians, warm-up first)."""
from __future__ import annotations

import statistics

import torch

from ..kernels.cuda.gemm import _graph_time_ms as graph_ms  # noqa: F401  (CUDA-graph replay: no host overhead)


def event_ms(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median wall time of fn() on the GPU stream, measured with CUDA events around each eager call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)
