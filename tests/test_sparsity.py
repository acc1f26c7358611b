"""Gradient modes, the weight-gradient split, the warm-up schedule, token permutation, statistics."""
import pytest
import torch

from elas.config import model_preset
from elas.kernels import reference as ref
from elas.model import ReLU2FFN, build_model
from elas.sparsity import (Act24Config, collect_stats, relu2_sparse24, set_sparsity_step, set_track_stats, sparsify_,
                           token_permutation)


def _y1(n=12, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # well-separated magnitudes so a finite-difference step never flips the mask
    y1 = torch.randn(n, f, generator=g, dtype=torch.float64)
    return (y1 + 0.3 * torch.sign(y1)).requires_grad_()


def test_gradcheck_mask_mode():
    # with the forward mask re-applied, the gradient is the true Jacobian of y1 -> 2:4(relu(y1)^2)
    assert torch.autograd.gradcheck(lambda y: relu2_sparse24(y, "mask")[0], (_y1(),), eps=1e-6, atol=1e-7)


def test_gradcheck_ste_mode():
    # STE: the backward is the Jacobian of the DENSE relu(y1)^2. The detached term turns the value into the dense
    # ReLU^2 without touching the gradient, so gradcheck's numerical Jacobian is that of the dense function.
    def f(y):
        y2s = relu2_sparse24(y, "ste")[0]
        return y2s + (torch.relu(y) ** 2 - y2s).detach()

    assert torch.autograd.gradcheck(f, (_y1(),), eps=1e-6, atol=1e-7)


def test_ste_and_mask_gradients_differ_exactly_on_dropped_entries():
    y1 = _y1()
    g = torch.randn(12, 16, dtype=torch.float64)
    (d_ste,) = torch.autograd.grad(relu2_sparse24(y1, "ste")[0], y1, g)
    (d_mask,) = torch.autograd.grad(relu2_sparse24(y1, "mask")[0], y1, g)
    m = ref.mask24(torch.relu(y1.detach()) ** 2)
    assert torch.allclose(d_ste, 2 * torch.relu(y1.detach()) * g)
    assert torch.allclose(d_mask, d_ste * m)
    assert (d_mask[~m & (y1.detach() > 0)] == 0).all() and (d_ste[~m & (y1.detach() > 0)] != 0).all()


def _ffn(rank, **cfg):
    torch.manual_seed(0)
    ffn = ReLU2FFN(16, 32, rank=rank).double()
    sparsify_(ffn, Act24Config(**cfg))
    ffn.sparse_active = True
    return ffn


@pytest.mark.parametrize("rank", [0, 4])
def test_ffn_mask_mode_gradcheck_params(rank):
    ffn = _ffn(rank, grad_mode="mask")
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ffn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [0, 4])
def test_wgrad_split_emulates_split_gemm(rank):
    """With the 95/5 split, weight gradients equal the formula: d_ff operand pruned 2:4 along tokens except the
    densest features; input gradients stay exact."""
    ffn = _ffn(rank, grad_mode="mask", wgrad_dense_frac=0.25)
    exact = _ffn(rank, grad_mode="mask")
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 8, 16, dtype=torch.float64)
    ffn(x).backward(gy)
    x2 = x.detach().clone().requires_grad_()
    exact(x2).backward(gy)
    assert torch.allclose(x.grad, x2.grad)  # input gradient unchanged by the split

    # explicit emulation of the split GEMMs
    xt, g3 = x.detach().reshape(16, 16), gy.reshape(16, 16)
    up, down = exact.up, exact.down
    with torch.no_grad():
        h1 = xt @ up.weight_in if rank else xt
        W1 = up.weight_out if rank else up.weight  # [d_ff, r or d]
        y1 = h1 @ W1.T
        dense = ref.dense_feature_split(torch.relu(y1), 0.25)
        y2s, m = ref.relu2_sparsify24(y1)
        if rank:
            d_int2 = g3 @ down.weight_out  # [T, r]
            dW_down_in = ref.wgrad_split_operand(y2s, dense).T @ d_int2  # [d_ff, r]
            dy2 = d_int2 @ down.weight_in.T
        else:
            dW_down = g3.T @ ref.wgrad_split_operand(y2s, dense)  # [d, d_ff]
            dy2 = g3 @ down.weight
        dy1 = 2 * torch.relu(y1) * dy2 * m
        dW1 = ref.wgrad_split_operand(dy1, dense).T @ h1  # [d_ff, r or d]
    if rank:
        assert torch.allclose(ffn.down.weight_in.grad, dW_down_in)
        assert torch.allclose(ffn.up.weight_out.grad, dW1)
        assert torch.allclose(ffn.up.weight_in.grad, exact.up.weight_in.grad)  # not d_ff-wide: exact
    else:
        assert torch.allclose(ffn.down.weight.grad, dW_down)
        assert torch.allclose(ffn.up.weight.grad, dW1)
    assert not torch.allclose(dW1, exact.up.weight_out.grad if rank else exact.up.weight.grad)


def test_sparse_forward_equals_masked_dense():
    ffn = _ffn(0, grad_mode="ste", permute_tokens=True)
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    y1 = ffn.up(x)
    expect = ffn.down(ref.relu2_sparsify24(y1)[0])
    assert torch.allclose(ffn(x), expect)  # permutation is invisible in the output


def test_token_permutation_is_invertible_and_fixed():
    perm, inv = token_permutation(256, torch.device("cpu"))
    assert sorted(perm.tolist()) == list(range(256))
    assert torch.equal(perm[inv], torch.arange(256)) and torch.equal(inv[perm], torch.arange(256))
    assert not torch.equal(perm, torch.arange(256))
    assert torch.equal(token_permutation(256, torch.device("cpu"))[0], perm)


def test_dense_warmup_switch():
    model = build_model(model_preset("llama-tiny-elas", dense_warmup_steps=3, n_layers=2))
    ffns = [m for m in model.modules() if isinstance(m, ReLU2FFN)]
    assert len(ffns) == 2
    idx = torch.randint(0, 100, (2, 16))
    assert set_sparsity_step(model, 0) is False and not any(f.sparse_active for f in ffns)
    dense_out = model(idx)
    assert set_sparsity_step(model, 2) is False
    assert set_sparsity_step(model, 3) is True and all(f.sparse_active for f in ffns)
    sparse_out = model(idx)
    assert not torch.allclose(dense_out, sparse_out)
    sparsify_(model, None)
    assert set_sparsity_step(model, 10) is False
    assert torch.allclose(model(idx), dense_out)


def test_sparsify_refuses_swiglu():
    with pytest.raises(ValueError, match="ReLU"):
        sparsify_(build_model(model_preset("llama-tiny", n_layers=1)), Act24Config())


def test_stats():
    model = build_model(model_preset("llama-tiny-elas", dense_warmup_steps=0, n_layers=2))
    set_sparsity_step(model, 0)
    set_track_stats(model, True)
    model(torch.randint(0, 100, (2, 16)))
    st = collect_stats(model)
    assert set(st) >= {"y2_zero_frac/0", "y2_zero_frac/1", "dropped_nnz_frac/mean", "y2_zero_frac/mean"}
    # fresh init: about half of the pre-activations are negative
    assert 0.3 < st["y2_zero_frac/mean"] < 0.7
    # 2:4 keeps 2 of 4; with ~50% density it must drop some but not all non-zeros
    assert 0.05 < st["dropped_nnz_frac/mean"] < 0.6
    ffn = next(m for m in model.modules() if isinstance(m, ReLU2FFN))
    y1 = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.0, 0.0, 0.0, 5.0]])
    from elas.sparsity import relu2_stats
    s = relu2_stats(y1, None)
    assert s["y2_zero_frac"].item() == pytest.approx(4 / 8)
    assert s["dropped_nnz_frac"].item() == pytest.approx(1 / 4)
    assert ffn.stats


@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("grad_mode", ["mask", "ste"])
@pytest.mark.parametrize("wgrad_dense_frac", [None, 0.25])
def test_packed_path_matches_masked_path(rank, grad_mode, wgrad_dense_frac):
    """The packed core (what runs on Hopper) against the masked-dense definition, both in bf16, on CPU with the
    reference kernels: same forward, same gradients up to bf16 rounding (the packed path rebuilds relu(y1) as
    sqrt(y2s) in `mask` mode)."""
    torch.manual_seed(0)
    ffns = []
    for path in ("masked", "packed"):
        torch.manual_seed(0)
        f = ReLU2FFN(64, 256, rank=rank).to(torch.bfloat16)  # d_ff 256: the 25% split keeps 64 features dense
        sparsify_(f, Act24Config(grad_mode=grad_mode, path=path, permute_tokens=True,
                                 wgrad_dense_frac=wgrad_dense_frac))
        f.sparse_active = True
        ffns.append(f)
    x = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    gy = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    outs, grads = [], []
    for f in ffns:
        xi = x.clone().requires_grad_()
        y = f(xi)
        y.backward(gy)
        outs.append(y.float())
        grads.append([xi.grad.float()] + [p.grad.float() for p in f.parameters()])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(outs[1], outs[0]) < 1e-2
    for g_packed, g_masked in zip(grads[1], grads[0]):
        assert rel(g_packed, g_masked) < 2e-2


def test_packed_ffn_core_saves_less_in_mask_mode():
    from elas import kernels
    from elas.sparsity import packed_ffn_core
    h1 = torch.randn(128, 64, dtype=torch.bfloat16, requires_grad=True)
    wu = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
    wd = torch.randn(256, 32, dtype=torch.bfloat16, requires_grad=True)
    sizes = {}
    for mode in ("mask", "ste"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            packed_ffn_core(h1, wu, wd, mode, kernels.reference)
        big = [t for t in saved if t.data_ptr() not in (h1.data_ptr(), wu.data_ptr(), wd.data_ptr())]
        sizes[mode] = sum(t.numel() * t.element_size() for t in big)
    dense_y2 = 128 * 256 * 2
    assert sizes["mask"] == dense_y2 * 9 // 16 + 128 * 256 // 8  # packed values+metadata, plus the mask bits
    assert sizes["ste"] == dense_y2  # y1 only


@pytest.mark.parametrize("variant", ["-relu2-24", "-elas"])
def test_reference_path_under_bf16_autocast(variant):
    """The masked path's custom Functions under autocast (the trainer's GPU setting; CPU autocast here): the
    backward must cope with bf16 activations and fp32 master weights."""
    torch.manual_seed(0)
    model = build_model(model_preset("llama-tiny" + variant, n_layers=2, vocab_size=256, dense_warmup_steps=0))
    set_sparsity_step(model, 0)
    idx = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.parametrize("rank", [0, 8])
def test_packed_path_with_fp32_weights_no_autocast(rank):
    """precision=fp32 on a GPU: fp32 master weights, no autocast; the packed core runs in bf16 inside and the
    FFN returns the caller's dtype."""
    torch.manual_seed(0)
    f = ReLU2FFN(64, 128, rank=rank)
    sparsify_(f, Act24Config(path="packed"))
    f.sparse_active = True
    x = torch.randn(2, 64, 64, requires_grad=True)
    y = f(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in f.parameters())
