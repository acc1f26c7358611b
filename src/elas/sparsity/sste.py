"""2:4 weight sparsity by soft-thresholding (S-STE; Madhyastha et al. part 1): config, handler, linear.

    sparsify_(model, SSTE24Config(dense_warmup_steps=1000, sparse_until=0.5))

replaces the two linears of every full-rank ReLU^2 FFN by `SSTELinear`s (same parameter, same state-dict key
`weight`, plus the frozen scale `beta`). Schedule: dense for `dense_warmup_steps`, then sparse until
`sparse_until` (a fraction of max_steps when a float in [0, 1], a step when an int), then dense to the end
(the paper: 1B 30k sparse + 30k dense). In the sparse phase the forward uses

    S(W) = beta * S_soft(W),   S_soft = kernels.reference.soft_threshold24 along d_in (groups of 4 weights)

with beta = <W, S_soft(W)> / ||S_soft(W)||^2 per tensor, computed when the sparse phase first starts and then
frozen (recomputing it every step is documented to blow up); the gradient reaches the dense master weight
straight through (beta not applied in backward). The input gradient uses S(W) itself (the exact gradient of the
sparse forward); the paper's separately thresholded W^T is not built yet.

This path EMULATES 2:4 weights (masked dense GEMMs): no sparse-tensor-core GEMM runs it yet. The kernel that
packs S(W) and S(W^T) for those GEMMs each step exists (kernels/cuda/sste.py, bit-identical to
reference.soft_threshold24_packed in Triton's interpreter); wiring it to the cuSPARSELt operator is next.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import reference as ref
from ..model.ffn import ReLU2FFN
from .api import Applied, SparsityMethod, register_method

log = logging.getLogger("elas.sparsity")


@dataclass
class SSTE24Config(SparsityMethod):
    name: ClassVar[str] = "sste24"
    version: ClassVar[int] = 1
    stat_names: ClassVar[tuple[str, ...]] = ("flip_rate",)

    dense_warmup_steps: int = 1000  # dense before this step
    sparse_until: float | int = 0.5  # end of the sparse phase: fraction of max_steps (float) or a step (int)

    def __post_init__(self) -> None:
        self._check_types()
        if self.dense_warmup_steps < 0:
            raise ValueError(f"invalid sste24.dense_warmup_steps {self.dense_warmup_steps}: expected >= 0")
        u = self.sparse_until
        if isinstance(u, bool) or not isinstance(u, (int, float)) or u < 0 or (isinstance(u, float) and u > 1):
            raise ValueError(f"invalid sste24.sparse_until {u!r}: expected a fraction of max_steps in [0, 1] (a "
                             f"float) or a step (an int >= 0)")

    def sparse_end(self, max_steps: int) -> int:
        return int(round(self.sparse_until * max_steps)) if isinstance(self.sparse_until, float) else self.sparse_until

    def mode_at(self, step: int, max_steps: int) -> str:
        if step < self.dense_warmup_steps:
            return "dense"
        return "sparse" if step < self.sparse_end(max_steps) else "dense-final"

    def operands(self) -> tuple[str, ...]:
        return ("up.weight", "down.weight")


class _SoftThreshold24(torch.autograd.Function):
    """S(W) forward, identity backward (straight-through to the dense master weight)."""

    @staticmethod
    def forward(ctx, w, beta):
        return beta * ref.soft_threshold24(w)[0]

    @staticmethod
    def backward(ctx, g):
        return g, None


class SSTELinear(nn.Linear):
    """A bias-free linear whose forward uses S(W) in the sparse phase (see module docs). `weight` stays the
    dense master; `beta` [] fp32 is 0 until the sparse phase first starts, then frozen (saved in checkpoints, so
    a resumed run keeps it)."""

    def __init__(self, lin: nn.Linear):
        super().__init__(lin.in_features, lin.out_features, bias=False, device="meta")
        self.weight = lin.weight
        self.register_buffer("beta", torch.zeros((), device=lin.weight.device))
        self.active = False
        self.stats_sink: list | None = None
        self._last_mask: torch.Tensor | None = None  # of the previous statistics probe (for the flip rate)

    def set_mode(self, mode: str) -> None:
        self.active = mode == "sparse"
        if self.active and float(self.beta) == 0.0:  # first sparse step of the run (a resumed run loads beta)
            with torch.no_grad():
                w = self.weight.float()
                s = ref.soft_threshold24(w)[0]
                self.beta.fill_((w * s).sum() / (s * s).sum().clamp(min=1e-30))

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: S(W) in the sparse phase, W otherwise (read by FFN cores too)."""
        if not self.active:
            return self.weight
        return _SoftThreshold24.apply(self.weight, self.beta.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_sink is not None:
            self._record_flips()
        return F.linear(x, self.effective_weight())

    @torch.no_grad()
    def _record_flips(self) -> None:
        """flip_rate: the fraction of the 2:4 mask's entries that changed since the previous probe (a log step)."""
        mask = ref.soft_threshold24(self.weight)[1]
        prev, self._last_mask = self._last_mask, mask
        flips = (mask != prev).float().mean() if prev is not None else torch.zeros(())
        self.stats_sink.append({"flip_rate": flips})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, S-STE 2:4 weights, active={self.active}"


@register_method(SSTE24Config)
def _apply_sste24(model: nn.Module, cfg: SSTE24Config, filter_fn) -> Applied:
    ffns = [(n, m) for n, m in model.named_modules()
            if isinstance(m, ReLU2FFN) and (filter_fn is None or filter_fn(m, n))]
    if not ffns:
        raise ValueError("sste24 (2:4 weights) found no ReLU^2 FFN to apply to: it needs ffn='relu2'")
    for n, f in ffns:
        for part in ("up", "down"):
            lin = getattr(f, part)
            if isinstance(lin, SSTELinear):
                raise ValueError(f"sste24 is already applied to {n}.{part}: both would make operand "
                                 f"'{part}.weight' sparse")
            if type(lin) is not nn.Linear or lin.bias is not None:
                raise TypeError(f"sste24: {n}.{part} is a {type(lin).__name__}; S-STE 2:4 weights apply to "
                                f"bias-free full-rank nn.Linear (the paper's setting), not to low-rank factors")
            if lin.in_features % 4:
                raise ValueError(f"sste24: {n}.{part} has {lin.in_features} inputs, not a multiple of 4")
    targets, old = [], []
    for n, f in ffns:
        for part in ("up", "down"):
            lin = getattr(f, part)
            new = SSTELinear(lin)
            old.append((f, part, lin))
            setattr(f, part, new)
            targets.append((f"{n}.{part}", new))

    def detach() -> None:
        for f, part, lin in old:
            setattr(f, part, lin)

    desc = (f"2:4 weights by soft-thresholding (S-STE) on {len(ffns)} FFNs: dense for {cfg.dense_warmup_steps} "
            f"steps, sparse until {cfg.sparse_until!r} (of max_steps when a fraction), then dense; emulated "
            f"(masked dense GEMMs, not accelerated)")
    claims = {(n, op) for n, _ in ffns for op in cfg.operands()}
    return Applied(cfg, targets, claims, detach, desc)


__all__ = ["SSTE24Config", "SSTELinear"]
