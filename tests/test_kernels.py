"""Packed 2:4 format, the Triton sparsifier and the cuSPARSELt GEMM against the reference.

CPU (CI): the layout logic in plain torch, and the Triton kernel under TRITON_INTERPRET=1 on small shapes.
GPU (@pytest.mark.gpu, run on the H100 machine): the kernels on many random shapes, against the reference and
against torch's own cuSPARSELt compress/GEMM.
"""
import importlib.util

import pytest
import torch

from elas.kernels import reference as ref
from elas.kernels.packed import bits_to_mask, check_shape, meta_offsets, pack24, row_block, unpack24

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def adversarial(m, k, dtype, seed=0):
    """Negatives, exact zeros, all-zero groups and ties (small integers), next to plain Gaussian rows."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(m, k, generator=g)
    y[1::3] = torch.randint(-2, 3, (len(range(1, m, 3)), k), generator=g).float()  # ties and zeros
    y[2::5, : k // 2] = 0.0
    y[::7] = -y[::7].abs()  # rows with nothing positive
    return y.to(dtype)


def test_meta_offsets_cover_every_byte_twice():
    for m, k in [(64, 64), (128, 192), (192, 320)]:
        off, high = meta_offsets(m, k)
        assert off.min() == 0 and off.max() == m * k // 8 - 1
        counts = torch.bincount(off.flatten(), minlength=m * k // 8)
        assert (counts == 2).all()  # each byte: one low and one high nibble
        lo = torch.bincount(off[~high].flatten(), minlength=m * k // 8)
        assert (lo == 1).all()


def test_known_metadata_bytes():
    # rows 0 and 8 share byte 0 (group 0); group 4 of row 0 is byte 1; row 16 starts the second slab at 64
    m, k = 64, 64
    off, high = meta_offsets(m, k)
    assert off[0, 0] == 0 and off[8, 0] == 0 and not high[0, 0] and high[8, 0]
    assert off[0, 4] == 1 and off[0, 1] == 2 and off[1, 0] == 8 and off[16, 0] == 64 and off[0, 8] == 256
    mask = torch.zeros(m, k, dtype=torch.bool)
    mask[:, 0::4] = True
    mask[:, 3::4] = True  # i0 = 0, i1 = 3 -> nibble 0b1100
    mask[8, :4] = torch.tensor([False, True, True, False])  # row 8, group 0: i0 = 1, i1 = 2 -> 0b1001
    p = pack24(torch.ones(m, k), mask)
    assert p.meta[0].item() == 0x9C and p.meta[1].item() == 0xCC


@pytest.mark.parametrize("m,k", [(64, 64), (128, 192), (256, 128)])
def test_pack_unpack_roundtrip(m, k):
    y2s, mask = ref.relu2_sparsify24(adversarial(m, k, torch.bfloat16))
    p = pack24(y2s, mask)
    assert p.buffer.shape == (m, k * 9 // 16) and p.buffer.dtype == torch.bfloat16
    assert torch.equal(unpack24(p), y2s)
    assert torch.equal(bits_to_mask(p.mask_bits, k), mask)
    b = torch.randn(k, 24)
    assert torch.allclose(ref.sparse_mm(p, b), y2s.float() @ b, rtol=1e-4, atol=1e-4)



def test_row_block_is_the_packing_of_those_rows_alone():
    """row_block(p, r0, r1): byte for byte what packing rows r0:r1 alone gives (values and metadata), and the
    rows of the dense matrix; rows that are not whole 64-row bands are refused."""
    y2s, mask = ref.relu2_sparsify24(adversarial(256, 192, torch.bfloat16))
    p = pack24(y2s, mask)
    for r0, r1 in [(0, 64), (64, 192), (192, 256), (0, 256)]:
        block = row_block(p, r0, r1)
        alone = pack24(y2s[r0:r1], mask[r0:r1])
        assert torch.equal(block.buffer.view(torch.int16), alone.buffer.view(torch.int16))
        assert torch.equal(block.mask_bits, alone.mask_bits) and torch.equal(unpack24(block), y2s[r0:r1])
    with pytest.raises(ValueError, match="rows 32:96 must be multiples of 64 within 0:256"):
        row_block(p, 32, 96)

def test_shape_checks():
    with pytest.raises(ValueError, match="rows % 64"):
        check_shape(100, 128)
    with pytest.raises(ValueError, match="columns % 64"):
        check_shape(128, 96)
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        pack24(torch.ones(64, 64), torch.ones(64, 64, dtype=torch.bool))


@needs_triton
@pytest.mark.parametrize("m,k,dtype,rows,tiles", [(64, 64, torch.bfloat16, 64, 2), (128, 192, torch.bfloat16, 64, 1),
                                                  (64, 128, torch.float32, 64, 2), (192, 64, torch.bfloat16, 64, 2),
                                                  (256, 128, torch.bfloat16, 128, 2),
                                                  (128, 256, torch.float32, 128, 4)])
def test_triton_sparsifier_bit_exact(m, k, dtype, rows, tiles):
    """On CPU this runs the kernel in Triton's interpreter: the logic, not the speed. rows: tokens per program."""
    from elas.kernels.cuda.sparsify import relu2_sparsify24_packed
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y1 = adversarial(m, k, dtype).to(dev)
    counts = torch.full((k,), 3, dtype=torch.int32, device=dev)  # added to, not overwritten
    got = relu2_sparsify24_packed(y1, counts, rows=rows, tiles=tiles)
    want = ref.relu2_sparsify24_packed(y1)
    assert torch.equal(got.buffer.view(torch.uint8), want.buffer.view(torch.uint8))
    assert torch.equal(got.mask_bits, want.mask_bits)
    assert torch.equal(counts, 3 + (torch.relu(y1) != 0).sum(0).int())
    # the split's ranking from these counts equals the one from the dense tensor
    assert torch.equal(ref.dense_features_from_counts(counts - 3, 0.25), ref.dense_feature_split(torch.relu(y1), 0.25))
    # without the mask bits (ste mode): the same buffer, no bits
    nob = relu2_sparsify24_packed(y1, rows=rows, tiles=tiles, write_bits=False)
    assert torch.equal(nob.buffer.view(torch.uint8), want.buffer.view(torch.uint8)) and nob.mask_bits.numel() == 0


def _colliding_squares() -> tuple[float, float]:
    """Two bf16 values a < b whose squares are distinct in fp32 (exact) but one value in bf16: they exist only
    where the squares are fp32 subnormals (|y1| in [2.6e-23, 1.0e-19])."""
    b16 = torch.arange(0x1A00, 0x1FFF, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # ~1e-23 .. 1e-19
    exact, rounded = b16.float() ** 2, (b16 * b16).float()
    i = int(((rounded[1:] == rounded[:-1]) & (exact[1:] > exact[:-1])).nonzero()[0])
    return b16[i].item(), b16[i + 1].item()


def tiny_squares(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """bf16 [m, k]: groups whose squares collide when rounded (see _colliding_squares), in every order, next to
    a large value and a zero, and random values of the same range."""
    a, b = _colliding_squares()
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(m, k, generator=g) * 3e-21
    groups = torch.tensor([[a, b, 1.0, 0.0], [b, a, 0.0, 1.0], [1.0, a, b, 0.0], [0.0, b, 1.0, a]])
    y[::2] = groups[torch.arange(k // 4 * ((m + 1) // 2)) % 4].reshape((m + 1) // 2, k)
    return y.to(torch.bfloat16)


def test_the_choice_compares_exact_squares():
    """The 2:4 rule on relu(y1)^2 compares the squares in fp32 (exact for bf16 y1): where two squares round to one
    bf16 value the larger is kept, not the earlier column; the kept values are the bf16 squares."""
    a, b = _colliding_squares()
    y1 = torch.tensor([[a, b, 1.0, 0.0], [b, a, 0.0, 1.0]], dtype=torch.bfloat16)
    assert (y1[0, 0] * y1[0, 0]) == (y1[0, 1] * y1[0, 1])  # equal in bf16
    y2s, mask = ref.relu2_sparsify24(y1)
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert torch.equal(y2s, y1 * y1 * mask)


@needs_triton
@pytest.mark.parametrize("rows", [64, 128])
def test_triton_kernels_choose_on_exact_squares(rows):
    """Every Triton kernel that chooses on relu(y1)^2 (packed, dense form, ste backward, with and without the
    split) equals the reference on groups whose squares collide in bf16. Triton's CPU interpreter flushes bf16
    subnormals to zero when it converts (these squares are subnormal), so on the CPU only the choice is compared
    (the packed metadata and mask bits); on the GPU every byte."""
    from elas.kernels.cuda.sparsify import relu2_sparse24_backward, relu2_sparsify24_dense, relu2_sparsify24_packed
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m, k = 128, 128
    y1 = tiny_squares(m, k).to(dev)
    want = ref.relu2_sparsify24_packed(y1)
    got = relu2_sparsify24_packed(y1, rows=rows)
    assert torch.equal(got.mask_bits, want.mask_bits)
    meta = slice(m * k // 2, None)  # the buffer's metadata, after the kept values
    assert torch.equal(got.buffer.view(-1)[meta].view(torch.uint8), want.buffer.view(-1)[meta].view(torch.uint8))
    if dev == "cpu":
        return
    assert torch.equal(got.buffer.view(torch.uint8), want.buffer.view(torch.uint8))
    assert torch.equal(relu2_sparsify24_dense(y1), ref.relu2_sparsify24(y1)[0])
    dy2 = torch.randn(m, k, dtype=torch.bfloat16).to(dev)
    slots = torch.full((k,), -1, dtype=torch.int32)
    slots[torch.tensor([3, 9, 10])] = torch.arange(3, dtype=torch.int32)
    for args in ((dy2, None, y1, None, 0), (dy2, None, y1, slots.to(dev), 3)):
        g, w = relu2_sparse24_backward(*args, rows=rows), ref.relu2_sparse24_backward(*args)
        for name, x, y in zip(w._fields, g, w):
            if isinstance(y, torch.Tensor):
                assert torch.equal(x, y), name
            elif y is not None:  # Packed24
                assert torch.equal(x.buffer.view(torch.uint8), y.buffer.view(torch.uint8)), name


@needs_triton
@pytest.mark.parametrize("m,k,dtype,rows,bk", [(64, 64, torch.bfloat16, 64, 64), (100, 128, torch.bfloat16, 64, 64),
                                               (37, 192, torch.float32, 32, 64), (130, 256, torch.bfloat16, 64, 128),
                                               (70, 544 // 4, torch.bfloat16, 64, 64)])
def test_triton_dense_sparsifier_bit_exact(m, k, dtype, rows, bk):
    """The unpacked form (V:N:M's grouped path): relu(y1)^2 with the 2:4 selection applied, equal bit for bit to
    the reference's y2s, for row counts that are not a multiple of the program's rows and widths that are not a
    multiple of its columns (masked tails: 136 = a 60M cluster's 544 / 4); the operator traces as one graph; bad
    input is refused by name."""
    from elas.kernels import ops
    from elas.kernels.cuda.sparsify import relu2_sparsify24_dense
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y1 = adversarial(m, k, dtype, seed=m).to(dev)
    want = ref.relu2_sparsify24(y1)[0]
    got = relu2_sparsify24_dense(y1, rows=rows, bk=bk)
    assert got.dtype == dtype and torch.equal(got, want)
    assert ((got != 0).view(m, k // 4, 4).sum(-1) <= 2).all()
    traced = torch.compile(ops.relu2_sparsify24_dense, fullgraph=True, backend="aot_eager")
    assert torch.equal(traced(y1), want)
    with pytest.raises(ValueError, match=f"K={k - 2} must be a multiple of 4"):
        relu2_sparsify24_dense(y1[:, : k - 2])
    with pytest.raises(ValueError, match="rows must be contiguous"):
        relu2_sparsify24_dense(y1.t())
    with pytest.raises(ValueError, match="powers of two"):
        relu2_sparsify24_dense(y1, bk=48)


# ---- GPU -------------------------------------------------------------------------------------------------------
def _random_shapes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(64 * int(torch.randint(1, 33, (1,), generator=g)), 64 * int(torch.randint(1, 70, (1,), generator=g)))
            for _ in range(n)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", _random_shapes(12) + [(16384, 2176), (16384, 8192)])
def test_gpu_sparsifier_matches_reference(m, k):
    from elas.kernels.cuda.sparsify import relu2_sparsify24_packed
    y1 = adversarial(m, k, torch.bfloat16, seed=m + k).cuda()
    counts = torch.zeros(k, dtype=torch.int32, device="cuda")
    got, want = relu2_sparsify24_packed(y1, counts), ref.relu2_sparsify24_packed(y1)
    assert torch.equal(got.buffer.view(torch.uint8), want.buffer.view(torch.uint8))
    assert torch.equal(got.mask_bits, want.mask_bits)
    assert torch.equal(counts, (y1 > 0).sum(0).int())
    nob = relu2_sparsify24_packed(y1, write_bits=False)
    assert torch.equal(nob.buffer.view(torch.uint8), want.buffer.view(torch.uint8)) and nob.mask_bits.numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(m + 13 * (i % 3), k) for i, (m, k) in enumerate(_random_shapes(8, seed=1))]
                         + [(8256, 2048), (16448, 4096), (8256, 1056), (8256, 132)])
def test_gpu_dense_sparsifier_matches_reference(m, k):
    from elas.kernels.cuda.sparsify import relu2_sparsify24_dense
    for dtype in (torch.bfloat16, torch.float32):
        y1 = adversarial(m, k, dtype, seed=m + k).cuda()
        assert torch.equal(relu2_sparsify24_dense(y1), ref.relu2_sparsify24(y1)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(64, 64), (128, 128), (192, 320), (1024, 2176), (2048, 4224)])
def test_gpu_layout_equals_cslt_compress(m, k):
    """With every group holding >= 2 non-zeros (no ambiguous empty slot), our buffer is byte-identical to
    torch._cslt_compress: the layout is cuSPARSELt's, not a guess."""
    y1 = torch.rand(m, k, device="cuda", dtype=torch.bfloat16) + 0.1  # all positive, no zeros
    y2s, mask = ref.relu2_sparsify24(y1)
    ours = ref.relu2_sparsify24_packed(y1).buffer.view(-1)
    theirs = torch._cslt_compress(y2s).view(-1)
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,bt", [(64, 64, 64, False), (256, 2176, 512, True), (1024, 3072, 256, False),
                                      (512, 4224, 1024, True), (2048, 8192, 512, False)])
def test_gpu_sparse_mm_matches_reference(m, k, n, bt):
    from elas.kernels.cuda.gemm import sparse_mm
    from elas.kernels.cuda.sparsify import relu2_sparsify24_packed
    y1 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = relu2_sparsify24_packed(y1)
    bb = torch.randn((n, k) if bt else (k, n), device="cuda", dtype=torch.bfloat16)
    b = bb.t() if bt else bb
    want = ref.sparse_mm(a, b.float())
    for impl in ("ext", "torch"):
        got = sparse_mm(a, b, impl=impl, alg=None if impl == "ext" else 0)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2, impl
        # out_t: the transpose [n, m], contiguous, written column-major by the GEMM (ext) or copied (torch)
        got_t = sparse_mm(a, b, impl=impl, alg=None if impl == "ext" else 0, out_t=True)
        assert got_t.shape == (n, m) and got_t.is_contiguous()
        assert ((got_t.float().t() - want).norm() / want.norm()).item() < 1e-2, impl


@pytest.mark.gpu
def test_gpu_sparse_mm_graph_capture_and_compile():
    from elas.kernels.cuda.gemm import sparse_mm
    from elas.kernels.cuda.sparsify import relu2_sparsify24_packed
    m, k, n = 512, 2176, 512
    y1 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    eager = sparse_mm(relu2_sparsify24_packed(y1), b)  # also tunes the algorithm outside capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sparse_mm(relu2_sparsify24_packed(y1), b)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = sparse_mm(relu2_sparsify24_packed(y1), b)
    y1.copy_(torch.randn_like(y1))
    g.replay()
    torch.cuda.synchronize()
    want = ref.sparse_mm(ref.relu2_sparsify24_packed(y1), b.float())
    assert ((out.float() - want).norm() / want.norm()).item() < 1e-2
    assert not torch.equal(out, eager)

    def f(buf, bb):
        return torch.ops.elas_cslt.mm(buf, bb, m, k, 0) * 2

    a = relu2_sparsify24_packed(y1)
    cf = torch.compile(f, fullgraph=True)
    assert torch.allclose(cf(a.buffer.view(-1), b), f(a.buffer.view(-1), b))


def test_meta_builds_choose_kernels_for_where_they_will_live(monkeypatch):
    """A meta-device build takes the reference kernels (a parameter count loads nothing), unless it is built to be
    materialised on a GPU (the trainer's FSDP2 path): then "auto" takes the accelerated backend as a GPU build."""
    from elas import kernels
    monkeypatch.setattr(kernels, "_STATUS", (True, ""))  # as on a Hopper machine whose kernels load
    meta, cuda = torch.device("meta"), torch.device("cuda")
    assert kernels.backend_for(meta) == "reference" and kernels.backend_for(cuda) == "cuda"
    with kernels.materialised_on("cuda:0"):
        assert kernels.backend_for(meta) == "cuda"
        with kernels.materialised_on("cpu"):
            assert kernels.backend_for(meta) == "reference"
        assert kernels.backend_for(meta, "reference") == "reference"
    assert kernels.backend_for(meta) == "reference"
    monkeypatch.setattr(kernels, "_STATUS", (False, "no CUDA device"))
    with kernels.materialised_on("cuda"):
        assert kernels.backend_for(meta) == "reference"


@pytest.mark.gpu
def test_gpu_backend_selected():
    from elas import kernels
    ok, why = kernels.cuda_available()
    assert ok, why
    assert kernels.resolve_backend("auto") == "cuda" and kernels.resolve_backend("cuda") == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
def test_gpu_operators_equal_their_cpu_implementations(split):
    """Each torch.library operator: the CUDA implementation (Triton / cuSPARSELt) against the CPU one (the
    reference twin), through the dispatcher."""
    from elas.kernels import ops
    m, k, n = 256, 512, 128
    y1 = adversarial(m, k, torch.bfloat16, seed=3)
    got = ops.relu2_sparsify24_packed_op(y1.cuda(), split)
    want = ops.relu2_sparsify24_packed_op(y1, split)
    for g, w in zip(got, want):  # packed buffers: byte for byte
        assert torch.equal(g.cpu().view(torch.uint8), w.view(torch.uint8))
    dy2 = torch.randn(m, k, dtype=torch.bfloat16)
    slots = None
    if split:
        slots = torch.full((k,), -1, dtype=torch.int32)
        slots[torch.tensor([1, 7, 300])] = torch.arange(3, dtype=torch.int32)
    for mask_mode in (True, False):
        args = (dy2, want[0], want[1], None, slots, 3 if split else 0) if mask_mode else \
            (dy2, None, None, y1, slots, 3 if split else 0)
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        for g, w in zip(ops.relu2_sparse24_backward_op(*cuda_args), ops.relu2_sparse24_backward_op(*args)):
            # equal values (without the split the kernel may leave -0 where the reference has +0: the same
            # number; the along-token packings, which compare bytes, are produced only with the split)
            g = g.cpu()
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)) or torch.equal(g, w)
    b = torch.randn(k, n, dtype=torch.bfloat16)
    c_gpu = ops.sparse_mm_op(want[0].cuda(), b.cuda(), m, k).float().cpu()
    c_cpu = ops.sparse_mm_op(want[0], b.float(), m, k)
    assert ((c_gpu - c_cpu).norm() / c_cpu.norm()).item() < 1e-2


@needs_triton
@pytest.mark.parametrize("m,k,ste,from_y1,split,rows", [
    (64, 64, False, False, False, 64), (128, 256, False, False, False, 64), (64, 192, True, False, False, 64),
    (128, 128, True, True, False, 64), (128, 192, False, False, True, 64), (64, 128, True, True, True, 64),
    (256, 128, False, False, False, 128), (128, 192, False, False, True, 128), (256, 128, True, True, True, 128)])
def test_triton_backward_kernel_bit_exact(m, k, ste, from_y1, split, rows):
    """Every configuration of the backward pointwise kernel against the reference, byte for byte (rows: tokens
    per program)."""
    from elas.kernels.cuda.sparsify import relu2_sparse24_backward
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y1 = adversarial(m, k, torch.bfloat16, seed=k).to(dev)
    dy2 = torch.randn(m, k, dtype=torch.bfloat16).to(dev)
    dy2[:, 5] = 0  # zero gradients tie along tokens: the earlier token must win in the along-token packing
    a = ref.relu2_sparsify24_packed(y1)
    slots, n_dense = None, 0
    if split:  # dense features 3, 9, 10 (slots 0..2), the rest sparse
        n_dense = 3
        slots = torch.full((k,), -1, dtype=torch.int32)
        slots[torch.tensor([3, 9, 10])] = torch.arange(3, dtype=torch.int32)
        slots = slots.to(dev)
    args = (dy2, None if from_y1 else a, y1 if ste else None, slots, n_dense)
    got, want = relu2_sparse24_backward(*args, rows=rows), ref.relu2_sparse24_backward(*args)
    for name, g, w in zip(want._fields, got, want):
        assert (g is None) == (w is None), name
        if isinstance(w, torch.Tensor):
            assert torch.equal(g, w), name
        elif name == "dy1_packed" and w is not None:  # values as numbers (the kernel may keep -0 where the
            n = m * k // 2  # reference has +0, as in dy1_values); the forward's metadata behind them byte for byte
            assert torch.equal(g.buffer.view(-1)[:n], w.buffer.view(-1)[:n])
            assert torch.equal(g.buffer.view(-1)[n:].view(torch.uint8), w.buffer.view(-1)[n:].view(torch.uint8))
            assert torch.equal(g.buffer.view(-1)[n:].view(torch.uint8), a.buffer.view(-1)[n:].view(torch.uint8))
        elif w is not None:  # Packed24 along tokens
            assert torch.equal(g.buffer.view(torch.uint8), w.buffer.view(torch.uint8)), name
    if split:  # the along-token operand is what the masked path's split prunes (every feature sparse here)
        y2s = unpack24(a)
        assert torch.equal(unpack24(got.y2s_t).T, ref.wgrad_split_operand(y2s, torch.zeros(k, dtype=torch.bool,
                                                                                               device=dev)))
        assert torch.equal(got.y2s_dense, y2s[:, [3, 9, 10]])


def test_backward_settings_take_arguments_then_the_environment_then_the_defaults(monkeypatch):
    """bwd_settings: an argument wins, then ELAS_BWD24_CONFIG's value (without the split only), then the module's
    defaults; the word form asked of the split is a one-line error. A bad variable fails at import, naming it."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from elas.kernels.cuda import sparsify as S
    monkeypatch.setattr(S, "_BWD_OVERRIDE", {})
    assert S.bwd_settings(False) == (S.BWD_ROWS, S.BWD_WARPS, S.BWD_WORDS)
    assert S.bwd_settings(True) == (S.BWD_ROWS, S.SPLIT_BWD_WARPS, False)
    monkeypatch.setattr(S, "_BWD_OVERRIDE", {"rows": 128, "num_warps": 4, "words": False})
    assert S.bwd_settings(False) == (128, 4, False)
    assert S.bwd_settings(False, rows=64, num_warps=8, words=True) == (64, 8, True)
    assert S.bwd_settings(True) == (S.BWD_ROWS, S.SPLIT_BWD_WARPS, False)  # not the split's
    monkeypatch.setattr(S, "_BWD_OVERRIDE", {"words": True})
    assert S.bwd_settings(False)[2] and not S.bwd_settings(False, words=False)[2]  # (words given: that form)
    assert not S.bwd_settings(True)[2] and not S.bwd_settings(True, words=False)[2]
    with pytest.raises(ValueError, match="word form has no 95/5 split"):
        S.bwd_settings(True, words=True)
    code = "import elas.kernels.cuda.sparsify as S; print(S.bwd_settings(False))"
    for value, expect in (('{"rows": 128, "num_warps": 4}', "(128, 4, True)"),
                          ('{"words": false}', "(64, 8, False)"),
                          ('{"words": true}', "(64, 8, True)"), ('{"words": 1}', "words=1: expected true or false"),
                          ('{"rows": 96}', "rows=96: expected 64 or 128"), ('{"row": 64}', "unknown key 'row'")):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ELAS_BWD24_CONFIG": value},
                           capture_output=True, text=True)
        assert expect in (r.stdout if r.returncode == 0 else r.stderr), (value, r.stdout, r.stderr[-300:])
        assert (r.returncode == 0) == expect.startswith("("), value


def test_backward_variable_naming_the_removed_persistent_form_fails_at_import():
    """The backward's persistent form was removed with its keys: an ELAS_BWD24_CONFIG that still names per_sm or
    prefetch (as the committed sweeps' `best` does) fails at import with one line naming the key and the valid
    keys, instead of the process timing another form than the variable names."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    for value, key in (('{"rows": 64, "num_warps": 8, "per_sm": 2, "prefetch": true}', "per_sm"),
                       ('{"rows": 64, "num_warps": 8, "per_sm": 0}', "per_sm"), ('{"prefetch": false}', "prefetch")):
        r = subprocess.run([sys.executable, "-c", "import elas.kernels.cuda.sparsify"],
                           env={**os.environ, "ELAS_BWD24_CONFIG": value}, capture_output=True, text=True)
        assert r.returncode != 0, value
        assert r.stderr.strip().splitlines()[-1] == (f"ValueError: ELAS_BWD24_CONFIG={value!r}: unknown key {key!r}; "
                                                     f"expected an object with keys among rows, num_warps, words"), \
            r.stderr[-500:]


@needs_triton
@pytest.mark.parametrize("m,k,groups", [(64, 128, 16), (128, 256, 32), (192, 320, 8)])
def test_triton_sparsifier_word_form_equals_the_tile_form(m, k, groups):
    """The forward sparsifier's word form (words=True: y1 as int64 words of four bf16, rows r and r + 8 of each
    16-row slab loaded as two tensors so that a thread makes whole metadata bytes): the packed buffer (values and
    SM90 metadata) and the mask bits byte for byte equal to the tile form's, with and without the bits, on two
    inputs in turn (ties, zeros, -0); a bad groups value is one line; fp32 y1 or feature counts take the tile
    form."""
    from elas.kernels.cuda.sparsify import relu2_sparsify24_packed
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ys = [adversarial(m, k, torch.bfloat16, seed=seed).to(dev) for seed in (21, 22)]
    for bits in (True, False):
        wants = [relu2_sparsify24_packed(y, write_bits=bits) for y in ys]
        for y, want in zip(ys, wants):
            got = relu2_sparsify24_packed(y, write_bits=bits, words=True, groups=groups)
            assert torch.equal(got.buffer.view(torch.int16), want.buffer.view(torch.int16)), bits
            assert torch.equal(got.mask_bits, want.mask_bits)
            del got
    assert torch.equal(relu2_sparsify24_packed(ys[0], words=True).buffer.view(torch.int16),
                       ref.relu2_sparsify24_packed(ys[0]).buffer.view(torch.int16))
    with pytest.raises(ValueError, match="groups=12: expected 8, 16 or 32"):
        relu2_sparsify24_packed(ys[0], words=True, groups=12)
    y = torch.cat([torch.zeros(2, dtype=torch.bfloat16, device=dev), ys[0].flatten()])[2:].view(m, k)
    assert torch.equal(relu2_sparsify24_packed(y, words=True).buffer.view(torch.int16),  # (off a word: tile form)
                       wants[0].buffer.view(torch.int16))
    counts = torch.zeros(k, dtype=torch.int32, device=dev)
    got = relu2_sparsify24_packed(ys[0], counts, words=True)  # (the counts need the tile form)
    assert torch.equal(got.buffer.view(torch.int16), wants[0].buffer.view(torch.int16)) and counts.sum() > 0


def test_sparsify_config_fails_at_import_naming_the_variable():
    """ELAS_SPARSIFY_CONFIG: a bad value or key fails at import with one line naming the variable; a good one sets
    the forward's form for the process."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    code = ("import elas.kernels.cuda.sparsify as S; print(S._FWD_OVERRIDE)")
    for value, expect in (('{"words": true, "groups": 32}', "{'words': True, 'groups': 32}"),
                          ('{"groups": 12}', "groups=12: expected 8, 16 or 32"),
                          ('{"words": 1}', "words=1: expected true or false"),
                          ('{"word": true}', "unknown key 'word'")):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ELAS_SPARSIFY_CONFIG": value},
                           capture_output=True, text=True)
        assert expect in (r.stdout if r.returncode == 0 else r.stderr), (value, r.stdout, r.stderr[-300:])
        assert (r.returncode == 0) == expect.startswith("{"), value
        if r.returncode:
            assert "ELAS_SPARSIFY_CONFIG" in r.stderr


@needs_triton
@pytest.mark.parametrize("k", [256, 192])
def test_triton_backward_word_forms_equal_the_grid_form(k):
    """The word form (words=True: a group's four bf16 as one int64, 128 features a program, or 64 where K is not
    a multiple of 128), mask mode, on inputs with ties, zeros and negative zeros in y1 and dy2: every output byte
    equal to the grid form's and the values to the reference's; run on two inputs in turn, so that a part left
    unwritten shows. In ste mode words changes nothing, nor where a tensor's storage does not start on a word. (No subnormals: the CPU interpreter converts them between bf16
    and fp32 inexactly, which the tile form meets and the word form, working on bits, does not.)"""
    from elas.kernels.cuda.sparsify import relu2_sparse24_backward
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = 128

    def inputs(seed):
        y1 = adversarial(m, k, torch.bfloat16, seed=seed).to(dev)
        dy2 = torch.randn(m, k, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed + 1))
        dy2[:, 7] = 0
        dy2[:, 9] = -0.0  # a negative zero: its sign reaches dy1 where the feature was dropped, as in the grid form
        return dy2.to(dev), ref.relu2_sparsify24_packed(y1)

    def outputs(g):
        return [(t.buffer if hasattr(t, "buffer") else t).view(torch.int16) for t in g if t is not None]
    sets = [inputs(11), inputs(13)]
    wants = [outputs(relu2_sparse24_backward(*args, words=False)) for args in sets]
    for rows in (64, 128):
        for args, want in zip(sets, wants):
            got = outputs(relu2_sparse24_backward(*args, rows=rows, words=True))
            assert len(got) == len(want) == 4 and all(torch.equal(g, w) for g, w in zip(got, want)), rows
            del got
    w = ref.relu2_sparse24_backward(*sets[0])
    g = relu2_sparse24_backward(*sets[0], words=True)
    assert torch.equal(g.y2s, w.y2s) and torch.equal(g.dy1, w.dy1) and torch.equal(g.dy1_values, w.dy1_values)
    # ste (from y1, with or without the packed forward beside it) has no word form: words changes nothing
    y1 = adversarial(m, k, torch.bfloat16, seed=3).to(dev)
    for args in ((sets[0][0], None, y1), (sets[0][0], ref.relu2_sparsify24_packed(y1), y1)):
        want = outputs(relu2_sparse24_backward(*args, words=False))
        got = outputs(relu2_sparse24_backward(*args, words=True))
        assert len(got) == len(want) == 2 and all(torch.equal(g, w) for g, w in zip(got, want))
    dy2 = torch.cat([torch.zeros(2, dtype=torch.bfloat16, device=dev), sets[0][0].flatten()])[2:].view(m, k)
    assert dy2.storage_offset() == 2  # (not a word boundary: the tile form runs, and gives its bytes)
    assert torch.equal(relu2_sparse24_backward(dy2, sets[0][1], words=True).dy1,
                       relu2_sparse24_backward(sets[0][0], sets[0][1]).dy1)


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [0, 64])
@pytest.mark.parametrize("grad_mode", ["mask", "ste"])
@pytest.mark.parametrize("wgrad_dense_frac", [None, 0.05])
def test_gpu_packed_ffn_matches_reference_path(rank, grad_mode, wgrad_dense_frac):
    """The accelerated FFN (Triton + cuSPARSELt) against the masked-dense reference FFN, gradients included,
    with and without the 95/5 split of the weight gradients."""
    from elas.model import ReLU2FFN
    from elas.sparsity import Act24Config, set_step, sparsify_
    outs = []
    for path in ("masked", "auto"):
        torch.manual_seed(0)
        f = ReLU2FFN.of_width(256, 2048, rank=rank).cuda().to(torch.bfloat16)
        sparsify_(f, Act24Config(grad_mode=grad_mode, path=path, wgrad_dense_frac=wgrad_dense_frac,
                                 dense_warmup_steps=0))
        set_step(f, 0, 1)
        if path == "auto":
            assert f.core.description.startswith("accelerated")
        torch.manual_seed(1)
        x = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = f(x)
        y.backward(torch.randn_like(y))
        outs.append([y.float(), x.grad.float()] + [p.grad.float() for p in f.parameters()])
    for a, b in zip(outs[1], outs[0]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_sparse_mm_out_t_is_the_contiguous_transpose_and_traces():
    """elas::sparse_mm(out_t=True) -> (a @ b)^T [N, M], contiguous (the CUDA kernel writes C column-major); the
    CPU twin and the fake implementation agree on shape and layout, so a compiled graph sees no transpose."""
    from elas.kernels import ops
    torch.manual_seed(0)
    y1 = torch.randn(64, 128)
    a = ref.relu2_sparsify24_packed(y1)
    b = torch.randn(128, 48)
    c = ops.sparse_mm(a, b)
    ct = ops.sparse_mm(a, b, out_t=True)
    assert ct.shape == (48, 64) and ct.is_contiguous()
    assert torch.equal(ct, c.t())

    def f(buf, bb):
        return ops.sparse_mm_op(buf, bb, 64, 128, True) * 2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(cf(a.buffer, b), 2 * c.t())


@pytest.mark.parametrize("m,k,sha1", [(64, 128, "5f8221e6fabfce5eac21665fa538ffb3781c5a31"),
                                      (128, 256, "7dcd5e6520c33eee4070a3ed8f2a7d2a86fa5698"),
                                      (192, 512, "8c1a6c7765a15422bd0698a50a8741af79d05df0")])
def test_cutlass_metadata_layout_matches_the_librarys(m, k, sha1):
    """benchmarks/cutlass_sparse.py's closed form of CUTLASS's sm90 bf16 sparse metadata layout: every (row, group)
    offset equals what the CUTLASS build's own CuTe layout returned (hashes recorded from
    libelas_cutlass_sp.so's elas_cutlass_sp_meta_offset, all rows x groups, int64 in row-major order); and the
    packer puts each group's nibble at its offset."""
    import hashlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cutlass_sparse import cutlass_meta_offset, pack_cutlass
    rows = torch.arange(m).repeat_interleave(k // 4)
    cols = torch.arange(0, k, 4).repeat(m)
    off = cutlass_meta_offset(rows, cols, m)
    assert hashlib.sha1(off.numpy().astype("int64").tobytes()).hexdigest() == sha1
    x = torch.randn(m, k, dtype=torch.bfloat16)
    keep = ref.mask24(x)
    vals, e = pack_cutlass(x * keep, keep)
    assert torch.equal(vals, x[keep].reshape(m, k // 2))
    pos = torch.arange(4).expand(m, k // 4, 4)[keep.reshape(m, k // 4, 4)].reshape(-1, 2)
    nib = e[off // 8].to(torch.int64) >> (4 * (off % 8 // 4)) & 0xF
    assert torch.equal(nib, pos[:, 0] | pos[:, 1] << 2)


@pytest.mark.parametrize("which", ["act24_ffn_backward", "relu2_ffn_backward", "softmax_xent_grad"])
def test_fake_kernels_give_the_real_layout_for_a_transposed_input(which):
    """The real ops write dh1 (and the loss's gradient) contiguous whatever the input's layout; fakes that kept a
    transposed input's strides made Inductor fail on them (assert_size_stride)."""
    importlib.import_module("elas.kernels.ops")  # (registers the ops)
    E = torch.ops.elas
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=torch.bfloat16, generator=g)  # noqa: E731
    t, q, f = 64, 64, 128
    h1 = mk(q, t).t()  # [T, q], transposed
    if which == "act24_ffn_backward":
        wu, wd = mk(f, q), mk(f, q)
        _, s0, s1, idx_d, slots = E.act24_ffn(mk(t, q), wu, wd, False, None, False)
        op, args = E.act24_ffn_backward, (mk(t, q), h1, wu, wd, s0, s1, idx_d, slots, False)
    elif which == "relu2_ffn_backward":
        op, args = E.relu2_ffn_backward, (mk(t, q), h1, mk(f, q), mk(f, q), torch.relu(mk(t, f)) ** 2, "triton")
    else:
        op, args = E.softmax_xent_grad, (mk(50, t).t(), torch.randint(0, 50, (t,), generator=g), torch.ones(t))
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("which", ["ste", "mask", "split", "relu2"])
def test_weight_gradients_take_their_operands_layout(which):
    """wd arrives as W_down^T, a transposed view: the ops write dwd in that layout (so the gradient reaching W_down
    is contiguous and autograd keeps it), wu's contiguous; the fakes give the same strides (opcheck)."""
    importlib.import_module("elas.kernels.ops")  # (registers the ops)
    E = torch.ops.elas
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=torch.bfloat16, generator=g)  # noqa: E731
    t, q, f = 64, 64, 256
    wu, wd = mk(f, q), mk(2 * q, f).t()  # wd [d_ff, q'] with strides (1, d_ff), as ffn_operands gives it
    if which == "relu2":
        op, args = E.relu2_ffn_backward, (mk(t, 2 * q), mk(t, q), wu, wd, torch.relu(mk(t, f)) ** 2, "triton")
    else:
        mask, frac = which != "ste", (0.25 if which == "split" else None)
        _, s0, s1, idx_d, slots = E.act24_ffn(mk(t, q), wu, wd, mask, frac, False)
        op, args = E.act24_ffn_backward, (mk(t, 2 * q), mk(t, q), wu, wd, s0, s1, idx_d, slots, mask)
    _, dwu, dwd = op(*args)
    assert dwd.shape == wd.shape and dwd.stride() == wd.stride() and dwu.stride() == wu.stride()
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def _python(code: str, **env):
    """A fresh interpreter (import-time checks of the ELAS_*_CONFIG variables; a fault that would kill this one)."""
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1", **env})


def test_the_backward_refuses_a_packed_forward_without_its_mask_bits():
    """relu2_sparsify24_packed(write_bits=False) leaves mask_bits empty; the backward given that packed y2s read
    [M, K/8] bytes from it (a segfault under the interpreter, an illegal address on a GPU)."""
    pytest.importorskip("triton")
    r = _python("""
import torch
from elas.kernels.cuda.sparsify import relu2_sparsify24_packed, relu2_sparse24_backward
y1 = torch.randn(64, 64).bfloat16(); dy2 = torch.randn(64, 64).bfloat16()
a = relu2_sparsify24_packed(y1, write_bits=False)
for args in ((dy2, a, y1), (dy2, a)):
    try:
        relu2_sparse24_backward(*args)
        print("ACCEPTED")
    except ValueError as e:
        print("REFUSED", e)
""")
    assert r.returncode == 0, r.stderr[-300:]
    assert r.stdout.count("REFUSED") == 2 and "mask_bits" in r.stdout, r.stdout


@pytest.mark.parametrize("value", ['{"words": true, "groups": 16.0}', '{"words": true, "num_warps": 8.0}'])
def test_the_sparsify_config_refuses_non_integers_at_import(value):
    pytest.importorskip("triton")
    r = _python("import elas.kernels.cuda.sparsify", ELAS_SPARSIFY_CONFIG=value)
    assert r.returncode != 0 and "ELAS_SPARSIFY_CONFIG" in r.stderr, r.stderr[-300:]


def test_the_sparsify_configs_num_warps_reaches_the_tile_form():
    """The default (tile) form read the variable's num_warps nowhere: set, it was silently ignored."""
    pytest.importorskip("triton")
    r = _python("""
import torch
import elas.kernels.cuda.sparsify as S
seen = []
class L:
    def __init__(s, k): s.k = k
    def __getitem__(s, grid): return lambda *a, **kw: seen.append(kw['num_warps'])
S.relu2_sparsify24_packed(torch.randn(64, 64).bfloat16(), launch=L)
print(seen)
""", ELAS_SPARSIFY_CONFIG='{"num_warps": 2}')
    assert r.stdout.strip() == "[2]", r.stdout + r.stderr[-300:]


def test_tile_sizes_that_are_not_powers_of_two_are_one_line_errors():
    """They passed the divisibility checks and failed inside Triton (tl.arange takes powers of two)."""
    pytest.importorskip("triton")
    from elas.kernels.cuda.epilogue import up_relu2_sparsify24
    from elas.kernels.cuda.sparsify import relu2_sparsify24_packed
    from elas.kernels.cuda.sste import soft_threshold24_packed
    with pytest.raises(ValueError, match="tiles=3"):
        relu2_sparsify24_packed(torch.randn(64, 192).bfloat16(), tiles=3)
    with pytest.raises(ValueError, match="tiles=3"):
        soft_threshold24_packed(torch.randn(64, 192), torch.tensor(1.0), tiles=3)
    from elas.kernels.cuda.sste import soft_threshold24_dense
    with pytest.raises(ValueError, match="tiles=3"):
        soft_threshold24_dense(torch.randn(64, 192), torch.tensor(1.0), tiles=3)
    h1, wu = torch.ones(64, 64, dtype=torch.bfloat16), torch.ones(192, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="BN=96"):
        up_relu2_sparsify24(h1, wu, bm=64, bn=96)


def test_backward_settings_the_variables_form_wins_over_the_module_default_words(monkeypatch):
    """ELAS_BWD24_CONFIG names the grid form by "words": false (what `elas bench sparsify` prints for it): with
    BWD_WORDS the module's default, that variable must still give the grid form, not the word form (the variable
    comes before the module's defaults); one without "words" takes the module's default form."""
    pytest.importorskip("triton")
    from elas.kernels.cuda import sparsify as S
    monkeypatch.setattr(S, "BWD_WORDS", True)
    monkeypatch.setattr(S, "_BWD_OVERRIDE", {"rows": 64, "num_warps": 4, "words": False})
    assert S.bwd_settings(False) == (64, 4, False)  # the grid form it names
    monkeypatch.setattr(S, "_BWD_OVERRIDE", {"words": True})
    assert S.bwd_settings(False)[2]  # (it names the word form)
    monkeypatch.setattr(S, "_BWD_OVERRIDE", {"rows": 128})
    assert S.bwd_settings(False) == (128, S.BWD_WARPS, True)  # no form named: the module's default
    assert not S.bwd_settings(False, words=False)[2] and S.bwd_settings(False, words=True)[2]


@needs_triton
def test_triton_backward_word_form_takes_a_packed_forward_off_an_int32_word():
    """The mask-mode word form views the packed values as int32 (a group's two kept bf16): a Packed24 whose
    buffer starts on an odd bf16 element (a view into a larger allocation) raised RuntimeError from .view() where
    the grid form runs; it takes the grid form there, the same bytes."""
    from elas.kernels.cuda.sparsify import relu2_sparse24_backward
    from elas.kernels.packed import Packed24
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m, k = 64, 64
    a = ref.relu2_sparsify24_packed(adversarial(m, k, torch.bfloat16, seed=5).to(dev))
    dy2 = torch.randn(m, k, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(6)).to(dev)
    for off in (1, 2):
        big = torch.zeros(a.buffer.numel() + off, dtype=torch.bfloat16, device=dev)
        big[off:] = a.buffer.view(-1)
        a2 = Packed24(big[off:].view(m, k * 9 // 16), a.mask_bits, (m, k))
        want = relu2_sparse24_backward(dy2, a2, words=False)
        got = relu2_sparse24_backward(dy2, a2, words=True)
        for g, w in zip((got.y2s, got.dy1, got.dy1_packed.buffer), (want.y2s, want.dy1, want.dy1_packed.buffer)):
            assert torch.equal(g.view(torch.int16), w.view(torch.int16)), off


@needs_triton
def test_triton_sparsifier_word_forms_groups_from_the_variable_fit_every_width(monkeypatch):
    """ELAS_SPARSIFY_CONFIG's (or the module's) groups=32 is valid at import but does not divide K/4 where
    K % 128 != 0: every call at such a width raised, where the backward's word form takes 16 groups there. Not
    given as an argument, it gives way to 16 (the same bytes); given, it is still a one-line error."""
    from elas.kernels.cuda import sparsify as S
    monkeypatch.setattr(S, "_FWD_OVERRIDE", {"words": True, "groups": 32})
    y = adversarial(64, 192, torch.bfloat16, seed=7).to("cuda" if torch.cuda.is_available() else "cpu")
    want = S.relu2_sparsify24_packed(y, words=False)
    got = S.relu2_sparsify24_packed(y)
    assert torch.equal(got.buffer.view(torch.int16), want.buffer.view(torch.int16))
    assert torch.equal(got.mask_bits, want.mask_bits)
    with pytest.raises(ValueError, match="groups=32: expected 8, 16 or 32"):
        S.relu2_sparsify24_packed(y, groups=32)


@needs_triton
def test_triton_2_4_defaults_take_the_word_forms_where_they_won(monkeypatch):
    """The H100 sweep (benchmarks/results/h100/sparsify_bwd24.json) made the word forms the defaults where they won:
    mask mode's backward (1.14-1.26x the grid form) and the forward when it writes the mask bits (1.03-1.09x);
    the forward without the bits (ste) keeps the tile form. Each default launches the kernel it names, and
    ELAS_SPARSIFY_CONFIG's words (true or false) overrides it."""
    from elas.kernels.cuda import sparsify as S
    launched = []

    def launch(kernel):
        launched.append(kernel)
        return kernel
    monkeypatch.setattr(S, "_FWD_OVERRIDE", {})
    monkeypatch.setattr(S, "_BWD_OVERRIDE", {})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y1 = adversarial(64, 128, torch.bfloat16, seed=5).to(dev)
    a = S.relu2_sparsify24_packed(y1, launch=launch)
    S.relu2_sparsify24_packed(y1, write_bits=False, launch=launch)
    dy2 = torch.randn(64, 128, dtype=torch.bfloat16).to(dev)
    S.relu2_sparse24_backward(dy2, a, launch=launch)  # mask mode
    S.relu2_sparse24_backward(dy2, None, y1, launch=launch)  # ste mode
    assert launched == [S._words_kernel, S._kernel, S._bwd_words_kernel, S._bwd_kernel], launched
    for words, kernel in ((False, S._kernel), (True, S._words_kernel)):
        monkeypatch.setattr(S, "_FWD_OVERRIDE", {"words": words})
        launched.clear()
        S.relu2_sparsify24_packed(y1, write_bits=not words, launch=launch)
        assert launched == [kernel]
