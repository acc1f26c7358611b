"""How a built model is run by the trainer: compiled regions, then DDP (the default) or FSDP2 over processes.

    hold_params_in(model, bf16) # parameters in bf16 (the optimizer keeps fp32 masters: optim/master.py)
    checkpoint_blocks(model)    # optional: each block recomputes its activations in the backward
    compile_regions(model)      # every decoder block and the loss head, torch.compile(fullgraph=True), in place
    with eager_regions(): ...   # forwards that must not compile (evaluation, statistics probes)
    shard_fsdp(model, device)   # FSDP2: fully_shard every block, then the root (parameters become DTensors)
    wrap_ddp(model, device)     # or DDP: replicated, gradients all-reduced
    grad_sync(model, ddp)       # the context that skips the gradient reduction of a non-final micro-batch

Why regions and not `torch.compile(model)`: the decoder's blocks are identical, and a compiled block's graph
guards on the block's structure, not its identity, so all blocks share one compiled graph: compile time is one
block's plus the head's (seconds) instead of the whole unrolled model's (~2 min at 1B, measured on an H200).
Inductor gains little across block boundaries (the residual add is one write either way), and in the trainer the
step is replayed from a CUDA graph (train/step.py), so the embedding and the few eager ops between regions cost
no host time. A sparsity method's mode is an attribute its core reads, so a new mode is one more compile of the
block (per mode of the schedule, not per step); `compile_counts()` lets tests and the log check that.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


def hold_params_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter in `dtype`, in place (the same Parameter objects); buffers keep theirs (a method's
    fp32 tables, e.g. the token permutation's keys, must not be rounded)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder block, in place: under autograd a block's forward saves only its
    inputs, and its activations are recomputed during the backward (torch.utils.checkpoint, non-reentrant);
    without grad (evaluation, generation, probes) it runs as before. Apply before compile_regions (the compiled
    block then traces the checkpoint, which Inductor lowers as recomputation) and before sharding. Module and
    state-dict names do not change. Sparsity methods recompute exactly: their selections are deterministic."""
    from torch.utils.checkpoint import checkpoint
    for blk in model.blocks:
        if getattr(blk, "_elas_checkpointed", False):
            continue
        forward = blk.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        blk.forward = checkpointed
        blk._elas_checkpointed = True


def compile_regions(model: torch.nn.Module, backend: str = "inductor", fullgraph: bool = True) -> None:
    """Compile `model.blocks[*]` and `model.loss` in place (an elas LLaMA). State-dict keys do not change.
    The model's `cfg.pdl` passes Inductor's triton.enable_pdl to these regions only."""
    kw = {"backend": backend, "fullgraph": fullgraph}
    if backend == "inductor" and compile_options(model.cfg):
        kw["options"] = compile_options(model.cfg)
    for blk in model.blocks:
        blk.compile(**kw)
    model.loss = torch.compile(model.loss, **kw)  # shadows the bound method


def allow_mode_graphs(modes: int) -> int:
    """Let every compiled region hold one graph per mode of the run's method schedule, for training and for
    no-grad evaluation (2 x modes, and 2 to spare). Dynamo's default, 8 graphs per code object, is a hard failure
    under fullgraph=True: two methods switching at different steps (five mode combinations) stopped a run at its
    fifth. Returns the limit now in force (raised, never lowered)."""
    import torch._dynamo.config as dynamo
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # (torch < 2.6)
    setattr(dynamo, name, max(getattr(dynamo, name), 2 * modes + 2))
    return getattr(dynamo, name)


def compile_options(cfg) -> dict:
    """The Inductor options a model config asks of its compiled regions ({} for none). Raises ValueError (one
    line) where this torch lacks one: the trainer calls it before reading any data."""
    if not getattr(cfg, "pdl", False):
        return {}
    import torch._inductor.config as inductor
    if not hasattr(inductor.triton, "enable_pdl"):
        raise ValueError(f"model.pdl=true needs Inductor's triton.enable_pdl, which torch {torch.__version__} "
                         "lacks: use a newer torch or model.pdl=false")
    return {"triton.enable_pdl": True}


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



def shard_fsdp(model: torch.nn.Module, device: torch.device, bf16: bool) -> None:
    """FSDP2 over all processes of the default group: one `fully_shard` per decoder block (its parameters are
    gathered just before it runs and freed after), then one for the root (embedding, final norm, LM head).
    bf16: parameters gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy); the fp32 shards
    stay the optimizer's master weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """DDP over all processes of the default group: the model replicated, gradients all-reduced in buckets
    during backward (once per optimizer step: accumulation steps run under its no_sync)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(model: torch.nn.Module, ddp=None):
    """A factory of contexts in which backward accumulates gradients without reducing them across processes:
    DDP's no_sync, or FSDP2's set_requires_gradient_sync(False). None for a single process."""
    if ddp is not None:
        return ddp.no_sync
    if not hasattr(model, "set_requires_gradient_sync"):  # not sharded
        return None

    @contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    return no_sync


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")
