"""Triton kernels: the FFN's two d_ff-wide GEMMs with their 2:4 pointwise work in the epilogue.

Both are C = A @ B^T with A [M, K], B [N, K] bf16 row-major and a small K (q: d_model, or the rank r of a
low-rank factor), N = d_ff. Each program computes a [BM, BN] tile of C in fp32 registers (`_tile_gemm`: tl.dot
over K, tiles in GROUP-row order for L2 reuse), rounds it to bf16 (nearest even, as a bf16 GEMM's output is
rounded) and does, in registers, what a separate kernel would do after a round trip of C through memory:

- up-projection (`up_relu2_sparsify24`): y1 = h1 wu^T, then 2:4(relu(y1)^2) packed in the SM90 layout, the mask
  bits, the positives per column (95/5 split) and y1 itself only if asked (`ste` mode needs it; `mask` mode's
  backward reads only the packed values). The selection and packing are the standalone sparsifier's own code
  (sparsify._pack_block): the same bytes on the same y1. Saves the sparsifier's read of y1 (and in `mask` mode
  its write).
- dy2 GEMM of the backward in `ste` mode (`dgrad_relu2_ste`): dy2 = dh2 wd^T, then from y1 (read once) the
  forward's 2:4 selection redone, y2s = 2:4(relu(y1)^2) and dy1 = 2 relu(y1) dy2, the values of the standalone
  backward kernel (sparsify._bwd_kernel, ste branch) on this dy2. Saves the write and the read of dy2.

Shapes: M % BM == 0, N % BN == 0, K % BK == 0; BM in {64, 128} (one or two 64-row bands of the layout), BN a
power of two >= 32 (whole 256-byte metadata tiles; tl.arange's sizes are powers of two), BK a power of two >= 16
(tl.dot's). The tile sizes are arguments so that `elas bench epilogue` can
sweep them; the defaults are a starting point, not yet tuned on a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..packed import Packed24, check_shape
from .sparsify import _NATIVE_ROUND, _columns4, _interleave4, _keep24, _pack_block, _round_bf16

DEFAULT_BM, DEFAULT_BN, DEFAULT_BK, DEFAULT_WARPS, DEFAULT_STAGES, GROUP_M = 128, 128, 64, 8, 3, 8


@triton.jit
def _tile_gemm(a_ptr, b_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
               UPCAST: tl.constexpr):
    """This program's tile of A @ B^T: (acc [BM, BN] fp32, rows rm [BM] int64, columns rn [BN] int64, pid_m,
    pid_n). Tile order: GROUP row-tiles share each column sweep (operand reuse in L2)."""
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
    a = a_ptr + rm[:, None] * K + rk[None, :]  # [BM, BK] of A
    b = b_ptr + rn[None, :] * K + rk[:, None]  # [BK, BN] of B^T (K contiguous)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        ta, tb = tl.load(a), tl.load(b)
        if UPCAST:  # the CPU interpreter's dot mishandles bf16 operands; bf16 x bf16 products are exact in fp32
            ta, tb = ta.to(tl.float32), tb.to(tl.float32)
        acc = tl.dot(ta, tb, acc)
        a += BK
        b += BK
    return acc, rm, rn, pid_m, pid_n


@triton.jit
def _up_kernel(a_ptr, b_ptr, y1_ptr, val_ptr, meta_ptr, bits_ptr, count_ptr, M, N, K,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
               WRITE_Y1: tl.constexpr, COUNT: tl.constexpr, UPCAST: tl.constexpr):
    acc, rm, rn, pid_m, pid_n = _tile_gemm(a_ptr, b_ptr, M, N, K, BM, BN, BK, GROUP, UPCAST)
    y1 = _round_bf16(acc)  # the bf16 y1 a GEMM would write, held exactly in fp32
    if WRITE_Y1:
        tl.store(y1_ptr + rm[:, None] * N + rn[None, :], y1.to(tl.bfloat16))
    if COUNT:  # positives per column (the 95/5 split's feature ranking), as the standalone kernel counts them
        tl.atomic_add(count_ptr + rn, tl.sum((y1 > 0).to(tl.int32), axis=0), sem="relaxed")
    x = tl.maximum(y1, 0.0)
    x = x * x  # y2 = relu(y1)^2, exact: the selection compares it, _pack_block rounds the kept values to bf16
    TILES: tl.constexpr = BN // 32
    if BM == 64:
        _pack_block(x, pid_m, pid_n, val_ptr, meta_ptr, bits_ptr, N, TILES, True)
    else:  # two 64-row bands: [128, BN] -> [64, BN] x 2
        top, bottom = tl.split(tl.permute(tl.reshape(x, (2, 64, BN)), (1, 2, 0)))
        _pack_block(top, 2 * pid_m, pid_n, val_ptr, meta_ptr, bits_ptr, N, TILES, True)
        _pack_block(bottom, 2 * pid_m + 1, pid_n, val_ptr, meta_ptr, bits_ptr, N, TILES, True)


@triton.jit
def _dgrad_ste_kernel(a_ptr, b_ptr, y1_ptr, y2s_ptr, dy1_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr):
    acc, rm, rn, pid_m, pid_n = _tile_gemm(a_ptr, b_ptr, M, N, K, BM, BN, BK, GROUP, UPCAST)
    dy2 = _round_bf16(acc)  # the bf16 dy2 the GEMM would write
    at = rm[:, None] * N + rn[None, :]
    y1 = tl.load(y1_ptr + at).to(tl.float32)
    r = tl.maximum(y1, 0.0)
    y2 = r * r  # exact, selected as the forward kernel selects it
    G: tl.constexpr = BN // 4
    x0, x1, x2, x3 = _columns4(y2, G)
    k0, k1, k2, k3 = _keep24(x0, x1, x2, x3)
    y2s = _interleave4(tl.where(k0, x0, 0.0), tl.where(k1, x1, 0.0), tl.where(k2, x2, 0.0), tl.where(k3, x3, 0.0), G)
    if not _NATIVE_ROUND:  # the interpreter's store conversion truncates
        y2s = _round_bf16(y2s)
    tl.store(y2s_ptr + at, y2s.to(tl.bfloat16))
    dy1 = tl.where(y1 > 0.0, _round_bf16(2.0 * y1 * dy2), 0.0)  # +0 where relu(y1) is 0, as the backward kernel
    tl.store(dy1_ptr + at, dy1.to(tl.bfloat16))


def _direct(kernel):
    return kernel


def _check(a: torch.Tensor, b: torch.Tensor, bm: int, bn: int, bk: int, what: str) -> tuple[int, int, int]:
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise ValueError(f"{what}: operands must be bf16, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: A [M, K] and B [N, K] must share K, got {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[0]
    check_shape(m, n)
    if bm not in (64, 128) or bn % 32 or bn & (bn - 1) or bk & (bk - 1) or bk < 16 or m % bm or n % bn or k % bk:
        raise ValueError(f"{what}: M={m}, N={n}, K={k} do not tile by BM={bm} (64 or 128), BN={bn} (a power of "
                         f"two >= 32), BK={bk} (a power of two >= 16)")
    return m, n, k


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def up_relu2_sparsify24(h1: torch.Tensor, wu: torch.Tensor, write_y1: bool = True,
                        feature_counts: torch.Tensor | None = None, bm: int = DEFAULT_BM, bn: int = DEFAULT_BN,
                        bk: int = DEFAULT_BK, num_warps: int = DEFAULT_WARPS, num_stages: int = DEFAULT_STAGES,
                        launch=_direct) -> tuple[torch.Tensor | None, Packed24]:
    """h1 [M, K], wu [N, K] bf16 -> (y1 [M, N] bf16 or None, Packed24 of 2:4(relu(y1)^2)). feature_counts: int32
    [N], incremented by the positives of each column of y1. launch: as in sparsify.relu2_sparsify24_packed."""
    m, n, k = _check(h1, wu, bm, bn, bk, "up_relu2_sparsify24")
    h1, wu = h1.contiguous(), wu.contiguous()
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
                             UPCAST=_interpreted(), num_warps=num_warps, num_stages=num_stages)
    return y1, Packed24(buf.view(m, n * 9 // 16), bits, (m, n))


def dgrad_relu2_ste(dh2: torch.Tensor, wd: torch.Tensor, y1: torch.Tensor, bm: int = DEFAULT_BM,
                    bn: int = DEFAULT_BN, bk: int = DEFAULT_BK, num_warps: int = DEFAULT_WARPS,
                    num_stages: int = DEFAULT_STAGES, launch=_direct) -> tuple[torch.Tensor, torch.Tensor]:
    """dh2 [M, K], wd [N, K], y1 [M, N] bf16 -> (y2s, dy1) [M, N] bf16 of the `ste` backward: dy2 = dh2 wd^T,
    y2s = 2:4(relu(y1)^2), dy1 = 2 relu(y1) dy2 (module docs)."""
    m, n, k = _check(dh2, wd, bm, bn, bk, "dgrad_relu2_ste")
    if y1.shape != (m, n) or y1.dtype != torch.bfloat16:
        raise ValueError(f"dgrad_relu2_ste: y1 must be bf16 [{m}, {n}], got {y1.dtype} {tuple(y1.shape)}")
    dh2, wd, y1 = dh2.contiguous(), wd.contiguous(), y1.contiguous()
    y2s = torch.empty(m, n, dtype=torch.bfloat16, device=dh2.device)
    dy1 = torch.empty_like(y2s)
    launch(_dgrad_ste_kernel)[((m // bm) * (n // bn),)](dh2, wd, y1, y2s, dy1, m, n, k, BM=bm, BN=bn, BK=bk,
                                                         GROUP=GROUP_M, UPCAST=_interpreted(), num_warps=num_warps,
                                                         num_stages=num_stages)
    return y2s, dy1
