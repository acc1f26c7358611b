"""A dense CUTLASS sm90 GEMM with relu(y1)^2 in its epilogue (src/elas/kernels/cuda/cutlass/relu2_gemm.cu, our
instantiations) against cuBLAS + the separate ReLU^2 kernel at the 1B up-projection shapes, one process, bf16: does a GEMM with
cuBLAS's mainloop rate and the pointwise work in its epilogue pay? The fast-step issue's 1.2x needs the ReLU^2
(3.8 ms of a 1B step) inside the GEMMs; the Triton form lost to cuBLAS's mainloop (docs/performance.md). Needs a
Hopper GPU and the library built by `src/elas/kernels/cuda/cutlass/build.sh relu2` (on any machine; carry
build/cutlass_relu2).

    PYTHONPATH=src python benchmarks/cutlass_relu2.py [LIB (default build/cutlass_relu2/libelas_cutlass_relu2.so)] \
        [OUT_DIR]

For each shape: cuBLAS's y1 = h1 @ wu^T; the separate y2 = relu(y1)^2 (compiled by Inductor, as the trainer's
blocks run it); every CUTLASS configuration without an epilogue (mode 0: its mainloop against cuBLAS's), with
the ReLU^2 (mode 1: y1 never written), and as the backward's dy2 GEMM with dy1 = 2 sqrt(y2) dy2 in its epilogue
(mode 2: dy2 never written; against cuBLAS + the unfused 2 r dy2 kernel; mode 3 the same with y2 through the
epilogue's TMA pipeline), and the 2:4 FFN's straight-through backward (ELAS, ste mode: act24.cutlass=true)
against cuBLAS + the Triton backward kernel it runs today: mode 4 writes dy1 = 2 relu(y1) dy2 from the epilogue
(y2s then needs the dense sparsifier's pass, timed beside it), mode 5 writes dy1 and y2s = 2:4(relu(y1)^2) (y1
read once, dy2 never written). Every output is checked against the unfused result before it is timed; mode 5's
y2s does not depend on the GEMM, so it must equal the Triton kernel's bit for bit. Mode 6 is the forward of the same
path: y1 and the packed 2:4(relu(y1)^2) (values and SM90 metadata) from the up-projection's epilogue, against cuBLAS
+ the Triton sparsifier; its buffer must equal the sparsifier's on its own y1 byte for byte. Modes 7 and 8 are the
mask mode's (Haziza's gradient) forward and backward: y2s dense and packed from the up-projection, and dy1 = 2
sqrt(y2s) dy2 dense and packed with y2s's choice from the dy2 GEMM, against what that mode runs today (cuBLAS + the
Triton sparsifier writing the packed y2s and mask bits; cuBLAS + the Triton mask-mode backward); each packed
buffer must be the packing of the kernel's own output byte for byte.
Last, the q/k/v up-projection with the rotary embedding in its epilogue (model.rope_kernel=cutlass) against
cuBLAS's GEMM + the rotation as Inductor compiles apply_rope, at the 1B attention shapes (checked against the
reference first).
Times: CUDA-graph replays (no host overhead) where the capture works, else the library's event loop, which is
said in the row; each CUTLASS time with the SM clock and power NVML read meanwhile (`bench step` records the
step's: an instruction-bound epilogue slows with the clock). Writes OUT_DIR/cutlass_relu2.json and prints a table last. To narrow a run: CUTLASS_MODES (mode
numbers, e.g. "0,6"), CUTLASS_SHAPES (indices into SHAPES, e.g. "0"), CUTLASS_ROPE=0 (no rope rows). Each mode's
best configuration is timed again after an L2 flush (`cold_ms`; CUTLASS_COLD=0 leaves it out): with the clock
readings, the two explanations of a kernel slower in the step than alone.
"""
import ctypes
import json
import sys
from pathlib import Path

import torch

# M (tokens), N (d_ff), K (the up-projection's input width): y1 [M, N] = h1 [M, K] @ wu^T, wu [N, K]
SHAPES = [(8192, 8192, 512, "1B low-rank up-projection (r = 512), batch 32 x 256"),
          (16384, 8192, 512, "1B low-rank up-projection, batch 64 x 256"),
          (8192, 8192, 2048, "1B full-rank up-projection (d 2048), batch 32 x 256"),
          (8192, 3072, 256, "130M low-rank up-projection (r = 256)")]
# grad_tma: y2 through the epilogue's TMA pipeline; ste_*: the straight-through backward, y1 through TMA
MODES = {0: "plain", 1: "relu2", 2: "grad", 3: "grad_tma", 4: "ste_grad", 5: "ste_grad_y2s", 6: "relu2_pack24",
         7: "relu2s_pack24", 8: "grad_pack24"}


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.elas_cutlass_dense_config_name.restype = ctypes.c_char_p
    lib.elas_cutlass_dense_workspace.restype = ctypes.c_longlong
    lib.elas_cutlass_dense_workspace.argtypes = [ctypes.c_int] * 5
    tail = [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_float)]
    lib.elas_cutlass_dense_mm.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4 + tail
    if hasattr(lib, "elas_cutlass_dense_mm_aux"):  # modes 4-5 (a library built before them lacks it)
        lib.elas_cutlass_dense_mm_aux.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + tail
    return lib


def mismatch(got: torch.Tensor, want: torch.Tensor) -> dict:
    """How far got is from want (bf16): the share of differing elements and the largest relative difference. A GEMM
    whose fp32 accumulation runs in another order rounds some y1 to the neighbouring bf16 value; more than that
    is an error."""
    diff = got.float() - want.float()
    rel = (diff.abs() / want.float().abs().clamp_min(1e-30)).max().item()
    return {"differ_frac": (diff != 0).float().mean().item(), "max_rel": rel,
            "rel_fro": (diff.norm() / want.float().norm().clamp_min(1e-30)).item()}


def main() -> None:
    here = Path(__file__).resolve().parent
    lib_path = sys.argv[1] if len(sys.argv) > 1 else "build/cutlass_relu2/libelas_cutlass_relu2.so"
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "results" / "h200"
    if not Path(lib_path).is_file():
        sys.exit(f"no library at {lib_path}: build it with src/elas/kernels/cuda/cutlass/build.sh relu2")
    lib = load(lib_path)
    configs = [lib.elas_cutlass_dense_config_name(c).decode() for c in range(lib.elas_cutlass_dense_configs())]
    print(f"{len(configs)} configurations: {', '.join(configs)}")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (Hopper)")
    sys.path.insert(0, str(here.parent / "src"))
    import os
    os.environ["ELAS_CUTLASS_RELU2"] = str(Path(lib_path).resolve())  # the package's wrapper loads the same library
    from elas.bench.timing import Clocks, graph_ms
    from elas.model.ffn import relu2
    from elas.kernels.cuda.sparsify import relu2_sparse24_backward, relu2_sparsify24_dense, relu2_sparsify24_packed
    from elas.kernels.cuda.cutlass_relu2 import skipped
    from elas.kernels import reference as ref
    from elas.kernels.packed import pack24
    has_aux = hasattr(lib, "elas_cutlass_dense_mm_aux")
    skip = skipped()  # forms that faulted here (benchmarks/cutlass_probe.py): not launched, said in the table
    pick = lambda var, all_: [int(x) for x in os.environ[var].split(",")] if os.environ.get(var) else all_  # noqa: E731
    modes = {m: n for m, n in MODES.items() if (has_aux or m < 4) and m not in skip and m in pick("CUTLASS_MODES", MODES)}
    shapes = [SHAPES[i] for i in pick("CUTLASS_SHAPES", range(len(SHAPES)))]
    if skip:
        print(f"skipped (ELAS_CUTLASS_SKIP): {sorted(map(str, skip))}")
    stream = lambda: ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)  # noqa: E731
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "cutlass_relu2.json"
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
           "cutlass": "4.2.0 (pip nvidia-cutlass headers)"}
    act = torch.compile(relu2)  # the separate kernels as Inductor compiles them in the trainer's blocks
    grad = torch.compile(lambda dy2, r: 2 * r * dy2)
    rows, table = [], []
    cold = None
    if os.environ.get("CUTLASS_COLD", "1") != "0":
        # a step's kernel finds its weights in HBM and the previous kernels' outputs in L2, where a loop of one
        # kernel finds its operands in L2: time the best configuration of each mode after writing a buffer twice
        # the L2's size, less the time of that write alone (CUTLASS_COLD=0 leaves it out)
        flush = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device="cuda")
        flush_ms = graph_ms(lambda: flush.zero_())
        cold = lambda fn: graph_ms(lambda: (flush.zero_(), fn())) - flush_ms  # noqa: E731
    for M, N, K, what in shapes:
        torch.manual_seed(0)
        h1 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        wu = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        y1 = h1 @ wu.T
        y2 = act(y1)
        r = torch.relu(y1)  # what the unfused backward saves and reads
        # the backward: dy2 = dh2 wd^T (same shapes: dh2 [M, K], wd [N, K]), dy1 = 2 r dy2
        dh2 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        wd = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        dy2 = dh2 @ wd.T
        rr = y2.float().sqrt().to(torch.bfloat16).float()  # relu(y1) rebuilt from y2, as the fused kernel does
        want = {0: y1, 1: y2, 2: (2 * rr * dy2.float()).to(torch.bfloat16)}
        want[3] = want[2]
        ste = relu2_sparse24_backward(dy2, None, y1)  # ELAS's straight-through backward today: y2s, dy1
        want[4] = want[5] = ste.dy1
        want[6] = y1
        # mask mode (Haziza's gradient): today's forward writes the packed y2s and mask bits, today's backward reads
        # them with dy2; modes 7 and 8 write / read y2s dense instead
        fwd = relu2_sparsify24_packed(y1)
        y2s_dense = relu2_sparsify24_dense(y1)
        want[7] = y2s_dense
        want[8] = relu2_sparse24_backward(dy2, fwd, None).dy1
        gemm_ms = graph_ms(lambda: h1 @ wu.T)
        act_ms = graph_ms(lambda: act(y1))
        both_ms = graph_ms(lambda: act(h1 @ wu.T))
        bwd_ms = graph_ms(lambda: grad(dh2 @ wd.T, r))
        ste_ms = graph_ms(lambda: relu2_sparse24_backward(dh2 @ wd.T, None, y1))
        dense_ms = graph_ms(lambda: relu2_sparsify24_dense(y1))  # y2s alone: what mode 4 leaves to a pass
        pack_ms = graph_ms(lambda: relu2_sparsify24_packed(h1 @ wu.T, write_bits=False))  # ELAS's forward today
        mask_fwd_ms = graph_ms(lambda: relu2_sparsify24_packed(h1 @ wu.T))  # the mask mode's forward today
        mask_bwd_ms = graph_ms(lambda: relu2_sparse24_backward(dh2 @ wd.T, fwd, None))  # and its backward
        row = {"M": M, "N": N, "K": K, "what": what, "cublas_gemm_ms": gemm_ms, "relu2_kernel_ms": act_ms,
               "cublas_plus_kernel_ms": both_ms, "cublas_plus_grad_kernel_ms": bwd_ms,
               "cublas_plus_ste_kernel_ms": ste_ms, "dense_sparsifier_ms": dense_ms,
               "cublas_plus_sparsifier_ms": pack_ms, "mask_forward_ms": mask_fwd_ms, "mask_backward_ms": mask_bwd_ms,
               "cutlass": {}}
        calls = {}  # "config mode" -> its launch (the cold timing of the best below)
        operands = {0: (h1, wu, None), 1: (h1, wu, None), 2: (dh2, wd, y2), 3: (dh2, wd, y2), 4: (dh2, wd, y1),
                    5: (dh2, wd, y1), 6: (h1, wu, None), 7: (h1, wu, None), 8: (dh2, wd, y2s_dense)}
        for c, name in enumerate(configs):
            for mode, mname in modes.items():
                ws_bytes = max(int(lib.elas_cutlass_dense_workspace(c, mode, M, N, K)), 1)
                ws = torch.empty(ws_bytes, dtype=torch.uint8, device="cuda")
                d = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                ms = ctypes.c_float(0)

                a_, b_, aux = operands[mode]
                aux_out = {5: lambda: torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16),
                           }.get(mode, lambda: torch.zeros(M, N * 9 // 16, device="cuda", dtype=torch.bfloat16)
                                 if mode >= 6 else None)()

                def call(iters=0, c=c, mode=mode, a_=a_, b_=b_, aux=aux, d=d, ws=ws, ws_bytes=ws_bytes, ms=ms,
                         aux_out=aux_out):  # defaults bind this iteration's buffers
                    head = (c, mode, a_.data_ptr(), b_.data_ptr(), None if aux is None else aux.data_ptr())
                    tail = (d.data_ptr(), M, N, K, ws.data_ptr(), ws_bytes, stream(), iters, ctypes.byref(ms))
                    if aux_out is not None:
                        return lib.elas_cutlass_dense_mm_aux(*head, aux_out.data_ptr(), *tail)
                    return lib.elas_cutlass_dense_mm(*head, *tail)
                rc = call()
                torch.cuda.synchronize()
                key = f"{name} {mname}"
                calls[key] = call
                if rc != 0:
                    row["cutlass"][key] = {"error": f"status {rc}"}
                    continue
                check = mismatch(d, want[mode])
                entry = {**check}
                if mode == 6:  # the packed buffer: the sparsifier's bytes on this GEMM's own y1
                    ref_buf = relu2_sparsify24_packed(d, write_bits=False).buffer
                    bad = (aux_out.view(torch.int16) != ref_buf.view(torch.int16))
                    entry["packed_differ_frac"] = bad.float().mean().item()
                    if bad.any():
                        first = bad.nonzero()[0].tolist()
                        entry["error"] = (f"packed buffer differs from the sparsifier's on the same y1, first at "
                                          f"{first} ({'values' if first[1] < N // 2 else 'metadata'} part)")
                        row["cutlass"][key] = entry
                        continue
                elif mode in (7, 8):  # the packed buffer: the packing of the kernel's own output, byte for byte
                    own = pack24(d, ref.mask24(d if mode == 7 else y2s_dense), check=False).buffer
                    bad = aux_out.view(torch.int16) != own.view(torch.int16)
                    entry["packed_differ_frac"] = bad.float().mean().item()
                    if bad.any():
                        entry["error"] = f"packed buffer differs from the packing of its own output, first at {bad.nonzero()[0].tolist()}"
                        row["cutlass"][key] = entry
                        continue
                elif aux_out is not None:  # y2s: a function of y1 alone, so exactly the Triton kernel's
                    y2s_bad = (aux_out != ste.y2s) & ~(aux_out.isnan() & ste.y2s.isnan())
                    entry["y2s_differ_frac"] = y2s_bad.float().mean().item()
                    if y2s_bad.any():
                        first = y2s_bad.nonzero()[0].tolist()
                        entry["error"] = (f"y2s differs from the Triton kernel's, first at {first}: "
                                          f"{aux_out[first[0], first[1] & ~3:(first[1] & ~3) + 4].tolist()} against "
                                          f"{ste.y2s[first[0], first[1] & ~3:(first[1] & ~3) + 4].tolist()} (y1 "
                                          f"{y1[first[0], first[1] & ~3:(first[1] & ~3) + 4].tolist()})")
                        row["cutlass"][key] = entry
                        continue
                if check["rel_fro"] > 1e-2:  # wrong, not rounded differently: not timed
                    entry["error"] = "result differs from cuBLAS's"
                    row["cutlass"][key] = entry
                    continue
                call(iters=10)
                rc = call(iters=50)
                entry["event_ms"] = ms.value if rc == 0 else None
                try:
                    with Clocks(period=0.002) as clocks:  # the SM clock alone: beside the step's (bench step)
                        entry["graph_ms"] = graph_ms(call)
                    entry.update(clocks.summary())
                except Exception as ex:  # reported, not hidden; later work in the process may fail after it
                    entry["capture_error"] = str(ex).splitlines()[0][:200]
                row["cutlass"][key] = entry
        for mode, mname in modes.items():
            timed = [(v.get("graph_ms") or v.get("event_ms"), k) for k, v in row["cutlass"].items()
                     if k.rsplit(" ", 1)[1] == mname and "error" not in v and (v.get("graph_ms") or v.get("event_ms"))]
            if timed:
                best = min(timed)
                base = {0: gemm_ms, 1: both_ms, 2: bwd_ms, 3: bwd_ms, 4: ste_ms, 5: ste_ms, 6: pack_ms, 7: mask_fwd_ms,
                        8: mask_bwd_ms}[mode]
                total = best[0] + (dense_ms if mode == 4 else 0.0)  # mode 4 needs the y2s pass beside it
                row[f"best_{mname}"] = {"config": best[1], "ms": best[0], "with_y2s_pass_ms": total,
                                        "vs_cublas": base / total}
                if cold is not None:  # the same launch after the L2 is flushed: operands from HBM, as in a step
                    row[f"best_{mname}"]["cold_ms"] = cold(calls[best[1]])
        rows.append(row)
        out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))  # after each shape: a fault keeps the rest
        p, f = row.get("best_plain"), row.get("best_relu2")
        g = min((row[k] for k in ("best_grad", "best_grad_tma") if k in row), key=lambda b: b["ms"], default=None)
        table.append(f"{M}x{N}x{K}: cuBLAS {gemm_ms:.4f} ms + ReLU^2 {act_ms:.4f} = {both_ms:.4f}; CUTLASS plain "
                     + (f"{p['ms']:.4f} (x{p['vs_cublas']:.2f}, {p['config']})" if p else "-") + "; fused forward "
                     + (f"{f['ms']:.4f} (x{f['vs_cublas']:.2f} cuBLAS + kernel, {f['config']})" if f else "-")
                     + f"; backward cuBLAS + kernel {bwd_ms:.4f}, fused "
                     + (f"{g['ms']:.4f} (x{g['vs_cublas']:.2f}, {g['config']})" if g else "-")
                     + (f"; 2:4 forward cuBLAS + sparsifier {pack_ms:.4f}, fused {row['best_relu2_pack24']['ms']:.4f} "
                        f"(x{row['best_relu2_pack24']['vs_cublas']:.2f})" if "best_relu2_pack24" in row else "")
                     + "".join(f"; mask {w} today {t:.4f}, fused {row['best_' + n]['ms']:.4f} (x{row['best_' + n]['vs_cublas']:.2f})"
                               for w, t, n in (("forward", mask_fwd_ms, "relu2s_pack24"),
                                               ("backward", mask_bwd_ms, "grad_pack24")) if "best_" + n in row)
                     + f"; ste backward cuBLAS + kernel {ste_ms:.4f}, "
                     + ", ".join(f"{n} {b['with_y2s_pass_ms']:.4f} (x{b['vs_cublas']:.2f})"
                                 for n, b in ((n, row.get("best_" + n)) for n in ("ste_grad", "ste_grad_y2s")) if b))
    rope = rope_rows(graph_ms) if os.environ.get("CUTLASS_ROPE", "1") != "0" else []
    out.write_text(json.dumps({"env": env, "rows": rows, "rope": rope}, indent=1))
    table += [f"rope {r['what']}: cuBLAS + compiled rotation {r['unfused_ms']:.4f} ms, CUTLASS with the rotation in "
              f"its epilogue {r['fused_ms']:.4f} (x{r['speedup']:.2f}; rel. error {r['rel_err']:.1e})"
              if "fused_ms" in r else f"rope {r['what']}: {r.get('error')}" for r in rope]
    print("\n".join(table))


def rope_rows(graph_ms) -> list[dict]:
    """The rope GEMM at the 1B attention shapes (T = 8192 tokens, d = 2048, r = 512, head_dim 128, seq 256)."""
    from elas.kernels import reference as ref
    from elas.kernels.cuda import cutlass_relu2 as cl
    from elas.model.llama import rope_tables
    t, d, r, hd, seq = 8192, 2048, 512, 128, 256
    cos, sin = (c.cuda() for c in rope_tables(hd, seq, 10000.0))
    dev = dict(device="cuda", dtype=torch.bfloat16)
    rot = torch.compile(lambda y, rc: ref.rope_pairs(y, cos, sin, hd, rc))
    cases = [("low-rank q, k, v as one batched GEMM [3, T, r] x [3, r, d]", torch.randn(t, 3, r, **dev).transpose(0, 1),
              torch.randn(3, d, r, **dev) / r ** 0.5, 2 * d),
             ("low-rank q (or k) alone [T, r] x [r, d]", torch.randn(1, t, r, **dev),
              torch.randn(1, d, r, **dev) / r ** 0.5, d),
             ("full-rank q, k, v as one GEMM [T, d] x [d, 3d]", torch.randn(1, t, d, **dev),
              torch.randn(1, 3 * d, d, **dev) / d ** 0.5, 2 * d)]
    out = []
    for what, a, w, rc in cases:
        row = {"what": what, "a": list(a.shape), "w": list(w.shape), "rot_cols": rc}
        if "rope" in cl.skipped():
            row["error"] = "skipped: named in ELAS_CUTLASS_SKIP (it faulted in benchmarks/cutlass_probe.py)"
            out.append(row)
            continue
        try:
            got = cl.linear_rope(a, w, cos, sin, hd, rc)
            want = ref.linear_rope(a, w, cos, sin, hd, rc)
            row["rel_err"] = ((got.float() - want.float()).norm() / want.float().norm()).item()
            row["differ_frac"] = (got != want).float().mean().item()
            if row["rel_err"] > 1e-2:
                row["error"] = "differs from the reference"
            else:
                row["unfused_ms"] = graph_ms(lambda: rot(torch.bmm(a, w.transpose(1, 2)), rc))
                row["fused_ms"] = graph_ms(lambda: cl.linear_rope(a, w, cos, sin, hd, rc))
                row["speedup"] = row["unfused_ms"] / row["fused_ms"]
        except Exception as ex:  # reported in the row; the others still run
            row["error"] = str(ex).splitlines()[0][:200]
        out.append(row)
    return out


if __name__ == "__main__":
    main()
