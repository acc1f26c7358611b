"""2:4 activation sparsity as a model transformation: config, schedule, token permutation, statistics.

`sparsify_(model, Act24Config(...))` turns every ReLU^2 FFN of a model into a 2:4-activation-sparse one (in
place, like torchao's `quantize_`). Sparsity then follows a step schedule: dense for the first
`dense_warmup_steps` steps, sparse after; the trainer calls `set_sparsity_step(model, step)` every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Act24Config:
    grad_mode: str = "ste"  # ste (ELAS) | mask (Haziza)
    dense_warmup_steps: int = 1000
    permute_tokens: bool = False
    wgrad_dense_frac: float | None = None  # 0.05 = Haziza's 95/5 split; None = exact dense weight gradients
    backend: str = "auto"  # kernel backend (elas.kernels): auto | reference | cuda
    path: str = "auto"  # auto: packed on an accelerated backend, masked otherwise | masked | packed

    def __post_init__(self) -> None:
        if self.grad_mode not in ("ste", "mask"):
            raise ValueError(f"invalid grad_mode {self.grad_mode!r}: expected 'ste' or 'mask'")
        if self.dense_warmup_steps < 0:
            raise ValueError(f"invalid dense_warmup_steps {self.dense_warmup_steps}: expected >= 0")
        if self.wgrad_dense_frac is not None and not 0.0 <= self.wgrad_dense_frac <= 1.0:
            raise ValueError(f"invalid wgrad_dense_frac {self.wgrad_dense_frac}: expected a fraction in [0, 1]")
        if self.path not in ("auto", "masked", "packed"):
            raise ValueError(f"invalid path {self.path!r}: expected auto, masked or packed")

    def packed_kernels(self):
        """The kernel module for the packed path, or None when the FFN runs the masked-dense reference path.

        `packed` forces the packed path (on the reference backend it is emulated: for tests); `auto` takes it
        where it is accelerated: a Hopper backend."""
        from .. import kernels
        k = kernels.get_backend(self.backend)
        if self.path == "packed":
            return k
        if self.path == "masked" or k is kernels.reference:
            return None
        return k

    def describe(self) -> str:
        k = self.packed_kernels()
        from .. import kernels
        if k is None or k is kernels.reference:
            return "reference path (masked dense GEMMs: emulated, not accelerated)"
        return "accelerated path (Triton sparsifier + cuSPARSELt 2:4 GEMMs on sparse tensor cores)"

    def active_at(self, step: int) -> bool:
        return step >= self.dense_warmup_steps


def _sparsifiable(model: nn.Module):
    from ..model.ffn import ReLU2FFN  # model sits above sparsity; import late to keep the layering one-way
    return [m for m in model.modules() if isinstance(m, ReLU2FFN)]


def sparsify_(model: nn.Module, config: Act24Config | None) -> nn.Module:
    """Enable (config) or remove (None) 2:4 activation sparsity on every ReLU^2 FFN of model, in place."""
    ffns = _sparsifiable(model)
    if config is not None and not ffns:
        raise ValueError("sparsify_: the model has no ReLU^2 FFN; 2:4 activation sparsity needs ffn='relu2'")
    for ffn in ffns:
        ffn.act24 = config
        ffn.sparse_active = False
    return model


def set_sparsity_step(model: nn.Module, step: int) -> bool:
    """Drive the dense-warm-up schedule; returns whether sparsity is active at `step`."""
    active = False
    for ffn in _sparsifiable(model):
        ffn.sparse_active = ffn.act24 is not None and ffn.act24.active_at(step)
        active |= ffn.sparse_active
    return active


def set_track_stats(model: nn.Module, on: bool) -> None:
    for ffn in _sparsifiable(model):
        ffn.track_stats = on
        if not on:
            ffn.stats = {}


def collect_stats(model: nn.Module) -> dict[str, float]:
    """Per-layer statistics of the last forward with tracking on: one host sync for all of them."""
    keys, vals = [], []
    for i, ffn in enumerate(_sparsifiable(model)):
        for k, v in ffn.stats.items():
            keys.append(f"{k}/{i}")
            vals.append(v.float())
    if not vals:
        return {}
    host = torch.stack(vals).tolist()
    out = dict(zip(keys, host))
    for k in {k.split("/")[0] for k in keys}:
        layer = [v for kk, v in out.items() if kk.split("/")[0] == k]
        out[f"{k}/mean"] = sum(layer) / len(layer)
    return out


def relu2_stats(y1: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """y2_zero_frac: fraction of zeros of y2 = relu(y1)^2; dropped_nnz_frac: fraction of y2's non-zeros that the
    2:4 mask removes (computed with the mask 2:4 would use even while dense, to show what sparsity would cost)."""
    from .. import kernels
    r = torch.relu(y1)
    y2 = r * r
    nz = y2 != 0
    if mask is None:
        mask = kernels.reference.mask24(y2)
    nnz = nz.sum()
    return {
        "y2_zero_frac": 1.0 - nnz / nz.numel(),
        "dropped_nnz_frac": (nz & ~mask).sum() / nnz.clamp(min=1),
    }


_PERMS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def token_permutation(seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed pseudo-random permutation of sequence positions (seed 0, one per seq_len) and its inverse.

    Haziza et al.: features are correlated across neighbouring tokens, so grouping 4 consecutive tokens for the
    weight-gradient 2:4 would prune clustered non-zeros; a fixed shuffle decorrelates the groups.
    """
    key = (seq_len, str(device))
    if key not in _PERMS:
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(seq_len, generator=g)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(seq_len)
        _PERMS[key] = (perm.to(device), inv.to(device))
    return _PERMS[key]
