"""Gradient modes, the weight-gradient split, the warm-up schedule, token permutation, statistics, the seam."""
import pytest
import torch

from elas.build import build_model
from elas.config import model_preset
from elas.kernels import reference as ref
from elas.model import DenseReLU2, ReLU2FFN
from elas.sparsity import (Act24Config, Act24Core, applied_methods, collect_stats, masked_act24_ffn, set_step,
                           sparsify_, token_permutation)
from elas.sparsity.act24 import permutation_keys

from conftest import preset


def relu2_sparse24(y1, grad_mode):
    """y1 -> 2:4(relu(y1)^2) through the masked core with an identity second factor (wu = I, wd = I): the core's
    gradient w.r.t. its input h1 is then exactly the gradient through the sparsified activation."""
    eye = torch.eye(y1.shape[1], dtype=y1.dtype)
    return (masked_act24_ffn(y1, eye, eye, grad_mode == "mask"),)


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
    ffn = ReLU2FFN.of_width(16, 32, rank=rank).double()
    sparsify_(ffn, Act24Config(dense_warmup_steps=0, **cfg))
    set_step(ffn, 0, 1)
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
    keys = permutation_keys()
    perm, inv = token_permutation(keys, 256)
    assert sorted(perm.tolist()) == list(range(256))
    assert torch.equal(perm[inv], torch.arange(256)) and torch.equal(inv[perm], torch.arange(256))
    assert not torch.equal(perm, torch.arange(256))
    assert torch.equal(token_permutation(permutation_keys(), 256)[0], perm)  # a function of the seed alone
    with pytest.raises(ValueError, match="exceeds"):
        token_permutation(keys, keys.numel() + 1)


def test_permuted_tokens_gradient_is_the_inverse_gather():
    """The permutation's own backward (a gather by the inverse) gives autograd's gradient of indexing, exactly."""
    from elas.sparsity.act24 import _PermuteTokens
    perm, inv = token_permutation(permutation_keys(), 32)
    x = torch.randn(3, 32, 5, requires_grad=True)
    w = torch.randn(3, 32, 5)
    (gx,) = torch.autograd.grad((_PermuteTokens.apply(x, perm, inv) * w).sum(), x)
    (want,) = torch.autograd.grad((x[:, perm] * w).sum(), x)
    assert torch.equal(_PermuteTokens.apply(x, perm, inv), x[:, perm]) and torch.equal(gx, want)


def test_dense_warmup_switch():
    model = build_model(preset("llama-tiny-elas", dense_warmup_steps=3, n_layers=2))
    cores = [m.core for m in model.modules() if isinstance(m, ReLU2FFN)]
    assert len(cores) == 2 and all(isinstance(c, Act24Core) for c in cores)
    idx = torch.randint(0, 100, (2, 16))
    assert set_step(model, 0, 10) == ("dense",) and not any(c.active for c in cores)
    dense_out = model(idx)
    assert set_step(model, 2, 10) == ("dense",)
    assert set_step(model, 3, 10) == ("sparse",) and all(c.active for c in cores)
    sparse_out = model(idx)
    assert not torch.allclose(dense_out, sparse_out)
    sparsify_(model, None)  # every method off: the dense cores are back
    assert set_step(model, 10, 10) == () and all(isinstance(m.core, DenseReLU2) for m in model.modules()
                                                  if isinstance(m, ReLU2FFN))
    assert torch.allclose(model(idx), dense_out)


def test_sparsify_refuses_swiglu():
    with pytest.raises(ValueError, match="ReLU"):
        sparsify_(build_model(model_preset("llama-tiny", n_layers=1)), Act24Config())


def test_two_methods_claiming_one_operand_are_an_error():
    model = build_model(model_preset("llama-tiny-relu2", n_layers=2))
    sparsify_(model, Act24Config(), filter_fn=lambda m, fqn: fqn.startswith("blocks.0."))
    (a,) = applied_methods(model)
    assert [fqn for fqn, _ in a.targets] == ["blocks.0.ffn"] and ("blocks.0.ffn", "y2") in a.claims
    sparsify_(model, Act24Config(grad_mode="mask"), filter_fn=lambda m, fqn: fqn.startswith("blocks.1."))
    assert isinstance(model.blocks[1].ffn.core, Act24Core) and model.blocks[1].ffn.core.mask_grad
    before = model.blocks[0].ffn.core
    with pytest.raises(ValueError, match="both make operand 'y2' of blocks.0.ffn sparse"):
        sparsify_(model, Act24Config())
    assert model.blocks[0].ffn.core is before and len(applied_methods(model)) == 2  # the refused one is off


def test_explicit_cuda_backend_is_an_error_where_it_cannot_load():
    if torch.cuda.is_available():
        pytest.skip("this machine can run the cuda backend")
    with pytest.raises(ValueError, match="kernel backend 'cuda' was requested"):
        sparsify_(ReLU2FFN.of_width(16, 64), Act24Config(backend="cuda"))
    with pytest.raises(TypeError, match="bias-free nn.Linear"):
        f = ReLU2FFN(torch.nn.Linear(16, 64), torch.nn.Linear(64, 16))
        sparsify_(f, Act24Config())


def test_stats():
    model = build_model(preset("llama-tiny-elas", dense_warmup_steps=0, n_layers=2))
    set_step(model, 0, 1)
    st = collect_stats(model, lambda: model(torch.randint(0, 100, (2, 16))))
    assert set(st) >= {"y2_zero_frac/0", "y2_zero_frac/1", "dropped_nnz_frac/mean", "y2_zero_frac/mean"}
    # fresh init: about half of the pre-activations are negative
    assert 0.3 < st["y2_zero_frac/mean"] < 0.7
    # 2:4 keeps 2 of 4; with ~50% density it must drop some but not all non-zeros
    assert 0.05 < st["dropped_nnz_frac/mean"] < 0.6
    assert all(c.stats_sink is None for _, c in applied_methods(model)[0].targets)  # statistics are off again
    y1 = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.0, 0.0, 0.0, 5.0]])
    from elas.sparsity import relu2_stats
    s = relu2_stats(y1, None)
    assert s["y2_zero_frac"].item() == pytest.approx(4 / 8)
    assert s["dropped_nnz_frac"].item() == pytest.approx(1 / 4)


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
        f = ReLU2FFN.of_width(64, 256, rank=rank).to(torch.bfloat16)  # d_ff 256: the 25% split keeps 64 dense
        sparsify_(f, Act24Config(grad_mode=grad_mode, path=path, permute_tokens=True, dense_warmup_steps=0,
                                 wgrad_dense_frac=wgrad_dense_frac))
        set_step(f, 0, 1)
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
    from elas.kernels.ops import act24_ffn
    h1 = torch.randn(128, 64, dtype=torch.bfloat16, requires_grad=True)
    wu = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)
    wd = torch.randn(256, 32, dtype=torch.bfloat16, requires_grad=True)
    sizes = {}
    for mode in ("mask", "ste"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            act24_ffn(h1, wu, wd, mode == "mask")
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
    model = build_model(preset("llama-tiny" + variant, 0, n_layers=2, vocab_size=256))
    set_step(model, 0, 1)
    idx = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.parametrize("path", ["packed", "masked"])
@pytest.mark.parametrize("grad_mode, wgrad_dense_frac", [("mask", None), ("ste", None), ("mask", 0.25)])
def test_cores_give_weight_gradients_in_their_parameters_layout(path, grad_mode, wgrad_dense_frac):
    """The core takes W_down as its transposed view; a gradient written contiguous for that view reached W_down
    transposed, and autograd's AccumulateGrad copied it into the parameter's layout (one [d_model, d_ff] copy per
    layer, ~3 ms of a 1B step). Each gradient arrives in its parameter's layout, with the 95/5 split too."""
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(64, 256).to(torch.bfloat16)
    sparsify_(f, Act24Config(grad_mode=grad_mode, path=path, dense_warmup_steps=0,
                             wgrad_dense_frac=wgrad_dense_frac))
    set_step(f, 0, 1)
    seen = {}
    for name, p in f.named_parameters():
        p.register_hook(lambda g, name=name, p=p: seen.setdefault(name, (g.stride(), p.stride())) and None)
    f(torch.randn(2, 64, 64, dtype=torch.bfloat16)).sum().backward()
    assert len(seen) == 2 and all(got == want for got, want in seen.values()), seen


@pytest.mark.parametrize("rank", [0, 8])
def test_packed_path_with_fp32_weights_no_autocast(rank):
    """precision=fp32 on a GPU: fp32 master weights, no autocast; the packed core runs in bf16 inside and the
    FFN returns the caller's dtype."""
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(64, 128, rank=rank)
    sparsify_(f, Act24Config(path="packed", dense_warmup_steps=0))
    set_step(f, 0, 1)
    x = torch.randn(2, 64, 64, requires_grad=True)
    y = f(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in f.parameters())


def test_kernel_field_changes_tell_kernels_from_the_model():
    """A method's kernel fields (act24: backend, path, fused, cutlass; sste24: backend) differ between two method
    lists: listed; any other field, or another method, differs: None (a resume refuses it); equal: []."""
    from elas.config import act24
    from elas.sparsity import kernel_field_changes
    a = [act24()]
    assert kernel_field_changes(a, [act24()]) == []
    b = [{**act24(), "cutlass": True, "backend": "cuda"}]
    assert kernel_field_changes(a, b) == ["model.act24.backend: 'auto' -> 'cuda'",
                                          "model.act24.cutlass: 'auto' -> True"]
    assert kernel_field_changes(a, [{**act24(), "grad_mode": "mask"}]) is None
    assert kernel_field_changes(a, []) is None


def test_wgrad_split_takes_any_token_count():
    """The 95/5 split prunes the weight-gradient operands 2:4 along tokens: a step whose token count is not a
    multiple of 4 (batch 1 x seq 127) trains, the last partial group pruned as if padded with zero tokens."""
    torch.manual_seed(0)
    ffn = ReLU2FFN.of_width(16, 32).double()
    sparsify_(ffn, Act24Config(dense_warmup_steps=0, grad_mode="mask", wgrad_dense_frac=0.25))
    set_step(ffn, 0, 1)
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    gy = torch.randn(1, 7, 16, dtype=torch.float64)
    ffn(x).backward(gy)
    with torch.no_grad():  # the same step on 8 tokens, the 8th zero with a zero gradient
        xp, gp = torch.cat([x, x.new_zeros(1, 1, 16)], 1), torch.cat([gy, gy.new_zeros(1, 1, 16)], 1)
    grads = [p.grad.clone() for p in ffn.parameters()]
    ffn.zero_grad()
    ffn(xp).backward(gp)
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, ffn.parameters()))


def test_token_permutation_covers_the_models_longest_sequence():
    """permute_tokens on a model with max_seq_len beyond the default table: its sequences run (the table grows
    to max_seq_len; shorter sequences keep their permutation)."""
    model = build_model(preset("llama-tiny-relu2-24-split", dense_warmup_steps=0, n_layers=1, max_seq_len=4104))
    set_step(model, 0, 1)
    core = model.blocks[0].ffn.core
    assert core.perm_keys.numel() == 4104 and torch.equal(core.perm_keys[:4096], permutation_keys())
    core.perm_keys.zero_()
    core.init_buffers()  # (after a meta-device build)
    assert core.perm_keys.numel() == 4104 and torch.equal(core.perm_keys[:4096], permutation_keys())
    with torch.no_grad():
        assert model(torch.randint(0, 100, (1, 4100))).isfinite().all()


@pytest.mark.parametrize("cls, field", [("Act24Config", "dense_warmup_steps"), ("VNMConfig", "v"),
                                        ("VNMConfig", "recluster_steps"), ("SSTE24Config", "dense_warmup_steps")])
def test_integer_fields_refuse_booleans(cls, field):
    """A config.json or TOML `true` for an integer field ran as 1, silently."""
    import elas.sparsity as sp
    with pytest.raises(ValueError, match=f"{field}=True: expected an integer"):
        getattr(sp, cls)(**{field: True})


@pytest.mark.parametrize("mask_grad", [False, True])
def test_the_masked_and_packed_twins_agree_on_a_nan_neuron(mask_grad):
    """A dropped entry is 0 whatever its value in both twins (the masked one kept NaN * 0 = NaN where the packed
    one and the kernels write 0)."""
    from elas.kernels import ops
    g = torch.Generator().manual_seed(0)
    h1, wu, wd = (torch.randn(*s, generator=g).bfloat16() for s in ((64, 64), (128, 64), (128, 64)))
    wu[5] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (h1, wu, wd) for _ in range(2)]
    a = masked_act24_ffn(leaves[0], leaves[2], leaves[4], mask_grad)
    p = ops.act24_ffn(leaves[1], leaves[3], leaves[5], mask_grad)
    assert torch.equal(a.isnan(), p.isnan())
    a.float().sum().backward()
    p.float().sum().backward()
    for x, y in zip(leaves[::2], leaves[1::2]):  # and the gradients (the masked backward's relu(NaN) * dy2 was NaN)
        assert torch.equal(x.grad.isnan(), y.grad.isnan())
    y2s, mask = ref.relu2_sparsify24(torch.tensor([[float("nan"), 0.0, 0.0, 0.0], [1e20, 1e20, 1e20, 1e20]]))
    assert torch.all(y2s[~mask] == 0)


@pytest.mark.parametrize("mask_grad", [False, True])
def test_the_split_twins_agree_on_a_nan_neuron(mask_grad):
    """With the 95/5 split the masked twin ranked a NaN neuron among the densest features (relu(NaN) != 0), where
    the packed core's sparsifier counts positives (NaN > 0 is false): another feature lost its dense slot, and the
    finite weight gradients differed by hundreds. And sparsify24, the split's along-token pruning, wrote a dropped
    NaN as NaN (x * mask), not 0 as the module's rule and the packed twin do."""
    from elas.kernels import ops
    from elas.kernels.packed import unpack24
    g = torch.Generator().manual_seed(0)
    h1, wu, wd = (torch.randn(*s, generator=g).bfloat16() for s in ((64, 64), (1280, 64), (1280, 64)))
    assert ref.n_dense_features(1280, 0.05) == 64
    wu[5] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (h1, wu, wd) for _ in range(2)]
    a = masked_act24_ffn(leaves[0], leaves[2], leaves[4], mask_grad, 0.05)
    p = ops.act24_ffn(leaves[1], leaves[3], leaves[5], mask_grad, 0.05)
    assert torch.equal(a.isnan(), p.isnan())
    a.float().sum().backward()
    p.float().sum().backward()
    for x, y in zip(leaves[2::2], leaves[3::2]):  # wu, wd (h1's gradient is NaN through wu's NaN row in both)
        assert not x.grad.isnan().any() and torch.equal(x.grad, y.grad)
    y = torch.randn(64, 64, generator=g).bfloat16()
    y[::4] = float("nan")  # one NaN in each group of 4 tokens: 2:4 along tokens drops it
    pruned = ref.wgrad_split_operand(y, torch.zeros(64, dtype=torch.bool))
    assert torch.equal(pruned, unpack24(ref.pack24_along_tokens(y, torch.arange(64))).T)
    assert torch.equal(pruned[::4], torch.zeros(16, 64, dtype=y.dtype)) and not pruned.isnan().any()
