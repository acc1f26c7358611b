"""Triton kernel of MasterAdamW (optim/master.py): one launch updates every parameter of the model.

Per element, in fp32 (the same operations, in the same order, as `master.adamw_reference`):
    g  = grad * inv_scale                      (grad bf16, or fp32 when accumulated; inv_scale = 1 / grad_scale)
    m  = m + (1 - beta1) * (g - m)
    v  = beta2 * v + (1 - beta2) * g * g          (1 - beta: computed in double on the host, as torch does)
    w  = w * decay - step_size * m / (sqrt(v) * vscale + eps)         (w: the fp32 master weight)
    p  = bf16(w), rounded to nearest even                             (the model's parameter)
Bytes per parameter: reads grad (2), w, m, v (12); writes w, m, v (12), p (2): 28, the same as torch's fused
AdamW over fp32 parameters, which is followed by autocast's casts of every weight (6 more bytes per use) and
of every weight gradient (6 more); here there are none.

With bf16 moments (MOMENTS_BF16; optim_state_dtype=bf16) m and v are read and written in bf16: 20 bytes per
parameter. m is stored rounded to nearest even. v is stored rounded stochastically: once v is steady, its change
per step, (1 - beta2) (g^2 - v) ~ 1e-3 v, is below half a bf16 ulp (2^-9 v), so rounding to nearest would never
let it move; rounded up with probability (distance to the lower bf16) / ulp, it moves by the right amount on
average. The random bits are a hash of (element index, tensor index, step) (`_sr_bf16`; `master.sr_bf16` is the
same integer arithmetic in torch): a replayed step reads the step from `scal` and draws new bits.

Accesses are 16-byte vectors where every tensor's numel is a multiple of 8 (ALIGN = 8, every weight of the
presets): the hints that allow them (aligned pointers, a mask constant over 8 elements) are facts checked on the
host; otherwise (ALIGN = 1) every access is a scalar one: 4x as many memory instructions (benchmarks/sass_count.py).

Tensors are reached through a table (the parameters have separate storages, and the gradients are allocated by
autograd): `tab` [n_tensors, 8] int64 = (param, grad, master, exp_avg, exp_avg_sq addresses, numel, group, 0),
`chunks` [n_programs, 2] int64 = (tensor index, first element): each program updates CHUNK = BLOCK * ITERS
consecutive elements of one tensor. `scal` [n_groups, SCAL = 9] fp32 = (decay, beta1, beta2, eps, step_size,
vscale, 1 - beta1, 1 - beta2, step (the stochastic rounding's seed)): AdamW has step_size = lr / (1 - beta1^k),
vscale = 1 / sqrt(1 - beta2^k); LORO's lazy step step_size = lr scale sqrt(1 - beta2^k) / (1 - beta1^k),
vscale = 1 (eps outside the bias correction). dry != 0 computes and stores nothing (the warm-up passes before a
CUDA-graph capture).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, ITERS, WARPS = 512, 16, 4
CHUNK = BLOCK * ITERS


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 (ties to even) as an fp32 value, by integer ops (the interpreter's casts truncate)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) on uint32 values: the products wrap modulo 2^32, one
    32-bit multiply each (the reference computes the same bits in int64 and masks them)."""
    x = (x ^ (x >> 16)) * 0x7FEB352D
    x = (x ^ (x >> 15)) * 0x27D4EB2F
    return x ^ (x >> 16)


@triton.jit
def _sr_bf16(x, idx, salt):
    """fp32 -> bf16 rounded stochastically (as an fp32 value): the low 16 bits of a hash of (idx, salt) added
    to the bit pattern before truncation, so x rounds away from zero with probability (its distance from the
    truncated value) / ulp. idx: the element index in its tensor (int64; its low 32 bits are hashed), salt: a
    uint32 hash of (tensor index, step), one per program (_salt)."""
    h = _mix32(idx.to(tl.uint32) + salt)
    b = x.to(tl.uint32, bitcast=True)
    b = (b + (h & 0xFFFF)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _salt(t, seed):
    """The uint32 hash of (tensor index t, step seed), both int64 scalars: no product leaves int64."""
    return _mix32(((t * 0x165667B1 + seed * 0x68E31DA5) & 0xFFFFFFFF).to(tl.uint32))


# dry is never specialised: Triton compiles an integer argument equal to 1 as a constant, so the warm-up's dry=1
# would build a second binary, and the update a capture records (dry=0) would first compile during the capture
@triton.jit(do_not_specialize=["dry"])
def _adamw_kernel(tab, chunks, scal, gscale, dry, HAS_SCALE: tl.constexpr, GRAD_FP32: tl.constexpr,
                  MOMENTS_BF16: tl.constexpr, SCAL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  ALIGN: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), BLOCK * ITERS)  # a chunk's first element
    row = tab + t * 8
    # 16-byte aligned: every address in the table is the start of a tensor's storage (checked when it is built);
    # the hint is on the pointer (on the integer it is lost in the conversion)
    p_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.bfloat16)), 16)
    if GRAD_FP32:
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.float32)), 16)
    else:
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.bfloat16)), 16)
    w_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
    if MOMENTS_BF16:
        m_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.bfloat16)), 16)
        v_ptr = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.bfloat16)), 16)
    else:
        m_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.float32)), 16)
        v_ptr = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.float32)), 16)
    # ALIGN: every tensor's numel is a multiple of it (checked on the host), so the mask `offs < n` is constant
    # over ALIGN consecutive elements and the loads and stores are vectorised (16 bytes of fp32, 8 or 16 of
    # bf16); unknown, it could change at any element, and every access is a scalar one (4 or 2 bytes)
    n = tl.multiple_of(tl.load(row + 5) * (1 - dry), ALIGN)  # dry: no element is inside
    s = scal + tl.load(row + 6) * SCAL
    decay, beta1, beta2 = tl.load(s), tl.load(s + 1), tl.load(s + 2)
    eps, step_size, vscale = tl.load(s + 3), tl.load(s + 4), tl.load(s + 5)
    one_m_b1, one_m_b2 = tl.load(s + 6), tl.load(s + 7)  # 1 - beta, rounded once from double
    salt = _salt(t, tl.load(s + 8).to(tl.int64))  # the stochastic rounding's, once per program
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(gscale)
    # only the blocks that hold elements (a tensor's last chunk may be short; dry: none)
    for i in range(tl.cdiv(tl.minimum(n - start, BLOCK * ITERS), BLOCK)):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32) * inv_scale
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        m = tl.load(m_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        m = m + one_m_b1 * (g - m)
        v = beta2 * v + one_m_b2 * g * g
        if MOMENTS_BF16:  # the update reads the moments as stored
            m = _round_bf16(m)
            v = _sr_bf16(v, offs, salt)
        w = w * decay - step_size * (m / (tl.sqrt(v) * vscale + eps))
        tl.store(w_ptr + offs, w, mask=inside)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=inside)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=inside)
        tl.store(p_ptr + offs, _round_bf16(w).to(tl.bfloat16), mask=inside)


@triton.jit
def _sumsq_kernel(tab, chunks, out, GRAD_FP32: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  ALIGN: tl.constexpr):
    """out[program] = the sum of squares (fp32) of its chunk of one gradient: the table and chunks of the update,
    so that one launch measures every gradient the update will read (the clipping norm)."""
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), BLOCK * ITERS)
    row = tab + t * 8
    if GRAD_FP32:
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.float32)), 16)
    else:
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.bfloat16)), 16)
    n = tl.multiple_of(tl.load(row + 5), ALIGN)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(tl.cdiv(tl.minimum(n - start, BLOCK * ITERS), BLOCK)):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(out + pid, tl.sum(acc, axis=0))


def chunk_table(numels: list[int], device) -> torch.Tensor:
    """[n_programs, 2] int64: (tensor index, first element) of every CHUNK of every tensor."""
    rows = [(t, s) for t, n in enumerate(numels) for s in range(0, n, CHUNK)]
    return torch.tensor(rows, dtype=torch.int64, device=device).view(-1, 2)


def alignment(numels: list[int]) -> int:
    """The kernel's ALIGN for these tensors: 8 when every numel is a multiple of 8 (every weight of the presets),
    else 1 (scalar accesses)."""
    return 8 if all(n % 8 == 0 for n in numels) else 1


def adamw_step(tab: torch.Tensor, chunks: torch.Tensor, scal: torch.Tensor, grad_scale: torch.Tensor | None,
               grad_fp32: bool, moments_bf16: bool = False, dry: bool = False, align: int = 1) -> None:
    """Launch the update described by the tables (see the module docs); asynchronous, capturable. align:
    `alignment` of the tensors' numels (1 is always correct, and slower)."""
    _adamw_kernel[(chunks.shape[0],)](tab, chunks, scal, grad_scale if grad_scale is not None else scal,
                                      int(dry), HAS_SCALE=grad_scale is not None, GRAD_FP32=grad_fp32,
                                      MOMENTS_BF16=moments_bf16, SCAL=scal.shape[1], BLOCK=BLOCK, ITERS=ITERS,
                                      ALIGN=align, num_warps=WARPS)


def grad_sumsq(tab: torch.Tensor, chunks: torch.Tensor, out: torch.Tensor, grad_fp32: bool, align: int = 1) -> None:
    """out [n_programs] fp32 <- each chunk's sum of squared gradients (the update's tables); asynchronous,
    capturable. Their sum is deterministic, unlike atomic adds."""
    _sumsq_kernel[(chunks.shape[0],)](tab, chunks, out, GRAD_FP32=grad_fp32, BLOCK=BLOCK, ITERS=ITERS, ALIGN=align,
                                      num_warps=WARPS)
