"""The training step of every variant in the modes a user can run it, in one process (`elas bench step`).

modes:
  elas           the trainer's default on one GPU: parameters held in bf16 with fp32 masters in MasterAdamW
                 (optim/master.py), every block and the loss head compiled (train/parallelize.py), the whole
                 forward+backward+norm+update replayed from one CUDA graph (train/step.py), the residual stream
                 in bf16 and the chunked LM-head loss (the model's defaults).
  elas-fp32      the same with fp32 parameters under autocast and torch's fused AdamW after the replay (which
                 applies the clipping): the default before MasterAdamW, and what runs with LORO or FSDP2.
  torch.compile  what a user gets without elas: `torch.compile(model)` (whole model, Inductor's default mode, no
                 CUDA graphs) of the same architecture with the textbook numerics (fp32 residual stream, fp32
                 logits into F.cross_entropy), then backward, clip_grad_norm_, fused AdamW.
  eager          the same plain loop without compiling.
All: bf16 autocast (over fp32 parameters, except in mode elas), random tokens, sparsity methods sparse from step 0, clipping at
1.0. step_ms: the mean step time over `steps` back-to-back steps (no host sync in between, as in training; median
of 3 such windows, after `warmup` steps); step_ms_synced: the median of single steps each followed by a sync,
which also exposes the host's work before the step's first kernel. compile_s = the first step's wall time
(compile, warm-up and capture). A profile of each row (bench/profile.py) gives GPU ms per category and the largest kernels.

Variants are names of config.VARIANTS, plus "swiglu-aligned": SwiGLU with its width rounded up to 128 (5504 at
1B, beside the published 5461).
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import time

import torch

from ..build import attn_backend, build_model, ce_kernel, norm_kernel, relu2_kernel
from ..config import D_FF_MULTIPLE, TrainConfig, model_preset, split_variant, train_keys
from ..optim import build_optimizer
from ..summary import model_summary
from ..train.parallelize import checkpoint_blocks, compile_regions, hold_params_in
from ..train.step import StepGrads
from ..train.trainer import peak_flops
from ..sparsity.act24 import Act24Core
from .ffn import set_sparse, variant_config
from .profile import breakdown, busy_ms, kernel_times, top_kernels
from .timing import Clocks, event_ms, throughput_ms

MODES = ("elas", "elas-fp32", "torch.compile", "eager")
STEP_VARIANTS = ("lowrank-relu2", "elas", "elas-mask", "relu2", "relu2-24", "swiglu", "swiglu-aligned")
# the baseline modes: textbook numerics, torch's own attention kernel choice, none of elas's kernels; applied after
# a variant's own keys, so "lowrank-relu2+fuse_qkv=true" under plain torch.compile is plain lowrank-relu2
PLAIN = {"residual_dtype": "fp32", "lm_loss": "logits", "attn_backend": "torch", "relu2_kernel": "torch",
         "norm_kernel": "torch", "rope_kernel": "torch", "fuse_qkv": False, "pdl": False,
         "defer_residual": False, "ce_kernel": "torch"}


def step_config(size: str, variant: str, mode: str, seq: int):
    variant = train_keys(variant)[0]
    over = {"max_seq_len": seq}
    name, sets = split_variant(variant)
    if name == "swiglu-aligned":  # not a preset: SwiGLU with its width rounded up to the GEMM tiles' multiple
        inter = model_preset(size).intermediate
        over["intermediate"] = math.ceil(inter / D_FF_MULTIPLE) * D_FF_MULTIPLE
        variant = "+".join(["swiglu"] + [f"{k}={v}" for k, v in sets.items()])  # its keys kept (+fuse_qkv=true)
    cfg = variant_config(size, variant, **over)
    if not mode.startswith("elas"):
        for k, v in PLAIN.items():
            setattr(cfg, k, v)
    return cfg


def plain_config(size: str, variant: str, seq: int) -> str:
    """What plain torch.compile runs for `variant` (its config with PLAIN's keys), as a short hash: variants that
    differ only in elas's kernel keys share it, so they share one plain row (`vs_torch_compile`)."""
    cfg = dataclasses.asdict(step_config(size, variant, "torch.compile", seq))
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _no_reading():
    raise RuntimeError("clock sampling off (ELAS_BENCH_CLOCKS=0)")


def step_row(size: str, variant: str, mode: str, batch: int, seq: int = 256, steps: int = 10, warmup: int = 3,
             profile: bool = True, optimizer: str = "adamw", checkpointing: bool = False) -> dict:
    if mode not in MODES:
        raise ValueError(f"unknown step mode {mode!r}; expected one of {MODES}")
    torch._dynamo.reset()
    # the previous row's model sits in reference cycles (compile_regions stores each block's compiled forward on
    # the block) with its bf16 parameters and their gradients (allocated in its graph's pool): 4 bytes a
    # parameter, 2.4 GB at 1B, which only Python's occasional full collection freed, one to three rows later
    # (torch.cuda.graph no longer collects on entry unless TORCH_CUDAGRAPH_GC=1). What is still held after this
    # collection is recorded (held_before_gb) and left out of this row's figures.
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    cfg = step_config(size, variant, mode, seq)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda")
    set_sparse(model)
    if mode == "elas":
        hold_params_in(model, torch.bfloat16)
    if checkpointing:  # as the trainer: before compiling
        checkpoint_blocks(model)
    # adamw: MasterAdamW (bf16 parameters) or torch's fused AdamW; loro_adamw: LORO (low-rank variants)
    train = train_keys(variant)[1] if mode == "elas" else {}
    opt = build_optimizer(model, TrainConfig(model=cfg, optimizer=optimizer, **train))
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    grads = None
    if mode.startswith("elas"):
        compile_regions(model)
        grads = StepGrads(model, model, bf16, grad_accum=1, grad_clip=1.0, graphs=True, optimizer=opt)

        def step():
            grads.run([(x, y)], mode=True)
    else:
        fwd = torch.compile(model) if mode == "torch.compile" else model

        def step():
            with bf16():
                loss = fwd(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    # (held: clamped where some of it was freed during the row, e.g. by the capture's own collection)
    resident_gb = max(0, torch.cuda.memory_allocated() - held) / 1e9  # between steps: weights, gradients, optimizer state
    # the SM clock under the step's load (a clock-bound kernel runs slower in a step); ELAS_BENCH_CLOCKS=0 leaves
    # the sampling thread out (to check that it costs the timed step nothing: an NVML read every 50 ms)
    sample = os.environ.get("ELAS_BENCH_CLOCKS", "1") != "0"
    # the warm-up outside the sampled window: plain torch.compile compiles again in its first steps (tens of
    # seconds with the GPU idle), which made its clock and power medians those of an idle GPU (before 2026-12-05)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    with Clocks(read=None if sample else _no_reading) as clocks:
        ms = throughput_ms(step, iters=steps, warmup=0)
    synced = event_ms(step, iters=steps, warmup=0)
    tps = batch * seq / (ms / 1e3)
    row = {"model": size, "variant": variant, "mode": mode, "batch": batch, "seq": seq, "step_ms": ms,
           "activation_checkpointing": checkpointing,
           "step_ms_synced": synced,
           "tokens_per_s": tps, "peak_mem_gb": max(0, torch.cuda.max_memory_allocated() - held) / 1e9,
           "resident_gb": resident_gb, "held_before_gb": held / 1e9,
           # what the process holds from the driver: a captured step's activations live in the graph's pool,
           # reserved between replays but not counted as allocated, so this is the figure that must fit the GPU
           "reserved_gb": torch.cuda.memory_reserved() / 1e9, "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
           "compile_s": compile_s, "warmup_s": warmup_s,  # (warmup_s: the next `warmup` steps, recompiles included)
           "mfu": tps * model_summary(cfg, seq)["train_flops_per_token"] / peak if (peak := peak_flops(torch.device("cuda"))) else None,
           "d_ff": cfg.ffn_width, "rank": cfg.rank, "gpu": torch.cuda.get_device_name(),
           "relu2_kernel": relu2_kernel(cfg, "cuda")[0],  # the dense cores' kernel ("auto" resolved)
           "norm_kernel": norm_kernel(cfg, "cuda"),  # the blocks' norm backward ("auto" resolved)
           "attn_backend": attn_backend(cfg, "cuda"),  # the attention kernel ("auto" resolved)
           "ce_kernel": ce_kernel(cfg, "cuda") if cfg.lm_loss == "chunked" else None,  # the loss's ("auto" resolved)
           # the 2:4 cores' CUTLASS epilogues (act24.cutlass, "auto" resolved); None without an act24 method
           "act24_cutlass": next((m.cutlass for m in model.modules() if isinstance(m, Act24Core)), None),
           **clocks.summary(),
           "plain_config": plain_config(size, variant, seq),
           "torch": torch.__version__}
    if mode == "elas":  # what the optimizer keeps (not what the variant asked for)
        row["optim_state_dtype"] = "bf16" if getattr(opt, "moment_dtype", None) == torch.bfloat16 else "fp32"
    if grads is not None:
        row["graph"] = grads.graphs  # False: the capture failed and the steps ran eagerly (logged)
        row["optimizer_in_graph"] = grads.step_in_graph
    row["param_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    row["optimizer"] = type(opt).__name__
    if profile:
        launches: dict[str, float] = {}
        span: dict[str, float] = {}
        kernels = kernel_times(step, iters=3, launches=launches, span=span)
        row["breakdown_ms"] = breakdown(kernels)
        # (the kernels' union, not their sum: overlapping kernels would count twice and hide idle time)
        row["breakdown_ms"]["idle"] = max(0.0, ms - busy_ms(span))
        # the profiled steps' own span and the gaps between their kernels. Where kernels do not overlap (one
        # stream, as in a captured step) idle - gap_ms = step_ms - profiled_step_ms: time the profiled steps ran
        # faster than the timed ones (their kernels at a higher clock), not time the GPU waited
        row["profiled_step_ms"], row["profiled_gap_ms"] = span["span_ms"], span["gap_ms"]
        row["kernels_ms"] = top_kernels(kernels)
        row["kernel_launches"] = round(sum(launches.values()))  # per step; idle / launches: the gap per kernel
        row["kernel_launches_top"] = top_kernels(launches)
    del model, opt, grads
    gc.collect()  # (the model's cycles: see the row's start)
    return row


def bench_step(sizes=("llama-1b",), batches=(32,), variants=STEP_VARIANTS, modes=MODES, optimizer: str = "adamw",
               seq: int = 256, steps: int = 10, warmup: int = 3, profile: bool = True, log=print,
               on_row=None, checkpointing: bool = False) -> list[dict]:
    """Rows for every (size, batch, variant, mode); a row that fails (out of memory, or any error: a kernel that
    cannot run the shape) is recorded with its error and the next row runs (after a CUDA fault, which poisons the
    process, the later rows record theirs too).
    Mode-major: every variant in the first mode (elas's: the fast one to compile) before any in the next, so a
    call cut off by a time limit keeps a comparable set of rows. checkpointing: every row with activation
    checkpointing per block (the trainer's activation_checkpointing)."""
    for size in sizes:  # a bad variant or option fails here, before any row has run
        for variant in variants:
            for mode in modes:
                step_config(size, variant, mode, seq)
    rows = []
    for size in sizes:
        for batch in batches:
            timed: dict[tuple, str] = {}  # (mode, plain config) -> the variant whose plain row timed it
            for mode, variant in ((m, v) for m in modes for v in variants):
                if not mode.startswith("elas"):  # a plain mode runs one model per plain config: not twice
                    same = timed.setdefault((mode, plain_config(size, variant, seq)), variant)
                    if same != variant:
                        log(f"step {size} b{batch} {variant:>14} {mode:>13}: the same model as {same}'s row "
                            "(elas's kernel keys do not apply in this mode): not timed again")
                        continue
                try:
                    r = step_row(size, variant, mode, batch, seq, steps, warmup, profile, optimizer, checkpointing)
                except Exception as e:  # noqa: BLE001 (recorded in the row and the log, never dropped)
                    what = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
                    first = (str(e).splitlines() or [""])[0][:160]
                    r = {"model": size, "variant": variant, "mode": mode, "batch": batch, "seq": seq,
                         "activation_checkpointing": checkpointing, "error": f"{what}: {first}"}
                    if isinstance(e, torch.OutOfMemoryError):
                        torch.cuda.empty_cache()
                rows.append(r)
                warm = f" (+{r['warmup_s']:.1f} s warm-up)" if "warmup_s" in r else ""
                if r.get("held_before_gb", 0) > 0.1:  # (left out of its memory figures: the previous rows' leftovers)
                    warm += f" [{r['held_before_gb']:.1f} GB held before the row]"
                clock = f" SM {r['sm_clock_mhz']:.0f} MHz {r['power_w']:.0f} W" if "sm_clock_mhz" in r else ""
                log(f"step {size} b{batch} {variant:>14} {mode:>13}: " + (
                    f"{r['step_ms']:7.1f} ms (synced {r['step_ms_synced']:6.1f}) {r['tokens_per_s']:>9,.0f} tok/s "
                    f"peak {r['peak_mem_gb']:5.1f} GB compile {r['compile_s']:5.1f} s{warm}{clock}"
                    if "error" not in r else r["error"]))
                if on_row is not None:
                    on_row(rows)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each measured row with its ratios (tokens/s, > 1: faster). Every ratio against a dense baseline takes that
    baseline in its best measured mode (the fastest of its rows at the same model, batch, seq and activation
    checkpointing, in any form that differs from it only in kernel keys (config.KERNEL_KEYS): `twin_variant`
    names it), never a slower one:
    `vs_twin` (a sparse variant against its dense twin; `twin_mode` says which mode that was) and
    `vs_swiglu_aligned`. `vs_torch_compile` (a dense variant against plain torch.compile of itself: the fast-step
    issue's target) only for dense variants, with `vs_torch_compile_busy` beside it where the plain row was
    profiled: plain compile's GPU-busy time (its step less its idle time, which depends on how fast the host issues
    its launches) over this row's step time; and `vs_elas_fp32` (the same variant with fp32 parameters: what
    MasterAdamW bought) for the elas mode."""
    from ..config import KERNEL_KEYS, VARIANTS

    def setting(r: dict) -> tuple:  # rows compared only at one model, batch, sequence length and checkpointing
        return r["model"], r["batch"], r.get("seq"), bool(r.get("activation_checkpointing", False))
    best: dict[tuple, dict] = {}  # the fastest row of each variant, and of each dense variant in any kernel form
    for r in rows:
        if "error" not in r:
            name, keys = split_variant(r["variant"])
            kinds = [r["variant"]] + ([name] if keys and set(keys) <= set(KERNEL_KEYS) else [])
            for v in kinds:  # ("lowrank-relu2+relu2_kernel=cutlass" is a form of lowrank-relu2: same model)
                k = (*setting(r), v)
                if k not in best or r["tokens_per_s"] > best[k]["tokens_per_s"]:
                    best[k] = r
    key = {(*setting(r), r["variant"], r["mode"]): r for r in rows if "error" not in r}
    out = []
    for r in rows:
        r = dict(r)
        if "error" not in r:
            base = setting(r)
            name = split_variant(r["variant"])[0]  # "elas+act24.fused=true" has elas's twin
            twin = VARIANTS[name].twin if name in VARIANTS else None
            pairs = [("vs_twin", best.get((*base, twin))), ("vs_swiglu_aligned", best.get((*base, "swiglu-aligned")))]
            if twin is None:  # plain torch.compile of the same model: the row with this row's plain config
                plain = key.get((*base, r["variant"], "torch.compile"))
                if r.get("plain_config"):
                    plain = next((x for x in rows if "error" not in x and x["mode"] == "torch.compile"
                                  and setting(x) == base
                                  and x.get("plain_config") == r["plain_config"]), plain)
                pairs.append(("vs_torch_compile", plain))
            if r["mode"] == "elas":
                pairs.append(("vs_elas_fp32", key.get((*base, r["variant"], "elas-fp32"))))
            for name, other in pairs:
                if other is not None and other is not r and other is not key.get((*base, r["variant"], r["mode"])):
                    r[name] = r["tokens_per_s"] / other["tokens_per_s"]
                    if name == "vs_twin":
                        r["twin_mode"], r["twin_variant"] = other["mode"], other["variant"]
                    if name == "vs_torch_compile" and "idle" in other.get("breakdown_ms", {}):
                        r["vs_torch_compile_busy"] = (other["step_ms"] - other["breakdown_ms"]["idle"]) / r["step_ms"]
        out.append(r)
    return out
