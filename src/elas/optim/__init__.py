"""Optimizers and schedules. `build_optimizer(model, cfg)` returns the optimizer named by cfg.optimizer."""
from __future__ import annotations

import torch

from .schedules import warmup_cosine


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; norms and biases (1-D parameters) never get weight decay."""
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adamw")
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if next(model.parameters()).is_cuda else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kw)


__all__ = ["build_optimizer", "warmup_cosine"]
