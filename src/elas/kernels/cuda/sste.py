"""Triton kernel: a weight -> beta * S_soft(weight), 2:4, packed in the SM90 cuSPARSELt layout, in one pass.

S-STE (sparsity/sste.py) multiplies by S(W) = beta * S_soft(W): in each group of 4 consecutive weights along the
reduction dimension the 2 largest |w| are kept (earlier column on ties: reference.mask24) and shrunk by t, the
2nd-smallest |w| of the group; the others are 0. The weights change at every optimizer step, so the forward
packs S(W) each step (and the input-gradient GEMM packs S(W^T), thresholded along the other dimension: the
paper's separate transposed threshold). Weights are small next to activations: one read of the fp32 master,
one write of the packed bf16 buffer.

Input  w:       [R, C] fp32 (or bf16), read through strides, so `transpose=True` packs W^T [C, R] of a
                row-major W [R, C] without a copy. The packed matrix must have rows % 64 == 0, cols % 64 == 0.
       beta:    [] fp32 on the device (read by the kernel: no host sync, CUDA-graph safe).
Output buffer:  [rows, cols*9/16] bf16 (values then metadata, kernels/packed.py), mask_bits [rows, cols/8] u8.
Bit-identical to reference.soft_threshold24_packed (compared on values in the interpreter and on the GPU).
`soft_threshold24_dense` writes the same S(W) unpacked ([R, C] in w's dtype): the dense operand of the products
where a 2:4 activation is the sparse side (relu2-w24-a24), in one pass where the torch formula took ~1.9 ms per
1B FFN weight (H200, CUDA-graph replay).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packed import Packed24, check_shape
from .sparsify import DEFAULT_TILES, DEFAULT_WARPS, _columns4, _direct, _interleave4, _pack_block_by, _round_bf16


@triton.jit
def _soft_threshold(w, beta, G: tl.constexpr):
    """w [R, 4G] fp32 -> beta * S_soft(w) along its columns, fp32 (each group of 4: the 2 largest |w| shrunk by t,
    the others 0)."""
    a0, a1, a2, a3 = _columns4(tl.abs(w), G)
    # t = 2nd smallest of four = min(max of the two pair-minima, min of the two pair-maxima), as the reference
    t = tl.minimum(tl.maximum(tl.minimum(a0, a1), tl.minimum(a2, a3)), tl.minimum(tl.maximum(a0, a1), tl.maximum(a2, a3)))
    t4 = _interleave4(t, t, t, t, G)  # [R, 4G]: each group's t on its 4 columns
    mag = tl.maximum(tl.abs(w) - t4, 0.0)
    sgn = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
    return beta * (sgn * mag)


@triton.jit
def _sste_kernel(w_ptr, beta_ptr, val_ptr, meta_ptr, bits_ptr, K, stride_r, stride_c, TILES: tl.constexpr,
                 WRITE_BITS: tl.constexpr):
    # program: rows [64*band, +64), columns [32*TILES*pid1, +32*TILES) of the packed matrix [R, K]
    band = tl.program_id(0)
    BK: tl.constexpr = 32 * TILES
    G: tl.constexpr = 8 * TILES
    rows = (band * 64 + tl.arange(0, 64)).to(tl.int64)
    cols = (tl.program_id(1) * BK + tl.arange(0, BK)).to(tl.int64)
    w = tl.load(w_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c).to(tl.float32)  # [64, BK]
    s = _soft_threshold(w, tl.load(beta_ptr), G)
    _pack_block_by(w, s, band, tl.program_id(1), val_ptr, meta_ptr, bits_ptr, K, TILES, WRITE_BITS)


@triton.jit
def _sste_dense_kernel(w_ptr, beta_ptr, out_ptr, K, TILES: tl.constexpr, ROUND_BF16: tl.constexpr):
    # program: rows [64*pid0, +64), columns [32*TILES*pid1, +32*TILES) of w [R, K] (row-major) and of out
    BK: tl.constexpr = 32 * TILES
    rows = (tl.program_id(0) * 64 + tl.arange(0, 64)).to(tl.int64)
    cols = (tl.program_id(1) * BK + tl.arange(0, BK)).to(tl.int64)
    off = rows[:, None] * K + cols[None, :]
    s = _soft_threshold(tl.load(w_ptr + off).to(tl.float32), tl.load(beta_ptr), 8 * TILES)
    if ROUND_BF16:  # nearest-even with integer ops (the CPU interpreter's conversion truncates)
        s = _round_bf16(s)
    tl.store(out_ptr + off, s.to(out_ptr.dtype.element_ty))


def soft_threshold24_packed(w: torch.Tensor, beta: torch.Tensor, transpose: bool = False,
                            tiles: int = DEFAULT_TILES, num_warps: int = DEFAULT_WARPS, launch=_direct,
                            write_bits: bool = True) -> Packed24:
    """w: [R, C] (2-D, any strides) -> Packed24 of beta * S_soft(w) along C ([R, C]), or of w^T along R
    ([C, R]) when transpose. beta: a 0-d fp32 tensor on w's device. See module docs. write_bits=False: no mask
    bits (a weight-sparse GEMM reads only the buffer; the Packed24's mask_bits are then empty)."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D, got shape {tuple(w.shape)}")
    m, k = (w.shape[1], w.shape[0]) if transpose else tuple(w.shape)
    check_shape(m, k)
    if tiles & (tiles - 1) or (k // 32) % tiles:
        raise ValueError(f"tiles={tiles} (a power of two) must divide K/32={k // 32}")
    sr, sc = (w.stride(1), w.stride(0)) if transpose else (w.stride(0), w.stride(1))
    buf = torch.empty(m * k * 9 // 16, dtype=torch.bfloat16, device=w.device)
    bits = torch.empty((m, k // 8) if write_bits else (0,), dtype=torch.uint8, device=w.device)
    launch(_sste_kernel)[(m // 64, k // 32 // tiles)](w, beta, buf[: m * k // 2], buf[m * k // 2:].view(torch.uint8),
                                                     bits, k, sr, sc, TILES=tiles, WRITE_BITS=write_bits,
                                                     num_warps=num_warps)
    return Packed24(buf.view(m, k * 9 // 16), bits, (m, k))


def soft_threshold24_dense(w: torch.Tensor, beta: torch.Tensor, tiles: int = DEFAULT_TILES,
                           num_warps: int = DEFAULT_WARPS, launch=_direct) -> torch.Tensor:
    """w [R, C] row-major, R % 64 == 0, C % (32*tiles) == 0 -> beta * S_soft(w) along C, dense [R, C] in w's
    dtype, computed in fp32 and rounded once: the matrix whose 2:4 pack is soft_threshold24_packed(w, beta), for
    the products that take S(W) as their dense operand (a 2:4-activation GEMM's weight side). One read of w,
    one write."""
    r, c = w.shape
    if tiles & (tiles - 1) or w.stride(1) != 1 or w.stride(0) != c or r % 64 or c % (32 * tiles):
        raise ValueError(f"soft_threshold24_dense: w must be row-major [R, C] with R % 64 == 0 and C % "
                         f"{32 * tiles} == 0 (tiles={tiles}, a power of two), got shape {tuple(w.shape)} strides "
                         f"{w.stride()}")
    out = torch.empty_like(w)
    launch(_sste_dense_kernel)[(r // 64, c // 32 // tiles)](w, beta, out, c, TILES=tiles,
                                                            ROUND_BF16=w.dtype == torch.bfloat16,
                                                            num_warps=num_warps)
    return out
