"""Triton kernel: a chunk of the LM head's cross-entropy, its loss and its gradient w.r.t. the logits in one pass.

model/loss.py walks the tokens in chunks; for each it has the logits z = h W^T [c, V] in the compute dtype. The
torch form (compiled) upcasts z to fp32, reduces each row to its logsumexp, writes exp(z - lse) in fp32 with the
target's -1 scattered in, then a second kernel scales that and casts it back: per chunk z is read twice and an fp32
[c, V] tensor written and read once more, ~14 bytes per logit where 4 are needed (at 1B: 0.31-0.32 ms per
2048-token chunk, 1.3 ms of the step, on an H100). Here one program per row reads z, finds the row's max and sum of
exponentials, and writes g = (softmax(z) - onehot(t)) * scale in z's dtype: z read once (the default form, the row
held in registers; the loop form reads it twice, the second read meant to hit L2), g written once (0.104 ms a
chunk: benchmarks/results/h100/xent.json).

    z      [T, V]  bf16/fp16/fp32, rows contiguous (stride(1) == 1)
    t      [T]     int64, 0 <= t < V (the caller maps ignored targets to any valid index and gives them scale 0)
    scale  [T]     fp32 (1 / n on rows in the loss, 0 on ignored rows)
    -> g   [T, V]  z's dtype: (exp(z - lse) - [col == t]) * scale, the math in fp32
       nll [T]     fp32: lse - z[t] (the row's loss before any weighting)

Launch forms (launch settings, `benchmarks/xent.py` sweeps them): one block spanning the row (V <= block: the row
is held in registers between the reduction and the write; read once) or a loop over blocks of the row (two passes,
online max and sum per lane, then the write).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .overrides import env_config

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _xent_grad_kernel(z_ptr, t_ptr, scale_ptr, g_ptr, nll_ptr, V, stride_z, stride_g,
                      BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (int64: T x V passes 2^31 at 2048 x 32000 x 32)
    zb = z_ptr + row * stride_z
    gb = g_ptr + row * stride_g
    t = tl.load(t_ptr + row)
    scale = tl.load(scale_ptr + row)
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:  # the whole row in one tile: read once
        inside = cols < V
        z = tl.load(zb + cols, mask=inside, other=float("-inf")).to(tl.float32)
        m = tl.max(z, 0)
        e = tl.math.exp2((z - m) * LOG2E)  # [BLOCK]; 0 past V
        s = tl.sum(e, 0)
        g = (e * (1.0 / s) - (cols == t).to(tl.float32)) * scale
        tl.store(gb + cols, g.to(g_ptr.dtype.element_ty), mask=inside)
    else:  # pass 1: per lane a running max and a sum of exponentials rescaled to it; then the row's
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            z = tl.load(zb + c, mask=c < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_vec, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with nothing yet: no (-inf) - (-inf)
            s_vec = s_vec * tl.math.exp2((m_vec - m_safe) * LOG2E) + tl.math.exp2((z - m_safe) * LOG2E)
            m_vec = m_new
        m = tl.max(m_vec, 0)
        s = tl.sum(s_vec * tl.math.exp2((m_vec - m) * LOG2E), 0)
        inv_s = 1.0 / s
        for start in range(0, V, BLOCK):  # pass 2: the gradient (z again: an L2 hit when the row is recent)
            c = start + cols
            inside = c < V
            z = tl.load(zb + c, mask=inside, other=float("-inf")).to(tl.float32)
            g = (tl.math.exp2((z - m) * LOG2E) * inv_s - (c == t).to(tl.float32)) * scale
            tl.store(gb + c, g.to(g_ptr.dtype.element_ty), mask=inside)
    # the loss as (m - z[t]) + ln(s): the row's max stays in the logits' units, so a row far from 0 (|z| ~ 600) loses
    # nothing to the difference of two large numbers (a log2-scaled logsumexp minus z[t] lost ~4e-5 there)
    zt = tl.load(zb + t).to(tl.float32)
    tl.store(nll_ptr + row, (m - zt) + tl.math.log2(s) * LN2)


# ELAS_XENT_CONFIG='{"one_block": false, "block": 4096, "num_warps": 16}' sets the launch settings for a process
# (any of the three keys; benchmarks/xent.py prints the fastest of its sweep in this form)
_OVERRIDE = env_config("ELAS_XENT_CONFIG", ("one_block", "block", "num_warps"))


def _check_types(block, num_warps, one_block) -> None:
    """The launch settings' checks that do not depend on the row's length (ValueError naming the value)."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if block is not None and (not is_int(block) or block < 16 or block & (block - 1)):
        raise ValueError(f"softmax_xent_grad: block={block!r}: expected a power of two >= 16")
    if num_warps is not None and (not is_int(num_warps) or num_warps not in (1, 2, 4, 8, 16, 32)):
        raise ValueError(f"softmax_xent_grad: num_warps={num_warps!r}: expected a power of two 1-32")
    if one_block is not None and not isinstance(one_block, bool):
        raise ValueError(f"softmax_xent_grad: one_block={one_block!r}: expected true or false")


if _OVERRIDE:  # its values checked now: a bad one fails at import, naming the variable (the checks against the
    try:       # rows' length run where the model is built)
        _check_types(_OVERRIDE.get("block"), _OVERRIDE.get("num_warps"), _OVERRIDE.get("one_block"))
    except ValueError as e:
        raise ValueError(f"ELAS_XENT_CONFIG={os.environ['ELAS_XENT_CONFIG']!r}: {e}") from None


def launch_settings(v: int, block: int | None = None, num_warps: int | None = None, one_block: bool | None = None
                    ) -> tuple[bool, int, int]:
    """(one_block, block, num_warps) for rows of length v: one block spanning the row up to 32768 columns (the
    row held in registers: 16 warps hold 32768 fp32 values as 64 a thread), else 4096-column blocks of 8 warps;
    any argument given (else ELAS_XENT_CONFIG's) overrides its part (block: a power of two)."""
    block = block if block is not None else _OVERRIDE.get("block")
    num_warps = num_warps if num_warps is not None else _OVERRIDE.get("num_warps")
    one_block = one_block if one_block is not None else _OVERRIDE.get("one_block")
    _check_types(block, num_warps, one_block)
    if one_block is None:
        one_block = (block or triton.next_power_of_2(v)) >= v and triton.next_power_of_2(v) <= 32768
    if one_block and (block is not None and block < v or triton.next_power_of_2(v) > 32768):
        raise ValueError(f"softmax_xent_grad: one_block with rows of {v} and block={block}: one block must span "
                         f"the row (block >= {v}) and fit in registers (rows of at most 32768)")
    if one_block:
        block = block or triton.next_power_of_2(v)
    block = block or 4096
    return one_block, block, num_warps or (16 if block >= 16384 else 8 if block >= 2048 else 4)


def softmax_xent_grad(z: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, block: int | None = None,
                      num_warps: int | None = None, one_block: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (g [T, V] in z's dtype, nll [T] fp32); see the module docstring. block / num_warps / one_block: launch
    settings (launch_settings)."""
    if z.dim() != 2 or z.stride(1) != 1 or t.shape != z.shape[:1] or scale.shape != z.shape[:1]:
        raise ValueError(f"softmax_xent_grad: z {tuple(z.shape)} (stride {z.stride()}), t {tuple(t.shape)}, scale "
                         f"{tuple(scale.shape)}: expected z [T, V] with contiguous rows, t and scale [T]")
    n, v = z.shape
    one, blk, warps = launch_settings(v, block, num_warps, one_block)
    g = torch.empty((n, v), dtype=z.dtype, device=z.device)
    nll = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        _xent_grad_kernel[(n,)](z, t.contiguous(), scale.float().contiguous(), g, nll, v, z.stride(0), g.stride(0),
                                BLOCK=blk, ONE_BLOCK=one, num_warps=warps)
    return g, nll


__all__ = ["launch_settings", "softmax_xent_grad"]
