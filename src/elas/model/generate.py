"""Sampling from a trained model, with a KV cache: the prompt is run once (prefill), then one token per step.

On a GPU the decode step can be captured once as a CUDA graph over a static cache (model/llama.KVCache(static=True))
and replayed for every token (`graph=True`; `elas bench infer` measures it): at batch 1 a decode step is hundreds
of small kernels, and without the graph the GPU waits on Python between them. `compile_decode=True` compiles the
step first (one graph for every position: it does not read the host position), so the replayed kernels are
Inductor's fused ones. `elas generate` replays the graph by default on CUDA (`--decode graph`; `--decode compiled`
compiles the step first; `--decode eager` neither)."""
from __future__ import annotations

import torch

from ..graphs import graph_capture
from .llama import KVCache


MIN_TEMPERATURE = 1e-4  # below it, logits / T overflow fp32 (a temperature that small is greedy in effect)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator,
          vocab_limit: int | None = None) -> torch.Tensor:
    """logits [1, vocab] fp32 -> the next id [1, 1]. temperature 0 = greedy. vocab_limit: ids at or past it (rows
    of a model vocabulary larger than its tokenizer's, never trained as targets) are never picked."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[..., :vocab_limit]
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


def decode_step(model, cache: KVCache, compile: bool = False):
    """tokens [b, 1] -> logits [b, vocab] fp32 over the cache, advanced by one. compile: torch.compile'd as one
    graph (fullgraph) that does not read the host position of a static cache (KVCache.host_pos), so one
    compilation serves every position; the caller then keeps `cache.pos` (GraphDecoder.step does)."""
    def step(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens, cache=cache)[:, -1, :].float()
    return torch.compile(step, fullgraph=True) if compile else step


class GraphDecoder:
    """One decode step (a token [b, 1] -> logits [b, vocab] fp32, the static cache advanced by one) captured as a
    CUDA graph after the prefill: `step(tokens)` replays it. Built by `capture(model, cache)`, which runs one
    warm-up step and undoes it (the position it wrote is rewritten by the first real step)."""

    def __init__(self, model, cache: KVCache, tok: torch.Tensor):
        self.model, self.cache, self.tok = model, cache, tok
        self.graph = self.out = None

    @classmethod
    def capture(cls, model, cache: KVCache, batch: int = 1, compile: bool = False) -> "GraphDecoder":
        """compile: the decode step is first compiled as one graph (torch.compile, fullgraph; its kernels fused
        by Inductor), then captured; once per capture, as the graph does not depend on the position."""
        if not cache.static:
            raise ValueError("GraphDecoder needs a static KVCache (KVCache(..., static=True))")
        dev = cache.pos_t.device
        self = cls(model, cache, torch.zeros(batch, 1, dtype=torch.long, device=dev))
        fn = decode_step(model, cache, compile)
        pos = cache.pos
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compile, allocations, lazy inits) outside the capture
            fn(self.tok)
        torch.cuda.current_stream().wait_stream(side)
        cache.pos = pos  # undo the warm-up step (its cache entry is rewritten by the first real step)
        cache.pos_t -= 1
        self.graph = torch.cuda.CUDAGraph()
        with graph_capture(self.graph):  # (a cuBLAS workspace of its own: elas/graphs.py)
            self.out = fn(self.tok)
        cache.pos = pos  # the capture ran the host side only; pos_t's add was captured, not run
        return self

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.pos + 1 > self.cache.max_len:
            raise ValueError(f"KV cache full: {self.cache.pos} + 1 tokens exceed its {self.cache.max_len} positions")
        self.tok.copy_(tokens)
        self.graph.replay()
        self.cache.pos += 1
        return self.out.clone()


@torch.no_grad()
def sample(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
           stop_token: int | None = None, generator: torch.Generator | None = None,
           use_cache: bool = True, graph: bool = False, static_cache: bool | None = None,
           compile_decode: bool = False, on_token=None, vocab_limit: int | None = None) -> torch.Tensor:
    """idx: [1, t] prompt ids -> [1, t + new] ids; on_token(id), where given, is called with each new id as it
    comes (a host sync per token: `elas generate` prints the text as it grows). The context is the last max_seq_len tokens: once the cache
    is full, every step re-runs that window (what use_cache=False does at every step). graph (CUDA): replay the
    decode step from a CUDA graph (GraphDecoder); static_cache (default: = graph) decodes over the static cache
    eagerly (what the graph replays; used to test it on the CPU); compile_decode (with graph): the captured decode
    step is first compiled as one graph (generate.decode_step). vocab_limit: the tokenizer's vocabulary size
    (ids past it are never sampled; see _pick)."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, inf), got {temperature}")
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] < 1:  # (before the prefill: one prompt, batch 1)
        raise ValueError(f"idx must be one prompt of token ids, shape [1, t] with t >= 1, got {tuple(idx.shape)}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or 0 (every token) or a positive int, got {top_k!r}")
    model.eval()
    if graph and not (idx.is_cuda and use_cache):
        raise ValueError("graph=True replays a captured decode step: it needs CUDA tensors and use_cache=True")
    if compile_decode and not graph:
        raise ValueError("compile_decode=True compiles the captured decode step: it needs graph=True")
    static = graph if static_cache is None else static_cache
    ctx = model.cfg.max_seq_len
    cache = decoder = None
    for _ in range(max_new_tokens):
        if not use_cache or cache is None or cache.pos >= ctx:  # (re)fill the window
            window = idx[:, -ctx:]
            cache = KVCache(len(model.blocks), ctx, static=static) if use_cache else None
            logits = model(window, cache=cache)[:, -1, :].float()  # [1, vocab]
            decoder = GraphDecoder.capture(model, cache, compile=compile_decode) if graph and cache.pos < ctx \
                else None
        elif decoder is not None:
            logits = decoder.step(idx[:, -1:])
        else:
            logits = model(idx[:, -1:], cache=cache)[:, -1, :].float()
        nxt = _pick(logits, temperature, top_k, generator, vocab_limit)
        idx = torch.cat([idx, nxt], dim=1)
        if on_token is not None:
            on_token(int(nxt.item()))
        if stop_token is not None and nxt.item() == stop_token:
            break
    return idx
