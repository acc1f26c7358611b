"""FFN and training-step benchmarks of the five variants the papers compare, in one process.

ffn: one FFN block of the model (its real widths, ranks and 2:4 options), bf16 weights, forward+backward timed
     as CUDA-graph replays (GPU time: `ffn_ms`) and eagerly with CUDA events (`ffn_ms_eager`, host overhead
     included), medians; FFN activation memory = bytes autograd saves in the FFN's forward (unique storages,
     parameters excluded).
step: the whole model, bf16 autocast over fp32 master weights, fused AdamW, random tokens; the trainer's own step
     (train/step.py) timed with CUDA events (medians): `step_ms` with the forward+backward replayed from a CUDA
     graph (the trainer's default; `step_timing` says "eager" where the capture failed, e.g. out of memory),
     `step_ms_eager` without; peak memory from the allocator for each (`peak_mem_gb`: the mode of `step_ms`);
     MFU from the dense-equivalent FLOPs.
"""
from __future__ import annotations

import torch

from ..build import build_model, resolve_methods
from ..config import BENCH_VARIANTS, model_preset, preset_name
from ..sparsity import method_to_dict, set_step
from ..summary import model_summary
from ..train.step import StepGrads
from .timing import event_ms, graph_ms

VARIANTS = list(BENCH_VARIANTS)
BATCH = {"llama-60m": 256, "llama-130m": 256, "llama-350m": 128, "llama-1b": 64}  # per-GPU batch of ELAS/LORO
H100_BF16 = 989e12


def variant_config(size: str, variant: str, **over):
    """The preset of (size, variant) with its methods' schedules at 0: sparse from step 0."""
    cfg = model_preset(preset_name(size, variant), **over)
    cfg.methods = [method_to_dict(m.scaled(0)) for m in resolve_methods(cfg)]
    return cfg


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while fn() runs its forward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()  # the output (and its graph) is dropped here: nothing of this eager pass may outlive it
    return sum(seen.values())


def _ffn_row(size: str, variant: str, batch: int, seq: int) -> dict:
    """One FFN block of (size, variant); everything it allocates is freed when it returns."""
    cfg = variant_config(size, variant)
    torch.manual_seed(0)
    model = build_model(cfg.__class__(**{**vars(cfg), "n_layers": 1}), "cuda").to(torch.bfloat16)
    set_step(model, 0, 1)
    ffn = model.blocks[0].ffn
    x = torch.randn(batch, seq, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    act = saved_bytes(lambda: ffn(x))
    eager = event_ms(lambda: ffn(x).backward(gy), iters=20, warmup=5)
    x.grad = None  # let the capture's warm-up allocate the gradients (on its own stream), as the trainer does
    ffn.zero_grad(set_to_none=True)
    try:
        ms = graph_ms(lambda: ffn(x).backward(gy), reps=10, trials=7)
    except RuntimeError as e:  # reported, not hidden: the row says which timing it holds
        print(f"ffn {size} {variant}: CUDA-graph capture failed ({str(e).splitlines()[0][:120]}); eager time only")
        ms = None
    core = ffn.core if hasattr(ffn, "core") else None
    path = core.description.split(" (")[0] if getattr(core, "description", None) else "dense"
    return {"model": size, "variant": variant, "batch": batch, "seq": seq, "d_ff": cfg.ffn_width, "rank": cfg.rank,
            "ffn_ms": ms if ms is not None else eager, "ffn_ms_eager": eager,
            "ffn_timing": "graph" if ms is not None else "eager", "ffn_act_mem_gb": act / 1e9, "path": path}


def bench_ffn(sizes=None, seq: int = 256, log=print, batch_scale: float = 1.0) -> list[dict]:
    rows = []
    for size in sizes or list(BATCH):
        for variant in VARIANTS:
            r = _ffn_row(size, variant, int(BATCH[size] * batch_scale), seq)
            torch.cuda.empty_cache()
            rows.append(r)
            log(f"ffn {size} {variant:>13}: {r['ffn_ms']:.3f} ms fwd+bwd ({r['ffn_timing']}; eager "
                f"{r['ffn_ms_eager']:.3f}), saved activations "
                f"{r['ffn_act_mem_gb']:.3f} GB ({r['path']})")
    return rows


def _step_row(size: str, variant: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """Whole-model training steps of (size, variant); peak memory counts only this model (the previous one is
    freed when its call returned)."""
    from ..config import TrainConfig
    from ..optim import build_optimizer
    cfg = variant_config(size, variant, max_seq_len=seq)
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.reset_accumulated_memory_stats()
    model = build_model(cfg, "cuda")
    set_step(model, 0, 1)
    opt = build_optimizer(model, TrainConfig(model=cfg))
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    micro = [(idx[:, :-1], idx[:, 1:])]

    def timed(graphs: bool) -> float | None:
        grads = StepGrads(model, model, lambda: torch.autocast("cuda", dtype=torch.bfloat16), 1, 1.0, graphs=graphs)

        def step():
            grads.run(micro, mode=True)
            opt.step()
            if not graphs:
                opt.zero_grad(set_to_none=True)

        ms = event_ms(step, iters=steps, warmup=warmup)
        return ms if grads.graphs == graphs else None  # None: the capture failed (logged); the steps ran eagerly

    eager = timed(False)
    eager_peak = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = timed(True)
    except torch.OutOfMemoryError:  # the capture failed for memory and so did the eager steps after it (step.py)
        print(f"step {size} {variant}: out of memory after a failed CUDA-graph capture; eager timing only")
        ms = None
    timing = "graph" if ms is not None else "eager"
    ms = ms if ms is not None else eager
    tps = batch * seq / (ms / 1e3)
    return {"model": size, "variant": variant, "batch": batch, "seq": seq, "step_ms": ms, "step_ms_eager": eager,
            "step_timing": timing, "peak_mem_gb_eager": eager_peak, "tokens_per_s": tps,
            "mfu": tps * model_summary(cfg, seq)["train_flops_per_token"] / H100_BF16,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if timing == "graph" else eager_peak,
            # allocator retries (cudaFree + cudaMalloc after an OOM) mean the step ran at the memory limit,
            # which slows it for reasons other than its kernels
            "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
            "params": sum(p.numel() for p in model.parameters())}


def bench_step(sizes=None, seq: int = 256, steps: int = 8, warmup: int = 3, batch_scale: float = 1.0,
               log=print) -> list[dict]:
    ffn_rows = {(r["model"], r["variant"]): r for r in bench_ffn(sizes, seq, log, batch_scale)}
    rows = []
    for size in sizes or list(BATCH):
        for variant in VARIANTS:
            r = _step_row(size, variant, int(BATCH[size] * batch_scale), seq, steps, warmup)
            f = ffn_rows[(size, variant)]
            row = {**{k: r[k] for k in ("model", "variant", "batch", "seq")},
                   **{k: f[k] for k in ("ffn_ms", "ffn_ms_eager", "ffn_timing", "ffn_act_mem_gb", "path")},
                   **{k: v for k, v in r.items() if k not in ("model", "variant", "batch", "seq")}}
            rows.append(row)
            log(f"step {size} {variant:>13}: {r['step_ms']:.1f} ms (eager {r['step_ms_eager']:.1f}), {r['tokens_per_s']:,.0f} tok/s, MFU "
                f"{r['mfu']:.3f}, peak {r['peak_mem_gb']:.1f} GB, alloc retries {r['alloc_retries']}")
    return rows
