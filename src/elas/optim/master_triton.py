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

Tensors are reached through a table (the parameters have separate storages, and the gradients are allocated by
autograd): `tab` [n_tensors, 8] int64 = (param, grad, master, exp_avg, exp_avg_sq addresses, numel, group, 0),
`chunks` [n_programs, 2] int64 = (tensor index, first element): each program updates CHUNK = BLOCK * ITERS
consecutive elements of one tensor. `scal` [n_groups, 8] fp32 = (decay, beta1, beta2, eps, step_size,
vscale, 1 - beta1, 1 - beta2): AdamW has step_size = lr / (1 - beta1^k), vscale = 1 / sqrt(1 - beta2^k); LORO's lazy step
step_size = lr scale sqrt(1 - beta2^k) / (1 - beta1^k), vscale = 1 (eps outside the bias correction). dry != 0
computes and stores nothing (the warm-up passes before a CUDA-graph capture).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, ITERS, WARPS = 1024, 8, 4
CHUNK = BLOCK * ITERS


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 (ties to even) as an fp32 value, by integer ops (the interpreter's casts truncate)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _adamw_kernel(tab, chunks, scal, gscale, dry, HAS_SCALE: tl.constexpr, GRAD_FP32: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = tab + t * 8
    # 16-byte aligned: every address in the table is the start of a tensor's storage (checked when it is built)
    p_ptr = tl.multiple_of(tl.load(row), 16).to(tl.pointer_type(tl.bfloat16))
    if GRAD_FP32:
        g_ptr = tl.multiple_of(tl.load(row + 1), 16).to(tl.pointer_type(tl.float32))
    else:
        g_ptr = tl.multiple_of(tl.load(row + 1), 16).to(tl.pointer_type(tl.bfloat16))
    w_ptr = tl.multiple_of(tl.load(row + 2), 16).to(tl.pointer_type(tl.float32))
    m_ptr = tl.multiple_of(tl.load(row + 3), 16).to(tl.pointer_type(tl.float32))
    v_ptr = tl.multiple_of(tl.load(row + 4), 16).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 5) * (1 - dry)  # dry: no element is inside
    s = scal + tl.load(row + 6) * 8
    decay, beta1, beta2 = tl.load(s), tl.load(s + 1), tl.load(s + 2)
    eps, step_size, vscale = tl.load(s + 3), tl.load(s + 4), tl.load(s + 5)
    one_m_b1, one_m_b2 = tl.load(s + 6), tl.load(s + 7)  # 1 - beta, rounded once from double
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(gscale)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32) * inv_scale
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        m = tl.load(m_ptr + offs, mask=inside, other=0.0)
        v = tl.load(v_ptr + offs, mask=inside, other=0.0)
        m = m + one_m_b1 * (g - m)
        v = beta2 * v + one_m_b2 * g * g
        w = w * decay - step_size * (m / (tl.sqrt(v) * vscale + eps))
        tl.store(w_ptr + offs, w, mask=inside)
        tl.store(m_ptr + offs, m, mask=inside)
        tl.store(v_ptr + offs, v, mask=inside)
        tl.store(p_ptr + offs, _round_bf16(w).to(tl.bfloat16), mask=inside)


def chunk_table(numels: list[int], device) -> torch.Tensor:
    """[n_programs, 2] int64: (tensor index, first element) of every CHUNK of every tensor."""
    rows = [(t, s) for t, n in enumerate(numels) for s in range(0, n, CHUNK)]
    return torch.tensor(rows, dtype=torch.int64, device=device).view(-1, 2)


def adamw_step(tab: torch.Tensor, chunks: torch.Tensor, scal: torch.Tensor, grad_scale: torch.Tensor | None,
               grad_fp32: bool, dry: bool = False) -> None:
    """Launch the update described by the tables (see the module docs); asynchronous, capturable."""
    _adamw_kernel[(chunks.shape[0],)](tab, chunks, scal, grad_scale if grad_scale is not None else scal,
                                      int(dry), HAS_SCALE=grad_scale is not None, GRAD_FP32=grad_fp32,
                                      BLOCK=BLOCK, ITERS=ITERS, num_warps=WARPS)
