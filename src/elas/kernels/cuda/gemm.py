"""Sparse x dense GEMM on cuSPARSELt: y[M, N] = A[M, K] (2:4 along K, packed) @ B[K, N], bf16.

Two implementations behind `sparse_mm`:
- "ext": our C++ op torch.ops.elas_cslt.mm (csrc/cslt_mm.cpp), built on first use against the cuSPARSELt of
  the `nvidia-cusparselt` wheel and cached by torch.utils.cpp_extension; plans are created once per
  shape/layout/algorithm, so a call costs a dictionary lookup and the launch.
- "torch": torch._cslt_sparse_mm (rebuilds its plan every call: ~0.7 ms of CPU), kept as a fallback and a
  baseline for benchmarks.
The algorithm id is chosen per (GPU, cuSPARSELt version, shape, B layout) by timing every id under CUDA-graph
replay, after checking each id's result against the dense product (some ids return wrong results:
pytorch#155333); the choice is cached in memory and on disk (ELAS_CACHE_DIR, default ~/.cache/elas).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import statistics
from functools import lru_cache
from pathlib import Path

import torch

from ...graphs import graph_capture
from ..packed import Packed24
from .choices import Choices

log = logging.getLogger("elas.kernels")


def _cusparselt_paths() -> tuple[str, str]:
    home = os.environ.get("ELAS_CUSPARSELT_HOME")
    if home is None:
        import nvidia  # the nvidia-cusparselt wheel installs nvidia/cusparselt/{include,lib}
        home = next((str(Path(p) / "cusparselt") for p in nvidia.__path__ if (Path(p) / "cusparselt").is_dir()), None)
        if home is None:
            raise RuntimeError("cuSPARSELt not found: install nvidia-cusparselt or set ELAS_CUSPARSELT_HOME")
    return str(Path(home) / "include"), str(Path(home) / "lib")


@lru_cache(maxsize=1)
def load_extension() -> bool:
    """Build (first time) and load the C++ op. Returns True when torch.ops.elas_cslt.mm is usable."""
    from torch.utils.cpp_extension import load
    inc, lib = _cusparselt_paths()
    src = Path(__file__).parent / "csrc" / "cslt_mm.cpp"
    load(name="elas_cslt", sources=[str(src)], extra_include_paths=[inc],
         extra_ldflags=[f"-L{lib}", "-l:libcusparseLt.so.0", f"-Wl,-rpath,{lib}"], with_cuda=True,
         is_python_module=False, verbose=False)

    @torch.library.register_fake("elas_cslt::mm")
    def _(buf, b, m, k, alg, ct=False):
        return b.new_empty((b.shape[1], m) if ct else (m, b.shape[1]))

    return True


def _b_transposed(b: torch.Tensor) -> bool:
    return not (b.stride(1) == 1)


def _key(m: int, k: int, n: int, bt: bool, impl: str, ct: bool = False) -> str:
    dev = torch.cuda.get_device_name()
    ver = torch.backends.cusparselt.version()
    return (f"{dev}|cslt{ver}|torch{torch.__version__.split('+')[0]}|{impl}|{m}x{k}x{n}|{'bT' if bt else 'bN'}"
            + ("|cT" if ct else ""))  # keys of row-major C are those of earlier caches


ALGS = Choices("cusparselt_algs.json")  # _key(...) -> the algorithm id (choices.py: why on disk)


def _raw_mm(a: Packed24, b: torch.Tensor, alg: int, impl: str, ct: bool = False) -> torch.Tensor:
    if impl == "ext":
        return torch.ops.elas_cslt.mm(a.buffer.view(-1), b, a.shape[0], a.shape[1], alg, ct)
    out = torch._cslt_sparse_mm(a.buffer, b, alg_id=alg)
    return out.t().contiguous() if ct else out  # torch's op: a copy, not the column-major epilogue


def capture_graph(fn, reps: int = 1, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """`reps` calls of fn (fixed shapes) captured as one CUDA graph, after `warmup` calls on a side stream
    (allocations, tuning, lazy inits): its replay runs the same kernels without the host's per-call work."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        # thread_local: only this thread's calls are checked. In `global` mode an unsafe call from any other
        # thread of the process fails the capture; `elas bench ffn` saw one such failure ("operation would make
        # the legacy stream depend on a capturing blocking stream") that a script capturing the same rows in the
        # same order without the CLI around it did not (docs/performance.md)
        gc.collect()
        gc.disable()  # a collection during the capture could free a CUDA graph or plan of earlier work: not here
        try:
            with graph_capture(g, capture_error_mode="thread_local"):
                for _ in range(reps):
                    fn()
        finally:
            gc.enable()
    except RuntimeError:
        del g
        reset_generator_capture_state()  # or every later CUDA random op of the process fails
        raise
    return g


def capture_failure(e: BaseException, limit: int = 300) -> str:
    """One line for a failed CUDA-graph capture. The error raised at the capture's end ("operation failed due to a
    previous error during capture") hides the one that broke it, which is its __context__: both are named."""
    root = e
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if root is e:
        return first[:limit]
    return f"{(str(root).splitlines() or [type(root).__name__])[0][:limit]} (then: {first[:120]})"


def capture_origin(e: BaseException, frames: int = 4) -> str:
    """Where the error that broke a capture was raised: the innermost frames of its traceback (file:line
    function), innermost first; what capture_failure's message cannot say."""
    import traceback
    root = e
    while root.__context__ is not None and root.__context__ is not root:
        root = root.__context__
    tb = traceback.extract_tb(root.__traceback__)[-frames:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(tb))


def reset_generator_capture_state() -> None:
    """A capture that fails mid-way (torch 2.11) leaves the CUDA generator registered as capturing, and every
    later CUDA random op raises "Offset increment outside graph capture". Capturing one trivial random op to its
    end brings the generator back to normal."""
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            torch.rand(1, device="cuda")
        del g
    except RuntimeError as e:  # reported, not fatal: training itself draws no CUDA random numbers
        log.warning("elas: could not reset the CUDA generator after the failed capture (%s)", str(e)[:120])


def windows_ms(fn, calls: int, windows: int, warmup: int) -> list[float]:
    """ms per call of fn() in each of `windows` windows of `calls` back-to-back calls, CUDA events around each
    window and a sync after it; `warmup` calls first."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(windows):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / calls)
    return out


def _graph_time_ms(fn, reps: int = 10, trials: int = 5) -> float:
    """Per-call GPU time of fn from the replay of a CUDA graph of `reps` calls (no host overhead)."""
    g = capture_graph(fn, reps)
    times = []
    for _ in range(trials):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / reps)
    return statistics.median(times)


def _try_algs(m: int, k: int, n: int, bt: bool, impl: str, start: int, emit, ct: bool = False) -> None:
    """Time algorithm ids start.. on random data of this shape; emit(alg, result) after each. Ids whose result
    differs from the dense product (rel. Frobenius error > 1e-2) or between two runs are rejected."""
    from .. import reference
    g = torch.Generator(device="cuda").manual_seed(0)
    y1 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    a = reference.relu2_sparsify24_packed(y1)
    bb = torch.randn((n, k) if bt else (k, n), device="cuda", dtype=torch.bfloat16, generator=g)
    b = bb.t() if bt else bb
    want = reference.sparse_mm(a, b.float())
    if ct:
        want = want.t()
    if impl == "ext":
        load_extension()
    max_id = torch.ops.elas_cslt.max_alg(m, k, n, bt, ct) if impl == "ext" else 64
    for alg in range(start, max_id + 1):
        emit(alg, "started")
        try:
            r1, r2 = _raw_mm(a, b, alg, impl, ct), _raw_mm(a, b, alg, impl, ct)
            torch.cuda.synchronize()
        except RuntimeError as e:
            emit(alg, f"error: {str(e).splitlines()[0][:100]}")
            if impl == "torch":  # torch has no max-id query: the first failing id ends the range
                return
            continue
        err = ((r1.float() - want).norm() / want.norm()).item()
        if err > 1e-2 or not torch.equal(r1, r2):
            emit(alg, f"rejected: rel err {err:.2e}, deterministic {torch.equal(r1, r2)}")
            continue
        emit(alg, _graph_time_ms(lambda: _raw_mm(a, b, alg, impl, ct)))


def search_alg(m: int, k: int, n: int, bt: bool, impl: str = "ext", ct: bool = False) -> tuple[int, dict]:
    """The fastest correct algorithm id for this shape, and a report {id: ms | why rejected}.

    Runs in a child process, so that an id that crashes the library (it happens) costs a restart, not the run."""
    import subprocess
    import sys
    report: dict = {}
    start = 0
    while True:
        cmd = [sys.executable, "-m", "elas.kernels.cuda.gemm", str(m), str(k), str(n), str(int(bt)), impl, str(start),
               str(int(ct))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parents[3])] + [p for p in [os.environ.get("PYTHONPATH")] if p])))
        last = None
        for line in proc.stdout.splitlines():
            if line.startswith("ALG "):
                _, alg, res = line.split(" ", 2)
                last, report[int(alg)] = int(alg), json.loads(res)
        if proc.returncode == 0:
            break
        if last is None or report.get(last) != "started":
            raise RuntimeError(f"cuSPARSELt algorithm search failed for {m}x{k}x{n}: {proc.stderr[-500:]}")
        report[last] = f"crashed (exit {proc.returncode})"
        start = last + 1
    timed = {a: v for a, v in report.items() if isinstance(v, float)}
    if not timed:
        raise RuntimeError(f"no cuSPARSELt algorithm gives a correct result for {m}x{k}x{n}: {report}")
    best = min(timed, key=timed.get)
    log.info("cuSPARSELt %dx%dx%d (%s%s): alg %d, %.4f ms; %s", m, k, n, "bT" if bt else "bN", ", cT" if ct else "",
             best, timed[best], report)
    return best, report


# (device, m, k, n, bt, impl, ct) -> alg id: the per-call lookup (the disk cache is keyed by GPU/library versions)
_ALG: dict[tuple, int] = {}


def best_alg(m: int, k: int, n: int, bt: bool, impl: str = "ext", ct: bool = False) -> int:
    mem_key = (torch.cuda.current_device(), m, k, n, bt, impl, ct)
    alg = _ALG.get(mem_key)
    if alg is None:
        key = _key(m, k, n, bt, impl, ct)
        alg = ALGS.get(key, None)
        if not isinstance(alg, int):  # (absent, or not an id: searched again)
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"no tuned cuSPARSELt algorithm for {key} during CUDA-graph capture: run one eager "
                                   f"step first (tuning launches and synchronises)")
            found = search_alg(m, k, n, bt, impl, ct)[0]
            kept = ALGS.put(key, found, rejected=alg)  # another rank's, where it stored one first
            alg = kept if isinstance(kept, int) else found
        _ALG[mem_key] = alg
    return alg


def sparse_mm(a: Packed24, b: torch.Tensor, alg: int | None = None, impl: str = "ext",
              out_t: bool = False) -> torch.Tensor:
    """a: Packed24 [M, K] bf16; b: [K, N] bf16 (row-major, or a transposed row-major) -> [M, N] bf16, or with
    out_t its transpose [N, M], contiguous (the GEMM writes C column-major: no transposing copy)."""
    m, k = a.shape
    if b.shape[0] != k or b.dtype != torch.bfloat16:
        raise ValueError(f"sparse_mm: b must be bf16 [{k}, N], got {b.dtype} {tuple(b.shape)}")
    if b.stride(1) != 1 and b.stride(0) != 1:
        b = b.contiguous()
    if impl == "ext":
        load_extension()  # lru_cache: built and loaded once
    if alg is None:
        alg = best_alg(m, k, b.shape[1], _b_transposed(b), impl, out_t)
    return _raw_mm(a, b, alg, impl, out_t)


if __name__ == "__main__":  # the child of search_alg: python -m elas.kernels.cuda.gemm M K N BT IMPL START [CT]
    import sys
    _m, _k, _n, _bt, _impl, _start = sys.argv[1:7]
    _ct = bool(int(sys.argv[7])) if len(sys.argv) > 7 else False

    def _emit(alg, res):
        print(f"ALG {alg} {json.dumps(res)}", flush=True)

    _try_algs(int(_m), int(_k), int(_n), bool(int(_bt)), _impl, int(_start), _emit, _ct)
