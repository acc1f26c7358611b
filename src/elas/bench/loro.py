"""Cost of LORO's exact step per layer shape, per solver of the 2r x 2r SVD, and amortised per training step."""
from __future__ import annotations

import torch

from ..config import LORO_DEFAULTS, MODEL_PRESETS, model_preset
from ..optim.loro import SOLVERS, exact_update, exact_update_batched
from .timing import event_ms


def _directions(m: int, n: int, r: int, M, N, g, grad_rank: int | None):
    """DM [m, r], DN [n, r]: random, or (grad_rank) those of a gradient G [m, n] of that rank, DM = G N and
    DN = G^T M, as a trained layer's nearly low-rank gradient gives: the case where cuSOLVER's gesvda does not
    converge on the 7B model's cores (docs/loro.md)."""
    if grad_rank is None:
        return (torch.randn(s, r, device="cuda", generator=g) for s in (m, n))
    Ga = torch.randn(m, grad_rank, device="cuda", generator=g) / 10
    Gb = torch.randn(grad_rank, n, device="cuda", generator=g) / 10
    return Ga @ (Gb @ N), Gb.T @ (Ga.T @ M)


def bench_loro(sizes=("llama-60m", "llama-130m", "llama-350m", "llama-1b"), solvers=SOLVERS,
               qrs=("householder", "cholesky"), grad_rank: int | None = None, log=print, on_row=None) -> list[dict]:
    """Per solver of the 2r x 2r SVD: each layer shape one module at a time (the default QR), then every module of
    the model as the optimizer runs it (one batched call per shape), once per tall-QR method. grad_rank: the
    directions of a gradient of that rank instead of random ones (`_directions`). on_row(rows so far) after each
    solver's rows, so that a solver that fails leaves the ones measured before it."""
    for solver in solvers:
        if solver not in SOLVERS + ("auto",):
            raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS + ('auto',)}")
    if grad_rank is not None and grad_rank < 1:
        raise ValueError(f"invalid grad_rank {grad_rank}: expected a positive rank")
    for size in sizes:
        if f"{size}-elas" not in MODEL_PRESETS:
            raise ValueError(f"unknown size {size!r} for the LORO benchmark; expected one with an -elas preset")
    rows = []
    for size in sizes:
        cfg = model_preset(f"{size}-elas")
        d, f, r, L = cfg.d_model, cfg.ffn_width, cfg.rank, cfg.n_layers
        shapes = {(d, d, r): 4 * L, (f, d, r): L, (d, f, r): L}  # q,k,v,o; up [d_ff, d]; down [d, d_ff]
        k = LORO_DEFAULTS[size]["loro_exact_every"]
        for solver in solvers:
            total, worst = 0.0, 0.0
            for (m, n, rr), count in shapes.items():
                g = torch.Generator(device="cuda").manual_seed(m + n)
                M, N = (torch.randn(s, rr, device="cuda", generator=g) / s ** 0.5 for s in (m, n))
                DM, DN = _directions(m, n, rr, M, N, g, grad_rank)
                ms = event_ms(lambda: exact_update(M, N, DM, DN, 1e-3, solver))
                ref = exact_update(M.double().cpu(), N.double().cpu(), DM.double().cpu(), DN.double().cpu(), 1e-3)
                out = exact_update(M, N, DM, DN, 1e-3, solver)
                w_ref = ref[0] @ ref[1].T
                err = ((out[0].double().cpu() @ out[1].double().cpu().T - w_ref).norm() / w_ref.norm()).item()
                worst = max(worst, err)
                total += ms * count
                rows.append({"model": size, "m": m, "n": n, "rank": rr, "modules": count, "solver": solver,
                             "qr": "auto", "ms_per_module": ms, "rel_err_vs_fp64": err, "grad_rank": grad_rank})
            # the optimizer's way: every module of the model, one batched call per shape
            g = torch.Generator(device="cuda").manual_seed(1)
            pairs = []
            for (m, n, rr), count in shapes.items():
                for _ in range(count):
                    M, N = (torch.randn(s, rr, device="cuda", generator=g) / s ** 0.5 for s in (m, n))
                    pairs.append((M, N, *_directions(m, n, rr, M, N, g, grad_rank), 1e-3))
            for qr in qrs:
                batched = event_ms(lambda: exact_update_batched(pairs, solver, qr), iters=3, warmup=1)
                rows.append({"model": size, "modules": len(pairs), "solver": solver, "qr": qr, "batched_ms": batched,
                             "grad_rank": grad_rank,
                             "sequential_ms": total, "exact_every": k, "amortised_ms": batched / k})
                log(f"loro {size} {solver:>7} qr={qr:>11}: exact step {total:.1f} ms for {len(pairs)} modules one "
                    f"at a time, {batched:.1f} ms batched per shape ({batched / k:.2f} ms/step amortised over "
                    f"K={k}), worst rel. err {worst:.1e} (one at a time)")
            if on_row is not None:
                on_row(rows)
    return rows
