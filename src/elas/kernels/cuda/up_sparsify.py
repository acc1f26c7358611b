"""Triton kernel: the FFN's up-projection GEMM with the 2:4 sparsifier in its epilogue.

    y1 = h1 @ wu^T                       h1 [M, K] bf16 row-major, wu [N, K] bf16 row-major (K = q: d_model or a rank)
    2:4(relu(y1)^2) packed in the SM90 layout, mask bits, (positives per column), and y1 itself if asked

in one kernel: each program computes a [BM, BN] tile of y1 in fp32 registers (tl.dot over K), rounds it to bf16
(nearest even, as a bf16 GEMM's output is rounded), and hands the tile to the sparsifier's own selection and
packing code (sparsify._pack_block, so the bytes are those of the standalone kernel on this y1). What that saves
against cuBLAS + the standalone sparsifier: the sparsifier's read of y1 ([M, N] bf16) and, in `mask` mode, whose
backward needs only the packed values, the write of y1 as well; and one launch.

Shapes: M % BM == 0, N % BN == 0, K % BK == 0; BM in {64, 128} (one or two 64-row bands of the layout), BN a
multiple of 32 (whole 256-byte metadata tiles). Outputs as sparsify.relu2_sparsify24_packed. The tile sizes are
arguments so that `elas bench up` can sweep them; the defaults are a starting point, not yet tuned on a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..packed import Packed24, check_shape
from .sparsify import _pack_block, _round_bf16

DEFAULT_BM, DEFAULT_BN, DEFAULT_BK, DEFAULT_WARPS, DEFAULT_STAGES, GROUP_M = 128, 128, 64, 8, 3, 8


@triton.jit
def _up_kernel(a_ptr, b_ptr, y1_ptr, val_ptr, meta_ptr, bits_ptr, count_ptr, M, N, K,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
               WRITE_Y1: tl.constexpr, COUNT: tl.constexpr, UPCAST: tl.constexpr):
    # tile order: GROUP row-tiles share each column sweep (operand reuse in L2)
    pid = tl.program_id(0)
    n_m, n_n = M // BM, N // BN
    per_group = GROUP * n_n
    first_m = (pid // per_group) * GROUP
    size_m = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None] * K + rk[None, :]  # [BM, BK] of h1
    b = b_ptr + rn[None, :] * K + rk[:, None]  # [BK, BN] of wu^T (K contiguous)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        ta, tb = tl.load(a), tl.load(b)
        if UPCAST:  # the CPU interpreter's dot mishandles bf16 operands; bf16 x bf16 products are exact in fp32
            ta, tb = ta.to(tl.float32), tb.to(tl.float32)
        acc = tl.dot(ta, tb, acc)
        a += BK
        b += BK
    y1 = _round_bf16(acc)  # the bf16 y1 a GEMM would write, held exactly in fp32
    if WRITE_Y1:
        tl.store(y1_ptr + rm[:, None] * N + rn[None, :], y1.to(tl.bfloat16))
    if COUNT:  # positives per column (the 95/5 split's feature ranking), as the standalone kernel counts them
        tl.atomic_add(count_ptr + rn, tl.sum((y1 > 0).to(tl.int32), axis=0), sem="relaxed")
    x = tl.maximum(y1, 0.0)
    x = _round_bf16(x * x)  # y2 = relu(y1)^2 in bf16, the values the selection compares and stores
    TILES: tl.constexpr = BN // 32
    if BM == 64:
        _pack_block(x, pid_m, pid_n, val_ptr, meta_ptr, bits_ptr, N, TILES, True)
    else:  # two 64-row bands: [128, BN] -> [64, BN] x 2
        top, bottom = tl.split(tl.permute(tl.reshape(x, (2, 64, BN)), (1, 2, 0)))
        _pack_block(top, 2 * pid_m, pid_n, val_ptr, meta_ptr, bits_ptr, N, TILES, True)
        _pack_block(bottom, 2 * pid_m + 1, pid_n, val_ptr, meta_ptr, bits_ptr, N, TILES, True)


def _direct(kernel):
    return kernel


def up_relu2_sparsify24(h1: torch.Tensor, wu: torch.Tensor, write_y1: bool = True,
                        feature_counts: torch.Tensor | None = None, bm: int = DEFAULT_BM, bn: int = DEFAULT_BN,
                        bk: int = DEFAULT_BK, num_warps: int = DEFAULT_WARPS, num_stages: int = DEFAULT_STAGES,
                        launch=_direct) -> tuple[torch.Tensor | None, Packed24]:
    """h1 [M, K], wu [N, K] bf16 -> (y1 [M, N] bf16 or None, Packed24 of 2:4(relu(y1)^2)). feature_counts: int32
    [N], incremented by the positives of each column of y1. launch: as in sparsify.relu2_sparsify24_packed."""
    if h1.dtype != torch.bfloat16 or wu.dtype != torch.bfloat16:
        raise ValueError(f"h1 and wu must be bf16, got {h1.dtype} and {wu.dtype}")
    if h1.dim() != 2 or wu.dim() != 2 or h1.shape[1] != wu.shape[1]:
        raise ValueError(f"h1 [M, K] and wu [N, K] must share K, got {tuple(h1.shape)} and {tuple(wu.shape)}")
    h1, wu = h1.contiguous(), wu.contiguous()
    (m, k), n = h1.shape, wu.shape[0]
    check_shape(m, n)
    if bm not in (64, 128) or bn % 32 or m % bm or n % bn or k % bk:
        raise ValueError(f"up_relu2_sparsify24: M={m}, N={n}, K={k} do not tile by BM={bm} (64 or 128), "
                         f"BN={bn} (a multiple of 32), BK={bk}")
    buf = torch.empty(m * n * 9 // 16, dtype=torch.bfloat16, device=h1.device)
    vals, meta = buf[: m * n // 2], buf[m * n // 2:].view(torch.uint8)
    bits = torch.empty(m, n // 8, dtype=torch.uint8, device=h1.device)
    y1 = torch.empty(m, n, dtype=torch.bfloat16, device=h1.device) if write_y1 else None
    count = feature_counts is not None
    if count and (feature_counts.dtype != torch.int32 or feature_counts.shape != (n,)):
        raise ValueError(f"feature_counts must be int32 [{n}], got {feature_counts.dtype} "
                         f"{tuple(feature_counts.shape)}")
    grid = ((m // bm) * (n // bn),)
    launch(_up_kernel)[grid](h1, wu, y1 if write_y1 else bits, vals, meta, bits, feature_counts if count else bits,
                             m, n, k, BM=bm, BN=bn, BK=bk, GROUP=GROUP_M, WRITE_Y1=write_y1, COUNT=count,
                             UPCAST=os.environ.get("TRITON_INTERPRET") == "1", num_warps=num_warps,
                             num_stages=num_stages)
    return y1, Packed24(buf.view(m, n * 9 // 16), bits, (m, n))
