"""Reference 2:4 kernels: plain torch, masked dense, any device.

This module is the *numerical definition* of every sparsity kernel in elas. It EMULATES sparsity (zeros are
multiplied like any other value); it does not accelerate anything. Accelerated kernels (kernels/cuda) must have
the same signature and produce the same masks and values, and are tested against these functions.

Tie-break rule (used everywhere, GPU kernels included): inside a group of 4, element i is kept when fewer than 2
elements of the group beat it, where j beats i if |x_j| > |x_i|, or |x_j| == |x_i| and j < i (the earlier
feature wins a tie). Exactly 2 of every 4 positions are kept, so groups with fewer than 2 non-zeros keep zeros.
NaN never occurs in a finite forward; if it does, the comparison treats it as smaller than everything, and a
dropped entry is 0 whatever its value (as the packed path and the kernels write it).
"""
from __future__ import annotations

import itertools

from typing import NamedTuple

import torch

from .packed import Packed24, bits_to_mask, gather_kept, kept_positions, pack24, unpack24

__all__ = [
    "mask24",
    "sparsify24",
    "relu2_sparsify24",
    "soft_threshold24",
    "dense_feature_split",
    "n_dense_features",
    "dense_features_from_counts",
    "dense_slots",
    "wgrad_split_operand",
    "relu2_sparsify24_packed",
    "sparse_mm",
    "relu2_sparse24_backward",
    "Grads24",
    "pack24_along_tokens",
    "linear_relu2",
    "relu2_grad_gemm",
    "rmsnorm_backward",
]


def _check_group_dim(x: torch.Tensor, dim: int) -> int:
    dim = dim % x.dim()
    if x.shape[dim] % 4 != 0:
        raise ValueError(
            f"2:4 sparsity needs the sparsified dimension to be a multiple of 4, got size {x.shape[dim]} "
            f"(dim {dim} of shape {tuple(x.shape)})"
        )
    return dim


def mask24(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Boolean 2:4 magnitude mask of x: in each group of 4 consecutive entries along ``dim`` keep the 2 largest |x|.

    x: any shape, size along ``dim`` a multiple of 4. Returns bool, same shape, exactly 2 True per group.
    """
    dim = _check_group_dim(x, dim)
    xt = x.movedim(dim, -1)
    a = xt.abs().reshape(*xt.shape[:-1], xt.shape[-1] // 4, 4)  # [..., groups, 4]
    a = torch.nan_to_num(a, nan=-1.0)
    a0, a1, a2, a3 = a.unbind(-1)  # [..., g] each
    # the six comparisons of a group, each once: l_ij (i < j) = entry j beats entry i, i.e. is strictly larger
    # (on a tie the earlier entry wins). An entry is kept where fewer than 2 others beat it. (Six [g] compares
    # and uint8 adds: 2.6x less CPU time than comparing [g, 4, 4] rivals, the reference path's main cost on a CPU)
    l01, l02, l03, l12, l13, l23 = (t.to(torch.uint8) for t in (a1 > a0, a2 > a0, a3 > a0, a2 > a1, a3 > a1,
                                                                   a3 > a2))
    beaten = torch.stack([l01 + l02 + l03, 1 - l01 + l12 + l13, 2 - l02 - l12 + l23, 3 - l03 - l13 - l23], -1)
    return (beaten < 2).reshape(xt.shape).movedim(-1, dim)


def _transposable_patterns(device=None) -> torch.Tensor:
    """The 90 binary 4 x 4 patterns with two ones in every row and every column, [90, 16] (row-major), in
    lexicographic order of their rows' column pairs."""
    pairs = list(itertools.combinations(range(4), 2))
    out = []
    for rows in itertools.product(pairs, repeat=4):
        if all(sum(c in r for r in rows) == 2 for c in range(4)):
            out.append([float(c in r) for r in rows for c in range(4)])
    return torch.tensor(out, device=device)


def transposable24_mask(x: torch.Tensor) -> torch.Tensor:
    """Transposable 2:4 magnitude mask of x [M, K] (M, K multiples of 4): in each 4 x 4 block, the pattern with
    two kept entries in every row AND every column that keeps the largest sum of |x| (the first best of the 90 in
    `_transposable_patterns` order). Rows are 2:4 along K and columns 2:4 along M, so one selection serves a GEMM
    that reduces over K (the forward) and one that reduces over M (the weight gradient along tokens). Returns
    bool [M, K]."""
    m, k = x.shape
    if m % 4 or k % 4:
        raise ValueError(f"transposable 2:4 needs both sizes to be multiples of 4, got {tuple(x.shape)}")
    pats = _transposable_patterns(x.device)  # [90, 16]
    a = torch.nan_to_num(x.abs().float(), nan=-1.0)
    blocks = a.reshape(m // 4, 4, k // 4, 4).permute(0, 2, 1, 3).reshape(m // 4, k // 4, 16)
    best = (blocks @ pats.T).argmax(-1)  # [M/4, K/4]: first maximum
    keep = pats[best].bool().reshape(m // 4, k // 4, 4, 4).permute(0, 2, 1, 3)
    return keep.reshape(m, k)


def sparsify24(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x with the 2:4 mask applied, mask). Shapes equal x. A dropped entry is 0 whatever its value (x * m
    kept a dropped NaN as NaN, where the packed twins write 0)."""
    m = mask24(x, dim)
    return torch.where(m, x, 0.0), m


def relu2_sparsify24(y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused-op twin: y2 = relu(y1)^2 computed in y1's dtype, then 2:4 along the last dim (d_ff).

    y1: [tokens, d_ff]. Returns y2s: [tokens, d_ff] (2:4 along d_ff), mask: [tokens, d_ff] bool.
    The mask is taken on the squares in at least fp32 (exact for bf16/fp16 y1; for fp32 y1 they are y2
    itself), the kept values are y2 in y1's dtype. The kernels choose the same way without rounding first.
    For bf16 y1 this is the choice on y2 as rounded, except where two squares of a group are fp32 subnormals
    that round to one bf16 value (|y1| in [2.6e-23, 1.0e-19]): there the larger square is kept, not the earlier.
    """
    r = torch.relu(y1)
    y2 = r * r  # in y1's dtype even under autocast (which would run .square(), a pow, in fp32)
    rw = r.float() if r.dtype in (torch.bfloat16, torch.float16) else r
    mask = mask24(rw * rw, dim=-1)
    return torch.where(mask, y2, 0.0), mask


def soft_threshold24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S-STE's soft threshold (Hu et al., arXiv 2409.09099) along the last dim, in groups of 4:
    t = the 2nd-smallest |w| of the group (the largest pruned magnitude); S_soft(w) = sign(w) max(|w| - t, 0).
    The 2 largest keep their sign, shrunk by t; the others become 0. Returns (S_soft(w), mask of the kept two by
    the tie rule of mask24). w: [..., K], K % 4 == 0."""
    _check_group_dim(w, -1)
    a = w.abs().reshape(*w.shape[:-1], w.shape[-1] // 4, 4)
    lo = torch.minimum(a[..., 0::2], a[..., 1::2])  # [..., g, 2]: min of pairs (0,1), (2,3)
    hi = torch.maximum(a[..., 0::2], a[..., 1::2])
    # 2nd smallest of four = min(max of the two pair-minima, min of the two pair-maxima)
    t = torch.minimum(lo.max(-1).values, hi.min(-1).values).unsqueeze(-1)  # [..., g, 1]
    s = (torch.sign(w).reshape(a.shape) * torch.clamp(a - t, min=0)).reshape(w.shape)
    return s, mask24(w)


def soft_threshold24_packed(w: torch.Tensor, beta: torch.Tensor, transpose: bool = False):
    """The twin of kernels/cuda/sste.py: Packed24 of beta * S_soft(w) along w's last dim ([R, C]), or of w^T
    along R ([C, R]) when transpose; the kept positions are mask24 of the (transposed) weight, the values
    beta * S_soft in fp32 rounded to bf16."""
    from .packed import pack24
    x = w.t() if transpose else w
    s, mask = soft_threshold24(x.float())
    return pack24(beta.float() * s, mask, check=False)  # mask24's mask is 2:4 by construction (and traces)


def vnm_mask(y: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """V:N:M magnitude mask of y [T, K] (N = 2; Venom, arXiv 2310.02065): in each block of v consecutive rows x m
    consecutive columns, 4 columns are shared by the block's rows (the 4 that keep the largest total |y|: every
    one of the C(m, 4) choices is scored, the first best in lexicographic order wins), and each row keeps 2 of
    those 4 by the 2:4 rule of mask24. Density 2/m. T is padded with zero rows to a multiple of v (zeros add
    nothing to any score). Returns bool [T, K]. Exhaustive: meant for m <= 16 (1820 choices)."""
    t, k = y.shape
    if k % m or m < 4:
        raise ValueError(f"V:N:M needs the columns ({k}) to be a multiple of m={m} >= 4")
    pad = (-t) % v
    a = torch.nn.functional.pad(y.abs().float(), (0, 0, 0, pad))
    bt, bk = (t + pad) // v, k // m
    a = a.reshape(bt, v, bk, m).permute(0, 2, 1, 3)  # [bt, bk, v, m]
    # [C, 4] ascending, lexicographic; from Python (torch.combinations has a data-dependent shape: no trace)
    combos = torch.tensor(list(itertools.combinations(range(m), 4)), device=y.device)
    top2 = a[..., combos].topk(2, dim=-1).values.sum(-1)  # [bt, bk, v, C]: what each row keeps per choice
    best = top2.sum(2).argmax(-1)  # [bt, bk]: first maximum
    cols = combos[best][:, :, None, :].expand(bt, bk, v, 4)  # [bt, bk, v, 4]
    keep = mask24(torch.gather(a, 3, cols))  # 2 of the 4 chosen columns per row
    mask = torch.zeros_like(a, dtype=torch.bool).scatter(3, cols, keep)
    return mask.permute(0, 2, 1, 3).reshape(bt * v, k)[:t]


def routed_vnm_mask(y: torch.Tensor, token_cluster: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """V:N:M by routing (sparsity/router.py): token t keeps, of the features of its cluster features[token_cluster[t]]
    (in that order), 2 of every 4 by the rule of mask24; every other feature is dropped. y [T, K], token_cluster
    int64 [T], features int64 [C, K/C] (the clusters partition the K features). Returns bool [T, K], density 2/(4C):
    any tokens of one cluster share their features, so v of them form a V:N:M block with M = 4C.
    token_cluster int64 [T, k]: each token keeps the union of its k clusters' features (each cluster's own 2:4
    groups, K/C % 4 == 0), density 2k/(4C)."""
    idx = features[token_cluster].reshape(y.shape[0], -1)  # [T, k * K/C]
    keep = mask24(torch.gather(y, 1, idx))
    return torch.zeros_like(y, dtype=torch.bool).scatter(1, idx, keep)


def n_dense_features(n_feat: int, dense_frac: float) -> int:
    """How many of n_feat features the 95/5 split keeps dense (see dense_feature_split): known on the host
    without looking at the data, so the split needs no device-to-host sync (and is CUDA-graph safe)."""
    if not 0.0 <= dense_frac <= 1.0:
        raise ValueError(f"dense_frac must be in [0, 1], got {dense_frac}")
    n_dense = min(n_feat, int(-(-dense_frac * n_feat // 1)))  # ceil
    if n_feat % 64 == 0 and 0 < n_dense < n_feat:
        n_dense = n_feat - 64 * round((n_feat - n_dense) / 64)
    return n_dense


def dense_feature_split(y: torch.Tensor, dense_frac: float) -> torch.Tensor:
    """Which features (columns of y: [tokens, features]) are too dense to be pruned along tokens.

    Returns a bool vector [features]: True for the n_dense columns with the most non-zeros (ties: lower index
    first). Haziza et al. keep these 5% dense in the weight-gradient GEMMs and prune the rest 2:4 along the
    token dimension. n_dense = ceil(dense_frac * features); when features % 64 == 0 it is then moved to the
    nearest count that leaves a multiple of 64 sparse features (the row tile of the sparse GEMM): 128 of 2176,
    384 of 8192 for dense_frac = 0.05.
    """
    return dense_features_from_counts((y != 0).sum(0), dense_frac)


def dense_features_from_counts(nnz: torch.Tensor, dense_frac: float) -> torch.Tensor:
    """dense_feature_split from the per-feature non-zero counts nnz [features] (any integer dtype)."""
    n_feat = nnz.numel()
    n_dense = n_dense_features(n_feat, dense_frac)
    dense = torch.zeros(n_feat, dtype=torch.bool, device=nnz.device)
    if n_dense > 0:
        # stable descending sort: more non-zeros first, lower index first among equals
        order = torch.sort(nnz, descending=True, stable=True).indices
        dense.index_fill_(0, order[:n_dense], True)  # not `dense[...] = True`: that copies a CPU scalar (no graph)
    return dense


def dense_slots(dense: torch.Tensor, n_dense: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_d [n_dense] int64: the dense features in ascending order, slots [features] int32: each dense feature's
    rank among them, -1 for the others) from the bool vector of dense features, by a prefix sum (no sort)."""
    slots = torch.where(dense, torch.cumsum(dense, 0, dtype=torch.int32) - 1, -1).to(torch.int32)
    return slot_features(slots, n_dense), slots


def slot_features(slots: torch.Tensor, n_dense: int) -> torch.Tensor:
    """The feature of each dense slot [n_dense] int64, from slots [features] (slot or -1)."""
    every = torch.arange(slots.numel(), device=slots.device)
    # the sparse features (slot -1) all land in a spare last entry (static shapes: traces and captures)
    idx_d = torch.zeros(n_dense + 1, dtype=torch.long, device=slots.device)
    idx_d.scatter_(0, torch.where(slots >= 0, slots, n_dense).long(), every)
    return idx_d[:n_dense]


def wgrad_split_operand(y: torch.Tensor, dense_features: torch.Tensor) -> torch.Tensor:
    """The token-side operand of a weight-gradient GEMM as the 95/5 split computes it.

    y: [tokens, features] (tokens a multiple of 4). Columns flagged in ``dense_features`` are returned unchanged;
    the others are 2:4-pruned along the token dimension (groups of 4 consecutive tokens), which is what a sparse
    GEMM reducing over tokens would see. yᵀ·g with this operand equals sparse GEMM + dense GEMM of the split.
    """
    pruned, _ = sparsify24(y, dim=0)
    return torch.where(dense_features.unsqueeze(0), y, pruned)


# ---- packed (SM90 cuSPARSELt layout) twins of the accelerated kernels -----------------------------------------
def relu2_sparsify24_packed(y1: torch.Tensor, feature_counts: torch.Tensor | None = None):
    """y1: [M, K] -> Packed24 of 2:4(relu(y1)^2) (values bf16; mask taken in y1's dtype). Twin of the Triton kernel.
    feature_counts: optional int32 [K]; the positives of each column of y1 (= non-zeros of relu(y1), which the
    95/5 split ranks features by) are added to it, so the split needs no second pass over y1."""
    y2s, mask = relu2_sparsify24(y1)
    if feature_counts is not None:
        feature_counts += (y1 > 0).sum(0, dtype=torch.int32)
    return pack24(y2s, mask, check=False)  # mask24 keeps exactly 2 of 4 by construction


def up_relu2_sparsify24(h1: torch.Tensor, wu: torch.Tensor, write_y1: bool = True,
                        feature_counts: torch.Tensor | None = None):
    """h1 [M, K], wu [N, K] -> (y1 = h1 wu^T [M, N] in h1's dtype, or None; Packed24 of 2:4(relu(y1)^2)): the
    up-projection and the sparsifier, the twin of the fused kernel (kernels/cuda/epilogue.py)."""
    y1 = h1 @ wu.T
    return (y1 if write_y1 else None), relu2_sparsify24_packed(y1, feature_counts)


def dgrad_relu2_ste(dh2: torch.Tensor, wd: torch.Tensor, y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dh2 [M, K], wd [N, K], y1 [M, N] -> (y2s, dy1) [M, N] bf16: dy2 = dh2 wd^T, then the `ste` backward
    pointwise work (relu2_sparse24_backward from y1). The twin of the fused kernel (kernels/cuda/epilogue.py)."""
    g = relu2_sparse24_backward(dh2 @ wd.T, None, y1)
    return g.y2s, g.dy1


def linear_relu2(h1: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """h1 [M, K], wu [N, K] -> y2 = relu(h1 wu^T)^2 [M, N] in h1's dtype: the twin of the fused forward GEMM
    (kernels/cuda/relu2_gemm.py)."""
    r = torch.relu(h1 @ wu.T)
    return r * r


def relu2_grad_gemm(dh2: torch.Tensor, wd: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """dh2 [M, K], wd [N, K], y2 [M, N] -> dy1 = 2 sqrt(y2) (dh2 wd^T) [M, N]: relu(y1) rebuilt from y2 (exact in
    bf16 wherever y2 is a normal number). The twin of the fused backward GEMM (kernels/cuda/relu2_gemm.py)."""
    return 2 * torch.sqrt(y2) * (dh2 @ wd.T)


def rope_pairs(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, rot_cols: int,
               inverse: bool = False) -> torch.Tensor:
    """Rotary embedding on interleaved column pairs: y [L, M, N] (rows m at position m % seq; cos, sin [seq,
    head_dim/2]); the columns l*N + n < rot_cols (q and k, whole heads) are rotated pairwise, (y[2i], y[2i+1]) of
    each head by angle (m % seq, i): (x0 cos - x1 sin, x1 cos + x0 sin), in fp32, returned in y's dtype; inverse:
    by the opposite angle (the rotation's transpose: the backward). The rest pass unchanged. This is llama.py's
    apply_rope (halves x1, x2 of a head) on columns permuted so that each half-pair is adjacent."""
    n_b, m, n = y.shape
    v = y.float().permute(1, 0, 2).reshape(m, n_b * n)  # [M, L*N]: the virtual columns l*N + n
    pos = torch.arange(m, device=y.device) % cos.shape[0]
    c, s = cos.float()[pos][:, None], sin.float()[pos][:, None]  # [M, 1, head_dim/2]
    if inverse:
        s = -s
    r = v[:, :rot_cols].reshape(m, rot_cols // head_dim, head_dim // 2, 2)
    x0, x1 = r[..., 0], r[..., 1]
    rot = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).reshape(m, rot_cols)
    out = torch.cat([rot, v[:, rot_cols:]], dim=1).to(y.dtype)
    return out.reshape(m, n_b, n).permute(1, 0, 2)


def linear_rope(a: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                rot_cols: int) -> torch.Tensor:
    """Twin of the rope GEMM: rope_pairs(a [L, M, K] @ w [L, N, K]^T) with the product rounded to a's dtype first
    (what the GEMM writes). [L, M, N], contiguous."""
    return rope_pairs(torch.bmm(a, w.transpose(1, 2)), cos, sin, head_dim, rot_cols).contiguous()


def _rope_rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """model.apply_rope's rotation of x [B, S, H, D] (halves x1, x2 of each head) in fp32; c, s [S, 1, D/2].
    inverse: by the opposite angle (the rotation's transpose: a gradient taken back through it)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    s = -s if inverse else s
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _rope_attention_parts(q, k, cos, sin, round_rotated: bool, rotated: bool = False):
    """(rotated q, rotated k [B, S, H, D] fp32, P [B, H, S, S] fp32, natural-log lse [B, H, S], c, s). rotated: q and
    k are already rotated (the forward's saved rotation)."""
    s, d = q.shape[1], q.shape[-1]
    c, sn = cos[:s, None].float(), sin[:s, None].float()  # [S, 1, D/2]
    qr, kr = (q.float(), k.float()) if rotated else (_rope_rotate(q, c, sn), _rope_rotate(k, c, sn))
    if round_rotated and not rotated:  # what apply_rope hands the attention: the rotation rounded to q's dtype
        qr, kr = qr.to(q.dtype).float(), kr.to(k.dtype).float()
    scores = torch.einsum("bqhd,bkhd->bhqk", qr, kr) / d ** 0.5
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return qr, kr, torch.exp(scores - lse[..., None]), lse, c, sn


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   save_rotated: bool = False) -> tuple[torch.Tensor, ...]:
    """Twin of kernels/cuda/attention.py's forward: q, k, v [B, S, H, D] (unrotated), cos, sin [>= S, D/2] ->
    o [B, S, H, D] contiguous in q's dtype, lse [B * H, S] fp32 in the log2 domain. Causal softmax attention with
    scale 1/sqrt(D) on q and k rotated as model.apply_rope rotates them (rounded to their dtype), in fp32.
    save_rotated: also those rotated q and k [B, S, H, D] contiguous in q's dtype (for the backward)."""
    b, s, h, _ = q.shape
    qr, kr, p, lse, _, _ = _rope_attention_parts(q, k, cos, sin, round_rotated=True)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v.float())
    out = (o.to(q.dtype).contiguous(), (lse * 1.4426950408889634).reshape(b * h, s))
    return out + (qr.to(q.dtype).contiguous(), kr.to(k.dtype).contiguous()) if save_rotated else out


def rope_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of the backward: (dq, dk, dv) [B, S, H, D] in q's dtype, the gradients of rope_attention's o (in fp32,
    the rotation unrounded) w.r.t. the unrotated q, k and v for the output gradient do, written out (no autograd:
    an operator's implementation runs below it). rotated: q and k are the forward's saved rotation (save_rotated;
    rounded to their dtype), the gradients still w.r.t. the unrotated q and k."""
    d = q.shape[-1]
    qr, kr, p, _, c, sn = _rope_attention_parts(q, k, cos, sin, round_rotated=False, rotated=rotated)
    dof = do.float()
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dof)
    dp = torch.einsum("bqhd,bkhd->bhqk", dof, v.float())
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) / d ** 0.5  # softmax's backward, the scale folded in
    dq = _rope_rotate(torch.einsum("bhqk,bkhd->bqhd", ds, kr), c, sn, inverse=True)
    dk = _rope_rotate(torch.einsum("bhqk,bqhd->bkhd", ds, qr), c, sn, inverse=True)
    return tuple(g.to(q.dtype).contiguous() for g in (dq, dk, dv))


def rmsnorm_backward(dn: torch.Tensor, x: torch.Tensor, dres: torch.Tensor | None, w: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a residual stream x [.., d] that feeds both n = rmsnorm(x) w and the residual path:
    dn [.., d] reaches n, dres [.., d] (or None) the residual path. With r = rsqrt(mean(x^2) + eps), xh = x r and
    g = dn w (fp32): dx = dres + r (g - xh mean(g xh)) in x's dtype, dw = sum over rows of dn xh in w's dtype.
    The twin of kernels/cuda/rmsnorm.py, which computes both in one pass over dn and x."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xh = xf * rstd
    g = dn.float() * w.float()
    dx = rstd * (g - xh * (g * xh).mean(-1, keepdim=True))
    if dres is not None:
        dx = dx + dres.float()
    dw = (dn.float() * xh).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(w.dtype)


def softmax_xent_grad(z: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of the LM head's cross-entropy: logits z [T, V], targets t [T] (valid indices), scale [T] ->
    (g = (softmax(z) - onehot(t)) * scale [T, V] in z's dtype, nll = logsumexp(z) - z[t] [T]), the math in fp32
    (fp64 stays fp64). The twin of kernels/cuda/xent.py, which reads z and writes g in one pass."""
    acc = torch.promote_types(z.dtype, torch.float32)
    zf = z.to(acc)
    lse = torch.logsumexp(zf, dim=1)  # [T]
    nll = lse - zf.gather(1, t[:, None]).squeeze(1)
    g = zf.sub_(lse[:, None]).exp_() if zf is not z else (zf - lse[:, None]).exp()  # (in place on a fresh upcast)
    g.scatter_add_(1, t[:, None], -torch.ones_like(g[:, :1]))
    return g.mul_(scale.to(acc)[:, None]).to(z.dtype).contiguous(), nll


def col_major(w: torch.Tensor) -> bool:
    """w [K, N] is a transposed view of a contiguous [N, K] tensor (strides (1, K))."""
    return w.dim() == 2 and w.shape[0] > 1 and w.stride(0) == 1 and w.stride(1) == w.shape[0]


def wgrad(x: torch.Tensor, y: torch.Tensor, col: bool = False) -> torch.Tensor:
    """x^T y [K, N] (x [T, K], y [T, N]), written column-major where col (strides (1, K)): a weight gradient in its
    operand's layout. Why: an FFN core takes W_down as its transposed view wd = W_down^T [d_ff, q']; a gradient
    written contiguous for that view reaches W_down transposed, and autograd's AccumulateGrad, which keeps a
    gradient only in its parameter's layout, copies it: one [q', d_ff] copy per layer, 3.0 ms of a 1B full-rank
    2:4 step on an H100 (benchmarks/launch_sources.py). Written column-major it arrives contiguous and is kept."""
    return (y.T @ x).T if col else x.T @ y


def sparse_mm(a, b: torch.Tensor) -> torch.Tensor:
    """a: Packed24 [M, K] (2:4 along K), b: [K, N] -> a @ b [M, N] in b's dtype. Emulated: unpack, dense GEMM."""
    return (unpack24(a).to(b.dtype) @ b)


def pack24_along_tokens(y: torch.Tensor, idx: torch.Tensor):
    """y: [T, F], idx: [n] -> Packed24 of y[:, idx]^T ([n, T]) pruned 2:4 along tokens (mask24 rule on |y|).
    The weight-gradient operand of the 95/5 split (mask_bits left empty); on the cuda backend the backward kernel
    writes it directly (relu2_sparse24_backward with dense_slots)."""
    a = y[:, idx].T.contiguous()
    p = pack24(*sparsify24(a, dim=-1), check=False)
    return Packed24(p.buffer, torch.empty(0, dtype=torch.uint8, device=y.device), p.shape)


class Grads24(NamedTuple):
    """What the backward pointwise pass of the packed 2:4 FFN produces (None: not produced in this mode).

    y2s, dy1:      [M, K] bf16 dense (y2s only without the split; dy1 also with it in ste mode, for dh1 = dy1 Wu)
    dy1_values:    [M, K/2] bf16, mask mode: dy1's kept values in the forward's packed order (dy1 has its pattern)
    y2s_t, dy1_t:  Packed24 [K, M] of y2s^T and dy1^T pruned 2:4 along tokens, every feature (split only)
    y2s_dense, dy1_dense: [M, n_dense] bf16, the columns of the split's dense features, in slot order (split only)
    dy1_packed:    mask mode: Packed24 [M, K] of dy1 with the forward's metadata, ready for the 2:4 GEMM dy1 Wu;
                   dy1_values is a view of its values (the kernel writes them there: no copy of the values)
    """
    y2s: torch.Tensor | None
    dy1: torch.Tensor | None
    dy1_values: torch.Tensor | None
    y2s_t: Packed24 | None = None
    dy1_t: Packed24 | None = None
    y2s_dense: torch.Tensor | None = None
    dy1_dense: torch.Tensor | None = None
    dy1_packed: Packed24 | None = None


def relu2_sparse24_backward(dy2: torch.Tensor, a, y1: torch.Tensor | None = None,
                            dense_slots: torch.Tensor | None = None, n_dense: int = 0) -> Grads24:
    """Backward pointwise work of y2s = 2:4(relu(y1)^2), from the packed forward output.

    dy2: [M, K] gradient w.r.t. y2s; a: Packed24 of y2s (forward), or None in ste mode (the selection is then
    recomputed from y1, exactly as the forward made it); y1: [M, K] for the `ste` mode, None for `mask`.
        mask: dy1 = 2 r dy2 on kept entries, 0 elsewhere (r = relu(y1) rebuilt as bf16(sqrt(y2s)): no y1 needed);
              dy1_values are its kept values in packed order (dy1 has the forward's 2:4 pattern and metadata).
        ste:  dy1 = 2 relu(y1) dy2 everywhere; dy1_values None.
    dense_slots: int32 [K] (the 95/5 split): slot in [0, n_dense) of each dense feature, -1 for the others. With
    it the weight-gradient operands come out ready for the split (Grads24 docs) and dense y2s is not produced.
    Arithmetic in fp32, rounded once to bf16 (as the Triton kernel does).
    """
    if a is None:
        a = relu2_sparsify24_packed(y1)
    y2s = unpack24(a)
    d = dy2.float()
    if y1 is not None:
        y1f = y1.float()  # +0 where y1 <= 0 (even y1 = -0), as the kernel: the packing compares bytes
        dy1, dval = torch.where(y1f > 0, 2.0 * y1f * d, 0.0).to(torch.bfloat16), None
    else:
        mask = bits_to_mask(a.mask_bits, a.shape[1])
        # +0 wherever y2s is 0 (dropped or a kept zero): the along-token packing compares bytes of these
        # relu(y1) = bf16(sqrt(y2s)), exact for normal y2s whatever the sqrt's last bit (torch's CPU sqrt is not
        # correctly rounded on every machine)
        r = y2s.float().sqrt().to(torch.bfloat16).float()
        dy1 = torch.where(mask & (y2s != 0), 2.0 * r * d, 0.0).to(torch.bfloat16)
        dval = gather_kept(dy1, *kept_positions(mask, check=False))
    dpk = None
    if dval is not None:  # [values | the forward's metadata]: the layout the 2:4 GEMM reads
        m, k = a.shape
        buf = torch.cat([dval.reshape(-1), a.buffer.reshape(-1)[m * k // 2:]]).view(m, k * 9 // 16)
        dpk, dval = Packed24(buf, a.mask_bits, (m, k)), buf.view(-1)[: m * k // 2].view(m, k // 2)
    if dense_slots is None:
        return Grads24(y2s, dy1, dval, dy1_packed=dpk)
    every = torch.arange(y2s.shape[1], device=y2s.device)
    idx_d = slot_features(dense_slots, n_dense)
    return Grads24(None, dy1 if y1 is not None else None, dval, pack24_along_tokens(y2s, every),
                   pack24_along_tokens(dy1, every), y2s[:, idx_d], dy1[:, idx_d], dpk)