"""Feed-forward blocks: SwiGLU (baseline) and the ungated ReLU^2 FFN that 2:4 activation sparsity targets.

Both take x: [batch, seq, d_model]; their linears are nn.Linear or LowRankLinear (W = A.B) from make_linear.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import logging

from ..kernels import get_backend
from ..sparsity import (Act24Config, WgradSplit, packed_ffn_core, relu2_sparse24, relu2_stats, split_linear,
                        token_permutation)

log = logging.getLogger("elas.model")
_warned: set[str] = set()
from .lowrank import LowRankLinear, make_linear


class _ReLU2(torch.autograd.Function):
    """y2 = relu(y1)^2 with a hand-written backward dy1 = 2 relu(y1) dy2.

    Autograd of `r = relu(y1); r * r` runs four pointwise kernels in backward (two products for the two uses of
    r, their sum, the relu mask); this runs two and saves the same one tensor (r). Measured on H100 (bf16, 8192
    tokens, 1024 -> 3072 -> 1024): FFN forward+backward 0.595 ms vs 0.714 ms. Not `.square()` / `** 2`:
    autocast runs pow in fp32, doubling y2's memory and traffic."""

    @staticmethod
    def forward(ctx, y1):
        r = torch.relu(y1)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, dy2):
        (r,) = ctx.saved_tensors
        return 2 * r * dy2


def relu2(y1: torch.Tensor) -> torch.Tensor:
    """relu(y1)^2, elementwise, in y1's dtype (the dense ReLU^2 activation)."""
    return _ReLU2.apply(y1)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, rank: int = 0, init_std: float = 0.02):
        super().__init__()
        self.gate = make_linear(d_model, d_ff, rank, init_std)
        self.up = make_linear(d_model, d_ff, rank, init_std)
        self.down = make_linear(d_ff, d_model, rank, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ReLU2FFN(nn.Module):
    """y3 = W2 . relu(W1 . x)^2, optionally with y2 = relu(y1)^2 made 2:4 sparse along d_ff (per token).

    Tensors (T = batch*seq tokens): y1 [T, d_ff] pre-activation; y2s [T, d_ff] 2:4 along d_ff; y3 [T, d_model].
    Sparse mode is set by `sparsify_` (config) and the step schedule (`sparse_active`).
    """

    def __init__(self, d_model: int, d_ff: int, rank: int = 0, init_std: float = 0.02):
        super().__init__()
        self.up = make_linear(d_model, d_ff, rank, init_std)
        self.down = make_linear(d_ff, d_model, rank, init_std)
        self.act24: Act24Config | None = None
        self.sparse_active = False
        self.track_stats = False
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse_active:
            y1 = self.up(x)
            if self.track_stats:
                self.stats = relu2_stats(y1.detach(), None)
            return self.down(relu2(y1))
        return self._forward_sparse(x)

    def _forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.act24
        bsz, seq, d = x.shape
        if cfg.permute_tokens:
            perm, inv = token_permutation(seq, x.device)
            x = x[:, perm]
        xt = x.reshape(bsz * seq, d)  # [T, d_model]
        kern = cfg.packed_kernels()
        if kern is not None and (xt.shape[0] % 64 or self.up.out_features % 64):
            msg = (f"2:4 FFN: {xt.shape[0]} tokens x d_ff {self.up.out_features} is not a multiple of 64; "
                   f"using the reference path for this shape")
            if msg not in _warned:
                _warned.add(msg)
                log.warning(msg)
            kern = None
        if kern is not None:
            if self.track_stats:  # log steps only: one extra up-projection for the statistics
                with torch.no_grad():
                    self.stats = relu2_stats(self.up(xt), None)
            y3 = self._forward_packed(xt, kern).to(x.dtype).reshape(bsz, seq, d)
            return y3[:, inv] if cfg.permute_tokens else y3
        plan = WgradSplit(cfg.backend) if cfg.wgrad_dense_frac is not None and torch.is_grad_enabled() else None
        y1 = self._lin(self.up, xt, plan, d_ff_is_input=False)  # [T, d_ff]
        if plan is not None:
            # the densest features (most positives of y1, i.e. non-zeros of y2) stay dense in both weight-gradient
            # GEMMs; the plan is read in backward, after this line has run
            plan.dense = get_backend(cfg.backend).dense_feature_split(torch.relu(y1.detach()), cfg.wgrad_dense_frac)
        y2s, mask = relu2_sparse24(y1, cfg.grad_mode, cfg.backend)  # [T, d_ff], 2:4 along d_ff
        if self.track_stats:
            self.stats = relu2_stats(y1.detach(), mask)
        y3 = self._lin(self.down, y2s, plan, d_ff_is_input=True).reshape(bsz, seq, d)
        if cfg.permute_tokens:
            y3 = y3[:, inv]
        return y3

    def _forward_packed(self, xt: torch.Tensor, kern) -> torch.Tensor:
        """The packed 2:4 core (sparsity/packed_ffn.py) with the factors of this FFN, in bf16."""
        bf = torch.bfloat16
        up, down = self.up, self.down
        if isinstance(up, LowRankLinear):
            h1, wu = (xt @ up.weight_in).to(bf), up.weight_out.to(bf)  # [T, r], [d_ff, r]
        else:
            h1, wu = xt.to(bf), up.weight.to(bf)  # [T, d], [d_ff, d]
        wd = down.weight_in.to(bf) if isinstance(down, LowRankLinear) else down.weight.to(bf).t()  # [d_ff, q']
        with torch.autocast(xt.device.type, enabled=False):
            h2 = packed_ffn_core(h1, wu, wd, self.act24.grad_mode, kern, self.act24.wgrad_dense_frac)  # [T, q']
        if not isinstance(down, LowRankLinear):
            return h2
        w = down.weight_out  # [d_model, r]; under autocast F.linear casts, without it match the weight's dtype
        return F.linear(h2 if torch.is_autocast_enabled(xt.device.type) else h2.to(w.dtype), w)

    @staticmethod
    def _lin(mod: nn.Module, x: torch.Tensor, plan: WgradSplit | None, d_ff_is_input: bool) -> torch.Tensor:
        """Apply `mod` with the 95/5 weight-gradient split on the factor that touches d_ff."""
        if isinstance(mod, LowRankLinear):
            if d_ff_is_input:  # y2s [T, d_ff] @ N [d_ff, r] (split) -> [T, r] @ M^T
                return F.linear(split_linear(x, mod.weight_in.T, plan, split_input=True), mod.weight_out)
            h = x @ mod.weight_in  # [T, r]
            return split_linear(h, mod.weight_out, plan, split_input=False)  # [T, d_ff]
        return split_linear(x, mod.weight, plan, split_input=d_ff_is_input)
