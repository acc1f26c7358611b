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


def throughput_ms(fn, iters: int = 10, warmup: int = 3, windows: int = 3) -> float:
    """Mean time per call of fn() over `iters` back-to-back calls (no host sync between them, as in training:
    the host enqueues the next step while the GPU runs this one), CUDA events around the window; the median of
    `windows` windows. Host work that a step does before its first kernel is hidden here when the GPU is the
    bottleneck, and exposed in event_ms, which synchronises after every call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(windows):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / iters)
    return statistics.median(out)
