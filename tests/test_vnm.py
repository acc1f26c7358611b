"""V:N:M activations (emulated): the selection against an independent brute force, the format's invariants, the
gradients, the schedule, the claims and one graph per mode; the neuron router (sparsity/router.py): balanced
clustering, routing, the token permutation, the routed format, re-clustering periods and exact resume."""
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


@pytest.mark.parametrize("mask_grad", [True, False])
def test_a_nan_the_selection_drops_is_zero_in_the_output_and_the_gradient(mask_grad):
    """A NaN y1 is never kept (mask24 ranks it below everything): its y2s and its dy1 are exactly 0, as the 2:4
    twins write them, in the masked path (vnm.py) and in the grouped path's selection (vnm_grouped.py); every other
    entry as before (relu(NaN) * .. was NaN: the masked path's output and gradient, the grouped path's gradient)."""
    from elas.sparsity.vnm import _ReLU2Masked
    from elas.sparsity.vnm_grouped import _ReLU2Select24
    g = torch.Generator().manual_seed(0)
    y1 = torch.randn(8, 16, generator=g)
    nan = torch.zeros_like(y1, dtype=torch.bool)
    nan[0, 1] = nan[3, 8] = nan[6, 15] = True
    y1[nan] = float("nan")
    r = torch.relu(y1)
    mask = ref.vnm_mask(r * r, 4, 8)
    assert not mask[nan].any()
    dy2 = torch.randn(8, 16, generator=g)
    for path in (lambda x: _ReLU2Masked.apply(x, mask, None, mask_grad),
                 lambda x: _ReLU2Select24.apply(x, mask_grad)):  # the masked path, the grouped path's selection
        x = y1.clone().requires_grad_()
        y2s = path(x)
        y2s.backward(dy2)
        assert torch.all(y2s[nan] == 0) and torch.all(x.grad[nan] == 0)
        assert torch.isfinite(y2s).all() and torch.isfinite(x.grad).all()
    x = y1.clone().requires_grad_()
    y2s = _ReLU2Masked.apply(x, mask, None, mask_grad)
    y2s.backward(dy2)
    ok = ~nan
    torch.testing.assert_close(y2s[ok], (r * r * mask)[ok])
    torch.testing.assert_close(x.grad[ok], (2 * r * (dy2 * mask if mask_grad else dy2))[ok])


def _one_graph_equal_to_eager(model, idx) -> None:
    """The model in its current mode traces as one graph with no break, and the compiled forward equals eager."""
    import torch._dynamo as dynamo
    dynamo.reset()
    ex = dynamo.explain(model)(idx, idx)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx, idx), model(idx, idx))


def test_schedule_claims_stats_and_one_graph_per_mode():
    cfg = preset("llama-tiny-relu2-vnm-blocks", n_layers=2, vocab_size=256)
    cfg.methods[0].update(v=16, dense_warmup_steps=5)
    torch.manual_seed(0)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="both make operand 'y2'"):
        sparsify_(model, Act24Config())
    idx = torch.randint(0, 256, (2, 32))
    losses = {}
    for step, mode in ((0, "dense"), (5, "sparse"), (10, "dense-final")):  # sparse_until 0.5 of 20 steps
        assert set_step(model, step, 20) == (mode,)
        _one_graph_equal_to_eager(model, idx)
        stats = collect_stats(model, lambda: model(idx, idx))
        assert 0 < stats["dropped_nnz_frac/mean"] < 1 and 0 < stats["y2_zero_frac/mean"] < 1
        losses[mode] = model(idx, idx).item()
    assert losses["dense-final"] == losses["dense"] != losses["sparse"]  # the final phase is the dense model
    assert VNMConfig(sparse_until=1.0).mode_at(10 ** 6, 10 ** 6 + 1) == "sparse"  # 1.0: sparse to the end
    assert VNMConfig(sparse_until=300).scaled(0.1).sparse_until == 30  # a step scales with the run
    with pytest.raises(ValueError, match="vnm.sparse_until 1.5"):
        VNMConfig(sparse_until=1.5)
    with pytest.raises(ValueError, match="not a multiple of m=12"):
        sparsify_(ReLU2FFN.of_width(16, 32), VNMConfig(m=12))
    with pytest.raises(ValueError, match="vnm.m 20"):
        VNMConfig(m=20)


# ---- the neuron router -------------------------------------------------------------------------------------------
from elas.sparsity import router as rt  # noqa: E402


def test_balanced_assign_fills_every_cluster_and_follows_clear_preferences():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(12, 3, generator=g)
    a = rt.balanced_assign(score, 4)
    assert torch.equal(torch.bincount(a, minlength=3), torch.tensor([4, 4, 4]))
    pref = torch.full((6, 2), -1.0)
    pref[:3, 0], pref[3:, 1] = 1.0, 1.0  # rows 0-2 want cluster 0, rows 3-5 cluster 1: nothing to trade
    assert rt.balanced_assign(pref, 3).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="do not fill"):
        rt.balanced_assign(score, 5)


@pytest.mark.parametrize("metric", rt.METRICS)
def test_clustering_recovers_planted_clusters(metric):
    """Rows drawn around 3 well-separated directions, shuffled: the balanced k-means finds the 3 groups (up to
    their labels) in every metric, and routing a planted direction lands on its cluster."""
    g = torch.Generator().manual_seed(1)
    centers = torch.eye(3, 16) * 5
    truth = torch.arange(3).repeat_interleave(8)[torch.randperm(24, generator=g)]
    rows = centers[truth] + 0.3 * torch.randn(24, 16, generator=g)
    assign, mu = rt.cluster_neurons(rows, 3, metric)
    assert torch.equal(torch.bincount(assign), torch.tensor([8, 8, 8]))
    label = {int(truth[i]): int(assign[i]) for i in range(24)}
    assert all(label[int(truth[i])] == int(assign[i]) for i in range(24)) and len(set(label.values())) == 3
    routed = rt.route_tokens(centers, mu, metric)
    assert routed.tolist() == [label[0], label[1], label[2]]
    feats = rt.cluster_features(assign, 3)
    assert feats.shape == (3, 8) and torch.equal(feats.flatten().sort().values, torch.arange(24))


def test_route_permutation_pads_each_cluster_to_v_and_inverts():
    cid = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    perm, inv, counts = rt.route_permutation(cid, 3, 4)
    assert counts.tolist() == [2, 1, 4] and perm.numel() == 4 + 4 + 4
    assert perm.tolist() == [1, 5, -1, -1, 4, -1, -1, -1, 0, 2, 3, 6]  # cluster blocks, token order inside
    x = torch.arange(7.0)[:, None] * 10
    rows = torch.where(perm[:, None] >= 0, x[perm.clamp(min=0)], 0.0)
    assert torch.equal(rows[inv], x)


def test_routed_mask_is_a_vnm_block_for_any_tokens_of_one_cluster():
    """Every token keeps exactly 2 of every 4 of its cluster's features (2/m overall); in the feature order where
    each M-group holds 4 features of each cluster, any v tokens of one cluster use at most 4 columns per group."""
    g = torch.Generator().manual_seed(2)
    t, k, m, v = 96, 64, 8, 16
    c = m // 4
    y = torch.relu(torch.randn(t, k, generator=g)) ** 2
    y[5] = 0.0  # a token with nothing to keep, and ties
    feats = torch.randperm(k, generator=g).view(c, k // c).sort(-1).values
    cid = torch.randint(0, c, (t,), generator=g)
    mask = ref.routed_vnm_mask(y, cid, feats)
    assert torch.all(mask.sum(-1) == k * 2 // m)
    own = torch.zeros(c, k, dtype=torch.bool).scatter(1, feats, True)
    assert not (mask & ~own[cid]).any()
    order = torch.stack([feats[:, 4 * gr: 4 * gr + 4] for gr in range(k // m)]).flatten()  # group gr: 4 of each
    for cl in range(c):
        rows = mask[cid == cl][:, order]
        n = rows.shape[0] // v * v
        used = rows[:n].reshape(n // v, v, k // m, m).any(1).sum(-1)
        assert used.max() <= 4
    assert (y * mask).sum() <= (y * ref.mask24(y)).sum()


def test_topk_routing_keeps_the_union_of_the_k_best_clusters_features():
    """route_tokens with k: the k best clusters, best first (the first is k=1's choice); the routed mask of
    [T, k] clusters is the union of the single-cluster masks (each cluster's own 2:4 groups): density 2k/(4C)."""
    g = torch.Generator().manual_seed(5)
    t, d, k_feat, c = 40, 16, 64, 4
    x, mu = torch.randn(t, d, generator=g), torch.randn(c, d, generator=g)
    top = rt.route_tokens(x, mu, "dot", k=2)
    assert top.shape == (t, 2) and torch.equal(top[:, 0], rt.route_tokens(x, mu, "dot"))
    s = x @ mu.T
    assert torch.all(s.gather(1, top[:, :1]) >= s.gather(1, top[:, 1:])) and torch.all(top[:, 0] != top[:, 1])
    y = torch.relu(torch.randn(t, k_feat, generator=g)) ** 2
    feats = torch.randperm(k_feat, generator=g).view(c, -1).sort(-1).values
    mask = ref.routed_vnm_mask(y, top, feats)
    union = ref.routed_vnm_mask(y, top[:, 0], feats) | ref.routed_vnm_mask(y, top[:, 1], feats)
    assert torch.equal(mask, union) and torch.all(mask.sum(-1) == 2 * 2 * k_feat // (4 * c))


def test_topk_config():
    cfg = VNMConfig(router=True, router_mode="own", m=8, topk=2)
    assert cfg.clusters == 4 and cfg.density == 2 / 8
    with pytest.raises(ValueError, match="invalid vnm.topk 2: expected 1, or more clusters per token in router_mode own"):
        VNMConfig(router=True, router_mode="group", topk=2)
    with pytest.raises(ValueError, match="invalid vnm.topk 0"):
        VNMConfig(topk=0)
    with pytest.raises(ValueError, match="d_ff=48, not a multiple of topk \\* m = 32"):  # 8 clusters of 6: no 2:4
        sparsify_(ReLU2FFN.of_width(16, 48), VNMConfig(router=True, router_mode="own", m=16, topk=2))


def test_grouped_mask_is_the_block_selection_over_each_clusters_tokens():
    """group mode: tokens of one cluster, in order, padded to whole blocks of v, get reference.vnm_mask's selection
    (so any block of v of them uses at most 4 of every m features); tokens of other clusters never share a block."""
    g = torch.Generator().manual_seed(4)
    t, k, v, m, c = 50, 32, 8, 8, 3
    y = torch.relu(torch.randn(t, k, generator=g)) ** 2
    cid = torch.randint(0, c, (t,), generator=g)
    mask = rt.grouped_vnm_mask(y, cid, c, v, m)
    assert torch.all(mask.reshape(t, k // m, m).sum(-1) == 2)
    for cl in range(c):
        rows = torch.nonzero(cid == cl).flatten()
        assert torch.equal(mask[rows], ref.vnm_mask(y[rows], v, m))  # its own blocks, nothing else in them
    assert rt.padded_rows(t, c, v) >= sum(-(-int((cid == cl).sum()) // v) * v for cl in range(c))


@pytest.mark.parametrize("mode", ["group", "own"])
def test_router_periods_reclustering_stats_and_one_graph(tmp_path, mode):
    cfg = preset("llama-tiny-relu2-vnm", n_layers=2, vocab_size=256)
    cfg.methods[0].update(v=16, dense_warmup_steps=2, recluster_steps=3, router_mode=mode, groups=4, sparse_until=1.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    core = model.blocks[0].ffn.core
    assert [VNMConfig(**{k: v for k, v in cfg.methods[0].items() if k not in ("method", "version")}).mode_at(s, 10)
            for s in (0, 2, 4, 5)] == ["dense", "sparse/0", "sparse/0", "sparse/1"]
    idx = torch.randint(0, 256, (2, 32))
    assert set_step(model, 0, 10) == ("dense",) and int(core.period) == -1
    stats = collect_stats(model, lambda: model(idx, idx))
    assert "route_pad_frac/mean" not in stats and 0 < stats["y2_zero_frac/mean"] < 1
    if mode == "own":  # no mask of its own before the first clustering: y2's zeros only (no exhaustive search)
        assert set(stats) == {"y2_zero_frac/0", "y2_zero_frac/1", "y2_zero_frac/mean"}
    else:  # before any clustering: the block selection
        assert 0 < stats["y2_mass_kept/mean"] < 1
    assert set_step(model, 2, 10) == ("sparse/0",) and int(core.period) == 0
    feats0 = core.features.clone()
    _one_graph_equal_to_eager(model, idx)
    stats = collect_stats(model, lambda: model(idx, idx))
    assert 0 < stats["route_largest_frac/mean"] <= 1 and 0 <= stats["route_pad_frac/mean"] < 1
    assert 0 < stats["y2_mass_kept/mean"] < 1
    with torch.no_grad():  # the weights move; the next period re-clusters from them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert set_step(model, 5, 10) == ("sparse/1",) and int(core.period) == 1
    assert not torch.equal(core.features, feats0)
    # a model loading this state keeps its clustering when put in the same period (what a resume does)
    other = build_model(cfg)
    other.load_state_dict(model.state_dict())
    set_step(other, 5, 10)
    assert torch.equal(other.blocks[0].ffn.core.features, core.features)
    with pytest.raises(ValueError, match="multiple of 4"):
        VNMConfig(m=6, router=True, router_mode="own")
    with pytest.raises(ValueError, match="router_mode"):
        VNMConfig(router=True, router_mode="moe")
    with pytest.raises(ValueError, match="route_metric"):
        VNMConfig(router=True, route_metric="manhattan")
    for how in ({"router_mode": "own"}, {"router_mode": "own", "topk": 2}):  # routing keys without the router
        with pytest.raises(ValueError, match="but vnm.router is false"):
            VNMConfig(**how)


@pytest.mark.parametrize("until", ["1.0", "5"])  # sparse to the end; dense again from step 5 (after the resume)
def test_router_run_resumes_exactly_across_a_reclustering(dataset, tmp_path, until):
    from elas.cli import main
    from conftest import TINY
    import json

    def run(out, steps, *extra):
        return main(["train", "--preset", "llama-tiny-relu2-vnm", "--data", str(dataset), "--out", str(out),
                     "--no-progress", *TINY, "--set", "log_every=1", "--set", "eval_every=100",
                     "--set", "save_every=3", "--set", "model.vnm.dense_warmup_steps=2",
                     "--set", "model.vnm.recluster_steps=2", "--set", "model.vnm.v=16",
                     "--set", f"model.vnm.sparse_until={until}", "--max-steps", str(steps), *extra])

    def losses(d):
        recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}
    assert run(tmp_path / "ref", 7) == 0
    assert run(tmp_path / "run", 3) == 0
    assert run(tmp_path / "run", 7, "--resume") == 0
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == list(range(1, 8)) and a == b
    modes = [json.loads(ln).get("modes") for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (["dense-final"] in modes) == (until == "5")


# ---- own mode as a grouped GEMM over the clusters (vnm.path=grouped) ----------------------------------------
def _own_pair(grad_mode: str, m: int = 8, rank: int = 0, clustering: str = "kmeans", topk: int = 1):
    cfgs = []
    for path in ("masked", "grouped"):
        cfg = preset("llama-tiny-relu2-vnm", n_layers=2, vocab_size=256, rank=rank)
        cfg.method("vnm").update(v=16, dense_warmup_steps=0, router_mode="own", m=m, grad_mode=grad_mode, path=path,
                                 clustering=clustering, topk=topk)
        cfgs.append(cfg)
    torch.manual_seed(0)
    masked = build_model(cfgs[0])
    grouped = build_model(cfgs[1])
    grouped.load_state_dict(masked.state_dict())
    for mdl in (masked, grouped):
        set_step(mdl, 0, 10)
    assert torch.equal(masked.blocks[0].ffn.core.features, grouped.blocks[0].ffn.core.features)
    return masked, grouped


def _loss_grads(model, idx):
    model.zero_grad(set_to_none=True)
    loss = model(idx, idx)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("rank", [0, 16])
@pytest.mark.parametrize("grad_mode,m,clustering,topk", [("ste", 8, "kmeans", 1), ("mask", 8, "kmeans", 1),
                                                         ("ste", 16, "kmeans", 1), ("ste", 8, "contiguous", 1),
                                                         ("ste", 8, "contiguous", 2), ("mask", 8, "kmeans", 2)])
def test_grouped_own_mode_equals_the_masked_path(rank, grad_mode, m, clustering, topk):
    """The grouped GEMM multiplies each token by its cluster's neurons only; the masked path multiplies by all of
    d_ff with the others masked. Same selection, same gradient (in own mode `ste` passes only through the token's
    own features), so the same loss and gradients up to summation order (fp32; full-rank and low-rank). With
    clustering=contiguous the grouped path reads each cluster's weights in place (views, no gather). With topk=2
    a token has a row in each of its 2 clusters and its output is their sum."""
    masked, grouped = _own_pair(grad_mode, m, rank, clustering, topk)
    c = topk * m // 4
    assert masked.blocks[0].ffn.core.description.startswith("emulated")  # what a benchmark row reports
    assert grouped.blocks[0].ffn.core.description.startswith(f"grouped GEMM over {c} clusters")
    assert ("weights in place" in grouped.blocks[0].ffn.core.description) == (clustering == "contiguous")
    assert ("2 per token" in grouped.blocks[0].ffn.core.description) == (topk == 2)
    if clustering == "contiguous":
        d_ff = grouped.blocks[0].ffn.d_ff
        assert torch.equal(grouped.blocks[0].ffn.core.features, torch.arange(d_ff).view(c, -1))
    idx = torch.randint(0, 256, (2, 32))
    (lm, gm), (lg, gg) = _loss_grads(masked, idx), _loss_grads(grouped, idx)
    torch.testing.assert_close(lg, lm, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gm):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    _one_graph_equal_to_eager(grouped, idx)


def test_own_mode_ste_reaches_only_the_tokens_own_neurons():
    """One token, own mode with 2 clusters: the up-projection rows of the other cluster get no gradient."""
    masked, _ = _own_pair("ste")
    core = masked.blocks[0].ffn.core
    up = masked.blocks[0].ffn.up
    x = torch.randn(1, 1, up.in_features)
    cid = rt.route_tokens(x.reshape(1, -1), core.centroids, core.cfg.route_metric)
    out = masked.blocks[0].ffn(x)
    up.weight.grad = None
    out.sum().backward()
    other = core.features[1 - int(cid)]
    assert up.weight.grad[other].abs().sum() == 0 and up.weight.grad[core.features[int(cid)]].abs().sum() > 0


def test_grouped_path_needs_own_mode():
    with pytest.raises(ValueError, match="vnm.path=grouped needs the router in own mode"):
        VNMConfig(router=True, router_mode="group", path="grouped")
    with pytest.raises(ValueError, match="invalid vnm.path"):
        VNMConfig(path="triton")


@pytest.mark.parametrize("over,what", [(dict(d_ff=1000), "neurons per cluster (d_ff / clusters) 500"),
                                       (dict(rank=20), "up input width 20, down output width 20")])
def test_grouped_path_refuses_widths_torchs_grouped_gemm_cannot_take_when_built(over, what):
    """torch's grouped GEMM (bf16: every CUDA run, CPU under autocast) needs 16-byte strides: a cluster of 500
    neurons (d_ff=1000, own mode m=8: 2 clusters) or a rank of 20 failed at the first sparse step, after the dense
    warm-up. The build refuses them in one line; widths that are multiples of 8 build and train in bf16."""
    def cfg(**o):
        c = preset("llama-tiny-relu2-vnm-own", n_layers=1, vocab_size=128, **o)
        c.method("vnm").update(m=8, dense_warmup_steps=0)
        return c
    with pytest.raises(ValueError, match=r"vnm.path=grouped: blocks.0.ffn has " + what.replace("(", r"\(")
                       .replace(")", r"\)") + ", not a multiple of 8"):
        build_model(cfg(**over))
    model = build_model(cfg(d_ff=1024, rank=24))  # clusters of 512 neurons, rank 24: the grouped GEMM runs
    set_step(model, 0, 10)
    idx = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)


def test_grouped_path_in_bf16_runs_torchs_grouped_gemm_and_compiles():
    """Under bf16 autocast the grouped path takes torch._grouped_mm itself (the kernel it runs on Hopper):
    against the masked path within bf16 rounding, and one graph when compiled."""
    masked, grouped = _own_pair("ste")
    idx = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (lm, gm), (lg, gg) = _loss_grads(masked, idx), _loss_grads(grouped, idx)
        _one_graph_equal_to_eager(grouped, idx)
    assert abs(lg.item() - lm.item()) < 1e-2 * abs(lm.item())
    for a, b in zip(gg, gm):
        assert ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m,clustering,topk", [(8, "kmeans", 1), (16, "kmeans", 1), (16, "contiguous", 1),
                                               (16, "contiguous", 2)])
def test_gpu_grouped_path_matches_the_masked_path(m, clustering, topk):
    """bf16 on the GPU: the grouped path (torch's grouped GEMM) is as close to the fp32 masked reference as the
    bf16 masked path is (in bf16 both paths round y1, so near-ties of the 2-of-4 choice fall either way), and
    the compiled FFN computes what the eager one does. The whole model is not compared compiled: Inductor's
    other fusions change the rounding of x, and a token near a tie between two clusters changes its route."""
    masked, grouped = _own_pair("ste", m, clustering=clustering, topk=topk)
    masked, grouped = masked.cuda(), grouped.cuda()
    idx = torch.randint(0, 256, (4, 64), device="cuda")
    lr, gr = _loss_grads(masked, idx)  # fp32 masked: the reference
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (lm, gm), (lg, gg) = _loss_grads(masked, idx), _loss_grads(grouped, idx)
    assert abs(lg.item() - lr.item()) < 1e-2 * abs(lr.item())

    def err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()
    for a, b, r in zip(gg, gm, gr):
        assert err(a, r) <= 1.5 * err(b, r) + 2e-2, (err(a, r), err(b, r))
    ffn = grouped.blocks[0].ffn.to(torch.bfloat16)
    x = torch.randn(4, 64, ffn.up.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for f in (ffn, torch.compile(ffn)):
        x.grad = None
        ffn.zero_grad(set_to_none=True)
        y = f(x)
        y.float().square().sum().backward()
        outs.append([y, x.grad] + [p.grad for p in ffn.parameters()])
    for a, b in zip(*outs):
        assert err(a, b) < 1e-2


def test_group_layout_aligns_groups_and_moves_rows_by_gathers_only():
    """Every token lands once, in its cluster's group; groups start at multiples of ALIGN; the last ends at P;
    padding rows are zero; the backward of the row moves is the inverse gather (no accumulation)."""
    from elas.sparsity.vnm_grouped import ALIGN, _Take, group_layout
    torch.manual_seed(0)
    t, c = 50, 3
    cid = torch.randint(0, c, (t,))
    cid[:5] = 2  # cluster 1 may be small; cluster 2 is never empty
    src, dest, offs = group_layout(cid, c)
    p = t + ALIGN * c
    assert src.shape == (p,) and offs[-1].item() == p and (offs[:-1] % ALIGN == 0).all()
    assert torch.equal(src[dest], torch.arange(t))  # dest and src are inverse maps
    assert (src == t).sum().item() == p - t  # the rest is padding
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), offs[:-1]])
    group_of_row = torch.searchsorted(offs, torch.arange(p, dtype=torch.int32), right=True)
    assert torch.equal(group_of_row[dest], cid)  # each token in its cluster's group
    assert (dest.sort().values.diff() > 0).all() and (starts % ALIGN == 0).all()
    for g in range(c):  # inside a group, token order; the group's rows from its start on
        rows = dest[cid == g]
        assert (rows.diff() > 0).all() and rows[0] == starts[g] and rows[-1] == starts[g] + len(rows) - 1
    x = torch.randn(t, 4, dtype=torch.float64, requires_grad=True)
    y = _Take.apply(x, src, dest)
    assert (y[src == t] == 0).all() and torch.equal(y[dest], x.detach())
    g = torch.randn(p, 4, dtype=torch.float64)
    y.backward(g)
    torch.testing.assert_close(x.grad, g[dest])
    assert torch.autograd.gradcheck(lambda z: _Take.apply(z, src, dest), (x.detach().clone().requires_grad_(),))


def test_take_of_a_transposed_view_gives_its_gradient_in_that_layout_and_keeps_padding_rows():
    """_Take of a column-major x (wd = W_down^T): a permutation of its rows (the weights' flat/inv) gives the
    gradient column-major, the row gather's values; a move with padding rows (the output's h2 -> tokens, back
    holding the sentinel) gives the row gather's values too, padding rows zero, and does not index out of range."""
    from elas.sparsity.vnm_grouped import _Take, group_layout
    torch.manual_seed(0)
    n, q = 24, 5
    flat = torch.randperm(n)
    inv = torch.empty_like(flat).scatter_(0, flat, torch.arange(n))
    x = torch.randn(q, n, dtype=torch.float64).t().requires_grad_()  # [n, q], strides (1, n)
    assert ref.col_major(x)
    g = torch.randn(n, q, dtype=torch.float64)
    _Take.apply(x, flat, inv).backward(g)
    assert torch.equal(x.grad, g[inv]) and x.grad.stride() == x.stride()
    assert torch.autograd.gradcheck(lambda z: _Take.apply(z, flat, inv), (x.detach().clone().requires_grad_(),))
    for k in (1, 2):  # h2 [P, q'] -> [T, q'] (top-k: k rows a token, summed), here column-major
        t, c = 7, 3
        cid = torch.stack([torch.randperm(c)[:k] for _ in range(t)]).reshape(-1)
        src, dest, _ = group_layout(cid, c)
        tok = torch.where(src < t * k, src // k, t)
        h2 = torch.randn(q, src.shape[0], dtype=torch.float64).t().requires_grad_()
        assert ref.col_major(h2)
        g = torch.randn(t, q, dtype=torch.float64)
        _Take.apply(h2, dest, tok, k, 1).backward(g)
        want = torch.cat([g, g.new_zeros(1, q)])[tok]  # padding rows (tok == t) zero
        assert torch.equal(h2.grad, want)


def test_contiguous_clusters_are_consecutive_neurons_with_their_mean_rows_and_views_equal_gathers():
    """clustering=contiguous: cluster c is neurons c*F..(c+1)*F-1, its centroid their mean row (normalised rows and
    mean for cosine, as k-means makes them); the grouped core's in-place weights equal the gathered ones."""
    from elas.sparsity.vnm_grouped import grouped_core as _grouped_core
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(32, 8, generator=g)
    assign, mu = rt.contiguous_clusters(rows, 4, "dot")
    assert torch.equal(assign, torch.arange(32) // 8)
    torch.testing.assert_close(mu, rows.view(4, 8, 8).mean(1))
    _, mu_cos = rt.contiguous_clusters(rows, 4, "cosine")
    torch.testing.assert_close(mu_cos.norm(dim=-1), torch.ones(4))
    h1 = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    wu = torch.randn(32, 8, generator=g, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(6, 32, generator=g, dtype=torch.float64).t().requires_grad_()  # [d_ff, d_model] view
    cid = torch.randint(0, 4, (40,), generator=g)
    feats = rt.cluster_features(assign, 4)
    outs = []
    for in_place in (False, True):
        for t in (h1, wu, wd):
            t.grad = None
        y = _grouped_core(h1, wu, wd, cid, feats, False, in_place=in_place)
        (y * torch.arange(6, dtype=y.dtype)).sum().backward()
        outs.append([y.detach(), h1.grad.clone(), wu.grad.clone(), wd.grad.clone()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="vnm.clustering"):
        VNMConfig(clustering="spectral")


def test_bf16_routing_differs_from_fp32_only_at_near_ties():
    """route_tokens scores 16-bit activations in their dtype (no fp32 copy of x): the clusters it picks are
    fp32's except for tokens whose two best fp32 scores are within bf16's rounding of each other."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g).to(torch.bfloat16)
    mu = torch.randn(4, 64, generator=g)
    a, b = rt.route_tokens(x, mu, "dot"), rt.route_tokens(x.float(), mu, "dot")
    s = x.float() @ mu.T
    top2 = s.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]) / top2[:, 0].abs().clamp(min=1e-6)
    assert (a != b).float().mean() < 0.01 and (gap[a != b] < 2e-2).all()


@pytest.mark.parametrize("variant", ["relu2-vnm-fast", "relu2-w24-vnm-fast"])
def test_fast_variants_are_the_measured_configuration_and_share_one_sparse_window(variant):
    """relu2-vnm-fast / relu2-w24-vnm-fast: own mode, grouped, m=16, contiguous clusters, top-1, and every method
    sparse over the same window (after the dense warm-up, to 30% of the run), dense before and after."""
    cfg = preset(f"llama-tiny-{variant}", n_layers=1, vocab_size=256)
    vnm = cfg.method("vnm")
    assert {k: vnm[k] for k in ("router_mode", "m", "path", "clustering", "sparse_until")} == \
        {"router_mode": "own", "m": 16, "path": "grouped", "clustering": "contiguous", "sparse_until": 0.3}
    for mc in cfg.methods:
        mc["dense_warmup_steps"] = 10
        if mc["method"] == "sste24":  # W as it was when dense again (the default, sparse, sets W to beta S(W):
            mc["dense_init"] = "master"  # tests/test_sste.py), so that dense after equals dense before
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(0, 256, (2, 32))
    n = len(cfg.methods)
    losses = {}
    for step, mode in ((0, "dense"), (10, "sparse"), (29, "sparse"), (30, "dense-final")):
        modes = set_step(model, step, 100)
        assert len(modes) == n and all(m_.split("/")[0] == mode for m_ in modes), (step, modes)
        with torch.no_grad():
            losses[step] = model(idx, idx).item()
    assert losses[0] != losses[10] and losses[30] == losses[0]  # the weights did not move: dense again = dense


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["relu2-vnm-fast", "relu2-w24-vnm-fast"])
def test_gpu_fast_variants_train_through_every_phase_with_statistics(dataset, tmp_path, variant):
    """The trainer's default CUDA mode (compiled, captured, bf16) through dense -> sparse -> dense with a statistics
    probe at every step: every method's statistics on the GPU together (S-STE's first flip rate was once a CPU
    tensor beside V:N:M's CUDA ones, which broke the full recipe's first probe)."""
    import json

    from elas.cli import main
    out = tmp_path / "run"
    sets = ["model.vnm.dense_warmup_steps=2", "log_every=1", "eval_every=100", "model.vocab_size=512"]
    if "w24" in variant:
        sets.append("model.sste24.dense_warmup_steps=2")
    assert main(["train", "--preset", f"llama-tiny-{variant}", "--data", str(dataset), "--out", str(out),
                 "--no-progress", "--max-steps", "20", *[a for kv in sets for a in ("--set", kv)]]) == 0
    ms = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    phases = [m["modes"][0].split("/")[0] for m in ms]  # every method's window is the same
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] == ["dense", "sparse", "dense-final"]
    sparse = [m for m in ms if m["sparse"]]
    assert len(sparse) >= 3 and all(0 < m["y2_mass_kept/mean"] <= 1 for m in sparse)
    if "w24" in variant:
        assert all("flip_rate/mean" in m for m in ms[1:])


@pytest.mark.parametrize("preset", ["llama-tiny-relu2-vnm", "llama-tiny-relu2-vnm-fast",
                                    "llama-tiny-relu2-w24-vnm-fast"])
def test_sparse_until_from_the_command_line_is_a_step_or_a_fraction_whatever_the_preset_lists(preset):
    """`--set model.METHOD.sparse_until=600` is step 600 and `=0.25` a quarter of the run on every preset. The -fast
    variants list sparse_until=0.3, whose float type once turned "600" into the fraction 600.0, refused."""
    from elas.build import resolve_methods
    from elas.config import apply_overrides, train_config
    for text, want in (("600", 600), ("0.25", 0.25), ("1.0", 1.0)):
        cfg = train_config(preset)
        for name in ("sste24", "vnm"):
            if cfg.model.method(name) is not None:
                apply_overrides(cfg, {f"model.{name}.sparse_until": text})
        got = [m.sparse_until for m in resolve_methods(cfg.model) if hasattr(m, "sparse_until")]
        assert got and all(g == want and type(g) is type(want) for g in got), (text, got)


@pytest.mark.parametrize("preset,sets,never", [
    ("llama-tiny-relu2-w24", {"model.sste24.dense_warmup_steps": 1000}, "sste24"),  # warm-up past the 600 steps
    ("llama-tiny-relu2-w24", {}, None),  # the tiny defaults: dense to step 60, sparse to 300
    ("llama-tiny-relu2-w24-vnm-fast", {"model.vnm.dense_warmup_steps": 200}, "vnm"),  # S-STE 60 -> 180 is fine
    ("llama-tiny-relu2-vnm-fast", {"model.vnm.dense_warmup_steps": 200}, "vnm"),  # sparse to 0.3 x 600 = 180
    ("llama-tiny-relu2-vnm", {"model.vnm.dense_warmup_steps": 0, "model.vnm.sparse_until": "0"}, "vnm"),
    ("llama-tiny-relu2-vnm-fast", {"model.vnm.dense_warmup_steps": 100}, None),
])
def test_a_sparse_phase_that_would_end_before_the_warm_up_is_refused(preset, sets, never):
    """A method with the sparse -> dense schedule whose sparse phase ends before its dense warm-up does (or whose
    warm-up outlasts the run) would train dense throughout under its name: one line before any data is read."""
    from elas.config import apply_overrides, train_config
    from elas.train.trainer import TrainError, Trainer
    cfg = train_config(preset)
    apply_overrides(cfg, {**sets, "data_dir": "/nonexistent/elas-data"})
    with pytest.raises(TrainError) as e:
        Trainer(cfg, progress=False)
    if never is None:  # a sparse step in the run: the next check (the data) speaks
        assert "never sparse" not in str(e.value)
    else:
        assert str(e.value).startswith(f"{never} would never be sparse") and "\n" not in str(e.value), e.value


def test_fsdp2_methods_read_whole_weights_when_their_modes_start(dataset, tmp_path):
    """parallel=fsdp on 2 gloo processes: between steps FSDP2's parameters are DTensor shards, and S-STE's beta and
    the router's k-means clusters of S(W_up) are computed from whole weights when their modes start (reading the
    shards once failed at the first sparse step), and S-STE's dense_init=sparse thresholds each process's rows of W
    at the return to dense. Own mode (a token's mask does not depend on the batch): the single process's losses,
    through the warm-up, a re-clustering and the return to dense."""
    import json
    import os
    import subprocess
    import sys

    from conftest import TINY, run_cli
    sets = ["parallel=fsdp", "log_every=1", "eval_every=100", "model.sste24.dense_warmup_steps=2",
            "model.sste24.sparse_until=5", "model.sste24.dense_init=sparse", "model.vnm.dense_warmup_steps=2",
            "model.vnm.sparse_until=5", "model.vnm.recluster_steps=2", "model.vnm.router_mode=own", "model.vnm.m=16"]

    def args(out, batch, *extra):
        return ["train", "--preset", "llama-tiny-relu2-w24-vnm", "--data", str(dataset), "--out", str(out),
                "--no-progress", *TINY, *[a for kv in sets for a in ("--set", kv)], "--set", f"batch_size={batch}",
                "--max-steps", "6", *extra]

    def losses(out):
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["modes"]) for r in recs if "loss" in r}
    one = run_cli(*args(tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "elas", *args(tmp_path / "two", 2)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s][1] for s in (2, 3, 5, 6)] == [["dense", "dense"], ["sparse", "sparse/0"], ["sparse", "sparse/1"],
                                               ["dense-final", "dense-final"]]
    for s in a:  # the same sequences, reduced in another order
        assert abs(a[s][0] - b[s][0]) < 1e-4 and a[s][1] == b[s][1], (s, a[s], b[s])
    master = run_cli(*args(tmp_path / "master", 4, "--set", "model.sste24.dense_init=master"))
    assert master.returncode == 0, master.stderr[-2000:]
    c = losses(tmp_path / "master")  # the thresholding did change W: the dense phase's loss differs
    assert all(c[s] == a[s] for s in range(1, 6)) and abs(c[6][0] - a[6][0]) > 1e-3, (c[6], a[6])


def test_the_router_clusters_the_up_projection_the_model_has_whatever_the_method_order():
    """Methods listed [vnm, sste24]: S-STE replaces the up-projection after the router was attached; the router
    clusters the neurons of the one the model has when its period starts (S(W_up)), as with [sste24, vnm]."""
    import copy

    from elas.config import model_preset
    cfg = model_preset("llama-tiny-relu2-w24-vnm", n_layers=1, vocab_size=256)
    for m in cfg.methods:
        m["dense_warmup_steps"] = 2
    flipped = copy.deepcopy(cfg)
    flipped.methods = flipped.methods[::-1]
    assert [m["method"] for m in flipped.methods] == ["vnm", "sste24"]
    cores = []
    for c in (cfg, flipped):
        torch.manual_seed(0)
        model = build_model(c)
        set_step(model, 5, 100)
        cores.append(model.blocks[0].ffn.core)
    assert cores[0].period.item() >= 0 and torch.equal(cores[0].features, cores[1].features)
    torch.testing.assert_close(cores[0].centroids, cores[1].centroids)


def test_a_block_larger_than_the_micro_batch_is_refused(tmp_path, capsys):
    """vnm.v pads every block (and every router cluster) to v rows: a v beyond the micro-batch's tokens only costs
    memory, out of memory at the first sparse step. Refused in one line by the trainer and by the CLI before any
    data is read."""
    from elas.config import apply_overrides, train_config
    from elas.train.trainer import TrainError, Trainer
    cfg = train_config("llama-tiny-relu2-vnm-fast")
    tokens = cfg.batch_size * cfg.seq_len
    apply_overrides(cfg, {"model.vnm.v": tokens + 1, "data_dir": "/nonexistent/elas-data"})
    with pytest.raises(TrainError) as e:
        Trainer(cfg, progress=False)
    assert str(e.value).startswith(f"invalid vnm.v {tokens + 1}") and "\n" not in str(e.value), e.value
    apply_overrides(cfg, {"model.vnm.v": tokens})  # the largest that fits: the next check (the data) speaks
    with pytest.raises(TrainError) as e:
        Trainer(cfg, progress=False)
    assert "vnm.v" not in str(e.value)
    from elas.cli import main
    capsys.readouterr()
    assert main(["train", "--preset", "llama-tiny-relu2-vnm-fast", "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "run"), "--set", f"model.vnm.v={tokens + 1}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"elas: error: invalid vnm.v {tokens + 1}") and "\n" not in err, err


def _relu2_variants():
    from elas.config import VARIANTS
    return [v for v, var in VARIANTS.items() if var.model.get("ffn", "swiglu") == "relu2" and var.model.get("methods")]


@pytest.mark.parametrize("variant", _relu2_variants())
def test_each_method_says_truly_whether_its_sparse_forward_is_causal(variant):
    """In its sparse mode a causal method's token outputs depend on earlier tokens only: changing the tokens from
    position 20 on leaves the logits before it unchanged, whatever else is in the batch. A method whose tokens
    share a selection (V:N:M's blocks, group routing) is not: it says so (SparsityMethod.causal: the trainer, eval
    and generate warn), and here it is shown to leak, so the flag cannot be wrong either way."""
    from elas.build import build_model, resolve_methods
    from elas.config import model_preset
    from elas.sparsity import applied_methods, method_to_dict, set_step
    cfg = model_preset(f"llama-tiny-{variant}", n_layers=2, d_model=64, n_heads=2, vocab_size=128, max_seq_len=64)
    cfg.methods = [method_to_dict(m.scaled(0)) for m in resolve_methods(cfg)]  # every phase from step 0: sparse
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    set_step(model, 0, 10 ** 9)
    assert all(str(a.mode).startswith("sparse") for a in applied_methods(model)), variant
    causal = all(a.config.causal for a in applied_methods(model))
    from elas.sparsity import non_causal  # (what eval and generate warn of)
    assert non_causal(model) == [a.config.name for a in applied_methods(model) if not a.config.causal]
    assert (non_causal(model) == []) == causal
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (4, 48), generator=g)
    y = x.clone()
    y[:, 20:] = torch.randint(0, 128, (4, 28), generator=g)
    with torch.no_grad():
        a, b = model(x)[:, :20], model(y)[:, :20]
        alone = model(x[:1])[:, :20]  # the first sequence without the others of its batch
    leak = max((a - b).abs().max().item(), (a[:1] - alone).abs().max().item())
    if causal:
        assert leak < 1e-4, (variant, leak)
    else:
        assert leak > 1e-3, (variant, leak)


def test_the_trainer_says_when_a_method_is_not_causal():
    from elas.config import apply_overrides, train_config
    from elas.train.trainer import TrainError, Trainer
    for name, warns in (("llama-tiny-relu2-vnm-blocks", True), ("llama-tiny-relu2-vnm-fast", False)):
        cfg = train_config(name)
        apply_overrides(cfg, {"data_dir": "/nonexistent/elas-data"})
        said = []
        with pytest.raises(TrainError, match="does not exist"):  # (the warning comes before any data is read)
            Trainer(cfg, progress=False, log=said.append)
        assert any("vnm is not causal in its sparse steps" in s for s in said) == warns, (name, said)


def test_grouped_path_refuses_the_transposed_sste_input_gradient(dataset, tmp_path, capsys):
    """The grouped path multiplies the FFN's S(W) itself, so autograd gives S(W)'s input gradient: with
    sste24.input_grad=transposed it trained differently from the masked path (gradients 40-80% apart), silently.
    Refused in one line before the run starts; a model made so still evaluates (the forward is the same)."""
    from elas.cli import main
    from conftest import TINY
    out = tmp_path / "run"
    args = ["train", "--preset", "llama-tiny-relu2-w24-vnm", "--data", str(dataset), "--out", str(out), *TINY,
            "--set", "model.vnm.router_mode=own", "--set", "model.vnm.m=8", "--set", "model.vnm.v=16",
            "--set", "model.sste24.input_grad=transposed"]
    assert main(args + ["--set", "model.vnm.path=grouped", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vnm.path=grouped" in err and "input_grad=transposed" in err, err
    assert not out.exists()
    assert main(args + ["--set", "model.vnm.path=masked", "--dry-run"]) == 0
    cfg = preset("llama-tiny-relu2-w24-vnm", n_layers=1, vocab_size=256)
    cfg.method("vnm").update(v=16, dense_warmup_steps=0, router_mode="own", m=8, path="grouped")
    cfg.method("sste24").update(dense_warmup_steps=0, input_grad="transposed")
    model = build_model(cfg)
    set_step(model, 0, 10)
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.isfinite(model(idx, idx))
