"""The d_ff-wide GEMMs with their 2:4 pointwise work in the epilogue (kernels/cuda/epilogue.py).

CPU (CI): the Triton kernels under TRITON_INTERPRET=1 on small shapes with integer-valued inputs (exact GEMM
outputs: ties, zeros and negatives galore), bit for bit against the standalone kernels and the reference on the
same GEMM output; the operators and the act24 option on the reference path. GPU: the compiled kernels against
cuBLAS + the standalone kernels at random shapes, and the packed FFN with the option against the one without.
"""
import pytest
import torch

from elas.kernels import ops
from elas.kernels import reference as ref

triton = pytest.importorskip("triton")
from elas.kernels.cuda.epilogue import dgrad_relu2_ste, up_relu2_sparsify24  # noqa: E402
from elas.kernels.cuda.sparsify import relu2_sparse24_backward, relu2_sparsify24_packed  # noqa: E402


def _ints(shape, lo, hi, seed):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _ffn_and_grads(h1, wu, wd, mask_grad: bool, fused: bool, dense_frac: float | None = None):
    """(h2, dh1, dwu, dwd) of the packed FFN core for the loss sum(h2^2)."""
    a, b, c = (t.clone().requires_grad_() for t in (h1, wu, wd))
    h2 = ops.act24_ffn(a, b, c, mask_grad, dense_frac, fused)
    h2.float().square().sum().backward()
    return h2, a.grad, b.grad, c.grad


def _same(a, b) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("m, n, k, bm, bn", [(128, 128, 64, 128, 128), (128, 256, 128, 64, 64),
                                             (64, 128, 64, 64, 32)])
def test_fused_kernel_bit_identical_to_the_standalone_sparsifier(m, n, k, bm, bn):
    h1, wu = _ints((m, k), -3, 4, 0), _ints((n, k), -2, 3, 1)
    counts = torch.zeros(n, dtype=torch.int32)
    y1, p = up_relu2_sparsify24(h1, wu, True, counts, bm=bm, bn=bn, bk=64)
    want_y1 = (h1.float() @ wu.float().T).bfloat16()  # integers: exact in any order
    assert torch.equal(y1, want_y1)
    assert (y1 == 0).any() and (y1 < 0).any()  # the inputs exercise zeros and negatives (and many ties)
    want_counts = torch.zeros(n, dtype=torch.int32)
    q = relu2_sparsify24_packed(y1, want_counts)
    assert _same(p.buffer, q.buffer) and torch.equal(p.mask_bits, q.mask_bits) and torch.equal(counts, want_counts)
    r = ref.relu2_sparsify24_packed(y1)
    assert _same(p.buffer, r.buffer) and torch.equal(p.mask_bits, r.mask_bits)
    y1_none, p2 = up_relu2_sparsify24(h1, wu, False, bm=bm, bn=bn, bk=64)  # mask mode: no y1 written
    assert y1_none is None and _same(p2.buffer, p.buffer)


@pytest.mark.parametrize("m, n, k, bm, bn", [(128, 128, 64, 128, 128), (64, 128, 128, 64, 32)])
def test_dgrad_kernel_bit_identical_to_gemm_then_backward_kernel(m, n, k, bm, bn):
    dh2, wd = _ints((m, k), -3, 4, 5), _ints((n, k), -2, 3, 6)
    y1 = _ints((m, n), -4, 5, 7)  # integer y1: many ties among the |y2| of a group, zeros, negatives
    y2s, dy1 = dgrad_relu2_ste(dh2, wd, y1, bm=bm, bn=bn, bk=64)
    dy2 = (dh2.float() @ wd.float().T).bfloat16()  # exact
    g = relu2_sparse24_backward(dy2, None, y1)
    assert _same(y2s, g.y2s) and _same(dy1, g.dy1)
    want = ref.dgrad_relu2_ste(dh2, wd, y1)
    assert _same(y2s, want[0]) and _same(dy1, want[1])
    with pytest.raises(ValueError, match="y1 must be bf16"):
        dgrad_relu2_ste(dh2, wd, y1[:, :64], bm=bm, bn=bn)


def test_fused_kernel_rejects_shapes_it_cannot_tile():
    h1, wu = _ints((128, 64), -1, 2, 0), _ints((128, 64), -1, 2, 1)
    with pytest.raises(ValueError, match="do not tile"):
        up_relu2_sparsify24(h1, wu, bm=96)
    with pytest.raises(ValueError, match="share K"):
        up_relu2_sparsify24(h1, wu[:, :32])
    with pytest.raises(ValueError, match="must be bf16"):
        up_relu2_sparsify24(h1.float(), wu)


def test_operator_reference_and_act24_option_on_cpu():
    """The operators' CPU branches are the references (matmul then the pointwise kernel); act24_ffn with fused
    gives the unfused result, forward and backward, in both gradient modes."""
    h1, wu = _ints((64, 64), -3, 4, 2), _ints((128, 64), -2, 3, 3)
    y1, p, counts = ops.up_relu2_sparsify24(h1, wu, count=True)
    want = ref.relu2_sparsify24_packed(h1 @ wu.T)
    assert torch.equal(y1, h1 @ wu.T) and _same(p.buffer, want.buffer)
    assert torch.equal(counts, ((h1 @ wu.T) > 0).sum(0, dtype=torch.int32))
    assert ops.up_relu2_sparsify24(h1, wu, write_y1=False)[0] is None
    y1i = _ints((64, 128), -4, 5, 8)
    dh2 = _ints((64, 32), -2, 3, 9)
    got = ops.dgrad_relu2_ste_op(dh2, _ints((128, 32), -2, 3, 10), y1i)
    want = ref.relu2_sparse24_backward(dh2 @ _ints((128, 32), -2, 3, 10).T, None, y1i)
    assert _same(got[0], want.y2s) and _same(got[1], want.dy1)
    wd = _ints((128, 32), -2, 3, 4)
    for mask_grad, frac in ((False, None), (True, None), (True, 0.25), (False, 0.25)):  # 0.25: the 95/5 split
        for x, y in zip(*(_ffn_and_grads(h1, wu, wd, mask_grad, fused, frac) for fused in (False, True))):
            assert torch.equal(x, y)


def test_act24_config_key():
    from elas.sparsity.act24 import Act24Config
    assert Act24Config(fused="true").fused is True
    with pytest.raises(ValueError, match="act24.fused"):
        Act24Config(fused="maybe")


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1024, 2176, 512), (2048, 8192, 512), (1024, 4224, 1024), (512, 2048, 256)])
def test_gpu_fused_kernel_matches_cublas_and_the_standalone_sparsifier(m, n, k):
    """Random bf16 inputs: y1 within bf16 rounding of cuBLAS's, and the packed output bit for bit what the
    standalone kernel makes of the fused kernel's own y1 (the selection is the same code)."""
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    h1 = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    wu = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    counts = torch.zeros(n, dtype=torch.int32, device="cuda")
    y1, p = up_relu2_sparsify24(h1, wu, True, counts)
    cublas = h1 @ wu.T
    assert ((y1.float() - cublas.float()).norm() / cublas.float().norm()).item() < 1e-2
    want_counts = torch.zeros_like(counts)
    q = relu2_sparsify24_packed(y1, want_counts)
    assert _same(p.buffer, q.buffer) and torch.equal(p.mask_bits, q.mask_bits) and torch.equal(counts, want_counts)
    _, p2 = up_relu2_sparsify24(h1, wu, False)
    assert _same(p2.buffer, p.buffer)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1024, 2176, 512), (2048, 8192, 512), (512, 2048, 256)])
def test_gpu_dgrad_kernel_matches_cublas_and_the_backward_kernel(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    dh2 = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    wd = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    y1 = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    y2s, dy1 = dgrad_relu2_ste(dh2, wd, y1)
    want = relu2_sparse24_backward(dh2 @ wd.T, None, y1)
    assert _same(y2s, want.y2s)  # y2s depends on y1 alone
    assert ((dy1.float() - want.dy1.float()).norm() / want.dy1.float().norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mask_grad, frac", [(False, None), (True, None), (True, 0.05)])
def test_gpu_packed_ffn_with_fused_kernels_matches_the_unfused_one(mask_grad, frac):
    torch.manual_seed(0)
    t, q, d_ff = 2048, 512, 2176
    h1 = torch.randn(t, q, device="cuda").bfloat16()
    wu = (torch.randn(d_ff, q, device="cuda") / q ** 0.5).bfloat16()
    wd = (torch.randn(d_ff, 256, device="cuda") / d_ff ** 0.5).bfloat16()
    for x, y in zip(*(_ffn_and_grads(h1, wu, wd, mask_grad, fused, frac) for fused in (False, True))):
        assert ((x.float() - y.float()).norm() / y.float().norm()).item() < 2e-2


def test_epilogue_table_renders_ratios_and_missing_configurations():
    from elas.bench.report import epilogue_table
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "date": "2026-12-02"}
    row = {"kernel": "up", "M": 8192, "K": 512, "N": 8192, "cublas_ms": 0.1, "separate_ms": 0.22, "fused_ms": 0.11,
           "speedup": 2.0, "fused_no_y1_ms": 0.1, "speedup_no_y1": 2.2, "best": "bm128_bn128"}
    dgrad = {k: v for k, v in row.items() if "no_y1" not in k} | {"kernel": "dgrad", "speedup": 1.5}
    text = epilogue_table({"env": env, "command": "elas bench epilogue",
                           "rows": [row, dgrad, {**row, "best": None}]})
    assert "**2.00x**" in text and "2.20x" in text and "**1.50x** | - | -" in text
    assert "no configuration ran exactly" in text


def test_fused_option_traces_as_one_graph_and_matches_eager():
    """A tiny ELAS model with act24.fused on the packed reference path: one graph, no break, the same loss and
    gradients as eager (the fused operators are torch.library operators like the others)."""
    from conftest import preset
    from elas.build import build_model
    from elas.sparsity import set_step
    cfg = preset("llama-tiny-elas", n_layers=1, vocab_size=256, max_seq_len=64)
    cfg.methods[0].update(path="packed", fused=True, dense_warmup_steps=0)
    torch.manual_seed(0)
    model = build_model(cfg)
    set_step(model, 0, 10)
    idx = torch.randint(0, 256, (2, 32))
    import torch._dynamo as dynamo
    dynamo.reset()
    ex = dynamo.explain(model)(idx, idx)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    eager = model(idx, idx)
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(idx, idx)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w)
