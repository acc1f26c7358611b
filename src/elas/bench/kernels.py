"""Kernel benchmarks: the 2:4 GEMM against cuBLAS and torch's cuSPARSELt op; the sparsifier against a copy.

All variants run in one process on the same data; GPU times are medians of CUDA-graph replays (host overhead
removed), host overhead is measured separately as the wall time of eager calls on a tiny problem.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from .timing import graph_ms

# ELAS FFN widths (d_ff, rounded to 128) and model widths of the 60M/130M/350M/1B presets
FFN_SHAPES = [(2176, 512), (3072, 768), (4224, 1024), (8192, 2048)]


def bench_gemm(m: int = 16384, shapes=None, log=print, on_row=None) -> list[dict]:
    """Rows for N in {256, 512, d_model, 4 d_model} at each ELAS d_ff. B's layout is the one the FFN uses: N a
    rank (256/512) -> the low-rank factor N2 [d_ff, r] row-major ("bN"); N a model width -> a Linear weight
    W2 [N, d_ff] read transposed ("bT"). on_row(rows so far) after each row (a shape that fails leaves the others)."""
    from ..kernels import reference
    from ..kernels.cuda import gemm
    from ..kernels.cuda.sparsify import relu2_sparsify24_packed
    gemm.load_extension()
    rows = []
    shapes = shapes or [(k, n, "bN" if n in (256, 512) and n < d else "bT")
                        for k, d in FFN_SHAPES for n in sorted({256, 512, d, 4 * d})]
    for k, n, lay in shapes:
        y1 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = relu2_sparsify24_packed(y1)
        a_dense = reference.relu2_sparsify24(y1)[0]  # the same matrix, dense
        bb = torch.randn((n, k) if lay == "bT" else (k, n), device="cuda", dtype=torch.bfloat16)
        b = bb.t() if lay == "bT" else bb
        want = a_dense.float() @ b.float()
        dense_ms = graph_ms(lambda: torch.mm(a_dense, b))
        alg = gemm.best_alg(m, k, n, lay == "bT", "ext")
        out = gemm.sparse_mm(a, b, alg=alg)
        err = ((out.float() - want).norm() / want.norm()).item()
        sparse_ms = graph_ms(lambda: gemm.sparse_mm(a, b, alg=alg))
        torch_alg0_ms = graph_ms(lambda: torch._cslt_sparse_mm(a.buffer, b, alg_id=0))
        torch_err = ((torch._cslt_sparse_mm(a.buffer, b, alg_id=0).float() - want).norm() / want.norm()).item()
        row = {"M": m, "K": k, "N": n, "b_layout": lay, "dtype": "bf16", "dense_ms": dense_ms,
               "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "alg_id": alg, "rel_err": err,
               "torch_cslt_alg0_ms": torch_alg0_ms, "torch_cslt_rel_err": torch_err}
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        log(f"gemm M={m} K={k} N={n} {lay}: dense {dense_ms:.4f} ms, sparse {sparse_ms:.4f} ms "
            f"(alg {alg}, x{row['speedup']:.2f}), torch cslt alg0 {torch_alg0_ms:.4f} ms, err {err:.1e}")
    return rows


def bench_host_overhead(calls: int = 2000, log=print) -> dict:
    """Wall time per eager call on a problem whose GPU time is negligible (M=K=N=64 .. 128)."""
    from ..kernels.cuda import gemm
    from ..kernels.cuda.sparsify import relu2_sparsify24_packed
    gemm.load_extension()
    m, k, n = 128, 128, 128
    a = relu2_sparsify24_packed(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    dense_a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    alg = gemm.best_alg(m, k, n, False, "ext")
    fns = {"elas_ext_us": lambda: gemm.sparse_mm(a, b, alg=alg),
           "elas_ext_raw_op_us": lambda: torch.ops.elas_cslt.mm(a.buffer.view(-1), b, m, k, alg),
           "torch_cslt_sparse_mm_us": lambda: torch._cslt_sparse_mm(a.buffer, b),
           "cublas_mm_us": lambda: torch.mm(dense_a, b)}
    res = {}
    for name, fn in fns.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls // 5):
                fn()
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - t) / (calls // 5) * 1e6)
        res[name] = statistics.median(samples)
    res["elas_ext_cpp_loop_us"] = torch.ops.elas_cslt.host_us(a.buffer.view(-1), b, m, k, alg, calls)
    res["workspace_bytes"] = torch.ops.elas_cslt.workspace(m, k, n, False, alg)
    log("host time per eager call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    return res


SPARSIFY_LAUNCHES = [(1, 4, 64), (2, 8, 64), (4, 8, 64), (2, 4, 128), (2, 8, 128), (4, 8, 128)]  # tiles, warps, rows


def bench_sparsify(m: int = 16384, ks=None, log=print, on_row=None) -> list[dict]:
    """The sparsifier and its backward at each K (the widest, 1B's, first), each form byte-checked and timed;
    on_row(rows) after each K (a long sweep cut off keeps what it finished)."""
    from ..kernels import reference
    from ..kernels.cuda.sparsify import relu2_sparsify24_packed
    rows = []
    for k in ks or sorted((kk for kk, _ in FFN_SHAPES), reverse=True):
        y1 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ms = graph_ms(lambda: relu2_sparsify24_packed(y1))
        copy_ms = graph_ms(lambda: y1.clone())
        ref_ms = graph_ms(lambda: reference.relu2_sparsify24(y1))
        y2s, mask = reference.relu2_sparsify24(y1)
        compress_ms = graph_ms(lambda: torch._cslt_compress(y2s))
        moved = m * k * 2 + m * k * 9 // 16 * 2 + m * k // 8  # read y1; write buffer + mask bits
        rows.append({"M": m, "K": k, "dtype": "bf16", "ms": ms, "tb_per_s": moved / ms / 1e9,
                     "copy_ms": copy_ms, "copy_tb_per_s": 2 * m * k * 2 / copy_ms / 1e9,
                     "reference_torch_ms": ref_ms, "torch_cslt_compress_ms": compress_ms})
        r = rows[-1]
        r["variants_ms"] = {}
        # each launch shape and word form (words=True) with and without the mask bits, timed only if its bytes equal
        # the default's on two inputs in turn (a part left unwritten then holds the other input's bytes)
        ys = [y1, torch.randn_like(y1)]
        wants = [[(p.buffer.view(torch.int16), p.mask_bits) for p in
                  (relu2_sparsify24_packed(y, write_bits=b) for y in ys)] for b in (True, False)]
        forms = [(f"tiles{t}_warps{w}_rows{rw}", dict(tiles=t, num_warps=w, rows=rw, words=False))
                 for t, w, rw in SPARSIFY_LAUNCHES if (k // 32) % t == 0]
        forms += [(f"words_groups{gr}_warps{w}", dict(words=True, groups=gr, num_warps=w))
                  for gr in (8, 16, 32) for w in (4, 8) if (k // 4) % gr == 0]
        for name, kw in forms:
            for bits, want in zip((True, False), wants):
                ok = True
                for y, (buf, mb) in zip(ys, want):
                    p = relu2_sparsify24_packed(y, write_bits=bits, **kw)
                    ok = ok and torch.equal(p.buffer.view(torch.int16), buf) and torch.equal(p.mask_bits, mb)
                    del p
                key = name + ("" if bits else "_nobits")
                if ok:
                    r["variants_ms"][key] = graph_ms(lambda: relu2_sparsify24_packed(y1, write_bits=bits, **kw))
                else:  # other bytes: a bug, not a timing
                    r.setdefault("mismatched", []).append(key)
        r["backward"] = _backward_sweep(y1, log)
        if on_row is not None:
            on_row(rows)
        log(f"sparsify M={m} K={k}: {ms:.4f} ms = {r['tb_per_s']:.2f} TB/s (copy {r['copy_tb_per_s']:.2f} TB/s); "
            f"torch reference {ref_ms:.3f} ms; _cslt_compress alone {compress_ms:.3f} ms; variants "
            + ", ".join(f"{v}: {x:.4f}" for v, x in r["variants_ms"].items()))
    return rows


SSTE_LAUNCHES = [(1, 4), (2, 4), (2, 8), (4, 8)]  # tiles, warps
SSTE_SHAPES = [(8192, 2048), (2048, 8192)]  # the 1B FFN's up and down weights [d_out, d_in]


def bench_sste(shapes=None, log=print, on_row=None) -> list[dict]:
    """S-STE's per-step weight packing (kernels/cuda/sste.py): beta * S_soft(W) and S(W^T) packed in the SM90
    layout, per weight shape, dtype (bf16 parameters of the elas mode; fp32 masters) and direction; TB/s of the
    bytes it must move (read W, write the packed buffer and the mask bits) against a copy of W; each launch shape
    (tiles, warps) and the variant without mask bits, timed only if its buffer is byte-identical to the
    default's. on_row(rows so far) after each row."""
    from ..kernels.cuda.sste import soft_threshold24_packed
    rows = []
    beta = torch.tensor(1.1, device="cuda")
    for r, c in shapes or SSTE_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            w = (torch.randn(r, c, device="cuda") * 0.02).to(dtype)
            copy_ms = graph_ms(lambda: w.clone())
            for transpose in (False, True):
                m, k = (c, r) if transpose else (r, c)
                ms = graph_ms(lambda: soft_threshold24_packed(w, beta, transpose))
                moved = r * c * w.element_size() + m * k * 9 // 16 * 2 + m * k // 8
                row = {"R": r, "C": c, "dtype": str(dtype).replace("torch.", ""), "transpose": transpose, "ms": ms,
                       "tb_per_s": moved / ms / 1e9, "copy_tb_per_s": 2 * w.numel() * w.element_size() / copy_ms / 1e9,
                       "variants_ms": {}}
                want = soft_threshold24_packed(w, beta, transpose).buffer.view(torch.int16)
                for t, wp in SSTE_LAUNCHES:
                    for bits in (True, False):
                        kw = dict(tiles=t, num_warps=wp, write_bits=bits)
                        if (k // 32) % t == 0 and torch.equal(
                                soft_threshold24_packed(w, beta, transpose, **kw).buffer.view(torch.int16), want):
                            row["variants_ms"][f"tiles{t}_warps{wp}" + ("" if bits else "_nobits")] = graph_ms(
                                lambda: soft_threshold24_packed(w, beta, transpose, **kw))
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                log(f"sste pack {r}x{c} {row['dtype']}{' (W^T)' if transpose else ''}: {ms:.4f} ms = "
                    f"{row['tb_per_s']:.2f} TB/s (copy {row['copy_tb_per_s']:.2f}); variants "
                    + ", ".join(f"{v}: {x:.4f}" for v, x in row["variants_ms"].items()))
    return rows


def _backward_sweep(y1: torch.Tensor, log=print) -> dict:
    """The backward pointwise kernel (sparsify.relu2_sparse24_backward) on y1 [M, K] in its three uses: ste (from
    y1), mask, mask + the 95/5 split (5% dense features): ms and TB/s of the default launch, and ms of each grid
    form (rows, warps) and (mask mode) word form, whose outputs are byte-identical to the default's; `best` names
    the fastest (without the split, with the ELAS_BWD24_CONFIG value that launches it: one variable for ste and
    mask). A form is checked on two inputs in turn, its outputs freed in between, so that a form that leaves part
    of an output unwritten meets the other input's bytes in the memory the allocator hands it back, not the right
    ones."""
    from ..kernels import reference
    from ..kernels.cuda.sparsify import bwd_settings, relu2_sparse24_backward, relu2_sparsify24_packed
    m, k = y1.shape
    n_dense = reference.n_dense_features(k, 0.05)
    slots = torch.full((k,), -1, dtype=torch.int32, device=y1.device)
    slots[torch.randperm(k, device=y1.device)[:n_dense]] = torch.arange(n_dense, dtype=torch.int32, device=y1.device)

    def inputs(y: torch.Tensor) -> dict:  # each use's arguments, and its bytes per element of [M, K]: reads,
        a, dy2 = relu2_sparsify24_packed(y), torch.randn_like(y)  # then writes (packed 9/16 of bf16, bits 1/8)
        return {"ste": ((dy2, None, y, None, 0), 2 + 2 + 2 + 2),
                "mask": ((dy2, a, None, None, 0), 1 + 1 / 8 + 2 + 2 + 2 + 1),
                "mask_split": ((dy2, a, None, slots, n_dense), 1 + 1 / 8 + 2 + 1 + 2 * 9 / 8 + 2 * 2 * n_dense / k)}
    sets = [inputs(y1), inputs(torch.randn_like(y1))]

    def outputs(g) -> list[torch.Tensor]:  # every output's bytes (a Packed24 by its buffer)
        return [(t.buffer if hasattr(t, "buffer") else t).view(torch.int16) for t in g if t is not None]

    out = {}
    for use, (args, per_elem) in sets[0].items():
        wants = [outputs(relu2_sparse24_backward(*s[use][0])) for s in sets]  # (kept: never handed out again)
        ms = graph_ms(lambda: relu2_sparse24_backward(*args))
        split = args[3] is not None
        rows, warps, words = bwd_settings(split)
        row = {"ms": ms, "tb_per_s": m * k * per_elem / ms / 1e9, "rows": rows, "warps": warps,
               "words": words and use == "mask", "variants_ms": {}}  # (its only word form)
        grid = {} if split else {"words": False}  # (the grid form, whatever ELAS_BWD24_CONFIG says)
        forms = [(f"rows{rw}_warps{w}", dict(rows=rw, num_warps=w, **grid)) for rw in (64, 128) for w in (4, 8)]
        if use == "mask":  # the word form (a group's four bf16 as one int64; mask mode only)
            forms += [(f"rows{rw}_warps{w}_words", dict(rows=rw, num_warps=w, words=True))
                      for rw in (64, 128) for w in (4, 8)]
        for name, kw in forms:
            ok = True
            for s, want in zip(sets, wants):
                got = outputs(relu2_sparse24_backward(*s[use][0], **kw))
                ok = ok and len(got) == len(want) and all(torch.equal(g, x) for g, x in zip(got, want))
                del got
            if ok:
                row["variants_ms"][name] = graph_ms(lambda: relu2_sparse24_backward(*args, **kw))
            else:  # a form that computes other bytes is a bug, not a timing: say so in the JSON
                row.setdefault("mismatched", []).append(name)
        if row["variants_ms"]:
            best = min(row["variants_ms"], key=row["variants_ms"].get)
            row["best"] = {"form": best, "ms": row["variants_ms"][best], "vs_default": ms / row["variants_ms"][best]}
            if not split:  # (the variable sets the launch without the split only)
                row["best"]["env"] = "ELAS_BWD24_CONFIG=" + json.dumps(dict(forms)[best])
        out[use] = row
        b = row.get("best", {})
        log(f"  backward {use} M={m} K={k}: {ms:.4f} ms = {row['tb_per_s']:.2f} TB/s"
            + (f"; fastest {b['form']} {b['ms']:.4f} ms ({b['vs_default']:.2f}x"
               + (": ELAS_BWD24_CONFIG='" + b['env'].split('=', 1)[1] + "'" if 'env' in b else '') + ")"
               if b else "") + (f"; MISMATCHED {row['mismatched']}" if "mismatched" in row else ""))
    return out


# (q, d_ff) of the d_ff-wide GEMMs: the ELAS presets (q = rank) and 1B full-rank (q = d_model)
EPILOGUE_SHAPES = [(128, 2176), (256, 3072), (256, 4224), (512, 8192), (2048, 8192)]
EPILOGUE_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                    (128, 64, 64, 4, 4), (64, 256, 64, 8, 3)]  # (BM, BN, BK, warps, stages)


def bench_epilogue(m: int = 8192, shapes=None, configs=None, log=print, on_row=None) -> list[dict]:
    """The fused GEMM-epilogue kernels (kernels/cuda/epilogue.py) against cuBLAS + the separate kernels, one row
    per (kernel, shape), over a sweep of tile configurations, each checked before it is timed (and kept only if
    it passes):
      up:    h1 @ wu^T then the sparsifier, against the fused kernel with y1 written (ste) and without (mask);
             check: the packed bytes equal the sparsifier's on the fused kernel's own y1;
      dgrad: dh2 @ wd^T then the ste backward kernel (from y1), against the fused kernel; check: y2s byte-exact
             (it does not depend on dy2), dy1 within 1% of the separate kernels' (dy2's accumulation order).
    on_row(rows so far) after each row."""
    from ..kernels.cuda.epilogue import dgrad_relu2_ste, up_relu2_sparsify24
    from ..kernels.cuda.sparsify import relu2_sparse24_backward, relu2_sparsify24_packed
    rows = []
    for q, n in shapes or EPILOGUE_SHAPES:
        a = torch.randn(m, q, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n, q, device="cuda") / q ** 0.5).to(torch.bfloat16)
        y1 = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        c = a @ w.T
        separate = {"up": lambda: relu2_sparsify24_packed(a @ w.T),
                    "dgrad": lambda: relu2_sparse24_backward(a @ w.T, None, y1)}
        for kernel in ("up", "dgrad"):
            cublas_ms = graph_ms(lambda: a @ w.T)
            separate_ms = graph_ms(separate[kernel])
            variants = {}
            for bm, bn, bk, wp, st in configs or EPILOGUE_CONFIGS:
                name = f"bm{bm}_bn{bn}_bk{bk}_w{wp}_s{st}"
                if m % bm or n % bn or q % bk:
                    continue
                kw = dict(bm=bm, bn=bn, bk=bk, num_warps=wp, num_stages=st)
                try:
                    if kernel == "up":
                        fy1, fp = up_relu2_sparsify24(a, w, True, **kw)
                        exact = torch.equal(fp.buffer.view(torch.int16),
                                            relu2_sparsify24_packed(fy1).buffer.view(torch.int16))
                        err = ((fy1.float() - c.float()).norm() / c.float().norm()).item()
                        v = {"ms": graph_ms(lambda: up_relu2_sparsify24(a, w, True, **kw)),
                             "no_y1_ms": graph_ms(lambda: up_relu2_sparsify24(a, w, False, **kw))}
                    else:
                        y2s, dy1 = dgrad_relu2_ste(a, w, y1, **kw)
                        g = relu2_sparse24_backward(c, None, y1)  # on cuBLAS's dy2: equal up to its rounding
                        exact = torch.equal(y2s, g.y2s)  # y2s does not depend on dy2: byte-exact
                        err = ((dy1.float() - g.dy1.float()).norm() / g.dy1.float().norm()).item()
                        v = {"ms": graph_ms(lambda: dgrad_relu2_ste(a, w, y1, **kw))}
                    variants[name] = {**v, "exact": exact, "rel_err_vs_separate": err}
                except Exception as e:  # a configuration that does not compile or fit (shared memory) is recorded
                    variants[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            ok = {k: v for k, v in variants.items() if "ms" in v and v["exact"] and v["rel_err_vs_separate"] < 1e-2}
            best = min(ok, key=lambda k: ok[k]["ms"]) if ok else None
            row = {"kernel": kernel, "M": m, "K": q, "N": n, "dtype": "bf16", "cublas_ms": cublas_ms,
                   "separate_ms": separate_ms, "variants": variants, "best": best}
            if best:
                row.update(fused_ms=ok[best]["ms"], speedup=separate_ms / ok[best]["ms"])
                if "no_y1_ms" in ok[best]:
                    row.update(fused_no_y1_ms=ok[best]["no_y1_ms"], speedup_no_y1=separate_ms / ok[best]["no_y1_ms"])
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            log(f"{kernel} M={m} K={q} N={n}: cuBLAS {cublas_ms:.4f}, separate {separate_ms:.4f} ms; " + (
                f"fused {row['fused_ms']:.4f} ms (x{row['speedup']:.2f}) [{best}]" if best
                else "no fused configuration ran exactly"))
    return rows


BLAS_ENV = ("CUBLAS_", "CUBLASLT_", "TORCH_BLAS_", "ELAS_CUBLAS_")  # (prefixes of environment variables)


def environment() -> dict:
    import platform
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"),
           "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}  # None: torch's default (kernels/cublas.py)
    # the kernels' launch settings overridden for this process (kernels/cuda/overrides.py): a row timed under one
    # says so
    env.update({k.lower(): v for k, v in sorted(os.environ.items())
                if k.startswith("ELAS_") and k.endswith("_CONFIG") and v})
    # the other cuBLAS / cuBLASLt settings a process reads once (run_gpu.sh blas_env exports any VAR=VALUE on top
    # of the default, e.g. CUBLASLT_WORKSPACE_SIZE=0): a row timed under one says so
    env.update({k.lower(): v for k, v in sorted(os.environ.items())
                if k.startswith(BLAS_ENV) and k != "CUBLAS_WORKSPACE_CONFIG"})
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cusparselt"] = torch.backends.cusparselt.version()
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env
