"""Inference speed of each variant beside its dense twin, in one process (`elas bench infer`).

Per (size, variant): parameters in bf16, the sparsity methods in their sparse mode, every block compiled
(train/parallelize.compile_regions), then
  prefill:  one forward of [batch, prompt] tokens (no grad): ms (mean of back-to-back calls) and tokens/s. With
            2:4 activations this runs the packed FFN on sparse tensor cores (batch x prompt is a multiple of 64).
            Also replayed from a CUDA graph (prefill_graph_ms: the same kernels without the host's per-call work,
            for a server that captures its prompt shapes) and profiled (GPU ms by category, idle, host items);
  decode:   batch 1, a static KV cache after a prompt of `prompt` tokens, the decode step (the blocks' eager
            kernels: a compiled block would recompile for every layer index) captured as a CUDA graph
            (model/generate.GraphDecoder): ms per token over `new_tokens` replays; decode_compiled_ms_per_token:
            the same with the whole decode step compiled as one graph first (an error there is recorded). One token is not a
            multiple of 64 tokens, so a 2:4 variant's FFN runs its masked reference path here (emulated, said in
            the row): decode is not where 2:4 activations pay.
Ratios (`vs_twin`, > 1: faster) against the dense twin's row.
"""
from __future__ import annotations

import gc

import torch

from ..build import build_model
from ..config import VARIANTS
from ..train.parallelize import compile_regions, eager_regions, hold_params_in
from .ffn import set_sparse, variant_config
from .profile import breakdown, busy_ms, host_times, kernel_times, top_kernels
from .timing import capture_graph, throughput_ms

INFER_VARIANTS = ("lowrank-relu2", "elas", "relu2", "relu2-24")


def infer_row(size: str, variant: str, batch: int = 8, prompt: int = 512, new_tokens: int = 128,
              profile: bool = True) -> dict:
    torch._dynamo.reset()
    gc.collect()  # the previous row's model: in compile_regions' reference cycles, with its weights on the GPU
    torch.cuda.empty_cache()
    cfg = variant_config(size, variant, max_seq_len=prompt + new_tokens + 1)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda")
    hold_params_in(model, torch.bfloat16)
    set_sparse(model)
    model.eval()
    compile_regions(model)
    x = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        prefill_ms = throughput_ms(lambda: model(x), iters=5, warmup=2)
        if profile:  # GPU time by category, the idle rest (host-bound?), and the host's largest items
            span: dict[str, float] = {}
            kernels = kernel_times(lambda: model(x), iters=3, span=span)
            idle = max(0.0, prefill_ms - busy_ms(span))  # (the kernels' union: overlapping ones count once)
            prof = {"prefill_breakdown_ms": {**breakdown(kernels), "idle": idle},
                    "prefill_kernels_ms": top_kernels(kernels, 25),
                    "prefill_host_ms": host_times(lambda: model(x))}
        prefill_graph_ms = throughput_ms(capture_graph(lambda: model(x), warmup=2).replay, iters=5, warmup=2)
        decode_ms, n = _decode_ms(model, x[:1], cfg.max_seq_len, new_tokens, compile=False)
        try:  # the decode step compiled as one graph (blocks inlined), then captured
            compiled_ms, _ = _decode_ms(model, x[:1], cfg.max_seq_len, new_tokens, compile=True)
        except Exception as e:  # recorded in the row, not hidden
            compiled_ms = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    packed = any(getattr(c, "packed", False) for a_ in getattr(model, "_elas_methods", []) for _, c in a_.targets)
    row = {"model": size, "variant": variant, "batch": batch, "prompt": prompt, "prefill_ms": prefill_ms,
           "prefill_tokens_per_s": batch * prompt / (prefill_ms / 1e3), "prefill_graph_ms": prefill_graph_ms,
           "decode_ms_per_token": decode_ms, "decode_compiled_ms_per_token": compiled_ms, "decode_tokens": n,
           "packed_prefill": packed, "decode_path": "masked reference (1 token)" if packed else "dense",
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, **(prof if profile else {})}
    del model
    gc.collect()
    return row


def _decode_ms(model, prompt: torch.Tensor, max_len: int, new_tokens: int, compile: bool) -> tuple[float, int]:
    """ms per token of the captured decode step (GraphDecoder) after a prefill of `prompt` [1, p] into a fresh
    static cache, over up to `new_tokens` replays; compile: the step compiled first (generate.decode_step)."""
    from ..model.generate import GraphDecoder
    from ..model.llama import KVCache
    cache = KVCache(len(model.blocks), max_len, static=True)
    with eager_regions():  # a compiled block would recompile per layer index and cache position
        model(prompt, cache=cache)
        if not compile:
            dec = GraphDecoder.capture(model, cache)
    if compile:  # outside eager_regions: its stance would keep this compile from running too
        dec = GraphDecoder.capture(model, cache, compile=True)
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    dec.step(tok)  # the first replay
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = min(new_tokens, cache.max_len - cache.pos)
    a.record()
    for _ in range(n):
        dec.step(tok)
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n, n


def bench_infer(sizes=("llama-1b",), variants=INFER_VARIANTS, batch: int = 8, prompt: int = 512,
                new_tokens: int = 128, log=print, on_row=None) -> list[dict]:
    """on_row(rows): called after each row with the rows so far (the CLI writes them)."""
    rows = []
    for size in sizes:
        for variant in variants:
            try:
                r = infer_row(size, variant, batch, prompt, new_tokens)
            except torch.OutOfMemoryError as e:
                r = {"model": size, "variant": variant, "error": "out of memory: " + str(e).splitlines()[0][:120]}
                torch.cuda.empty_cache()
            rows.append(r)
            log(f"infer {size} {variant:>14}: " + (
                f"prefill {r['prefill_ms']:.2f} ms ({r['prefill_tokens_per_s']:,.0f} tok/s; captured "
                f"{r['prefill_graph_ms']:.2f} ms), decode "
                f"{r['decode_ms_per_token']:.3f} ms/token (compiled: {r['decode_compiled_ms_per_token']})"
                if "error" not in r else r["error"]))
            if on_row is not None:  # the rows so far, written out: a cut-off call keeps them
                on_row(with_twin_ratios([dict(x) for x in rows]))
            if "prefill_breakdown_ms" in r:
                log("  prefill GPU ms: " + ", ".join(f"{k} {v:.2f}" for k, v in r["prefill_breakdown_ms"].items()))
                log("  prefill host ms: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                    list(r["prefill_host_ms"].items())[:8]))
    return with_twin_ratios(rows)


def with_twin_ratios(rows: list[dict]) -> list[dict]:
    """Each row with prefill_vs_twin, prefill_graph_vs_twin, decode_vs_twin and decode_compiled_vs_twin (> 1:
    faster than the dense twin), every one against the twin in its best measured mode (prefill: called or
    replayed from a CUDA graph, the faster, named in twin_prefill_mode; decode: captured, or compiled and
    captured), never a slower one."""
    by = {(r["model"], r["variant"]): r for r in rows if "error" not in r}
    out = []
    for r in rows:
        r = dict(r)
        twin = VARIANTS[r["variant"]].twin if r.get("variant") in VARIANTS else None
        t = by.get((r.get("model"), twin))
        if t is not None and "error" not in r:
            modes = {"called": t["prefill_ms"], **({"captured": t["prefill_graph_ms"]} if "prefill_graph_ms" in t
                                                    else {})}
            r["twin_prefill_mode"] = min(modes, key=modes.get)
            best = modes[r["twin_prefill_mode"]]
            r["prefill_vs_twin"] = best / r["prefill_ms"]
            if "prefill_graph_ms" in r:
                r["prefill_graph_vs_twin"] = best / r["prefill_graph_ms"]
            dec = [v for v in (t["decode_ms_per_token"], t.get("decode_compiled_ms_per_token"))
                   if isinstance(v, float)]  # the twin's best decode mode (a failed one is a string)
            r["decode_vs_twin"] = min(dec) / r["decode_ms_per_token"]
            if isinstance(r.get("decode_compiled_ms_per_token"), float):
                r["decode_compiled_vs_twin"] = min(dec) / r["decode_compiled_ms_per_token"]
        out.append(r)
    return out
