"""fuse_qkv's low-rank q/k/v projections, forward and backward, compiled and replayed from a CUDA graph (as elas's
step runs them), with each model.fuse_qkv form in one process: `blocks` (ops.low_rank_qkv, the default: the
down-projection weights' gradients as contiguous blocks of one batched GEMM, the up-projections' input gradients
side by side), `former` (the default until 2026-12-06: the input gradients side by side, but one [d, 3r] weight
gradient GEMM whose column blocks autograd copies into each [d, r] parameter), `views` (the model's plain fused
path: those copies and a concatenation of the input gradients), and `three` (fuse_qkv=false). Gradients are None before each replay's backward, as in the training step's
graph. Prints one line per form (time per layer; AccumulateGrad's copies and the kernels of one pass outside the
graph, per layer), writes JSON.

    python benchmarks/qkv_grad.py [OUT_DIR] [SIZE] [BATCH]     # default: llama-1b at batch 32 x 256
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "src")
from elas.bench.timing import event_ms  # noqa: E402
from elas.build import build_model  # noqa: E402
from elas.config import model_preset  # noqa: E402
from elas.graphs import graph_capture  # noqa: E402
from elas.kernels import ops  # noqa: E402

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else None
size = sys.argv[2] if len(sys.argv) > 2 else "llama-1b"
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
seq, layers, reps = 256, 4, 50
DEV = "cuda"


def _former(x, ws_in, ws_out):
    """The default before ops.low_rank_qkv (bf16 operands, no autocast here): the down-projection against the
    weights' concatenation in autograd, the up-projections through ops._UpProjections."""
    h = x.reshape(-1, x.shape[-1]) @ torch.cat(ws_in, dim=1)
    return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in ops._UpProjections.apply(h, *ws_out))


def time_form(form: str) -> dict:
    cfg = model_preset(f"{size}-lowrank-relu2", n_layers=1, fuse_qkv=form != "three")
    attns = [build_model(cfg, device=DEV).to(torch.bfloat16).blocks[0].attn for _ in range(layers)]
    if form in ("views", "former"):
        for a in attns:
            a.qkv_op = None if form == "views" else _former
    x = torch.randn(batch, seq, cfg.d_model, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    params = [x, *(p for a in attns for p in a.parameters())]  # every leaf's gradient None before a pass

    def body(x):
        h = x
        for a in attns:  # a chain, so that each layer's backward waits on the next one's, as in the model
            q, k, v = a.qkv(h)
            h = q + k * v
        return h.float().square().mean()

    fn = torch.compile(body)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            fn(x).backward()
    torch.cuda.current_stream().wait_stream(side)
    # one pass outside the graph under the profiler: the copies autograd makes of gradients that do not have their
    # parameter's layout (AccumulateGrad), and the kernels a pass launches
    for p in params:
        p.grad = None
    with torch.profiler.profile() as prof:
        fn(x).backward()
        torch.cuda.synchronize()
    events = prof.events()
    copies = sum(e.name == "aten::copy_" and e.cpu_parent is not None and "AccumulateGrad" in e.cpu_parent.name
                 for e in events)
    kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with graph_capture(graph):
        fn(x).backward()
    ms = event_ms(graph.replay, iters=reps, warmup=5)  # median of replays, events around each
    return {"form": form, "ms_per_layer": ms / layers,
            "accumulate_grad_copies_per_layer": copies / layers, "kernels_per_layer": kernels / layers}


rows = [time_form(f) for f in ("blocks", "former", "views", "three")]
base = next(r for r in rows if r["form"] == "former")["ms_per_layer"]
for r in rows:
    r["vs_former"] = base / r["ms_per_layer"]
    print(f"{r['form']:7s} {r['ms_per_layer']:.4f} ms per layer  {r['vs_former']:.3f}x former  "
          f"AccumulateGrad copies {r['accumulate_grad_copies_per_layer']:.1f}  kernels {r['kernels_per_layer']:.1f} per layer")
if out_dir is not None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"size": size, "batch": batch, "seq": seq, "dtype": "bfloat16", "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "layers_timed": layers}
    (out_dir / "qkv_grad.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
