"""One launch of each CUTLASS ReLU^2-library form at the 1B low-rank up-projection's shape, for Nsight Compute:

    ncu --clock-control none -k regex:device_kernel --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats python benchmarks/cutlass_ncu.py [CONFIG]

Launch order: plain (mode 0), relu2 (1), ste_grad (4), ste_grad_y2s (5), relu2_pack24 (6), relu2s_pack24 (7),
grad_pack24 (8), then the rotary GEMM for
q alone ([8192, 512] x [512, 2048]) and for q, k, v batched. CONFIG: the configuration index (default 0). Where the
epilogue's second output (y2s, the packed 2:4 buffer) or the rotation costs its time shows against plain and relu2.
Needs $ELAS_CUTLASS_RELU2 and a Hopper GPU. (ncu names the library's kernels by their base name, `device_kernel`:
a filter on "cutlass" matches none.)

    python benchmarks/cutlass_ncu.py --summarize OUT.json NCU_TXT...

reads ncu's text reports of such runs (one per configuration; `-c 7` keeps the seven GEMM forms) into one JSON row
per kernel: the form (by launch order), duration, SM frequency, executed instructions, SM and memory throughput,
warp cycles per issued instruction. Runs anywhere (no GPU).
"""
import json
import re
import sys

FORMS = ("plain", "relu2", "ste_grad", "ste_grad_y2s", "relu2_pack24", "relu2s_pack24", "grad_pack24", "rope_q",
         "rope_qkv")  # the launch order below
METRICS = {"duration_us": "Duration", "sm_ghz": "SM Frequency", "instructions": "Executed Instructions",
           "sm_throughput_pct": "Compute (SM) Throughput", "memory_throughput_pct": "Memory Throughput",
           "cycles_per_issue": "Warp Cycles Per Issued Instruction"}


def summarize(out: str, reports: list[str]) -> None:
    rows = []
    for path in reports:
        text = open(path).read()
        cfg = re.search(r"^configuration (.+)$", text, re.M)
        # one block per profiled kernel, each opening with its (demangled) signature line
        for i, block in enumerate(re.split(r"^  void device_kernel<", text, flags=re.M)[1:]):
            row = {"config": cfg.group(1) if cfg else None, "form": FORMS[i] if i < len(FORMS) else str(i)}
            for key, name in METRICS.items():
                m = re.search(rf"^ +{re.escape(name)} +\S* +([\d,.]+)\s*$", block, re.M)
                row[key] = float(m.group(1).replace(",", "")) if m else None
            rows.append(row)
    json.dump({"rows": rows}, open(out, "w"), indent=1)
    for r in rows:
        print(f"{r['config']:>26} {r['form']:>13} {r['duration_us']:8.1f} us {r['instructions'] / 1e6:7.1f} M instr "
              f"SM {r['sm_throughput_pct']:5.1f}% mem {r['memory_throughput_pct']:5.1f}%")


if len(sys.argv) > 1 and sys.argv[1] == "--summarize":
    summarize(sys.argv[2], sys.argv[3:])
    sys.exit(0)

import torch  # noqa: E402  (the summary above runs without torch's CUDA)

from elas.kernels import reference as ref  # noqa: E402
from elas.kernels.cuda import cutlass_relu2 as cl  # noqa: E402
from elas.model.llama import rope_tables  # noqa: E402

cfg = int(sys.argv[1]) if len(sys.argv) > 1 else 0
lib = cl.library()
print("configuration", lib.elas_cutlass_dense_config_name(cfg).decode(), flush=True)
m, n, k = 8192, 8192, 512
dev = dict(device="cuda", dtype=torch.bfloat16)
a, b = torch.randn(m, k, **dev), torch.randn(n, k, **dev) / k ** 0.5
y1 = torch.randn(m, n, **dev)
d = torch.empty(m, n, **dev)
outs = {5: torch.empty(m, n, **dev), 6: torch.empty(m, n * 9 // 16, **dev), 7: torch.empty(m, n * 9 // 16, **dev),
        8: torch.empty(m, n * 9 // 16, **dev)}
y2s = torch.relu(y1) ** 2 * ref.mask24(torch.relu(y1))  # a 2:4 y2s for mode 8
for mode, aux in ((0, None), (1, None), (4, y1), (5, y1), (6, None), (7, None), (8, y2s)):
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
