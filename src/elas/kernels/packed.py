"""The packed 2:4 format of elas: cuSPARSELt's SM90 compressed buffer, built and read in plain torch.

A 2:4-sparse A [M, K] (2 kept per group of 4 along K) becomes one buffer of M*K*9/16 bf16 elements:
    values   M*K/2 bf16: the kept values row by row, each group's two in column order
    metadata M*K/8 bytes: per group g (columns 4g..4g+3) of row r one nibble i0 | i1 << 2 (i0 < i1 the kept
             positions), at byte
                 (r // 64) * (K / 32) * 256        64-row bands of K/32 tiles of 256 bytes
               + (g // 8) * 256                    a tile covers 64 rows x 32 columns (8 groups)
               + ((r % 64) // 16) * 64             16-row slab inside the tile
               + (r % 8) * 8                       rows r and r+8 share a byte ...
               + 2 * (g % 4) + (g % 8) // 4        ... and the 8 groups are interleaved 0,4,1,5,2,6,3,7
             in the low nibble when r % 16 < 8, the high nibble otherwise.
This is the layout `torch._cslt_compress` writes on H100 with cuSPARSELt 0.8 (docs/sm90_layout.md: how it was
established and checked). Writing it ourselves lets a sparsifier feed `cusparseLtMatmul` directly, without the
10x-slower compress call. Shapes: M % 64 == 0 and K % 64 == 0 (the checked range; callers pad M).

Beside the buffer, `mask_bits` [M, K/8] uint8 holds the keep-mask in a plain row-major form for backward
kernels: byte j of row r covers groups 2j (low nibble) and 2j+1 (high nibble); bit c of a nibble = column c kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_ALIGN, COL_ALIGN = 64, 64


@dataclass
class Packed24:
    """A 2:4-sparse [M, K] bf16 matrix in the SM90 cuSPARSELt layout, plus its plain keep-mask."""
    buffer: torch.Tensor  # [M, K*9/16] bf16 (values, then metadata bytes)
    mask_bits: torch.Tensor  # [M, K/8] uint8
    shape: tuple[int, int]

    @property
    def values(self) -> torch.Tensor:  # [M, K/2] bf16
        m, k = self.shape
        return self.buffer.view(-1)[: m * k // 2].view(m, k // 2)

    @property
    def meta(self) -> torch.Tensor:  # [M*K/8] uint8, in the SM90 order
        m, k = self.shape
        return self.buffer.view(-1)[m * k // 2:].view(torch.uint8)


def check_shape(m: int, k: int) -> None:
    if m % ROW_ALIGN or k % COL_ALIGN:
        raise ValueError(f"the SM90 2:4 layout needs rows % {ROW_ALIGN} == 0 and columns % {COL_ALIGN} == 0, got "
                         f"[{m}, {k}]: pad the rows (tokens) or use a d_ff that is a multiple of 64")


def meta_offsets(m: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """byte offset [M, K/4] int64 of each group's nibble, and whether it is the high nibble [M, K/4] bool."""
    r = torch.arange(m, device=device).view(-1, 1)
    g = torch.arange(k // 4, device=device).view(1, -1)
    off = ((r // 64) * (k // 32) * 256 + (g // 8) * 256 + ((r % 64) // 16) * 64 + (r % 8) * 8
           + 2 * (g % 4) + (g % 8) // 4)
    return off, (r % 16 >= 8).expand_as(off)


def kept_positions(mask: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """mask: bool [M, K], 2 kept per group of 4 -> (i0, i1) [M, K/4]: the first and the last kept position.
    check=False skips the data-dependent validation (inside traced operators, where the mask is known good)."""
    m, k = mask.shape
    grp = mask.view(m, k // 4, 4)
    if check and not bool((grp.sum(-1) == 2).all()):
        raise ValueError("mask must keep exactly 2 of every 4 columns")
    i0 = grp.int().argmax(-1)  # first kept
    i1 = 3 - grp.flip(-1).int().argmax(-1)  # last kept
    return i0, i1


def gather_kept(x: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
    """x: [M, K] -> its kept values [M, K/2] in packed order (each group's two in column order); the same as
    x[mask] for a 2:4 mask, without a data-dependent shape (so it traces)."""
    m, k = x.shape
    idx = torch.stack([i0, i1], -1)  # [M, K/4, 2]
    return x.view(m, k // 4, 4).gather(2, idx).view(m, k // 2)


def mask_to_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [M, K] -> uint8 [M, K/8] (see module docs)."""
    m, k = mask.shape
    w = torch.tensor([1, 2, 4, 8], dtype=torch.int32, device=mask.device)
    nib = (mask.view(m, k // 4, 4).int() * w).sum(-1)  # [M, K/4]
    pair = nib.view(m, k // 8, 2)
    return (pair[..., 0] | (pair[..., 1] << 4)).to(torch.uint8)


def bits_to_mask(bits: torch.Tensor, k: int) -> torch.Tensor:
    m = bits.shape[0]
    b = bits.int()
    nib = torch.stack([b & 15, b >> 4], -1).view(m, k // 4, 1)
    return ((nib >> torch.arange(4, device=bits.device)) & 1).bool().view(m, k)


def pack24(x: torch.Tensor, mask: torch.Tensor, check: bool = True) -> Packed24:
    """x: [M, K] (any float dtype, cast to bf16), mask: bool [M, K] with exactly 2 of 4 kept per group.
    Only static shapes inside (traceable by torch.compile); check=False skips the validation of the mask."""
    m, k = x.shape
    check_shape(m, k)
    i0, i1 = kept_positions(mask, check)
    vals = gather_kept(x.to(torch.bfloat16), i0, i1)
    nib = (i0 | (i1 << 2)).to(torch.int32)
    off, high = meta_offsets(m, k, x.device)
    meta = torch.zeros(m * k // 8, dtype=torch.int32, device=x.device)
    meta.index_add_(0, off.reshape(-1), (nib << (4 * high.int())).reshape(-1))
    buf = torch.empty(m * k * 9 // 16, dtype=torch.bfloat16, device=x.device)
    buf[: m * k // 2] = vals.reshape(-1)
    buf[m * k // 2:].view(torch.uint8).copy_(meta.to(torch.uint8))
    return Packed24(buf.view(m, k * 9 // 16), mask_to_bits(mask), (m, k))


def row_block(p: Packed24, r0: int, r1: int) -> Packed24:
    """Rows r0:r1 (multiples of 64) of a packed matrix as a Packed24 of their own: the buffer pack24 gives for
    those rows alone. Row r's values are row r of the value block, and its metadata lies in 64-row bands of K/8
    bytes per row whose offsets depend on r and K alone (module docs), so the block is two slices (copied).
    mask_bits come along where p has them."""
    m, k = p.shape
    if r0 % ROW_ALIGN or r1 % ROW_ALIGN or not 0 <= r0 < r1 <= m:
        raise ValueError(f"row_block: rows {r0}:{r1} must be multiples of {ROW_ALIGN} within 0:{m}")
    vals = p.values[r0:r1].reshape(-1)
    meta = p.meta[r0 * k // 8:r1 * k // 8]
    buf = torch.cat([vals, meta.view(torch.bfloat16)]).view(r1 - r0, k * 9 // 16)
    bits = p.mask_bits[r0:r1] if p.mask_bits.numel() else p.mask_bits
    return Packed24(buf, bits, (r1 - r0, k))


def unpack24(p: Packed24) -> torch.Tensor:
    """The dense [M, K] bf16 matrix a packed buffer stands for (read through the metadata, not mask_bits)."""
    m, k = p.shape
    off, high = meta_offsets(m, k, p.buffer.device)
    byte = p.meta.long()[off]  # [M, K/4]
    nib = torch.where(high, byte >> 4, byte & 15)
    i0, i1 = nib & 3, nib >> 2
    vals = p.values.view(m, k // 4, 2)
    out = torch.zeros(m, k // 4, 4, dtype=torch.bfloat16, device=p.buffer.device)
    out.scatter_(2, i0.unsqueeze(-1), vals[..., :1])
    out.scatter_(2, i1.unsqueeze(-1), vals[..., 1:])
    return out.view(m, k)
