"""GPU timing helpers shared by the benchmarks (medians, warm-up first)."""
from __future__ import annotations

import statistics

from ..kernels.cuda.gemm import _graph_time_ms as graph_ms  # noqa: F401  (CUDA-graph replay: no host overhead)
from ..kernels.cuda.gemm import capture_graph  # noqa: F401
from ..kernels.cuda.gemm import windows_ms as _windows_ms


def event_ms(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median wall time of fn() on the GPU stream, CUDA events around each call and a sync after it (which
    exposes the host's work before the call's first kernel)."""
    return statistics.median(_windows_ms(fn, 1, iters, warmup))


def throughput_ms(fn, iters: int = 10, warmup: int = 3, windows: int = 3) -> float:
    """Mean time per call of fn() over `iters` back-to-back calls (no host sync between them, as in training:
    the host enqueues the next step while the GPU runs this one); the median of `windows` windows. Host work
    that a step does before its first kernel is hidden here when the GPU is the bottleneck."""
    return statistics.median(_windows_ms(fn, iters, windows, warmup))
