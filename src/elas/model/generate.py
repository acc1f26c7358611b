"""Sampling from a trained model, with a KV cache: the prompt is run once (prefill), then one token per step."""
from __future__ import annotations

import torch

from .llama import KVCache


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits [1, vocab] fp32 -> the next id [1, 1]. temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


@torch.no_grad()
def sample(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
           stop_token: int | None = None, generator: torch.Generator | None = None,
           use_cache: bool = True) -> torch.Tensor:
    """idx: [1, t] prompt ids -> [1, t + new] ids. The context is the last max_seq_len tokens: once the cache
    is full, every step re-runs that window (what use_cache=False does at every step)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    ctx = model.cfg.max_seq_len
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache or cache is None or cache.pos >= ctx:  # (re)fill the window
            window = idx[:, -ctx:]
            cache = KVCache(len(model.blocks), ctx) if use_cache else None
            logits = model(window, cache=cache)[:, -1, :].float()  # [1, vocab]
        else:
            logits = model(idx[:, -1:], cache=cache)[:, -1, :].float()
        nxt = _pick(logits, temperature, top_k, generator)
        idx = torch.cat([idx, nxt], dim=1)
        if stop_token is not None and nxt.item() == stop_token:
            break
    return idx
