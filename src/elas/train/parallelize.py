"""How a built model is run by the trainer: compiled regions (DDP wraps the result; FSDP2 will live here too).

    compile_regions(model)      # every decoder block and the loss head, torch.compile(fullgraph=True), in place
    with eager_regions(): ...   # forwards that must not compile (evaluation, statistics probes)

Why regions and not `torch.compile(model)`: the decoder's blocks are identical, and a compiled block's graph
guards on the block's structure, not its identity, so all blocks share one compiled graph: compile time is one
block's plus the head's (seconds) instead of the whole unrolled model's (~2 min at 1B, measured on an H200).
Inductor gains little across block boundaries (the residual add is one write either way), and in the trainer the
step is replayed from a CUDA graph (train/step.py), so the embedding and the few eager ops between regions cost
no host time. A sparsity method's mode is an attribute its core reads, so a new mode is one more compile of the
block (per mode of the schedule, not per step); `compile_counts()` lets tests and the log check that.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def compile_regions(model: torch.nn.Module, backend: str = "inductor", fullgraph: bool = True) -> None:
    """Compile `model.blocks[*]` and `model.loss` in place (an elas LLaMA). State-dict keys do not change."""
    for blk in model.blocks:
        blk.compile(backend=backend, fullgraph=fullgraph)
    model.loss = torch.compile(model.loss, backend=backend, fullgraph=fullgraph)  # shadows the bound method


def eager_regions():
    """A context in which compiled regions run their original Python (torch >= 2.6; older: a no-op). Used for
    forwards whose graphs would only add compiles: the statistics probe (its sinks are Python lists) and
    evaluation (no-grad, and a last partial batch of another shape)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else nullcontext()


def compile_counts() -> int:
    """How many graphs dynamo has compiled in this process (all regions, all modes)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])

