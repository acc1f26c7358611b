"""Triton kernels: the dense ReLU^2 FFN's two d_ff-wide GEMMs with its pointwise work in their epilogues.

Both compute C = epilogue(A @ B^T), A [M, K] and B [N, K] bf16 row-major (K contiguous: the FFN's small side, q =
d_model or the rank r of a low-rank factor), C [M, N] bf16 with N = d_ff:

- forward (`linear_relu2`):    y2 = relu(y1)^2 with y1 = h1 wu^T, A = h1 [T, q], B = wu [d_ff, q]. y1 is never
  written: y2 is all the backward needs (below), so the FFN saves one [T, d_ff] tensor instead of two, and the
  separate ReLU^2 kernel's read of y1 and writes of relu(y1) and y2 are gone.
- backward (`relu2_grad_gemm`): dy1 = 2 relu(y1) dy2 with dy2 = dh2 wd^T, A = dh2 [T, q'], B = wd [d_ff, q'],
  relu(y1) rebuilt as sqrt(y2) (read once). dy2 is never written.

Numerics are those of the unfused ops on the same GEMM output: the accumulator is rounded to bf16 (what a bf16
GEMM writes), y2 = bf16(r * r) with r = relu(y1) (r * r is exact in fp32), dy1 = bf16(2 r dy2). For every bf16
r whose square is a normal bf16, bf16(sqrt(bf16(r^2))) == r (checked exhaustively: tests/test_relu2_gemm.py), so
the backward's rebuilt r is bit-identical to the saved relu(y1) except where y2 is subnormal (r < 1.1e-19).
Only the GEMM's summation order differs from cuBLAS (a bf16 tolerance).

Each program is persistent: it walks tiles pid, pid + P, ... (GROUP row-tiles share a column sweep, for L2 reuse
of B) and loads A and B tiles through tensor descriptors (TMA on Hopper); B may also be given as a transposed view
of a row-major [K, N] matrix (a full-rank FFN's W_down^T), read as it lies. C (and y2) go through descriptors
where d_ff % 8 == 0 (an asynchronous store), otherwise through masked pointer accesses, so d_ff need not be a
multiple of 8 (TMA needs 16-byte row strides; 5461 is not). Shapes: K % 8 == 0 (A and B rows 16-byte
aligned), any M and N.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .sparsify import _round_bf16

# (BM, BN, BK, warps, stages): a starting point; `elas bench relu2gemm` sweeps CONFIGS on the GPU
DEFAULT = (128, 128, 64, 8, 3)
CONFIGS = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4),
           (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 128, 8, 2), (128, 128, 128, 8, 3))
GROUP_M = 8
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _relu2_gemm_kernel(a_desc, b_desc, c_ptr, y2_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP: tl.constexpr, PROGS: tl.constexpr, GRAD: tl.constexpr,
                       B_KN: tl.constexpr, C_TMA: tl.constexpr, UPCAST: tl.constexpr):
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP * n_n
    for tile in range(tl.program_id(0), n_m * n_n, PROGS):
        first_m = (tile // per_group) * GROUP
        size_m = tl.minimum(n_m - first_m, GROUP)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = (tile % per_group) // size_m
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = a_desc.load([pid_m * BM, k])  # [BM, BK]; rows past M read as zeros
            if B_KN:  # B given as its transpose [K, N], row-major (a transposed weight view: no copy)
                b = b_desc.load([k, pid_n * BN])  # [BK, BN]
            else:
                b = b_desc.load([pid_n * BN, k]).T  # [BN, BK] -> [BK, BN]
            if UPCAST:  # the CPU interpreter's dot mishandles bf16 operands; bf16 products are exact in fp32
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        y = _round_bf16(acc)  # what a bf16 GEMM writes: y1 (forward) or dy2 (backward)
        if C_TMA:  # C and y2 as tensor descriptors: the store is asynchronous (overlaps the next tile's loads)
            y2 = y
            if GRAD:
                y2 = y2_ptr.load([pid_m * BM, pid_n * BN]).to(tl.float32)
            c_ptr.store([pid_m * BM, pid_n * BN], _epilogue(y, y2, GRAD).to(tl.bfloat16))
        else:
            rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
            rn = pid_n * BN + tl.arange(0, BN)
            inside = (rm[:, None] < M) & (rn[None, :] < N)
            off = rm[:, None] * N + rn[None, :]
            y2 = y
            if GRAD:
                y2 = tl.load(y2_ptr + off, mask=inside, other=0.0).to(tl.float32)
            tl.store(c_ptr + off, _epilogue(y, y2, GRAD).to(tl.bfloat16), mask=inside)


@triton.jit
def _epilogue(y, y2, GRAD: tl.constexpr):
    """Forward: y2 = bf16(r * r), r = relu(y) (y = y1). Backward: dy1 = bf16(2 r y), r = bf16(sqrt(y2)) (y = dy2).
    fp32 values that are exactly representable in bf16."""
    if GRAD:
        out = _round_bf16(2.0 * _round_bf16(tl.sqrt(y2)) * y)
    else:
        r = tl.maximum(y, 0.0)
        out = _round_bf16(r * r)
    return out


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """t [R, C] as a tensor descriptor reads it: strides (C, 1) from a 16-byte aligned address, or a copy that is.
    A contiguous view need not be either: one at a storage offset (x.view(-1)[1:].view(R, C)) starts anywhere,
    and torch calls a [1, C] tensor contiguous whatever its row stride (x[:, :1].t())."""
    if t.stride() == (t.shape[1], 1) and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # (a fresh allocation: aligned)


def _launch(a: torch.Tensor, b: torch.Tensor, y2: torch.Tensor | None, config=None, c_tma: bool | None = None
            ) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or b.shape[1] != k:
        raise ValueError(f"relu2 GEMM: expected bf16 A [M, K] and B [N, K], got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    if k % 8:
        raise ValueError(f"relu2 GEMM: K = {k} must be a multiple of 8 (16-byte rows for the tensor descriptors)")
    bm, bn, bk, warps, stages = config or DEFAULT
    # B [N, K] row-major, or B^T [K, N] row-major where that is how it lies (W_down^T of a full-rank FFN) and its
    # rows are 16-byte aligned; otherwise one copy to [N, K]
    b_kn = not b.is_contiguous() and b.t().is_contiguous() and n % 8 == 0 and b.data_ptr() % 16 == 0
    a, b = _row_major(a), (b if b_kn else _row_major(b))
    y2 = None if y2 is None else _row_major(y2)
    out = torch.empty((m, n), device=a.device, dtype=torch.bfloat16)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    progs = tiles if a.device.type != "cuda" else min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count)
    progs = min(progs, 4) if _INTERPRET else progs  # the interpreter runs programs one after another
    # C (and y2) through descriptors where their rows are 16-byte aligned (N % 8 == 0), else masked pointers
    c_tma = (n % 8 == 0) if c_tma is None else (c_tma and n % 8 == 0)
    c_arg = TensorDescriptor.from_tensor(out, [bm, bn]) if c_tma else out
    y2_arg = c_arg if y2 is None else (TensorDescriptor.from_tensor(y2, [bm, bn]) if c_tma else y2)
    _relu2_gemm_kernel[(progs,)](
        TensorDescriptor.from_tensor(a, [bm, bk]),
        TensorDescriptor.from_tensor(b.t(), [bk, bn]) if b_kn else TensorDescriptor.from_tensor(b, [bn, bk]), c_arg,
        y2_arg, m, n, k, BM=bm, BN=bn, BK=bk, GROUP=GROUP_M, PROGS=progs, GRAD=y2 is not None, B_KN=b_kn,
        C_TMA=c_tma, UPCAST=_INTERPRET, num_warps=warps, num_stages=stages)
    return out


def linear_relu2(h1: torch.Tensor, wu: torch.Tensor, config=None, c_tma: bool | None = None) -> torch.Tensor:
    """h1 [T, q], wu [d_ff, q] bf16 -> y2 = relu(h1 wu^T)^2 [T, d_ff] bf16 (y1 never written). c_tma: C through a
    tensor descriptor (default: where d_ff % 8 == 0)."""
    return _launch(h1, wu, None, config, c_tma)


def relu2_grad_gemm(dh2: torch.Tensor, wd: torch.Tensor, y2: torch.Tensor, config=None, c_tma: bool | None = None
                    ) -> torch.Tensor:
    """dh2 [T, q'], wd [d_ff, q'], y2 [T, d_ff] bf16 -> dy1 = 2 sqrt(y2) (dh2 wd^T) [T, d_ff] bf16."""
    if y2.shape != (dh2.shape[0], wd.shape[0]) or y2.dtype != torch.bfloat16:
        raise ValueError(f"relu2 GEMM: y2 is {y2.dtype} {tuple(y2.shape)}, expected bf16 "
                         f"{(dh2.shape[0], wd.shape[0])}")
    return _launch(dh2, wd, y2, config, c_tma)


@triton.jit
def _relu2_grad_kernel(dy2_ptr, y2_ptr, out_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = off < n
    dy2 = tl.load(dy2_ptr + off, mask=inside, other=0.0).to(tl.float32)
    y2 = tl.load(y2_ptr + off, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, _epilogue(dy2, y2, True).to(tl.bfloat16), mask=inside)


def relu2_grad(dy2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """dy1 = 2 bf16(sqrt(y2)) dy2, elementwise on bf16 [T, d_ff] tensors (the backward's pointwise work where its
    GEMM is not ours: relu2_grad_gemm's epilogue as one pass, 6 bytes an element)."""
    if dy2.shape != y2.shape or dy2.dtype != torch.bfloat16 or y2.dtype != torch.bfloat16:
        raise ValueError(f"relu2_grad: dy2 {dy2.dtype} {tuple(dy2.shape)} and y2 {y2.dtype} {tuple(y2.shape)}: "
                         f"expected two bf16 tensors of one shape")
    dy2, y2 = dy2.contiguous(), y2.contiguous()
    out = torch.empty_like(dy2)
    block = 4096
    _relu2_grad_kernel[(triton.cdiv(dy2.numel(), block),)](dy2, y2, out, dy2.numel(), BLOCK=block, num_warps=8)
    return out


__all__ = ["linear_relu2", "relu2_grad_gemm", "relu2_grad", "CONFIGS", "DEFAULT"]
