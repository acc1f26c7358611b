"""The 2:4 FFN core on packed tensors: the path that runs on sparse tensor cores.

For a ReLU^2 FFN (full-rank or low-rank) only the part around d_ff is special. With h1 [T, q] the input of the
d_ff-producing factor (q = d_model, or the rank r for low-rank), Wu [d_ff, q] that factor, and Wd [d_ff, q'] the
d_ff-consuming factor (W2^T for full-rank, N2 for low-rank):

    forward:  y1 = h1 Wu^T                 dense GEMM                     [T, d_ff]
              p  = pack(2:4(relu(y1)^2))   sparsifier kernel              values [T, d_ff/2] + metadata + mask
              h2 = p @ Wd                  2:4 GEMM (reduces over d_ff)    [T, q']
    backward: dy2 = dh2 Wd^T               dense GEMM (output is d_ff wide)
              y2s, dy1 (+ packed dy1)      one pointwise kernel (with the split: y2s^T, dy1^T packed 2:4 along
                                           tokens, and the dense features' columns, instead of dense y2s)
              dWd = y2s^T dh2, dWu = dy1^T h1   reduce over tokens: dense GEMMs, or with the 95/5 split
                                           (wgrad_dense_frac) 2:4 GEMMs on the along-token packing, whose
                                           rows of the densest 5% of features are then replaced by dense GEMMs
              dh1 = dy1 Wu                 2:4 GEMM in `mask` mode (dy1 has the forward's pattern), dense in `ste`

Saved for backward: `mask` mode keeps only the packed y2s (0.5625 of a dense bf16 y2, plus a 1/16 mask): relu(y1)
on kept entries is rebuilt as sqrt(y2s). `ste` mode needs relu(y1) on the dropped entries too, so it keeps y1
(one dense tensor, like a dense ReLU^2 FFN that recomputes y2); its backward kernel redoes the selection from y1.
With the split, 4 of the 6 d_ff GEMMs run sparse in `mask` mode (Haziza et al.'s recipe), 3 in `ste` mode.
All operands bf16. `kernels` is a backend module (elas.kernels.get_backend): cuda on Hopper, the reference twin
(unpacks and multiplies densely: emulated) elsewhere.
"""
from __future__ import annotations

import torch

from ..kernels.packed import Packed24
from ..kernels.reference import n_dense_features


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
        ctx.n_dense = 0
        if counts is not None:
            dense = kernels.dense_features_from_counts(counts, wgrad_dense_frac)
            ctx.n_dense = n_dense_features(dense.numel(), wgrad_dense_frac)  # host-known count: no sync
            # stable sort puts the dense features first, in ascending feature order; slot j <- j-th of them
            idx_d = torch.sort(dense.to(torch.uint8), descending=True, stable=True).indices[:ctx.n_dense]
            slots = torch.full((dense.numel(),), -1, dtype=torch.int32, device=y1.device)
            slots.index_copy_(0, idx_d, torch.arange(ctx.n_dense, dtype=torch.int32, device=y1.device))
            split = (idx_d, slots)
        ctx.n_split = len(split)
        if grad_mode == "mask":
            ctx.save_for_backward(h1, wu, wd, p.buffer, p.mask_bits, *split)
        else:  # ste: the backward kernel recomputes the selection from y1 (no second sparsifier pass)
            ctx.save_for_backward(h1, wu, wd, y1, *split)
        return h2

    @staticmethod
    def backward(ctx, dh2):
        k = ctx.kernels
        dh2 = dh2.contiguous()
        saved = ctx.saved_tensors
        idx_d, slots = saved[len(saved) - ctx.n_split:] if ctx.n_split else (None, None)
        if ctx.grad_mode == "mask":
            h1, wu, wd, buf, bits = saved[:5]
            p, y1 = Packed24(buf, bits, ctx.shape), None
        else:
            (h1, wu, wd, y1), p = saved[:4], None
        h1 = h1.contiguous()
        dy2 = dh2 @ wd.T  # [T, d_ff]
        g = k.relu2_sparse24_backward(dy2, p, y1, slots, ctx.n_dense)
        dwd = dwu = dh1 = None
        if slots is not None:
            # 95/5 split: every feature as a 2:4 GEMM pruned along tokens, then the n_dense densest features'
            # rows overwritten by their exact dense product (5% of the sparse GEMM's rows are wasted work; no
            # gather or scatter of the other 95%)
            if ctx.needs_input_grad[2]:
                dwd = k.sparse_mm(g.y2s_t, dh2).index_copy_(0, idx_d, g.y2s_dense.T @ dh2)  # [d_ff, q']
            if ctx.needs_input_grad[1]:
                dwu = k.sparse_mm(g.dy1_t, h1).index_copy_(0, idx_d, g.dy1_dense.T @ h1)  # [d_ff, q]
        else:
            dwd = g.y2s.T @ dh2 if ctx.needs_input_grad[2] else None  # [d_ff, q']
            dwu = g.dy1.T @ h1 if ctx.needs_input_grad[1] else None  # [d_ff, q]
        if ctx.needs_input_grad[0]:
            if g.dy1_values is not None:  # dy1 is 2:4 with the forward's metadata: reuse it, swap the values
                m, kk = ctx.shape
                dbuf = torch.empty_like(p.buffer).view(-1)
                dbuf[: m * kk // 2] = g.dy1_values.view(-1)
                dbuf[m * kk // 2:] = p.buffer.view(-1)[m * kk // 2:]
                dh1 = k.sparse_mm(Packed24(dbuf.view_as(p.buffer), p.mask_bits, p.shape), wu)  # [T, q]
            else:
                dh1 = g.dy1 @ wu
        return dh1, dwu, dwd, None, None, None


def packed_ffn_core(h1: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, grad_mode: str, kernels,
                    wgrad_dense_frac: float | None = None) -> torch.Tensor:
    """h1: [T, q] bf16, wu: [d_ff, q] bf16, wd: [d_ff, q'] bf16 -> h2: [T, q'] bf16 (see module docs)."""
    return _PackedFFNCore.apply(h1, wu, wd, grad_mode, kernels, wgrad_dense_frac)
