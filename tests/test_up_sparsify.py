"""The up-projection GEMM with the 2:4 sparsifier in its epilogue (kernels/cuda/up_sparsify.py).

CPU (CI): the Triton kernel under TRITON_INTERPRET=1 on small shapes with integer-valued inputs (exact y1: ties,
zeros and negatives galore), bit for bit against the standalone sparsifier and the reference on the same y1; the
operator and the act24 option on the reference path. GPU: the compiled kernel against cuBLAS + the standalone
sparsifier at random shapes, and the packed FFN with the option against the one without.
"""
import pytest
import torch

from elas.kernels import ops
from elas.kernels import reference as ref

triton = pytest.importorskip("triton")
from elas.kernels.cuda.sparsify import relu2_sparsify24_packed  # noqa: E402
from elas.kernels.cuda.up_sparsify import up_relu2_sparsify24  # noqa: E402


def _ints(shape, lo, hi, seed):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


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


def test_fused_kernel_rejects_shapes_it_cannot_tile():
    h1, wu = _ints((128, 64), -1, 2, 0), _ints((128, 64), -1, 2, 1)
    with pytest.raises(ValueError, match="do not tile"):
        up_relu2_sparsify24(h1, wu, bm=96)
    with pytest.raises(ValueError, match="share K"):
        up_relu2_sparsify24(h1, wu[:, :32])
    with pytest.raises(ValueError, match="bf16"):
        up_relu2_sparsify24(h1.float(), wu)


def test_operator_reference_and_act24_option_on_cpu():
    """The operator's CPU branch is the reference (matmul then sparsifier); act24_ffn with fused_up gives the
    unfused result, forward and backward, in both gradient modes."""
    h1, wu = _ints((64, 64), -3, 4, 2), _ints((128, 64), -2, 3, 3)
    y1, p, counts = ops.up_relu2_sparsify24(h1, wu, count=True)
    want = ref.relu2_sparsify24_packed(h1 @ wu.T)
    assert torch.equal(y1, h1 @ wu.T) and _same(p.buffer, want.buffer)
    assert torch.equal(counts, ((h1 @ wu.T) > 0).sum(0, dtype=torch.int32))
    assert ops.up_relu2_sparsify24(h1, wu, write_y1=False)[0] is None
    wd = _ints((128, 32), -2, 3, 4)
    for mask_grad in (False, True):
        outs = []
        for fused in (False, True):
            a, b, c = (t.clone().requires_grad_() for t in (h1, wu, wd))
            h2 = ops.act24_ffn(a, b, c, mask_grad, None, fused)
            h2.float().square().sum().backward()
            outs.append((h2, a.grad, b.grad, c.grad))
        for x, y in zip(*outs):
            assert torch.equal(x, y)


def test_act24_config_key():
    from elas.sparsity.act24 import Act24Config
    assert Act24Config(fused_up="true").fused_up is True
    with pytest.raises(ValueError, match="fused_up"):
        Act24Config(fused_up="maybe")


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
@pytest.mark.parametrize("mask_grad", [False, True])
def test_gpu_packed_ffn_with_fused_up_matches_the_unfused_one(mask_grad):
    torch.manual_seed(0)
    t, q, d_ff = 2048, 512, 2176
    h1 = torch.randn(t, q, device="cuda").bfloat16()
    wu = (torch.randn(d_ff, q, device="cuda") / q ** 0.5).bfloat16()
    wd = (torch.randn(d_ff, 256, device="cuda") / d_ff ** 0.5).bfloat16()
    outs = []
    for fused in (False, True):
        a, b, c = (x.clone().requires_grad_() for x in (h1, wu, wd))
        h2 = ops.act24_ffn(a, b, c, mask_grad, None, fused)
        h2.float().square().sum().backward()
        outs.append((h2, a.grad, b.grad, c.grad))
    for x, y in zip(*outs):
        assert ((x.float() - y.float()).norm() / y.float().norm()).item() < 2e-2


def test_up_table_renders_ratios_and_missing_configurations():
    from elas.bench.report import up_table
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "date": "2026-12-02"}
    row = {"M": 8192, "K": 512, "N": 8192, "cublas_ms": 0.1, "sparsify_ms": 0.12, "separate_ms": 0.22,
           "fused_ms": 0.11, "speedup": 2.0, "fused_no_y1_ms": 0.1, "speedup_no_y1": 2.2, "best": "bm128_bn128"}
    text = up_table({"env": env, "command": "elas bench up", "rows": [row, {**row, "best": None}]})
    assert "**2.00x**" in text and "2.20x" in text and "no configuration ran" in text
