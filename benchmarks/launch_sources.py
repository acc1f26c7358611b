"""Which host calls launch a training step's GPU work, and how often: each kernel, memset and memcpy of one step
counted by the op that launched it and that op's parents. Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/launch_sources.py [VARIANT [SIZE [BATCH [OUT.json]]]]
    (default: lowrank-relu2 llama-1b 32)

Why: the 1B step replays ~1,700 kernels from its CUDA graph with ~2 us of idle GPU between two of them
(`kernel_launches` in the step benchmarks), and ~350 of them are memsets whose origin a graph replay hides: inside a
replay the profiler sees device work but no host op. So the step here runs as `elas bench step` builds it (elas
mode: bf16 parameters, compiled regions, MasterAdamW) but with graph capture off, after warm-up steps, so that each
launch reaches the profiler with the op that made it. The counts are per step; the op chain is innermost first
(e.g. `aten::zero_ < ## Call CompiledFxGraph ... ## < CompiledFunctionBackward`).
"""
from __future__ import annotations

import json
import sys
from collections import Counter


def device_kind(name: str) -> str:
    """A device activity's kind and short name: memsets and memcpys by kind, kernels by their first 70 chars."""
    low = name.lower()
    if low.startswith("memset"):
        return "memset"
    if low.startswith("memcpy"):
        return "memcpy " + name.split("(", 1)[-1].rstrip(")")
    return name[:70]


def chain(evt, depth: int = 3) -> str:
    """evt's name and those of up to depth - 1 of its CPU parents, innermost first."""
    names = []
    while evt is not None and len(names) < depth:
        names.append(evt.name[:60])
        evt = evt.cpu_parent
    return " < ".join(names)


def count_sources(events, steps: int = 1, depth: int = 3) -> list[tuple[float, str, str]]:
    """[(launches per step, device activity kind, launching op chain)], most frequent first. events: the
    profiler's function events (each with .name, .kernels [objects with .name], .cpu_parent)."""
    counts: Counter = Counter()
    for evt in events:
        for k in getattr(evt, "kernels", ()) or ():
            counts[(device_kind(k.name), chain(evt, depth))] += 1
    return sorted(((n / steps, kind, ops) for (kind, ops), n in counts.items()), key=lambda t: (-t[0], t[1], t[2]))


def main(variant: str = "lowrank-relu2", size: str = "llama-1b", batch: str = "32", out: str = "") -> None:
    from elas.kernels.cublas import apply_choice
    apply_choice()  # ELAS_CUBLAS_WORKSPACE as elas's commands apply it, before the first GEMM (kernels/cublas.py)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from elas.bench.ffn import set_sparse
    from elas.bench.step import step_config
    from elas.build import build_model
    from elas.config import TrainConfig
    from elas.optim import build_optimizer
    from elas.train.parallelize import compile_regions, hold_params_in
    from elas.train.step import StepGrads

    cfg = step_config(size, variant, "elas", 256)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda")
    set_sparse(model)
    hold_params_in(model, torch.bfloat16)
    opt = build_optimizer(model, TrainConfig(model=cfg))
    compile_regions(model)
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    # as the bench's elas mode, but launched op by op (graphs=False)
    grads = StepGrads(model, model, bf16, grad_accum=1, grad_clip=1.0, graphs=False, optimizer=opt)
    idx = torch.randint(0, cfg.vocab_size, (int(batch), 257), device="cuda")
    batch_ = [(idx[:, :-1], idx[:, 1:])]

    def step():
        grads.run(batch_, mode=True)  # forward, backward, clipping and the optimizer's update
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 2
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = count_sources(prof.events(), steps)
    total = sum(n for n, _, _ in rows)
    kinds = Counter()
    for n, kind, _ in rows:
        kinds["memset" if kind == "memset" else "memcpy" if kind.startswith("memcpy") else "kernel"] += n
    print(f"{variant} {size} batch {batch}, elas mode without graph capture: {total:.0f} launches per step "
          f"({', '.join(f'{k} {v:.0f}' for k, v in kinds.items())})")
    print(f"{'per step':>8}  {'device work':<70}  launched by (innermost first)")
    for n, kind, ops in rows[:40]:
        print(f"{n:8.0f}  {kind:<70}  {ops}")
    if out:
        with open(out, "w") as f:
            json.dump({"variant": variant, "size": size, "batch": int(batch), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(), "launches_per_step": total, "by_kind": kinds,
                       "rows": [{"per_step": n, "device": kind, "ops": ops} for n, kind, ops in rows]}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
