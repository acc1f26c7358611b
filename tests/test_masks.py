"""The 2:4 mask, the fused ReLU^2 sparsifier and the 95/5 split: the numerical definition (reference)."""
import itertools

import pytest
import torch

from elas.kernels import reference as ref


def brute_mask24(row):
    """Independent definition: try all 6 pairs, keep the pair with the largest |values|, earlier index on ties."""
    out = []
    for g in range(0, len(row), 4):
        a = [-1.0 if v != v else abs(v) for v in row[g:g + 4]]  # (a NaN ranks below every number)
        # rank positions by (-|v|, index) and keep the first two
        keep = sorted(range(4), key=lambda i: (-a[i], i))[:2]
        out += [i in keep for i in range(4)]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mask_matches_bruteforce_with_ties_zeros_negatives(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (64, 32), generator=g).to(dtype)  # small ints: many ties and zeros
    special = torch.rand(x.shape, generator=g)
    x[special < 0.04] = float("nan")  # and some NaN and +-inf, which the kernels rank the same way
    x[(special >= 0.04) & (special < 0.07)] = float("inf")
    x[(special >= 0.07) & (special < 0.10)] = float("-inf")
    m = ref.mask24(x)
    assert m.dtype == torch.bool and m.shape == x.shape
    for r in range(x.shape[0]):
        assert m[r].tolist() == brute_mask24(x[r].tolist())


def test_mask_exactly_two_per_group_and_keeps_largest():
    x = torch.randn(33, 4 * 17, dtype=torch.float64)
    m = ref.mask24(x)
    groups = m.view(33, 17, 4)
    assert (groups.sum(-1) == 2).all()
    a = x.abs().view(33, 17, 4)
    kept_min = torch.where(groups, a, torch.inf).min(-1).values
    dropped_max = torch.where(~groups, a, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_tie_break_is_earlier_index():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 1.0, -2.0]])
    assert ref.mask24(x).int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]]


def test_mask_along_dim0_equals_transposed():
    x = torch.randn(16, 12)
    assert torch.equal(ref.mask24(x, dim=0), ref.mask24(x.T.contiguous()).T)


def test_bad_size_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 4"):
        ref.mask24(torch.randn(3, 10))


def test_relu2_sparsify24_values():
    y1 = torch.randn(40, 64)
    y1[::3, ::5] = 0.0
    y2s, m = ref.relu2_sparsify24(y1)
    y2 = torch.relu(y1) ** 2
    assert torch.equal(m, ref.mask24(y2))
    assert torch.equal(y2s, y2 * m)
    # at most 2 non-zeros per group, never a negative pre-activation kept as non-zero
    assert ((y2s != 0).view(40, 16, 4).sum(-1) <= 2).all()
    assert (y2s[y1 <= 0] == 0).all()


def test_dense_feature_split_picks_densest_columns():
    y = torch.zeros(8, 40)
    nnz = torch.arange(40) % 9  # column j has nnz[j] non-zeros
    for j in range(40):
        y[: nnz[j], j] = 1.0
    dense = ref.dense_feature_split(y, 0.05)  # ceil(0.05 * 40) = 2
    assert dense.sum() == 2
    # the columns with 8 non-zeros are 8, 17, 26, 35: the two lowest indices win
    assert dense.nonzero().flatten().tolist() == [8, 17]
    assert ref.dense_feature_split(y, 0.0).sum() == 0
    with pytest.raises(ValueError):
        ref.dense_feature_split(y, 1.5)


@pytest.mark.parametrize("n_feat,frac", [(2176, 0.05), (8192, 0.05), (640, 0.25), (64, 1.0), (128, 0.0)])
def test_dense_slots_rank_the_dense_features(n_feat, frac):
    """The prefix-sum ranking equals a stable sort of the dense flags (what the operator did before)."""
    nnz = torch.randint(0, 6, (n_feat,), generator=torch.Generator().manual_seed(n_feat))  # many ties
    n_dense = ref.n_dense_features(n_feat, frac)
    dense = ref.dense_features_from_counts(nnz, frac)
    idx_d, slots = ref.dense_slots(dense, n_dense)
    want = torch.sort(dense.to(torch.uint8), descending=True, stable=True).indices[:n_dense]
    assert idx_d.dtype == torch.int64 and torch.equal(idx_d, want)
    assert slots.dtype == torch.int32 and torch.equal(slots[want], torch.arange(n_dense, dtype=torch.int32))
    assert (slots[~dense] == -1).all() and int(dense.sum()) == n_dense


def test_wgrad_split_operand():
    y = torch.randn(16, 10)
    dense = torch.zeros(10, dtype=torch.bool)
    dense[[2, 7]] = True
    op = ref.wgrad_split_operand(y, dense)
    assert torch.equal(op[:, dense], y[:, dense])
    pruned = op[:, ~dense]
    assert torch.equal(pruned, y[:, ~dense] * ref.mask24(y[:, ~dense], dim=0))
    assert ((pruned != 0).view(4, 4, 8).sum(1) <= 2).all()  # 2:4 along tokens


@pytest.mark.parametrize("shape", list(itertools.product([1, 5], [4, 28])))
def test_odd_shapes(shape):
    x = torch.randn(*shape)
    assert (ref.mask24(x).view(shape[0], -1, 4).sum(-1) == 2).all()


def test_transposable_mask_is_the_best_pattern_of_every_block():
    """Every 4 x 4 block keeps 2 per row and 2 per column, and no such pattern (all 2^16 masks enumerated
    independently) keeps more |x|; ties (integer values) included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (16, 24), generator=g).float()
    mask = ref.transposable24_mask(x)
    blocks = mask.reshape(4, 4, 6, 4).permute(0, 2, 1, 3)  # [4, 6, 4, 4]
    assert (blocks.sum(-1) == 2).all() and (blocks.sum(-2) == 2).all()
    valid = [torch.tensor(bits, dtype=torch.float32).reshape(4, 4) for bits in itertools.product((0, 1), repeat=16)
             if all(sum(bits[4 * r:4 * r + 4]) == 2 for r in range(4)) and all(sum(bits[c::4]) == 2 for c in range(4))]
    assert len(valid) == 90
    a = x.abs().reshape(4, 4, 6, 4).permute(0, 2, 1, 3)
    best = torch.stack([(a * v).sum((-1, -2)) for v in valid]).amax(0)  # [4, 6]
    assert torch.equal((a * blocks).sum((-1, -2)), best)
    with pytest.raises(ValueError, match=r"multiples of 4, got \(6, 8\)"):
        ref.transposable24_mask(torch.ones(6, 8))
