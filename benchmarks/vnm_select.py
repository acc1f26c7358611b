"""The 2:4 selection of V:N:M's grouped path, y1 [P, F] bf16 -> y2s = 2:4(relu(y1)^2) dense: the Triton kernel
(kernels/cuda/sparsify.relu2_sparsify24_dense) against Inductor's compilation of the reference formula, with a
launch sweep; each checked bit for bit, timed by CUDA-graph replay. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/vnm_select.py [DIR]     # writes DIR/vnm_select.json (default: $OUT, or here)

P = tokens + 16 x clusters (the grouped layout's padding rows), F = d_ff / clusters (1B: d_ff 8192, 4 clusters).
"""
import json
import os
import sys

import torch

from elas.bench.timing import throughput_ms
from elas.kernels import reference as ref
from elas.kernels.cuda import sparsify as sp


def main() -> None:
    res = []
    for p, f in [(8256, 2048), (16448, 2048), (8224, 4096)]:  # 1B at m=16 (batch 32, 64), m=8
        y1 = torch.randn(p, f, device="cuda", dtype=torch.bfloat16)
        def formula(y1):
            with torch.no_grad():
                r = torch.relu(y1)
                y2 = r * r
                return y2 * ref.mask24(y2)
        comp = torch.compile(formula)
        want = formula(y1)
        assert torch.equal(comp(y1), want)
        row = {"shape": [p, f], "inductor_ms": throughput_ms(lambda: comp(y1))}
        best = None
        for rows in (32, 64, 128):
            for bk in (64, 128):
                for w in (4, 8):
                    got = sp.relu2_sparsify24_dense(y1, rows=rows, bk=bk, num_warps=w)
                    assert torch.equal(got, want)
                    ms = throughput_ms(lambda: sp.relu2_sparsify24_dense(y1, rows=rows, bk=bk, num_warps=w))
                    row[f"triton_r{rows}_k{bk}_w{w}_ms"] = ms
                    if best is None or ms < best[0]:
                        best = (ms, rows, bk, w)
        row["triton_default_ms"] = throughput_ms(lambda: sp.relu2_sparsify24_dense(y1))
        row["best"] = best
        row["bytes_GBps_default"] = 2 * p * f * 2 / row["triton_default_ms"] / 1e6
        res.append(row)
        print(f"[{p}, {f}] inductor {row['inductor_ms']*1e3:.1f} us  triton default {row['triton_default_ms']*1e3:.1f} us "
              f"({row['bytes_GBps_default']:.0f} GB/s) best {best[0]*1e3:.1f} us at rows={best[1]} bk={best[2]} warps={best[3]}")
    json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": res},
              open(os.path.join(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."), "vnm_select.json"),
                   "w"), indent=1)


if __name__ == "__main__":
    main()
