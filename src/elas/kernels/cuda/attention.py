"""Triton kernels: causal attention with the rotary embedding applied inside, forward and backward.

Why: at the training shapes (sequence 256, head_dim 64-128) torch's fastest SDPA backend (cuDNN on Hopper) spends
much of its time outside its main kernels: the 1B low-rank step on an H100 runs 7.5 ms of attention per step, of
which 2.3 ms are the backward's two side passes (rowsum(dO * O), and dQ converted from an fp32 buffer), plus
2.5 ms of rotary kernels around it (benchmarks/results/h100/step_target_blocks.json). Here the rotation is done
on q and k as they are loaded (in training the forward also writes them rotated, and the backward loads those
plainly: launch setting save_rotated), rowsum(dO * O) is one small pass before the backward (launch setting
delta_pre; without it, each query block's is computed where it is needed), and
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

import math
import os

import torch
import triton
import triton.language as tl

from .overrides import env_config

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
def _load_rotated(ptr, rows, valid, stride_s, cos_ptr, sin_ptr, HALF: tl.constexpr, DONE: tl.constexpr):
    """Rows `rows` of one head [len(rows), 2 * HALF] of q or k, rotated by their positions' angles: the two halves,
    each [len(rows), HALF] in the input's dtype (rounded after the fp32 rotation, as apply_rope). DONE: ptr holds
    them rotated already (the forward's saved rotation, launch setting save_rotated): loaded as they are."""
    cols = tl.arange(0, HALF)
    off = rows[:, None] * stride_s + cols[None, :]
    x1 = tl.load(ptr + off, mask=valid[:, None], other=0.0)
    x2 = tl.load(ptr + off + HALF, mask=valid[:, None], other=0.0)
    if DONE:
        return x1, x2
    toff = rows[:, None] * HALF + cols[None, :]
    c = tl.load(cos_ptr + toff, mask=valid[:, None], other=0.0)
    s = tl.load(sin_ptr + toff, mask=valid[:, None], other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    return (x1f * c - x2f * s).to(x1.dtype), (x2f * c + x1f * s).to(x1.dtype)


@triton.jit
def _store_unrotated(ptr, rows, valid, stride_s, g1, g2, cos_ptr, sin_ptr, HALF: tl.constexpr):
    """The gradient w.r.t. the rotated halves (g1, g2 [len(rows), HALF] fp32) taken back through the rotation (its
    transpose) and stored as rows of [.., 2 * HALF] in ptr's dtype."""
    cols = tl.arange(0, HALF)
    toff = rows[:, None] * HALF + cols[None, :]
    c = tl.load(cos_ptr + toff, mask=valid[:, None], other=0.0)
    s = tl.load(sin_ptr + toff, mask=valid[:, None], other=0.0)
    off = rows[:, None] * stride_s + cols[None, :]
    tl.store(ptr + off, (g1 * c + g2 * s).to(ptr.dtype.element_ty), mask=valid[:, None])
    tl.store(ptr + off + HALF, (g2 * c - g1 * s).to(ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _store_halves(ptr, rows, valid, stride_s, x1, x2, HALF: tl.constexpr):
    """Rows `rows` of one head [.., 2 * HALF] from their two halves x1, x2 [len(rows), HALF] (ptr's dtype)."""
    off = rows[:, None] * stride_s + tl.arange(0, HALF)[None, :]
    tl.store(ptr + off, x1, mask=valid[:, None])
    tl.store(ptr + off + HALF, x2, mask=valid[:, None])


@triton.jit
def _key_block(kb, vb, rn, in_n, sks, svs, cos_ptr, sin_ptr, q1, q2, zero_s, scale_log2, HALF: tl.constexpr,
               DOT: tl.constexpr, DONE: tl.constexpr):
    """Key rows rn of one head: k's rotated halves and v [len(rn), 2 * HALF], and the scores of the query rows
    (rotated halves q1, q2) against them, unmasked, in the log2 domain [len(q rows), len(rn)] fp32. DONE: kb holds
    k rotated already (_load_rotated)."""
    k1, k2 = _load_rotated(kb, rn, in_n, sks, cos_ptr, sin_ptr, HALF, DONE)
    v = tl.load(vb + rn[:, None] * svs + tl.arange(0, 2 * HALF)[None, :], mask=in_n[:, None], other=0.0)
    s = _dot(q2, tl.trans(k2), _dot(q1, tl.trans(k1), zero_s, DOT), DOT) * scale_log2
    return k1, k2, v, s


@triton.jit
def _query_grad_rows(dob, ob, lb, db, rm, in_m, sds, sos, HALF: tl.constexpr, DELTA_PRE: tl.constexpr):
    """Query rows rm of one head in the backward: dO [len(rm), 2 * HALF], rowsum(dO * O) and lse [len(rm)] fp32.
    rowsum(dO * O) from _attn_delta's pass (db; DELTA_PRE) or computed here from O (no side pass)."""
    cols = tl.arange(0, 2 * HALF)
    do = tl.load(dob + rm[:, None] * sds + cols[None, :], mask=in_m[:, None], other=0.0)
    if DELTA_PRE:
        delta = tl.load(db + rm, mask=in_m, other=0.0)
    else:
        o = tl.load(ob + rm[:, None] * sos + cols[None, :], mask=in_m[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    return do, delta, tl.load(lb + rm, mask=in_m, other=0.0)


@triton.jit
def _attn_delta(o_ptr, do_ptr, delta_ptr, sdb, sds, sdh, S, H, D: tl.constexpr, BM: tl.constexpr):
    # rowsum(dO * O) of BM query rows of one (batch, head) into delta [B * H, S] fp32: the backward's optional
    # side pass (launch setting delta_pre), o [B, S, H, D] contiguous
    pid_m, bh = tl.program_id(0) % tl.cdiv(S, BM), tl.program_id(0) // tl.cdiv(S, BM)
    b, h = (bh // H).to(tl.int64), bh % H
    rm = pid_m * BM + tl.arange(0, BM)
    in_m = rm < S
    cols = tl.arange(0, D)
    do = tl.load(do_ptr + b * sdb + h * sdh + rm[:, None] * sds + cols[None, :], mask=in_m[:, None], other=0.0)
    o = tl.load(o_ptr + (b * S * H + h) * D + rm[:, None] * (H * D) + cols[None, :], mask=in_m[:, None], other=0.0)
    tl.store(delta_ptr + bh * S + rm, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=in_m)


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, o_ptr, lse_ptr, qr_ptr, kr_ptr,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, S, H, scale_log2,
              HALF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, SAVE_ROT: tl.constexpr):
    # one program: BM query rows of one (batch, head); online softmax over the key blocks up to the diagonal.
    # SAVE_ROT: also q and k of these rows rotated, into qr, kr [B, S, H, D] contiguous (for the backward)
    # a 1-D grid, the row blocks of one (batch, head) adjacent (they share its K and V through L2); grid axis 1
    # would cap batch x heads at 65,535
    pid_m, bh = tl.program_id(0) % tl.cdiv(S, BM), tl.program_id(0) // tl.cdiv(S, BM)
    b, h = (bh // H).to(tl.int64), bh % H  # (int64: offsets past 2^31 elements in a large batch)
    D: tl.constexpr = 2 * HALF
    rm = pid_m * BM + tl.arange(0, BM)
    in_m = rm < S
    q1, q2 = _load_rotated(q_ptr + b * sqb + h * sqh, rm, in_m, sqs, cos_ptr, sin_ptr, HALF, False)
    kb, vb = k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    if SAVE_ROT:  # q's rows rotated, and k's rows of this block (once per program: each row of k once in all; an
        # L2 hit, the loop reads them too), [B, S, H, D] contiguous. (Here, not after the loop: there it took more
        # registers, 138-179 against 130, benchmarks/attention_regs.py)
        gb = (b * S * H + h) * D
        _store_halves(qr_ptr + gb, rm, in_m, H * D, q1, q2, HALF)
        kr1, kr2 = _load_rotated(kb, rm, in_m, sks, cos_ptr, sin_ptr, HALF, False)
        _store_halves(kr_ptr + gb, rm, in_m, H * D, kr1, kr2, HALF)
    dcols = tl.arange(0, D)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    zero_s = tl.zeros([BM, BN], tl.float32)
    hi = tl.minimum((pid_m + 1) * BM, S)
    for start_n in range(0, hi, BN):
        rn = start_n + tl.arange(0, BN)
        in_n = rn < S
        _, _, v, s = _key_block(kb, vb, rn, in_n, sks, svs, cos_ptr, sin_ptr, q1, q2, zero_s, scale_log2, HALF,
                                DOT, False)  # s [BM, BN]
        s = tl.where((rm[:, None] >= rn[None, :]) & in_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT)
        m_i = m_new
    # o in [B, S, H, D] contiguous: the o projection reads it as [B * S, H * D] without a copy
    o_off = ((b * S + rm[:, None]) * H + h) * D + dcols[None, :]
    tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=in_m[:, None])
    tl.store(lse_ptr + bh * S + rm, m_i + tl.math.log2(l_i), mask=in_m)


@triton.jit
def _attn_bwd(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, S, H, scale, scale_log2,
              HALF: tl.constexpr, BLK: tl.constexpr, SUB: tl.constexpr, DELTA_PRE: tl.constexpr,
              PHASE: tl.constexpr, DOT: tl.constexpr, ROTATED: tl.constexpr):
    # one program, block index n of one (batch, head): dK and dV of key block n (over the query rows at and after
    # it, SUB at a time), then dQ of query block n (over the key rows up to it, SUB at a time); BLK % SUB == 0.
    # PHASE 0 does both, 1 only dK and dV, 2 only dQ (the launch setting split: two launches, each kernel with its
    # own registers). o, do [B, S, H, D] (o contiguous); delta [B * H, S] from _attn_delta where DELTA_PRE.
    # ROTATED: q and k are the forward's saved rotation (no rotation here: plain loads, no cos/sin reads)
    n, bh = tl.program_id(0) % tl.cdiv(S, BLK), tl.program_id(0) // tl.cdiv(S, BLK)  # (1-D grid: as _attn_fwd)
    b, h = (bh // H).to(tl.int64), bh % H  # (int64: offsets past 2^31 elements in a large batch)
    D: tl.constexpr = 2 * HALF
    dcols = tl.arange(0, D)
    qb, kb, vb = q_ptr + b * sqb + h * sqh, k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh
    ob, dob = o_ptr + (b * S * H + h) * D, do_ptr + b * sdb + h * sdh
    lb, db = lse_ptr + bh * S, delta_ptr + bh * S
    # the gradients' [B, S, H, D] contiguous outputs: row s of this head at (b * S + s) * H * D + h * D
    gb = (b * S * H + h) * D
    zero_s = tl.zeros([BLK, SUB], tl.float32)

    if PHASE != 2:  # dK, dV of key block n
        rn = n * BLK + tl.arange(0, BLK)
        in_n = rn < S
        k1, k2 = _load_rotated(kb, rn, in_n, sks, cos_ptr, sin_ptr, HALF, ROTATED)
        v = tl.load(vb + rn[:, None] * svs + dcols[None, :], mask=in_n[:, None], other=0.0)
        dk1 = tl.zeros([BLK, HALF], tl.float32)
        dk2 = tl.zeros([BLK, HALF], tl.float32)
        dv = tl.zeros([BLK, D], tl.float32)
        for start_m in range(n * BLK, S, SUB):
            rm = start_m + tl.arange(0, SUB)
            in_m = rm < S
            q1, q2 = _load_rotated(qb, rm, in_m, sqs, cos_ptr, sin_ptr, HALF, ROTATED)
            do, delta, lse = _query_grad_rows(dob, ob, lb, db, rm, in_m, sds, H * D, HALF, DELTA_PRE)  # delta [SUB]
            st = _dot(k2, tl.trans(q2), _dot(k1, tl.trans(q1), zero_s, DOT), DOT) * scale_log2  # [keys, queries]
            pt = tl.where((rm[None, :] >= rn[:, None]) & in_m[None, :], tl.math.exp2(st - lse[None, :]), 0.0)
            dv = _dot(pt.to(do.dtype), do, dv, DOT)
            dpt = _dot(v, tl.trans(do), zero_s, DOT)  # [keys, queries]
            dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
            dk1 = _dot(dst, q1, dk1, DOT)
            dk2 = _dot(dst, q2, dk2, DOT)
        _store_unrotated(dk_ptr + gb, rn, in_n, H * D, dk1 * scale, dk2 * scale, cos_ptr, sin_ptr, HALF)
        tl.store(dv_ptr + gb + rn[:, None] * (H * D) + dcols[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=in_n[:, None])

    if PHASE != 1:  # dQ of query block n
        rm = n * BLK + tl.arange(0, BLK)
        in_m = rm < S
        q1, q2 = _load_rotated(qb, rm, in_m, sqs, cos_ptr, sin_ptr, HALF, ROTATED)
        do, delta, lse = _query_grad_rows(dob, ob, lb, db, rm, in_m, sds, H * D, HALF, DELTA_PRE)
        dq1 = tl.zeros([BLK, HALF], tl.float32)
        dq2 = tl.zeros([BLK, HALF], tl.float32)
        hi = tl.minimum((n + 1) * BLK, S)
        for start_n in range(0, hi, SUB):
            rk = start_n + tl.arange(0, SUB)
            in_k = rk < S
            # (kr1, kr2, vr: not k1, k2, v, which hold BLK rows in the dK, dV phase: one name, one shape per kernel)
            kr1, kr2, vr, s = _key_block(kb, vb, rk, in_k, sks, svs, cos_ptr, sin_ptr, q1, q2, zero_s, scale_log2,
                                         HALF, DOT, ROTATED)  # s [queries, keys]
            p = tl.where((rm[:, None] >= rk[None, :]) & in_k[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(vr), zero_s, DOT)
            ds = (p * (dp - delta[:, None])).to(q1.dtype)
            dq1 = _dot(ds, kr1, dq1, DOT)
            dq2 = _dot(ds, kr2, dq2, DOT)
        _store_unrotated(dq_ptr + gb, rm, in_m, H * D, dq1 * scale, dq2 * scale, cos_ptr, sin_ptr, HALF)


def _regs(c: dict) -> dict:
    """The launch option capping registers a thread (launch setting maxnreg; absent or None: the compiler's choice):
    fewer registers, more blocks an SM (65,536 registers an SM: 4 warps at 168 fit 3 blocks, at 96 fit 5)."""
    return {"maxnreg": c["maxnreg"]} if c.get("maxnreg") else {}


def _dot_mode(q: torch.Tensor) -> int:
    """_dot's DOT for q's dtype here: 2 on the CPU interpreter, 1 for fp32, 0 for bf16/fp16."""
    return 2 if os.environ.get("TRITON_INTERPRET") == "1" else int(q.dtype == torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"rope_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"three [batch, seq, heads, head_dim] tensors of one shape")
    if k.dtype != q.dtype or v.dtype != q.dtype:  # (P is cast to v's dtype: mixed, the result drifts silently)
        raise ValueError(f"rope_attention: q {q.dtype}, k {k.dtype}, v {v.dtype}: expected one dtype")
    d = q.shape[-1]
    if d < 32 or d & (d - 1) or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"rope_attention: head_dim {d} (strides {q.stride()}): expected a power of two >= 32 with "
                         f"unit stride")
    if cos.shape[0] < q.shape[1] or cos.shape[1:] != (d // 2,) or sin.shape != cos.shape:
        raise ValueError(f"rope_attention: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}: expected [>= {q.shape[1]}, "
                         f"{d // 2}]")


# launch settings (block rows, warps, pipeline stages); benchmarks/attention.py sweeps them (the best at the 1B
# model's 32 heads x 64 on an H100, 2026-12-06: benchmarks/results/h100/attention_saved.json; every preset from 60M
# to 1B has head_dim 64). ELAS_ATTN_CONFIG='{"fwd": {...}, "bwd": {...}}' overrides them for a process (the sweep
# prints its best so)
FWD_CONFIG = {"bm": 64, "bn": 64, "warps": 4, "stages": 2}
# the forward that also writes q and k rotated (save_rotated): a register cap (maxnreg) where the sweep chose one, by
# (head_dim, dtype, bm, bn, warps), the launch it was measured at. At head_dim 64 in bf16 with 64 x 64 tiles and 4
# warps its two more stores take it from 128 registers to 130, a block an SM fewer (4 -> 3); capped at 128 it uses
# 118, no spills (benchmarks/attention_regs.py). At 32 it needs no cap (112), and at 128, in fp32 or with 128-row
# tiles a cap spills with no block gained. A config that names maxnreg (ELAS_ATTN_CONFIG's, a sweep's) decides.
FWD_SAVED_MAXNREG = {(64, torch.bfloat16, 64, 64, 4): 128}
# backward: blk rows per program; sub: the other side's rows per step of its loops (blk where not given); delta_pre:
# rowsum(dO * O) in a pass of its own first; split: dK, dV and dQ as two launches; save_rotated: the forward writes
# q and k rotated (two more [B, S, H, D] outputs, saved in place of q and k: no more memory held) and the backward
# loads them as they are, where it rotated q and k on every load (Nsight Compute, 2026-12-06: a third of the
# backward's stalls waited on those loads, h100/attention_ncu.json). Both: maxnreg (optional), a cap on registers a
# thread (_regs). The default since 2026-12-06 (fifteenth session): the sweep's best, 0.214 ms against 0.253 for the
# rotating backward at 64 rows (0.239 with the saved forward's 0.025 ms more charged), 168 registers (3 blocks an
# SM); the 1B step 0.7% faster, two pairs of processes (h100/attention_step_ab.json). (An override that names only
# some settings takes the rest from these: the rotating backward of before is {"sub": 64, "stages": 1, "delta_pre":
# false, "save_rotated": false}.)
BWD_CONFIG = {"blk": 64, "sub": 32, "warps": 4, "stages": 2, "delta_pre": True, "split": False, "save_rotated": True}
_KEYS = {"fwd": ("bm", "bn", "warps", "stages", "maxnreg"),
         "bwd": ("blk", "sub", "warps", "stages", "delta_pre", "split", "save_rotated", "maxnreg")}


def launch_settings(kind: str, config: dict | None = None, base: dict | None = None) -> dict:
    """kind's ("fwd" or "bwd") launch settings: config over base (default: FWD_CONFIG / BWD_CONFIG), checked; a
    config that sets blk without sub steps by blk (sub inherited from base belongs to base's blk)."""
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"attention {kind} launch settings {config!r}: expected an object of settings")
    given = dict(config or {})
    bad = sorted(set(given) - set(_KEYS[kind]))
    if bad:
        raise ValueError(f"attention {kind} launch setting {bad[0]!r}: expected one of {', '.join(_KEYS[kind])}")
    c = {**(base if base is not None else FWD_CONFIG if kind == "fwd" else BWD_CONFIG), **given}
    if kind == "bwd" and ("blk" in given and "sub" not in given or not c.get("sub")):
        c["sub"] = c["blk"]
    pow2 = lambda x: isinstance(x, int) and x >= 16 and not x & (x - 1)  # noqa: E731 (tl.dot: every side >= 16)
    rows = ("bm", "bn") if kind == "fwd" else ("blk", "sub")
    if not all(pow2(c[r]) for r in rows) or (kind == "bwd" and c["sub"] > c["blk"]):
        raise ValueError(f"attention {kind} launch settings {c}: {' and '.join(rows)} must be powers of two >= 16"
                         + (", sub <= blk" if kind == "bwd" else ""))
    if any(not isinstance(c.get(f, False), bool) for f in ("delta_pre", "split", "save_rotated")):
        raise ValueError(f"attention {kind} launch settings {c}: delta_pre, split and save_rotated are true or false")
    is_int = lambda x: type(x) is int  # noqa: E731 (not bool, not float)
    if (not is_int(c["warps"]) or c["warps"] not in (1, 2, 4, 8, 16) or not is_int(c["stages"]) or c["stages"] < 1
            or c.get("maxnreg") not in (None, *range(24, 256)) or isinstance(c.get("maxnreg"), (bool, float))):
        raise ValueError(f"attention {kind} launch settings {c}: warps 1-16 (a power of two), stages >= 1, maxnreg "
                         f"24-255 or absent")
    return c


_override = env_config("ELAS_ATTN_CONFIG", ("fwd", "bwd"))  # (a bad key fails at import, not at the first launch)
if _override:
    try:
        FWD_CONFIG = launch_settings("fwd", _override.get("fwd"))
        BWD_CONFIG = launch_settings("bwd", _override.get("bwd"))
    except ValueError as e:
        raise ValueError(f"ELAS_ATTN_CONFIG={os.environ['ELAS_ATTN_CONFIG']!r}: {e}") from None


def forward_settings(config: dict | None, head_dim: int, dtype: torch.dtype, save_rotated: bool) -> dict:
    """The forward's launch settings (launch_settings), with FWD_SAVED_MAXNREG's cap for the form that saves the
    rotation where the settings name no maxnreg."""
    c = launch_settings("fwd", config)
    cap = FWD_SAVED_MAXNREG.get((head_dim, dtype, c["bm"], c["bn"], c["warps"]))
    if save_rotated and "maxnreg" not in c and cap:
        c["maxnreg"] = cap
    return c


def rope_attention_forward(q, k, v, cos, sin, config: dict | None = None, save_rotated: bool = False
                           ) -> tuple[torch.Tensor, ...]:
    """-> o [B, S, H, D] contiguous, lse [B * H, S] fp32 (log2 domain); see the module docstring. save_rotated:
    also q and k rotated, [B, S, H, D] contiguous in q's dtype (what the backward reads with rotated=True)."""
    _check(q, k, v, cos, sin)
    bsz, s, h, d = q.shape
    c = forward_settings(config, d, q.dtype, save_rotated)
    o = torch.empty((bsz, s, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz * h, s), dtype=torch.float32, device=q.device)
    qr, kr = (torch.empty_like(o), torch.empty_like(o)) if save_rotated else (o, o)  # (o: not written unless saved)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    grid = (triton.cdiv(s, c["bm"]) * bsz * h,)
    _attn_fwd[grid](q, k, v, cos, sin, o, lse, qr, kr, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                    k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), s, h, LOG2E / math.sqrt(d),
                    HALF=d // 2, BM=c["bm"], BN=c["bn"], DOT=_dot_mode(q), SAVE_ROT=save_rotated,
                    num_warps=c["warps"], num_stages=c["stages"], **_regs(c))
    return (o, lse, qr, kr) if save_rotated else (o, lse)


def rope_attention_backward(do, q, k, v, o, lse, cos, sin, config: dict | None = None, rotated: bool = False):
    """-> dq, dk, dv [B, S, H, D] contiguous (the gradients w.r.t. the unrotated q and k); o, lse from
    rope_attention_forward. rotated: q and k are rope_attention_forward's saved rotation (save_rotated; the
    argument decides, not config's save_rotated: ops.py passes what the forward saved)."""
    _check(q, k, v, cos, sin)
    if do.shape != q.shape or do.stride(-1) != 1 or not o.is_contiguous() or lse.shape != (q.shape[0] * q.shape[2],
                                                                                              q.shape[1]):
        raise ValueError(f"rope_attention_backward: do {tuple(do.shape)}, o {tuple(o.shape)}, lse {tuple(lse.shape)}"
                         f" do not match q {tuple(q.shape)}")
    c = launch_settings("bwd", config)
    bsz, s, h, d = q.shape
    dq, dk, dv = (torch.empty((bsz, s, h, d), dtype=q.dtype, device=q.device) for _ in range(3))
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    delta = lse  # (not read unless delta_pre)
    if c.get("delta_pre"):
        delta = torch.empty_like(lse)
        _attn_delta[(triton.cdiv(s, 64) * bsz * h,)](o, do, delta, do.stride(0), do.stride(1), do.stride(2), s, h,
                                                      D=d, BM=64, num_warps=4)
    grid = (triton.cdiv(s, c["blk"]) * bsz * h,)
    for phase in ((1, 2) if c.get("split") else (0,)):
        _attn_bwd[grid](q, k, v, cos, sin, o, do, lse, delta, dq, dk, dv, q.stride(0), q.stride(1), q.stride(2),
                        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), do.stride(0),
                        do.stride(1), do.stride(2), s, h, 1.0 / math.sqrt(d), LOG2E / math.sqrt(d), HALF=d // 2,
                        BLK=c["blk"], SUB=c["sub"], DELTA_PRE=bool(c.get("delta_pre")), PHASE=phase, DOT=_dot_mode(q),
                        ROTATED=rotated, num_warps=c["warps"], num_stages=c["stages"], **_regs(c))
    return dq, dk, dv


__all__ = ["BWD_CONFIG", "FWD_CONFIG", "FWD_SAVED_MAXNREG", "forward_settings", "launch_settings", "rope_attention_backward", "rope_attention_forward"]
