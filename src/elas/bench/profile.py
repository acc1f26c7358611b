"""Where a training step's GPU time goes: kernel times from the PyTorch profiler, sorted into categories.

    kernels = kernel_times(step, iters=3)   # {kernel name: ms per step}, CUDA-graph replays included
    breakdown(kernels)                      # {category: ms per step}

The raw kernel table is kept in the benchmark JSON beside the breakdown, so the categories (name patterns below,
first match wins) can be refined and re-applied without a GPU. "idle" (step time minus kernel time) is added by
the caller, which knows the step time.
"""
from __future__ import annotations

import re
from collections import defaultdict

# (category, pattern on the lower-cased kernel name); first match wins
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("sparse GEMM", r"sparse|cusparselt|spmma"),
    ("2:4 fused GEMM", r"^_up_kernel$|^_dgrad_ste_kernel$"),  # GEMM + 2:4 epilogue (kernels/cuda/epilogue.py)
    # elas's Triton kernels (kernels/cuda: sparsify.py's _kernel, _words_kernel, _dense_kernel (the masked dense
    # form) and backwards; sste.py's packed and dense forms). Rows profiled before 2026-12-07 counted _words_kernel,
    # _dense_kernel and _sste_dense_kernel as elementwise
    ("2:4 sparsify/pack", r"^_kernel$|^_words_kernel$|^_dense_kernel$|^_bwd\w*_kernel$|^_sste(_dense)?_kernel$|"
                          r"sparsif|pack24"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn|^_attn_(fwd|bwd)$"),  # (elas's: kernels/cuda/attention.py)
    # (triton_tem_*mm*: Inductor's template GEMMs, max-autotune's, with their fused epilogue ops in the name)
    ("GEMM", r"gemm|nvjet|cutlass|xmma|wgmma|matmul|cublas|splitk|^sm\d\d_|ampere_|^triton_tem_\w*_(b|add)?mm(_|$)"),
    # fused AdamW, clipping's norms (torch's foreach_norm and its cleanup; MasterAdamW's _sumsq_kernel), zeroing of
    # gradients
    ("optimizer", r"adam|multi_tensor_apply|foreach|lpnorm_cleanup|^_sumsq_kernel$"),
    ("CE", r"cross_entropy|nll_loss|log_softmax|logsumexp|softmax|^_xent_grad_kernel$"),  # (elas's: kernels/cuda/xent.py)
    ("copy", r"memcpy|memset|copy|convert|cast|clone|catarray|fill"),
    ("elementwise", r""),  # Inductor's fused kernels and every other pointwise / reduction kernel
)
# a fused kernel that also computes something is elementwise work, not a copy
_ARITH = re.compile(r"add|mul|div|sub|exp|rsqrt|pow|relu|silu|sigmoid|mean|sum|amax|max|where|neg|log|sin|cos|"
                    r"tanh|sqrt|embedding")


# Inductor's generated pointwise / reduction kernels are named after the ops fused into them, including the op they
# feed: triton_poi_fused_sparse_mm_t_view_1 (the transposed operand of a sparse mm), ..._scaled_dot_product_cudnn_
# attention_..._add_cat_mul_... (the rotary embedding before SDPA) are elementwise work, never a GEMM or attention
_INDUCTOR_POINTWISE = re.compile(r"^triton_(poi|red|per)_")
_NOT_POINTWISE = ("sparse GEMM", "2:4 fused GEMM", "attention", "GEMM")
# ATen's launch templates name how they load and store (LoadWithCast, StoreWithCast, gpu_kernel_impl_nocast), not
# what they compute: an add with a bf16 operand (unrolled_elementwise_kernel<CUDAFunctor_add<float>, ...,
# LoadWithCast<2>, StoreWithCast<1>>) is elementwise work, not a copy
_ATEN_LOAD_STORE = re.compile(r"(load|store)withcast|_nocast")


def category(name: str) -> str:
    low = _ATEN_LOAD_STORE.sub("", name.lower())
    pointwise = _INDUCTOR_POINTWISE.match(low) is not None
    for cat, pat in CATEGORIES:
        if pointwise and cat in _NOT_POINTWISE:
            continue
        if re.search(pat, low):
            if cat == "copy" and low.startswith("triton_") and _ARITH.search(low.replace("_to_copy", "")):
                return "elementwise"
            return cat
    return "elementwise"


def breakdown(kernels: dict[str, float]) -> dict[str, float]:
    """{category: ms per step} in CATEGORIES order (categories without kernels omitted)."""
    out: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        out[category(name)] += ms
    return {c: out[c] for c, _ in CATEGORIES if c in out}


def span_and_gaps(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(span, gaps) of kernel intervals [(start, end)], in their unit: the span from the first start to the last
    end, and the part of it that no kernel covers (kernels on two streams overlap: their union is the busy part)."""
    if not intervals:
        return 0.0, 0.0
    ivs = sorted(intervals)
    gaps, end = 0.0, ivs[0][1]
    for start, stop in ivs[1:]:
        gaps += max(0.0, start - end)
        end = max(end, stop)
    return end - ivs[0][0], gaps


def _annotation(e) -> bool:
    """A GPU-side user annotation (record_function's range on the GPU timeline), not a kernel: the profiler says so
    (is_user_annotation), or its name has a '#' outside a lambda's ("Optimizer.step#AdamW.step"; on every version,
    for profilers that do not set the flag)."""
    return bool(getattr(e, "is_user_annotation", False)) or ("#" in e.name and "{lambda" not in e.name)


def busy_ms(span: dict[str, float]) -> float:
    """GPU-busy ms per step from kernel_times' span: the union of the kernels' intervals (span less gaps), which
    counts kernels that overlap (two streams, programmatic dependent launch) once; their summed times would not."""
    return span["span_ms"] - span["gap_ms"]


def kernel_times(step, iters: int = 3, launches: dict[str, float] | None = None,
                 span: dict[str, float] | None = None) -> dict[str, float]:
    """{kernel name: GPU ms per step} over `iters` calls of step() (already warmed up), largest first. launches:
    a dict filled with {kernel name: launches per step} (idle time between a graph's kernels grows with their
    number: the count says whether fewer, larger kernels are the lever). span: a dict filled with the profiled
    steps' own GPU span and the time no kernel covers inside it, ms per step (`span_ms`, `gap_ms`; the span runs
    from the first step's first kernel to the last step's last, so it holds iters - 1 of the gaps between steps).
    The step time of the timed replays less the kernel times mixes real gaps with any clock difference between the
    timed and the profiled steps (a power-bound step's clock moves with its load); these two do not."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    intervals: list[tuple[float, float]] = []  # (start, end) in us
    for e in prof.events():
        # GPU-side user annotations ("Optimizer.step#AdamW.step") span kernels already counted. A '#' alone does not
        # make one: ATen's kernels built from lambdas are named "...direct_copy_kernel_cuda(...)::{lambda()#3}..."
        if e.device_type == DeviceType.CUDA and not _annotation(e):
            total[e.name] += e.time_range.elapsed_us() / 1e3 / iters
            intervals.append((e.time_range.start, e.time_range.end))
            if launches is not None:
                launches[e.name] = launches.get(e.name, 0) + 1 / iters
    if span is not None:
        width, gaps = span_and_gaps(intervals)
        span.update(span_ms=width / 1e3 / iters, gap_ms=gaps / 1e3 / iters)
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def top_kernels(kernels: dict[str, float], n: int = 40, width: int = 160) -> dict[str, float]:
    """The n largest of {kernel name: ms}, names cut to `width` characters; kernels whose cut names coincide
    (template instantiations that differ late in the name) are summed, not overwritten."""
    out: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        out[name[:width]] += ms
    return {k: round(v, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:n]}


def host_times(fn, iters: int = 3, top: int = 15) -> dict[str, float]:
    """{operator or Python-visible CPU event: self CPU ms per call} over `iters` calls of fn() (already warmed
    up), the `top` largest: where the host's time goes when a call is host-bound (GPU idle between kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {e.key[:120]: round(e.self_cpu_time_total / 1e3 / iters, 4) for e in ev}
