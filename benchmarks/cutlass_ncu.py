"""One launch of each CUTLASS ReLU^2-library form at the 1B low-rank up-projection's shape, for Nsight Compute:

    ncu --clock-control none -k regex:device_kernel --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats python benchmarks/cutlass_ncu.py [CONFIG]

Launch order: plain (mode 0), relu2 (1), ste_grad (4), ste_grad_y2s (5), relu2_pack24 (6), then the rotary GEMM for
q alone ([8192, 512] x [512, 2048]) and for q, k, v batched. CONFIG: the configuration index (default 0). Where the
epilogue's second output (y2s, the packed 2:4 buffer) or the rotation costs its time shows against plain and relu2.
Needs $ELAS_CUTLASS_RELU2 and a Hopper GPU. (ncu names the library's kernels by their base name, `device_kernel`:
a filter on "cutlass" matches none.)
"""
import sys

import torch

from elas.kernels.cuda import cutlass_relu2 as cl
from elas.model.llama import rope_tables

cfg = int(sys.argv[1]) if len(sys.argv) > 1 else 0
lib = cl.library()
print("configuration", lib.elas_cutlass_dense_config_name(cfg).decode(), flush=True)
m, n, k = 8192, 8192, 512
dev = dict(device="cuda", dtype=torch.bfloat16)
a, b = torch.randn(m, k, **dev), torch.randn(n, k, **dev) / k ** 0.5
y1 = torch.randn(m, n, **dev)
d = torch.empty(m, n, **dev)
outs = {5: torch.empty(m, n, **dev), 6: torch.empty(m, n * 9 // 16, **dev)}
for mode, aux in ((0, None), (1, None), (4, y1), (5, y1), (6, None)):
    rc = cl._launch(lib, cfg, mode, a, b, aux, d, aux_out=outs.get(mode))[0]
    torch.cuda.synchronize()
    print("mode", mode, "rc", rc, flush=True)
cos, sin = (t.cuda() for t in rope_tables(128, 256, 10000.0))
for a3, w3 in ((torch.randn(1, m, 512, **dev), torch.randn(1, 2048, 512, **dev)),
               (torch.randn(m, 3, 512, **dev).transpose(0, 1), torch.randn(3, 2048, 512, **dev))):
    d3 = torch.empty(a3.shape[0], m, 2048, **dev)
    rc = cl._rope_launch(lib, cfg, a3, w3, d3, cos, sin, 128, 2048 * min(a3.shape[0], 2))[0]
    torch.cuda.synchronize()
    print("rope", tuple(a3.shape), "rc", rc, flush=True)
