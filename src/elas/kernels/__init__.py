"""The 2:4 kernels: the numerical definition (reference.py), the SM90 packed format (packed.py), the Hopper
kernels (cuda/) and the torch.library operators over both (ops.py).

`reference.py` is plain torch, masked dense: it EMULATES 2:4 sparsity and accelerates nothing; every accelerated
kernel has a twin there with the same signature and is tested against it. The operators in `ops.py` run the
reference on CPU tensors and the Hopper kernels on CUDA tensors.

`resolve_backend(name)` is called once, when a sparsity method is applied: "reference" always works; "cuda"
(Hopper sparse tensor cores: Triton + the cuSPARSELt extension, built and loaded here, not in a traced region)
is an error where it cannot load; "auto" takes cuda where it loads and otherwise falls back to the reference
with one logged line (none on a machine without a GPU, where that is the only choice).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

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


def resolve_backend(name: str = "auto") -> str:
    """'cuda' or 'reference': the backend a method applied now runs on (see module docs)."""
    if name not in BACKENDS:
        raise ValueError(f"invalid kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "reference":
        return "reference"
    ok, why = _cuda_status()
    if ok:
        return "cuda"
    if name == "cuda":
        raise ValueError(f"kernel backend 'cuda' was requested but cannot run here: {why}; use backend='auto' "
                         f"(falls back to the emulated reference) or 'reference'")
    if why != "no CUDA device" and why not in _warned:
        _warned.add(why)
        log.warning("2:4 kernels: using the reference (emulated, masked dense) path: %s", why)
    return "reference"


_MATERIALISED_ON: list[str | None] = [None]  # the device type a meta-device build will be allocated on


@contextmanager
def materialised_on(device):
    """Within: a model built on the meta device chooses its kernels for `device` (the trainer's FSDP2 path builds
    on meta, shards, then allocates each shard on its GPU). Outside, a meta build is a description (parameter
    counts) and loads no kernels."""
    prev, _MATERIALISED_ON[0] = _MATERIALISED_ON[0], getattr(device, "type", str(device).split(":")[0])
    try:
        yield
    finally:
        _MATERIALISED_ON[0] = prev


def target_type(device) -> str:
    """The device type a method's kernels are chosen for: the parameters' device, or for a meta-device build
    within materialised_on(d), d's type."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return (_MATERIALISED_ON[0] or kind) if kind == "meta" else kind


def backend_for(device, name: str = "auto") -> str:
    """resolve_backend(name) for a method applied to parameters on `device`; a meta-device model takes the
    reference for "auto" unless it is built within materialised_on(a CUDA device)."""
    if name == "auto" and getattr(device, "type", device) == "meta" and _MATERIALISED_ON[0] != "cuda":
        return "reference"
    return resolve_backend(name)


__all__ = ["resolve_backend", "backend_for", "target_type", "materialised_on", "cuda_available", "reference", "BACKENDS"]
