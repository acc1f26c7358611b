"""The LM head + cross-entropy alone: the chunked loss (model/loss.py) against fp32 logits into F.cross_entropy
(`elas bench loss`), in one process.

For each token count: h [T, d] bf16 (as the final norm gives it under autocast), the fp32 master weight
[V, d], targets [T]; forward + backward under bf16 autocast, eager and compiled (`torch.compile`, Inductor
default mode). The chunked rows run the loss's torch ops (model.ce_kernel=torch); benchmarks/xent.py times the
one-pass kernel (ce_kernel=triton, today's default on CUDA) against them. Time: median of CUDA-event timings after
warm-up. Memory: the allocator's peak during one forward + backward above what was allocated before it (the
inputs), i.e. what the loss itself needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.loss import linear_cross_entropy
from .timing import event_ms


def _logits_loss(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t)  # the textbook path: [T, V] logits, upcast


def loss_inputs(tokens: int, d: int, vocab: int, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """The loss benchmarks' inputs, as in the step: h [tokens, d] bf16 (the final norm's output), w [vocab, d] fp32
    (the LM head's master weight), both requiring grad, and targets [tokens] int64; seed 0."""
    torch.manual_seed(0)
    h = torch.randn(tokens, d, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (0.02 * torch.randn(vocab, d, device=device)).requires_grad_()
    return h, w, torch.randint(0, vocab, (tokens,), device=device)


def loss_step(fn, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """A closure running fn(h, w, t) forward under bf16 autocast and backward, the gradients reset first; it
    returns the loss."""
    def step():
        h.grad = w.grad = None
        with torch.autocast(h.device.type, dtype=torch.bfloat16):
            loss = fn(h, w, t)
        loss.backward()
        return loss
    return step


def loss_row(tokens: int, d: int, vocab: int, impl: str, compiled: bool) -> dict:
    torch._dynamo.reset()
    h, w, t = loss_inputs(tokens, d, vocab)
    fn = linear_cross_entropy if impl == "chunked" else _logits_loss
    step = loss_step(torch.compile(fn) if compiled else fn, h, w, t)
    step()  # compiles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = event_ms(step, iters=10, warmup=3)
    return {"tokens": tokens, "d_model": d, "vocab": vocab, "impl": impl, "compiled": compiled, "ms": ms,
            "peak_extra_gb": peak / 1e9, "loss": float(loss)}


def bench_loss(tokens=(8192, 16384), d: int = 2048, vocab: int = 32000, log=print, on_row=None) -> list[dict]:
    """Rows for every (tokens, eager/compiled, implementation); on_row(rows so far) after each, so that a row that
    fails (a compile error, out of memory) leaves the ones measured before it."""
    rows = []
    for n in tokens:
        for compiled in (False, True):
            for impl in ("logits", "chunked"):
                r = loss_row(n, d, vocab, impl, compiled)
                rows.append(r)
                if on_row is not None:
                    on_row(rows)
                log(f"loss T={n} {'compiled' if compiled else 'eager':>8} {impl:>7}: {r['ms']:.2f} ms fwd+bwd, "
                    f"{r['peak_extra_gb']:.2f} GB above the inputs, loss {r['loss']:.4f}")
    return rows
