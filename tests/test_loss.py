"""linear_cross_entropy against F.cross_entropy on materialised logits: loss, grad_h and grad_W, in every chunking."""
import pytest
import torch
import torch.nn.functional as F

from elas.model.loss import _default_chunk, linear_cross_entropy

V, D = 50, 16


def _inputs(shape, dtype=torch.float64, w_dtype=None, ignore_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=torch.float64).to(w_dtype or dtype).requires_grad_()
    t = torch.randint(0, V, shape, generator=g)
    t[torch.rand(shape, generator=g) < ignore_frac] = -100
    return h, w, t


def _reference(h, w, t):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = F.cross_entropy((h @ w.T).flatten(0, -2), t.reshape(-1), ignore_index=-100)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _ours(h, w, t, **kw):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = linear_cross_entropy(h, w, t, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100, None])
@pytest.mark.parametrize("shape", [(37,), (3, 13)])
def test_matches_cross_entropy(dtype, chunk, shape):
    h, w, t = _inputs(shape, dtype)
    assert (t == -100).any() and (t != -100).any()
    ref, ours = _reference(h, w, t), _ours(h, w, t, chunk_tokens=chunk)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0].float(), **tol)
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


def test_all_ignored_is_zero():
    h, w, t = _inputs((4, 5), torch.float32, ignore_frac=1.0)
    loss, gh, gw = _ours(h, w, t, chunk_tokens=3)
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_bf16_h_fp32_weight():
    # what bf16 autocast gives: h bf16 from the last norm, weight the fp32 master
    h, w, t = _inputs((2, 40), torch.float32)
    ref = _reference(h, w, t)
    loss, gh, gw = _ours(h.detach().bfloat16(), w, t, chunk_tokens=16)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref[0], rtol=1e-2, atol=0)
    torch.testing.assert_close(gh.float(), ref[1], rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(gw, ref[2], rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("op", [False, True])
def test_compile_fullgraph_matches_eager(op):
    """Compiled in one graph, with the torch ops or with the chunk op (model.ce_kernel=triton; its CPU reference)."""
    import torch._dynamo as dynamo
    from elas.kernels import ops
    dynamo.reset()
    h, w, t = _inputs((2, 19), torch.float32)

    def f(h, w, t):
        return linear_cross_entropy(torch.tanh(h), w, t, chunk_tokens=8,
                                    grad_kernel=ops.softmax_xent_grad if op else None)

    out = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = fn(hh, ww, t)
        loss.backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_output_scales():
    h, w, t = _inputs((37,), torch.float64)
    _, gh, gw = _ours(h, w, t, chunk_tokens=8)
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    (2 * linear_cross_entropy(h2, w2, t, chunk_tokens=8)).backward()
    torch.testing.assert_close(h2.grad, 2 * gh, rtol=1e-12, atol=0)
    torch.testing.assert_close(w2.grad, 2 * gw, rtol=1e-12, atol=0)


def test_no_grad_and_default_chunk():
    h, w, t = _inputs((37,), torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t)
    torch.testing.assert_close(loss, _reference(h, w, t)[0])
    assert _default_chunk(32000) == 2048 and _default_chunk(2 ** 20) == 64 and _default_chunk(2 ** 30) == 1


@pytest.mark.gpu
def test_gpu_bf16_under_autocast_matches_the_fp32_reference():
    """The CUDA path: bf16 h, fp32 master weight, autocast on, grad_W accumulated in fp32 by addmm(out_dtype)."""
    torch.manual_seed(0)
    h = torch.randn(1000, 256, device="cuda").bfloat16().requires_grad_()
    w = (0.05 * torch.randn(3000, 256, device="cuda")).requires_grad_()
    t = torch.randint(0, 3000, (1000,), device="cuda")
    t[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_tokens=384)
    loss.backward()
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(hr @ wr.t(), t, ignore_index=-100)
    ref.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-3)
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


# ---- model.ce_kernel=triton: a chunk's softmax and logits' gradient as one op (kernels/ops.py softmax_xent_grad) ----
def test_reference_grad_kernel_is_the_cross_entropy_gradient():
    from elas.kernels import reference as ref
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (9,), generator=g)
    scale = torch.rand(9, generator=g, dtype=torch.float64)
    scale[2] = 0  # an ignored row: no gradient
    zr = z.clone().requires_grad_()
    nll = F.cross_entropy(zr, t, reduction="none")
    (nll * scale).sum().backward()
    got_g, got_nll = ref.softmax_xent_grad(z, t, scale)
    torch.testing.assert_close(got_nll, nll.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_g, zr.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(got_g[2] == 0)


@pytest.mark.parametrize("t_rows, vocab, kw, one", [
    (5, 50, {}, True), (7, 300, {"block": 64}, False), (3, 1000, {"one_block": False, "block": 128}, False),
    (4, 77, {"one_block": True, "num_warps": 2}, True),
    (3, 50, {"one_block": False}, False)])  # (the loop with its default block, wider than the row: lanes past V)
def test_triton_grad_kernel_matches_the_reference(t_rows, vocab, kw, one):
    """Under the interpreter on CPU (CI sets TRITON_INTERPRET=1), on the GPU natively: both forms (the row in one
    block; a loop over blocks whose last block runs past V, or whose one block does: lanes that never see a
    logit), a row of scale 0, targets in the last block."""
    pytest.importorskip("triton")
    from elas.kernels import reference as ref
    from elas.kernels.cuda.xent import launch_settings, softmax_xent_grad
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    z = (3 * torch.randn(t_rows, vocab, generator=g)).to(dev, torch.bfloat16)
    t = torch.randint(0, vocab, (t_rows,), generator=g).to(dev)
    t[-1] = vocab - 1
    scale = torch.rand(t_rows, generator=g).to(dev)
    scale[0] = 0
    assert launch_settings(vocab, kw.get("block"), kw.get("num_warps"), kw.get("one_block"))[0] == one
    got_g, got_nll = softmax_xent_grad(z, t, scale, **kw)
    want_g, want_nll = ref.softmax_xent_grad(z.double(), t, scale.double())
    assert got_g.dtype == torch.bfloat16 and got_nll.dtype == torch.float32 and got_g.shape == z.shape
    # g: the exact value rounded to bf16 once, within one ulp (2^-7 relative: the interpreter's cast truncates)
    err = (got_g.double() - want_g).abs() - want_g.abs() * 2.0 ** -7
    assert err.max().item() <= 1e-6
    torch.testing.assert_close(got_nll.double(), want_nll, rtol=1e-5, atol=1e-5)
    assert torch.all(got_g[0] == 0)
    with pytest.raises(ValueError, match="expected z"):  # the right shape, columns not contiguous
        softmax_xent_grad(z.t().contiguous().t(), t, scale)
    with pytest.raises(ValueError, match="block=3"):
        softmax_xent_grad(z, t, scale, block=3)
    with pytest.raises(ValueError, match="one block must span the row"):
        softmax_xent_grad(z, t, scale, one_block=True, block=16)


@pytest.mark.parametrize("kw", [{}, {"one_block": False, "block": 64}])
def test_triton_grad_kernel_loss_of_large_logits(kw):
    """Logits far from 0 (a row offset by +-600, as an untied head can drift to): the loss is a small difference of
    large numbers, so it must be formed in the logits' own units (m - z[t] + log(s)), not from a log2-scaled
    logsumexp (600 * log2(e) in fp32 has an ulp of 6.1e-5, 4.2e-5 in natural units, which the loss of a confident row
    would inherit); the gradient, formed from the same max, stays the softmax's within bf16's rounding."""
    pytest.importorskip("triton")
    from elas.kernels import reference as ref
    from elas.kernels.cuda.xent import softmax_xent_grad
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 200, generator=g) + torch.tensor([[600.0], [-600.0], [611.0], [0.0]])
    t = torch.randint(0, 200, (4,), generator=g)
    z[torch.arange(4), t] += 12  # confident rows: losses ~1e-4, so an absolute error of 1e-4 is all of the loss
    z = z.to(dev, torch.bfloat16)
    got_g, got_nll = softmax_xent_grad(z, t.to(dev), torch.ones(4, device=dev), **kw)
    want_g, want_nll = ref.softmax_xent_grad(z.double().cpu(), t, torch.ones(4, dtype=torch.float64))
    assert (got_nll.double().cpu() - want_nll).abs().max().item() < 2e-6, (got_nll, want_nll)
    err = (got_g.double().cpu() - want_g).abs() - want_g.abs() * 2.0 ** -7  # one bf16 ulp of the exact value
    assert err.max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_kernel_matches_the_torch_ops(dtype):
    """linear_cross_entropy with the op (its CPU reference here) against the torch ops: loss, grad_h and grad_W."""
    from elas.kernels import ops
    h, w, t = _inputs((3, 13), dtype)
    ref = _ours(h, w, t, chunk_tokens=8)
    got = _ours(h, w, t, chunk_tokens=8, grad_kernel=ops.softmax_xent_grad)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    def refuse(*a):
        raise AssertionError("called without gradients wanted")

    with torch.no_grad():  # no gradient wanted: the op is not called, the loss is the same
        torch.testing.assert_close(linear_cross_entropy(h, w, t, grad_kernel=refuse), ref[0], **tol)


def test_ce_kernel_key(monkeypatch):
    """model.ce_kernel: auto is torch on the CPU, triton installs the op; a bad value is one line naming it; a
    config.json without the key (written before it) loads as torch."""
    from conftest import preset
    from elas.build import build_model, ce_kernel
    from elas.config import ModelConfig, from_dict, to_dict
    from elas.kernels import ops
    import copy
    import importlib.util
    cfg = preset("llama-tiny-lowrank-relu2", None, n_layers=1, vocab_size=64)
    assert cfg.ce_kernel == "auto" and ce_kernel(cfg, "cpu") == "torch"
    assert build_model(cfg).ce_grad is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "triton" else real(n, *a))
    monkeypatch.setattr(ops, "_tk", object())  # (the operators' Triton kernels importable, as on a GPU machine)
    assert ce_kernel(cfg, "cuda") == "triton"
    cfg.lm_loss = "logits"  # no chunks: the loss's torch ops
    assert ce_kernel(cfg, "cuda") == "torch" and build_model(cfg).ce_grad is None
    cfg.lm_loss = "chunked"
    monkeypatch.setattr(ops, "_tk", None)
    assert ce_kernel(cfg, "cuda") == "torch"
    monkeypatch.setattr(ops, "_tk", object())
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    assert ce_kernel(cfg, "cuda") == "torch"
    monkeypatch.undo()
    cfg.ce_kernel = "triton"
    model = build_model(cfg)
    assert model.ce_grad is torch.ops.elas.softmax_xent_grad
    copy.deepcopy(model)  # (the op installed deep-copies)
    calls = []

    def spy(z, t, scale):  # the installed op, counted: the model's loss must go through it
        calls.append(z.shape)
        return model_op(z, t, scale)

    model_op, model.ce_grad = model.ce_grad, spy
    idx = torch.randint(0, 64, (2, 9))
    cfg.ce_kernel = "torch"
    plain = build_model(cfg)
    plain.load_state_dict(model.state_dict())
    for m in (model, plain):
        m(idx, idx).backward()
    assert calls == [(18, 64)]  # one chunk of 2 x 9 tokens
    for (n, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="ce_kernel.*'fused'.*expected one of"):
        cfg.ce_kernel = "fused"
        cfg.validate()
    cfg.ce_kernel = "auto"
    old = {k: v for k, v in to_dict(cfg).items() if k != "ce_kernel"}
    assert from_dict(ModelConfig, old).ce_kernel == "torch"


@pytest.mark.gpu
def test_gpu_grad_kernel_at_the_1b_chunk():
    """The one-pass kernel at the step's chunk [2048, 32000] bf16, against the fp64 reference, and the whole loss
    with it against the torch ops (compiled as in the step)."""
    from elas.kernels import ops
    from elas.kernels import reference as ref
    from elas.kernels.cuda.xent import softmax_xent_grad
    torch.manual_seed(0)
    z = (3 * torch.randn(2048, 32000, device="cuda")).bfloat16()
    t = torch.randint(0, 32000, (2048,), device="cuda")
    scale = torch.full((2048,), 1 / 8192, device="cuda")
    scale[::10] = 0
    want_g, want_nll = ref.softmax_xent_grad(z.double(), t, scale.double())
    for kw in ({}, {"one_block": False}):
        g, nll = softmax_xent_grad(z, t, scale, **kw)
        assert ((g.double() - want_g).norm() / want_g.norm()).item() < 4e-3
        assert ((nll.double() - want_nll).abs().max() / want_nll.abs().max()).item() < 1e-5
    h = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (0.05 * torch.randn(32000, 512, device="cuda")).requires_grad_()
    tt = torch.randint(0, 32000, (4096,), device="cuda")
    tt[::9] = -100
    out = []
    for k in (None, ops.softmax_xent_grad):
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(linear_cross_entropy)(hh, ww, tt, grad_kernel=k)
        loss.backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    (l0, gh0, gw0), (l1, gh1, gw1) = out
    assert abs(l1.item() - l0.item()) < 1e-4 * l0.item()
    assert ((gh1.float() - gh0.float()).norm() / gh0.float().norm()).item() < 1e-2
    assert ((gw1 - gw0).norm() / gw0.norm()).item() < 1e-2


def test_xent_env_override_is_checked_at_import():
    """ELAS_XENT_CONFIG: a value of the wrong type (a bool for warps, a string for one_block) fails when the kernel's
    module is imported, with one line naming the variable; a good one sets the launch."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    code = "from elas.kernels.cuda.xent import launch_settings; print(launch_settings(32000))"
    for value, match in (('{"num_warps": true}', "num_warps=True: expected a power of two"),
                         ('{"one_block": "no"}', "one_block='no': expected true or false"),
                         ('{"warps": 8}', "unknown key 'warps'")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ELAS_XENT_CONFIG": value},
                             capture_output=True, text=True)
        assert out.returncode != 0 and "ELAS_XENT_CONFIG" in out.stderr and match in out.stderr, out.stderr[-300:]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ELAS_XENT_CONFIG": '{"one_block": false, "num_warps": 4}'})
    assert out.stdout.split() == ["(False,", "4096,", "4)"], out.stderr[-300:]
