"""Device-specific kernels behind one small interface.

Every function here has a reference twin in `reference.py` (plain torch, masked dense: it EMULATES 2:4
sparsity and accelerates nothing). `get_backend(name)` picks the implementation: "reference" always works;
"cuda" (Hopper sparse tensor cores) is used only when available, and asking for it where it is not falls back to
the reference with one logged warning, never a crash. "auto" picks cuda when available.

Interface (all backends):
    mask24(x, dim=-1) -> bool mask, 2 of every 4 along dim kept (largest |x|, earlier index wins ties)
    sparsify24(x, dim=-1) -> (x * mask, mask)
    relu2_sparsify24(y1) -> (y2s, mask)        y1: [tokens, d_ff]; y2s = 2:4(relu(y1)^2) along d_ff
    dense_feature_split(y, dense_frac) -> bool [features]
    dense_features_from_counts(nnz, dense_frac) -> the same from per-feature non-zero counts
    wgrad_split_operand(y, dense_features) -> y pruned 2:4 along tokens except the dense features
    relu2_sparsify24_packed(y1, feature_counts=None) -> Packed24
                                               the same selection, packed in cuSPARSELt's SM90 layout (and the
                                               positives per feature added to feature_counts, for the split)
    sparse_mm(a: Packed24, b) -> a @ b          2:4 x dense GEMM
On the cuda backend the last two run on sparse tensor cores (Triton sparsifier, cuSPARSELt GEMM with cached
plans); the dense-mask functions are the reference code running on the GPU.
"""
from __future__ import annotations

import logging
from types import ModuleType

from . import reference

log = logging.getLogger("elas.kernels")
_warned: set[str] = set()
BACKENDS = ("auto", "reference", "cuda")


def cuda_available() -> tuple[bool, str]:
    """Whether the accelerated Hopper backend can run here, and why not."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "torch is missing"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    cap = torch.cuda.get_device_capability()
    if cap[0] != 9:
        return False, f"the 2:4 kernels target sm_90 (Hopper); this GPU is sm_{cap[0]}{cap[1]}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    try:
        from .cuda import gemm
        gemm.load_extension()
    except Exception as e:  # a failed build must never stop training: fall back, say why
        return False, f"the cuSPARSELt extension is unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return True, ""


_STATUS: tuple[bool, str] | None = None


def _cuda_status() -> tuple[bool, str]:
    global _STATUS
    if _STATUS is None:
        _STATUS = cuda_available()
    return _STATUS


def get_backend(name: str = "auto") -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    if name == "reference":
        return reference
    ok, why = _cuda_status()
    if ok:
        from . import cuda
        return cuda
    if name == "cuda" or why != "no CUDA device":
        key = f"{name}:{why}"
        if key not in _warned:
            _warned.add(key)
            log.warning("2:4 kernels: using the reference (emulated, masked dense) path: %s", why)
    return reference


__all__ = ["get_backend", "cuda_available", "reference", "BACKENDS"]
