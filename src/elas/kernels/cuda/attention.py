"""Triton kernels: causal attention with the rotary embedding applied inside, forward and backward.

Why: at the training shapes (sequence 256, head_dim 64-128) torch's fastest SDPA backend (cuDNN on Hopper) spends
much of its time outside its main kernels: the 1B low-rank step on an H100 runs 7.5 ms of attention per step, of
which 2.3 ms are the backward's two side passes (rowsum(dO * O), and dQ converted from an fp32 buffer), plus
2.5 ms of rotary kernels around it (benchmarks/results/h100/step_target_blocks.json). Here the rotation is done
on q and k as they are loaded, the backward computes rowsum(dO * O) for each query block where it needs it, and
each backward program writes its dK, dV (one key block) and dQ (one query block) once, in bf16, with no atomics:
dQ's scores are recomputed (two GEMMs more than the minimum, small at these lengths).

Layouts: q, k, v [B, S, H, D] with unit stride along D (the projections' own layout; any strides over B, S, H),
before rotation; cos, sin [>= S, D/2] fp32 contiguous (model/llama.py rope_tables: the rotate-half convention, so
feature i pairs with i + D/2). Outputs o, dq, dk, dv [B, S, H, D] contiguous in q's dtype; lse [B * H, S] fp32, the
log2 of each row's softmax denominator (scores in the log2 domain: s * scale * log2(e)). Causal; scale 1/sqrt(D)
(SDPA's default). The rotated q and k are rounded to q's dtype before their product, as model.apply_rope's output is;
P and dS are rounded to it before their products (as flash attention does); everything else accumulates in fp32
(fp32 inputs: full-precision products, not TF32).
Reference: reference.rope_attention.
"""
from __future__ import annotations

import json
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b in fp32, as one chain of tensor-core MMAs into acc (no separate add of two tiles). DOT: 0 for
    16-bit operands; 1 for fp32 ones, in full precision ("ieee": Triton's default for fp32 is TF32, a 10-bit
    mantissa, where torch's attention keeps fp32); 2 on the CPU interpreter, whose dot mishandles bf16 operands: the
    operands in fp32 first, which gives the same products (a bf16 x bf16 product is exact in fp32)."""
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if DOT == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_rows(ptr, rows, S, stride_s, D: tl.constexpr, EVEN: tl.constexpr):
    """Rows `rows` [R] of one head [R, D] (zeros past S; EVEN: every row < S, no bounds mask)."""
    off = rows[:, None] * stride_s + tl.arange(0, D)[None, :]
    if EVEN:
        return tl.load(ptr + off)
    return tl.load(ptr + off, mask=(rows < S)[:, None], other=0.0)


@triton.jit
def _load_rotated(ptr, rows, S, stride_s, cos_ptr, sin_ptr, D: tl.constexpr, EVEN: tl.constexpr):
    """Rows `rows` [R] of one head of q or k, rotated by their positions' angles: [R, D] in the input's dtype (rounded
    after the fp32 rotation, as apply_rope). One whole tile, so that each product is one dot over all of D: column
    c < D/2 is x[c] cos - x[c + D/2] sin, column c >= D/2 is x[c] cos + x[c - D/2] sin, the partner column loaded
    from the same rows (the same cache lines) and the [S, D/2] tables indexed by c mod D/2."""
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, D)
    partner = (cols + HALF) % D
    off = rows[:, None] * stride_s
    toff = rows[:, None] * HALF + (cols % HALF)[None, :]
    if EVEN:
        x = tl.load(ptr + off + cols[None, :])
        xp = tl.load(ptr + off + partner[None, :])
        c = tl.load(cos_ptr + toff)
        s = tl.load(sin_ptr + toff)
    else:
        valid = (rows < S)[:, None]
        x = tl.load(ptr + off + cols[None, :], mask=valid, other=0.0)
        xp = tl.load(ptr + off + partner[None, :], mask=valid, other=0.0)
        c = tl.load(cos_ptr + toff, mask=valid, other=0.0)
        s = tl.load(sin_ptr + toff, mask=valid, other=0.0)
    s = tl.where((cols < HALF)[None, :], -s, s)
    return (x.to(tl.float32) * c + xp.to(tl.float32) * s).to(x.dtype)


@triton.jit
def _store_unrotated(ptr, rows, S, stride_s, g, cos_ptr, sin_ptr, D: tl.constexpr, EVEN: tl.constexpr):
    """The gradient w.r.t. the rotated rows (g [R, D] fp32) taken back through the rotation (its transpose:
    g1 cos + g2 sin, g2 cos - g1 sin for the halves g1, g2) and stored as rows [R, D] in ptr's dtype. g's halves
    are split out once (a layout change at the end, not in the loop)."""
    HALF: tl.constexpr = D // 2
    R: tl.constexpr = g.shape[0]
    g1, g2 = tl.split(tl.permute(tl.reshape(g, [R, 2, HALF]), [0, 2, 1]))  # [R, HALF] each
    cols = tl.arange(0, HALF)
    toff = rows[:, None] * HALF + cols[None, :]
    off = rows[:, None] * stride_s + cols[None, :]
    if EVEN:
        c = tl.load(cos_ptr + toff)
        s = tl.load(sin_ptr + toff)
        tl.store(ptr + off, (g1 * c + g2 * s).to(ptr.dtype.element_ty))
        tl.store(ptr + off + HALF, (g2 * c - g1 * s).to(ptr.dtype.element_ty))
    else:
        valid = (rows < S)[:, None]
        c = tl.load(cos_ptr + toff, mask=valid, other=0.0)
        s = tl.load(sin_ptr + toff, mask=valid, other=0.0)
        tl.store(ptr + off, (g1 * c + g2 * s).to(ptr.dtype.element_ty), mask=valid)
        tl.store(ptr + off + HALF, (g2 * c - g1 * s).to(ptr.dtype.element_ty), mask=valid)


@triton.jit
def _visible(rows, cols, S, QUERY_ROWS: tl.constexpr, CAUSAL: tl.constexpr, EVEN: tl.constexpr):
    """Which pairs of a block of scores are attended to, [len(rows), len(cols)]: rows are queries and cols keys
    (QUERY_ROWS) or the reverse. The causal mask only on the blocks that cross the diagonal (CAUSAL), the bounds
    mask only where S is not a multiple of the blocks (not EVEN): keys past S, and in dK/dV's blocks queries past S
    too (their lse is 0, and exp2 of their scores could overflow into 0 * inf; elsewhere such rows are not stored)."""
    if EVEN:
        ok = tl.full([rows.shape[0], cols.shape[0]], 1, tl.int1)
    elif QUERY_ROWS:
        ok = tl.broadcast_to((cols < S)[None, :], [rows.shape[0], cols.shape[0]])
    else:
        ok = (rows < S)[:, None] & (cols < S)[None, :]
    if CAUSAL:
        if QUERY_ROWS:
            ok = ok & (rows[:, None] >= cols[None, :])
        else:
            ok = ok & (cols[None, :] >= rows[:, None])
    return ok


@triton.jit
def _fwd_block(acc, m_i, l_i, q, rm, kb, vb, start_n, S, sks, svs, cos_ptr, sin_ptr, scale_log2, D: tl.constexpr,
               BN: tl.constexpr, CAUSAL: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr):
    """One key block of the online softmax: keys start_n + [0, BN) against the query rows rm (rotated q [BM, D]);
    acc [BM, D], m_i, l_i [BM] (running max and denominator, log2 domain) updated."""
    rn = start_n + tl.arange(0, BN)
    k = _load_rotated(kb, rn, S, sks, cos_ptr, sin_ptr, D, EVEN)
    v = _load_rows(vb, rn, S, svs, D, EVEN)
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BN], tl.float32), DOT) * scale_log2  # [BM, BN]
    if CAUSAL or not EVEN:
        s = tl.where(_visible(rm, rn, S, True, CAUSAL, EVEN), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT), m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, o_ptr, lse_ptr,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, S, H, scale_log2,
              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr):
    # one program: BM query rows of one (batch, head); online softmax over the key blocks up to the diagonal.
    # A 1-D grid, the row blocks of one (batch, head) adjacent (they share its K and V through L2); grid axis 1
    # would cap batch x heads at 65,535
    pid_m, bh = tl.program_id(0) % tl.cdiv(S, BM), tl.program_id(0) // tl.cdiv(S, BM)
    b, h = (bh // H).to(tl.int64), bh % H  # (int64: offsets past 2^31 elements in a large batch)
    rm = pid_m * BM + tl.arange(0, BM)
    q = _load_rotated(q_ptr + b * sqb + h * sqh, rm, S, sqs, cos_ptr, sin_ptr, D, EVEN)
    kb, vb = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    # key blocks wholly below the diagonal (no mask), then those that cross it (causal mask)
    lo = (pid_m * BM) // BN * BN
    for start_n in range(0, lo, BN):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, rm, kb, vb, start_n, S, sks, svs, cos_ptr, sin_ptr, scale_log2,
                                   D, BN, False, EVEN, DOT)
    for start_n in range(lo, tl.minimum((pid_m + 1) * BM, S), BN):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, rm, kb, vb, start_n, S, sks, svs, cos_ptr, sin_ptr, scale_log2,
                                   D, BN, True, EVEN, DOT)
    # o in [B, S, H, D] contiguous: the o projection reads it as [B * S, H * D] without a copy
    o_off = ((b * S + rm[:, None]) * H + h) * D + tl.arange(0, D)[None, :]
    if EVEN:
        tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))
        tl.store(lse_ptr + bh * S + rm, m_i + tl.math.log2(l_i))
    else:
        tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=(rm < S)[:, None])
        tl.store(lse_ptr + bh * S + rm, m_i + tl.math.log2(l_i), mask=rm < S)


@triton.jit
def _dkdv_block(dk, dv, k, v, rn, qb, ob, dob, lb, start_m, S, sqs, sds, H, cos_ptr, sin_ptr, scale_log2,
                D: tl.constexpr, SUB: tl.constexpr, CAUSAL: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr):
    """Query rows start_m + [0, SUB) into dK, dV [BLK, D] fp32 of the key rows rn (rotated k, v [BLK, D]).
    rowsum(dO * O) of those rows is taken here, where it is needed (no side pass)."""
    rm = start_m + tl.arange(0, SUB)
    q = _load_rotated(qb, rm, S, sqs, cos_ptr, sin_ptr, D, EVEN)
    do = _load_rows(dob, rm, S, sds, D, EVEN)
    delta = tl.sum(do.to(tl.float32) * _load_rows(ob, rm, S, H * D, D, EVEN).to(tl.float32), 1)  # [SUB]
    if EVEN:
        lse = tl.load(lb + rm)
    else:
        lse = tl.load(lb + rm, mask=rm < S, other=0.0)
    zero = tl.zeros([rn.shape[0], SUB], tl.float32)
    pt = tl.math.exp2(_dot(k, tl.trans(q), zero, DOT) * scale_log2 - lse[None, :])  # [keys, queries]
    if CAUSAL or not EVEN:
        pt = tl.where(_visible(rn, rm, S, False, CAUSAL, EVEN), pt, 0.0)
    dv = _dot(pt.to(do.dtype), do, dv, DOT)
    dst = (pt * (_dot(v, tl.trans(do), zero, DOT) - delta[None, :])).to(q.dtype)
    return _dot(dst, q, dk, DOT), dv


@triton.jit
def _dq_block(dq, q, do, delta, lse, rm, kb, vb, start_n, S, sks, svs, cos_ptr, sin_ptr, scale_log2,
              D: tl.constexpr, SUB: tl.constexpr, CAUSAL: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr):
    """Key rows start_n + [0, SUB) into dQ [BLK, D] fp32 of the query rows rm (rotated q, do [BLK, D]); their scores
    recomputed."""
    rk = start_n + tl.arange(0, SUB)
    k = _load_rotated(kb, rk, S, sks, cos_ptr, sin_ptr, D, EVEN)
    v = _load_rows(vb, rk, S, svs, D, EVEN)
    zero = tl.zeros([rm.shape[0], SUB], tl.float32)
    p = tl.math.exp2(_dot(q, tl.trans(k), zero, DOT) * scale_log2 - lse[:, None])  # [queries, keys]
    if CAUSAL or not EVEN:
        p = tl.where(_visible(rm, rk, S, True, CAUSAL, EVEN), p, 0.0)
    ds = (p * (_dot(do, tl.trans(v), zero, DOT) - delta[:, None])).to(q.dtype)
    return _dot(ds, k, dq, DOT)


@triton.jit
def _attn_bwd(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, S, H, scale, scale_log2,
              D: tl.constexpr, BLK: tl.constexpr, SUB: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr):
    # one program, block index n of one (batch, head): dK and dV of key block n (over the query rows at and after
    # it, SUB at a time), then dQ of query block n (over the key rows up to it, SUB at a time). BLK % SUB == 0.
    # o, do [B, S, H, D] (o contiguous)
    n, bh = tl.program_id(0) % tl.cdiv(S, BLK), tl.program_id(0) // tl.cdiv(S, BLK)  # (1-D grid: as _attn_fwd)
    b, h = (bh // H).to(tl.int64), bh % H  # (int64: offsets past 2^31 elements in a large batch)
    qb, kb, vb = q_ptr + b * sqb + h * sqh, k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    ob, dob = o_ptr + (b * S * H + h) * D, do_ptr + b * sdb + h * sdh
    lb = lse_ptr + bh * S
    # the gradients' [B, S, H, D] contiguous outputs: row s of this head at (b * S + s) * H * D + h * D
    gb = (b * S * H + h) * D
    diag_lo, diag_hi = n * BLK, tl.minimum((n + 1) * BLK, S)

    # dK, dV of key block n: the query rows of its own block (causal mask), then all after it
    rn = n * BLK + tl.arange(0, BLK)
    k = _load_rotated(kb, rn, S, sks, cos_ptr, sin_ptr, D, EVEN)
    v = _load_rows(vb, rn, S, svs, D, EVEN)
    dk = tl.zeros([BLK, D], tl.float32)
    dv = tl.zeros([BLK, D], tl.float32)
    for start_m in range(diag_lo, diag_hi, SUB):
        dk, dv = _dkdv_block(dk, dv, k, v, rn, qb, ob, dob, lb, start_m, S, sqs, sds, H, cos_ptr, sin_ptr,
                             scale_log2, D, SUB, True, EVEN, DOT)
    for start_m in range(diag_hi, S, SUB):
        dk, dv = _dkdv_block(dk, dv, k, v, rn, qb, ob, dob, lb, start_m, S, sqs, sds, H, cos_ptr, sin_ptr,
                             scale_log2, D, SUB, False, EVEN, DOT)
    _store_unrotated(dk_ptr + gb, rn, S, H * D, dk * scale, cos_ptr, sin_ptr, D, EVEN)
    dv_off = gb + rn[:, None] * (H * D) + tl.arange(0, D)[None, :]
    if EVEN:
        tl.store(dv_ptr + dv_off, dv.to(dv_ptr.dtype.element_ty))
    else:
        tl.store(dv_ptr + dv_off, dv.to(dv_ptr.dtype.element_ty), mask=(rn < S)[:, None])

    # dQ of query block n: the key rows before its block (no mask), then those of its own block (causal mask)
    rm = n * BLK + tl.arange(0, BLK)
    q = _load_rotated(qb, rm, S, sqs, cos_ptr, sin_ptr, D, EVEN)
    do = _load_rows(dob, rm, S, sds, D, EVEN)
    delta = tl.sum(do.to(tl.float32) * _load_rows(ob, rm, S, H * D, D, EVEN).to(tl.float32), 1)
    if EVEN:
        lse = tl.load(lb + rm)
    else:
        lse = tl.load(lb + rm, mask=rm < S, other=0.0)
    dq = tl.zeros([BLK, D], tl.float32)
    for start_n in range(0, diag_lo, SUB):
        dq = _dq_block(dq, q, do, delta, lse, rm, kb, vb, start_n, S, sks, svs, cos_ptr, sin_ptr, scale_log2,
                       D, SUB, False, EVEN, DOT)
    for start_n in range(diag_lo, diag_hi, SUB):
        dq = _dq_block(dq, q, do, delta, lse, rm, kb, vb, start_n, S, sks, svs, cos_ptr, sin_ptr, scale_log2,
                       D, SUB, True, EVEN, DOT)
    _store_unrotated(dq_ptr + gb, rm, S, H * D, dq * scale, cos_ptr, sin_ptr, D, EVEN)


def _dot_mode(q: torch.Tensor) -> int:
    """_dot's DOT for q's dtype here: 2 on the CPU interpreter, 1 for fp32, 0 for bf16/fp16."""
    return 2 if os.environ.get("TRITON_INTERPRET") == "1" else int(q.dtype == torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"rope_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"three [batch, seq, heads, head_dim] tensors of one shape")
    d = q.shape[-1]
    if d < 32 or d & (d - 1) or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"rope_attention: head_dim {d} (strides {q.stride()}): expected a power of two >= 32 with "
                         f"unit stride")
    if cos.shape[0] < q.shape[1] or cos.shape[1:] != (d // 2,) or sin.shape != cos.shape:
        raise ValueError(f"rope_attention: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}: expected [>= {q.shape[1]}, "
                         f"{d // 2}]")


# launch settings (block rows, warps, pipeline stages) by head_dim; benchmarks/attention.py sweeps them
# (bwd: blk rows of keys for dK, dV and of queries for dQ per program, sub rows of the other side per step; sub
# divides blk)
# divides blk). ELAS_ATTN_CONFIG='{"fwd": {...}, "bwd": {...}}' overrides them for a process (benchmarks/attention.py
# prints the best it found in that form)
FWD_CONFIG = {"bm": 64, "bn": 64, "warps": 4, "stages": 2}
BWD_CONFIG = {"blk": 64, "sub": 64, "warps": 4, "stages": 1}
if os.environ.get("ELAS_ATTN_CONFIG"):
    _override = json.loads(os.environ["ELAS_ATTN_CONFIG"])
    FWD_CONFIG.update(_override.get("fwd", {}))
    BWD_CONFIG.update(_override.get("bwd", {}))


def rope_attention_forward(q, k, v, cos, sin, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> o [B, S, H, D] contiguous, lse [B * H, S] fp32 (log2 domain); see the module docstring."""
    _check(q, k, v, cos, sin)
    c = {**FWD_CONFIG, **(config or {})}
    bsz, s, h, d = q.shape
    o = torch.empty((bsz, s, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz * h, s), dtype=torch.float32, device=q.device)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    grid = (triton.cdiv(s, c["bm"]) * bsz * h,)
    _attn_fwd[grid](q, k, v, cos, sin, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                    k.stride(2), v.stride(0), v.stride(1), v.stride(2), s, h, LOG2E / math.sqrt(d),
                    D=d, BM=c["bm"], BN=c["bn"], EVEN=s % c["bm"] == 0 and s % c["bn"] == 0, DOT=_dot_mode(q),
                    num_warps=c["warps"], num_stages=c["stages"])
    return o, lse


def rope_attention_backward(do, q, k, v, o, lse, cos, sin, config: dict | None = None):
    """-> dq, dk, dv [B, S, H, D] contiguous (the gradients w.r.t. the unrotated q and k); o, lse from
    rope_attention_forward."""
    _check(q, k, v, cos, sin)
    if do.shape != q.shape or do.stride(-1) != 1 or not o.is_contiguous() or lse.shape != (q.shape[0] * q.shape[2],
                                                                                              q.shape[1]):
        raise ValueError(f"rope_attention_backward: do {tuple(do.shape)}, o {tuple(o.shape)}, lse {tuple(lse.shape)}"
                         f" do not match q {tuple(q.shape)}")
    c = {**BWD_CONFIG, **(config or {})}
    if c["blk"] % c["sub"]:
        raise ValueError(f"rope_attention_backward: launch setting {c}: sub must divide blk")
    bsz, s, h, d = q.shape
    dq, dk, dv = (torch.empty((bsz, s, h, d), dtype=q.dtype, device=q.device) for _ in range(3))
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    grid = (triton.cdiv(s, c["blk"]) * bsz * h,)
    _attn_bwd[grid](q, k, v, cos, sin, o, do, lse, dq, dk, dv, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                    k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1),
                    do.stride(2), s, h, 1.0 / math.sqrt(d), LOG2E / math.sqrt(d), D=d, BLK=c["blk"], SUB=c["sub"],
                    EVEN=s % c["blk"] == 0, DOT=_dot_mode(q), num_warps=c["warps"], num_stages=c["stages"])
    return dq, dk, dv


__all__ = ["BWD_CONFIG", "FWD_CONFIG", "rope_attention_backward", "rope_attention_forward"]
