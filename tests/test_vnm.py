"""V:N:M activations (emulated): the selection against an independent brute force, the format's invariants, the
gradients, the schedule, the claims and one graph per mode."""
import itertools

import pytest
import torch

from elas.build import build_model
from elas.kernels import reference as ref
from elas.model import ReLU2FFN
from elas.sparsity import Act24Config, VNMConfig, collect_stats, set_step, sparsify_

from conftest import preset


def _brute(y: torch.Tensor, v: int, m: int) -> torch.Tensor:
    """Loops: for each block, the first (lexicographic) 4-column choice with the largest sum over rows of each
    row's 2 largest |y| among the 4; then per row the 2 largest (earlier on ties) of the chosen 4."""
    t, k = y.shape
    a = y.abs()
    mask = torch.zeros(t, k, dtype=torch.bool)
    for r0 in range(0, t, v):
        rows = range(r0, min(r0 + v, t))
        for c0 in range(0, k, m):
            best, best_cols = None, None
            for cols in itertools.combinations(range(c0, c0 + m), 4):
                score = sum(sum(sorted((a[r, c].item() for c in cols), reverse=True)[:2]) for r in rows)
                if best is None or score > best:
                    best, best_cols = score, cols
            for r in rows:
                order = sorted(best_cols, key=lambda c: (-a[r, c].item(), c))
                for c in order[:2]:
                    mask[r, c] = True
    return mask


@pytest.mark.parametrize("t,k,v,m", [(8, 16, 4, 8), (12, 24, 4, 6), (10, 16, 4, 16), (7, 8, 8, 4)])
def test_selection_equals_brute_force(t, k, v, m):
    g = torch.Generator().manual_seed(t * k + m)
    y = torch.randn(t, k, generator=g)
    y[::3, ::5] = 0.0  # zeros
    y[1] = torch.randint(-2, 3, (k,), generator=g).float()  # ties
    assert torch.equal(ref.vnm_mask(y, v, m), _brute(y, v, m))


def test_format_invariants():
    """Every token keeps 2 of every m features; the v tokens of a block use at most 4 features of it."""
    y = torch.relu(torch.randn(256, 64)) ** 2
    v, m = 64, 8
    mask = ref.vnm_mask(y, v, m)
    assert torch.all(mask.reshape(256, 64 // m, m).sum(-1) == 2)
    used = mask.reshape(256 // v, v, 64 // m, m).any(1).sum(-1)  # [blocks of rows, blocks of columns]
    assert used.max() <= 4 and mask.float().mean().item() == pytest.approx(2 / m)
    # the kept magnitude can only be less than 2:4's (a subset of the choices 2:4 makes per row)
    assert (y * mask).sum() <= (y * ref.mask24(y)).sum()


@pytest.mark.parametrize("grad_mode", ["ste", "mask"])
def test_gradients(grad_mode):
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(16, 32).double()
    sparsify_(f, VNMConfig(v=4, m=8, grad_mode=grad_mode, dense_warmup_steps=0))
    set_step(f, 0, 10)
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    y1 = f.up(x).detach().requires_grad_()
    r = torch.relu(y1)
    mask = ref.vnm_mask((r * r).reshape(-1, 32), 4, 8).reshape(r.shape)
    want = f.down(r * r * mask)
    got = f(x)
    torch.testing.assert_close(got, want)
    gy = torch.randn_like(got)
    got.backward(gy)
    dy2 = gy @ f.down.weight  # [2, 6, 32]
    dy1 = 2 * r.detach() * (dy2 * mask if grad_mode == "mask" else dy2)
    torch.testing.assert_close(x.grad, dy1 @ f.up.weight)


def test_schedule_claims_stats_and_one_graph_per_mode():
    cfg = preset("llama-tiny-relu2-vnm", n_layers=2, vocab_size=256)
    cfg.methods[0].update(v=16, dense_warmup_steps=5)
    torch.manual_seed(0)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="both make operand 'y2'"):
        sparsify_(model, Act24Config())
    idx = torch.randint(0, 256, (2, 32))
    import torch._dynamo as dynamo
    for step, mode in ((0, "dense"), (5, "sparse")):
        assert set_step(model, step, 10) == (mode,)
        dynamo.reset()
        ex = dynamo.explain(model)(idx, idx)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(idx, idx), model(idx, idx))
        stats = collect_stats(model, lambda: model(idx, idx))
        assert 0 < stats["dropped_nnz_frac/mean"] < 1 and 0 < stats["y2_zero_frac/mean"] < 1
    with pytest.raises(ValueError, match="not a multiple of m=12"):
        sparsify_(ReLU2FFN.of_width(16, 32), VNMConfig(m=12))
    with pytest.raises(ValueError, match="vnm.m 20"):
        VNMConfig(m=20)
