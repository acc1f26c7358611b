"""The blocks' RMSNorm backward: Inductor's kernels for autograd of (x passed on, rmsnorm(x) w) against our one-pass
kernel (kernels/cuda/rmsnorm.py), at the residual-stream shapes of 60M to 1B (batch 32 x 256, and 1B at 64), bf16
activations and an fp32 weight (as in elas's default mode), one process, CUDA-graph replays. Every result is checked
against the reference first. --sweep also times the kernel's launch knobs (programs per SM, rows per iteration,
warps, prefetch) per shape, each configuration checked, and reports the fastest beside the default, with the
ELAS_RMSNORM_CONFIG value that makes a process launch it (kernels/cuda/rmsnorm.py). --only TEXT keeps the shapes
whose description contains TEXT (e.g. --only "1B, batch 32": the sweep of one shape, ~1 min).

    PYTHONPATH=src python benchmarks/rmsnorm_bwd.py [OUT_DIR (default benchmarks/results/<gpu>)] [--sweep] [--only TEXT]

Writes OUT_DIR/rmsnorm_bwd.json and prints a table last.
"""
import json
import os
import sys
from pathlib import Path

import torch

SHAPES = [(8192, 2048, "1B, batch 32 x 256"), (16384, 2048, "1B, batch 64 x 256"), (8192, 1024, "350M, batch 32 x 256"),
          (8192, 768, "130M, batch 32 x 256"), (8192, 512, "60M, batch 32 x 256")]


def sweep_configs(d: int) -> list[dict]:
    """The launch knobs around the default: programs per SM, rows per iteration (half, once and twice the default
    tile), warps, the prefetching loop, dres loaded with x and dn (res_first), and the two row sums as one
    reduction (fused_sums): 216 settings. Programs per SM stop at 4, the default below d = 2048: at the 1B shape the
    former default's 98 registers (Triton 3.6) fit 2 programs of 8 warps an SM, so more only queue."""
    from elas.kernels.cuda.rmsnorm import rows_per_iteration
    r = rows_per_iteration(d)
    return [dict(per_sm=p, rows=rows, num_warps=w, prefetch=f, res_first=e, fused_sums=s) for p in (2, 3, 4)
            for rows in sorted({max(1, r // 2), r, 2 * r}) for w in (4, 8, 16) for f in (False, True)
            for e in (False, True) for s in (False, True)]


def registers(x, dn, dres, w, eps: float, c: dict) -> tuple[int | None, int | None]:
    """(registers a thread, programs an SM holds by registers and threads) of the kernel compiled for the launch
    settings c: a persistent launch of more programs per SM than fit runs a second, partial wave. (None, None)
    where this Triton's API does not tell."""
    from elas.kernels.cuda.rmsnorm import _rmsnorm_bwd_kernel
    import triton
    t, d = x.shape
    try:
        k = _rmsnorm_bwd_kernel.warmup(dn, x, dres, w, torch.empty_like(x), torch.empty(1, d, device=x.device),
                                       t, d, eps, HAS_RES=True, ROWS=c["rows"], BLOCK_D=triton.next_power_of_2(d),
                                       PREFETCH=c["prefetch"], RES_FIRST=c["res_first"],
                                       FUSED_SUMS=c["fused_sums"], num_warps=c["num_warps"], grid=(1,))
        k._init_handles()
        regs = int(k.n_regs)
    except Exception:
        return None, None
    props = torch.cuda.get_device_properties(x.device)
    file_regs = getattr(props, "regs_per_multiprocessor", None)  # (not in every torch)
    if not file_regs:
        return regs, None
    per_warp = -(-regs // 8) * 8 * 32  # registers are allocated a warp at a time, 8 a thread at a time
    fit = min(file_regs // (per_warp * c["num_warps"]), props.max_threads_per_multi_processor // (32 * c["num_warps"]))
    return regs, fit


def main() -> None:
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent / "src"))
    from elas.bench.timing import graph_ms
    from elas.kernels import reference as ref
    from elas.kernels.cuda.rmsnorm import launch_settings, rmsnorm_backward
    from elas.model.llama import RMSNorm
    argv = sys.argv[1:]
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        if i + 1 >= len(argv):
            sys.exit("--only needs a TEXT (a part of a shape's description, e.g. '1B, batch 32')")
        only = argv[i + 1]
        del argv[i:i + 2]
    shapes = [s for s in SHAPES if only is None or only in s[2]]
    if not shapes:
        sys.exit(f"--only {only!r}: no shape's description contains it; the shapes: "
                 + "; ".join(s[2] for s in SHAPES))
    args = [a for a in argv if a != "--sweep"]
    sweep = "--sweep" in argv
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out_dir = Path(args[0]) if args else here / "results" / gpu.split()[-1].lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, table = [], []
    for t, d, what in shapes:
        torch.manual_seed(0)
        x, dn, dres = (torch.randn(t, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        norm = RMSNorm(d).cuda()
        with torch.no_grad():
            norm.weight.add_(0.1 * torch.randn(d, device="cuda"))
        w = norm.weight.detach()
        xr = x.detach().requires_grad_()

        def unfused():  # what the compiled step runs: autograd of the ops, both uses of x, compiled by Inductor
            xr.grad, norm.weight.grad = None, None
            torch.autograd.backward([xr * 1, norm(xr)], [dres, dn])  # x * 1: x's residual use, as in a block
            return xr.grad, norm.weight.grad

        compiled = torch.compile(unfused)
        want_dx, want_dw = ref.rmsnorm_backward(dn, x, dres, w, norm.eps)
        for name, fn in (("inductor", compiled), ("ours", lambda: rmsnorm_backward(dn, x, dres, w, norm.eps))):
            dx, dw = fn()
            err = ((dx.float() - want_dx.float()).norm() / want_dx.float().norm()).item()
            err_w = ((dw.float() - want_dw.float()).norm() / want_dw.float().norm()).item()
            assert err < 1e-2 and err_w < 1e-3, f"{name}: dx error {err:.2e}, dw error {err_w:.2e}"
        ind = graph_ms(compiled)
        ours = graph_ms(lambda: rmsnorm_backward(dn, x, dres, w, norm.eps))
        moved = 4 * t * d * 2  # dn, x, dres read; dx written (bf16)
        row = {"T": t, "d": d, "what": what, "inductor_ms": ind, "ours_ms": ours, "speedup": ind / ours,
               "ours_settings": launch_settings(d),  # (ELAS_RMSNORM_CONFIG's where set)
               "ours_regs_fit": registers(x, dn, dres, w, norm.eps, launch_settings(d)),
               "ours_tb_s": moved / ours / 1e9}
        regs, fit = row["ours_regs_fit"]
        ours_is = "ours (ELAS_RMSNORM_CONFIG's settings)" if os.environ.get("ELAS_RMSNORM_CONFIG") else "ours"
        regs_fit = (f"{regs} registers, {fit} programs fit an SM" if fit else f"{regs} registers") if regs else \
            "registers not known"
        line = (f"{what} [{t}, {d}]: Inductor {ind:.4f} ms, {ours_is} {ours:.4f} ms ({ind / ours:.2f}x, "
                f"{moved / ours / 1e9:.2f} TB/s of the bytes it must move; {regs_fit}, "
                f"{row['ours_settings']['per_sm']} launched an SM)")
        if sweep:
            timed = []
            for c in sweep_configs(d):
                kw = dict(programs=c["per_sm"] * sms, rows=c["rows"], num_warps=c["num_warps"], prefetch=c["prefetch"],
                          res_first=c["res_first"], fused_sums=c["fused_sums"])
                try:
                    dx, dw = rmsnorm_backward(dn, x, dres, w, norm.eps, **kw)
                except Exception as e:  # e.g. out of shared memory or registers at 16 warps: reported, not fatal
                    timed.append({**c, "error": str(e).splitlines()[0][:120]})
                    continue
                err = ((dx.float() - want_dx.float()).norm() / want_dx.float().norm()).item()
                err_w = ((dw.float() - want_dw.float()).norm() / want_dw.float().norm()).item()
                assert err < 1e-2 and err_w < 1e-3, f"{c}: dx error {err:.2e}, dw error {err_w:.2e}"
                regs, fit = registers(x, dn, dres, w, norm.eps, c)
                timed.append({**c, "ms": graph_ms(lambda: rmsnorm_backward(dn, x, dres, w, norm.eps, **kw)),
                              "regs": regs, "programs_per_sm_fit": fit})
            best = min((c for c in timed if "ms" in c), key=lambda c: c["ms"])
            env_value = json.dumps({k: best[k] for k in ("per_sm", "rows", "num_warps", "prefetch", "res_first",
                                                         "fused_sums")})
            row.update(sweep=timed, best=best, env=f"ELAS_RMSNORM_CONFIG={env_value}")
            line += (f"; best of {len(timed)}: {best['ms']:.4f} ms ({moved / best['ms'] / 1e9:.2f} TB/s, "
                     f"{ours / best['ms']:.2f}x {ours_is}) with {best['per_sm']} programs per SM, rows {best['rows']}, "
                     f"{best['num_warps']} warps, prefetch {best['prefetch']}, res_first {best['res_first']}, "
                     f"fused_sums {best['fused_sums']}: "
                     f"ELAS_RMSNORM_CONFIG='{env_value}'")
        rows.append(row)
        table.append(line)
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__, "gpu": gpu, "cuda": torch.version.cuda,
           "elas_rmsnorm_config": os.environ.get("ELAS_RMSNORM_CONFIG")}
    (out_dir / "rmsnorm_bwd.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print("\n".join(table))


if __name__ == "__main__":
    main()
