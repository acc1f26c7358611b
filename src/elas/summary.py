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
    `fwd_flops_per_token_2to4` counts the forward GEMMs whose operand a method makes sparse (an FFN's "y2", which
    multiplies the down projection's d_ff factor) at the method's density (1/2 for 2:4, 2/m for V:N:M): the work
    sparse tensor cores do.
    """
    model = build_model(cfg, device="meta")
    # the density of the GEMMs a method makes sparse: 1/2 for 2:4, 2/m for V:N:M (a config's `density`)
    sparse_y2 = {fqn: getattr(a.config, "density", 0.5) for a in applied_methods(model) for fqn, op in a.claims
                 if op == "y2"}
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts[_part(name)] = parts.get(_part(name), 0) + p.numel()
    matmul = sparse_fwd = 0
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            n = mod.rank * (mod.in_features + mod.out_features)
            down_in = mod.rank * mod.in_features
        elif isinstance(mod, nn.Linear):
            n = down_in = mod.in_features * mod.out_features
        else:
            continue
        matmul += n
        if name.endswith(".down") and name[: -len(".down")] in sparse_y2:
            # FLOPs skipped on the factor that multiplies y2s (d_ff -> r, or d_ff -> d_model)
            sparse_fwd += 2 * down_in * (1 - sparse_y2[name[: -len(".down")]])
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
