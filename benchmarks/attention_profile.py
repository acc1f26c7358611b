"""One forward and one backward launch of elas's attention kernels (kernels/cuda/attention.py) at a training shape,
for Nsight Compute to read their counters:

    ncu --clock-control none --kernel-name regex:'_attn_(fwd|bwd)' --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        python benchmarks/attention_profile.py [SIZE] [BATCH] [FWD_JSON] [BWD_JSON]

Two warm-up rounds come first (compilation and autotuning out of the way: hence --launch-skip 4; the regex leaves
out the rowsum pass, _attn_delta). The launches are training's: with save_rotated (the default) the forward that
writes q and k rotated and the backward that reads them. FWD_JSON/BWD_JSON override the launch settings (e.g.
'{"bm": 128, "bn": 128, "warps": 8, "stages": 2}').
"""
import json
import sys

import torch

sys.path.insert(0, "src")
from elas.config import model_preset  # noqa: E402
from elas.kernels.cuda import attention  # noqa: E402
from elas.model.llama import rope_tables  # noqa: E402

size = sys.argv[1] if len(sys.argv) > 1 else "llama-1b"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
fwd_c = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
bwd_c = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
cfg = model_preset(f"{size}-lowrank-relu2")
cos, sin = rope_tables(cfg.head_dim, 256, cfg.rope_theta, "cuda")
q, k, v, do = (torch.randn(batch, 256, cfg.n_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(4))
bwd_s = attention.launch_settings("bwd", bwd_c)
saved = bwd_s["save_rotated"]
for _ in range(3):  # 2 warm-up rounds, then the profiled one
    o, lse, *rot = attention.rope_attention_forward(q, k, v, cos, sin, fwd_c, save_rotated=saved)
    attention.rope_attention_backward(do, *(rot or (q, k)), v, o, lse, cos, sin, bwd_c, rotated=saved)
torch.cuda.synchronize()
fwd_s = attention.forward_settings(fwd_c, cfg.head_dim, q.dtype, saved)
print(f"{size} batch {batch}: fwd {fwd_s}, bwd {bwd_s}")
