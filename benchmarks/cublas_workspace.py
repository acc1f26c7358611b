"""Two GEMM graphs captured with plain torch.cuda.graph (`torch`) or elas's graph_capture (`elas`), the first
destroyed, the freed memory refilled with NaN, the second replayed (pytorch#193402; the `elas` mode is
tests/test_step.py::test_gpu_a_destroyed_graph_leaves_another_graphs_gemm_workspace). Prints whether its GEMM still gives the eager result and
whether the refill was overwritten. One mode per process (a fault poisons the process).

    python benchmarks/cublas_workspace.py torch    # pytorch#193402: the second graph uses the first's workspace
    python benchmarks/cublas_workspace.py elas 2048x8192x2048   # M x K x N (default 64x65536x64: split-K)
"""
import sys

import torch

sys.path.insert(0, "src")
from elas.graphs import graph_capture  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "elas"
m, k, n = (int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "64x65536x64").split("x"))  # default: split-K
capture = {"torch": torch.cuda.graph, "elas": graph_capture}[mode]
g = torch.Generator(device="cuda").manual_seed(0)
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=g)
want = a @ b
first, second = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
with capture(first):
    a @ b
with capture(second):
    out = a @ b
del first
torch.cuda.synchronize()
torch.cuda.empty_cache()
junk = [torch.full((16 << 20,), float("nan"), device="cuda") for _ in range(8)]
try:
    for _ in range(3):
        second.replay()
    torch.cuda.synchronize()
    err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
    overwritten = sum(int((~torch.isnan(j)).sum()) for j in junk)
    print(f"{mode} {m}x{k}x{n}: max rel. error {err:.2e}, refill elements overwritten {overwritten}")
except RuntimeError as e:
    print(f"{mode} {m}x{k}x{n}: replay failed: {str(e).splitlines()[0][:160]}")
