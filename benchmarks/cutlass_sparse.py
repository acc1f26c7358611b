"""CUTLASS's sm90 2:4 sparse GEMM (src/elas/kernels/cuda/cutlass/sp_gemm.cu, our instantiations) against cuSPARSELt
(elas's op) and cuBLAS at the FFN shapes, one process, bf16: is a sparse GEMM of our own the lever the FFN-kernels issue needs
(>= 1.7x cuBLAS where cuSPARSELt gives 1.35-1.5x)? Needs a Hopper GPU and the library built by
`src/elas/kernels/cuda/cutlass/build.sh sp` (on any machine; carry build/cutlass_sp to the GPU machine).

    PYTHONPATH=src python benchmarks/cutlass_sparse.py [LIB (default build/cutlass_sp/libelas_cutlass_sp.so)] [OUT_DIR]

CUTLASS's metadata layout is not cuSPARSELt's (docs/sm90_layout.md): `cutlass_meta_offset` states it, checked
here against the library's own CuTe layout before anything runs. Each configuration's result is checked against
the fp32 product of the same 2:4 matrix; times are CUDA-graph replays (no host overhead), as `elas bench gemm`.
"""
import ctypes
import json
import sys
from pathlib import Path

import torch

# M, K, N, what: y[M, N] = A[M, K] (2:4 along K) @ B[K, N] at 1B (d_model 2048, d_ff 8192, rank 512, 16384 tokens)
SHAPES = [(16384, 8192, 2048, "activations @ W_down^T (relu2-24 / ELAS forward, full-rank)"),
          (16384, 8192, 512, "activations @ low-rank factor (ELAS forward, r = 512)"),
          (8192, 16384, 2048, "dy1^T @ x, along tokens (relu2-24 weight gradient)"),
          (8192, 2048, 16384, "S(W_up) @ x^T (2:4 weights, forward of the up-projection)"),
          (2048, 8192, 16384, "S(W_down) @ y2^T (2:4 weights, forward of the down-projection)")]


def cutlass_meta_offset(m: torch.Tensor, k: torch.Tensor, M: int) -> torch.Tensor:
    """Offset, in logical elements of A (2 bits each: a group's nibble is 4 of them, 8 per byte), of element
    (m, k)'s metadata in CUTLASS's sm90 16-bit sparse layout with K tiles of >= 128 (sm90_sparse_config.inl's
    TensorEAtom_16bit with NumK = 4: (8, 2, 4) rows x (16, 2, 4) columns, strides by the atom's step order;
    atoms stacked along M (64 rows), then along K (128 columns))."""
    ma = -(-M // 64) * 64
    return ((k % 16) + (k // 16 % 2) * 1024 + (k // 32 % 4) * 32 + (k // 128) * (ma * 128)
            + (m % 8) * 128 + (m // 8 % 2) * 16 + (m // 16 % 4) * 2048 + (m // 64) * 8192)


def pack_cutlass(a: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a [M, K] bf16 and its 2:4 keep-mask (exactly 2 per group of 4) -> (values [M, K/2] bf16, E uint8)."""
    M, K = a.shape
    vals = a[keep].reshape(M, K // 2)  # row-major: a group's two values in column order
    pos = torch.arange(4, device=a.device).expand(M, K // 4, 4)
    kept = pos[keep.reshape(M, K // 4, 4)].reshape(M, K // 4, 2)  # the two kept positions, ascending
    nib = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.int32)  # [M, K/4]
    m = torch.arange(M, device=a.device).view(-1, 1).expand(M, K // 4)
    k = torch.arange(0, K, 4, device=a.device).view(1, -1).expand(M, K // 4)
    off = cutlass_meta_offset(m, k, M).to(torch.int32)
    e = torch.zeros(-(-M // 64) * 64 * (-(-K // 128) * 128) // 8, dtype=torch.int32, device=a.device)
    e.scatter_add_(0, (off // 8).reshape(-1), (nib << (4 * (off % 8 // 4))).reshape(-1))  # two nibbles a byte
    return vals.contiguous(), e.to(torch.uint8)


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.elas_cutlass_sp_config_name.restype = ctypes.c_char_p
    lib.elas_cutlass_sp_workspace.restype = ctypes.c_longlong
    lib.elas_cutlass_sp_workspace.argtypes = [ctypes.c_int] * 4
    lib.elas_cutlass_sp_meta_offset.restype = ctypes.c_longlong
    lib.elas_cutlass_sp_meta_offset.argtypes = [ctypes.c_int] * 4
    lib.elas_cutlass_sp_mm.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    return lib


def check_layout(lib) -> int:
    """The Python formula against the library's layout at a few sizes (host code: no GPU involved)."""
    bad = 0
    for M, K in ((64, 128), (128, 256), (192, 512), (16384, 8192)):
        step = max(1, M * K // 4 // 20000)
        idx = torch.arange(0, M * K // 4, step)
        m, k = idx // (K // 4), idx % (K // 4) * 4
        want = torch.tensor([lib.elas_cutlass_sp_meta_offset(M, K, int(a), int(b)) for a, b in zip(m, k)])
        bad += int((cutlass_meta_offset(m, k, M) != want).sum())
    return bad


def main() -> None:
    here = Path(__file__).resolve().parent
    lib_path = sys.argv[1] if len(sys.argv) > 1 else "build/cutlass_sp/libelas_cutlass_sp.so"
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "results" / "h200"
    lib = load(lib_path)
    bad = check_layout(lib)
    print(f"metadata layout: {bad} offsets differ from the library's")
    if bad or not torch.cuda.is_available():
        sys.exit(1 if bad else 0)
    sys.path.insert(0, str(here.parent / "src"))
    from elas.kernels import reference
    from elas.kernels.cuda import gemm
    from elas.kernels.packed import pack24
    from elas.bench.timing import graph_ms, throughput_ms
    gemm.load_extension()
    configs = [lib.elas_cutlass_sp_config_name(c).decode() for c in range(lib.elas_cutlass_sp_configs())]
    rows = []
    stream = lambda: ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)  # noqa: E731
    calls = {}  # (M, K, N, config) -> the launch, kept (with its buffers) for the graph timings at the end
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
           "cusparselt": torch.backends.cusparselt.version(), "cutlass": "4.2.0 (pip nvidia-cutlass headers)"}
    out = out_dir / "cutlass_sparse.json"
    for M, K, N, what in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        keep = reference.mask24(x)
        a = x * keep
        bt = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)  # B^T contiguous: B K-major
        b = bt.t()
        want = a.float() @ b.float()
        dense_ms = graph_ms(lambda: torch.mm(a, b))
        packed = pack24(a, keep)  # the same matrix in cuSPARSELt's layout
        alg = gemm.best_alg(M, K, N, True, "ext")
        cslt_ms = graph_ms(lambda: gemm.sparse_mm(packed, b, alg=alg))
        cslt_err = ((gemm.sparse_mm(packed, b, alg=alg).float() - want).norm() / want.norm()).item()
        vals, e = pack_cutlass(a, keep)
        row = {"M": M, "K": K, "N": N, "what": what, "dtype": "bf16", "b_layout": "K-major",
               "cublas_ms": dense_ms, "cusparselt_ms": cslt_ms, "cusparselt_rel_err": cslt_err, "cutlass": {}}
        for c, name in enumerate(configs):
            ws_bytes = max(int(lib.elas_cutlass_sp_workspace(c, M, N, K)), 1)
            ws = torch.empty(ws_bytes, dtype=torch.uint8, device="cuda")
            d = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            ms = ctypes.c_float(0)

            def call(iters=0, c=c, vals=vals, e=e, bt=bt, d=d, M=M, N=N, K=K, ws=ws, ws_bytes=ws_bytes, ms=ms):
                # defaults bind this iteration's buffers: the launch is kept and replayed after the loop
                return lib.elas_cutlass_sp_mm(c, vals.data_ptr(), e.data_ptr(), bt.data_ptr(), d.data_ptr(), M, N,
                                              K, ws.data_ptr(), ws_bytes, stream(), iters, ctypes.byref(ms))
            rc = call()
            torch.cuda.synchronize()
            if rc != 0:
                row["cutlass"][name] = {"error": f"status {rc}"}
                continue
            err = ((d.float() - want).norm() / want.norm()).item()
            call(iters=10)
            rc = call(iters=50)  # the library's own event timing: one initialisation, then 50 launches
            row["cutlass"][name] = {"rel_err": err, "event_ms": ms.value if rc == 0 else None}
            calls[(M, K, N, name)] = call
        ok = [(v["event_ms"], k) for k, v in row["cutlass"].items()
              if "rel_err" in v and v["rel_err"] < 1e-2 and v.get("event_ms")]
        if not ok:
            rows.append(row)
            print(f"{M}x{K}x{N}: no CUTLASS configuration ran correctly: {row['cutlass']}")
            out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
            continue
        best = min(ok)
        # event timings include each launch's host work; cuBLAS's by events too, for a like-for-like line
        row["cublas_event_ms"] = throughput_ms(lambda: torch.mm(a, b), iters=50)
        row["cutlass_best"] = {"config": best[1], "event_ms": best[0],
                               "vs_cublas_event": row["cublas_event_ms"] / best[0]}
        rows.append(row)
        print(f"{M}x{K}x{N}: graphs: cuBLAS {dense_ms:.4f} ms, cuSPARSELt {cslt_ms:.4f} (x{dense_ms / cslt_ms:.2f}); "
              f"launches back to back: cuBLAS {row['cublas_event_ms']:.4f}, CUTLASS best {best[0]:.4f} ({best[1]}, "
              f"x{row['cublas_event_ms'] / best[0]:.2f})")
        for name, v in row["cutlass"].items():
            print(f"    {name}: {v}")
        out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))  # after each shape: a fault keeps the rest
    # last, once every other number is saved: the best configuration replayed from a CUDA graph, as cuBLAS and
    # cuSPARSELt were timed. The library launches through its own (static) CUDA runtime; if capture fails, a
    # process's later CUDA work can fail too, so nothing else runs after a failure.
    for row in rows:
        if "cutlass_best" not in row:
            continue
        name = row["cutlass_best"]["config"]
        try:
            g = graph_ms(calls[(row["M"], row["K"], row["N"], name)])
        except Exception as ex:
            row["capture_error"] = str(ex).splitlines()[0][:200]
            print(f"CUDA-graph capture of the CUTLASS launch failed: {row['capture_error']}")
            break
        row["cutlass_best"].update(graph_ms=g, vs_cublas=row["cublas_ms"] / g, vs_cusparselt=row["cusparselt_ms"] / g)
        print(f"{row['M']}x{row['K']}x{row['N']} graphs: CUTLASS {g:.4f} ms, x{row['cublas_ms'] / g:.2f} cuBLAS, "
              f"x{row['cusparselt_ms'] / g:.2f} cuSPARSELt")
        out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
