"""Triton kernel: y1 -> 2:4(relu(y1)^2) packed in the SM90 cuSPARSELt layout, in one pass over memory.

Input  y1:        [M, K] bf16 or fp32, row-major (M tokens, K = d_ff), M % 64 == 0, K % 64 == 0.
Output buffer:    [M, K*9/16] bf16 = kept values [M, K/2] then metadata (kernels/packed.py has the layout).
       mask_bits: [M, K/8] uint8, plain row-major keep-mask (for backward kernels).
Each program owns a 64-row band and TILES 32-column tiles (a tile is the unit of 256 metadata bytes), loads
its [64, 32*TILES] block of y1 with coalesced row reads, selects in registers, and writes every output byte
once: values and mask bits contiguously, metadata bytes (rows r and r+8 share one) scattered within the tile.
The selection is the reference rule (kernels/reference.py): keep the 2 largest of each group of 4, earlier
column on ties, compared on the squares in fp32 (exact for bf16 y1); the kept values are rounded to bf16 (to
nearest even). Results are bit-identical to pack24(reference).
The backward pointwise kernel (`relu2_sparse24_backward`, below) reuses the same selection and packing code.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..packed import Packed24, check_shape
from ..reference import Grads24
from .overrides import env_config


# On the GPU `.to(tl.bfloat16)` rounds to nearest even in one instruction; Triton's CPU interpreter truncates. So
# _round_bf16 takes the GPU's conversion there and integer ops in the interpreter (4 instructions a value on a GPU),
# which round alike. Fixed at import, as triton.jit's own choice of the interpreter is.
_NATIVE_ROUND = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 (ties to even), returned as the exactly representable fp32."""
    if x.dtype == tl.bfloat16:
        r = x
    elif _NATIVE_ROUND:
        r = x.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        r = b.to(tl.float32, bitcast=True)
    return r


@triton.jit
def _columns4(x, G: tl.constexpr):
    """x [R, 4G] -> its columns 4g+0, 4g+1, 4g+2, 4g+3, each [R, G] (R: any row count, 64 in the packers)."""
    # column 4g + 2a + b -> [R, G, a, b]; split takes the LAST axis: first b, then a
    even, odd = tl.split(tl.reshape(x, (x.shape[0], G, 2, 2)))  # [R, G, 2]: columns (0, 2) and (1, 3) of each group
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _interleave4(d0, d1, d2, d3, G: tl.constexpr):
    """Inverse of _columns4: four [R, G] -> [R, 4G] with d_j at columns 4g + j."""
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (d0.shape[0], 4 * G))


@triton.jit
def _fewer_than_2(a, b, c):
    """Fewer than 2 of three bools: not their majority (one LOP3 on a GPU)."""
    return ~((a & b) | (a & c) | (b & c))


@triton.jit
def _keep24(x0, x1, x2, x3):
    """The 2:4 rule on the four columns of each group: keep i when fewer than 2 others beat it; j beats i if
    |x_j| is larger, or equal and j is earlier. Returns four bool [R, G]. Six comparisons decide all twelve: for
    i < j, i beats j exactly when j does not beat i (for inputs without NaN; with a NaN two are still kept)."""
    v0, v1, v2, v3 = tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3)
    b01, b02, b03 = v1 > v0, v2 > v0, v3 > v0  # bij, i < j: j beats i
    b12, b13, b23 = v2 > v1, v3 > v1, v3 > v2
    k0 = _fewer_than_2(b01, b02, b03)
    k1 = _fewer_than_2(~b01, b12, b13)
    k2 = _fewer_than_2(~b02, ~b12, b23)
    k3 = _fewer_than_2(~b03, ~b13, ~b23)
    return k0, k1, k2, k3


@triton.jit
def _pack_block(x, band, pid1, val_ptr, meta_ptr, bits_ptr, K, TILES: tl.constexpr, WRITE_BITS: tl.constexpr):
    """Select 2 of every 4 along the columns of x [64, 32*TILES] (fp32, values already final: largest |x| kept,
    earlier column on ties) and write the block's packed values, SM90 metadata and (optionally) mask bits.
    The block is rows [64*band, +64) and columns [32*TILES*pid1, +32*TILES) of a [M, K] matrix."""
    _pack_block_by(x, x, band, pid1, val_ptr, meta_ptr, bits_ptr, K, TILES, WRITE_BITS)


@triton.jit
def _pack_block_by(sel, x, band, pid1, val_ptr, meta_ptr, bits_ptr, K, TILES: tl.constexpr,
                   WRITE_BITS: tl.constexpr):
    """_pack_block with the 2 of every 4 chosen on `sel` and the stored values taken from x (same shape): the
    soft-threshold of 2:4 weights (kernels/cuda/sste.py) keeps the 2 largest |w| but stores them shrunk."""
    BK: tl.constexpr = 32 * TILES
    G: tl.constexpr = 8 * TILES  # groups of 4 columns
    s0, s1, s2, s3 = _columns4(sel, G)
    k0, k1, k2, k3 = _keep24(s0, s1, s2, s3)
    x0, x1, x2, x3 = _columns4(x, G)
    i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    first = _round_bf16(tl.where(k0, x0, tl.where(k1, x1, x2)))  # exact if x is already bf16-valued
    second = _round_bf16(tl.where(k3, x3, tl.where(k2, x2, x1)))
    _store_packed(first, second, i0, i1, band, pid1, val_ptr, meta_ptr, K, TILES)
    if WRITE_BITS:  # plain keep-mask: 4 bits per group, two groups per byte (even group in the low nibble)
        rows = (band * 64 + tl.arange(0, 64)).to(tl.int64)[:, None]
        keep = k0.to(tl.int32) | (k1.to(tl.int32) << 1) | (k2.to(tl.int32) << 2) | (k3.to(tl.int32) << 3)
        kl, kh = tl.split(tl.reshape(keep, (64, G // 2, 2)))
        tl.store(bits_ptr + rows * (K // 8) + pid1 * (BK // 8) + tl.arange(0, G // 2)[None, :],
                 (kl | (kh << 4)).to(tl.uint8))


@triton.jit
def _store_packed(first, second, i0, i1, band, pid1, val_ptr, meta_ptr, K, TILES: tl.constexpr):
    """Write one block of a packed [*, K] matrix: rows [64*band, +64), columns [32*TILES*pid1, +32*TILES), from
    its kept values (first, second: fp32 [64, G], G = 8*TILES groups of 4 columns) and their positions in the
    group (i0 < i1 in 0..3, [64, G])."""
    G: tl.constexpr = 8 * TILES
    rows = (band * 64 + tl.arange(0, 64)).to(tl.int64)[:, None]
    # values: [64, G, 2] -> [64, 2G], contiguous in the row's K/2 values
    vals = tl.reshape(tl.join(first, second), (64, 2 * G)).to(tl.bfloat16)
    tl.store(val_ptr + rows * (K // 2) + pid1 * G * 2 + tl.arange(0, 2 * G)[None, :], vals)
    # SM90 metadata: rows r (low nibble) and r+8 (high nibble) of each 16-row slab share a byte
    nib = i0 | (i1 << 2)  # [64, G]
    lo, hi = tl.split(tl.permute(tl.reshape(nib, (4, 2, 8, G)), (0, 2, 3, 1)))  # [4 slab, 8 row, G] each
    s = tl.arange(0, 4)[:, None, None]
    rp = tl.arange(0, 8)[None, :, None]
    g = tl.arange(0, G)[None, None, :]
    gl = g % 8
    off = (pid1 * TILES + g // 8) * 256 + s * 64 + rp * 8 + 2 * (gl % 4) + gl // 4
    tl.store(meta_ptr + band.to(tl.int64) * (K // 32) * 256 + off, (lo | (hi << 4)).to(tl.uint8))


@triton.jit
def _kernel(y1_ptr, val_ptr, meta_ptr, bits_ptr, count_ptr, K, stride, TILES: tl.constexpr,
            COUNT: tl.constexpr, ROWS: tl.constexpr, WRITE_BITS: tl.constexpr):
    # program: rows [ROWS*pid0, +ROWS) (one or two 64-row bands), columns [32*TILES*pid1, +32*TILES): TILES whole
    # metadata tiles
    BK: tl.constexpr = 32 * TILES
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    x = tl.load(y1_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :])  # [ROWS, BK], coalesced
    if COUNT:  # positives per column (the 95/5 split's feature ranking): one atomic per column per program
        tl.atomic_add(count_ptr + cols, tl.sum((x.to(tl.float32) > 0).to(tl.int32), axis=0), sem="relaxed")
    # the choice compares the exact squares (a bf16 or fp16 product is exact in fp32; reference.relu2_sparsify24),
    # and only the kept values are rounded to bf16 (_pack_block): rounding every square first cost 4-7 SASS
    # instructions per element more (benchmarks/sass_count.py)
    x = x.to(tl.float32)
    x = tl.maximum(x, 0.0)
    x = x * x
    if ROWS == 64:
        _pack_block(x, tl.program_id(0), tl.program_id(1), val_ptr, meta_ptr, bits_ptr, K, TILES, WRITE_BITS)
    else:  # two 64-row bands: [128, BK] -> [64, BK] x 2
        top, bottom = tl.split(tl.permute(tl.reshape(x, (2, 64, BK)), (1, 2, 0)))
        _pack_block(top, 2 * tl.program_id(0), tl.program_id(1), val_ptr, meta_ptr, bits_ptr, K, TILES, WRITE_BITS)
        _pack_block(bottom, 2 * tl.program_id(0) + 1, tl.program_id(1), val_ptr, meta_ptr, bits_ptr, K, TILES,
                    WRITE_BITS)


# Launch: 128 rows x 64 columns (2 metadata tiles) with 8 warps: the fastest of the sweep in `elas bench sparsify`
# on H200 at every ELAS width (4-7% ahead of 64 rows; benchmarks/results/h200/sparsify.json). A form without
# register regrouping (each group's 4 columns loaded and stored by address, stride 4) was measured 5-7x slower
# here and 14x in the backward kernel (sparsify_forms.json): scattered 2-byte accesses cost more than the shuffles.
DEFAULT_TILES, DEFAULT_WARPS, DEFAULT_ROWS = 2, 8, 128


@triton.jit
def _pack_words(w):
    """One row's groups as int64 words of four bf16 y1 ([.., GB]) -> (kept values as int32 words: first | second
    << 16, the SM90 metadata nibble i0 | i1 << 2, the keep-mask nibble), chosen as _pack_block_by chooses."""
    a0, a1, a2, a3 = _feature(w, 0), _feature(w, 1), _feature(w, 2), _feature(w, 3)
    r0, r1, r2, r3 = tl.maximum(a0, 0.0), tl.maximum(a1, 0.0), tl.maximum(a2, 0.0), tl.maximum(a3, 0.0)
    x0, x1, x2, x3 = r0 * r0, r1 * r1, r2 * r2, r3 * r3
    k0, k1, k2, k3 = _keep24(x0, x1, x2, x3)
    first = _round_bf16(tl.where(k0, x0, tl.where(k1, x1, x2)))
    second = _round_bf16(tl.where(k3, x3, tl.where(k2, x2, x1)))
    v = ((first.to(tl.int32, bitcast=True) >> 16) & 0xFFFF) | (second.to(tl.int32, bitcast=True) & -65536)
    nib = tl.where(k0, 0, tl.where(k1, 1, 2)) | (tl.where(k3, 3, tl.where(k2, 2, 1)) << 2)
    keep = k0.to(tl.int32) | (k1.to(tl.int32) << 1) | (k2.to(tl.int32) << 2) | (k3.to(tl.int32) << 3)
    return v, nib, keep


@triton.jit
def _words_kernel(y1_ptr, val_ptr, meta_ptr, bits_ptr, K, GB: tl.constexpr, WRITE_BITS: tl.constexpr):
    # _kernel on 64-bit words (bf16 y1, no counts): program one 64-row band x GB groups of 4 columns (GB/8 metadata
    # tiles). y1: int64 view [M, K/4]; vals: int32 view [M, K/4] (a group's two kept bf16); meta and bits as _kernel.
    # Rows r and r + 8 of each 16-row slab share a metadata byte, so the band is loaded as two [4 slabs, 8 rows, GB]
    # tensors of one layout (rows r, rows r + 8): a thread holds both nibbles of its bytes and whole groups, and no
    # tile is regrouped across threads (Triton 3.6, sm_90, 16 groups and 8 warps: 1 barrier and 18.4 SASS
    # instructions an element without the mask bits, 21.8 with them, against 7 and 21.9, 11 and 26.7 in _kernel;
    # benchmarks/sass_count.py). The same bytes as _kernel.
    band = tl.program_id(0)
    s = tl.arange(0, 4)[:, None, None]
    r = tl.arange(0, 8)[None, :, None]
    g = tl.program_id(1) * GB + tl.arange(0, GB)[None, None, :]
    lo = (band * 64 + s * 16 + r).to(tl.int64)  # [4, 8, 1]
    hi = lo + 8
    v_lo, n_lo, k_lo = _pack_words(tl.load(y1_ptr + lo * (K // 4) + g))
    v_hi, n_hi, k_hi = _pack_words(tl.load(y1_ptr + hi * (K // 4) + g))
    tl.store(val_ptr + tl.max_contiguous(tl.multiple_of(lo * (K // 4) + g, [1, 1, 2]), [1, 1, 2]), v_lo)
    tl.store(val_ptr + tl.max_contiguous(tl.multiple_of(hi * (K // 4) + g, [1, 1, 2]), [1, 1, 2]), v_hi)
    t = g % 8  # the group within its 32-column metadata tile
    off = (g // 8) * 256 + s * 64 + r * 8 + 2 * (t % 4) + t // 4
    tl.store(meta_ptr + band.to(tl.int64) * (K // 32) * 256 + off, (n_lo | (n_hi << 4)).to(tl.uint8))
    if WRITE_BITS:  # two groups a byte, the even one low
        hb = tl.program_id(1) * (GB // 2) + tl.arange(0, GB // 2)[None, None, :]
        a, b = tl.split(tl.reshape(k_lo, (4, 8, GB // 2, 2)))
        tl.store(bits_ptr + lo * (K // 8) + hb, (a | (b << 4)).to(tl.uint8))
        a, b = tl.split(tl.reshape(k_hi, (4, 8, GB // 2, 2)))
        tl.store(bits_ptr + hi * (K // 8) + hb, (a | (b << 4)).to(tl.uint8))


# the forward on 64-bit words: the default where it writes the mask bits (mask mode), 1.03-1.09x the tile form at
# every ELAS width; without them (ste) the tile form is 1.04x ahead at K = 8192 (H100, [8192, K],
# benchmarks/results/h100/sparsify_bwd24.json). ELAS_SPARSIFY_CONFIG='{"words": true, "groups": 16,
# "num_warps": 8}' (or '{"words": false}') sets the form for a process
DEFAULT_WORDS, WORDS_GROUPS, WORDS_WARPS = "bits", 16, 8  # True: always, False: never, "bits": with the mask bits
_FWD_OVERRIDE = env_config("ELAS_SPARSIFY_CONFIG", ("words", "groups", "num_warps"))
for _k, _ok, _valid in (("words", lambda v: isinstance(v, bool), "true or false"),
                        ("groups", lambda v: type(v) is int and v in (8, 16, 32), "8, 16 or 32"),
                        ("num_warps", lambda v: type(v) is int and v in (1, 2, 4, 8, 16),
                         "a power of two 1-16")):
    if _k in _FWD_OVERRIDE and not _ok(_FWD_OVERRIDE[_k]):
        raise ValueError(f"ELAS_SPARSIFY_CONFIG={os.environ.get('ELAS_SPARSIFY_CONFIG')!r}: {_k}="
                         f"{_FWD_OVERRIDE[_k]!r}: expected {_valid}")


def _direct(kernel):
    return kernel


def relu2_sparsify24_packed(y1: torch.Tensor, feature_counts: torch.Tensor | None = None, tiles: int | None = None,
                            num_warps: int | None = None, rows: int | None = None, launch=_direct,
                            write_bits: bool = True, words: bool | None = None, groups: int | None = None
                            ) -> Packed24:
    """y1: [M, K] bf16/fp32 -> Packed24 of 2:4(relu(y1)^2) (values bf16). See module docs.
    feature_counts: optional int32 [K], incremented by the positives of each column of y1 (for the 95/5 split).
    rows: tokens per program, 64 or 128 (default: 128 where M allows). launch: how the kernel is launched:
    directly, or `torch.library.wrap_triton` inside the operator (kernels/ops.py), which lets torch.compile see
    the kernel. write_bits: also write the plain keep-mask (else mask_bits is empty: the backward then needs y1 and
    a=None, `ste` mode's inputs, and refuses the packed y2s; without it the kernel is 20% faster at [8192, 8192]). words (bf16 y1, contiguous from a multiple of 4
    elements, no feature_counts; else the tile form): the word form (_words_kernel, the same bytes), `groups`
    groups of 4 columns a program (8, 16 or 32); tiles and rows do not apply to it. None: ELAS_SPARSIFY_CONFIG's,
    else the module's DEFAULT_* (read at each call; DEFAULT_WORDS "bits": the word form with write_bits), and the
    tile form where tiles or rows are given."""
    if words is None:  # (tiles or rows asked for: the tile form)
        words = _FWD_OVERRIDE.get("words", DEFAULT_WORDS)
        words = (write_bits if words == "bits" else words) and tiles is None and rows is None
    if (words and y1.dtype == torch.bfloat16 and feature_counts is None and y1.is_contiguous()
            and _word_aligned(y1)):
        return _sparsify_words(y1, launch, write_bits, groups,
                               num_warps or _FWD_OVERRIDE.get("num_warps", WORDS_WARPS))
    tiles, num_warps = tiles or DEFAULT_TILES, num_warps or _FWD_OVERRIDE.get("num_warps", DEFAULT_WARPS)
    if y1.dim() != 2 or y1.stride(1) != 1:
        raise ValueError(f"y1 must be a row-major 2-D tensor, got shape {tuple(y1.shape)} strides {y1.stride()}")
    if y1.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"y1 must be bf16 or fp32, got {y1.dtype}")
    m, k = y1.shape
    check_shape(m, k)
    rows = rows or (DEFAULT_ROWS if m % DEFAULT_ROWS == 0 else 64)  # M is a multiple of 64 (check_shape)
    buf = torch.empty(m * k * 9 // 16, dtype=torch.bfloat16, device=y1.device)
    vals = buf[: m * k // 2]
    meta = buf[m * k // 2:].view(torch.uint8)
    bits = torch.empty((m, k // 8) if write_bits else (0,), dtype=torch.uint8, device=y1.device)
    if tiles & (tiles - 1) or (k // 32) % tiles or rows not in (64, 128) or m % rows:
        raise ValueError(f"tiles={tiles} (a power of two) must divide K/32={k // 32} and rows={rows} (64 or 128) "
                         f"must divide M={m}")
    count = feature_counts is not None
    if count and (feature_counts.dtype != torch.int32 or feature_counts.shape != (k,)):
        raise ValueError(f"feature_counts must be int32 [{k}], got {feature_counts.dtype} {tuple(feature_counts.shape)}")
    grid = (m // rows, k // 32 // tiles)
    launch(_kernel)[grid](y1, vals, meta, bits, feature_counts if count else bits, k, y1.stride(0), TILES=tiles,
                          COUNT=count, ROWS=rows, WRITE_BITS=write_bits,
                          num_warps=num_warps)
    return Packed24(buf.view(m, k * 9 // 16), bits, (m, k))


def _word_aligned(*ts: torch.Tensor) -> bool:
    """bf16 tensors that view as int64 words (their storage offsets a multiple of 4 elements); else the word
    forms fall back to the tile forms."""
    return all(t.storage_offset() % 4 == 0 for t in ts)


def _sparsify_words(y1: torch.Tensor, launch, write_bits: bool, groups: int | None, num_warps: int) -> Packed24:
    if y1.dim() != 2 or not y1.is_contiguous():
        raise ValueError(f"y1 must be a contiguous 2-D tensor, got shape {tuple(y1.shape)} strides {y1.stride()}")
    m, k = y1.shape
    check_shape(m, k)
    if groups is None:  # ELAS_SPARSIFY_CONFIG's, else WORDS_GROUPS; one not dividing K/4 (32 where K % 128 != 0)
        # gives way to 16, which divides every K/4 (K % 64 == 0), as the backward's word form takes 16 there
        groups = _FWD_OVERRIDE.get("groups", WORDS_GROUPS)
        groups = groups if (k // 4) % groups == 0 else 16
    if groups not in (8, 16, 32) or (k // 4) % groups:
        raise ValueError(f"groups={groups}: expected 8, 16 or 32 groups of 4 columns dividing K/4={k // 4}")
    buf = torch.empty(m * k * 9 // 16, dtype=torch.bfloat16, device=y1.device)
    bits = torch.empty((m, k // 8) if write_bits else (0,), dtype=torch.uint8, device=y1.device)
    launch(_words_kernel)[(m // 64, k // 4 // groups)](
        y1.view(torch.int64), buf[: m * k // 2].view(torch.int32), buf[m * k // 2:].view(torch.uint8), bits, k,
        GB=groups, WRITE_BITS=write_bits, num_warps=num_warps)
    return Packed24(buf.view(m, k * 9 // 16), bits, (m, k))


@triton.jit
def _dense_kernel(y1_ptr, out_ptr, M, K, stride_in, stride_out, ROWS: tl.constexpr, BK: tl.constexpr,
                  ROUND_BF16: tl.constexpr):
    # program: rows [ROWS*pid0, +ROWS), columns [BK*pid1, +BK); rows past M and columns past K are masked (K % 4
    # == 0, so a group of 4 is either whole or wholly outside)
    G: tl.constexpr = BK // 4
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(y1_ptr + rows[:, None] * stride_in + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x = tl.maximum(x, 0.0)
    x = x * x  # chosen on the exact squares (reference.relu2_sparsify24); the kept values rounded at the store
    x0, x1, x2, x3 = _columns4(x, G)
    k0, k1, k2, k3 = _keep24(x0, x1, x2, x3)
    y = _interleave4(tl.where(k0, x0, 0.0), tl.where(k1, x1, 0.0), tl.where(k2, x2, 0.0), tl.where(k3, x3, 0.0), G)
    if ROUND_BF16 and not _NATIVE_ROUND:  # the interpreter's store conversion truncates
        y = _round_bf16(y)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


# Launch of the dense form: 64 rows x 64 columns, 4 warps (a pointwise pass: one read of y1, one write of y2s)
DENSE_ROWS, DENSE_BK, DENSE_WARPS = 64, 64, 4


def dense_supported(y1: torch.Tensor) -> bool:
    """Whether relu2_sparsify24_dense takes y1: 2-D, row-major rows, bf16/fp32, K a multiple of 4."""
    return (y1.dim() == 2 and y1.stride(1) == 1 and y1.dtype in (torch.bfloat16, torch.float32)
            and y1.shape[1] % 4 == 0)


def relu2_sparsify24_dense(y1: torch.Tensor, rows: int | None = None, bk: int | None = None,
                           num_warps: int | None = None, launch=_direct) -> torch.Tensor:
    """y1 [M, K] bf16/fp32 (any M, K % 4 == 0, rows contiguous) -> y2s [M, K] in y1's dtype: relu(y1)^2 with 2 of
    every 4 consecutive columns kept and the others zero, the dense (unpacked) form of relu2_sparsify24_packed
    (the same selection; reference.relu2_sparsify24's y2s bit for bit, except that a NaN in y1 the selection keeps,
    three or four in a group, comes out 0 where the reference keeps it NaN; a dropped one is 0 in both). For products that take 2:4 activations dense (V:N:M's grouped GEMM, which skips
    whole clusters but not the 2:4 inside them). One read, one write. rows, bk: powers of two (bk >= 4); None:
    the module's DENSE_* launch."""
    rows, bk, num_warps = rows or DENSE_ROWS, bk or DENSE_BK, num_warps or DENSE_WARPS
    if y1.dim() != 2 or y1.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"relu2_sparsify24_dense: y1 must be a 2-D bf16/fp32 tensor, got {y1.dtype} shape "
                         f"{tuple(y1.shape)}")
    if y1.stride(1) != 1:
        raise ValueError(f"relu2_sparsify24_dense: y1's rows must be contiguous, got strides {y1.stride()}")
    if y1.shape[1] % 4:
        raise ValueError(f"relu2_sparsify24_dense: K={y1.shape[1]} must be a multiple of 4 (whole 2:4 groups)")
    if rows & (rows - 1) or bk & (bk - 1) or bk < 4:
        raise ValueError(f"relu2_sparsify24_dense: rows={rows} and bk={bk} must be powers of two, bk >= 4")
    m, k = y1.shape
    out = torch.empty((m, k), dtype=y1.dtype, device=y1.device)
    if m:
        launch(_dense_kernel)[(triton.cdiv(m, rows), triton.cdiv(k, bk))](y1, out, m, k, y1.stride(0), k, ROWS=rows,
                                                                           BK=bk,
                                                                           ROUND_BF16=y1.dtype == torch.bfloat16,
                                                                           num_warps=num_warps)
    return out


@triton.jit
def _bwd_rows(rows, col0, dy2_ptr, val_ptr, bits_ptr, y1_ptr, y2s_ptr, dy1_ptr, dval_ptr, slot_ptr, y2d_ptr,
              dy1d_ptr, K, ND, STE: tl.constexpr, FROM_Y1: tl.constexpr, SPLIT: tl.constexpr, R: tl.constexpr,
              BK: tl.constexpr):
    """The backward's pointwise work on rows `rows` (int64 [R, 1] token indices) x columns [col0, +BK) of [M, K]:
    stores the row-wise outputs and returns (y2s, dy1) fp32 [R, BK] for the along-token packing of the split.
    Inputs: dy2 [M, K]; the forward's packed values [M, K/2] and mask bits [M, K/8], or (FROM_Y1, ste mode) only
    y1 [M, K], from which the 2:4 selection is recomputed exactly as the forward kernel made it.
    Outputs without SPLIT: y2s and dy1 dense [M, K]; in mask mode dy1's kept values in packed order [M, K/2].
    With SPLIT: the columns of y2s and dy1 whose slot >= 0 into y2d, dy1d [M, ND] (the dense features of the 95/5
    split), dense dy1 in ste mode (its input gradient is a dense GEMM) and dy1's packed values in mask mode; dense
    y2s is never written."""
    G: tl.constexpr = BK // 4
    c = tl.arange(0, BK)[None, :]
    if FROM_Y1:
        y1 = tl.load(y1_ptr + rows * K + col0 + c).to(tl.float32)
        r = tl.maximum(y1, 0.0)
        y2 = r * r  # chosen on the exact squares, as the forward kernel chooses
        x0, x1, x2, x3 = _columns4(y2, G)
        k0, k1, k2, k3 = _keep24(x0, x1, x2, x3)
        y2s = _interleave4(tl.where(k0, x0, 0.0), tl.where(k1, x1, 0.0), tl.where(k2, x2, 0.0),
                           tl.where(k3, x3, 0.0), G)
        if SPLIT or not _NATIVE_ROUND:  # the kept values in bf16: for the along-token choice, which compares
            # them as stored, and in the interpreter, whose store conversion truncates
            y2s = _round_bf16(y2s)
        i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
        i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    else:
        vals = tl.load(val_ptr + rows * (K // 2) + col0 // 2 + tl.arange(0, 2 * G)[None, :]).to(tl.float32)
        first, second = tl.split(tl.reshape(vals, (R, G, 2)))  # [R, G]
        if SPLIT:  # [R, G] nibbles, bit c = column c kept: two per byte, unpacked by join + reshape
            bits = tl.load(bits_ptr + rows * (K // 8) + col0 // 8 + tl.arange(0, G // 2)[None, :]).to(tl.int32)
            keep = tl.reshape(tl.join(bits & 15, bits >> 4), (R, G))
        else:  # each byte read for both its groups: no join/reshape, one layout conversion fewer (static count at
            # Triton 3.6, the GPU machine's: 10% fewer instructions, 4 of 21 barriers gone; in the split's kernel
            # the same change added 55 barriers, and Triton 3.9 counts this one the other way: re-count on upgrade)
            g = tl.arange(0, G)[None, :]
            keep = (tl.load(bits_ptr + rows * (K // 8) + col0 // 8 + g // 2).to(tl.int32) >> ((g % 2) * 4)) & 15
        i0 = tl.where((keep & 1) != 0, 0, tl.where((keep & 2) != 0, 1, 2))
        i1 = tl.where((keep & 8) != 0, 3, tl.where((keep & 4) != 0, 2, 1))
        d0 = tl.where(i0 == 0, first, 0.0)
        d1 = tl.where(i0 == 1, first, tl.where(i1 == 1, second, 0.0))
        d2 = tl.where(i0 == 2, first, tl.where(i1 == 2, second, 0.0))
        d3 = tl.where(i1 == 3, second, 0.0)
        y2s = _interleave4(d0, d1, d2, d3, G)  # dense [R, BK]
        if STE:
            y1 = tl.load(y1_ptr + rows * K + col0 + c).to(tl.float32)
    if not SPLIT:  # stored before dy2 is loaded: measured 17% faster than storing it after (register pressure)
        tl.store(y2s_ptr + rows * K + col0 + c, y2s.to(tl.bfloat16))
    dy2 = tl.load(dy2_ptr + rows * K + col0 + c).to(tl.float32)
    # +0 wherever relu(y1) (ste) or y2s (mask) is 0, as the reference: the along-token packing stores these bytes
    if STE:
        dy1 = tl.where(y1 > 0.0, _round_bf16(2.0 * y1 * dy2), 0.0)
    else:  # relu(y1) = bf16(sqrt(y2)) on kept entries (exactly, for normal y2: kernels/cuda/relu2_gemm.py), which
        # also makes the result independent of the sqrt's last bit (tl.sqrt is approximate); y2s is 0 elsewhere
        dy1 = _round_bf16(2.0 * _round_bf16(tl.sqrt(y2s)) * dy2)
        if SPLIT:  # (without the split, -0 may stay: numerically the same, and cheaper)
            dy1 = tl.where(y2s != 0.0, dy1, 0.0)
    if (not SPLIT) or STE:
        tl.store(dy1_ptr + rows * K + col0 + c, dy1.to(tl.bfloat16))
    if not STE:
        g0, g1, g2, g3 = _columns4(dy1, G)
        dfirst = tl.where(i0 == 0, g0, tl.where(i0 == 1, g1, g2))
        dsecond = tl.where(i1 == 3, g3, tl.where(i1 == 2, g2, g1))
        dv = tl.reshape(tl.join(dfirst, dsecond), (R, 2 * G))
        tl.store(dval_ptr + rows * (K // 2) + col0 // 2 + tl.arange(0, 2 * G)[None, :], dv.to(tl.bfloat16))
    if SPLIT:
        slot = tl.load(slot_ptr + col0 + tl.arange(0, BK))[None, :]  # [1, BK]: column's dense slot or -1
        dense = (slot >= 0) & (rows >= 0)
        tl.store(y2d_ptr + rows * ND + slot, y2s.to(tl.bfloat16), mask=dense)
        tl.store(dy1d_ptr + rows * ND + slot, dy1.to(tl.bfloat16), mask=dense)
    return y2s, dy1


@triton.jit
def _bwd_kernel(dy2_ptr, val_ptr, bits_ptr, y1_ptr, y2s_ptr, dy1_ptr, dval_ptr, K, STE: tl.constexpr,
                FROM_Y1: tl.constexpr, BK: tl.constexpr, ROWS: tl.constexpr):
    # program: ROWS rows (tokens: 64 or 128) x BK columns (features) of [M, K]; no split
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    _bwd_rows(rows, tl.program_id(1) * BK, dy2_ptr, val_ptr, bits_ptr, y1_ptr, y2s_ptr, dy1_ptr, dval_ptr, dy2_ptr,
              dy2_ptr, dy2_ptr, K, 1, STE, FROM_Y1, False, ROWS, BK)


@triton.jit
def _kept_grads(v, d, s0, s1):
    """One group of 4 features in 64-bit words (mask mode): v int32, its two kept bf16 values (first in the low
    half); d int64, its four dy2 (feature j in bits 16j..16j+15); s0 < s1 int64, 16 x the kept positions.
    -> (y2s, dy1 as int64 words of four bf16, dy1's two kept values as int32). The same arithmetic as _bwd_rows:
    dy1 = bf16(2 bf16(sqrt(y2s)) dy2) on kept entries; elsewhere y2s is +0 and dy1 the +-0 that 2 x 0 x dy2 gives
    (dy2's sign: byte-identical to _bwd_rows for finite dy2)."""
    fb = v & 0xFFFF
    sb = (v >> 16) & 0xFFFF
    y2s = (fb.to(tl.int64) << s0) | (sb.to(tl.int64) << s1)
    d0 = (((d >> s0) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    d1 = (((d >> s1) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    g0 = _round_bf16(2.0 * _round_bf16(tl.sqrt((fb << 16).to(tl.float32, bitcast=True))) * d0)
    g1 = _round_bf16(2.0 * _round_bf16(tl.sqrt((sb << 16).to(tl.float32, bitcast=True))) * d1)
    b0 = (g0.to(tl.int32, bitcast=True) >> 16) & 0xFFFF
    b1 = (g1.to(tl.int32, bitcast=True) >> 16) & 0xFFFF
    kept = (tl.full(s0.shape, 0xFFFF, tl.int64) << s0) | (tl.full(s1.shape, 0xFFFF, tl.int64) << s1)
    signs = d & ~kept & -9223231297218904064  # 0x8000800080008000: the dropped features' dy2 signs
    return y2s, (b0.to(tl.int64) << s0) | (b1.to(tl.int64) << s1) | signs, b0 | (b1 << 16)


@triton.jit
def _bwd_words_kernel(dy2_ptr, val_ptr, bits_ptr, y2s_ptr, dy1_ptr, dval_ptr, K, GB: tl.constexpr,
                      ROWS: tl.constexpr):
    # _bwd_kernel's mask mode (no split, from the packed forward) on 64-bit words: program ROWS tokens x GB groups
    # of 4 features. dy2, y2s, dy1: int64 views [M, K/4] (a group's four bf16 a word); vals, dval: int32 views
    # [M, K/4] (a group's two kept bf16); bits: uint8 [M, K/8] (two groups a byte, the even one low). Each thread
    # holds whole groups, so the 2:4 positions select by shifts and no tensor is regrouped across threads: the
    # int32 accesses are hinted to runs of 2 (8 bytes), as the int64 ones are 16 bytes, so that the loaded and
    # stored tensors share one layout; only the mask bits' unpacking (join + reshape) goes through shared memory
    # (Triton 3.6, sm_90: 3 barriers and 18.8 SASS instructions an element, against 17 and 26.9 in _bwd_kernel's
    # mask mode; benchmarks/sass_count.py). Writes the same bytes as _bwd_kernel (finite dy2).
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    g = tl.program_id(1) * GB + tl.arange(0, GB)[None, :]
    off = rows * (K // 4) + g  # [ROWS, GB]
    off2 = tl.max_contiguous(tl.multiple_of(off, [1, 2]), [1, 2])
    v = tl.load(val_ptr + off2)
    hb = tl.program_id(1) * (GB // 2) + tl.arange(0, GB // 2)[None, :]
    b = tl.load(bits_ptr + tl.max_contiguous(rows * (K // 8) + hb, [1, 1])).to(tl.int32)  # [ROWS, GB/2]
    keep = tl.reshape(tl.join(b & 15, b >> 4), (ROWS, GB))  # bit j: feature j of the group kept
    s0 = tl.where((keep & 1) != 0, 0, tl.where((keep & 2) != 0, 16, 32)).to(tl.int64)
    s1 = tl.where((keep & 8) != 0, 48, tl.where((keep & 4) != 0, 32, 16)).to(tl.int64)
    y2s, dy1, dv = _kept_grads(v, tl.load(dy2_ptr + off), s0, s1)
    tl.store(y2s_ptr + off, y2s)
    tl.store(dy1_ptr + off, dy1)
    tl.store(dval_ptr + off2, dv)


@triton.jit
def _feature(w, j: tl.constexpr):
    """Feature j of each group from its int64 word of four bf16, as fp32 (exact)."""
    return (((w >> (16 * j)) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _pack_tokens(x0, x1, x2, x3, band, pid1, val_ptr, meta_ptr, M, TILES: tl.constexpr):
    """2:4 along tokens: x_j [G, 64] fp32 holds tokens 4g+j of a block of 4G tokens x 64 features; select 2 of
    each 4 tokens (largest |x|, earlier token on ties) and write the block of the transposed [K, M] packed
    matrix: rows (features) [64*band, +64), columns (tokens) [32*TILES*pid1, +32*TILES). The selection is
    elementwise across the four phases; only the kept values and positions are transposed."""
    k0, k1, k2, k3 = _keep24(x0, x1, x2, x3)
    i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    first = tl.where(k0, x0, tl.where(k1, x1, x2))
    second = tl.where(k3, x3, tl.where(k2, x2, x1))
    _store_packed(tl.trans(first), tl.trans(second), tl.trans(i0), tl.trans(i1), band, pid1, val_ptr, meta_ptr, M,
                  TILES)


@triton.jit
def _bwd_split_kernel(dy2_ptr, val_ptr, bits_ptr, y1_ptr, dy1_ptr, dval_ptr, yt_val_ptr, yt_meta_ptr, dt_val_ptr,
                      dt_meta_ptr, slot_ptr, y2d_ptr, dy1d_ptr, M, K, ND, STE: tl.constexpr, FROM_Y1: tl.constexpr,
                      ROWS: tl.constexpr):
    # program: ROWS tokens x 64 features of [M, K], with the 95/5 split: y2s^T and dy1^T [K, M] packed 2:4 along
    # tokens (the sparse operands of both weight gradients, every feature), plus _bwd_rows's row-wise outputs.
    # The tokens are taken as four phases (rows 4g + j, j = 0..3, [ROWS/4, 64] each), so that the selection
    # along tokens compares the four phases elementwise instead of regrouping a transposed tile in registers.
    GT: tl.constexpr = ROWS // 4
    base = tl.program_id(0) * ROWS + 4 * tl.arange(0, GT).to(tl.int64)[:, None]  # [GT, 1]: tokens 4g
    col0 = tl.program_id(1) * 64
    a0, b0 = _bwd_rows(base, col0, dy2_ptr, val_ptr, bits_ptr, y1_ptr, dy2_ptr, dy1_ptr, dval_ptr, slot_ptr,
                       y2d_ptr, dy1d_ptr, K, ND, STE, FROM_Y1, True, GT, 64)
    a1, b1 = _bwd_rows(base + 1, col0, dy2_ptr, val_ptr, bits_ptr, y1_ptr, dy2_ptr, dy1_ptr, dval_ptr, slot_ptr,
                       y2d_ptr, dy1d_ptr, K, ND, STE, FROM_Y1, True, GT, 64)
    a2, b2 = _bwd_rows(base + 2, col0, dy2_ptr, val_ptr, bits_ptr, y1_ptr, dy2_ptr, dy1_ptr, dval_ptr, slot_ptr,
                       y2d_ptr, dy1d_ptr, K, ND, STE, FROM_Y1, True, GT, 64)
    a3, b3 = _bwd_rows(base + 3, col0, dy2_ptr, val_ptr, bits_ptr, y1_ptr, dy2_ptr, dy1_ptr, dval_ptr, slot_ptr,
                       y2d_ptr, dy1d_ptr, K, ND, STE, FROM_Y1, True, GT, 64)
    _pack_tokens(a0, a1, a2, a3, tl.program_id(1), tl.program_id(0), yt_val_ptr, yt_meta_ptr, M, ROWS // 32)
    _pack_tokens(b0, b1, b2, b3, tl.program_id(1), tl.program_id(0), dt_val_ptr, dt_meta_ptr, M, ROWS // 32)


# the backward's launch (64 tokens per program; 8 warps: 3-9% ahead of 4 on H200, benchmarks/results/h200/
# sparsify.json "backward"); with the 95/5 split 4 warps: 1.13-1.29x ahead of 8 at every ELAS width (same file,
# byte-identical outputs)
BWD_ROWS, BWD_WARPS, SPLIT_BWD_WARPS = 64, 8, 4


def bwd_launch(split: bool) -> tuple[int, int]:
    """The backward's default (rows, warps), read at each call."""
    return BWD_ROWS, SPLIT_BWD_WARPS if split else BWD_WARPS


# mask mode's backward without the split on 64-bit words (_bwd_words_kernel): the default, 1.14-1.26x the grid
# form at every ELAS width (H100, [8192, K], benchmarks/results/h100/sparsify_bwd24.json), and relu2-24's 1B step
# 1.5 ms faster with it (step_bwd24_mask_swept.json against _default). (Its ste twin on words tied the grid form,
# 0.98-1.00x, and was removed; so was a persistent form, which ran -1.3% to +3% against the grid form.)
BWD_WORDS = True
# ELAS_BWD24_CONFIG='{"rows": 64, "num_warps": 8, "words": false}' (or '{"words": true}') sets the backward's
# launch without the split for a process (what `elas bench sparsify`'s sweep names fastest), checked here at
# import. The keys of the removed persistent form (per_sm, prefetch) are unknown now: a variable that still names
# one fails at import, naming the key and the valid ones, instead of timing another form than the one it names
_BWD_OVERRIDE = env_config("ELAS_BWD24_CONFIG", ("rows", "num_warps", "words"))


def _check_bwd_override(c: dict) -> None:
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for key, ok, valid in (("rows", lambda v: v in (64, 128) and is_int(v), "64 or 128"),
                           ("num_warps", lambda v: is_int(v) and v in (1, 2, 4, 8, 16, 32), "a power of two 1-32"),
                           ("words", lambda v: isinstance(v, bool), "true or false")):
        if key in c and not ok(c[key]):
            raise ValueError(f"ELAS_BWD24_CONFIG={os.environ.get('ELAS_BWD24_CONFIG')!r}: {key}={c[key]!r}: "
                             f"expected {valid}")


_check_bwd_override(_BWD_OVERRIDE)


def _packed_buffer(rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor, Packed24]:
    """An empty Packed24 [rows, cols] (no mask bits) and views of its values and metadata parts."""
    buf = torch.empty(rows * cols * 9 // 16, dtype=torch.bfloat16, device=device)
    p = Packed24(buf.view(rows, cols * 9 // 16), torch.empty(0, dtype=torch.uint8, device=device), (rows, cols))
    return buf[: rows * cols // 2], buf[rows * cols // 2:].view(torch.uint8), p


def bwd_settings(split: bool, rows: int | None = None, num_warps: int | None = None,
                 words: bool | None = None) -> tuple[int, int, bool]:
    """The backward's launch (rows, num_warps, words): each argument given, else (without the split)
    ELAS_BWD24_CONFIG's, else the module's defaults (bwd_launch, BWD_WORDS; the split has no word form). words
    False is the grid form of one program a tile, whatever the environment says. ValueError for words asked of
    the split."""
    default_rows, default_warps = bwd_launch(split)
    env = {} if split else _BWD_OVERRIDE
    if words and split:
        raise ValueError("words: the word form has no 95/5 split (dense_slots); leave words unset")
    if words is None:
        words = False if split else env.get("words", BWD_WORDS)
    return rows or env.get("rows", default_rows), num_warps or env.get("num_warps", default_warps), bool(words)


def relu2_sparse24_backward(dy2: torch.Tensor, a: Packed24 | None, y1: torch.Tensor | None = None,
                            dense_slots: torch.Tensor | None = None, n_dense: int = 0, rows: int | None = None,
                            num_warps: int | None = None, words: bool | None = None, launch=_direct) -> Grads24:
    """Triton twin of reference.relu2_sparse24_backward: one pass over dy2 (and y1 in ste mode); see there.
    rows, num_warps: tokens per program (64 or 128) and warps; words (without the split, mask mode from the
    packed forward; bf16, from a multiple of 4 elements): the word form (_bwd_words_kernel), the same bytes for
    finite dy2 (an Inf or NaN dy2 on a dropped feature gives 0 there, as the reference, where the grid form gives
    NaN); elsewhere (ste, fp32, other offsets) it changes nothing; False: the grid form of one program a tile,
    whatever ELAS_BWD24_CONFIG says. launch: as in relu2_sparsify24_packed. None: bwd_settings' (ELAS_BWD24_CONFIG,
    else the module's defaults; read at each call)."""
    rows, num_warps, words = bwd_settings(dense_slots is not None, rows, num_warps, words)
    m, k = dy2.shape
    if a is not None and a.shape != (m, k):
        raise ValueError(f"packed y2s is {a.shape}, dy2 is {tuple(dy2.shape)}")
    if a is not None and (a.buffer.numel() != m * k * 9 // 16 or a.mask_bits.shape != (m, k // 8)
                          or a.mask_bits.dtype != torch.uint8):
        raise ValueError(f"relu2_sparse24_backward: the packed forward needs its mask_bits uint8 [{m}, {k // 8}] "
                         f"(got {a.mask_bits.dtype} {tuple(a.mask_bits.shape)}: packed with write_bits=False?); "
                         f"in ste mode pass a=None and y1")
    if a is None and y1 is None:
        raise ValueError("relu2_sparse24_backward needs the packed y2s (mask mode) or y1 (ste mode)")
    if dy2.stride(1) != 1 or dy2.stride(0) != k:
        raise ValueError(f"dy2 must be a contiguous [{m}, {k}] tensor, got strides {dy2.stride()}")
    if y1 is not None and (y1.shape != (m, k) or not y1.is_contiguous()):
        raise ValueError(f"y1 must be a contiguous [{m}, {k}] tensor")
    check_shape(m, k)
    if rows not in (64, 128) or m % rows:
        raise ValueError(f"rows={rows} must be 64 or 128 and divide M={m}")
    ste, split, dev = y1 is not None, dense_slots is not None, dy2.device
    new = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device=dev)  # noqa: E731
    y2s = None if split else new(m, k)
    dy1 = new(m, k) if (ste or not split) else None
    # mask mode: dy1's values go straight into a packed buffer behind which the forward's metadata is copied (1/9
    # of the buffer): the 2:4 GEMM of dh1 reads it as is
    dbuf = None if ste else new(m * k * 9 // 16)
    dval = None if ste else dbuf[: m * k // 2].view(m, k // 2)
    y2s_t = dy1_t = y2d = dy1d = yt_val = yt_meta = dt_val = dt_meta = None
    if split:
        if dense_slots.dtype != torch.int32 or dense_slots.shape != (k,):
            raise ValueError(f"dense_slots must be int32 [{k}], got {dense_slots.dtype} {tuple(dense_slots.shape)}")
        yt_val, yt_meta, y2s_t = _packed_buffer(k, m, dev)
        dt_val, dt_meta, dy1_t = _packed_buffer(k, m, dev)
        y2d, dy1d = new(m, n_dense), new(m, n_dense)
    bk = 64 if k % 128 else 128

    def ptr(t):  # outputs a configuration does not write still need a pointer (never dereferenced)
        return dy2 if t is None else t

    vals, bits = ptr(a.values if a is not None else None), ptr(a.mask_bits if a is not None else None)
    if split:
        launch(_bwd_split_kernel)[(m // rows, k // 64)](
            dy2, vals, bits, ptr(y1), ptr(dy1), ptr(dval), yt_val, yt_meta, dt_val, dt_meta, dense_slots, y2d, dy1d,
            m, k, max(n_dense, 1), STE=ste, FROM_Y1=a is None, ROWS=rows, num_warps=num_warps)
    elif (words and dy2.dtype == torch.bfloat16 and _word_aligned(dy2) and a is not None and not ste
          and a.values.storage_offset() % 2 == 0):  # (the values as int32: a group's two kept bf16)
        gb = 32 if k % 128 == 0 else 16  # groups of 4 features a program: 128 or 64 features
        launch(_bwd_words_kernel)[(m // rows, k // 4 // gb)](
            dy2.view(torch.int64), a.values.view(torch.int32), a.mask_bits, y2s.view(torch.int64),
            dy1.view(torch.int64), dval.view(torch.int32), k, GB=gb, ROWS=rows, num_warps=num_warps)
    else:
        launch(_bwd_kernel)[(m // rows, k // bk)](dy2, vals, bits, ptr(y1), y2s, ptr(dy1), ptr(dval), k, STE=ste,
                                                  FROM_Y1=a is None, BK=bk, ROWS=rows, num_warps=num_warps)
    dpk = None
    if dbuf is not None:
        dbuf[m * k // 2:].copy_(a.buffer.view(-1)[m * k // 2:])
        dpk = Packed24(dbuf.view(m, k * 9 // 16), a.mask_bits, (m, k))
    return Grads24(y2s, dy1, dval, y2s_t, dy1_t, y2d, dy1d, dpk)
