"""The masked 2:4 FFN core: the reference path (plain torch, masked dense GEMMs: it EMULATES sparsity).

On the d_ff-touching operands of a ReLU^2 FFN (see act24.ffn_operands): h1 [T, q] the input of the
d_ff-producing factor wu [d_ff, q], and wd [d_ff, q'] the d_ff-consuming factor,

    forward:  y1 = h1 wu^T   y2s = 2:4(relu(y1)^2) along d_ff (kernels.reference)   h2 = y2s wd   [T, q']
    backward: dy2 = dh2 wd^T     (dh2 wd_dgrad^T where a weight method gives the input gradient its own matrix:
                                  S-STE's S(W^T), whose packed form runs this product on sparse tensor cores)
              ste  (ELAS):   dy1 = 2 relu(y1) dy2         (dL/dy2s passes the sparsifier as identity)
              mask (Haziza): dy1 = 2 relu(y1) (dy2 * mask) (dy1 is 2:4 with the forward's pattern)
              dwd = op(y2s)^T dh2, dwu = op(dy1)^T h1, dh1 = dy1 wu
with op the identity, or with the 95/5 split (dense_frac) `reference.wgrad_split_operand`: the d_ff-wide operand
pruned 2:4 along tokens except the densest features (most positives of y1), which stay dense; that is what the
split's sparse + dense weight-gradient GEMMs compute. The split plan is computed here, from y1, in the forward.
This is the numerical definition the packed core (kernels/ops.py: act24_ffn) is tested against.
"""
from __future__ import annotations

import torch

from ..kernels import reference as ref


class _MaskedAct24(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h1, wu, wd, mask_grad: bool, dense_frac: float | None, wd_dgrad=None):
        y1 = h1 @ wu.T  # [T, d_ff]
        y2s, mask = ref.relu2_sparsify24(y1)  # [T, d_ff], 2:4 along d_ff
        # the split ranks features by their positives in y1, as the packed core's sparsifier counts them (y1 > 0: a
        # NaN neuron is no positive; relu(NaN) != 0 ranked it the densest and took a dense slot from another feature)
        dense = None if dense_frac is None else ref.dense_features_from_counts((y1 > 0).sum(0), dense_frac)
        ctx.mask_grad, ctx.split = mask_grad, dense is not None
        ctx.wd_col = ref.col_major(wd)  # dwd is written in wd's layout (reference.wgrad says why)
        ctx.save_for_backward(h1, wu, wd if wd_dgrad is None else wd_dgrad, y1, mask,
                              *(() if dense is None else (dense,)))
        return y2s @ wd  # [T, q']

    @staticmethod
    def backward(ctx, dh2):
        h1, wu, wd, y1, mask, *dense = ctx.saved_tensors  # wd: wd_dgrad where given (only dy2 reads it)
        y2s = ref.relu2_sparsify24(y1)[0]
        dy2 = dh2 @ wd.T  # [T, d_ff]
        if ctx.mask_grad:
            dy2 = torch.where(mask, dy2, 0.0)
        # (where, not relu(y1) * ..: a NaN y1 gives 0 here, as in the packed path's kernels, not NaN)
        dy1 = torch.where(y1 > 0, 2 * y1 * dy2, 0.0)
        if ctx.split:
            y2s_w, dy1_w = _split_operand(y2s, dense[0]), _split_operand(dy1, dense[0])
        else:
            y2s_w, dy1_w = y2s, dy1
        return dy1 @ wu, ref.wgrad(dy1_w, h1, ref.col_major(wu)), ref.wgrad(y2s_w, dh2, ctx.wd_col), None, None, None


def _split_operand(y: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """ref.wgrad_split_operand for any token count: tokens padded with zero rows to a multiple of 4 (the groups
    of 2:4 along tokens; a zero token adds nothing to a weight gradient), the padding dropped again."""
    t = y.shape[0]
    pad = (-t) % 4
    if not pad:  # (as before: the traced graph of a multiple of 4 tokens gains no slice)
        return ref.wgrad_split_operand(y, dense)
    return ref.wgrad_split_operand(torch.nn.functional.pad(y, (0, 0, 0, pad)), dense)[:t]


def masked_act24_ffn(h1: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, mask_grad: bool,
                     dense_frac: float | None = None, wd_dgrad: torch.Tensor | None = None) -> torch.Tensor:
    """h1 [T, q], wu [d_ff, q], wd [d_ff, q'] (one dtype), wd_dgrad [d_ff, q'] or None (a constant) -> h2 [T, q']
    (see module docs)."""
    return _MaskedAct24.apply(h1, wu, wd, mask_grad, dense_frac, wd_dgrad)


__all__ = ["masked_act24_ffn"]
