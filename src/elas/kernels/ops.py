"""The 2:4 kernels as PyTorch operators (torch.library), so that torch.compile traces them without a graph break.

Every operator has one schema, a CPU implementation that is the reference twin (reference.py: plain torch,
emulated) and a CUDA implementation that is the Hopper kernel (Triton sparsifier and backward kernel through
`triton_op` + `wrap_triton`, the cuSPARSELt GEMM extension through `custom_op`). Only tensors, ints, floats and
bools cross the boundary; "not produced" outputs are empty tensors (an operator cannot return None).

    elas::relu2_sparsify24_packed(y1 [M, K], count, bits) -> buffer [M, K*9/16] bf16, mask_bits [M, K/8] u8
                                                       ([0] if not bits), counts [K] i32 (positives per column;
                                                       [0] if not count)
    elas::relu2_sparsify24_dense(y1 [M, K]) -> y2s [M, K]: the same selection, unpacked (zeros where dropped)
    elas::up_relu2_sparsify24(h1 [M, q], wu [K, q], count, write_y1) -> y1 [M, K] (or [0]), buffer, mask_bits,
                              counts: the up-projection GEMM with the sparsifier in its epilogue
    elas::dgrad_relu2_ste(dh2 [M, q'], wd [K, q'], y1 [M, K]) -> y2s, dy1: the backward's dy2 GEMM with the
                          `ste` pointwise work in its epilogue
    elas::relu2_sparse24_backward(dy2 [M, K], buffer?, mask_bits?, y1?, dense_slots?, n_dense)
                                  -> y2s, dy1, dy1 packed [M, K*9/16] (mask mode), y2s_t, dy1_t, y2s_dense,
                                     dy1_dense (reference.Grads24; y2s_t / dy1_t as their [K, M*9/16] buffers)
    elas::sste_pack24(w [R, C], beta [], transpose) -> buffer of beta * S_soft(w) (or of w^T), 2:4 (no mask bits)
    elas::sste_dense24(w [R, C], beta []) -> beta * S_soft(w) [R, C], dense (the same values, unpacked)
    elas::relu2_ffn(h1 [T, q], wu [d_ff, q], wd [d_ff, q']) -> h2 [T, q'], y2 [T, d_ff]: the dense ReLU^2 core with
                    its pointwise work in the GEMM epilogues (kernels/cuda/relu2_gemm.py); autograd registered
    elas::sparse_mm(a_buffer [M, K*9/16], b [K, N], m, k, out_t) -> a @ b [M, N] (out_t: its transpose [N, M])
    elas::act24_ffn(h1 [T, q], wu [d_ff, q], wd [d_ff, q'], mask_grad, dense_frac?, fused) -> h2 [T, q'] and
                    the tensors its backward needs; its autograd formula is registered on it and runs
    elas::act24_ffn_backward(...) -> dh1, dwu, dwd
    elas::linear_rope(a [L, M, K], w [L, N, K], cos, sin [seq, head_dim/2], head_dim, rot_cols) -> [L, M, N]: the
                      q/k/v projection with rotary embeddings in its epilogue (on interleaved column pairs)
    elas::rope_attention(q, k, v [B, S, H, D], cos, sin) -> o [B, S, H, D], lse [B*H, S]: causal attention with
                         the rotary embedding applied to q and k inside; autograd registered (its backward op)
    elas::softmax_xent_grad(z [T, V], t [T], scale [T]) -> g [T, V], nll [T]: a chunk of the LM head's
                            cross-entropy, its loss and the logits' gradient in one pass (model/loss.py)
The act24 pair is the packed 2:4 FFN core: one operator per core, so the autograd graph holds one node per FFN
and the saved tensors are the packed ones. For a ReLU^2 FFN (full-rank or low-rank) only the part around d_ff
is special: h1 [T, q] is the input of the d_ff-producing factor (q = d_model, or the rank r), wu [d_ff, q] that
factor, wd [d_ff, q'] the d_ff-consuming factor (W2^T for full-rank, N2 for low-rank):

    forward:  y1 = h1 wu^T                 dense GEMM                     [T, d_ff]
              p  = pack(2:4(relu(y1)^2))   sparsifier kernel              values [T, d_ff/2] + metadata + mask
                                           (fused: both in one kernel, y1 written only in `ste` mode)
              h2 = p @ wd                  2:4 GEMM (reduces over d_ff)    [T, q']
    backward: dy2 = dh2 wd^T               dense GEMM (output is d_ff wide)
              y2s, dy1 (+ packed dy1)      one pointwise kernel (fused, `ste` without the split: both in one
                                           kernel, dy2 never written) (with the split: y2s^T, dy1^T packed 2:4 along
                                           tokens, and the dense features' columns, instead of dense y2s)
              dwd = y2s^T dh2, dwu = dy1^T h1   reduce over tokens: dense GEMMs, or with the 95/5 split
                                           (dense_frac) 2:4 GEMMs on the along-token packing, whose rows of the
                                           densest 5% of features are then replaced by dense GEMMs
              dh1 = dy1 wu                 2:4 GEMM in `mask` mode (dy1 has the forward's pattern), dense in `ste`

Saved for backward: `mask` mode keeps only the packed y2s (0.5625 of a dense bf16 y2, plus a 1/16 mask): relu(y1)
on kept entries is rebuilt as sqrt(y2s). `ste` mode needs relu(y1) on the dropped entries too, so it keeps y1
(one dense tensor, like a dense ReLU^2 FFN that recomputes y2); its backward kernel redoes the selection from y1.
With the split, 4 of the 6 d_ff GEMMs run sparse in `mask` mode (Haziza et al.'s recipe), 3 in `ste` mode. The
masked twin of this core (the numerical definition) is sparsity/masked.py.

The CUDA implementations assume a Hopper GPU whose extension is loaded: backends are chosen when a method is
applied (kernels.resolve_backend), never inside a traced region.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference as ref
from .packed import Packed24, check_shape

try:  # Triton is optional: without it the operators have their CPU (reference) implementation only
    import triton  # noqa: F401
    from torch.library import triton_op, wrap_triton

    from .cuda import sparsify as _tk
except ImportError:  # pragma: no cover - exercised on machines without triton
    _tk = None

_EMPTY_U8 = torch.empty(0, dtype=torch.uint8)


def _define_triton_op(name: str, fn):
    """A triton_op when Triton exists (its CUDA branch launches through wrap_triton, which torch.compile sees);
    otherwise a custom_op with the same function as implementation and fake (the CPU branch traces)."""
    if _tk is not None:
        return triton_op(name, fn, mutates_args=())
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fn)
    return op


# ---- sparsifier -----------------------------------------------------------------------------------------------
def _relu2_sparsify24_packed(y1: Tensor, count: bool, bits: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    m, k = y1.shape
    counts = torch.zeros(k if count else 0, dtype=torch.int32, device=y1.device)
    if y1.device.type == "cuda":
        p = _tk.relu2_sparsify24_packed(y1, counts if count else None, launch=wrap_triton, write_bits=bits)
        return p.buffer, p.mask_bits, counts
    p = ref.relu2_sparsify24_packed(y1, counts if count else None)
    return p.buffer, (p.mask_bits if bits else torch.empty(0, dtype=torch.uint8, device=y1.device)), counts


relu2_sparsify24_packed_op = _define_triton_op("elas::relu2_sparsify24_packed", _relu2_sparsify24_packed)


def relu2_sparsify24_packed(y1: Tensor, count: bool = False, bits: bool = True) -> tuple[Packed24, Tensor | None]:
    """y1: [M, K] -> (Packed24 of 2:4(relu(y1)^2), positives per column int32 [K] or None). bits: write the
    plain keep-mask (Packed24.mask_bits; empty otherwise: only `mask` mode's backward reads it)."""
    buf, bits, counts = relu2_sparsify24_packed_op(y1, count, bits)
    return Packed24(buf, bits, tuple(y1.shape)), (counts if count else None)


def _relu2_sparsify24_dense(y1: Tensor) -> Tensor:
    if y1.device.type == "cuda" and _tk.dense_supported(y1):
        return _tk.relu2_sparsify24_dense(y1, launch=wrap_triton)
    return ref.relu2_sparsify24(y1)[0]


relu2_sparsify24_dense_op = _define_triton_op("elas::relu2_sparsify24_dense", _relu2_sparsify24_dense)


def relu2_sparsify24_dense(y1: Tensor) -> Tensor:
    """y1 [M, K] -> y2s [M, K] in y1's dtype: 2:4(relu(y1)^2) along K, dense (zeros where dropped). One Triton
    pass on CUDA (bf16/fp32, K % 4 == 0); reference.relu2_sparsify24 elsewhere, with the same values."""
    return relu2_sparsify24_dense_op(y1)


# ---- up-projection GEMM + sparsifier in one kernel --------------------------------------------------------------
def _up_relu2_sparsify24(h1: Tensor, wu: Tensor, count: bool, write_y1: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = wu.shape[0]
    counts = torch.zeros(n if count else 0, dtype=torch.int32, device=h1.device)
    if h1.device.type == "cuda":
        from .cuda import epilogue as _ek
        y1, p = _ek.up_relu2_sparsify24(h1, wu, write_y1, counts if count else None, launch=wrap_triton)
    else:
        y1, p = ref.up_relu2_sparsify24(h1, wu, write_y1, counts if count else None)
    return (h1.new_empty(0) if y1 is None else y1), p.buffer, p.mask_bits, counts


up_relu2_sparsify24_op = _define_triton_op("elas::up_relu2_sparsify24", _up_relu2_sparsify24)


def up_relu2_sparsify24(h1: Tensor, wu: Tensor, count: bool = False, write_y1: bool = True
                        ) -> tuple[Tensor | None, Packed24, Tensor | None]:
    """h1 [M, q], wu [K, q] bf16 -> (y1 [M, K] or None, Packed24 of 2:4(relu(y1)^2), positives per column or None)."""
    y1, buf, bits, counts = up_relu2_sparsify24_op(h1, wu, count, write_y1)
    return (y1 if write_y1 else None), Packed24(buf, bits, (h1.shape[0], wu.shape[0])), (counts if count else None)


def _dgrad_relu2_ste(dh2: Tensor, wd: Tensor, y1: Tensor) -> tuple[Tensor, Tensor]:
    if dh2.device.type == "cuda":
        from .cuda import epilogue as _ek
        return _ek.dgrad_relu2_ste(dh2, wd, y1, launch=wrap_triton)
    return ref.dgrad_relu2_ste(dh2, wd, y1)


dgrad_relu2_ste_op = _define_triton_op("elas::dgrad_relu2_ste", _dgrad_relu2_ste)


# ---- backward pointwise kernel --------------------------------------------------------------------------------
def _relu2_sparse24_backward(dy2: Tensor, buffer: Tensor | None, mask_bits: Tensor | None, y1: Tensor | None,
                             dense_slots: Tensor | None, n_dense: int
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    m, k = dy2.shape
    a = None if buffer is None else Packed24(buffer, mask_bits, (m, k))
    if dy2.device.type == "cuda":
        g = _tk.relu2_sparse24_backward(dy2, a, y1, dense_slots, n_dense, launch=wrap_triton)
    else:
        g = ref.relu2_sparse24_backward(dy2, a, y1, dense_slots, n_dense)
    # a fresh empty tensor per missing output: an operator's outputs may not alias each other. dy1's values are
    # returned as the whole packed buffer they were written into (dy1_packed; values first)
    outs = (g.y2s, g.dy1, None if g.dy1_packed is None else g.dy1_packed.buffer, g.y2s_t, g.dy1_t, g.y2s_dense,
            g.dy1_dense)
    return tuple(dy2.new_empty(0) if t is None else (t.buffer if isinstance(t, Packed24) else t) for t in outs)


relu2_sparse24_backward_op = _define_triton_op("elas::relu2_sparse24_backward", _relu2_sparse24_backward)


def relu2_sparse24_backward(dy2: Tensor, a: Packed24 | None, y1: Tensor | None = None,
                            dense_slots: Tensor | None = None, n_dense: int = 0) -> ref.Grads24:
    """The operator with reference.relu2_sparse24_backward's interface (Grads24 out; see there)."""
    m, k = dy2.shape
    out = relu2_sparse24_backward_op(dy2, None if a is None else a.buffer, None if a is None else a.mask_bits, y1,
                                     dense_slots, n_dense)
    y2s, dy1, dbuf, yt, dt, y2d, dy1d = out
    split, ste = dense_slots is not None, y1 is not None
    empty_bits = torch.empty(0, dtype=torch.uint8, device=dy2.device)
    dpk = None if ste else Packed24(dbuf, a.mask_bits, (m, k))
    dval = None if ste else dbuf.view(-1)[: m * k // 2].view(m, k // 2)
    if not split:  # which outputs a configuration produces (reference.Grads24)
        return ref.Grads24(y2s, dy1, dval, dy1_packed=dpk)
    return ref.Grads24(None, dy1 if ste else None, dval, Packed24(yt, empty_bits, (k, m)),
                       Packed24(dt, empty_bits, (k, m)), y2d, dy1d, dpk)


# ---- S-STE weights: soft-threshold + pack ---------------------------------------------------------------------
def _sste_pack24(w: Tensor, beta: Tensor, transpose: bool) -> Tensor:
    # the buffer alone: a weight-sparse GEMM reads values and metadata, never the mask bits (skipping them made the
    # pack 6-19% faster on the H200, `elas bench sste`)
    if w.device.type == "cuda":
        from .cuda import sste as _sk
        return _sk.soft_threshold24_packed(w, beta, transpose, launch=wrap_triton, write_bits=False).buffer
    return ref.soft_threshold24_packed(w, beta, transpose).buffer


sste_pack24_op = _define_triton_op("elas::sste_pack24", _sste_pack24)


def sste_pack24(w: Tensor, beta: Tensor, transpose: bool = False) -> Packed24:
    """w [R, C] -> Packed24 of beta * S_soft(w) along C ([R, C]), or of w^T along R ([C, R]) when transpose; its
    mask_bits are empty (no weight-sparse product reads them)."""
    shape = (w.shape[1], w.shape[0]) if transpose else tuple(w.shape)
    return Packed24(sste_pack24_op(w, beta, transpose), w.new_empty(0, dtype=torch.uint8), shape)


def _sste_dense24(w: Tensor, beta: Tensor) -> Tensor:
    r, c = w.shape
    if w.device.type == "cuda" and w.is_contiguous() and r % 64 == 0 and c % 64 == 0:
        from .cuda import sste as _sk
        return _sk.soft_threshold24_dense(w, beta, launch=wrap_triton)
    return (beta.float() * ref.soft_threshold24(w.float())[0]).to(w.dtype)


sste_dense24_op = _define_triton_op("elas::sste_dense24", _sste_dense24)


def sste_dense24(w: Tensor, beta: Tensor) -> Tensor:
    """w [R, C] -> beta * S_soft(w) along C, dense, in w's dtype (fp32 arithmetic, one rounding): the values
    sste_pack24 packs. One Triton pass on CUDA (row-major, R and C multiples of 64); the torch formula elsewhere."""
    return sste_dense24_op(w, beta)


# ---- 2:4 x dense GEMM -----------------------------------------------------------------------------------------
@torch.library.custom_op("elas::sparse_mm", mutates_args=(), device_types="cpu")
def sparse_mm_op(a_buffer: Tensor, b: Tensor, m: int, k: int, out_t: bool = False) -> Tensor:
    out = ref.sparse_mm(Packed24(a_buffer, _EMPTY_U8, (m, k)), b)
    return out.t().contiguous() if out_t else out


@sparse_mm_op.register_kernel("cuda")
def _(a_buffer: Tensor, b: Tensor, m: int, k: int, out_t: bool = False) -> Tensor:
    from .cuda import gemm  # the extension was built and loaded when the backend was resolved
    return gemm.sparse_mm(Packed24(a_buffer, _EMPTY_U8, (m, k)), b, out_t=out_t)


@sparse_mm_op.register_fake
def _(a_buffer, b, m, k, out_t=False):
    return b.new_empty((b.shape[1], m) if out_t else (m, b.shape[1]))


def sparse_mm(a: Packed24, b: Tensor, out_t: bool = False) -> Tensor:
    """a: Packed24 [M, K] (2:4 along K), b: [K, N] -> a @ b [M, N] (bf16 on CUDA; b's dtype on CPU); out_t: its
    transpose [N, M], contiguous, written by the GEMM itself (a weight-sparse product S(W) x^T arrives as
    [tokens, d_out], the layout the rest of the model reads, with no transposing copy)."""
    return sparse_mm_op(a.buffer, b, a.shape[0], a.shape[1], out_t)


# ---- weight gradients in their weight's layout (reference.wgrad says why) -----------------------------------------
def _wgrad(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """x^T y [K, N] (x [T, K], y [T, N]): the gradient of an operand w [K, N], in w's layout."""
    return ref.wgrad(x, y, ref.col_major(w))


def _split_wgrad(a: Packed24, x_dense: Tensor, y: Tensor, w: Tensor, idx_d: Tensor) -> Tensor:
    """The 95/5 split's weight gradient [K, N] in w's layout: every row as the 2:4 GEMM a @ y (a: Packed24 [K, T],
    pruned along tokens; the GEMM writes w's layout), then the rows idx_d [n_dense] (ascending) overwritten by their
    exact product x_dense^T y (x_dense [T, n_dense]). Column-major, those rows are columns of the contiguous
    transpose [N, K]: written there along dim 1, each of its rows takes n_dense entries near one another, where
    along dim 0 of the [K, N] view consecutive writes land K elements apart (5% as many bytes as the GEMM writes)."""
    if ref.col_major(w):
        return sparse_mm(a, y, out_t=True).index_copy_(1, idx_d, y.T @ x_dense).T
    return sparse_mm(a, y).index_copy_(0, idx_d, x_dense.T @ y)


def _empty_wgrad(w: Tensor) -> Tensor:
    """A fake's gradient of w: the layout _wgrad and _split_wgrad write."""
    return w.new_empty(w.shape[::-1]).T if ref.col_major(w) else w.new_empty(w.shape)


# ---- the dense ReLU^2 FFN core with its pointwise work in the GEMM epilogues ------------------------------------
def _fused_relu2(t: Tensor) -> bool:
    """The Triton kernels run bf16 CUDA tensors; anything else (CPU, fp32 without autocast) takes the twin."""
    return t.device.type == "cuda" and t.dtype == torch.bfloat16 and _tk is not None


RELU2_GEMMS = ("triton", "cutlass")  # the fused ReLU^2 GEMMs' implementations (kernels/cuda/<name>...)


def _relu2_gemms(kernel: str):
    if kernel == "cutlass":
        from .cuda import cutlass_relu2
        return cutlass_relu2
    from .cuda import relu2_gemm
    return relu2_gemm


@torch.library.custom_op("elas::relu2_ffn", mutates_args=())
def relu2_ffn_op(h1: Tensor, wu: Tensor, wd: Tensor, impl: str = "triton") -> tuple[Tensor, Tensor]:
    """-> (h2 = relu(h1 wu^T)^2 wd [T, q'], y2 [T, d_ff], saved for backward). y1 is never written. impl: which
    fused GEMMs run on bf16 CUDA tensors (RELU2_GEMMS). (Not named `kernel`: Inductor's fallback for a custom op
    passes the op as its own `kernel` argument, and a schema argument of that name collides with it.)"""
    if _fused_relu2(h1):
        y2 = _relu2_gemms(impl).linear_relu2(h1, wu)
    else:
        y2 = ref.linear_relu2(h1, wu)
    return y2 @ wd, y2


@relu2_ffn_op.register_fake
def _(h1, wu, wd, impl="triton"):
    return h1.new_empty((h1.shape[0], wd.shape[1])), h1.new_empty((h1.shape[0], wu.shape[0]))


@torch.library.custom_op("elas::relu2_ffn_backward", mutates_args=())
def relu2_ffn_backward_op(dh2: Tensor, h1: Tensor, wu: Tensor, wd: Tensor, y2: Tensor, impl: str = "triton"
                          ) -> tuple[Tensor, Tensor, Tensor]:
    dh2 = dh2.contiguous()
    if _fused_relu2(dh2):  # dy1 = 2 sqrt(y2) (dh2 wd^T); triton: dy2 [T, d_ff] never written; cutlass: cuBLAS's
        dy1 = _relu2_gemms(impl).relu2_grad_gemm(dh2, wd, y2)  # dy2, then one pointwise pass (faster there)
    else:
        dy1 = ref.relu2_grad_gemm(dh2, wd, y2)
    return dy1 @ wu, _wgrad(dy1, h1, wu), _wgrad(y2, dh2, wd)  # dh1 [T, q], dwu [d_ff, q], dwd [d_ff, q']


@relu2_ffn_backward_op.register_fake
def _(dh2, h1, wu, wd, y2, impl="triton"):
    # (dh1 is written contiguous whatever h1's layout, as the real op's)
    return torch.empty_like(h1, memory_format=torch.contiguous_format), _empty_wgrad(wu), _empty_wgrad(wd)


def _relu2_setup_context(ctx, inputs, output):
    h1, wu, wd = inputs[:3]
    ctx.impl = inputs[3] if len(inputs) > 3 else "triton"
    ctx.save_for_backward(h1, wu, wd, output[1])
    ctx.mark_non_differentiable(output[1])  # y2 [T, d_ff]: saved for the backward, not a result to differentiate
    ctx.set_materialize_grads(False)  # (so no zero gradient is made up for it)


def _relu2_backward(ctx, dh2, _dy2):
    if dh2 is None:  # (h2 reached no loss)
        return None, None, None, None
    h1, wu, wd, y2 = ctx.saved_tensors
    return *relu2_ffn_backward_op(dh2, h1, wu, wd, y2, ctx.impl), None


relu2_ffn_op.register_autograd(_relu2_backward, setup_context=_relu2_setup_context)


def relu2_ffn(h1: Tensor, wu: Tensor, wd: Tensor, kernel: str = "triton") -> Tensor:
    """The dense ReLU^2 FFN core: h1 [T, q], wu [d_ff, q], wd [d_ff, q'] (one dtype) -> h2 = relu(h1 wu^T)^2 wd
    [T, q']. On bf16 CUDA tensors the up-projection writes y2 = relu(y1)^2 from its epilogue and the backward's
    dy2 GEMM writes dy1 = 2 sqrt(y2) dy2 from its (kernel="triton": kernels/cuda/relu2_gemm.py): the FFN saves y2
    alone, and no pointwise kernel runs. kernel="cutlass": the up-projection on a CUTLASS GEMM, the backward's
    pointwise work as one pass after cuBLAS's dy2 (kernels/cuda/cutlass_relu2.py). Elsewhere the same formulas
    in torch ops (reference.py)."""
    if h1.shape[1] != wu.shape[1] or wu.shape[0] != wd.shape[0]:
        raise ValueError(f"relu2_ffn: shapes h1 {tuple(h1.shape)}, wu {tuple(wu.shape)}, wd {tuple(wd.shape)} "
                         f"do not chain (expected [T, q], [d_ff, q], [d_ff, q'])")
    if kernel not in RELU2_GEMMS:
        raise ValueError(f"relu2_ffn: kernel {kernel!r} unknown; expected one of {RELU2_GEMMS}")
    return relu2_ffn_op(h1, wu, wd, kernel)[0]


# ---- the q/k/v projection with rotary embeddings in its epilogue --------------------------------------------------
@torch.library.custom_op("elas::linear_rope", mutates_args=())
def linear_rope_op(a: Tensor, w: Tensor, cos: Tensor, sin: Tensor, head_dim: int, rot_cols: int) -> Tensor:
    if _fused_relu2(a):  # bf16 on CUDA: the CUTLASS GEMM with the rotation in its epilogue (a library, prebuilt)
        from .cuda import cutlass_relu2
        return cutlass_relu2.linear_rope(a, w, cos, sin, head_dim, rot_cols)
    return ref.linear_rope(a, w, cos, sin, head_dim, rot_cols)


@linear_rope_op.register_fake
def _(a, w, cos, sin, head_dim, rot_cols):
    return a.new_empty((a.shape[0], a.shape[1], w.shape[1]))


def _rope_setup_context(ctx, inputs, output):
    a, w, cos, sin, ctx.head_dim, ctx.rot_cols = inputs
    ctx.save_for_backward(a, w, cos, sin)


def _rope_backward(ctx, g):
    # plain torch ops: AOTAutograd traces them, so Inductor fuses the inverse rotation into the kernels around it
    a, w, cos, sin = ctx.saved_tensors
    gp = ref.rope_pairs(g, cos, sin, ctx.head_dim, ctx.rot_cols, inverse=True)  # [L, M, N], the pre-rotation grad
    return torch.bmm(gp, w), torch.bmm(gp.transpose(1, 2), a), None, None, None, None


linear_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def linear_rope(a: Tensor, w: Tensor, cos: Tensor, sin: Tensor, head_dim: int, rot_cols: int) -> Tensor:
    """out [L, M, N] = a [L, M, K] @ w [L, N, K]^T, then each column pair (2i, 2i+1) of a head among the columns
    l*N + n < rot_cols rotated by the rotary angle of position m % seq (cos, sin: [seq, head_dim/2] fp32): the
    q/k/v projection of attention with its rotary embedding, q and k columns interleaved per head by the caller
    (model/llama.py). On bf16 CUDA tensors one CUTLASS GEMM with the rotation in its epilogue (a library built
    beforehand: kernels/cuda/cutlass_relu2.py); elsewhere reference.linear_rope. a may be a strided view."""
    if a.dim() != 3 or w.dim() != 3 or a.shape[0] != w.shape[0] or a.shape[2] != w.shape[2]:
        raise ValueError(f"linear_rope: a {tuple(a.shape)} and w {tuple(w.shape)} do not chain (expected [L, M, K] "
                         f"and [L, N, K])")
    if head_dim % 2 or rot_cols % head_dim or w.shape[1] % head_dim or rot_cols > w.shape[0] * w.shape[1]:
        raise ValueError(f"linear_rope: w's {w.shape[1]} rows and rot_cols {rot_cols} must be whole heads of even "
                         f"head_dim {head_dim}, rot_cols within the {w.shape[0] * w.shape[1]} columns")
    return linear_rope_op(a, w, cos, sin, head_dim, rot_cols)


# ---- causal attention with the rotary embedding inside (model.attn_backend=triton) -----------------------------------
@torch.library.custom_op("elas::rope_attention", mutates_args=())
def rope_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """-> (o [B, S, H, D] contiguous, lse [B * H, S] fp32, log2 domain): reference.rope_attention; on CUDA the Triton
    forward (kernels/cuda/attention.py)."""
    if q.device.type == "cuda" and _tk is not None:
        from .cuda import attention
        return attention.rope_attention_forward(q, k, v, cos, sin)
    return ref.rope_attention(q, k, v, cos, sin)


@rope_attention_op.register_fake
def _(q, k, v, cos, sin):
    b, s, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b * h, s), dtype=torch.float32)


@torch.library.custom_op("elas::rope_attention_saved", mutates_args=())
def rope_attention_saved_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (o, lse as rope_attention_op, q and k rotated [B, S, H, D] contiguous in q's dtype): the form whose
    backward reads the saved rotation instead of rotating q and k on every load (launch setting save_rotated)."""
    if q.device.type == "cuda" and _tk is not None:
        from .cuda import attention
        return attention.rope_attention_forward(q, k, v, cos, sin, save_rotated=True)
    return ref.rope_attention(q, k, v, cos, sin, save_rotated=True)


@rope_attention_saved_op.register_fake
def _(q, k, v, cos, sin):
    b, s, h, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((b * h, s), dtype=torch.float32), q.new_empty(q.shape),
            q.new_empty(q.shape))


@torch.library.custom_op("elas::rope_attention_backward", mutates_args=())
def rope_attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cos: Tensor,
                               sin: Tensor, rotated: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) w.r.t. the unrotated q and k; rotated: q and k are rope_attention_saved_op's rotation."""
    if q.device.type == "cuda" and _tk is not None:
        from .cuda import attention
        return attention.rope_attention_backward(do if do.stride(-1) == 1 else do.contiguous(), q, k, v, o, lse,
                                                 cos, sin, rotated=rotated)
    return ref.rope_attention_backward(do, q, k, v, cos, sin, rotated=rotated)


@rope_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, cos, sin, rotated=False):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cos, sin = inputs
    ctx.rotated = len(output) == 4  # rope_attention_saved_op: its rotated q and k saved in place of q and k
    if ctx.rotated:
        q, k = output[2], output[3]
        ctx.mark_non_differentiable(*output[1:])
    else:
        ctx.mark_non_differentiable(output[1])  # lse: saved for the backward, not a result to differentiate
    ctx.save_for_backward(q, k, v, output[0], output[1], cos, sin)
    # no zero gradients made up for the outputs nothing differentiates (lse; the rotated q and k, [B, S, H, D] each):
    # in eager mode autograd would otherwise allocate and fill them on every backward (as for relu2_ffn_op's y2 and
    # act24_ffn_op's saved tensors)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, do, *_rest):
    if do is None:  # (o reached no loss)
        return None, None, None, None, None
    q, k, v, o, lse, cos, sin = ctx.saved_tensors
    return (*rope_attention_backward_op(do, q, k, v, o, lse, cos, sin, ctx.rotated), None, None)


rope_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)
rope_attention_saved_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _save_rotated() -> bool:
    """The backward's launch setting save_rotated (kernels/cuda/attention.py BWD_CONFIG; ELAS_ATTN_CONFIG); off
    where the Triton kernels are not installed."""
    if _tk is None:
        return False
    from .cuda import attention
    return bool(attention.BWD_CONFIG.get("save_rotated"))


def rope_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Causal attention of q, k, v [B, S, H, D] (the projections' layout, before the rotary embedding) with q and
    k rotated by cos, sin [>= S, D/2] (model/llama.py rope_tables): o [B, S, H, D] contiguous, what
    SDPA(apply_rope(q), apply_rope(k), v) gives in that layout. On CUDA Triton kernels (kernels/cuda/attention.py):
    a forward that rotates q and k as it loads them and, where a backward comes and save_rotated is set (the
    default), also writes them rotated; a backward that reads those (or rotates on load), after a rowsum(dO O)
    pass (delta_pre). Elsewhere its reference in fp32."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"rope_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"three [batch, seq, heads, head_dim] tensors of one shape")
    d = q.shape[-1]
    if d < 32 or d & (d - 1):
        raise ValueError(f"rope_attention: head_dim {d}: expected a power of two >= 32")
    if cos.dim() != 2 or cos.shape[0] < q.shape[1] or cos.shape[1] != d // 2 or sin.shape != cos.shape:
        raise ValueError(f"rope_attention: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}: expected "
                         f"[>= {q.shape[1]}, {d // 2}]")
    if _save_rotated() and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):  # (no backward to
        # come, as in evaluation: nothing to save)
        return rope_attention_saved_op(q, k, v, cos, sin)[0]
    return rope_attention_op(q, k, v, cos, sin)[0]


# ---- the LM head's cross-entropy, one chunk of logits: loss and logits' gradient in one pass -------------------
@torch.library.custom_op("elas::softmax_xent_grad", mutates_args=())
def softmax_xent_grad(z: Tensor, t: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """-> (g = (softmax(z) - onehot(t)) * scale [T, V] in z's dtype, nll [T]): reference.softmax_xent_grad; on CUDA
    one Triton pass over z (kernels/cuda/xent.py). model/loss.py calls it per chunk (model.ce_kernel=triton)."""
    if z.device.type == "cuda" and _tk is not None and z.dtype in (torch.bfloat16, torch.float16, torch.float32):
        from .cuda import xent  # (fp64 takes the reference: the kernel's math is fp32)
        return xent.softmax_xent_grad(z, t, scale)
    return ref.softmax_xent_grad(z, t, scale)


@softmax_xent_grad.register_fake
def _(z, t, scale):
    return z.new_empty(z.shape), z.new_empty(z.shape[:1], dtype=torch.promote_types(z.dtype, torch.float32))


# ---- RMSNorm on a residual stream: the backward as one pass (dx with the residual's gradient, and dw) ----------
@torch.library.custom_op("elas::rmsnorm_backward", mutates_args=())
def rmsnorm_backward(dn: Tensor, x: Tensor, dres: Tensor | None, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """-> (dx = dres + d(rmsnorm)/dx [.., d] in x's dtype, dw [d] in w's dtype): reference.rmsnorm_backward; on CUDA
    one Triton pass over dn and x (kernels/cuda/rmsnorm.py)."""
    if x.device.type == "cuda" and _tk is not None:
        from .cuda import rmsnorm
        return rmsnorm.rmsnorm_backward(dn, x, dres, w, eps)
    return ref.rmsnorm_backward(dn, x, dres, w, eps)


@rmsnorm_backward.register_fake
def _(dn, x, dres, w, eps):
    # contiguous whatever x's layout, as both real paths return dx (empty_like would keep a transposed x's strides)
    return x.new_empty(x.shape), w.new_empty(w.shape)


class _ResidualRMSNorm(torch.autograd.Function):
    """(x, n = rmsnorm(x) w) from x: the residual stream passed on and its norm, whose two gradients meet in
    elas::rmsnorm_backward. The forward is torch ops (Inductor fuses them with the residual add before them)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, w)
        ctx.eps = eps
        xf = x.float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)
        return x.view_as(x), n  # x passed on as a view: no copy

    @staticmethod
    def backward(ctx, dres: Tensor | None, dn: Tensor | None):
        x, w = ctx.saved_tensors
        if dn is None:  # the norm's output unused: only the residual's gradient
            return dres, None, None
        dx, dw = rmsnorm_backward(dn, x, dres, w, ctx.eps)
        return dx, dw, None


def residual_rmsnorm(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x, rmsnorm(x) w) for a block that adds to x after normalising it (model.norm_kernel=fused: model/llama.py
    RMSNorm.split): the same values as (x, RMSNorm(x)); the backward is one kernel where the compiled form of the
    unfused ops runs two (dx with dres added; dw), each reading dn and x."""
    return _ResidualRMSNorm.apply(x, w, eps)


# ---- fuse_qkv's up-projections: their input gradients written side by side, no concatenation ----------------
@torch.library.custom_op("elas::mm_side_by_side", mutates_args=())
def mm_side_by_side(gs: list[Tensor], ws: list[Tensor]) -> Tensor:
    """[g_0 w_0 | g_1 w_1 | ...]: gs [T, d] each, ws [d, n_i] each (one dtype) -> [T, sum n_i], each GEMM writing
    its own column block in place (cuBLAS takes the block's leading dimension), where the autograd of
    h.split() would add the three [T, r] gradients' concatenation, a pass over [T, 3r] per layer."""
    out = gs[0].new_empty(gs[0].shape[0], sum(w.shape[1] for w in ws))
    c = 0
    for g, w in zip(gs, ws):
        torch.mm(g, w, out=out[:, c:c + w.shape[1]])
        c += w.shape[1]
    return out


@mm_side_by_side.register_fake
def _(gs, ws):
    return gs[0].new_empty(gs[0].shape[0], sum(w.shape[1] for w in ws))


class _UpProjections(torch.autograd.Function):
    """(y_i = h_i w_i^T for the column blocks h_i of h [T, k r]): the up-projections of fuse_qkv's low-rank q, k and
    v; w_i [d, r], already in the compute dtype. The backward's dh is one [T, k r] tensor from elas::mm_side_by_side;
    each w_i's gradient is dy_i^T h_i."""

    @staticmethod
    def forward(ctx, h: Tensor, *ws: Tensor) -> tuple[Tensor, ...]:
        r = ws[0].shape[1]
        ctx.save_for_backward(h, *ws)
        ctx.set_materialize_grads(False)  # an unused output's weight gets no gradient (None), as F.linear's would
        return tuple(F.linear(h[:, i * r:(i + 1) * r], w) for i, w in enumerate(ws))

    @staticmethod
    def backward(ctx, *dys: Tensor | None):
        h, *ws = ctx.saved_tensors
        r = ws[0].shape[1]
        dh = None
        if ctx.needs_input_grad[0] and any(dy is not None for dy in dys):
            dh = mm_side_by_side([torch.zeros(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
                                  if dy is None else dy for dy, w in zip(dys, ws)], ws)
        dws = [None if dy is None or not ctx.needs_input_grad[1 + i] else dy.t() @ h[:, i * r:(i + 1) * r]
               for i, dy in enumerate(dys)]
        return (dh, *dws)


@torch.library.custom_op("elas::mm_t_blocks", mutates_args=())
def mm_t_blocks(x: Tensor, g: Tensor, k: int) -> Tensor:
    """x [T, d], g [T, k n] -> [k, d, n], block i = x^T g[:, i n:(i + 1) n]: the k weight gradients of GEMMs that
    shared the input x, each one contiguous [d, n] tensor. One batched GEMM (on CUDA x^T is read k times through a
    batch stride of 0, g's column blocks through a batch stride of n; the CPU's bmm copies both operands first), as
    many output tiles as the one GEMM x^T g [d, k n],
    whose column blocks would be strided views that autograd copies into each parameter's layout (a [d, n] copy per
    weight and step)."""
    t, d = x.shape
    return torch.bmm(x.t().expand(k, d, t), g.unflatten(1, (k, g.shape[1] // k)).transpose(0, 1))


@mm_t_blocks.register_fake
def _(x, g, k):
    return x.new_empty(k, x.shape[1], g.shape[1] // k)


class _DownProjections(torch.autograd.Function):
    """h = x [w_0 | w_1 | ..] (x [T, d], w_i [d, r], already in the compute dtype): fuse_qkv's down-projections as
    one GEMM of width k r. The backward: dx = dh [w_0 | ..]^T (one GEMM, K = k r, the forward's concatenation
    saved: k r d elements a layer) and each w_i's gradient its own contiguous [d, r] block of elas::mm_t_blocks
    (16-byte aligned blocks only: see backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, *ws: Tensor) -> Tensor:
        w = torch.cat(ws, dim=1)  # [d, k r]
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, dh: Tensor):
        x, w = ctx.saved_tensors
        dx = dh @ w.t() if ctx.needs_input_grad[0] else None
        k = len(ctx.needs_input_grad) - 1
        dws = (None,) * k
        if any(ctx.needs_input_grad[1:]):
            d, r = x.shape[1], w.shape[1] // k
            # the blocks start d r elements apart: each must stay 16-byte aligned (MasterAdamW's kernel reads the
            # gradients by address, 16 bytes at a time); else one [d, k r] GEMM, whose column blocks autograd copies
            blocks = mm_t_blocks(x, dh, k) if d * r * x.element_size() % 16 == 0 else \
                (x.t() @ dh).unflatten(1, (k, r)).movedim(1, 0)
            dws = tuple(blocks[i] if ctx.needs_input_grad[1 + i] else None for i in range(k))
        return (dx, *dws)


def low_rank_qkv(x: Tensor, ws_in: list[Tensor], ws_out: list[Tensor]) -> tuple[Tensor, ...]:
    """x [.., d], k low-rank projections (ws_in [d, r] each, ws_out [d_out, r] each) -> k outputs [.., d_out], the
    same values as x @ w_in @ w_out^T for each (under autocast: in its dtype, as F.linear's): one down-projection
    GEMM of width k r (_DownProjections), then each up-projection on its column block of h in place
    (_UpProjections). In the backward no tensor is concatenated or copied: the up-projections' input gradients are
    written side by side into dh [T, k r] (elas::mm_side_by_side), the down-projections' weight gradients block by
    block (elas::mm_t_blocks; where a block would not start 16-byte aligned, one GEMM whose blocks autograd
    copies). Installed by build_model for model.fuse_qkv on low-rank attention
    (model/llama.py Attention.qkv)."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    lead = x.shape[:-1]
    with torch.autocast(dev, enabled=False):  # the GEMMs in the compute dtype, as autocast's would run them
        h = _DownProjections.apply(x.reshape(-1, x.shape[-1]).to(dt), *(w.to(dt) for w in ws_in))
        outs = _UpProjections.apply(h, *(w.to(dt) for w in ws_out))
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)


# ---- the packed 2:4 FFN core: one operator, autograd registered on it ----------------------------------------
def _on_cuda(t: Tensor) -> bool:
    """Where act24.cutlass's CUTLASS forms run (a function, so a CPU test can route the glue through them)."""
    return t.device.type == "cuda"


def _cutlass_mask(cutlass: bool, mask_grad: bool, dense_frac: float | None, wdt_p, wdt, t: Tensor) -> bool:
    """act24.cutlass in mask mode (modes 7 and 8): no split and no weight operands of the down-projection (the
    forward's wu_p branch is taken before this one). Its saved tensors are (y2s dense, an empty mask): the backward
    tells this form by the empty mask (`_saved_y2s`)."""
    return cutlass and mask_grad and dense_frac is None and wdt_p is None and wdt is None and _on_cuda(t)


def _saved_y2s(mask_grad: bool, s1: Tensor) -> bool:
    """The forward saved y2s dense (the CUTLASS mask form) rather than the packed buffer and its mask bits (never
    empty: T, d_ff >= 64)."""
    return mask_grad and s1.numel() == 0



@torch.library.custom_op("elas::act24_ffn", mutates_args=())
def act24_ffn_op(h1: Tensor, wu: Tensor, wd: Tensor, mask_grad: bool, dense_frac: float | None,
                 fused: bool = False, wu_p: Tensor | None = None, wdt_p: Tensor | None = None,
                 wdt: Tensor | None = None, cutlass: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> h2 [T, q'] and what backward needs: (s0, s1) = (packed y2s buffer, mask bits) in mask mode, (y1, -) in
    ste mode; (idx_d [n_dense] i64, slots [d_ff] i32) of the 95/5 split (empty without it). fused: the
    up-projection and the sparsifier as one kernel (y1 [T, d_ff] then exists only in ste mode), and in the
    backward (ste mode without the split) the dy2 GEMM and the pointwise work as one. wu_p: wu 2:4 along q (2:4
    weights, S-STE), packed [d_ff, q*9/16]: the up-projection as a weight-sparse GEMM (fused is then not used);
    wdt_p: the packed [d_ff, q'] matrix, 2:4 along q', of the backward's dy2 = dh2 wdt^T (saved for it); wdt:
    that matrix dense where it is not packed (default: wd). cutlass (on CUDA, without the split or weight
    operands): the up-projection with the sparsifier, and the backward's dy2 GEMM with its pointwise work, each by
    the fastest at the shape of cuBLAS + the Triton kernel and a CUTLASS GEMM with the work in its epilogue
    (cuda/cutlass_relu2.up_relu2_pack24, ste_grad_gemm; in mask mode up_relu2s_pack24 and grad_pack24, which save
    y2s dense, (s0, s1) = (y2s, empty), instead of the packed buffer and mask bits)."""
    # the split ranks features by their positives in y1 (as the masked core does), counted by the sparsifier
    if wu_p is not None:  # (S(W) [d_ff, q] @ h1^T)^T, written column-major: [T, d_ff]
        y1 = sparse_mm(Packed24(wu_p, _EMPTY_U8, tuple(wu.shape)), h1.t(), out_t=True)
        p, counts = relu2_sparsify24_packed(y1, count=dense_frac is not None, bits=mask_grad)
    elif fused:
        y1, p, counts = up_relu2_sparsify24(h1, wu, count=dense_frac is not None, write_y1=not mask_grad)
    elif cutlass and not mask_grad and dense_frac is None and _on_cuda(h1):
        from .cuda import cutlass_relu2
        y1, buf = cutlass_relu2.up_relu2_pack24(h1, wu)
        p, counts = Packed24(buf, h1.new_empty(0, dtype=torch.uint8), (h1.shape[0], wu.shape[0])), None
    elif _cutlass_mask(cutlass, mask_grad, dense_frac, wdt_p, wdt, h1):
        # mask mode on CUTLASS: y2s dense is saved for the backward (what the dense twin saves: y2), not the
        # packed buffer and mask bits; the packed buffer feeds the 2:4 down-projection and is freed
        from .cuda import cutlass_relu2
        y2s, buf = cutlass_relu2.up_relu2s_pack24(h1, wu)
        h2 = sparse_mm(Packed24(buf, h1.new_empty(0, dtype=torch.uint8), (h1.shape[0], wu.shape[0])), wd)
        return h2, y2s, h1.new_empty(0, dtype=torch.uint8), h1.new_empty(0, dtype=torch.long), \
            h1.new_empty(0, dtype=torch.int32)
    else:
        y1 = h1 @ wu.T  # [T, d_ff]
        p, counts = relu2_sparsify24_packed(y1, count=dense_frac is not None, bits=mask_grad)
    h2 = sparse_mm(p, wd)  # [T, q']
    idx_d, slots = h1.new_empty(0, dtype=torch.long), h1.new_empty(0, dtype=torch.int32)  # outputs never alias
    if counts is not None:
        dense = ref.dense_features_from_counts(counts, dense_frac)  # bool [d_ff]
        # n_dense is known on the host (no sync); a prefix sum ranks the dense features (a second sort measured
        # 0.55 ms of a 1B relu2-24 step, torch.topk on a tie-broken key 2.9 ms)
        idx_d, slots = ref.dense_slots(dense, ref.n_dense_features(dense.numel(), dense_frac))
    if mask_grad:
        return h2, p.buffer, p.mask_bits, idx_d, slots
    return h2, y1, h1.new_empty(0), idx_d, slots  # ste: the backward kernel redoes the selection from y1


@act24_ffn_op.register_fake
def _(h1, wu, wd, mask_grad, dense_frac, fused=False, wu_p=None, wdt_p=None, wdt=None, cutlass=False):
    t, f = h1.shape[0], wu.shape[0]
    h2 = h1.new_empty((t, wd.shape[1]))
    if wu_p is None and not fused and _cutlass_mask(cutlass, mask_grad, dense_frac, wdt_p, wdt, h1):
        return h2, h1.new_empty((t, f)), h1.new_empty(0, dtype=torch.uint8), h1.new_empty(0, dtype=torch.long), \
            h1.new_empty(0, dtype=torch.int32)
    if mask_grad:
        s0, s1 = h1.new_empty((t, f * 9 // 16), dtype=torch.bfloat16), h1.new_empty((t, f // 8), dtype=torch.uint8)
    else:
        s0, s1 = h1.new_empty((t, f)), h1.new_empty(0)
    if dense_frac is None:
        return h2, s0, s1, h1.new_empty(0, dtype=torch.long), h1.new_empty(0, dtype=torch.int32)
    n_dense = ref.n_dense_features(f, dense_frac)
    return h2, s0, s1, h1.new_empty(n_dense, dtype=torch.long), h1.new_empty(f, dtype=torch.int32)


@torch.library.custom_op("elas::act24_ffn_backward", mutates_args=())
def act24_ffn_backward_op(dh2: Tensor, h1: Tensor, wu: Tensor, wd: Tensor, s0: Tensor, s1: Tensor, idx_d: Tensor,
                          slots: Tensor, mask_grad: bool, fused: bool = False, wdt_p: Tensor | None = None,
                          wdt: Tensor | None = None, cutlass: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    t, f = h1.shape[0], wu.shape[0]
    dh2, h1 = dh2.contiguous(), h1.contiguous()
    split = slots.numel() > 0
    p = Packed24(s0, s1, (t, f)) if mask_grad and not _saved_y2s(mask_grad, s1) else None
    y1 = None if mask_grad else s0
    plain_ste = not mask_grad and not split and wdt_p is None and wdt is None
    if _saved_y2s(mask_grad, s1):  # the CUTLASS mask form: dy1 dense and packed with the forward's choice
        from .cuda import cutlass_relu2
        dy1, buf = cutlass_relu2.grad_pack24(dh2, wd, s0)
        g = ref.Grads24(s0, dy1, None, dy1_packed=Packed24(buf, dh2.new_empty(0, dtype=torch.uint8), (t, f)))
    elif plain_ste and cutlass and _on_cuda(dh2):
        from .cuda import cutlass_relu2
        y2s, dy1 = cutlass_relu2.ste_grad_gemm(dh2, wd, y1)
        g = ref.Grads24(y2s, dy1, None)
    elif plain_ste and fused:
        # dy2 [T, d_ff] never leaves the GEMM's registers
        y2s, dy1 = dgrad_relu2_ste_op(dh2, wd, y1)
        g = ref.Grads24(y2s, dy1, None)
    else:
        if wdt_p is not None:  # a weight-sparse GEMM: (wdt [d_ff, q'] @ dh2^T)^T, written column-major
            dy2 = sparse_mm(Packed24(wdt_p, _EMPTY_U8, tuple(wd.shape)), dh2.t(), out_t=True)
        else:
            dy2 = dh2 @ (wd if wdt is None else wdt).T  # [T, d_ff]
        g = relu2_sparse24_backward(dy2, p, y1, slots if split else None, idx_d.numel())
    if split:
        # 95/5 split: every feature as a 2:4 GEMM pruned along tokens, then the n_dense densest features' rows
        # overwritten by their exact dense product (5% of the sparse GEMM's rows are wasted work; no gather or
        # scatter of the other 95%)
        dwd = _split_wgrad(g.y2s_t, g.y2s_dense, dh2, wd, idx_d)  # [d_ff, q']
        dwu = _split_wgrad(g.dy1_t, g.dy1_dense, h1, wu, idx_d)  # [d_ff, q]
    else:
        dwd = _wgrad(g.y2s, dh2, wd)  # [d_ff, q']
        dwu = _wgrad(g.dy1, h1, wu)  # [d_ff, q]
    if g.dy1_packed is not None:  # dy1 is 2:4 with the forward's pattern, packed with its metadata
        dh1 = sparse_mm(g.dy1_packed, wu)  # [T, q]
    else:
        dh1 = g.dy1 @ wu
    return dh1.to(h1.dtype), dwu.to(wu.dtype), dwd.to(wd.dtype)


@act24_ffn_backward_op.register_fake
def _(dh2, h1, wu, wd, s0, s1, idx_d, slots, mask_grad, fused=False, wdt_p=None, wdt=None, cutlass=False):
    # (dh1 is written contiguous whatever h1's layout, as the real op's)
    return torch.empty_like(h1, memory_format=torch.contiguous_format), _empty_wgrad(wu), _empty_wgrad(wd)


def _setup_context(ctx, inputs, output):
    h1, wu, wd, mask_grad = inputs[:4]
    _, s0, s1, idx_d, slots = output
    ctx.mask_grad = mask_grad
    ctx.fused = bool(inputs[5]) if len(inputs) > 5 else False
    wdt_p = inputs[7] if len(inputs) > 7 else None
    wdt = inputs[8] if len(inputs) > 8 else None
    ctx.cutlass = bool(inputs[9]) if len(inputs) > 9 else False
    ctx.save_for_backward(h1, wu, wd, s0, s1, idx_d, slots, wdt_p, wdt)
    ctx.mark_non_differentiable(s0, s1, idx_d, slots)  # saved for the backward, not results to differentiate
    ctx.set_materialize_grads(False)  # (so no zero gradients are made up for them)


def _backward(ctx, dh2, *_unused):
    if dh2 is None:  # (h2 reached no loss)
        return (None,) * 10
    h1, wu, wd, s0, s1, idx_d, slots, wdt_p, wdt = ctx.saved_tensors
    dh1, dwu, dwd = act24_ffn_backward_op(dh2, h1, wu, wd, s0, s1, idx_d, slots, ctx.mask_grad, ctx.fused, wdt_p,
                                          wdt, ctx.cutlass)
    return dh1, dwu, dwd, None, None, None, None, None, None, None


act24_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def act24_ffn(h1: Tensor, wu: Tensor, wd: Tensor, mask_grad: bool, dense_frac: float | None = None,
              fused: bool = False, wu_packed: Packed24 | None = None, wdt_packed: Packed24 | None = None,
              wdt: Tensor | None = None, cutlass: bool = False) -> Tensor:
    """The packed 2:4 FFN core: h1 [T, q] bf16, wu [d_ff, q] bf16, wd [d_ff, q'] bf16 -> h2 [T, q'] bf16.
    T and d_ff multiples of 64 (the SM90 layout's tile); fused: see act24_ffn_op. wu_packed: wu itself, 2:4 along
    q (2:4 weights); wdt_packed [d_ff, q'], 2:4 along q': the matrix of the backward's dy2 = dh2 wdt^T (S-STE's
    transposed input gradient); both products then run as weight-sparse GEMMs. wdt: that matrix dense (not
    packed). cutlass: CUTLASS GEMMs with the 2:4 work in their epilogues where faster (see act24_ffn_op)."""
    check_shape(h1.shape[0], wu.shape[0])
    for name, pk, want in (("wu_packed", wu_packed, wu.shape), ("wdt_packed", wdt_packed, wd.shape),
                           ("wdt", wdt, wd.shape)):
        if pk is not None and tuple(pk.shape) != tuple(want):
            raise ValueError(f"act24_ffn: {name} is {tuple(pk.shape)}, expected {tuple(want)}")
    return act24_ffn_op(h1, wu, wd, mask_grad, dense_frac, fused,
                        None if wu_packed is None else wu_packed.buffer,
                        None if wdt_packed is None else wdt_packed.buffer, wdt, cutlass)[0]


__all__ = ["relu2_ffn", "relu2_sparsify24_packed", "up_relu2_sparsify24", "relu2_sparse24_backward", "sparse_mm", "act24_ffn",
           "dgrad_relu2_ste_op", "rmsnorm_backward", "residual_rmsnorm", "linear_rope", "mm_side_by_side",
           "low_rank_qkv", "mm_t_blocks"]
