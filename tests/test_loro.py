"""LORO-AdamW: the exact step against a dense reference, rank and balance of the factors, state resets, resume."""
import importlib.util
import json

import pytest
import torch

from elas.cli import main
from elas.config import model_preset
from elas.build import build_model
from elas.model import LowRankLinear
from elas.optim import LOROAdamW, exact_update
from elas.optim.loro import _thin_qr, exact_update_batched

from conftest import TINY, run_cli


def dense_reference(M, N, G, eta):
    """Materialise W, project G on the tangent space of rank-r matrices at W, retract by truncated SVD."""
    r = M.shape[1]
    W = M @ N.T
    U, _ = torch.linalg.qr(M)
    V, _ = torch.linalg.qr(N)
    PU, PV = U @ U.T, V @ V.T
    PT = PU @ G + G @ PV - PU @ G @ PV
    u, s, vh = torch.linalg.svd(W - eta * PT)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("m,n,r", [(30, 20, 4), (16, 40, 6), (64, 64, 8)])
def test_exact_step_equals_dense_reference(m, n, r):
    g = torch.Generator().manual_seed(m + n + r)
    M = torch.randn(m, r, generator=g, dtype=torch.float64)
    N = torch.randn(n, r, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    eta = 0.3
    Mn, Nn = exact_update(M, N, G @ N, G.T @ M, eta)  # raw gradients of W = M N^T
    want = dense_reference(M, N, G, eta)
    assert torch.allclose(Mn @ Nn.T, want, atol=1e-10, rtol=1e-10)
    # balanced factors: M'^T M' = N'^T N' = diag(sigma_r)
    assert torch.allclose(Mn.T @ Mn, Nn.T @ Nn, atol=1e-10)
    assert torch.allclose(Mn.T @ Mn, torch.diag(torch.diagonal(Mn.T @ Mn)), atol=1e-10)
    # and the update is not trivial
    assert not torch.allclose(want, M @ N.T, atol=1e-3)


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6])
def test_cholesky_qr_is_a_thin_qr(cond):
    """CholeskyQR2 (the exact step's QR on CUDA): X = Q R with orthonormal Q and upper-triangular R, in float32,
    also for ill-conditioned X; a batch element whose Gram matrix is singular sends the batch to Householder."""
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(3, 300, 24, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(3, 24, 24, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 24, dtype=torch.float64)
    X = ((U * s) @ V.mT).float()  # [3, 300, 24], singular values 1 .. 1/cond
    for x in (X, torch.cat([X[:1], X[1:2].index_fill(-1, torch.tensor([5]), 0.0), X[2:]])):  # 2nd: rank-deficient
        Q, R = _thin_qr(x, "cholesky")
        assert Q.shape == x.shape and R.shape == (3, 24, 24) and Q.dtype == R.dtype == torch.float32
        torch.testing.assert_close(Q.mT @ Q, torch.eye(24).expand(3, 24, 24), atol=1e-5, rtol=0)
        torch.testing.assert_close(Q @ R, x, atol=1e-5, rtol=1e-5)
        assert torch.equal(R, R.triu())
    Qh, Rh = _thin_qr(X, "householder")  # the same factorisation up to the signs of R's rows
    sign = torch.sign(torch.diagonal(Rh, dim1=-2, dim2=-1))[..., None]
    torch.testing.assert_close(sign * Rh, _thin_qr(X, "cholesky")[1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown qr method 'lu'.*householder"):
        _thin_qr(X, "lu")


def test_batched_svd_in_chunks_equals_one_call(monkeypatch):
    """The batched cuSOLVER SVD drivers run on chunks of the batch (one call for 128 cores of 2048 x 2048, the 7B
    attention layers, fails on an H200); the chunks' results, put back in order, are the one call's."""
    from elas.optim import loro
    S = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = torch.linalg.svd(S)
    monkeypatch.setattr(loro, "SVD_CHUNK_ELEMENTS", 3 * 64)  # 3 cores per call: chunks of 3, 3, 3, 1
    got = loro._svd_2r(S, "gesvda")
    for g, w in zip(got, whole):
        assert g.shape == w.shape
    torch.testing.assert_close(got[1], whole[1])
    torch.testing.assert_close((got[0] * got[1][..., None, :]) @ got[2], S)


@pytest.mark.parametrize("eigh_fails", [False, True])
def test_svd_that_does_not_converge_falls_back(monkeypatch, caplog, eigh_fails):
    """gesvda gave up on the 7B model's 2048 x 2048 cores at its first exact step (H200): the chunk then goes to
    eigh, and where that fails too, to the SVD in float64 on the CPU; the result comes back in the
    input's dtype, with a warning, and the run goes on."""
    from elas.optim import loro
    real_svd, real_eigh, calls = torch.linalg.svd, torch.linalg.eigh, []

    def flaky_svd(A, *args, driver=None, **kw):  # a driver that fails, as cuSOLVER's gesvda did
        calls.append(("svd", driver, A.dtype))
        if driver == "gesvda":
            raise torch.linalg.LinAlgError("linalg.svd: (Batch element 4): The algorithm failed to converge")
        return real_svd(A, *args, **kw)

    def flaky_eigh(A, *args, **kw):
        calls.append(("eigh", None, A.dtype))
        if eigh_fails:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(A, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    monkeypatch.setattr(loro, "_WARNED", set())
    S = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(5))
    S[:, 4:, 4:] = 0  # the core's zero block
    with caplog.at_level("WARNING", logger="elas.optim"):
        U, sig, Vh = loro._svd_or_fallback(S, "gesvda")
    want = [("svd", "gesvda", torch.float32), ("eigh", None, torch.float32)]
    assert calls == want + ([("svd", None, torch.float64)] if eigh_fails else [])
    assert U.dtype == sig.dtype == Vh.dtype == torch.float32
    torch.testing.assert_close((U * sig[..., None, :]) @ Vh, S, atol=1e-5, rtol=1e-5)
    assert "did not converge" in caplog.text and "3 cores of 8x8" in caplog.text


def test_auto_eigh_that_fails_falls_back_to_float64_on_the_cpu(monkeypatch, caplog):
    from elas.optim import loro
    real_svd, calls = torch.linalg.svd, []

    def failing_eigh(A, *args, **kw):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    def svd(A, *args, **kw):
        calls.append(A.dtype)
        return real_svd(A, *args, **kw)

    monkeypatch.setattr(loro, "auto_solver", lambda core, cuda: "eigh")  # as for a 1B core on CUDA
    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    monkeypatch.setattr(torch.linalg, "svd", svd)
    S = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(7))
    with caplog.at_level("WARNING", logger="elas.optim"):
        U, sig, Vh = loro._svd_2r(S, "auto")
    assert calls == [torch.float64] and U.dtype == torch.float32 and "eigh failed" in caplog.text
    torch.testing.assert_close((U * sig[..., None, :]) @ Vh, S, atol=1e-5, rtol=1e-5)


def test_eigh_svd_of_a_rank_deficient_core_stays_finite():
    """The eigh route (gesvda's fallback) on a core whose rank is below its size: the columns of U for singular
    values at rounding level are zero, not noise divided by ~0, and the rank-k part is exact."""
    from elas.optim import loro
    g = torch.Generator().manual_seed(6)
    S = torch.randn(2, 16, 3, generator=g) @ torch.randn(2, 3, 16, generator=g)  # rank 3 of 16
    U, sig, Vh = loro._svd_2r(S, "eigh")  # 12 of the 16 eigenvalues of S^T S come out <= 0 here
    assert torch.isfinite(U).all() and U.abs().max() <= 1.0 + 1e-4  # before: 1.4e32 in those columns
    torch.testing.assert_close((U[..., :3] * sig[..., None, :3]) @ Vh[..., :3, :], S, atol=1e-4, rtol=1e-4)


def test_exact_step_in_chunks_of_pairs_equals_one_call(monkeypatch):
    """exact_update_batched splits a shape's pairs into calls of at most EXACT_CHUNK_ELEMENTS factor elements
    (bounding the step's float64 temporaries); the result is the one call's."""
    from elas.optim import loro
    g = torch.Generator().manual_seed(4)
    pairs = [(torch.randn(32, 4, generator=g), torch.randn(24, 4, generator=g), torch.randn(32, 4, generator=g),
              torch.randn(24, 4, generator=g), 0.01 * (k + 1)) for k in range(5)]
    whole = loro.exact_update_batched(pairs, "svd", "householder")
    monkeypatch.setattr(loro, "EXACT_CHUNK_ELEMENTS", 2 * 32 * 4)  # 2 pairs per call: 2, 2, 1
    calls = []
    real = loro.exact_update
    monkeypatch.setattr(loro, "exact_update", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    got = loro.exact_update_batched(pairs, "svd", "householder")
    assert calls == [2, 2, 1]
    for (gm, gn), (wm, wn) in zip(got, whole):
        torch.testing.assert_close(gm, wm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gn, wn, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qr", ["householder", "cholesky"])
def test_exact_step_in_float32_matches_float64(qr):
    """The exact step's working precision (fp32) against the fp64 step, with either QR."""
    g = torch.Generator().manual_seed(2)
    M, N = torch.randn(256, 32, generator=g, dtype=torch.float64) / 16, torch.randn(128, 32, generator=g,
                                                                                   dtype=torch.float64) / 11
    G = torch.randn(256, 128, generator=g, dtype=torch.float64)
    want = exact_update(M, N, G @ N, G.T @ M, 1e-2, "svd", "householder")
    got = exact_update(*(t.float() for t in (M, N, G @ N, G.T @ M)), 1e-2, "svd", qr)
    w_want, w_got = want[0] @ want[1].T, (got[0] @ got[1].T).double()
    assert ((w_got - w_want).norm() / w_want.norm()).item() < 1e-5


def test_gram_eigh_qr_of_a_rank_deficient_batch():
    """X = Q K for X of rank 5 < 24: Q's columns orthonormal (5 of them) or zero, in one batched factorisation."""
    from elas.optim.loro import _gram_eigh_qr
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 300, 5, generator=g, dtype=torch.float64) @ torch.randn(3, 5, 24, generator=g,
                                                                                dtype=torch.float64)
    Q, K = _gram_eigh_qr(X)
    assert Q.shape == (3, 300, 24) and K.shape == (3, 24, 24)
    torch.testing.assert_close(Q @ K, X, atol=1e-10, rtol=1e-10)
    norms = Q.norm(dim=-2)  # [3, 24]: five ones, the rest zero
    assert ((norms - 1).abs() < 1e-10).sum(-1).tolist() == [5, 5, 5] and ((norms < 1e-12) | (norms > 0.5)).all()
    G = Q.mT @ Q
    torch.testing.assert_close(G, torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_step_with_a_low_rank_gradient_is_the_same_with_either_qr(dtype, monkeypatch):
    """A gradient of rank 4 < r = 16 makes the exact step's Y1 and Y2 rank-deficient: CholeskyQR fails on them,
    and they are factored by `_gram_eigh_qr` (batched) instead of Householder; the step is unchanged."""
    from elas.optim import loro
    g = torch.Generator().manual_seed(4)
    M, N = (torch.randn(3, s, 16, generator=g, dtype=torch.float64) / 8 for s in (192, 128))
    G = torch.randn(3, 192, 4, generator=g, dtype=torch.float64) @ torch.randn(3, 4, 128, generator=g,
                                                                               dtype=torch.float64)
    args = (M, N, G @ N, G.mT @ M)
    want = exact_update(*args, 1e-1, "svd", "householder")
    used = []
    real = loro._gram_eigh_qr
    monkeypatch.setattr(loro, "_gram_eigh_qr", lambda X: used.append(X.shape) or real(X))
    got = exact_update(*(t.to(dtype) for t in args), 1e-1, "svd", "cholesky")
    if dtype == torch.float64:  # in float32 the rounding noise of Y1 and Y2 keeps their Gram matrices definite
        assert used == [(3, 128, 16), (3, 192, 16)]  # Y1 and Y2; M and N themselves took CholeskyQR2
    w_want, w_got = want[0] @ want[1].mT, (got[0] @ got[1].mT).double()
    assert ((w_got - w_want).norm() / w_want.norm()).item() < (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("solver,qr", [("svd", "householder"), ("eigh", "householder"), ("svd", "cholesky")])
def test_batched_exact_step_equals_one_pair_at_a_time(solver, qr):
    """Pairs of one shape are stacked into one batched call (each with its own step size); pairs of other shapes
    get their own batch; every result equals the pair's own exact_update (fp64: to rounding)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(30, 20, 4), (20, 30, 4), (30, 20, 4), (64, 64, 8), (30, 20, 4)]
    pairs = []
    for k, (m, n, r) in enumerate(shapes):
        M, N = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
        G = torch.randn(m, n, generator=g, dtype=torch.float64)
        pairs.append((M, N, G @ N, G.T @ M, 0.1 * (k + 1)))
    got = exact_update_batched(pairs, solver, qr)
    for (M, N, DM, DN, eta), (Mb, Nb) in zip(pairs, got):
        Mo, No = exact_update(M, N, DM, DN, eta, solver, qr)
        assert Mb.shape == M.shape and Nb.shape == N.shape
        torch.testing.assert_close(Mb @ Nb.T, Mo @ No.T, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(Mb.T @ Mb, Nb.T @ Nb, rtol=1e-9, atol=1e-9)  # balanced, as one at a time


def test_optimizer_keeps_rank_and_resets_states():
    torch.manual_seed(0)
    cfg = model_preset("llama-tiny-lowrank-relu2", n_layers=1, vocab_size=64, rank=4)
    model = build_model(cfg)
    opt = LOROAdamW(model, lr=0.01, exact_every=3, rewarm_steps=1, d_model=cfg.d_model)
    pairs = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(pairs) == 6  # q, k, v, o, up, down
    idx = torch.randint(0, 64, (2, 16))
    before = [m.merged_weight().clone() for m in pairs]
    for step in range(3):
        opt.zero_grad()
        model(idx, idx).backward()
        opt.step()
        ks = {st["k"] for st in opt.state.values()}
        assert ks == ({step + 1} if step < 2 else {0}), (step, ks)  # the exact step (t=3) resets every moment
    for m, w0 in zip(pairs, before):
        w = m.merged_weight()
        assert torch.linalg.matrix_rank(m.weight_out.double() @ m.weight_in.double().T).item() == 4
        assert not torch.allclose(w, w0)
        # after the exact step the factors are balanced
        assert torch.allclose(m.weight_out.T @ m.weight_out, m.weight_in.T @ m.weight_in, atol=1e-4)
    assert opt.t == 3 and opt._rewarm() < 1.0
    sd = opt.state_dict()
    assert sd["param_groups"][0]["t"] == 3


def test_lazy_step_is_scaled_adam():
    torch.manual_seed(0)
    lin = LowRankLinear(8, 6, 2)
    wrap = torch.nn.Sequential(lin)
    opt = LOROAdamW(wrap, lr=0.1, exact_every=100, d_model=8)  # r/d = 0.25
    w0 = lin.weight_in.detach().clone()
    lin(torch.randn(4, 8)).sum().backward()
    g = lin.weight_in.grad.clone()
    opt.step()
    # first Adam step: m_hat/sqrt(v_hat) = sign(g) up to eps (added to the uncorrected sqrt(v)); scale r/d
    expect = w0 - 0.1 * 0.25 * g / (g.abs() + 1e-6 / (1 - 0.999) ** 0.5)  # HF-style eps, as LORO
    assert torch.allclose(lin.weight_in, expect, atol=1e-5)


def test_needs_a_low_rank_model():
    with pytest.raises(ValueError, match="low-rank"):
        LOROAdamW(build_model(model_preset("llama-tiny", n_layers=1)), d_model=128)


def _train_args(dataset, out, *extra):
    return ["train", "--preset", "llama-tiny-elas", "--optimizer", "loro_adamw", "--data", str(dataset),
            "--out", str(out), "--no-progress", *TINY, "--set", "model.rank=16", "--set", "log_every=1",
            "--set", "loro_exact_every=3", "--set", "loro_rewarm_steps=1",
            "--set", "model.act24.dense_warmup_steps=4", *extra]


def test_loro_trains_and_resumes_exactly(dataset, tmp_path):
    common = ["--max-steps", "8", "--set", "save_every=4", "--set", "eval_every=100"]
    ref = run_cli(*_train_args(dataset, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert cfg["optimizer"] == "loro_adamw" and cfg["lr"] == 0.01  # the recipe's lr for the size
    killed = run_cli(*_train_args(dataset, tmp_path / "run", *common), env={"ELAS_FAULT_AT_STEP": "5"})
    assert killed.returncode != 0
    resumed = run_cli(*_train_args(dataset, tmp_path / "run", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == list(range(1, 9)) and all(a[s] == b[s] for s in a)  # exact steps at 3 and 6 included
    assert a[8] < a[1]


def test_loro_refuses_full_rank_cli(dataset, tmp_path, capsys):
    assert main(["train", "--preset", "llama-tiny", "--optimizer", "loro_adamw", "--data", str(dataset),
                 "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "low-rank" in capsys.readouterr().err


def test_quality_grid_runs_scales_and_skips_finished(dataset, tmp_path, monkeypatch):
    from elas.train.experiment import run_grid, summarize, variant_config
    resets = []  # every run starts from an empty dynamo cache (earlier runs' graphs would count towards the
    real_reset = torch._dynamo.reset  # recompile limit of the shared code objects: a hard failure on the GPU)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset())[1])
    cfg = variant_config("llama-tiny", "elas", 400, str(dataset), tmp_path, 4, 1)
    # the paper's 10k-step recipe scaled to 400 steps: 10% lr warm-up, 10% dense warm-up, LORO K = 5%
    act = cfg.model.method("act24")
    assert (cfg.warmup_steps, act["dense_warmup_steps"], cfg.loro_exact_every) == (40, 40, 20)
    assert cfg.optimizer == "loro_adamw" and act["grad_mode"] == "ste" and act["version"] == 2
    nowarm = variant_config("llama-tiny", "elas-nowarmup", 400, str(dataset), tmp_path, 4, 1)
    assert nowarm.model.method("act24")["dense_warmup_steps"] == 0
    logs = []
    rows = run_grid("llama-tiny", ["relu2", "elas-mask"], 4, str(dataset), tmp_path, batch_size=2, grad_accum=1,
                    log=logs.append)
    assert [r["variant"] for r in rows] == ["relu2", "elas-mask"]
    assert all(r["tokens"] == 4 * 2 * 256 and r["val_loss"] > 0 for r in rows)
    assert len(resets) == 2
    run_grid("llama-tiny", ["relu2"], 4, str(dataset), tmp_path, batch_size=2, grad_accum=1, log=logs.append)
    assert "relu2: done before, skipped" in logs and len(resets) == 2
    _, md = summarize(tmp_path)
    assert "| relu2 |" in md and "| elas-mask |" in md
    assert json.loads((tmp_path / "summary.json").read_text())[0]["variant"] == "relu2"


def test_quality_grid_seeds_variant_keys_and_transfer(dataset, tmp_path):
    """Seeds (a run of each variant per seed), method keys set by a variant (absolute, after the scaling), and a
    transfer set of other text (site-packages, where the training data is standard library) with the training
    data's tokenizer; another tokenizer is refused before any run."""
    from elas.data import prepare
    from elas.train.experiment import run_grid, summarize, variant_config
    cfg = variant_config("llama-tiny", "elas+act24.dense_warmup_steps=7", 400, str(dataset), tmp_path, 4, 1, seed=1)
    assert cfg.model.method("act24")["dense_warmup_steps"] == 7 and cfg.seed == 1
    assert cfg.out_dir.endswith("elas+act24.dense_warmup_steps=7.seed1")
    with pytest.raises(ValueError, match="variant 'elas\\+act24.nope=1'.*nope"):
        variant_config("llama-tiny", "elas+act24.nope=1", 400, str(dataset), tmp_path, 4, 1)
    # a training key (the optimizer's moment dtype) goes to the run, the model stays the variant's without it
    bf16 = variant_config("llama-tiny", "lowrank-relu2+optim_state_dtype=bf16", 400, str(dataset), tmp_path, 4, 1)
    plain = variant_config("llama-tiny", "lowrank-relu2", 400, str(dataset), tmp_path, 4, 1)
    assert (bf16.optim_state_dtype, plain.optim_state_dtype) == ("bf16", "fp32") and bf16.model == plain.model
    assert bf16.out_dir.endswith("lowrank-relu2+optim_state_dtype=bf16")
    with pytest.raises(ValueError, match="optim_state_dtype='fp16'.*fp32 or bf16"):
        variant_config("llama-tiny", "lowrank-relu2+optim_state_dtype=fp16", 400, str(dataset), tmp_path, 4, 1)
    with pytest.raises(ValueError, match="'optim_state_dtyp'.*did you mean 'optim_state_dtype'"):
        variant_config("llama-tiny", "lowrank-relu2+optim_state_dtyp=bf16", 400, str(dataset), tmp_path, 4, 1)
    with pytest.raises(ValueError, match="'optim_state_dtype' given twice"):
        variant_config("llama-tiny", "lowrank-relu2+optim_state_dtype=bf16+optim_state_dtype=fp32", 400,
                       str(dataset), tmp_path, 4, 1)
    # bf16 moments need bf16 parameters, which a CPU run does not hold: refused before the first run, not at its turn
    with pytest.raises(ValueError, match="optim_state_dtype=bf16 needs bf16 parameters.*cpu"):
        run_grid("llama-tiny", ["lowrank-relu2", "lowrank-relu2+optim_state_dtype=bf16"], 2, str(dataset),
                 tmp_path / "g16", 2, 1)
    assert not (tmp_path / "g16").exists()
    quiet = dict(source="site-packages", max_mb=0.3, val_frac=0.2, log=lambda *a: None)
    other = prepare(tmp_path / "other", vocab_size=512, **quiet)
    assert other["source"] == "builtin: site-packages text only"
    with pytest.raises(ValueError, match="another tokenizer"):
        run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path / "g", 2, 1, transfer=str(tmp_path / "other"))
    assert not (tmp_path / "g").exists()
    prepare(tmp_path / "same", tokenizer=str(dataset), **quiet)
    rows = run_grid("llama-tiny", ["relu2"], 2, str(dataset), tmp_path / "g", batch_size=2, grad_accum=1,
                    seeds=(0, 1), transfer=str(tmp_path / "same"), log=lambda *a: None)
    assert [(r["run"], r["seed"]) for r in rows] == [("relu2", 0), ("relu2.seed1", 1)]
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # another seed: another initialisation and data order
    assert all(r["transfer_loss"] > 0 and r["transfer_tokens"] > 0 and 0 < r["epochs"] < 1 for r in rows)
    want_sha1 = json.loads((tmp_path / "same" / "meta.json").read_text())["val_sha1"]
    assert [r["transfer_sha1"] for r in rows] == [want_sha1] * 2  # the split the transfer loss was taken on
    _, md = summarize(tmp_path / "g")
    assert "| relu2 | adamw | 0,1 | 2 |" in md and "transfer loss" in md and "the grid's CPU time" in md  # (a CPU run)
    mean = (rows[0]["val_loss"] + rows[1]["val_loss"]) / 2
    assert f"{mean:.4f} (" in md  # the mean over the seeds, then (min-max)


def test_quality_summary_ratios_every_variant_to_its_twin(tmp_path):
    """Besides the papers' pairs, each variant (method keys included) is set against its dense twin, seed by seed."""
    from elas.train.experiment import sparse_phase_end, summarize
    assert sparse_phase_end([{"method": "act24"}, {"method": "vnm", "sparse_until": 0.3}], 1000) == 300
    assert sparse_phase_end([{"sparse_until": 1.0}, {"sparse_until": 250}], 1000) == 250
    assert sparse_phase_end([{"sparse_until": 1.0}], 1000) is None

    def row(variant, loss, seed=0, curve=None, end=None):
        run = tmp_path / (variant if seed == 0 else f"{variant}.seed{seed}")
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(
            {"variant": variant, "seed": seed, "val_loss": loss, "val_ppl": 2.0, "optimizer": "adamw", "steps": 10,
             "tokens": 100, "epochs": 0.5, "wall_s": 1.0, "val_curve": curve or {}, "sparse_end_step": end}))
    row("relu2", 2.0, curve={"5": 3.0, "10": 2.0})
    row("relu2", 2.2, seed=1)
    row("relu2-vnm-own+vnm.m=8", 2.02, curve={"5": 3.3, "10": 2.02}, end=6)  # sparse to step 6: validated at 5
    row("relu2-vnm-own+vnm.m=8", 2.244, seed=1)
    row("swiglu", 2.5)
    _, md = summarize(tmp_path)
    assert "different datasets" not in md  # rows without a fingerprint (older runs) are not flagged
    assert "- relu2-vnm-own+vnm.m=8 / relu2: val loss ratio 1.0150 (1.0100-1.0200) over seeds [0, 1]" in md
    assert "- relu2 / swiglu: val loss ratio 0.8000 over seeds [0]" in md
    assert md.count("/ relu2:") == 1  # relu2 itself has no twin
    assert "end of its sparse phase" not in md  # seed 1 has no curve: no ratio at the switch over seeds [0, 1]
    for run in ("relu2.seed1", "relu2-vnm-own+vnm.m=8.seed1"):
        s = json.loads((tmp_path / run / "summary.json").read_text())
        (tmp_path / run / "summary.json").write_text(json.dumps({**s, "val_curve": {"5": 3.0, "10": 2.0}}))
    _, md = summarize(tmp_path)
    assert ("- relu2-vnm-own+vnm.m=8 / relu2 at the end of its sparse phase (validation at step 5): val loss ratio "
            "1.0500 (1.0000-1.1000) over seeds [0, 1]") in md
    for run, sha in (("relu2", "a" * 40), ("swiglu", "b" * 40)):  # rows from two preparations of the data
        s = json.loads((tmp_path / run / "summary.json").read_text())
        (tmp_path / run / "summary.json").write_text(json.dumps({**s, "data_sha1": sha}))
    _, md = summarize(tmp_path)
    assert "the runs trained on 2 different datasets** (train.bin SHA-1 aaaaaaaaaaaa, bbbbbbbbbbbb)" in md


def test_quality_summary_spread_is_over_the_paired_seeds(tmp_path):
    """A ratio's seed spread covers the seeds it pairs: a seed of one variant that its twin lacks (and whose row
    has no transfer loss: run before --transfer-data was given) is neither counted nor a crash at summary time."""
    from elas.train.experiment import summarize
    for variant, seed, loss, transfer in (("relu2", 0, 2.0, 3.0), ("relu2", 1, 2.2, 3.3), ("relu2", 2, 9.0, None),
                                          ("relu2-24", 0, 2.02, 3.03), ("relu2-24", 1, 2.2, 3.3)):
        run = tmp_path / (variant if seed == 0 else f"{variant}.seed{seed}")
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(
            {"variant": variant, "seed": seed, "val_loss": loss, "val_ppl": 2.0, "optimizer": "adamw", "steps": 10,
             "tokens": 100, "epochs": 0.5, "wall_s": 1.0, **({"transfer_loss": transfer} if transfer else {})}))
    _, md = summarize(tmp_path)
    assert "- relu2-24 / relu2: val loss ratio 1.0050 (1.0000-1.0100) over seeds [0, 1]; seed spread of the val " \
           "loss: relu2-24 0.1800, relu2 0.2000" in md
    assert "different transfer sets" not in md  # (rows without a transfer SHA-1: from before it was recorded)
    for run, sha1 in (("relu2", "a" * 40), ("relu2-24", "b" * 40)):
        row = json.loads((tmp_path / run / "summary.json").read_text())
        (tmp_path / run / "summary.json").write_text(json.dumps({**row, "transfer_sha1": sha1}))
    _, md = summarize(tmp_path)
    assert "**the transfer losses were taken on 2 different transfer sets** (val.bin SHA-1 aaaaaaaaaaaa, " \
           "bbbbbbbbbbbb)" in md
    assert "- relu2-24 / relu2: transfer loss ratio 1.0050 (1.0000-1.0100) over seeds [0, 1]; seed spread of the " \
           "transfer loss: relu2-24 0.2700, relu2 0.3000" in md


def test_summary_pairs_only_runs_of_one_budget(tmp_path):
    """A grid folder re-used with another --steps for other variants (or seeds) holds runs of several budgets:
    the grid refuses a run directory of other settings, not a folder. The summary says so, and a ratio (and the
    curves' ratio) pairs only runs of the same size, steps and tokens: a 2-step run against a 4-step one is no
    comparison."""
    from elas.train import experiment
    for run, variant, seed, steps, loss in (("relu2", "relu2", 0, 2, 2.0), ("relu2.seed1", "relu2", 1, 2, 2.2),
                                            ("relu2-24", "relu2-24", 0, 2, 2.02),
                                            ("relu2-24.seed1", "relu2-24", 1, 4, 1.1), ("swiglu", "swiglu", 0, 4, 1.0)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "summary.json").write_text(json.dumps(
            {"model": "llama-tiny", "variant": variant, "seed": seed, "val_loss": loss, "val_ppl": 2.0,
             "optimizer": "adamw", "steps": steps, "tokens": steps * 512, "epochs": 0.5, "wall_s": 1.0,
             "val_curve": {"1": loss + 1, "2": loss}}))
    _, md = experiment.summarize(tmp_path)
    assert "- relu2-24 / relu2: val loss ratio 1.0100 over seeds [0]" in md  # not seed 1: 4 steps against 2
    assert "relu2 / swiglu" not in md
    assert "- **the runs have 2 different budgets** (llama-tiny: 2 steps, 1,024 tokens; llama-tiny: 4 steps, " \
           "2,048 tokens): ratios pair only runs of the same budget" in md
    by = experiment.grid_curves(tmp_path)
    assert by["relu2-24"]["base"] == "relu2" and by["relu2-24"]["base_seeds"] == [0]
    assert by["relu2"]["base"] is None  # its pair (relu2 / swiglu) shares no budget


def test_summary_counts_a_shared_gpus_runs_at_their_share(tmp_path, monkeypatch):
    """Runs made two at a time on one GPU (run_gpu.sh's GRID_PARALLEL=2 sets ELAS_GRID_SHARED) record it; the
    summary's GPU time counts each at its wall over the number sharing, and says so, beside the walls' sum."""
    from elas.train.experiment import gpu_shared_by, summarize
    monkeypatch.setenv("ELAS_GRID_SHARED", "2")
    assert gpu_shared_by() == 2
    monkeypatch.setenv("ELAS_GRID_SHARED", "x")
    assert gpu_shared_by() == 1
    for variant, wall, shared in (("relu2", 600.0, 2), ("relu2-24", 600.0, 2), ("swiglu", 300.0, None)):
        run = tmp_path / variant
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(
            {"variant": variant, "seed": 0, "val_loss": 2.0, "val_ppl": 2.0, "optimizer": "adamw", "steps": 10,
             "tokens": 100, "epochs": 0.5, "wall_s": wall, **({"gpu_shared_by": shared} if shared else {})}))
    _, md = summarize(tmp_path)
    assert "- the grid's GPU time: ~15.0 min over 3 runs (2 of them shared the GPU" in md
    assert "the walls sum to 25.0 min" in md


def test_auto_solver_by_core_size():
    """auto: gesvda for the cores of the 60M-350M models on CUDA, eigh from the 1B model's 1024 x 1024 cores on
    (as fast or faster there, and it converges where gesvda does not), torch's default driver off CUDA."""
    from elas.optim.loro import auto_solver
    assert [auto_solver(2 * r, True) for r in (128, 256, 512, 1024)] == ["gesvda", "gesvda", "eigh", "eigh"]
    assert auto_solver(2048, False) == "svd"


@pytest.mark.gpu
def test_gpu_exact_step_default_solver_matches_fp64():
    g = torch.Generator().manual_seed(0)
    M, N, G = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((512, 64), (2048, 64), (512, 2048)))
    want = exact_update(M, N, G @ N, G.T @ M, 1e-2, solver="svd")
    got = exact_update(*(t.float().cuda() for t in (M, N, G @ N, G.T @ M)), 1e-2)  # auto: gesvda (2r = 128)
    w_want, w_got = want[0] @ want[1].T, (got[0] @ got[1].T).double().cpu()
    assert ((w_got - w_want).norm() / w_want.norm()).item() < 1e-4


def test_batched_step_equals_per_parameter_adam():
    """The foreach-batched lazy step, against per-parameter AdamW arithmetic written out (weight decay on the
    matrices; none on the norm gains, as build_optimizer's AdamW)."""
    torch.manual_seed(0)
    cfg = model_preset("llama-tiny-lowrank-relu2", n_layers=1, vocab_size=64, rank=4)
    model = build_model(cfg)
    opt = LOROAdamW(model, lr=0.01, exact_every=100, weight_decay=0.1, d_model=cfg.d_model)
    factors = {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.weight_in, m.weight_out)}
    want = {id(p): p.detach().clone() for p in model.parameters()}
    moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in model.parameters()}
    for k in range(1, 4):
        idx = torch.randint(0, 64, (2, 16))
        opt.zero_grad()
        model(idx, idx).backward()
        for p in model.parameters():
            m, v = moments[id(p)]
            m.mul_(0.9).add_(p.grad, alpha=0.1)
            v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
            corr = (1 - 0.999 ** k) ** 0.5 / (1 - 0.9 ** k)
            scale = cfg.rank / cfg.d_model if id(p) in factors else 1.0
            if p.dim() >= 2:
                want[id(p)].mul_(1 - 0.01 * 0.1)
            want[id(p)].add_(m / (v.sqrt() + 1e-6), alpha=-0.01 * corr * scale)
        opt.step()
        for p in model.parameters():
            assert torch.equal(p, want[id(p)])
    assert any(p.dim() < 2 for p in model.parameters())  # (the norms' rule was exercised)


def _sharded_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from elas.optim.loro import exact_update_sharded
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        got = exact_update_sharded(_pairs_for_sharding())
        if rank == 0:
            torch.save([(M.clone(), N.clone()) for M, N in got], out)
    finally:
        dist.destroy_process_group()


def _pairs_for_sharding():
    g = torch.Generator().manual_seed(1)
    pairs = []
    for k, (m, n, r) in enumerate([(30, 20, 4)] * 3 + [(20, 30, 4)] * 2 + [(16, 16, 2)]):
        M, N = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
        DM, DN = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
        pairs.append((M, N, DM, DN, 0.05 * (k + 1)))
    return pairs


@pytest.mark.parametrize("world", [2, 3])
def test_exact_step_sharded_over_processes_equals_one_process(tmp_path, world):
    """Under torch.distributed (gloo, CPU) each rank computes its share of the pairs and broadcasts it: every
    rank ends with the one-process result (fp64, to rounding), including shapes with fewer pairs than ranks."""
    import torch.multiprocessing as mp

    from elas.optim.loro import exact_update_batched
    out = tmp_path / "sharded.pt"
    mp.spawn(_sharded_worker, args=(world, f"file://{tmp_path / 'store'}", str(out)), nprocs=world, join=True)
    want = exact_update_batched(_pairs_for_sharding())
    got = torch.load(out)
    assert len(got) == len(want)
    for (Mg, Ng), (Mw, Nw) in zip(got, want):
        torch.testing.assert_close(Mg, Mw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Ng, Nw, rtol=1e-12, atol=1e-12)


def test_activation_stats_plot_draws_each_variant_and_skips_grids_without_statistics(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from elas.train import experiment

    def run(name, stats):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s, "loss": 3.0, **({"y2_zero_frac/mean": 0.5 + s / 100, "dropped_nnz_frac/mean": 0.3}
                                             if stats else {})} for s in (10, 20)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("relu2", False)
    assert not experiment.plot_stats(tmp_path, tmp_path / "a.png")  # a dense grid logs none: no plot
    run("elas", True)
    run("elas.seed1", True)
    drawn = []
    import matplotlib.axes
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: (drawn.append(k.get("label")),
                                                                           plot(ax, *a, **k))[1])
    assert experiment.plot_stats(tmp_path, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 0
    assert drawn == ["elas", "elas", None, None]  # two panels; the second seed shares the variant's legend entry


def test_grid_curves_pair_seeds_with_the_summarys_base_and_plot(tmp_path):
    """The grid's curves: finished runs only (a summary.json names variant and seed, as for the summary), a
    variant's mean over its seeds at the steps all of them validated at, its base the summary's first comparison
    that shares a seed and a step with it (elas -> lowrank-relu2; a key variant -> its twin), its ratio taken seed
    by seed like the summary's; an empty grid draws nothing."""
    from elas.train import experiment
    assert not experiment.plot_curves(tmp_path, tmp_path / "c.png")

    def run(name, variant, seed, curve, finished=True, root=tmp_path):
        d = root / name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0, "val_loss": v}) + "\n"
                                                 for s, v in curve.items()))
        if finished:
            (d / "summary.json").write_text(json.dumps({"variant": variant, "seed": seed}))
    run("lowrank-relu2", "lowrank-relu2", 0, {100: 4.0, 200: 2.0})
    run("lowrank-relu2.seed1", "lowrank-relu2", 1, {100: 5.0, 200: 2.5})
    run("elas", "elas", 0, {100: 4.4, 200: 2.2, 300: 2.1})       # seed 0: 1.1x its base
    run("elas.seed1", "elas", 1, {100: 6.0, 200: 2.5})           # seed 1: 1.2x, then 1.0x; no step 300
    run("elas.seed2", "elas", 2, {100: 1.0}, finished=False)     # still running: not counted, as in the summary
    run("elas+act24.dense_warmup_steps=20", "elas+act24.dense_warmup_steps=20", 0, {100: 4.0, 200: 1.0})
    by = experiment.grid_curves(tmp_path)
    assert by["lowrank-relu2"]["base"] is None and by["lowrank-relu2"]["mean"] == {100: 4.5, 200: 2.25}
    assert by["elas"]["seeds"] == [0, 1] and by["elas"]["base"] == "lowrank-relu2"
    assert by["elas"]["mean"] == pytest.approx({100: 5.2, 200: 2.35})  # step 300: seed 0 only, left out
    assert by["elas"]["ratio"] == pytest.approx({100: (1.1 + 1.2) / 2, 200: (1.1 + 1.0) / 2})
    key = by["elas+act24.dense_warmup_steps=20"]  # seed 0 only: against seed 0 of the base
    assert key["base"] == "lowrank-relu2" and key["base_seeds"] == [0]
    assert key["ratio"] == pytest.approx({100: 1.0, 200: 0.5})
    if importlib.util.find_spec("matplotlib"):
        assert experiment.plot_curves(tmp_path, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0
    # a first comparison without a shared seed gives way to the next one, as in the summary: elas-nowarmup's
    # seed 1 has no lowrank-relu2 seed 1 here, so its base is elas (the warm-up ablation)
    other = tmp_path / "other"
    run("lowrank-relu2", "lowrank-relu2", 0, {100: 4.0}, root=other)
    run("elas.seed1", "elas", 1, {100: 5.0}, root=other)
    run("elas-nowarmup.seed1", "elas-nowarmup", 1, {100: 4.0}, root=other)
    nowarm = experiment.grid_curves(other)["elas-nowarmup"]
    assert nowarm["base"] == "elas" and nowarm["ratio"] == pytest.approx({100: 0.8})


def test_default_grid_is_the_issues_comparisons_and_every_variant_configures(tmp_path):
    from elas.train.experiment import grid_variants, variant_config
    names = grid_variants(2000)
    assert {"swiglu", "relu2", "relu2-24", "lowrank-relu2", "elas", "elas-nowarmup", "elas-mask"} <= set(names)
    warm = {}
    for v in names:
        cfg = variant_config("llama-60m", v, 2000, "data", tmp_path, 512, 1)
        for m in cfg.model.methods:
            if m["method"] == "act24" and v.startswith("elas"):
                warm[v] = m["dense_warmup_steps"]
    # the warm-up ablation: 0, 1% and 10% of the run (the paper's 0, 100 and 1000 of 10k steps)
    assert sorted(warm.values()) == [0, 20, 200, 200] and warm["elas+act24.dense_warmup_steps=20"] == 20


def test_the_committed_60m_grid_resumes_under_todays_variants():
    """docs/results/grid-60m is where the next calls of the grid start from (GRID_FROM): every run in it must
    resolve to the model its name means today, or the grid refuses to continue (a changed default renames the
    run it changed, as relu2-24 -> relu2-24-split)."""
    from pathlib import Path

    from elas.train.experiment import check_same_runs, grid_variants, variant_config
    grid = Path(__file__).parents[1] / "docs" / "results" / "grid-60m"

    def variant_seed(run: str) -> tuple[str, int]:  # experiment.run_name's inverse: "<variant>[.seed<n>]"
        head, _, tail = run.rpartition(".seed")
        return (head, int(tail)) if head and tail.isdigit() else (run, 0)
    runs = {variant_seed(p.name) for p in grid.iterdir() if (p / "config.json").is_file()}
    names = sorted({(v, 0) for v in grid_variants(2000)} | runs)
    assert {("relu2-24-split", 0), ("relu2", 0), ("elas", 0), ("elas-mask", 1)} <= runs
    check_same_runs([variant_config("llama-60m", v, 2000, "data/sp-32k", grid, 512, 1, seed=seed)
                     for v, seed in names])
    split = [m for m in variant_config("llama-60m", "relu2-24-split", 2000, "d", grid, 512, 1).model.methods]
    plain = [m for m in variant_config("llama-60m", "relu2-24", 2000, "d", grid, 512, 1).model.methods]
    assert split[0]["wgrad_dense_frac"] == 0.05 and split[0]["permute_tokens"] is True
    assert plain[0].get("wgrad_dense_frac") is None and not plain[0].get("permute_tokens", False)


def test_committed_results_name_no_path_of_the_machine_that_made_them():
    """A run's config.json records its data directory absolute (so eval and --resume work from anywhere); a run
    committed under docs/results or benchmarks/results must have it made relative again, and no committed result
    may carry another absolute path of the machine it ran on."""
    import re
    from pathlib import Path
    root = Path(__file__).parents[1]
    bad = []
    for folder in ("docs/results", "benchmarks/results"):
        for f in (root / folder).rglob("*"):
            if f.suffix in (".json", ".jsonl", ".md", ".log", ".txt") and f.is_file():
                # (anywhere in the text, a command's --out as much as a whole value)
                for m in re.finditer(r'(?<![\w$.~-])/(?:work|root|home|tmp|mnt|Users)/[^\s"\'`]*',
                                     f.read_text(errors="replace")):
                    bad.append(f"{f.relative_to(root)}: {m.group(0)}")
    assert not bad, bad[:5]


def test_summary_compares_the_warmup_ablation_with_elas_and_a_keyed_variant_with_its_base(tmp_path):
    from elas.train.experiment import summarize
    for variant, loss in (("lowrank-relu2", 2.0), ("elas", 2.02), ("elas-nowarmup", 2.06),
                          ("elas+act24.dense_warmup_steps=20", 2.04)):
        run = tmp_path / variant
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(
            {"variant": variant, "seed": 0, "val_loss": loss, "val_ppl": 2.0, "optimizer": "loro_adamw",
             "steps": 10, "tokens": 100, "epochs": 0.5, "wall_s": 1.0}))
    _, md = summarize(tmp_path)
    assert "- elas-nowarmup / elas: val loss ratio 1.0198 over seeds [0]" in md
    assert "- elas+act24.dense_warmup_steps=20 / elas: val loss ratio 1.0099 over seeds [0]" in md
    assert "- elas+act24.dense_warmup_steps=20 / lowrank-relu2: val loss ratio 1.0200 over seeds [0]" in md
    assert "/ elas-nowarmup" not in md and "- elas / elas:" not in md


def test_grid_with_time_left_starts_only_the_runs_that_fit(dataset, tmp_path, monkeypatch, capsys):
    """run_grid(time_left=...) / `elas experiment --time-left`: a run whose estimate (its seed-0 run's GPU time,
    times the processes sharing the GPU) does not fit in what is left is not started, with one line and a closing
    one; one that fits runs. A non-positive budget is refused."""
    import json

    from elas import cli
    from elas.train.experiment import run_grid
    out = tmp_path / "grid"
    (out / "relu2").mkdir(parents=True)
    (out / "relu2" / "summary.json").write_text(json.dumps({"wall_s": 600.0, "gpu_shared_by": 2}))  # 300 GPU-s
    logs = []
    grid = dict(batch_size=2, grad_accum=1, seeds=(1,), log=logs.append)
    assert run_grid("llama-tiny", ["relu2"], 2, str(dataset), out, time_left=299.0, **grid) == []
    assert any(line.startswith("relu2.seed1: not started: needs ~300 s, 299 s left") for line in logs), logs
    assert logs[-1] == "1 run(s) not started, left for a later call (--time-left): relu2.seed1"
    assert not (out / "relu2.seed1" / "checkpoints").exists()
    monkeypatch.setenv("ELAS_GRID_SHARED", "2")  # two processes on the GPU: its wall is twice its GPU time
    assert run_grid("llama-tiny", ["relu2"], 2, str(dataset), out, time_left=599.0, **grid) == []
    assert "needs ~600 s" in logs[-2]
    monkeypatch.delenv("ELAS_GRID_SHARED")
    # a fresh grid has no run to go by; estimates from another grid (scaled_estimates) stand in
    fresh = tmp_path / "fresh"
    assert run_grid("llama-tiny", ["relu2"], 2, str(dataset), fresh, time_left=500.0, estimates={"relu2": 1000.0},
                    **grid) == []
    assert logs[-2].startswith("relu2.seed1: not started: needs ~1000 s, ")
    (row,) = run_grid("llama-tiny", ["relu2"], 2, str(dataset), out, time_left=301.0, **grid)
    assert row["run"] == "relu2.seed1" and row["val_loss"] > 0
    assert cli.main(["experiment", "--out", str(out), "--data", str(dataset), "--time-left", "0"]) == 2
    assert "invalid --time-left 0.0: expected a positive number of seconds" in capsys.readouterr().err


def test_grid_plan_says_what_is_left_and_its_gpu_time(tmp_path, capsys):
    """`elas experiment --plan` (experiment.grid_plan): runs done (a summary.json), partial (checkpoints: the steps
    left scale the estimate) and to do, each estimated from its own seed-0 run's GPU time (a wall shared by two
    processes counts half), else the median of the done runs; nothing runs, and the variants left print as the
    flags that run them."""
    import json

    from elas import cli
    from elas.train.experiment import grid_plan
    out = tmp_path / "grid"
    for name, wall, shared in (("relu2", 600.0, 2), ("elas", 200.0, None)):
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(json.dumps({"wall_s": wall, "gpu_shared_by": shared}))
    (out / "relu2.seed1" / "checkpoints" / "step-00000500").mkdir(parents=True)
    rows = {r["run"]: r for r in grid_plan(["relu2", "elas", "swiglu"], [0, 1], out, 2000)}
    assert rows["relu2"]["state"] == "done" and rows["relu2"]["gpu_s_left"] is None
    assert (rows["relu2.seed1"]["state"], rows["relu2.seed1"]["step"]) == ("partial", 500)
    assert rows["relu2.seed1"]["gpu_s_left"] == 300.0 * 0.75  # its seed 0: 600 s shared by two
    assert rows["elas.seed1"]["gpu_s_left"] == 200.0
    assert rows["swiglu"]["gpu_s_left"] == 250.0  # no run of its own: the median of 300 and 200
    assert cli.main(["experiment", "--plan", "--out", str(out), "--variants", "relu2,elas,swiglu", "--seeds", "0,1",
                     "--data", str(tmp_path / "nodata")]) == 0
    text = capsys.readouterr().out
    assert "2 of 6 runs done; 4 to run, ~15 GPU-min" in text  # 225 + 200 + 250 + 250 s
    assert f"seed 1: elas experiment --size llama-60m --steps 2000 --batch-size 256 --grad-accum 2 --data " \
           f"{tmp_path / 'nodata'} --out {out} --seeds 1 --variants relu2,elas,swiglu" in text
    assert not (tmp_path / "nodata").exists()
    # a run kept with other settings (here another --steps): the grid would refuse it, and the plan says so
    from elas.config import to_dict
    from elas.train.experiment import variant_config
    cfg = variant_config("llama-60m", "swiglu", 1000, str(tmp_path / "nodata"), out, 256, 2)
    (out / "swiglu").mkdir()
    (out / "swiglu" / "config.json").write_text(json.dumps(to_dict(cfg)))
    (out / "swiglu" / "summary.json").write_text(json.dumps({"wall_s": 100.0}))
    assert cli.main(["experiment", "--plan", "--out", str(out), "--variants", "relu2,elas,swiglu", "--seeds", "0",
                     "--data", str(tmp_path / "nodata")]) == 0
    text = capsys.readouterr().out
    assert "swiglu" in text and "other settings" in text and "max_steps 1000 -> 2000" in text
    assert "--variants relu2" not in text and "--variants swiglu" not in text  # nothing of seed 0 left to run here
    # runs done on a CPU: their times are CPU time, and the plan says so (was "GPU-min" whatever the machine)
    cpu = tmp_path / "cpu-grid"
    (cpu / "relu2").mkdir(parents=True)
    (cpu / "relu2" / "summary.json").write_text(json.dumps({"wall_s": 120.0, "device": "cpu"}))
    assert cli.main(["experiment", "--plan", "--out", str(cpu), "--variants", "relu2,elas", "--seeds", "0",
                     "--data", str(tmp_path / "nodata")]) == 0
    text = capsys.readouterr().out
    assert "1 of 2 runs done; 1 to run, ~2 CPU-min" in text and "(CPU time" in text and "GPU" not in text
    (cpu / "elas.seed1").mkdir()
    (cpu / "elas.seed1" / "summary.json").write_text(json.dumps({"wall_s": 60.0, "device": "cuda"}))
    assert cli.main(["experiment", "--plan", "--out", str(cpu), "--variants", "relu2,elas", "--seeds", "0",
                     "--data", str(tmp_path / "nodata")]) == 0
    text = capsys.readouterr().out
    assert "(CPU and GPU time" in text and "CPU-min" not in text and "GPU-min" not in text
    # only the runs the estimates come from count: a run of another size here is not one of them
    (cpu / "elas.seed1" / "summary.json").write_text(json.dumps({"wall_s": 60.0, "device": "cuda",
                                                                  "model": "llama-1b"}))
    assert cli.main(["experiment", "--plan", "--out", str(cpu), "--variants", "relu2,elas", "--seeds", "0",
                     "--data", str(tmp_path / "nodata")]) == 0
    assert "~2 CPU-min" in capsys.readouterr().out


def test_estimates_from_another_grid_scale_by_training_flops(tmp_path, capsys):
    """`--estimate-from` (experiment.scaled_estimates): another grid's runs, their GPU time scaled by training FLOPs
    (per token at each size x tokens), per variant (the longest of its seeds, whatever the folder's name); the same
    size and tokens give the GPU time itself, twice the steps twice it, a larger size more by its FLOPs per token;
    a summary without size, variant or tokens is skipped. Runs done here calibrate the estimates and keep their own
    times (with_estimates); the flag is refused in one line where it would do nothing."""
    import json

    from elas import cli
    from elas.summary import model_summary
    from elas.train.experiment import grid_plan, scaled_estimates, variant_config, with_estimates
    other = tmp_path / "grid-60m"
    tokens = 2000 * 256 * 2 * 256
    for name, row in (("relu2", {"variant": "relu2", "seed": 0, "wall_s": 600.0, "gpu_shared_by": 2}),
                      ("relu2.seed1", {"variant": "relu2", "seed": 1, "wall_s": 320.0}),  # the longer seed counts
                      ("elas.seed1", {"variant": "elas", "seed": 1, "wall_s": 100.0}),
                      ("renamed", {"variant": "swiglu", "seed": 0, "wall_s": 200.0}),
                      ("old", {"wall_s": 50.0})):  # (no size, variant or tokens: skipped)
        (other / name).mkdir(parents=True)
        if "variant" in row:
            row.update(model="llama-60m", tokens=tokens)
        (other / name / "summary.json").write_text(json.dumps(row))
    same = scaled_estimates(other, "llama-60m", 2000, 256, 2)
    assert same == pytest.approx({"relu2": 320.0, "elas": 100.0, "swiglu": 200.0})
    assert scaled_estimates(other, "llama-60m", 4000, 256, 2) == pytest.approx({k: 2 * v for k, v in same.items()})
    flops = {size: model_summary(variant_config(size, "relu2", 2000, "d", tmp_path, 256, 2).model)
             ["train_flops_per_token"] for size in ("llama-60m", "llama-130m")}
    assert flops["llama-130m"] > 2 * flops["llama-60m"]
    big = scaled_estimates(other, "llama-130m", 2000, 256, 2)
    assert big["relu2"] == pytest.approx(320.0 * flops["llama-130m"] / flops["llama-60m"])
    assert with_estimates({}, big) == big and with_estimates({"x": 1.0}, None) == {"x": 1.0}
    # relu2 done here in half its estimate: the other estimates are halved too, and relu2 keeps its own time
    out = tmp_path / "grid-130m"
    (out / "relu2").mkdir(parents=True)
    (out / "relu2" / "summary.json").write_text(json.dumps({"wall_s": big["relu2"] / 2}))
    rows = {r["run"]: r for r in grid_plan(["relu2", "elas"], [0, 1], out, 2000, estimates=big)}
    assert rows["relu2.seed1"]["gpu_s_left"] == pytest.approx(big["relu2"] / 2)
    assert rows["elas"]["gpu_s_left"] == pytest.approx(big["elas"] / 2)
    assert cli.main(["experiment", "--plan", "--size", "llama-130m", "--out", str(out), "--variants", "elas",
                     "--data", str(tmp_path / "nodata"), "--estimate-from", str(other)]) == 0
    assert f"~{big['elas'] / 2 / 60:.1f} GPU-min" in capsys.readouterr().out
    for flags, message in (([], "--estimate-from estimates the runs of --plan or --time-left"),
                           (["--plan", "--estimate-from", str(tmp_path / "none")], "holds no finished run")):
        args = ["experiment", "--out", str(out), "--data", str(tmp_path / "nodata"), *flags]
        assert cli.main(args + ([] if "--estimate-from" in flags else ["--estimate-from", str(other)])) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "nodata").exists()


def test_a_grid_stopped_by_a_signal_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """Ctrl-C or a scheduler's SIGTERM during `elas experiment`: the run in progress has saved its checkpoint (the
    trainer's TrainStopped), so the grid exits with 128 + the signal and says that the same command continues."""
    from pathlib import Path
    from elas import cli
    from elas.train import experiment
    from elas.train.trainer import TrainStopped

    def stopped(*a, **k):
        raise TrainStopped(2, 7, Path(tmp_path / "grid" / "relu2"))
    monkeypatch.setattr(experiment, "run_grid", stopped)
    monkeypatch.setattr(cli, "BUILTIN_DATA", {})
    assert cli.main(["experiment", "--size", "llama-tiny", "--variants", "relu2", "--steps", "4",
                     "--data", str(tmp_path / "data"), "--out", str(tmp_path / "grid")]) == 130
    err = capsys.readouterr().err
    assert "stopped by signal 2" in err and "the same command continues the grid" in err and "error" not in err


def test_a_grid_run_that_resolved_auto_kernels_is_the_same_run(tmp_path):
    """A variant that asks for a kernel key's "auto" records what it resolved to (config.json): running the grid
    again must not see that as another setting; another explicit value is one."""
    from elas.config import to_dict
    from elas.train.experiment import other_settings, variant_config
    for key, resolved in (("attn_backend", "triton"), ("norm_kernel", "fused"), ("relu2_kernel", "cutlass"),
                          ("ce_kernel", "triton")):
        cfg = variant_config("llama-60m", f"lowrank-relu2+{key}=auto", 2000, "d", tmp_path / key, 512, 1)
        run = tmp_path / key / f"lowrank-relu2+{key}=auto"
        assert cfg.out_dir == str(run)
        run.mkdir(parents=True)
        saved = to_dict(cfg)
        saved["model"][key] = resolved  # what the trainer wrote
        (run / "config.json").write_text(json.dumps(saved))
        (run / "summary.json").write_text("{}")
        assert other_settings(cfg) == [], key
        setattr(cfg.model, key, "torch")
        assert other_settings(cfg) == [f"model.{key} {resolved!r} -> 'torch'"], key


@pytest.mark.parametrize("optimizer", ["adamw", "loro_adamw"])
def test_a_resume_takes_the_changed_weight_decay_and_betas_it_announces(dataset, tmp_path, capsys, optimizer):
    """torch's load_state_dict takes the checkpoint's groups whole: a resume with another weight_decay or betas
    (announced, and written to config.json) kept the old ones. The groups' settings are this run's; their
    state (moments, step counts) the checkpoint's."""
    from elas.cli import build_parser, resolve_train_config
    from elas.train import Trainer
    out = tmp_path / "run"
    extra = ["--optimizer", optimizer] if optimizer == "loro_adamw" else []
    base = ["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), "--no-progress", *TINY,
            "--set", "model.rank=16", "--set", "eval_every=100", *extra]
    assert main([*base, "--max-steps", "2"]) == 0
    cfg = resolve_train_config(build_parser().parse_args(
        [*base, "--max-steps", "4", "--resume", "--set", "weight_decay=0.1", "--set", "beta2=0.95"]))
    t = Trainer(cfg, resume=True, progress=False, log=lambda *a: None)
    try:
        groups = t.optimizer.param_groups
        assert max(g["weight_decay"] for g in groups) == 0.1 and all(g["betas"] == (0.9, 0.95) for g in groups)
        if optimizer == "adamw":  # (the norms' group stays without decay)
            assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
        else:
            assert t.optimizer.t == 2  # the state is the checkpoint's
    finally:
        t.close()
    capsys.readouterr()
    assert main([*base, "--max-steps", "4", "--resume", "--optimizer",
                 "adamw" if optimizer == "loro_adamw" else "loro_adamw"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"was trained with optimizer={optimizer}" in err and "corrupt" not in err and "\n" not in err, err


def test_both_optimizers_decay_matrices_and_not_norm_gains():
    """The same weight_decay means the same under adamw and loro_adamw: matrices decay, the norms' gains (and any
    other vector) do not. One step on zero gradients moves a weight by its decay alone."""
    from elas.config import TrainConfig
    from elas.optim import build_optimizer
    mcfg = model_preset("llama-tiny-lowrank-relu2", n_layers=1, vocab_size=64, rank=4)
    for name in ("adamw", "loro_adamw"):
        torch.manual_seed(0)
        model = build_model(mcfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, TrainConfig(model=mcfg, optimizer=name, weight_decay=0.1, lr=0.1,
                                                 loro_exact_every=100))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in model.named_parameters():
            if p.dim() < 2:
                assert torch.equal(p.detach(), before[n]), (name, n)
            elif name == "adamw" or not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), LowRankLinear):
                torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.1), msg=f"{name} {n}")


@pytest.mark.parametrize("kind", ["loro", "master"])
def test_step_runs_a_closure_with_gradients_on(kind):
    """torch's contract: step(closure) runs the closure with autograd on (it computes the loss and its
    gradients); under the step's no_grad it could not."""
    from elas.optim import MasterAdamW
    torch.manual_seed(0)
    lin = LowRankLinear(8, 6, 2)
    if kind == "loro":
        opt = LOROAdamW(torch.nn.Sequential(lin), lr=0.1, exact_every=100, d_model=8)
    else:
        lin.to(torch.bfloat16)
        opt = MasterAdamW(lin.parameters(), lr=0.1, backend="reference")
    x, before = torch.randn(4, 8), lin.weight_in.detach().clone()

    def closure():
        opt.zero_grad()
        loss = lin(x.to(lin.weight_in.dtype)).float().pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and not torch.equal(lin.weight_in.detach(), before)


@pytest.mark.parametrize("kw, name", [({"lr": -0.1}, "lr=-0.1"), ({"betas": (1.0, 0.999)}, "betas"),
                                      ({"betas": (0.9, 1.5)}, "betas"), ({"eps": -1.0}, "eps"),
                                      ({"weight_decay": -0.1}, "weight_decay")])
@pytest.mark.parametrize("kind", ["loro", "master"])
def test_optimizers_refuse_bad_settings_in_one_line(kind, kw, name):
    from elas.optim import MasterAdamW
    with pytest.raises(ValueError, match=name):
        if kind == "loro":
            LOROAdamW(torch.nn.Sequential(LowRankLinear(8, 6, 2)), exact_every=100, d_model=8, **kw)
        else:
            MasterAdamW([torch.nn.Parameter(torch.randn(8).bfloat16())], **kw)


def test_loro_refuses_a_zero_width_or_negative_rewarm():
    with pytest.raises(ValueError, match="d_model=0"):
        LOROAdamW(torch.nn.Sequential(LowRankLinear(8, 6, 2)), exact_every=100, d_model=0)
    with pytest.raises(ValueError, match="rewarm_steps=-1"):
        LOROAdamW(torch.nn.Sequential(LowRankLinear(8, 6, 2)), exact_every=100, d_model=8, rewarm_steps=-1)


def test_plot_keeps_a_run_whose_losses_all_lie_above_the_cut(tmp_path, monkeypatch):
    """elas plot cuts the training-loss panel at 8 (the first steps' losses would flatten the rest) only where every
    run has losses below 8: a short run whose losses all lie above would vanish while the legend still named it."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from elas.train.experiment import plot_runs
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: drawn.append(self))
    for name, ys in (("low", [9.0, 7.0, 5.0]), ("high", [9.0, 8.6, 8.4])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss": y}) + "\n" for i, y in enumerate(ys)))
    assert plot_runs([tmp_path / "low", tmp_path / "high"], tmp_path / "both.png")
    assert plot_runs([tmp_path / "low"], tmp_path / "low.png")
    both, low = (next(ax for ax in f.axes if ax.get_title() == "training loss") for f in drawn)
    assert both.get_ylim()[1] >= 9.0 and low.get_ylim()[1] == 8.0
