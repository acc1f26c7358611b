"""Parameter and FLOP accounting of a model config, without allocating weights (meta device)."""
from __future__ import annotations

import torch.nn as nn

from .build import build_model
from .config import ModelConfig
from .model.lowrank import LowRankLinear
from .sparsity import applied_methods


def _part(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if ".attn." in name:
        return "attention"
    if ".ffn." in name:
        return "ffn"
    return "norms"


def model_summary(cfg: ModelConfig, seq_len: int = 256) -> dict:
    """Parameter counts (total and per part), forward FLOPs per token, and the widths actually used.

    FLOPs count 2 per multiply-add of every matmul (LM head included, embedding lookup excluded), plus attention
    scores and values at the full (non-causal) 4*seq*d_model per layer, the convention of PaLM's MFU.
    `fwd_flops_per_token_2to4` counts each FFN linear a method makes sparse at the fraction of its work the
    method's sparse path does (SparsityMethod.forward_work): 1/2 for a 2:4 operand ("y2", which multiplies the
    down projection's d_ff factor, or a 2:4 weight), 2/m for V:N:M's masked path (what a V:N:M kernel would do;
    that path is emulated) and 4/m of both projections for its grouped path. Where two methods claim one linear
    (2:4 weights and activations) the smaller fraction counts: one GEMM runs one sparse operand.
    """
    model = build_model(cfg, device="meta")
    work: dict[str, float] = {}  # "blocks.0.ffn.down" -> fraction of its dense forward work
    for a in applied_methods(model):
        for ffn in {fqn for fqn, _ in a.claims}:
            for lin, f in a.config.forward_work().items():
                work[f"{ffn}.{lin}"] = min(f, work.get(f"{ffn}.{lin}", 1.0))
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts[_part(name)] = parts.get(_part(name), 0) + p.numel()
    matmul = sparse_fwd = 0
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            n = mod.rank * (mod.in_features + mod.out_features)
            # the d_ff-wide factor, the one a method thins: d_ff -> r of a down projection, r -> d_ff of an up
            d_ff_side = mod.rank * (mod.in_features if name.endswith(".down") else mod.out_features)
        elif isinstance(mod, nn.Linear):
            n = d_ff_side = mod.in_features * mod.out_features
        else:
            continue
        matmul += n
        if name in work:
            sparse_fwd += 2 * d_ff_side * (1 - work[name])
    attn = 4 * seq_len * cfg.d_model * cfg.n_layers
    fwd = 2 * matmul + attn
    return {
        "params": sum(parts.values()),
        "params_by_part": parts,
        "non_embedding_params": sum(parts.values()) - parts.get("embedding", 0),
        "fwd_flops_per_token": fwd,
        "fwd_flops_per_token_2to4": fwd - sparse_fwd,  # the sparse operands' GEMMs at their density
        "train_flops_per_token": 3 * fwd,
        "seq_len": seq_len,
        "d_ff": cfg.ffn_width,
        "rank": cfg.rank,
        "ffn": cfg.ffn,
        "methods": [a.config.name for a in applied_methods(model)],
    }
