"""Feed-forward blocks: SwiGLU (baseline) and the ungated ReLU^2 FFN, whose middle is a pluggable core.

Both take x: [batch, seq, d_model]; their linears are nn.Linear or LowRankLinear (W = A.B) from make_linear.
`ReLU2FFN(up, down, core)` computes core(x, up, down); the default core is the dense relu(up(x))^2 -> down.
Methods that change the FFN's middle (2:4 activations) replace the core from outside (elas.build applies them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lowrank import LowRankLinear, make_linear


class _ReLU2(torch.autograd.Function):
    """y2 = relu(y1)^2 with a hand-written backward dy1 = 2 relu(y1) dy2.

    Autograd of `r = relu(y1); r * r` runs four pointwise launches in backward (two products for the two uses of
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


def _weight(lin: nn.Module) -> torch.Tensor:
    """The weight a linear's forward multiplies by: `effective_weight()` where a weight method (S-STE) gives
    one, else the parameter."""
    return lin.effective_weight() if hasattr(lin, "effective_weight") else lin.weight


def ffn_operands(up: nn.Module, down: nn.Module, xt: torch.Tensor):
    """The d_ff-touching operands of an FFN's two linears, for full-rank and low-rank alike, on xt [T, d]:
    h1 [T, q] and wu [d_ff, q] with up(xt) = h1 wu^T; wd [d_ff, q'] and post with down(y) = post(y wd)."""
    if isinstance(up, LowRankLinear):
        h1, wu = xt @ up.weight_in, up.weight_out  # [T, r], [d_ff, r]
    else:
        h1, wu = xt, _weight(up)  # [T, d], [d_ff, d]
    if isinstance(down, LowRankLinear):
        w_out = down.weight_out  # [d_model, r]
        # under autocast F.linear casts; without it the packed core's bf16 output meets the weight's dtype
        return h1, wu, down.weight_in, lambda h2: F.linear(
            h2 if torch.is_autocast_enabled(h2.device.type) else h2.to(w_out.dtype), w_out)
    return h1, wu, _weight(down).t(), lambda h2: h2  # wd = W_down^T [d_ff, d_model]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, rank: int = 0, init_std: float = 0.02):
        super().__init__()
        self.gate = make_linear(d_model, d_ff, rank, init_std)
        self.up = make_linear(d_model, d_ff, rank, init_std)
        self.down = make_linear(d_ff, d_model, rank, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DenseReLU2(nn.Module):
    """The default core: y3 = down(relu(up(x))^2), with y1 = up(x) [.., d_ff]."""

    def forward(self, x: torch.Tensor, up: nn.Module, down: nn.Module) -> torch.Tensor:
        return down(relu2(up(x)))


class FusedReLU2(nn.Module):
    """The dense core with its pointwise work inside the GEMMs (model.relu2_kernel=fused; build_model installs it
    in place of DenseReLU2): `op(h1, wu, wd) -> h2` on the FFN's d_ff-touching operands, with op =
    elas::relu2_ffn (kernels/ops.py: on bf16 CUDA tensors the up-projection's epilogue writes y2 = relu(y1)^2,
    y1 never written, and the backward's dy2 GEMM writes dy1 = 2 sqrt(y2) dy2, dy2 never written; the FFN saves
    y2 alone where DenseReLU2 saves relu(y1) and y2). The same math as DenseReLU2: bit-identical pointwise results
    on the same GEMM outputs. The op is given, not imported: the model does not depend on the kernels. Linears
    that are not plain (a weight method's, e.g. S-STE's, which run their own products) take the unfused path."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor, up: nn.Module, down: nn.Module) -> torch.Tensor:
        if not (_plain(up) and _plain(down)):
            return down(relu2(up(x)))
        bsz, seq, d = x.shape
        h1, wu, wd, post = ffn_operands(up, down, x.reshape(bsz * seq, d))
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else wu.dtype
        with torch.autocast(dev, enabled=False):  # the op's GEMMs run in the compute dtype, as autocast's would
            h2 = self.op(h1.to(dtype), wu.to(dtype), wd.to(dtype))  # [T, q']
        return post(h2).reshape(bsz, seq, -1)


def _plain(lin: nn.Module) -> bool:
    return type(lin) in (nn.Linear, LowRankLinear) and getattr(lin, "bias", None) is None


class ReLU2FFN(nn.Module):
    """y3 = core(x, up, down): up [d_model -> d_ff], down [d_ff -> d_model], the core computes what lies between
    (dense ReLU^2 by default). Tensors (T = batch*seq tokens): y1 [T, d_ff] pre-activation, y3 [T, d_model]."""

    def __init__(self, up: nn.Module, down: nn.Module, core: nn.Module | None = None):
        super().__init__()
        self.up, self.down = up, down
        self.core = core if core is not None else DenseReLU2()

    @classmethod
    def of_width(cls, d_model: int, d_ff: int, rank: int = 0, init_std: float = 0.02) -> "ReLU2FFN":
        return cls(make_linear(d_model, d_ff, rank, init_std), make_linear(d_ff, d_model, rank, init_std))

    @property
    def d_ff(self) -> int:
        return self.up.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x, self.up, self.down)
