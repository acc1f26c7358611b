"""Optimizers and schedules. `build_optimizer(model, cfg)` returns the optimizer named by cfg.optimizer."""
from __future__ import annotations

import torch

from .loro import LOROAdamW, exact_update
from .master import MasterAdamW
from .schedules import warmup_cosine


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """cfg.optimizer: adamw (norms and other 1-D parameters get no weight decay) or loro_adamw. AdamW over bf16
    parameters is MasterAdamW (fp32 master weights, one fused kernel); over fp32 ones torch's AdamW, fused on CUDA."""
    bf16_params = next(model.parameters()).dtype == torch.bfloat16
    # optim_state_dtype=auto (the default): bf16 moments over bf16 parameters, fp32 over fp32 ones
    moments = torch.bfloat16 if cfg.optim_state_dtype == "bf16" or (cfg.optim_state_dtype == "auto" and bf16_params) \
        else torch.float32
    if cfg.optimizer == "loro_adamw":
        return LOROAdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                         exact_every=cfg.loro_exact_every, rewarm_steps=cfg.loro_rewarm_steps,
                         d_model=cfg.model.d_model, moment_dtype=moments)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adamw or loro_adamw")
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if bf16_params:
        return MasterAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, moment_dtype=moments)
    if moments == torch.bfloat16:
        raise ValueError("optim_state_dtype=bf16 is for bf16 parameters (MasterAdamW's fp32 masters); these are "
                         f"{next(model.parameters()).dtype}: set param_dtype=bf16 or optim_state_dtype=fp32")
    kw = {"fused": True} if next(model.parameters()).is_cuda else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kw)


__all__ = ["build_optimizer", "warmup_cosine", "LOROAdamW", "MasterAdamW", "exact_update"]
