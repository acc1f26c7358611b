"""Triton kernel: y1 -> 2:4(relu(y1)^2) packed in the SM90 cuSPARSELt layout, in one pass over memory.

Input  y1:        [M, K] bf16 or fp32, row-major (M tokens, K = d_ff), M % 64 == 0, K % 64 == 0.
Output buffer:    [M, K*9/16] bf16 = kept values [M, K/2] then metadata (kernels/packed.py has the layout).
       mask_bits: [M, K/8] uint8, plain row-major keep-mask (for backward kernels).
Each program owns a 64-row band and TILES 32-column tiles: exactly the unit of 256 metadata bytes, so every
metadata byte (rows r and r+8 share one) is written once, by one program, with no atomics.
The selection is the reference rule (kernels/reference.py): keep the 2 largest of each group of 4, earlier
column on ties, compared on y2 rounded to the input dtype. Results are bit-identical to pack24(reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packed import Packed24, check_shape


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 (ties to even), returned as the exactly representable fp32. Done with integer ops
    so that the result does not depend on the conversion mode of the backend (the CPU interpreter truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _beats(aj, ai, j_before_i: tl.constexpr):
    if j_before_i:
        return (aj >= ai).to(tl.int32)
    return (aj > ai).to(tl.int32)


@triton.jit
def _select(y1_ptr, rows, cols, stride, ROUND_BF16: tl.constexpr):
    """rows [4,8,1], cols [1,1,8] (first column of each group) -> keep flags, nibbles and kept values."""
    p = y1_ptr + rows.to(tl.int64) * stride + cols
    v0 = tl.maximum(tl.load(p + 0).to(tl.float32), 0.0)
    v1 = tl.maximum(tl.load(p + 1).to(tl.float32), 0.0)
    v2 = tl.maximum(tl.load(p + 2).to(tl.float32), 0.0)
    v3 = tl.maximum(tl.load(p + 3).to(tl.float32), 0.0)
    v0, v1, v2, v3 = v0 * v0, v1 * v1, v2 * v2, v3 * v3
    if ROUND_BF16:  # the reference squares in bf16: compare the rounded values
        v0, v1, v2, v3 = _round_bf16(v0), _round_bf16(v1), _round_bf16(v2), _round_bf16(v3)
    # element i is kept when fewer than 2 others beat it (j beats i: larger, or equal and earlier)
    k0 = (_beats(v1, v0, False) + _beats(v2, v0, False) + _beats(v3, v0, False)) < 2
    k1 = (_beats(v0, v1, True) + _beats(v2, v1, False) + _beats(v3, v1, False)) < 2
    k2 = (_beats(v0, v2, True) + _beats(v1, v2, True) + _beats(v3, v2, False)) < 2
    k3 = (_beats(v0, v3, True) + _beats(v1, v3, True) + _beats(v2, v3, True)) < 2
    i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    # kept values, rounded to bf16 here so that the store's conversion is exact
    first = _round_bf16(tl.where(k0, v0, tl.where(k1, v1, v2)))
    second = _round_bf16(tl.where(k3, v3, tl.where(k2, v2, v1)))
    nib = (i0 | (i1 << 2)).to(tl.int32)
    keep = (k0.to(tl.int32) | (k1.to(tl.int32) << 1) | (k2.to(tl.int32) << 2) | (k3.to(tl.int32) << 3))
    return nib, keep, first, second


@triton.jit
def _store_half(val_ptr, bits_ptr, rows, g, col0, K, keep, first, second):
    # values: row r, group (col0/4 + g) -> positions 2*group, 2*group+1 of the row's K/2 values
    vrow = val_ptr + rows.to(tl.int64) * (K // 2) + col0 // 2
    vpos = 2 * g
    tl.store(vrow + vpos, first.to(tl.bfloat16))
    tl.store(vrow + vpos + 1, second.to(tl.bfloat16))
    # plain mask: byte (col0/8 + g/2) of the row, low nibble for even groups
    shift = (g % 2) * 4
    kb = keep << shift  # [4,8,8]
    lo_hi = tl.reshape(kb, (4, 8, 4, 2))
    packed = tl.sum(lo_hi, axis=3)  # the two nibbles do not overlap: sum == or
    b4 = tl.arange(0, 4)[None, None, :]
    tl.store(bits_ptr + rows.to(tl.int64) * (K // 8) + col0 // 8 + b4, packed.to(tl.uint8))


@triton.jit
def _relu2_sparsify24_kernel(y1_ptr, val_ptr, meta_ptr, bits_ptr, K, stride, TILES: tl.constexpr,
                             ROUND_BF16: tl.constexpr):
    band = tl.program_id(0)
    s = tl.arange(0, 4)[:, None, None]  # 16-row slab of the tile
    rp = tl.arange(0, 8)[None, :, None]  # row within the slab's half
    g = tl.arange(0, 8)[None, None, :]  # group within the 32-column tile
    rows_lo = band * 64 + s * 16 + rp  # rows whose nibble is low   [4,8,1]
    rows_hi = rows_lo + 8  # rows whose nibble is high  [4,8,1]
    meta_band = meta_ptr + band.to(tl.int64) * (K // 32) * 256
    for t in tl.static_range(TILES):
        tile = tl.program_id(1) * TILES + t
        col0 = tile * 32
        cols = col0 + 4 * g
        nib_lo, keep_lo, f_lo, s_lo = _select(y1_ptr, rows_lo, cols, stride, ROUND_BF16)
        nib_hi, keep_hi, f_hi, s_hi = _select(y1_ptr, rows_hi, cols, stride, ROUND_BF16)
        _store_half(val_ptr, bits_ptr, rows_lo, g, col0, K, keep_lo, f_lo, s_lo)
        _store_half(val_ptr, bits_ptr, rows_hi, g, col0, K, keep_hi, f_hi, s_hi)
        off = tile * 256 + s * 64 + rp * 8 + 2 * (g % 4) + g // 4  # [4,8,8]
        tl.store(meta_band + off, (nib_lo | (nib_hi << 4)).to(tl.uint8))


def _tiles_per_program(k: int) -> int:
    for t in (4, 2, 1):
        if (k // 32) % t == 0:
            return t
    return 1


def relu2_sparsify24_packed(y1: torch.Tensor) -> Packed24:
    """y1: [M, K] bf16/fp32 -> Packed24 of 2:4(relu(y1)^2) (values bf16). See module docs."""
    if y1.dim() != 2 or y1.stride(1) != 1:
        raise ValueError(f"y1 must be a row-major 2-D tensor, got shape {tuple(y1.shape)} strides {y1.stride()}")
    if y1.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"y1 must be bf16 or fp32, got {y1.dtype}")
    m, k = y1.shape
    check_shape(m, k)
    buf = torch.empty(m * k * 9 // 16, dtype=torch.bfloat16, device=y1.device)
    vals = buf[: m * k // 2]
    meta = buf[m * k // 2:].view(torch.uint8)
    bits = torch.empty(m, k // 8, dtype=torch.uint8, device=y1.device)
    tiles = _tiles_per_program(k)
    grid = (m // 64, k // 32 // tiles)
    _relu2_sparsify24_kernel[grid](y1, vals, meta, bits, k, y1.stride(0), TILES=tiles,
                                   ROUND_BF16=y1.dtype == torch.bfloat16, num_warps=4)
    return Packed24(buf.view(m, k * 9 // 16), bits, (m, k))
