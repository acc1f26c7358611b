"""V:N:M own mode computed for real (vnm.path=grouped): tokens laid out by cluster, each multiplied by its cluster's
neurons only, as a grouped GEMM over the clusters (a neuron-level mixture of experts).

    h2 = grouped_core(h1, wu, wd, cid, features, mask_grad)     # h1 [T, q] -> h2 [T, q']

Layout (group_layout): cluster c's tokens, in token order, fill rows [start_c, start_c + count_c) of a [P, .]
operand, start_c a multiple of ALIGN, P = T + ALIGN * C (static, so the path traces and captures); the other
rows are zero padding. With top-k routing (vnm.topk) each token has a row in each of its k clusters: P = T * k +
ALIGN * C, and a token's output is the sum of its k rows'. Every row move is a gather both ways (_Take): no
accumulating scatter, no sort. The six FFN GEMMs are torch's grouped GEMM (one CUTLASS sm90 kernel on Hopper) over
the C clusters: 4/m of the dense work at m features per block, whatever k; the 2:4 inside (ops.relu2_sparsify24_dense, one Triton pass) is zeros in a dense
operand, not exploited by the GEMM. Equal to the masked path (vnm.py) up to summation order
(S-STE weights: with `sste24.input_grad=exact`; `transposed` is refused with this path).
"""
from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels import reference as ref


class _ReLU2Select24(torch.autograd.Function):
    """y1 [P, F] -> y2s = 2:4(relu(y1)^2) along F, dense (ops.relu2_sparsify24_dense: one Triton pass on CUDA,
    the selection of reference.mask24 on y2 rounded to y1's dtype); backward 2 relu(y1) dy2 (`ste`), masked by
    the kept entries in `mask` mode. The kept set is read back as y2s != 0: it differs from the selection only
    where relu(y1) > 0 squares to 0 in y1's dtype (|y1| < ~7e-21 in bf16), whose gradient 2 relu(y1) dy2 is that
    small anyway."""

    @staticmethod
    def forward(ctx, y1, mask_grad: bool):
        y2s = ops.relu2_sparsify24_dense(y1)
        ctx.save_for_backward(y1, y2s if mask_grad else None)
        return y2s

    @staticmethod
    def backward(ctx, dy2):
        y1, y2s = ctx.saved_tensors
        # (where, not relu(y1) * ..: a NaN y1, dropped by the forward, gives 0 here as in the masked twin, not NaN)
        dy1 = torch.where(y1 > 0, 2 * y1 * dy2, 0.0)
        if y2s is not None:
            dy1 = torch.where(y2s != 0, dy1, 0.0)
        return dy1, None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [T, k] (rows in groups: group g ends at row offs[g]), b [G, k, n] -> [T, n], group g's rows times b[g].
    bf16: torch's grouped GEMM (one kernel on Hopper). Other dtypes (CPU fp32 runs and tests): its twin, every
    group's product over all rows kept where the row is the group's: the same result for G times the work."""
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:
        return torch._grouped_mm(a, b, offs=offs)
    rows = torch.arange(a.shape[0], device=a.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True)  # [T]
    out = a.new_zeros(a.shape[0], b.shape[2])
    for g in range(b.shape[0]):
        out = out + (a @ b[g]) * (group == g)[:, None].to(a.dtype)
    return out


ALIGN = 16  # rows: every group of the grouped GEMM starts at a multiple of this. torch 2.11's bf16 kernel gave the
# same results with unaligned offsets on an H200 (benchmarks/results/h200/vnm_grouped_diag.json), but its weight
# gradient contracts over a group's tokens, and low-precision grouped kernels require 16-byte-aligned offsets
# there: 16 rows hold for every dtype at a cost of at most 16 zero rows per cluster


class _Take(torch.autograd.Function):
    """out = x[idx] along dim 0 with rows where idx >= len(x) zero, then each `fold` consecutive rows summed; the
    backward is the same for the output gradient with `back` and `back_fold`. idx and back are mutually inverse maps
    between the rows of x and of out: with top-k routing a token's row of x is taken k times (back_fold = k sums its
    k gradients) and its k output rows are summed into one (fold = k). Neither direction scatters."""

    @staticmethod
    def forward(ctx, x, idx, back, fold: int = 1, back_fold: int = 1):
        ctx.save_for_backward(back)
        ctx.back_fold = back_fold
        # x a transposed view (wd = W_down^T [d_ff, q']): its gradient is gathered in that layout (one pass), so
        # that it reaches W_down contiguous and autograd keeps it; gathered by rows it reached W_down transposed and
        # autograd copied it once more (reference.wgrad says why)
        # (only a permutation of x's rows, as the weights' flat/inv: back then holds no padding index, which
        # index_select would refuse where _take gives a zero row; tokens' moves keep the row gather)
        ctx.col = (ref.col_major(x) and idx.shape[0] == x.shape[0] == back.shape[0] and fold == 1
                   and back_fold == 1)
        return _fold(_take(x, idx), fold)

    @staticmethod
    def backward(ctx, g):
        (back,) = ctx.saved_tensors
        if ctx.col:  # [n, q'] with strides (1, n): row back[i] of g as row i
            return torch.index_select(g.t(), 1, back).t(), None, None, None, None
        return _fold(_take(g, back), ctx.back_fold), None, None, None, None


class _GradInLayout(torch.autograd.Function):
    """Identity whose backward writes the gradient with x's strides. Used on wd = W_down^T [d_ff, q'] (strides
    (1, d_ff)) where torch's grouped GEMM takes its [C, F, q'] view: that GEMM writes the weight gradient groups-
    outermost, [C, F, q'] contiguous, which reaches W_down transposed, and autograd's AccumulateGrad then copies it
    with a strided elementwise kernel (3.2 ms of a 1B relu2-vnm-fast step on an H100, step_w24_vnm.json). Here the
    transposition is one op of the backward graph, which the compiler emits as a tiled copy; the gradient then
    arrives in W_down's layout and is kept. (Eager, the same strided copy runs here instead of in AccumulateGrad; where
    the gradient is added to an existing one (gradient accumulation, the FFN benchmark's replays) the move is a pass
    the former strided add did not make: not measured.)"""

    @staticmethod
    def forward(ctx, x):
        ctx.layout = (x.shape, x.stride())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        shape, stride = ctx.layout
        return g if g.stride() == stride else torch.empty_strided(shape, stride, dtype=g.dtype,
                                                                  device=g.device).copy_(g)


def _fold(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of k consecutive rows: [n * k, ...] -> [n, ...]."""
    return x if k == 1 else x.view(-1, k, *x.shape[1:]).sum(1)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if idx.shape[0] <= n:  # no more rows out than in, each taken at most once: no padding row to fill
        return x[idx]
    out = x[idx.clamp(max=n - 1)]
    return out * (idx < n).view(-1, *([1] * (x.dim() - 1))).to(out.dtype)


def group_layout(cid: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the grouped GEMM for cid int64 [T] (each token's cluster, in [0, c)): cluster g's tokens, in token
    order, fill rows [start_g, start_g + count_g), start_g a multiple of ALIGN; the other rows are zero padding.
    Returns src int64 [P] (the token of each row; T for padding), dest int64 [T] (the row of each token) and
    offs int32 [c] (the end row of each group; the last ends at P). P = T + ALIGN * c: static, so it traces and
    captures (no value leaves the device)."""
    t = cid.shape[0]
    p = t + ALIGN * c
    onehot = cid[:, None] == torch.arange(c, device=cid.device)[None, :]  # [T, c]
    counts = onehot.sum(0)  # [c]
    # each token's rank inside its cluster, in token order: a running count, not a sort (a radix sort of the
    # int64 ids cost ~0.1 ms per layer at 8k tokens on an H200, step_vnm.json)
    rank = (onehot.cumsum(0) - 1).gather(1, cid[:, None]).squeeze(1)  # [T]
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    ends = padded.cumsum(0)
    starts = ends - padded  # [c]
    dest = starts[cid] + rank  # [T]
    src = torch.full((p,), t, dtype=torch.int64, device=cid.device).scatter_(0, dest, torch.arange(
        t, device=cid.device))
    offs = torch.cat([ends[:-1], ends.new_full((1,), p)]).to(torch.int32)
    return src, dest, offs


def grouped_core(h1: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, cid: torch.Tensor, features: torch.Tensor,
                  mask_grad: bool, in_place: bool = False) -> torch.Tensor:
    """Own-mode V:N:M as a grouped GEMM: h1 [T, q], wu [d_ff, q], wd [d_ff, q'], cid int64 [T] (each token's
    cluster) or [T, k] (its k clusters), features int64 [C, F] (each cluster's features, ascending; F = d_ff / C; a
    partition of d_ff) -> h2 [T, q']. Tokens are laid out by cluster (group_layout; with k clusters a token has a
    row in each, and its output is the sum of its k rows' outputs); cluster c's rows multiply wu[features[c]] and
    wd[features[c]] only (F of the d_ff features: a neuron-level mixture of experts), with 2 of every 4 kept
    along them (mask24's rule, the order of routed_vnm_mask). Every row move is a gather both ways (_Take).
    in_place: features[c] are the consecutive neurons c*F..(c+1)*F-1 (vnm.clustering=contiguous), so each cluster's
    weights are a view of wu and wd, not a gather."""
    c, f = features.shape
    t = h1.shape[0]
    k = cid.shape[1] if cid.dim() == 2 else 1
    # over the T*k (token, cluster) pairs, token-major
    src, dest, offs = group_layout(cid if k == 1 else cid.reshape(-1), c)
    # [P]: the token of each row (t: padding); top-1 needs no op here (its graph stays the one the benchmarks timed)
    tok = src if k == 1 else torch.where(src < t * k, src // k, t)
    if in_place:
        if ref.col_major(wd):  # full-rank W_down^T (or S(W_down)^T): its gradient in W_down's layout (_GradInLayout)
            wd = _GradInLayout.apply(wd)
        wu_g, wd_g = wu.view(c, f, -1), wd.view(c, f, -1)  # [C, F, q], [C, F, q'] (wd may be a transposed view)
    else:
        flat = features.reshape(-1)
        # features is a partition of d_ff: its inverse permutation, by a scatter (no sort)
        inv = torch.empty_like(flat).scatter_(0, flat, torch.arange(flat.shape[0], device=flat.device))
        wu_g = _Take.apply(wu, flat, inv).view(c, f, -1)  # [C, F, q]
        wd_g = _Take.apply(wd, flat, inv).view(c, f, -1)  # [C, F, q']
    y1 = grouped_mm(_Take.apply(h1, tok, dest, 1, k), wu_g.transpose(1, 2), offs)  # [P, F]; padding rows 0
    y2s = _ReLU2Select24.apply(y1, mask_grad)  # [P, F]: ste along the cluster's own features
    h2 = grouped_mm(y2s, wd_g, offs)  # [P, q']
    return _Take.apply(h2, dest, tok, k, 1)  # [T, q']
