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


def test_compile_fullgraph_matches_eager():
    import torch._dynamo as dynamo
    dynamo.reset()
    h, w, t = _inputs((2, 19), torch.float32)

    def f(h, w, t):
        return linear_cross_entropy(torch.tanh(h), w, t, chunk_tokens=8)

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
