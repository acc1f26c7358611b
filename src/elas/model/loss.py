"""Cross-entropy of the LM head without the logits: linear_cross_entropy(h, W, targets) = CE(h @ W^T, targets).

The plain path builds [T, V] logits and upcasts them for the loss: for a 1B LLaMA at 8192 tokens x 32000 vocab
the fp32 logits alone are 1 GB, and their gradient is as much again. Here forward walks the tokens in chunks,
computes each chunk's loss and its gradient w.r.t. the logits at once and folds that into grad_h and grad_W, so
no more than one chunk of logits (about 2**26 elements) ever exists. Backward only scales the saved gradients.
Memory: grad_h [T, d] (h's dtype) and grad_W [V, d] (fp32) are held from forward to backward.

A chunk's loss and logits' gradient are torch ops (fused by Inductor when compiled), or one call of `grad_kernel`
where the model was given one (model.ce_kernel=triton: kernels/ops.py softmax_xent_grad, one pass over the
logits in their compute dtype; the model imports no kernels, build_model hands it over).
"""
from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_LOGITS = 2 ** 26  # logits per chunk: 256 MB in fp32


def _default_chunk(vocab: int) -> int:
    c = max(1, _CHUNK_LOGITS // vocab)
    return c // 128 * 128 if c > 128 else c


class _LinearCE(torch.autograd.Function):
    """h [T, d], weight [V, d], targets [T] int64 -> mean loss (0-d fp32). The gradients are computed in forward;
    the loop bound is a Python int from static shapes, so it unrolls under torch.compile(fullgraph=True)."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk: int, need_h: bool, need_w: bool, grad_kernel):
        with torch.autocast(h.device.type, enabled=False):  # the dtypes below are chosen, not autocast's
            return _LinearCE._forward(ctx, h, weight, targets, ignore_index, chunk, need_h, need_w, grad_kernel)

    @staticmethod
    def _forward(ctx, h, weight, targets, ignore_index: int, chunk: int, need_h: bool, need_w: bool, grad_kernel):
        T = h.shape[0]
        # fp32 for the softmax (fp64 stays fp64); w [V, d] in h's dtype, cast once: under bf16 autocast h is bf16
        # and weight the fp32 master
        acc = torch.promote_types(torch.promote_types(h.dtype, weight.dtype), torch.float32)
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        # cuBLAS accumulates g^T h in fp32 straight into the fp32 buffer (aten addmm.dtype): no bf16 product to round
        fp32_out = h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and acc == torch.float32
        valid = (targets != ignore_index).to(acc)  # [T], 1 for tokens in the loss
        inv_n = 1.0 / valid.sum().clamp_min(1.0)  # 0-d tensor: all ignored gives loss 0, not NaN
        tgt = torch.where(targets == ignore_index, 0, targets)  # [T], a safe gather index on ignored rows
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None  # [T, d] h's dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None  # [V, d] fp32
        for s in range(0, T, chunk):
            e = min(s + chunk, T)
            hc, tc, vc = h[s:e], tgt[s:e, None], valid[s:e]  # [c, d], [c, 1], [c]
            if grad_kernel is not None and (need_h or need_w):
                # g = d(mean loss)/dz [c, V] and each row's lse - z[t] [c] from the logits in h's dtype, one pass
                g, nll = grad_kernel(hc @ w.t(), tc.squeeze(1), vc * inv_n)
                loss = loss + (nll.to(acc) * vc).sum()
            else:
                z = (hc @ w.t()).to(acc)  # [c, V] logits, fp32
                lse = torch.logsumexp(z, dim=1)  # [c]
                loss = loss + ((lse - z.gather(1, tc).squeeze(1)) * vc).sum()
                if not (need_h or need_w):
                    continue
                # g = d(mean loss)/dz = (softmax - onehot) / n on valid rows, 0 on ignored ones; z reused in place
                g = z.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, tc, -vc[:, None])
                g = g.mul_((vc * inv_n)[:, None]).to(h.dtype)  # [c, V] compute dtype
            if need_h:
                grad_h[s:e] = g @ w
            if need_w:
                if fp32_out and not torch.compiler.is_compiling():
                    grad_w = torch.addmm(grad_w, g.t(), hc, out_dtype=torch.float32)
                elif fp32_out:  # torch 2.11's fake addmm.dtype fails under dynamo (out_dtype lands in beta)
                    grad_w = grad_w + torch.mm(g.t(), hc, out_dtype=torch.float32)
                else:
                    grad_w.addmm_(g.t().to(acc), hc.to(acc))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        out = loss * inv_n
        # never return an alias (.float() of fp32 is one): torch 2.11 compiles that into zero gradients
        return out if out.dtype == torch.float32 else out.float()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # grad_out is 0-d fp32 (usually 1): a 0-d operand does not promote, so grad_h stays in h's dtype
        dh = grad_h * grad_out if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         chunk_tokens: int | None = None, grad_kernel=None) -> Tensor:
    """Mean cross-entropy of logits h @ weight^T over tokens whose target is not ignore_index, as fp32 0-d.

    h [..., d] (compute dtype), weight [V, d] (any float dtype; its grad comes back in it), targets [...] int64.
    chunk_tokens: tokens per chunk (default: about 2**26 logits per chunk). grad_kernel: (z [c, V] in h's dtype,
    t [c] valid indices, scale [c] fp32) -> ((softmax(z) - onehot(t)) * scale in z's dtype, lse(z) - z[t] [c])
    for each chunk where gradients are wanted (kernels/ops.py softmax_xent_grad); None: torch ops."""
    d, V = h.shape[-1], weight.shape[0]
    chunk = chunk_tokens or _default_chunk(V)
    grad = torch.is_grad_enabled()
    return _LinearCE.apply(h.reshape(-1, d), weight, targets.reshape(-1), ignore_index, chunk,
                           grad and h.requires_grad, grad and weight.requires_grad, grad_kernel)

