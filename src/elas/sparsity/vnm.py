"""V:N:M activation sparsity on ReLU^2 FFNs (Madhyastha et al., part 2): config, handler, core. EMULATED.

    sparsify_(model, VNMConfig(v=64, m=8, grad_mode="ste", dense_warmup_steps=1000))

replaces the core of every ReLU^2 FFN by a `VNMCore`. In mode "sparse" y2 = relu(y1)^2 [T, d_ff] is made V:N:M
(reference.vnm_mask: in each block of v tokens x m features, 4 features shared by the block's tokens, 2 of
them kept per token: density 2/m, 75% sparse at m=8), so that, with a sparse-tensor-core kernel, the down
projection could skip the block's other m-4 features and run 2:4 on the 4. Gradients as for 2:4: `ste`
(straight through) or `mask` (the forward's mask on dy2).

Tokens share features only if they are grouped: here the v tokens of a block are consecutive in the batch
(no router yet), which is the baseline the paper's neuron-level router improves on. The choices the paper
leaves open, made here: v=64 (a 64-row band of the SM90 layout; Venom uses 64 or 128), m=8 (75% sparsity,
inside the 84-98% zeros of long runs), the 4 columns chosen by exhaustive search of the kept magnitude.
Everything here is masked dense arithmetic: it measures quality, it accelerates nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..kernels import reference as ref
from ..model.ffn import relu2
from .act24 import GRAD_MODES, relu2_stats
from .api import Applied, SparsityMethod, register_method, relu2_ffns


@dataclass
class VNMConfig(SparsityMethod):
    name: ClassVar[str] = "vnm"
    version: ClassVar[int] = 1
    stat_names: ClassVar[tuple[str, ...]] = ("y2_zero_frac", "dropped_nnz_frac")

    v: int = 64  # tokens per block (they share the block's 4 features)
    m: int = 8  # features per block; each token keeps 2 of them
    grad_mode: str = "ste"  # ste | mask
    dense_warmup_steps: int = 1000

    def __post_init__(self) -> None:
        self._check_types()
        if self.v < 1:
            raise ValueError(f"invalid vnm.v {self.v}: expected a positive number of tokens per block")
        if not 4 <= self.m <= 16:
            raise ValueError(f"invalid vnm.m {self.m}: expected 4..16 features per block (the exhaustive choice "
                             f"of 4 of m)")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"invalid vnm.grad_mode {self.grad_mode!r}: expected one of {', '.join(GRAD_MODES)}")
        if self.dense_warmup_steps < 0:
            raise ValueError(f"invalid vnm.dense_warmup_steps {self.dense_warmup_steps}: expected >= 0")

    @property
    def density(self) -> float:
        """Kept fraction of y2 (2 of every m features per token): the work a V:N:M kernel would do."""
        return 2 / self.m

    def mode_at(self, step: int, max_steps: int) -> str:
        return "dense" if step < self.dense_warmup_steps else "sparse"

    def operands(self) -> tuple[str, ...]:
        return ("y2",)


class _ReLU2VNM(torch.autograd.Function):
    """y1 [T, d_ff] -> y2s = relu(y1)^2 * mask (V:N:M on y2 as rounded in y1's dtype); backward 2 relu(y1) dy2,
    with dy2 masked in `mask` mode."""

    @staticmethod
    def forward(ctx, y1, v: int, m: int, mask_grad: bool):
        r = torch.relu(y1)
        y2 = r * r
        mask = ref.vnm_mask(y2, v, m)
        ctx.save_for_backward(r, mask)
        ctx.mask_grad = mask_grad
        return y2 * mask

    @staticmethod
    def backward(ctx, dy2):
        r, mask = ctx.saved_tensors
        if ctx.mask_grad:
            dy2 = dy2 * mask
        return 2 * r * dy2, None, None, None


class VNMCore(nn.Module):
    """core(x, up, down) with x [batch, seq, d_model]: dense ReLU^2 in mode "dense", V:N:M in mode "sparse"."""

    def __init__(self, cfg: VNMConfig):
        super().__init__()
        self.cfg = cfg
        self.active = False
        self.stats_sink: list | None = None

    def set_mode(self, mode: str) -> None:
        self.active = mode == "sparse"

    def extra_repr(self) -> str:
        return f"v={self.cfg.v}, m={self.cfg.m}, grad_mode={self.cfg.grad_mode}, masked, active={self.active}"

    def forward(self, x: torch.Tensor, up: nn.Module, down: nn.Module) -> torch.Tensor:
        y1 = up(x)  # [batch, seq, d_ff]
        flat = y1.reshape(-1, y1.shape[-1])  # [T, d_ff]: blocks of v consecutive tokens
        if self.stats_sink is not None:  # a probe (no grad): the mask V:N:M uses, or would use while dense
            r = torch.relu(flat)
            self.stats_sink.append(relu2_stats(flat, ref.vnm_mask(r * r, self.cfg.v, self.cfg.m)))
        if not self.active:
            return down(relu2(y1))
        y2s = _ReLU2VNM.apply(flat, self.cfg.v, self.cfg.m, self.cfg.grad_mode == "mask")
        return down(y2s.reshape(y1.shape))


@register_method(VNMConfig)
def _apply_vnm(model: nn.Module, cfg: VNMConfig, filter_fn) -> Applied:
    ffns = relu2_ffns(model, filter_fn, "vnm (V:N:M activations)")
    for n, f in ffns:
        if f.d_ff % cfg.m:
            raise ValueError(f"vnm: {n} has d_ff={f.d_ff}, not a multiple of m={cfg.m}")
    old = [(f, f.core) for _, f in ffns]
    targets = []
    for n, f in ffns:
        f.core = VNMCore(cfg)
        targets.append((n, f.core))

    def detach() -> None:
        for f, core in old:
            f.core = core

    desc = (f"V:N:M activation sparsity (v={cfg.v}, m={cfg.m}: {2 / cfg.m:.0%} dense, {cfg.grad_mode} gradient) "
            f"on {len(ffns)} FFNs after {cfg.dense_warmup_steps} dense steps; emulated (masked dense GEMMs, no "
            f"router yet: blocks of consecutive tokens)")
    return Applied(cfg, targets, {(n, "y2") for n, _ in ffns}, detach, desc)


__all__ = ["VNMConfig", "VNMCore"]
