"""Autograd functions of 2:4 activation sparsity (backend-agnostic; kernels come from elas.kernels).

- `relu2_sparse24(y1, grad_mode, backend)`: y2s = 2:4(relu(y1)^2) along d_ff, with two gradient modes:
    ste  (ELAS):   dL/dy2 passes the sparsifier as identity; dy1 = 2 relu(y1) dy2 reaches dropped entries too.
    mask (Haziza): the forward mask is re-applied, dy1 = 2 relu(y1) (dy2 * mask); dropped entries get 0.
  In `mask` mode dy1 is itself 2:4 along d_ff, so the input-gradient GEMM dx = dy1 W1 can run sparse exactly.
- `split_linear(x, weight, plan, split_input)`: y = x @ weight^T whose *weight gradient* is computed the way
  Haziza et al.'s 95/5 split GEMM computes it: the d_ff-wide operand (the input x when split_input, otherwise
  the output gradient) is pruned 2:4 along tokens, except the densest features, which stay dense. The input
  gradient is exact. `plan` (a WgradSplit) is read in backward, so the FFN can fill in the dense features after
  y1 exists, as Haziza et al. do in the epilogue of the y1 GEMM.
"""
from __future__ import annotations

import torch

from .. import kernels


class _Relu2Sparse24(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y1: torch.Tensor, grad_mode: str, backend: str):
        y2s, mask = kernels.get_backend(backend).relu2_sparsify24(y1)  # y2s: [T, d_ff], 2:4 along d_ff
        ctx.grad_mode = grad_mode
        ctx.save_for_backward(y1, mask if grad_mode == "mask" else None)
        ctx.mark_non_differentiable(mask)
        return y2s, mask

    @staticmethod
    def backward(ctx, dy2s: torch.Tensor, _dmask):
        y1, mask = ctx.saved_tensors
        if ctx.grad_mode == "mask":
            dy2s = dy2s * mask
        return 2 * torch.relu(y1) * dy2s, None, None


def relu2_sparse24(y1: torch.Tensor, grad_mode: str = "ste", backend: str = "auto"):
    """Returns (y2s, mask). y1: [..., d_ff]; both outputs have y1's shape; mask is bool (2:4 along d_ff)."""
    if grad_mode not in ("ste", "mask"):
        raise ValueError(f"unknown grad_mode {grad_mode!r}; expected 'ste' or 'mask'")
    return _Relu2Sparse24.apply(y1, grad_mode, backend)


class WgradSplit:
    """Which d_ff features stay dense in the weight-gradient GEMMs of one FFN call (bool [d_ff], set once)."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self.dense: torch.Tensor | None = None


class _SplitWgradLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, plan: WgradSplit, split_input: bool):
        # x: [T, in]; weight: [out, in]; the d_ff side is `in` when split_input, else `out`
        ctx.split_input, ctx.plan = split_input, plan
        ctx.save_for_backward(x, weight)
        return x @ weight.T

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        dense = ctx.plan.dense
        if dense is None:
            raise RuntimeError("WgradSplit.dense was never set in the forward pass")
        k = kernels.get_backend(ctx.plan.backend)
        # under autocast the forward matmul ran in bf16 while x or weight may be fp32; backward runs without
        # autocast, so bring every operand to the gradient's dtype (autograd casts the results back)
        x, weight = x.to(gy.dtype), weight.to(gy.dtype)
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            if x.shape[0] % 4:
                raise ValueError(f"the 95/5 weight-gradient split prunes along tokens and needs a token count "
                                 f"divisible by 4, got {x.shape[0]}")
            if ctx.split_input:
                gw = gy.T @ k.wgrad_split_operand(x, dense)  # [out, in=d_ff]
            else:
                gw = k.wgrad_split_operand(gy, dense).T @ x  # [out=d_ff, in]
        return gx, gw, None, None


def split_linear(x: torch.Tensor, weight: torch.Tensor, plan: WgradSplit | None, split_input: bool) -> torch.Tensor:
    """x: [T, in] @ weight[out, in]^T; see module docs. plan None: plain linear."""
    if plan is None:
        return x @ weight.T
    return _SplitWgradLinear.apply(x, weight, plan, split_input)
