"""Triton kernel: an RMSNorm's backward as one pass, dx and the weight gradient together.

Compiled, the step's norm backwards are two Inductor kernels per norm: dx (a reduction along each row) and dw (a
reduction over rows), each reading dn and x: 3.0 of the 1B dense step's 69 ms (benchmarks/results/h200/
step_act24_profile.json, 48 norms). Here each program walks its rows, a few at a time, writes dx and keeps dw's
partial sum in registers; the partial sums [programs, d] fp32 are added by one small reduction after it. dn and x
are read once.

Shapes: dn, x, dres (optional) [T, d], one dtype each (bf16 or fp32), contiguous; w [d]. dx [T, d] in x's dtype
(dres added: the residual path's gradient; added outside an opaque kernel it would cost a pass), dw [d] in
w's dtype. Math in fp32 as reference.rmsnorm_backward; dw's summation order differs (a float tolerance).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .overrides import env_config


def rows_per_iteration(d: int) -> int:
    """Rows a program handles at once: 4096 elements per tile (2 rows at d = 2048), so that a thread of 4 warps
    holds 32 of each operand and several row reductions are in flight."""
    return max(1, 4096 // triton.next_power_of_2(d))


# ELAS_RMSNORM_CONFIG='{"per_sm": 2, "rows": 4, "num_warps": 8, "prefetch": true, "res_first": true, "fused_sums":
# true}' sets the launch settings for a process (any of the keys; benchmarks/rmsnorm_bwd.py --sweep prints the fastest
# of its sweep in this form)
_KNOBS = ("per_sm", "rows", "num_warps", "prefetch", "res_first", "fused_sums")
_OVERRIDE = env_config("ELAS_RMSNORM_CONFIG", _KNOBS)


def launch_settings(d: int, per_sm: int | None = None, rows: int | None = None, num_warps: int | None = None,
                    prefetch: bool | None = None, res_first: bool | None = None,
                    fused_sums: bool | None = None) -> dict:
    """{per_sm, rows, num_warps, prefetch, res_first, fused_sums} for rows of d elements: rows_per_iteration(d)
    rows a tile and 4 warps; from d = 2048 the fastest of benchmarks/rmsnorm_bwd.py's 216-setting sweep at the 1B
    shape on an H100 (0.054 ms against 0.072 for the settings below; 255 registers, no spills: 2 programs fit an
    SM, so 2 are launched an SM, the next tile prefetched, dres loaded with x and dn, the two row sums as one
    reduction); below d = 2048 (not swept yet) 4 programs per SM, no prefetch, dres loaded after the reductions,
    the two sums one after the other. Any argument given (else ELAS_RMSNORM_CONFIG's) overrides its part.
    ValueError for a bad one."""
    given = dict(per_sm=per_sm, rows=rows, num_warps=num_warps, prefetch=prefetch, res_first=res_first,
                 fused_sums=fused_sums)
    c = {k: v if v is not None else _OVERRIDE.get(k) for k, v in given.items()}
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if c["per_sm"] is not None and (not is_int(c["per_sm"]) or c["per_sm"] < 1):
        raise ValueError(f"rmsnorm_backward: per_sm={c['per_sm']!r}: expected an integer >= 1 (programs per SM)")
    if c["rows"] is not None and (not is_int(c["rows"]) or not 1 <= c["rows"] <= 64 or c["rows"] & (c["rows"] - 1)):
        raise ValueError(f"rmsnorm_backward: rows={c['rows']!r}: expected a power of two 1-64 (rows a tile)")
    if c["num_warps"] is not None and (not is_int(c["num_warps"]) or c["num_warps"] not in (1, 2, 4, 8, 16, 32)):
        raise ValueError(f"rmsnorm_backward: num_warps={c['num_warps']!r}: expected a power of two 1-32")
    for k in ("prefetch", "res_first", "fused_sums"):
        if c[k] is not None and not isinstance(c[k], bool):
            raise ValueError(f"rmsnorm_backward: {k}={c[k]!r}: expected true or false")
    swept = d >= 2048
    default = {"per_sm": 2 if swept else 4, "rows": rows_per_iteration(d), "num_warps": 4, "prefetch": swept,
               "res_first": swept, "fused_sums": swept}
    return {k: default[k] if c[k] is None else c[k] for k in _KNOBS}


if _OVERRIDE:  # its values checked now (none depends on d): a bad one fails at import, naming the variable
    try:
        launch_settings(2048)
    except ValueError as e:
        raise ValueError(f"ELAS_RMSNORM_CONFIG={os.environ['ELAS_RMSNORM_CONFIG']!r}: {e}") from None


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _rows_math(x, dn, w, D, eps, FUSED_SUMS: tl.constexpr):
    """dx (without the residual) and this tile's dw term for ROWS rows: x, dn [ROWS, BLOCK_D] fp32; w [BLOCK_D].
    FUSED_SUMS: the two row sums as one reduction of pairs, sum(g xh) taken as rstd sum(g x), so that the second
    does not wait on the first (one round of barriers across the warps instead of two; fp32 rounding differs)."""
    if FUSED_SUMS:
        g = dn * w[None, :]
        ss, gx = tl.reduce((x * x, g * x), 1, _add_pairs)  # [ROWS] each
        rstd = tl.rsqrt(ss / D + eps)
        xh = x * rstd[:, None]
        c = gx * rstd / D
    else:
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)  # [ROWS]
        xh = x * rstd[:, None]
        g = dn * w[None, :]
        c = tl.sum(g * xh, 1) / D
    return rstd[:, None] * (g - xh * c[:, None]), tl.sum(dn * xh, 0)


@triton.jit
def _rmsnorm_bwd_kernel(dn_ptr, x_ptr, dres_ptr, w_ptr, dx_ptr, part_ptr, T, D, eps,
                        HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr,
                        RES_FIRST: tl.constexpr, FUSED_SUMS: tl.constexpr):
    # RES_FIRST: dres is loaded with x and dn, before the row reductions (one wait on memory a tile, three
    # operands' registers held through them), not after them (a second wait, fewer registers)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    in_d = cols < D
    w = tl.load(w_ptr + cols, mask=in_d, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    stride = nprog * ROWS
    if PREFETCH:
        # the next tile's loads are issued before this tile's reductions, so that a program keeps a tile of
        # reads in flight while it computes (twice the registers: fewer programs fit on an SM)
        rows = pid * ROWS + tl.arange(0, ROWS)
        inside = (rows < T)[:, None] & in_d[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=inside, other=0.0)
        dn = tl.load(dn_ptr + off, mask=inside, other=0.0)
        if HAS_RES and RES_FIRST:
            r = tl.load(dres_ptr + off, mask=inside, other=0.0)
        for start in range(pid * ROWS, T, stride):
            nrows = start + stride + tl.arange(0, ROWS)
            ninside = (nrows < T)[:, None] & in_d[None, :]
            noff = nrows.to(tl.int64)[:, None] * D + cols[None, :]
            nx = tl.load(x_ptr + noff, mask=ninside, other=0.0)
            ndn = tl.load(dn_ptr + noff, mask=ninside, other=0.0)
            if HAS_RES and RES_FIRST:
                nr = tl.load(dres_ptr + noff, mask=ninside, other=0.0)
            dx, dw = _rows_math(x.to(tl.float32), dn.to(tl.float32), w, D, eps, FUSED_SUMS)
            if HAS_RES:
                if RES_FIRST:
                    dx += r.to(tl.float32)
                    r = nr
                else:
                    dx += tl.load(dres_ptr + off, mask=inside, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=inside)
            acc += dw  # masked rows load zeros: they add nothing
            x, dn, off, inside = nx, ndn, noff, ninside
    else:
        for start in range(pid * ROWS, T, stride):
            rows = start + tl.arange(0, ROWS)
            inside = (rows < T)[:, None] & in_d[None, :]
            off = rows.to(tl.int64)[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + off, mask=inside, other=0.0).to(tl.float32)
            dn = tl.load(dn_ptr + off, mask=inside, other=0.0).to(tl.float32)
            if HAS_RES and RES_FIRST:
                r = tl.load(dres_ptr + off, mask=inside, other=0.0)
            dx, dw = _rows_math(x, dn, w, D, eps, FUSED_SUMS)
            if HAS_RES:
                if RES_FIRST:
                    dx += r.to(tl.float32)
                else:
                    dx += tl.load(dres_ptr + off, mask=inside, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=inside)
            acc += dw  # masked rows load zeros: they add nothing
    tl.store(part_ptr + pid.to(tl.int64) * D + cols, acc, mask=in_d)


def rmsnorm_backward(dn: torch.Tensor, x: torch.Tensor, dres: torch.Tensor | None, w: torch.Tensor, eps: float,
                     programs: int | None = None, rows: int | None = None, num_warps: int | None = None,
                     prefetch: bool | None = None, res_first: bool | None = None, fused_sums: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [.., d] in x's dtype, dw [d] in w's dtype); see the module docstring. programs (how many programs
    share the rows; default launch_settings' per_sm on each SM of a GPU, 8 on the CPU), rows (a power of two),
    num_warps, prefetch (the next tile loaded while this one is reduced), res_first (dres loaded with x and dn)
    and fused_sums (the two row sums as one reduction) are the launch's tuning knobs, defaults from launch_settings
    (benchmarks/rmsnorm_bwd.py sweeps them)."""
    d = x.shape[-1]
    if dn.shape != x.shape or (dres is not None and dres.shape != x.shape) or w.shape != (d,):
        raise ValueError(f"rmsnorm_backward: dn {tuple(dn.shape)}, x {tuple(x.shape)}, dres "
                         f"{None if dres is None else tuple(dres.shape)}, w {tuple(w.shape)}: expected [.., {d}] x3 "
                         f"and [{d}]")
    c = launch_settings(d, rows=rows, num_warps=num_warps, prefetch=prefetch, res_first=res_first,
                        fused_sums=fused_sums)
    x2, dn2 = x.reshape(-1, d).contiguous(), dn.reshape(-1, d).contiguous()
    t = x2.shape[0]
    if programs is None:
        programs = c["per_sm"] * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    programs = max(1, min(programs, triton.cdiv(t, c["rows"])))
    dx = torch.empty_like(x2)
    part = torch.empty(programs, d, dtype=torch.float32, device=x.device)
    res = dres.reshape(-1, d).contiguous() if dres is not None else x2  # not read without HAS_RES
    _rmsnorm_bwd_kernel[(programs,)](dn2, x2, res, w.contiguous(), dx, part, t, d, eps, HAS_RES=dres is not None,
                                     ROWS=c["rows"], BLOCK_D=triton.next_power_of_2(d), PREFETCH=c["prefetch"],
                                     RES_FIRST=c["res_first"], FUSED_SUMS=c["fused_sums"],
                                     num_warps=c["num_warps"])
    return dx.reshape(x.shape), part.sum(0).to(w.dtype)


__all__ = ["launch_settings", "rmsnorm_backward", "rows_per_iteration"]
