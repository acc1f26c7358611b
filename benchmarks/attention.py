"""model.attn_backend=triton (elas's kernel; what "auto" takes on CUDA) against torch's attention, forward and
backward, at the training shapes.

torch's (what the model runs with attn_backend=torch, the default before elas's kernel; "default" in the table):
the rotary embedding (model.apply_rope) on q and k, then torch's SDPA (cuDNN's kernels on Hopper), compiled as the
step compiles it. elas's: ops.rope_attention, one Triton
kernel each way with the rotation inside (kernels/cuda/attention.py). Both replayed from CUDA graphs, one process,
medians. First each launch setting of the Triton forward and backward is timed alone (the best is kept), then
the two forms forward + backward with the same output gradient, then their outputs and input gradients compared
(bf16, against the fp32 reference on the first batch element). Prints a table, writes attention.json.

    python benchmarks/attention.py [OUT_DIR] [SIZE,SIZE...] [BATCH]   # default: llama-1b,llama-130m at batch 32
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, "src")
from elas.bench.timing import event_ms  # noqa: E402
from elas.config import model_preset  # noqa: E402
from elas.graphs import graph_capture  # noqa: E402
from elas.kernels import ops  # noqa: E402
from elas.kernels import reference as ref  # noqa: E402
from elas.kernels.cuda import attention  # noqa: E402
from elas.model.llama import apply_rope, rope_tables  # noqa: E402

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else None
sizes = (sys.argv[2] if len(sys.argv) > 2 else "llama-1b,llama-130m").split(",")
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
SEQ, DEV, BF16 = 256, "cuda", torch.bfloat16


def graphed_ms(fn, reps: int = 50) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with graph_capture(graph):
        fn()
    return event_ms(graph.replay, iters=reps, warmup=5)


def default_attention(q, k, v, cos, sin):
    """What model/llama.py Attention.forward does with attn_backend=torch (q, k, v [b, s, h, hd])."""
    b, s, h, hd = q.shape
    qr, kr = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
    y = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2).reshape(b, s, h * hd)


def run_size(size: str) -> dict:
    cfg = model_preset(f"{size}-lowrank-relu2")
    h, hd = cfg.n_heads, cfg.head_dim
    cos, sin = rope_tables(hd, SEQ, cfg.rope_theta, DEV)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, SEQ, h, hd, device=DEV, dtype=BF16, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, SEQ, h * hd, device=DEV, dtype=BF16)
    row = {"size": size, "batch": batch, "seq": SEQ, "heads": h, "head_dim": hd}

    # the Triton launch settings, each kernel alone
    o, lse, qr, kr = attention.rope_attention_forward(q, k, v, cos, sin, save_rotated=True)
    do = g.view(batch, SEQ, h, hd)
    fwd, bwd = [], []
    # forward: 4 warps at 64- or 128-row blocks, 8 at 128; a register cap at 64-row blocks (maxnreg 96: 5 blocks an
    # SM; benchmarks/attention_regs.py). (The fourteenth session's sweep of 28 settings, h100/attention_sweep.json:
    # 64 x 64, 2 stages best; 16-column key blocks and maxnreg 80 always slower, left out since.)
    fwd_settings = [(64, bn, 4, st, mr) for bn in (32, 64) for st in (2, 3) for mr in (None, 96)]
    fwd_settings += [(128, 64, w, st, None) for w in (4, 8) for st in (2, 3)]
    for bm, bn, w, st, mr in fwd_settings:
        c = {"bm": bm, "bn": bn, "warps": w, "stages": st, "maxnreg": mr}
        try:
            fwd.append((graphed_ms(lambda: attention.rope_attention_forward(q, k, v, cos, sin, c)), c))
        except Exception as e:  # noqa: BLE001 (a setting that does not fit: out of shared memory or registers)
            print(f"  fwd {c}: {type(e).__name__}")
    # backward: 64-row blocks with 4 warps (sub-steps of 64 or 32 rows; maxnreg 168: 3 blocks an SM), 128-row blocks
    # with 8; rowsum(dO * O) inline or in its own pass; each rotating q and k on load or reading the forward's saved
    # rotation (save_rotated: plain loads, which Triton can pipeline, so two stages too). (The fourteenth session's
    # 44 settings: sub 16, maxnreg 128, split and 128-row blocks always slower, so split and 128-row blocks are
    # tried once a side.)
    bwd_settings = [(64, sub, 4, st, pre, False, mr, sv) for sub in (64, 32) for pre in (False, True)
                    for mr in (None, 168) for sv in (False, True) for st in ((1, 2) if sv else (1,))]
    bwd_settings += [(64, 64, 4, 1, True, True, 168, sv) for sv in (False, True)]
    bwd_settings += [(128, 32, 8, 1, False, False, None, sv) for sv in (False, True)]  # (0.340 ms at best before)
    for blk, sub, w, st, pre, split, mr, sv in bwd_settings:
        c = {"blk": blk, "sub": sub, "warps": w, "stages": st, "delta_pre": pre, "split": split, "maxnreg": mr,
             "save_rotated": sv}
        qk = (qr, kr) if sv else (q, k)
        try:
            bwd.append((graphed_ms(lambda: attention.rope_attention_backward(do, *qk, v, o, lse, cos, sin, c,
                                                                              rotated=sv)), c))
        except Exception as e:  # noqa: BLE001
            print(f"  bwd {c}: {type(e).__name__}")
    fwd.sort(key=lambda t: t[0])
    # save_rotated costs the forward its two extra outputs: a backward setting with it is charged that difference
    # (that forward as the best, and capped at 128 registers: its two more stores take it to 130 at 64 x 64, one
    # block an SM fewer; capped, 118 and no spills, attention_regs.py)
    saved_fwd = []
    for c in (fwd[0][1], {**fwd[0][1], "maxnreg": 128}):
        saved_fwd.append((graphed_ms(lambda: attention.rope_attention_forward(q, k, v, cos, sin, c,
                                                                             save_rotated=True)), c))
    fwd_saved_ms, saved_cfg = min(saved_fwd, key=lambda t: t[0])
    extra = fwd_saved_ms - fwd[0][0]
    bwd.sort(key=lambda t: t[0] + (extra if t[1]["save_rotated"] else 0.0))
    best_fwd = saved_cfg if bwd[0][1]["save_rotated"] else fwd[0][1]
    attention.FWD_CONFIG.update(best_fwd)
    attention.BWD_CONFIG.update(bwd[0][1])
    # (triton_fwd_ms: the forward that the chosen backward needs; the forward without the saved rotation beside it)
    row.update(triton_fwd_ms=fwd_saved_ms if bwd[0][1]["save_rotated"] else fwd[0][0],
               triton_fwd_plain_ms=fwd[0][0], triton_fwd_saved_ms=fwd_saved_ms, triton_fwd_saved_config=saved_cfg,
               triton_fwd_config=best_fwd,
               triton_bwd_ms=bwd[0][0], triton_bwd_config=bwd[0][1], fwd_settings=[[t, c] for t, c in fwd],
               bwd_settings=[[t, c] for t, c in bwd])

    # the two forms, forward + backward, and the default's forward alone
    base = torch.compile(default_attention)
    mine = lambda q, k, v, cos, sin: ops.rope_attention(q, k, v, cos, sin).reshape(batch, SEQ, h * hd)  # noqa: E731

    def step(fn):
        def run():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v, cos, sin).backward(g)
        return run

    with torch.no_grad():
        row["default_fwd_ms"] = graphed_ms(lambda: base(q, k, v, cos, sin))
    row["default_ms"] = graphed_ms(step(base))
    row["triton_ms"] = graphed_ms(step(mine))
    row["speedup"] = row["default_ms"] / row["triton_ms"]
    # the best setting of the other save_rotated value, forward + backward through the operator (which form it
    # takes follows BWD_CONFIG): the saved rotation measured whole, its forward's cost included
    other = next((c for _, c in bwd if c["save_rotated"] != bwd[0][1]["save_rotated"]), None)
    if other is not None:
        other_fwd = saved_cfg if other["save_rotated"] else fwd[0][1]
        attention.FWD_CONFIG.update(other_fwd)
        attention.BWD_CONFIG.update(other)
        row["triton_ms_other_saved"] = {"fwd_config": other_fwd, "bwd_config": other, "ms": graphed_ms(step(mine))}
        attention.FWD_CONFIG.update(best_fwd)
        attention.BWD_CONFIG.update(bwd[0][1])

    # outputs and gradients: each form against the fp32 reference (batch element 0), and against each other
    outs = {}
    for name, fn in (("default", base), ("triton", mine)):
        for t in (q, k, v):
            t.grad = None
        y = fn(q, k, v, cos, sin)
        y.backward(g)
        outs[name] = [y.float(), *(t.grad.float() for t in (q, k, v))]
    r_o, _ = ref.rope_attention(q[:1].float(), k[:1].float(), v[:1].float(), cos, sin)
    r_g = ref.rope_attention_backward(do[:1].float(), q[:1].float(), k[:1].float(), v[:1].float(), cos, sin)
    refs = [r_o.reshape(1, SEQ, h * hd), *r_g]
    for name in outs:
        row[f"{name}_err_vs_fp32"] = [((a[:1].reshape(r.shape) - r).abs().max() / r.abs().max()).item()
                                      for a, r in zip(outs[name], refs)]
    row["triton_vs_default"] = [((a - b).abs().max() / b.abs().max()).item()
                                for a, b in zip(outs["triton"], outs["default"])]
    return row


rows = [run_size(s) for s in sizes]
print("| size | batch | heads x head_dim | default fwd+bwd ms | triton fwd+bwd ms | speedup | triton fwd ms (default "
      "fwd) | triton bwd ms | max rel. err vs fp32 (o, dq, dk, dv): default / triton |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    fmt = lambda xs: ", ".join(f"{x:.1e}" for x in xs)  # noqa: E731
    print(f"| {r['size']} | {r['batch']} | {r['heads']}x{r['head_dim']} | {r['default_ms']:.3f} | {r['triton_ms']:.3f} "
          f"| {r['speedup']:.3f}x | {r['triton_fwd_ms']:.3f} ({r['default_fwd_ms']:.3f}) | {r['triton_bwd_ms']:.3f} | "
          f"{fmt(r['default_err_vs_fp32'])} / {fmt(r['triton_err_vs_fp32'])} |")
    best = json.dumps({"fwd": r["triton_fwd_config"], "bwd": r["triton_bwd_config"]})
    print(f"  best settings: ELAS_ATTN_CONFIG='{best}'")
    other = r.get("triton_ms_other_saved")
    print(f"  forward with the saved rotation {r['triton_fwd_saved_ms']:.3f} ms; fwd+bwd with save_rotated="
          f"{not r['triton_bwd_config']['save_rotated']}: " + (f"{other['ms']:.3f} ms" if other else "-"))
if out_dir is not None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "bfloat16", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "command": "python benchmarks/attention.py " + " ".join(sys.argv[1:])}
    (out_dir / "attention.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
