"""The dense ReLU^2 FFN's two d_ff-wide GEMMs on CUTLASS sm90 kernels with the pointwise work in their epilogues
(`model.relu2_kernel=cutlass`): the same two products as relu2_gemm.py's Triton kernels, with CUTLASS's
warp-specialised TMA mainloop (cuBLAS's rate, where the Triton form ran ~1.5x slower at K = 512).

- forward  (mode 1): y2 [M, N] = relu(bf16(h1 @ wu^T))^2, h1 [M, K], wu [N, K]; y1 never written.
- backward: dy1 [M, N] = 2 bf16(sqrt(y2)) bf16(dh2 @ wd^T), dh2 [M, K], wd [N, K], y2 [M, N]: the fastest at the
  shape of cuBLAS's GEMM + one pointwise pass and the library's fused forms (dy2 never written; y2 read by each
  epilogue thread, mode 2, which measured 0.75x the first at the 1B shapes where the forward's fusion measured
  1.42x, benchmarks/results/h200/cutlass_relu2.json; or through the epilogue's TMA pipeline, mode 3).
- the 2:4 FFN's straight-through backward (ELAS, `act24.cutlass=true`): (y2s, dy1) from dh2 [M, K], wd [N, K]
  and the saved y1 [M, N]: y2s = 2:4(relu(y1)^2) along N, dy1 = 2 relu(y1) bf16(dh2 @ wd^T); the fastest at the
  shape of cuBLAS's GEMM + the Triton backward kernel (sparsify.py), mode 4 (dy1 from the epilogue, y1 through its
  TMA pipeline) + the Triton dense sparsifier for y2s, and mode 5 (both from the epilogue: dy2 never written, y1
  read once).
- the 2:4 FFN's forward in ste mode (`act24.cutlass=true`): y1 [M, N] = h1 @ wu^T and the Packed24 of
  2:4(relu(y1)^2) (the SM90 layout), by the fastest at the shape of cuBLAS + the Triton sparsifier and mode 6 (the
  packed values and metadata stored from the epilogue's registers: y1 is not read back).
- the 2:4 FFN in mask mode (Haziza's gradient, `act24.cutlass=true` with `grad_mode=mask`, no split): the forward
  (mode 7) writes y2s [M, N] = 2:4(relu(y1)^2) dense (zeros where not kept: what the backward reads, in place of
  the packed buffer and mask bits) and the packed buffer (for the 2:4 down-projection); the backward (mode 8)
  writes dy1 = 2 sqrt(y2s) bf16(dh2 @ wd^T) dense (for the weight gradient) and packed 2:4 with y2s's choice (for
  the 2:4 input gradient), dy2 never written. Each by the fastest at the shape of its CUTLASS form and the
  separate kernels that give the same outputs.
- the q/k/v projection with rotary embeddings in its epilogue (`model.rope_kernel=cutlass`): `linear_rope`.
All operands bf16, row-major and contiguous (K contiguous in A and B). Numerics are relu2_gemm.py's (the
rounding points are the same; only the GEMM's summation order differs from cuBLAS).

The kernels live in a shared library built off the GPU machine from cutlass/relu2_gemm.cu beside this file
(`elas build cutlass`, build_cutlass.py over cutlass/build.sh: nvcc and CUTLASS's headers from pip wheels, cudart
static),
found at $ELAS_CUTLASS_RELU2 or <ELAS_CACHE_DIR>/cutlass/libelas_cutlass_relu2.so. The library holds several tile /
cluster / schedule configurations; the fastest per (mode, M, N, K) is chosen by timing each once, outside any
CUDA-graph capture (as cuSPARSELt's algorithm is in gemm.py), and kept in memory and on disk (choices.py: a resumed
run takes the choices of the run it resumes), as is whether a fused form or the separate kernels run at a shape
(`_choose`). Before a configuration is timed,
its output on the caller's operands is compared with kernels/reference.py's twin on the first and last rows
(`_verify`): one that disagrees is logged and never used, so a kernel that is wrong on a GPU, a CUTLASS version or
a shape the tests did not cover falls back to the separate kernels (or, where there is no other form, stops with
the reason) instead of training on wrong values. The GPU tests check every element; this check guards the rest.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import statistics
from functools import lru_cache
from pathlib import Path

import torch

from .. import reference as ref
from ..packed import Packed24, pack24, row_block, unpack24
from .choices import Choices, cache_dir
from .gemm import windows_ms

log = logging.getLogger("elas.kernels")
# the library's modes: 1 y2 = relu(acc)^2; 2 and 3 dy1 = 2 sqrt(y2) acc, y2 loaded per thread (2) or through the
# epilogue's TMA pipeline (3); 4 the straight-through dy1 = 2 relu(y1) acc, y1 through TMA; 5 mode 4 and y2s =
# 2:4(relu(y1)^2) as a second output; 6 y1 = acc and the packed 2:4(relu(y1)^2) as a second output; 7 y2s =
# 2:4(relu(acc)^2) dense and packed; 8 dy1 = 2 sqrt(y2s) acc (y2s through TMA) dense and packed with y2s's choice. A
# library built before a mode answers -1 for it, and it is skipped.
MODES = {"relu2": 1, "grad": 2, "grad_tma": 3, "ste_grad": 4, "ste_grad_y2s": 5, "relu2_pack24": 6,
         "relu2s_pack24": 7, "grad_pack24": 8}


def skipped() -> set:
    """The forms $ELAS_CUTLASS_SKIP names (comma-separated: mode names or numbers of MODES, or "rope"), which are
    treated as absent from the library: the choosers take the separate kernels, and linear_relu2 / linear_rope
    stop with a one-line error. For a GPU where a form faults (benchmarks/cutlass_probe.py finds which, each in a
    process of its own): a fault ends the process, which the check against the reference cannot catch."""
    out = set()
    for item in filter(None, (t.strip() for t in os.environ.get("ELAS_CUTLASS_SKIP", "").split(","))):
        if item == "rope":
            out.add(item)
        elif item in MODES or item.isdigit() and int(item) in MODES.values():
            out.add(MODES[item] if item in MODES else int(item))
        else:
            raise ValueError(f"ELAS_CUTLASS_SKIP: unknown form {item!r}; expected names or numbers of "
                             f"{sorted(MODES.items(), key=lambda kv: kv[1])} or 'rope'")
    return out


def library_path() -> Path:
    env = os.environ.get("ELAS_CUTLASS_RELU2")
    return Path(env) if env else cache_dir() / "cutlass" / "libelas_cutlass_relu2.so"


def available(device) -> tuple[bool, str]:
    """Whether the library's ReLU^2 GEMM (mode 1) runs on `device`, and why not: what model.relu2_kernel=auto
    asks. Past the cheap checks (a Hopper GPU under CUDA, the file there, not skipped) the library is loaded and
    its GEMM run once on a small problem and checked against the reference (`_runs_here`), so that a library
    this driver cannot launch (it needs a CUDA 13 driver) or a damaged file means torch's kernels, not a crash."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or getattr(torch.version, "hip", None):
        return False, "not a CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap[0] != 9:
        return False, f"the CUTLASS kernels target sm_90a (Hopper); this GPU is sm_{cap[0]}{cap[1]}"
    if not library_path().is_file():
        return False, f"no CUTLASS library at {library_path()} (`elas build cutlass` builds it)"
    if MODES["relu2"] in skipped():
        return False, "ELAS_CUTLASS_SKIP names its ReLU^2 GEMM"
    why = _runs_here(device.index if device.index is not None else torch.cuda.current_device())
    return (False, why) if why else (True, str(library_path()))


@lru_cache(maxsize=None)
def _runs_here(index: int) -> str:
    """'' where the ReLU^2 GEMM loads, launches and agrees with the reference on GPU `index` (256 x 256 x 64),
    else why not."""
    try:
        library()
    except (OSError, AttributeError) as e:  # a damaged file, another library at that path
        return f"the CUTLASS library at {library_path()} does not load ({type(e).__name__}: {e})"
    g = torch.Generator(device=f"cuda:{index}").manual_seed(0)
    a, b = (torch.randn(256, 64, device=f"cuda:{index}", generator=g).to(torch.bfloat16) for _ in range(2))
    try:
        with torch.cuda.device(index):  # (the launch takes the current device's stream)
            _mm(MODES["relu2"], a, b, None)
    except RuntimeError as e:
        return (f"the CUTLASS library's kernels do not run here ({str(e).splitlines()[0][:160]}; it needs a CUDA 13 "
                f"driver)")
    return ""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    path = library_path()
    if not path.is_file():
        raise FileNotFoundError(f"no CUTLASS library at {path} (model.relu2_kernel=cutlass, model.rope_kernel=cutlass "
                                f"and act24.cutlass=true need it): build it with `elas build cutlass` (or "
                                f"`elas build cutlass --out DIR` and set "
                                f"ELAS_CUTLASS_RELU2=DIR/libelas_cutlass_relu2.so)")
    data = path.read_bytes()
    lib = ctypes.CDLL(str(path))
    lib.elas_id = hashlib.sha1(data).hexdigest()[:16]  # the build loaded (its choices are keyed by it: _disk_key)
    lib.elas_cutlass_dense_configs.restype = ctypes.c_int
    lib.elas_cutlass_dense_config_name.restype = ctypes.c_char_p
    lib.elas_cutlass_dense_workspace.restype = ctypes.c_longlong
    lib.elas_cutlass_dense_workspace.argtypes = [ctypes.c_int] * 5
    tail = [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_float)]
    lib.elas_cutlass_dense_mm.restype = ctypes.c_int
    lib.elas_cutlass_dense_mm.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4 + tail
    if hasattr(lib, "elas_cutlass_rope_mm"):  # (libraries built before the rope GEMM lack it)
        lib.elas_cutlass_rope_mm.restype = ctypes.c_int
        lib.elas_cutlass_rope_mm.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
                                             + [ctypes.c_longlong] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3
                                             + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int,
                                                ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_longlong)])
    if hasattr(lib, "elas_cutlass_dense_mm_aux"):  # (libraries built before mode 5 lack the second aux tensor)
        lib.elas_cutlass_dense_mm_aux.restype = ctypes.c_int
        lib.elas_cutlass_dense_mm_aux.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + tail
    return lib


# (device, mode, M, N, K) -> (configuration index, ms), ("rope", device, L, M, K, N) likewise for the rope GEMM;
# (what, device, M, N, K) -> the form _choose kept (a name of MODES, or None: the separate kernels)
_BEST: dict[tuple, tuple[int, float] | None] = {}
_GRAD: dict[tuple, str | None] = {}
# both kinds of choice on disk as well (choices.py: a resumed run must run the kernels of the run it resumes):
# "<GPU>|<library's SHA-1>|torch<version>|<what>|<shape>" -> [configuration name, ms] or the form
CHOICES = Choices("cutlass_relu2_choices.json")
# the key of _BEST -> why configurations were refused ("config name: what differed"), for the error where none is left
_REFUSED: dict[tuple, list[str]] = {}
# the largest relative (Frobenius) error against the reference that a GEMM output may have: bf16 rounding of the
# output and of the reference's own GEMM (a different summation order) give ~4e-3; a wrong layout or epilogue O(1)
TOL = 2e-2


def _library_id() -> str:
    """The SHA-1 (16 hex digits) of the library as loaded (read with the bytes dlopen took): a rebuilt library
    is timed afresh."""
    try:
        return getattr(library(), "elas_id", "none")
    except (OSError, AttributeError):  # (no library: only the separate kernels, whose choices need no build's name)
        return "none"


def _disk_key(device: torch.device, what: str, shape) -> str:
    """GPU | library build | torch and Triton versions (the separate forms' kernels) | what | M x N x K."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join((gpu, _library_id(), "torch" + torch.__version__.split("+")[0], "triton" + _triton_version(),
                     what, "x".join(map(str, shape))))


@lru_cache(maxsize=1)
def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "-"


def _rows(m: int) -> list[slice]:
    """The rows of an [M, N] output that _verify compares: the first and the last 256 (64-aligned, so a packed
    2:4 buffer's row block stands alone: packed.row_block), or all M when M <= 512."""
    if m <= 512:
        return [slice(0, m)]
    return [slice(0, 256), slice((m - 256) // 64 * 64, m)]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def _verify(mode: int, a, b, aux, d, aux_out) -> str | None:
    """None where mode's outputs d (and aux_out) on a [M, K], b [N, K], aux agree with the reference twin on
    _rows(M), else what differed. A NaN in d counts as a difference (its error is NaN)."""
    for rs in _rows(a.shape[0]):
        a_r, aux_r = a[rs], None if aux is None else aux[rs]
        if mode == MODES["relu2"]:
            want = ref.linear_relu2(a_r, b)
        elif mode in (MODES["grad"], MODES["grad_tma"]):
            want = ref.relu2_grad_gemm(a_r, b, aux_r)
        elif mode in (MODES["ste_grad"], MODES["ste_grad_y2s"]):
            y2s, want = ref.dgrad_relu2_ste(a_r, b, aux_r)
            if mode == MODES["ste_grad_y2s"] and not torch.equal(aux_out[rs], y2s):  # y2s is y1's alone: exact
                return f"y2s differs on rows {rs.start}:{rs.stop}"
        elif mode == MODES["relu2_pack24"]:
            want = a_r @ b.T
            if not torch.equal(_packed_rows(aux_out, d.shape, rs), ref.relu2_sparsify24(d[rs])[0]):
                return f"the packed 2:4 of relu(y1)^2 differs on rows {rs.start}:{rs.stop}"  # (of its own y1: exact)
        elif mode == MODES["relu2s_pack24"]:
            want = ref.relu2_sparsify24(a_r @ b.T)[0]
            if not torch.equal(_packed_rows(aux_out, d.shape, rs), d[rs]):  # the packed buffer holds D's kept values
                return f"the packed 2:4 differs from y2s on rows {rs.start}:{rs.stop}"
        elif mode == MODES["grad_pack24"]:
            want = ref.relu2_grad_gemm(a_r, b, aux_r)
            # the packed dy1: the kernel's own dy1 at y2s's choice, values and metadata byte for byte
            packed = row_block(Packed24(aux_out, aux_out.new_empty(0, dtype=torch.uint8), d.shape), rs.start, rs.stop)
            if not torch.equal(packed.buffer.view(torch.int16),
                               pack24(d[rs], ref.mask24(aux_r), check=False).buffer.view(torch.int16)):
                return f"the packed 2:4 of dy1 differs on rows {rs.start}:{rs.stop}"
        else:
            raise ValueError(f"_verify: unknown mode {mode}")
        err = _rel_err(d[rs], want)
        if not err <= TOL:
            return f"relative error {err:.2e} > {TOL} on rows {rs.start}:{rs.stop}"
    return None


def _packed_rows(buf: torch.Tensor, shape, rs: slice) -> torch.Tensor:
    """Rows rs (64-aligned) of the packed buffer (no mask bits) of an [M, N] matrix, unpacked."""
    return unpack24(row_block(Packed24(buf, buf.new_empty(0, dtype=torch.uint8), tuple(shape)), rs.start, rs.stop))


def _launch(lib, config: int, mode: int, a, b, aux, d, iters: int = 0, aux_out=None) -> tuple[int, float]:
    m, k = a.shape
    n = b.shape[0]
    ws_bytes = int(lib.elas_cutlass_dense_workspace(config, mode, m, n, k))
    if ws_bytes < 0:  # a mode this library was built without
        return -1, 0.0
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=a.device)  # the caching allocator: graph-safe
    ms = ctypes.c_float(0)
    head = (config, mode, a.data_ptr(), b.data_ptr(), None if aux is None else aux.data_ptr())
    tail = (d.data_ptr(), m, n, k, ws.data_ptr(), max(ws_bytes, 1),
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), iters, ctypes.byref(ms))
    if aux_out is not None:
        if not hasattr(lib, "elas_cutlass_dense_mm_aux"):
            return -1, 0.0
        rc = lib.elas_cutlass_dense_mm_aux(*head, aux_out.data_ptr(), *tail)
    else:
        rc = lib.elas_cutlass_dense_mm(*head, *tail)
    return rc, ms.value


def _not_capturing(what: str) -> None:
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"no CUTLASS choice made for {what} during CUDA-graph capture: run one eager step first "
                           f"(the choice launches and synchronises)")


def _configs(lib, key: tuple, dkey: str, what: str, run, verify) -> tuple[int, float] | None:
    """The fastest configuration of one GEMM form at one shape and its time, or None where none runs it; kept in
    _BEST under key and on disk under dkey. run(c, iters) -> (status, ms) launches configuration c (iters > 0:
    also times it); verify() -> None, or what the last launch's outputs got wrong against the reference. Each
    configuration is checked before it is timed; one chosen by an earlier process is checked, not timed."""
    if key in _BEST:
        return _BEST[key]
    _not_capturing(what)
    names = [lib.elas_cutlass_dense_config_name(c).decode() for c in range(lib.elas_cutlass_dense_configs())]
    kept = CHOICES.get(dkey)
    usable = (isinstance(kept, list) and len(kept) == 2 and kept[0] in names
              and isinstance(kept[1], (int, float)) and not isinstance(kept[1], bool))
    if usable:
        c = names.index(kept[0])
        if run(c, 0)[0] == 0 and verify() is None:
            _BEST[key] = (c, float(kept[1]))
            return _BEST[key]
        log.warning("CUTLASS %s: configuration %s, chosen by an earlier process (%s), fails here; timing afresh",
                    what, kept[0], CHOICES.path)
    timed, refused = {}, []
    for c, name in enumerate(names):
        if run(c, 0)[0] != 0:  # this tile cannot run this shape (or the library has no such mode)
            continue
        wrong = verify()
        if wrong is not None:
            log.warning("CUTLASS %s, configuration %s: %s against the reference; not used", what, name, wrong)
            refused.append(f"{name}: {wrong}")
            continue
        rc, ms = run(c, 20)
        if rc == 0:
            timed[c] = ms
    if refused:
        _REFUSED[key] = refused
    best = min(timed.items(), key=lambda kv: kv[1]) if timed else None
    if best is not None:
        log.info("CUTLASS %s: %s (%.4f ms)", what, names[best[0]], best[1])
        stored = CHOICES.put(dkey, [names[best[0]], best[1]], rejected=kept)
        if isinstance(stored, list) and stored and stored[0] in names and names.index(stored[0]) in timed:
            best = (names.index(stored[0]), timed[names.index(stored[0])])  # another process's, timed first
    _BEST[key] = best
    return best


def _best(lib, mode: int, a, b, aux, aux_out=None) -> tuple[int, float] | None:
    """The fastest configuration of `mode` at this shape and its time, or None where none runs it."""
    m, k = a.shape
    n = b.shape[0]
    key = (a.device.index, mode, m, n, k)
    if key in _BEST:  # (the per-call path: a dictionary lookup)
        return _BEST[key]
    if mode in skipped():
        _REFUSED[key] = [f"mode {mode} is named in ELAS_CUTLASS_SKIP"]
        _BEST[key] = None
        return None
    d = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    return _configs(lib, key, _disk_key(a.device, f"mode{mode}", (m, n, k)), f"ReLU^2 mode {mode} {m}x{n}x{k}",
                    lambda c, iters: _launch(lib, c, mode, a, b, aux, d, iters, aux_out),
                    lambda: _verify(mode, a, b, aux, d, aux_out))


def _mm(mode: int, a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor | None,
        aux_out: torch.Tensor | None = None) -> torch.Tensor:
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or a.shape[1] != b.shape[1] or a.shape[1] % 8:
        raise ValueError(f"CUTLASS ReLU^2 GEMM: bf16 A [M, K] and B [N, K] with K % 8 == 0 expected, got "
                         f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    m, n = a.shape[0], b.shape[0]
    for name, t, shape in (("aux", aux, (m, n)),
                           ("aux_out", aux_out, (m, n) if mode == MODES["ste_grad_y2s"] else (m, n * 9 // 16))):
        # (read or written by the kernel at the given pointer, row-major, through TMA: 16-byte aligned)
        if t is not None and (t.dtype != torch.bfloat16 or tuple(t.shape) != shape or not t.is_contiguous()
                              or t.data_ptr() % 16 or t.device != a.device):
            raise ValueError(f"CUTLASS ReLU^2 GEMM mode {mode}: {name} must be a contiguous, 16-byte aligned bf16 "
                             f"{list(shape)} tensor on {a.device}, got {t.dtype} {tuple(t.shape)} strides "
                             f"{t.stride()} on {t.device}")
    from .relu2_gemm import _row_major
    # a transposed weight view is copied: the kernels read K-contiguous rows through TMA, from 16-byte aligned
    # addresses (a view at a storage offset is copied too: unaligned, every configuration would fail the shape)
    a, b = _row_major(a), _row_major(b)
    lib = library()
    best = _best(lib, mode, a, b, aux, aux_out)
    if best is None:
        key = (a.device.index, mode, a.shape[0], b.shape[0], a.shape[1])
        why = "; ".join(_REFUSED.get(key, [])) or "none can run this shape"
        raise RuntimeError(f"no CUTLASS configuration runs mode {mode} at {a.shape[0]}x{b.shape[0]}x{a.shape[1]} "
                           f"({why})")
    config = best[0]
    d = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16, device=a.device)
    rc = _launch(lib, config, mode, a, b, aux, d, aux_out=aux_out)[0]
    if rc != 0:
        raise RuntimeError(f"CUTLASS ReLU^2 GEMM mode {mode} failed with status {rc} at "
                           f"{a.shape[0]}x{b.shape[0]}x{a.shape[1]}")
    return d


def linear_relu2(h1: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """y2 [T, d_ff] = relu(h1 @ wu^T)^2 from the GEMM's epilogue; h1 [T, q], wu [d_ff, q] bf16."""
    return _mm(MODES["relu2"], h1, wu, None)


def relu2_grad_gemm_fused(dh2: torch.Tensor, wd: torch.Tensor, y2: torch.Tensor, mode: str = "grad_tma"
                          ) -> torch.Tensor:
    """dy1 [T, d_ff] = 2 sqrt(y2) (dh2 @ wd^T) from the GEMM's epilogue; dh2 [T, q'], wd [d_ff, q'], y2 [T, d_ff]."""
    from .relu2_gemm import _row_major
    return _mm(MODES[mode], dh2, wd, _row_major(y2))  # (a view at a storage offset copied: TMA reads it aligned)


def relu2_grad_gemm(dh2: torch.Tensor, wd: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """dy1 [T, d_ff] = 2 bf16(sqrt(y2)) bf16(dh2 @ wd^T), by the fastest of three forms at this shape, timed once:
    cuBLAS's GEMM then one pointwise pass (relu2_gemm.relu2_grad), or the GEMM with the pointwise work in its
    epilogue, y2 read per thread (mode 2: 0.75x the first at the 1B shape) or through the epilogue's TMA pipeline
    (mode 3). All three give the same values (the GEMMs' outputs are cuBLAS's bit for bit,
    benchmarks/results/h200/cutlass_relu2.json)."""
    from .relu2_gemm import _row_major, relu2_grad
    y2 = _row_major(y2)
    # (the fused forms' operands made contiguous only when they are timed or run: _mm copies a transposed view;
    # the separate form's GEMM takes it as it is)
    form = _choose("grad", dh2.device, (dh2.shape[0], wd.shape[0], dh2.shape[1]),
                   lambda: relu2_grad(dh2 @ wd.T, y2),
                   {f: (lambda f=f: _best(library(), MODES[f], _row_major(dh2), _row_major(wd), y2) is not None,
                        lambda f=f: _mm(MODES[f], dh2, wd, y2)) for f in ("grad", "grad_tma")})
    return relu2_grad(dh2 @ wd.T, y2) if form is None else _mm(MODES[form], dh2, wd, y2)


def ste_grad_gemm_fused(dh2: torch.Tensor, wd: torch.Tensor, y1: torch.Tensor, mode: str = "ste_grad_y2s"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y2s, dy1), each [T, d_ff], from the GEMM dy2 = dh2 @ wd^T (dh2 [T, q'], wd [d_ff, q']) and the saved y1
    [T, d_ff]: mode "ste_grad_y2s" both from the epilogue; "ste_grad" dy1 from the epilogue, y2s by the Triton
    dense sparsifier (one pass over y1)."""
    from .relu2_gemm import _row_major
    y1 = _row_major(y1)  # (contiguous and 16-byte aligned: the epilogue reads it through TMA)
    if mode == "ste_grad":
        from .sparsify import relu2_sparsify24_dense
        return relu2_sparsify24_dense(y1), _mm(MODES[mode], dh2, wd, y1)
    y2s = torch.empty_like(y1)
    return y2s, _mm(MODES[mode], dh2, wd, y1, aux_out=y2s)


def ste_grad_gemm(dh2: torch.Tensor, wd: torch.Tensor, y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2:4 FFN's straight-through backward on the d_ff side, ste mode without the split: (y2s, dy1) as
    sparsify.relu2_sparse24_backward(dh2 @ wd^T, None, y1) gives them, by the fastest of three forms at this
    shape, timed once outside capture: cuBLAS's GEMM + that Triton kernel (reads y1 and dy2, writes y2s and dy1),
    mode 4 + the dense sparsifier, or mode 5. All three give the same values where the GEMMs agree bit for bit
    (cutlass_relu2.json: every CUTLASS output equal to cuBLAS's)."""
    from .sparsify import relu2_sparse24_backward

    def separate():
        g = relu2_sparse24_backward(dh2 @ wd.T, None, y1)
        return g.y2s, g.dy1

    from .relu2_gemm import _row_major
    y = _row_major(y1)  # (the operands the fused forms are probed with as they run them: aligned)
    form = _choose("ste", dh2.device, (dh2.shape[0], wd.shape[0], dh2.shape[1]), separate,
                   {f: (lambda f=f: _best(library(), MODES[f], _row_major(dh2), _row_major(wd), y,
                                          torch.empty_like(y) if f == "ste_grad_y2s" else None) is not None,
                        lambda f=f: ste_grad_gemm_fused(dh2, wd, y, f))  # each timed as the step calls it
                    for f in ("ste_grad", "ste_grad_y2s")})
    return separate() if form is None else ste_grad_gemm_fused(dh2, wd, y1, form)


def up_relu2_pack24_fused(h1: torch.Tensor, wu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode 6: (y1 [T, d_ff], the packed buffer [T, d_ff*9/16] bf16 of 2:4(relu(y1)^2)) from one GEMM, h1 [T, q],
    wu [d_ff, q]; T and d_ff multiples of 64."""
    buf = torch.empty(h1.shape[0], wu.shape[0] * 9 // 16, dtype=torch.bfloat16, device=h1.device)
    return _mm(MODES["relu2_pack24"], h1, wu, None, aux_out=buf), buf


def up_relu2_pack24(h1: torch.Tensor, wu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2:4 FFN's forward in ste mode: (y1 [T, d_ff], packed buffer [T, d_ff*9/16] of 2:4(relu(y1)^2), no mask
    bits) by the fastest at this shape, timed once outside capture, of cuBLAS's y1 = h1 @ wu^T + the Triton
    sparsifier (sparsify.py) and mode 6. The buffers are the same bytes where the GEMMs agree (the selection and
    layout are the sparsifier's)."""
    from .sparsify import relu2_sparsify24_packed

    def separate():
        y1 = h1 @ wu.T
        return y1, relu2_sparsify24_packed(y1, write_bits=False).buffer

    form = _choose("pack", h1.device, (h1.shape[0], wu.shape[0], h1.shape[1]), separate,
                   _packed_form("relu2_pack24", h1, wu, None, lambda: up_relu2_pack24_fused(h1, wu)))
    return separate() if form is None else up_relu2_pack24_fused(h1, wu)


def _packed_like(m: int, n: int, device) -> torch.Tensor:
    """An empty packed buffer [m, n*9/16] bf16 (values, then metadata; no mask bits)."""
    return torch.empty(m, n * 9 // 16, dtype=torch.bfloat16, device=device)


def _choose(what: str, device: torch.device, shape: tuple, separate, fused: dict) -> str | None:
    """The fastest form of `what` at `shape` ((M, N, K)), timed once outside capture, each as the step calls it
    (the median of 3 windows of 20 calls): None (the separate kernels, `separate()`) or a name of `fused` (name ->
    (available, run)). Kept in _GRAD and on disk with the forms that were available then: a later process takes
    the kept form without timing where the same forms are available (a form gone, or one added, since a skip list
    or the library changed, is timed afresh)."""
    key = (what, device.index, *shape)
    if key in _GRAD:
        return _GRAD[key]
    desc = f"{what} {'x'.join(map(str, shape))}"
    _not_capturing(desc)
    among = sorted(name for name, (available, _) in fused.items() if available())
    dkey = _disk_key(device, what, shape)
    kept = CHOICES.get(dkey)
    if _usable_form(kept, among):
        _GRAD[key] = kept["form"]
        return _GRAD[key]
    ms = lambda fn: statistics.median(windows_ms(fn, calls=20, windows=3, warmup=1))  # noqa: E731
    timed = {None: ms(separate)}
    for name in among:
        timed[name] = ms(fused[name][1])
    form = min(timed, key=timed.get)
    stored = CHOICES.put(dkey, {"form": form, "among": among}, rejected=kept)
    if _usable_form(stored, among):
        form = stored["form"]  # another process's, stored first: every process runs the same form
    _GRAD[key] = form
    log.info("CUTLASS %s: %s -> %s", desc, {m: round(t, 4) for m, t in timed.items()}, form)
    return form


def _packed_form(name: str, a: torch.Tensor, b: torch.Tensor, aux, run) -> dict:
    """_choose's entry for one fused form that writes a packed 2:4 buffer (modes 6-8): available where a
    configuration of MODES[name] runs a [M, K] x [N, K] (with aux) and agrees with the reference; run() as the
    step calls it."""
    def available() -> bool:
        buf = _packed_like(a.shape[0], b.shape[0], a.device)
        return _best(library(), MODES[name], a.contiguous(), b.contiguous(), aux, buf) is not None
    return {name: (available, run)}


def _usable_form(kept, among: list) -> bool:
    """A stored choice of _choose that holds here: {"form": None or one of `among`, "among": `among`}."""
    return (isinstance(kept, dict) and "form" in kept and kept.get("among") == among
            and (kept["form"] is None or kept["form"] in among))


def up_relu2s_pack24_fused(h1: torch.Tensor, wu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode 7: (y2s [T, d_ff] = 2:4(relu(h1 @ wu^T)^2) dense, its packed buffer [T, d_ff*9/16] bf16) from one
    GEMM, h1 [T, q], wu [d_ff, q]; T and d_ff multiples of 64."""
    buf = _packed_like(h1.shape[0], wu.shape[0], h1.device)
    return _mm(MODES["relu2s_pack24"], h1, wu, None, aux_out=buf), buf


def up_relu2s_pack24(h1: torch.Tensor, wu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2:4 FFN's forward in mask mode: (y2s dense [T, d_ff], its packed buffer, no mask bits) by the fastest at
    this shape of mode 7 and cuBLAS's y1 + the Triton sparsifier's packed and dense forms (two passes over y1).
    The same values where the GEMMs agree (the selection is the sparsifier's)."""
    from .sparsify import relu2_sparsify24_dense, relu2_sparsify24_packed

    def separate():
        y1 = h1 @ wu.T
        return relu2_sparsify24_dense(y1), relu2_sparsify24_packed(y1, write_bits=False).buffer

    form = _choose("pack_masked", h1.device, (h1.shape[0], wu.shape[0], h1.shape[1]), separate,
                   _packed_form("relu2s_pack24", h1, wu, None, lambda: up_relu2s_pack24_fused(h1, wu)))
    return separate() if form is None else up_relu2s_pack24_fused(h1, wu)


def grad_pack24_fused(dh2: torch.Tensor, wd: torch.Tensor, y2s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode 8: (dy1 = 2 sqrt(y2s) bf16(dh2 @ wd^T) [T, d_ff], dy1 packed 2:4 with y2s's choice [T, d_ff*9/16]) from
    one GEMM, dh2 [T, q'], wd [d_ff, q'], y2s [T, d_ff] (2:4 along d_ff)."""
    buf = _packed_like(dh2.shape[0], wd.shape[0], dh2.device)
    return _mm(MODES["grad_pack24"], dh2, wd, y2s.contiguous(), aux_out=buf), buf


def grad_pack24(dh2: torch.Tensor, wd: torch.Tensor, y2s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2:4 FFN's backward in mask mode on the d_ff side, from the forward's y2s: (dy1 dense, dy1 packed with
    y2s's choice) by the fastest at this shape of mode 8 and the separate forms: the dense ReLU^2 backward
    (relu2_grad_gemm: cuBLAS + one pass, or mode 3) and the packing in torch (slow: where mode 8 cannot run)."""
    def separate():
        dy1 = relu2_grad_gemm(dh2, wd, y2s)
        return dy1, pack24(dy1, ref.mask24(y2s), check=False).buffer

    y = y2s.contiguous()
    form = _choose("grad_masked", dh2.device, (dh2.shape[0], wd.shape[0], dh2.shape[1]), separate,
                   _packed_form("grad_pack24", dh2, wd, y, lambda: grad_pack24_fused(dh2, wd, y)))
    return separate() if form is None else grad_pack24_fused(dh2, wd, y2s)


def _rope_launch(lib, config: int, a, w, d, cos, sin, head_dim: int, rot_cols: int, iters: int = 0
                 ) -> tuple[int, float]:
    n_batch, m, k = a.shape
    n = w.shape[1]
    need = ctypes.c_longlong(0)
    args = (config, a.data_ptr(), w.data_ptr(), d.data_ptr(), n_batch, m, n, k, a.stride(1), a.stride(0),
            cos.data_ptr(), sin.data_ptr(), cos.shape[0], head_dim, rot_cols)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    ms = ctypes.c_float(0)
    rc = lib.elas_cutlass_rope_mm(*args, None, 0, stream, 0, ctypes.byref(ms), ctypes.byref(need))
    if rc != 0:
        return rc, 0.0
    ws = torch.empty(max(int(need.value), 1), dtype=torch.uint8, device=a.device)
    rc = lib.elas_cutlass_rope_mm(*args, ws.data_ptr(), ws.numel(), stream, iters, ctypes.byref(ms), None)
    return rc, ms.value


def _verify_rope(a, w, d, cos, sin, head_dim: int, rot_cols: int) -> str | None:
    """None where the rope GEMM's d [L, M, N] agrees with reference.linear_rope on _rows(M), else what differed
    (a row m's angle is its position m % seq, so each block of rows gets its own slice of the tables)."""
    for rs in _rows(a.shape[1]):
        pos = torch.arange(rs.start, rs.stop, device=a.device) % cos.shape[0]
        want = ref.linear_rope(a[:, rs], w, cos[pos], sin[pos], head_dim, rot_cols)
        err = _rel_err(d[:, rs], want)
        if not err <= TOL:
            return f"relative error {err:.2e} > {TOL} on rows {rs.start}:{rs.stop}"
    return None


def linear_rope(a: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                rot_cols: int) -> torch.Tensor:
    """out [L, M, N] = a [L, M, K] @ w [L, N, K]^T in bf16, with each column pair (2i, 2i+1) of a head of the
    columns l*N + n < rot_cols rotated by position m % seq (cos, sin [seq, head_dim/2] fp32): the q/k/v
    projection with rotary embeddings in its epilogue. a may be a strided view (rows and batches K-contiguous)."""
    if a.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or a.dim() != 3 or w.dim() != 3 or \
            a.shape[0] != w.shape[0] or a.shape[2] != w.shape[2] or a.stride(2) != 1 or a.shape[2] % 8:
        raise ValueError(f"CUTLASS rope GEMM: bf16 a [L, M, K] (K contiguous) and w [L, N, K] with K % 8 == 0 "
                         f"expected, got {a.dtype} {tuple(a.shape)} strides {a.stride()} and {w.dtype} "
                         f"{tuple(w.shape)}")
    if a.stride(1) % 8 or a.stride(0) % 8 or a.data_ptr() % 16 or w.shape[1] % head_dim:
        raise ValueError(f"CUTLASS rope GEMM: a's row and batch strides must be multiples of 8 elements and its data "
                         f"16-byte aligned (TMA), and w's {w.shape[1]} rows whole heads of {head_dim}; got strides "
                         f"{a.stride()}")
    if "rope" in skipped():
        raise RuntimeError("the CUTLASS rope GEMM is named in ELAS_CUTLASS_SKIP: unset it there, or set "
                           "model.rope_kernel=torch")
    w, cos, sin = w.contiguous(), cos.float().contiguous(), sin.float().contiguous()
    # the kernel loads the tables 16 bytes at a time where head_dim % 32 == 0: a view at an odd offset is copied
    cos, sin = (t if t.data_ptr() % 16 == 0 else t.clone() for t in (cos, sin))
    lib = library()
    if not hasattr(lib, "elas_cutlass_rope_mm"):
        raise RuntimeError(f"the CUTLASS library at {library_path()} predates the rope GEMM: rebuild it")
    key = ("rope", a.device.index) + tuple(a.shape) + (w.shape[1],)
    d = torch.empty(a.shape[0], a.shape[1], w.shape[1], dtype=torch.bfloat16, device=a.device)
    _configs(lib, key, _disk_key(a.device, "rope", (*a.shape, w.shape[1])),
             f"rope GEMM {tuple(a.shape)} x {tuple(w.shape)}",
             lambda c, iters: _rope_launch(lib, c, a, w, d, cos, sin, head_dim, rot_cols, iters),
             lambda: _verify_rope(a, w, d, cos, sin, head_dim, rot_cols))
    if _BEST[key] is None:
        why = "; ".join(_REFUSED.get(key, [])) or "none can run this shape"
        raise RuntimeError(f"no CUTLASS configuration runs the rope GEMM at {tuple(a.shape)} x {tuple(w.shape)} "
                           f"({why})")
    rc = _rope_launch(lib, _BEST[key][0], a, w, d, cos, sin, head_dim, rot_cols)[0]
    if rc != 0:
        raise RuntimeError(f"CUTLASS rope GEMM failed with status {rc} at {tuple(a.shape)} x {tuple(w.shape)}")
    return d
