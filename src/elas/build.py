"""build_model(cfg): construct the decoder, then apply the configured sparsity methods to it from outside.

    model = build_model(model_preset("llama-60m-elas"), "cuda")

is `LLaMA(cfg)` on the device, its dense ReLU^2 cores swapped for `FusedReLU2` when `cfg.relu2_kernel` says
fused (Triton GEMMs) or cutlass (also "auto" where the CUTLASS library can run: `relu2_kernel`), then
`sparsify_(model, m)` for each of `cfg.methods` (elas.sparsity), in order.
`resolve_methods(cfg)` validates the method list alone (no model is built): the trainer calls it first, so a bad
method key is one line before any data is read.
"""
from __future__ import annotations

import functools

import torch

from . import kernels
from .kernels import ops
from .config import ModelConfig
from .model.ffn import DenseReLU2, FusedReLU2
from .model.llama import LLaMA
from .sparsity import SparsityMethod, method_from_dict, sparsify_


def resolve_methods(cfg: ModelConfig) -> list[SparsityMethod]:
    return [method_from_dict(m) for m in cfg.methods]


def relu2_kernel(cfg: ModelConfig, device: str | torch.device) -> tuple[str, str]:
    """(the dense ReLU^2 cores' kernel that cfg.relu2_kernel gives on `device`, why): "auto" is cutlass where the
    library can run there (kernels/cuda/cutlass_relu2.available), else torch; any other value is itself."""
    if cfg.relu2_kernel != "auto":
        return cfg.relu2_kernel, "set"
    if cfg.ffn != "relu2":
        return "torch", "no ReLU^2 FFN"
    from .kernels.cuda import cutlass_relu2
    ok, why = cutlass_relu2.available(device)
    return ("cutlass" if ok else "torch"), why


def act24_cutlass(cfg: ModelConfig, device: str | torch.device) -> list[tuple[int, bool, str]]:
    """act24.cutlass=auto resolved for `device` (sparsity/act24.resolve_cutlass) and written into cfg.model's method
    dicts, so that a run records what it took (as relu2_kernel=auto): [(method index, cutlass, why)] for each
    resolved."""
    from .sparsity.act24 import Act24Config, resolve_cutlass
    out = []
    for i, m in enumerate(cfg.methods):
        c = method_from_dict(m)
        if isinstance(c, Act24Config) and c.cutlass == "auto":
            use, why = resolve_cutlass(c, device)
            cfg.methods[i] = {**m, "cutlass": use}
            out.append((i, use, why))
    return out


def norm_kernel(cfg: ModelConfig, device: str | torch.device) -> str:
    """The blocks' RMSNorm backward that cfg.norm_kernel gives on `device`: "auto" is fused (the one-pass Triton
    kernel: 1.007x the 1B step on an H200, 0.76 ms on an H100) on CUDA where Triton is installed, else torch
    (on the CPU the fused op would run its reference, no faster than autograd); any other value is itself."""
    if cfg.norm_kernel != "auto":
        return cfg.norm_kernel
    return "fused" if _triton_on_cuda(device) else "torch"


def ce_kernel(cfg: ModelConfig, device: str | torch.device) -> str:
    """The chunked LM loss's per-chunk kernel that cfg.ce_kernel gives on `device`: "auto" is triton (one pass over
    each chunk's logits, kernels/cuda/xent.py: 0.9-1.0 ms less a 1B step on two H100 hosts) on CUDA where Triton
    is installed, else torch (on the CPU the op would run its reference, no faster than the torch ops; with
    lm_loss=logits there are no chunks); any other value is itself."""
    if cfg.ce_kernel != "auto":
        return cfg.ce_kernel
    return "triton" if cfg.lm_loss == "chunked" and _triton_on_cuda(device) else "torch"


def _triton_on_cuda(device: str | torch.device) -> bool:
    """CUDA, and the operators' Triton kernels importable (kernels/ops.py: Triton and torch's triton_op; without
    them the operators run their references, slower than the torch ops the keys' "torch" gives)."""
    import importlib.util
    return (torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None
            and ops._tk is not None)


def attn_backend(cfg: ModelConfig, device: str | torch.device) -> str:
    """The attention kernel that cfg.attn_backend gives on `device`: "auto" is triton (elas's causal attention with
    the rotary embedding inside: 1.186x the default layer attention, 1.007-1.008x the 1B low-rank step on two H100
    hosts) where it was measured and fits: a Hopper GPU (compute capability 9.x; others have less shared memory a
    block) with Triton installed, head_dim 32, 64 or 128 (256 in fp32 would not fit even there), rope_kernel torch;
    else torch (SDPA in torch's order). Any other value is itself."""
    if cfg.attn_backend != "auto":
        return cfg.attn_backend
    import importlib.util
    hd = cfg.d_model // cfg.n_heads
    device = torch.device(device)
    if hd not in (32, 64, 128) or cfg.rope_kernel != "torch" or device.type != "cuda" or \
            not importlib.util.find_spec("triton"):
        return "torch"
    try:
        hopper = torch.cuda.get_device_capability(device)[0] == 9
    except (RuntimeError, AssertionError):  # (no CUDA here: a config resolved for another machine)
        hopper = False
    return "triton" if hopper else "torch"


def _cutlass_keys(cfg: ModelConfig) -> list[str]:
    """The keys of cfg that ask for the CUTLASS library."""
    keys = [f"model.{k}" for k in ("relu2_kernel", "rope_kernel") if getattr(cfg, k) == "cutlass"]
    # (a method's cutlass=auto is never an error: it resolves to false where the library cannot run)
    return keys + [f"model.{m['method']}.cutlass" for m in cfg.methods if _asks_cutlass(m)]


def _asks_cutlass(method: dict) -> bool:
    """A method dict's cutlass key set to true (a bool from config.json, or a string from --set)."""
    v = method.get("cutlass")
    return v is True or (isinstance(v, str) and v.lower() in ("true", "1", "yes", "on"))


def check_kernels(cfg: ModelConfig, device: str | torch.device) -> None:
    """A one-line ValueError where cfg asks for the CUTLASS kernels and they cannot run on `device` (a CUDA
    device: elsewhere every kernel has its reference), naming the keys that turn them off. For a run whose
    config recorded them (relu2_kernel=auto resolved on a machine that had them) resumed on one that has not."""
    keys = _cutlass_keys(cfg)
    if not keys or torch.device(device).type != "cuda":
        return
    from .kernels.cuda import cutlass_relu2
    ok, why = cutlass_relu2.available(device)
    if not ok:
        off = " ".join(f"--set {k}=" + ("false" if k.endswith(".cutlass") else "torch") for k in keys)
        raise ValueError(f"{', '.join(keys)} asks for the CUTLASS kernels, which cannot run here ({why}): build "
                         f"them (`elas build cutlass`), or run torch's: {off}")


def kernels_for_here(cfg: ModelConfig, device: str | torch.device) -> ModelConfig:
    """cfg with the kernel keys changed to what `device` can run (evaluation and generation of a run trained
    elsewhere: the kernels are this machine's to choose, the model is the same): relu2_kernel=cutlass and
    attn_backend=triton become auto (elas's attention off CUDA would run its fp32 reference, [B, H, S, S] scores);
    rope_kernel=cutlass torch and a method's cutlass=true false where the library cannot run here; a method's
    backend=cuda becomes auto (the 2:4 kernels where they run, else the reference: an explicit cuda refused the
    build on a machine without them, and `elas export` builds on the CPU). The config given is not changed."""
    import copy
    import dataclasses
    if cfg.attn_backend == "triton":
        cfg = dataclasses.replace(cfg, attn_backend="auto")
    if any(m.get("backend") == "cuda" for m in cfg.methods):
        cfg = dataclasses.replace(cfg, methods=[{**m, "backend": "auto"} if m.get("backend") == "cuda" else m
                                                for m in cfg.methods])
    if not _cutlass_keys(cfg):
        return cfg
    from .kernels.cuda import cutlass_relu2
    out = copy.deepcopy(cfg)
    if out.relu2_kernel == "cutlass":
        out.relu2_kernel = "auto"
    if torch.device(device).type == "cuda" and not cutlass_relu2.available(device)[0]:
        out.rope_kernel = "torch" if out.rope_kernel == "cutlass" else out.rope_kernel
        out.methods = [{**m, "cutlass": False} if _asks_cutlass(m) else m for m in out.methods]
    return out


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu",
                materialise_on: str | torch.device | None = None) -> LLaMA:
    """materialise_on: for a build on the meta device, where its storage will be allocated (`to_empty`): the
    methods choose their kernels for that device (default: the reference kernels, none loaded)."""
    methods = resolve_methods(cfg)
    target = torch.device(materialise_on or device)
    relu2 = relu2_kernel(cfg, target)[0]
    if "cutlass" in (relu2, cfg.rope_kernel) and target.type == "cuda":
        from .kernels.cuda import cutlass_relu2
        cutlass_relu2.library()  # a missing library: one line here, before the model is built
    with torch.device(device):
        model = LLaMA(cfg)
    if relu2 != "torch":  # the dense ReLU^2 cores' kernels; methods replace cores after this
        op = functools.partial(ops.relu2_ffn, kernel="cutlass" if relu2 == "cutlass" else "triton")
        for ffn in model.modules():
            if isinstance(getattr(ffn, "core", None), DenseReLU2):
                ffn.core = FusedReLU2(op)
    if cfg.rope_kernel == "cutlass":  # the attention's rotary embedding inside the q/k GEMMs' epilogue
        for blk in model.blocks:
            blk.attn.rope_op = ops.linear_rope
    if attn_backend(cfg, target) == "triton":  # the causal attention with the rotary embedding inside its kernels
        for blk in model.blocks:
            blk.attn.attn_op = ops.rope_attention
    for blk in model.blocks:  # fuse_qkv's low-rank q, k, v: a backward that concatenates and copies nothing
        if blk.attn.fuse_qkv:  # (Attention.qkv)
            blk.attn.qkv_op = ops.low_rank_qkv
    if norm_kernel(cfg, target) == "fused":  # the blocks' norms (not the final one: nothing is added to its input)
        if target.type == "cuda" and ops._tk is not None:  # its launch settings (ELAS_RMSNORM_CONFIG) checked now
            from .kernels.cuda import rmsnorm
            rmsnorm.launch_settings(cfg.d_model)
        for blk in model.blocks:
            blk.attn_norm.residual_split = blk.ffn_norm.residual_split = ops.residual_rmsnorm
    if ce_kernel(cfg, target) == "triton" and cfg.lm_loss == "chunked":  # a chunk's softmax + gradient in one pass
        if target.type == "cuda" and ops._tk is not None:  # its launch settings (ELAS_XENT_CONFIG) checked now,
            # not in the first step (without Triton's kernels the operator runs its reference)
            from .kernels.cuda import xent
            xent.launch_settings(cfg.vocab_size)
        model.ce_grad = torch.ops.elas.softmax_xent_grad  # (the OpOverloadPacket: a model with it deep-copies)
    with kernels.materialised_on(materialise_on or device):
        for m in methods:
            sparsify_(model, m)
    return model


__all__ = ["act24_cutlass", "attn_backend", "build_model", "ce_kernel", "check_kernels", "kernels_for_here", "norm_kernel",
           "relu2_kernel", "resolve_methods"]
