"""The 2:4 FFN core on packed tensors: the path that runs on sparse tensor cores.

For a ReLU^2 FFN (full-rank or low-rank) only the part around d_ff is special. With h1 [T, q] the input of the
d_ff-producing factor (q = d_model, or the rank r for low-rank), Wu [d_ff, q] that factor, and Wd [d_ff, q'] the
d_ff-consuming factor (W2^T for full-rank, N2 for low-rank):

    forward:  y1 = h1 Wu^T                 dense GEMM                     [T, d_ff]
              p  = pack(2:4(relu(y1)^2))   sparsifier kernel              values [T, d_ff/2] + metadata + mask
              h2 = p @ Wd                  2:4 GEMM (reduces over d_ff)    [T, q']
    backward: dy2 = dh2 Wd^T               dense GEMM (output is d_ff wide)
              y2s, dy1 (+ packed dy1)      one pointwise kernel
              dWd = y2s^T dh2, dWu = dy1^T h1   reduce over tokens: dense GEMMs, or with the 95/5 split
                                           (wgrad_dense_frac) a 2:4 GEMM on the sparser features, packed
                                           along tokens, plus a dense GEMM on the densest ones
              dh1 = dy1 Wu                 2:4 GEMM in `mask` mode (dy1 has the forward's pattern), dense in `ste`

Saved for backward: `mask` mode keeps only the packed y2s (0.5625 of a dense bf16 y2, plus a 1/16 mask): relu(y1)
on kept entries is rebuilt as sqrt(y2s). `ste` mode needs relu(y1) on the dropped entries too, so it keeps y1
(one dense tensor, like a dense ReLU^2 FFN that recomputes y2) and re-packs it in backward.
With the split, 4 of the 6 d_ff GEMMs run sparse in `mask` mode (Haziza et al.'s recipe), 3 in `ste` mode.
All operands bf16. `kernels` is a backend module (elas.kernels.get_backend): cuda on Hopper, the reference twin
(unpacks and multiplies densely: emulated) elsewhere.
"""
from __future__ import annotations

import torch

from ..kernels.packed import Packed24
from ..kernels.reference import n_dense_features


def _split_wgrad(k, y: torch.Tensor, g: torch.Tensor, idx_sp: torch.Tensor, idx_d: torch.Tensor) -> torch.Tensor:
    """y^T g ([F, q]) for y [T, F], g [T, q]: the features idx_sp as a 2:4 GEMM pruned along tokens, idx_d dense."""
    out = torch.empty(y.shape[1], g.shape[1], dtype=g.dtype, device=g.device)
    if idx_sp.numel():
        out[idx_sp] = k.sparse_mm(k.pack24_along_tokens(y, idx_sp), g)
    if idx_d.numel():
        out[idx_d] = y[:, idx_d].T @ g
    return out


class _PackedFFNCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h1, wu, wd, grad_mode: str, kernels, wgrad_dense_frac):
        y1 = h1 @ wu.T  # [T, d_ff]
        # the split ranks features by their positives in y1 (as the masked path does), counted by the sparsifier
        counts = None if wgrad_dense_frac is None else torch.zeros(y1.shape[1], dtype=torch.int32, device=y1.device)
        p = kernels.relu2_sparsify24_packed(y1, counts)
        h2 = kernels.sparse_mm(p, wd)  # [T, q']
        ctx.grad_mode, ctx.kernels, ctx.shape = grad_mode, kernels, p.shape
        split = ()
        if counts is not None:
            dense = kernels.dense_features_from_counts(counts, wgrad_dense_frac)
            n_dense = n_dense_features(dense.numel(), wgrad_dense_frac)  # host-known count: no sync
            # stable sort puts the dense features first, each group in ascending feature order
            order = torch.sort(dense.to(torch.uint8), descending=True, stable=True).indices
            split = (order[n_dense:], order[:n_dense])
        ctx.n_split = len(split)
        if grad_mode == "mask":
            ctx.save_for_backward(h1, wu, wd, p.buffer, p.mask_bits, *split)
        else:
            ctx.save_for_backward(h1, wu, wd, y1, *split)
        return h2

    @staticmethod
    def backward(ctx, dh2):
        k = ctx.kernels
        dh2 = dh2.contiguous()
        saved = ctx.saved_tensors
        split = saved[len(saved) - ctx.n_split:]
        if ctx.grad_mode == "mask":
            h1, wu, wd, buf, bits = saved[:5]
            p = Packed24(buf, bits, ctx.shape)
            y1 = None
        else:
            h1, wu, wd, y1 = saved[:4]
            p = k.relu2_sparsify24_packed(y1)
        dy2 = dh2 @ wd.T  # [T, d_ff]
        y2s, dy1, dy1_vals = k.relu2_sparse24_backward(dy2, p, y1)
        if split:
            dwd = _split_wgrad(k, y2s, dh2, *split) if ctx.needs_input_grad[2] else None  # [d_ff, q']
            dwu = _split_wgrad(k, dy1, h1.contiguous(), *split) if ctx.needs_input_grad[1] else None  # [d_ff, q]
        else:
            dwd = y2s.T @ dh2 if ctx.needs_input_grad[2] else None  # [d_ff, q']
            dwu = dy1.T @ h1 if ctx.needs_input_grad[1] else None  # [d_ff, q]
        dh1 = None
        if ctx.needs_input_grad[0]:
            if dy1_vals is not None:  # dy1 is 2:4 with the forward's metadata: reuse it, swap the values
                m, kk = ctx.shape
                dbuf = torch.empty_like(p.buffer).view(-1)
                dbuf[: m * kk // 2] = dy1_vals.view(-1)
                dbuf[m * kk // 2:] = p.buffer.view(-1)[m * kk // 2:]
                dh1 = k.sparse_mm(Packed24(dbuf.view_as(p.buffer), p.mask_bits, p.shape), wu)  # [T, q]
            else:
                dh1 = dy1 @ wu
        return dh1, dwu, dwd, None, None, None


def packed_ffn_core(h1: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, grad_mode: str, kernels,
                    wgrad_dense_frac: float | None = None) -> torch.Tensor:
    """h1: [T, q] bf16, wu: [d_ff, q] bf16, wd: [d_ff, q'] bf16 -> h2: [T, q'] bf16 (see module docs)."""
    return _PackedFFNCore.apply(h1, wu, wd, grad_mode, kernels, wgrad_dense_frac)
