"""FFN benchmark of the variants the papers compare, in one process (the whole step: bench/step.py).

ffn: one FFN block of the model (its real widths, ranks and 2:4 options), bf16 weights, forward+backward timed
     as CUDA-graph replays (GPU time: `ffn_ms`), eagerly with CUDA events (`ffn_ms_eager`, host overhead
     included), and compiled by `torch.compile` then replayed from a CUDA graph (`ffn_ms_compiled`: the mode a
     trainer runs, and the one ratios against the dense FFN must use: `ffn_ms_best` is the faster of the two
     graph timings), medians; FFN activation memory = bytes autograd saves in the FFN's forward (unique storages,
     parameters excluded).
"""
from __future__ import annotations

import torch

from ..build import build_model, relu2_kernel, resolve_methods
from ..config import BENCH_VARIANTS, apply_overrides, model_preset, preset_name, split_variant
from ..sparsity import method_to_dict, set_step
from ..kernels.cuda.gemm import capture_failure, capture_origin
from .timing import event_ms, graph_ms

VARIANTS = list(BENCH_VARIANTS)
BATCH = {"llama-60m": 256, "llama-130m": 256, "llama-350m": 128, "llama-1b": 64}  # per-GPU batch of ELAS/LORO


def variant_config(size: str, variant: str, **over):
    """The preset of (size, variant) with its methods' schedules at 0: sparse from step 0. A variant may set
    model keys as `--set` does (METHOD.KEY for a key of one of its methods): "relu2-w24+sste24.backend=cuda"."""
    name, sets = split_variant(variant)
    cfg = model_preset(preset_name(size, name), **over)
    if sets:
        try:
            apply_overrides(cfg, sets)
            resolve_methods(cfg)  # a key no method has fails here
        except KeyError as e:  # an unknown key: one line, as a bad value
            raise ValueError(f"variant {name!r}: {e.args[0]}") from None
    cfg.methods = [method_to_dict(m.scaled(0)) for m in resolve_methods(cfg)]
    return cfg


SPARSE_STEP, RUN_STEPS = 0, 10 ** 9  # step 0 of a long run: with the schedules at 0 every method is sparse


def set_sparse(model) -> tuple:
    """Every sparsity method of a bench model (built from variant_config) in its sparse phase. Fails if one is
    not: the third paper's methods end their sparse phase at a fraction of the run (sparse_until), so a run of one
    step would put it in its final dense phase and the row would time dense GEMMs under a sparse name."""
    modes = set_step(model, SPARSE_STEP, RUN_STEPS)
    dense = [m for m in modes if not str(m).startswith("sparse")]
    if dense:
        raise RuntimeError(f"bench model not in its sparse phase (modes {modes})")
    return modes


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
    set_sparse(model)
    ffn = model.blocks[0].ffn
    x = torch.randn(batch, seq, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    act = saved_bytes(lambda: ffn(x))
    capture_error = None
    eager = event_ms(lambda: ffn(x).backward(gy), iters=20, warmup=5)
    # compiled first: a failed capture can leave the process's later CUDA work failing ("operation failed due to
    # a previous error during capture"), and the compiled FFN is the one the trainer runs
    compiled = _compiled_ms(ffn, x, gy, f"{size} {variant}")
    x.grad = None  # let the capture's warm-up allocate the gradients (on its own stream), as the trainer does
    ffn.zero_grad(set_to_none=True)
    try:
        ms = graph_ms(lambda: ffn(x).backward(gy), reps=10, trials=7)
    except RuntimeError as e:  # reported, not hidden: the row says which timing it holds
        where = capture_origin(e)
        print(f"ffn {size} {variant}: CUDA-graph capture failed ({capture_failure(e)}) at {where}; eager time only")
        ms, capture_error = None, f"{capture_failure(e)} at {where}"
    core = ffn.core if hasattr(ffn, "core") else None
    parts = [core.description.split(" (")[0]] if getattr(core, "description", None) else []
    if hasattr(ffn.up, "packed"):  # a weight method's linears (S-STE): their own products' path
        parts.append(f"{type(ffn.up).__name__} " + ("on sparse tensor cores" if ffn.up.packed else "emulated"))
    path = "; ".join(parts) or "dense"
    return {"model": size, "variant": variant, "batch": batch, "seq": seq, "d_ff": cfg.ffn_width, "rank": cfg.rank,
            "ffn_ms": ms if ms is not None else eager, "ffn_ms_eager": eager, "ffn_ms_compiled": compiled,
            # the faster graph replay (uncompiled or compiled); the eager time only where neither captured
            "ffn_ms_best": min([t for t in (ms, compiled) if t is not None] or [eager]),
            "ffn_timing": "graph" if ms is not None else "eager", "ffn_act_mem_gb": act / 1e9, "path": path,
            "relu2_kernel": relu2_kernel(cfg, "cuda")[0],  # the dense core's kernel ("auto" resolved)
            **({"capture_error": capture_error} if capture_error else {})}


def _compiled_ms(ffn, x, gy, name: str) -> float | None:
    """GPU time of the compiled FFN's forward+backward, replayed from a CUDA graph; None (and said) if it does not
    compile or capture. A fresh compile per row: dynamo's cache is reset so one row's graphs never serve another."""
    torch._dynamo.reset()
    cffn = torch.compile(ffn)
    try:
        for _ in range(3):  # compile forward and backward, then let the autotuned kernels settle
            cffn(x).backward(gy)
        x.grad = None
        ffn.zero_grad(set_to_none=True)
        return graph_ms(lambda: cffn(x).backward(gy), reps=10, trials=7)
    except Exception as e:  # reported, not hidden: the row's compiled column stays empty
        print(f"ffn {name}: compiled timing failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None
    finally:
        torch._dynamo.reset()


def bench_ffn(sizes=None, seq: int = 256, log=print, batch_scale: float = 1.0, variants=None,
              on_row=None) -> list[dict]:
    """Rows for every (size, variant); variants default to BENCH_VARIANTS and may set keys (variant_config);
    on_row(rows so far) after each row, so that a run cut off keeps what it measured."""
    variants = list(variants or VARIANTS)
    for size in sizes or list(BATCH):  # a bad size, variant or key fails here, before any GPU work
        if size not in BATCH:
            raise ValueError(f"unknown ffn bench size {size!r}; expected one of {', '.join(BATCH)}")
        for variant in variants:
            variant_config(size, variant)
    rows = []
    for size in sizes or list(BATCH):
        for variant in variants:
            r = _ffn_row(size, variant, int(BATCH[size] * batch_scale), seq)
            torch.cuda.empty_cache()
            rows.append(r)
            if on_row is not None:
                on_row(rows)
            comp = "-" if r["ffn_ms_compiled"] is None else f"{r['ffn_ms_compiled']:.3f}"
            log(f"ffn {size} {variant:>13}: {r['ffn_ms']:.3f} ms fwd+bwd ({r['ffn_timing']}; compiled {comp}; eager "
                f"{r['ffn_ms_eager']:.3f}), saved activations "
                f"{r['ffn_act_mem_gb']:.3f} GB ({r['path']})")
    return rows
