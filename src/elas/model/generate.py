"""Sampling from a trained model (no KV cache: the models here are small and this path is for inspection)."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
           stop_token: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """idx: [1, t] prompt ids -> [1, t + new] ids. temperature 0 = greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    ctx = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(idx[:, -ctx:])[:, -1, :].float()  # [1, vocab]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        if stop_token is not None and nxt.item() == stop_token:
            break
    return idx
