"""How efficient torch's grouped GEMM is at V:N:M's shapes: each of the FFN's three GEMM kinds (forward, input
gradient, weight gradient) of the grouped path, against one dense GEMM of the same FLOPs, in TFLOP/s. Says
whether m=8's FFN (1.72x dense, under the V:N:M issue's 1.8x) is short because of the grouped kernel or of the
work around it (routing, row moves, selection). Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/grouped_gemm.py [DIR]     # writes DIR/grouped_gemm.json (default: $OUT, or here)

1B, batch 64 x 256: T = 16384 tokens, d = 2048, d_ff = 8192. Per row: C clusters of F = d_ff / C neurons (own mode:
C = topk * m / 4), rows = T * topk token-cluster pairs split by `split` (the largest cluster's share), each
group padded to 16 rows as the grouped path lays them out (vnm_grouped.group_layout).
- fwd:   [P, d] x [C, d, F] -> [P, F]   (the up-projection; the down-projection is the same kind with d and F swapped)
- dgrad: [P, F] x [C, F, d] -> [P, d]
- wgrad: [F, P] x [P, d] grouped along P -> [C, F, d]   (the weight gradient: a reduction over each group's rows)
Timed back to back (throughput, medians of windows); the dense reference is one torch.mm [P, d] x [d, F]: the same
FLOPs.
"""
import json
import os
import sys

import torch

from elas.bench.timing import throughput_ms
from elas.sparsity.vnm_grouped import ALIGN


def offsets(rows: int, c: int, split: float) -> tuple[torch.Tensor, int]:
    """Group ends (int32 [c]) for `rows` rows, the first group taking `split` of them and the rest even, each group
    padded to ALIGN rows; and the padded total."""
    first = int(rows * split) if c > 1 else rows
    sizes = [first] + [(rows - first) // (c - 1) + (1 if i < (rows - first) % (c - 1) else 0) for i in range(c - 1)]
    padded = [(s + ALIGN - 1) // ALIGN * ALIGN for s in sizes]
    ends = torch.tensor(padded).cumsum(0).to(torch.int32)
    return ends.to("cuda" if torch.cuda.is_available() else "cpu"), int(ends[-1])


def main() -> None:
    t, d, d_ff = 16384, 2048, 8192
    dt = torch.bfloat16
    rows_out = []
    for m, topk, split in [(16, 1, 0.25), (16, 1, 0.45), (8, 1, 0.5), (8, 1, 0.7), (16, 2, 0.125), (16, 2, 0.25)]:
        c = topk * m // 4
        f = d_ff // c
        offs, p = offsets(t * topk, c, split)
        a = torch.randn(p, d, device="cuda", dtype=dt)
        wu = torch.randn(c, f, d, device="cuda", dtype=dt)  # [C, F, d]: cluster c's rows of W_up
        y = torch.randn(p, f, device="cuda", dtype=dt)
        wd = torch.randn(c, f, d, device="cuda", dtype=dt)  # [C, F, d]: cluster c's rows of W_down^T
        flops = 2.0 * p * d * f  # every kind: each row times one cluster's F x d block
        kinds = {
            "fwd": lambda: torch._grouped_mm(a, wu.transpose(1, 2), offs=offs),
            "dgrad": lambda: torch._grouped_mm(y, wd, offs=offs),
            "wgrad": lambda: torch._grouped_mm(y.t(), a, offs=offs),
        }
        # the dense GEMM of the same FLOPs: [p, d] x [d, f]
        b = torch.randn(d, f, device="cuda", dtype=dt)
        dense_ms = throughput_ms(lambda: a @ b, iters=20)
        row = {"m": m, "topk": topk, "clusters": c, "F": f, "rows": p, "largest_share": split,
               "dense_ms": dense_ms, "dense_tflops": flops / dense_ms / 1e9}
        for name, fn in kinds.items():
            ms = throughput_ms(fn, iters=20)
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = flops / ms / 1e9
            row[f"{name}_vs_dense"] = dense_ms / ms
        rows_out.append(row)
        print(f"m={m:2d} topk={topk} C={c} F={f:4d} rows={p} largest {split:.2f}: dense {row['dense_tflops']:.0f} "
              f"TFLOP/s; " + ", ".join(f"{k} {row[k + '_tflops']:.0f} ({row[k + '_vs_dense']:.2f}x)" for k in kinds),
              flush=True)
    out = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    with open(os.path.join(out, "grouped_gemm.json"), "w") as fh:
        json.dump({"command": "PYTHONPATH=src python benchmarks/grouped_gemm.py", "env": env, "rows": rows_out}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
