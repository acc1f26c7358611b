"""GPU timing helpers shared by the benchmarks (medians, warm-up first)."""
from __future__ import annotations

import statistics

import torch

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


class Clocks:
    """The GPU's SM clock (MHz) and power draw (W), sampled on a thread every `period` seconds while inside the
    with-block: a kernel whose time is set by its instruction count runs slower at a lower clock, and a GPU
    under a whole step's load runs at a lower clock than under one kernel's (its power limit). Readings come
    from NVML through torch.cuda.clock_rate / power_draw (nvidia-ml-py); where they cannot be read (no GPU, no
    NVML) `summary()` is {}. `read` replaces the reader (tests)."""

    def __init__(self, device=None, period: float = 0.05, read=None):
        self.period, self.samples = period, []
        if read is None and device is None and torch.cuda.is_available():
            device = torch.cuda.current_device()  # (here: the sampling thread's current device is always 0)
        self._read = read or (lambda: (torch.cuda.clock_rate(device), torch.cuda.power_draw(device) / 1e3))
        self._stop = None

    def __enter__(self):
        import threading
        try:
            self._read()
        except Exception:  # noqa: BLE001 (no NVML here: no readings, never a failed benchmark)
            return self
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                try:
                    self.samples.append(self._read())
                except Exception:  # noqa: BLE001
                    return
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        return False

    def summary(self) -> dict:
        if not self.samples:
            return {}
        clock, power = zip(*self.samples)
        return {"sm_clock_mhz": statistics.median(clock), "sm_clock_mhz_min": min(clock),
                "power_w": round(statistics.median(power), 1), "clock_samples": len(clock)}
