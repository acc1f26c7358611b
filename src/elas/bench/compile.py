"""What `torch.compile(model)` gives each variant: graph and break counts, and the compiled training step.

breaks: `torch._dynamo.explain` on a 2-layer model of the variant, in every mode of its methods (dense warm-up
        and sparse): graph count and break count (the target is 1 / 0).
step:   the whole model (the size's widths, all layers) compiled with `torch.compile(model, fullgraph=True)`
        (Inductor, default mode: no CUDA graphs) with the textbook numerics (fp32 residual stream, fp32 logits:
        bench/step.py's PLAIN), bf16 autocast over fp32 master weights, fused AdamW, random
        tokens, sparse from step 0; median step time over `steps` steps after warm-up (the first call compiles),
        CUDA events. Each variant is measured beside its dense twin (the same model without the method) in the
        same process and the same mode: `ratio_vs_dense` = dense step time / variant step time (> 1: faster).
"""
from __future__ import annotations

import time

import torch

from ..build import build_model
from ..config import COMPILE_VARIANTS, VARIANTS, preset_name
from ..optim import build_optimizer
from .ffn import RUN_STEPS, set_sparse, variant_config
from .timing import event_ms

def graph_breaks(size: str, variant: str, seq: int = 256) -> list[dict]:
    import torch._dynamo as dynamo
    from ..sparsity import set_step
    cfg = variant_config(size, variant, n_layers=2, max_seq_len=seq)
    model = build_model(cfg, "cuda")
    idx = torch.randint(0, cfg.vocab_size, (2, seq), device="cuda")
    rows = []
    for step in (None, 0):  # dense mode (before any set_step the methods are dense), then sparse
        modes = set_step(model, step, RUN_STEPS) if step is not None else ("dense",) * len(cfg.methods)
        dynamo.reset()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ex = dynamo.explain(model)(idx, idx)
        rows.append({"modes": list(modes), "graphs": ex.graph_count, "breaks": ex.graph_break_count,
                     "break_reasons": [str(r.reason)[:200] for r in ex.break_reasons]})
    return rows


def compiled_step_ms(size: str, variant: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    from ..config import TrainConfig
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    from .step import PLAIN
    cfg = variant_config(size, variant, max_seq_len=seq, **PLAIN)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda")
    set_sparse(model)
    opt = build_optimizer(model, TrainConfig(model=cfg))
    cmodel = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cmodel(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # compiles
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    ms = event_ms(step, iters=steps, warmup=warmup)
    return {"model": size, "variant": variant, "preset": preset_name(size, variant), "batch": batch, "seq": seq,
            "compiled_step_ms": ms, "compile_s": compile_s, "tokens_per_s": batch * seq / (ms / 1e3),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def bench_compile(size: str = "llama-1b", variants=None, batch: int = 32, seq: int = 256, steps: int = 10,
                  warmup: int = 3, log=print, on_row=None) -> list[dict]:
    rows, dense = [], {}
    asked = list(variants or COMPILE_VARIANTS)
    order: list[str] = []  # each variant's dense twin measured too (its ratio needs it, in this process), and first
    for v in asked:
        order += [w for w in (VARIANTS[v].twin, v) if w and w not in order]
    if len(order) > len(asked):
        log(f"compile {size}: also measuring the dense twins {', '.join(w for w in order if w not in asked)}, "
            f"which the ratios are taken against")
    for v in order:
        twin = VARIANTS[v].twin
        row = {"variant": v, "dense_twin": twin, "breaks": graph_breaks(size, v, seq)}
        row.update(compiled_step_ms(size, v, batch, seq, steps, warmup))
        dense[v] = row["compiled_step_ms"]
        if twin in dense:
            row["dense_twin_step_ms"] = dense[twin]
            row["ratio_vs_dense"] = dense[twin] / row["compiled_step_ms"]
        rows.append(row)
        b = row["breaks"]
        log(f"compile {size} {v:>13}: graphs/breaks " + ", ".join(f"{r['modes']}: {r['graphs']}/{r['breaks']}"
                                                               for r in b)
            + f"; step {row['compiled_step_ms']:.1f} ms (compile {row['compile_s']:.0f} s)"
            + (f", {row['ratio_vs_dense']:.3f}x its dense twin" if "ratio_vs_dense" in row else ""))
        if on_row is not None:
            on_row(rows)
    return rows
