"""2:4 weights by soft-thresholding (S-STE): the threshold, the frozen scale, the straight-through gradient, the
dense -> sparse -> dense schedule, the combination with 2:4 activations, compile, exact resume across the switches."""
import importlib.util
import pytest
import torch
import torch.nn.functional as F

from elas.build import build_model
from elas.config import model_preset
from elas.kernels import reference as ref
from elas.kernels import ops
from elas.model import ReLU2FFN
from elas.sparsity import (Act24Config, SSTE24Config, SSTELinear, applied_methods, collect_stats, set_step,
                           sparsify_)

from conftest import TINY, run_cli


def test_soft_threshold_is_the_second_smallest_magnitude():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 4.0, 4.0, 1.0, 1.0, 0.0, 0.0, 0.0, -2.0]])
    s, mask = ref.soft_threshold24(w)
    # groups: t = 1 (of 0.5, 1, 2, 3); t = 1 (of 1, 1, 4, 4); t = 0 (of 0, 0, 0, 2)
    assert s.tolist() == [[0.0, -2.0, 1.0, 0.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0]]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g, dtype=torch.float64)
    s, mask = ref.soft_threshold24(w)
    a = w.abs().view(64, 32, 4)
    t = a.sort(-1).values[..., 1:2]  # the 2nd smallest, by sorting
    assert torch.equal(s.view(64, 32, 4), torch.sign(w).view(64, 32, 4) * (a - t).clamp(min=0))
    assert ((s != 0) <= mask).all() and (mask.view(64, 32, 4).sum(-1) == 2).all()  # at most the 2 kept survive


def _ffn(**cfg):
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(16, 64).double()
    sparsify_(f, SSTE24Config(**cfg))
    return f


def test_scale_is_frozen_at_the_first_sparse_step_and_saved():
    f = _ffn(dense_warmup_steps=2, sparse_until=6)
    assert isinstance(f.up, SSTELinear) and f.up.beta.item() == 0.0
    assert set_step(f, 0, 10) == ("dense",)
    assert set_step(f, 2, 10) == ("sparse",)
    w = f.up.weight.detach()
    s = ref.soft_threshold24(w)[0]
    beta = ((w * s).sum() / (s * s).sum()).item()
    assert f.up.beta.item() == pytest.approx(beta, rel=1e-6) and beta > 1  # the shrunk weights are scaled back up
    with torch.no_grad():
        f.up.weight.mul_(3.0)  # training moves the weights; beta stays
    set_step(f, 3, 10)
    assert f.up.beta.item() == pytest.approx(beta, rel=1e-6)
    assert set_step(f, 6, 10) == ("dense-final",) and not f.up.active
    g = _ffn(dense_warmup_steps=2, sparse_until=6)  # a resumed run: beta comes from the checkpoint
    g.load_state_dict(f.state_dict())
    set_step(g, 4, 10)
    assert g.up.beta.item() == pytest.approx(beta, rel=1e-6)


def test_dense_init_sparse_continues_the_sparse_phase_s_function():
    """dense_init=sparse: at the switch to the dense phase W <- beta S_soft(W), so the FFN computes what it
    computed in the last sparse step; master (the default) goes back to W, another function."""
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = {}
    for init in ("master", "sparse"):
        f = _ffn(dense_warmup_steps=2, sparse_until=6, dense_init=init)
        assert set_step(f, 2, 10) == ("sparse",)
        with torch.no_grad():  # training moves W after beta is frozen
            f.up.weight.add_(0.01 * torch.randn(f.up.weight.shape, generator=torch.Generator().manual_seed(2),
                                                dtype=f.up.weight.dtype))
        w = f.up.weight.detach().clone()
        y_sparse = f(x).detach()
        assert set_step(f, 6, 10) == ("dense-final",)
        outs[init] = (f, w, y_sparse, f(x).detach())
    f, w, y_sparse, y_dense = outs["sparse"]
    assert torch.equal(f.up.weight, (f.up.beta * ref.soft_threshold24(w.float())[0]).to(w.dtype))
    assert f.up.baked.item() == 1.0 and f.down.baked.item() == 1.0
    torch.testing.assert_close(y_dense, y_sparse, rtol=1e-5, atol=1e-6)  # the sparse forward rounds S(W) via fp32
    f, w, y_sparse, y_dense = outs["master"]
    assert torch.equal(f.up.weight, w) and f.up.baked.item() == 0.0
    assert (y_dense - y_sparse).abs().max() > 1e-3  # the pruned half is back
    f = outs["sparse"][0]
    with torch.no_grad():
        f.up.weight.add_(1.0)  # the dense phase trains W; its later steps leave W to the optimizer
    w = f.up.weight.detach().clone()
    set_step(f, 7, 10)
    assert torch.equal(f.up.weight, w)


def test_dense_init_sparse_edits_the_masters_and_survives_a_resume():
    from elas.optim.master import MasterAdamW
    from elas.sparsity import edit_in_place
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(16, 64).to(torch.bfloat16)
    sparsify_(f, SSTE24Config(dense_warmup_steps=0, sparse_until=4, dense_init="sparse"))
    opt = MasterAdamW(f.parameters(), lr=1e-2, backend="reference")
    set_step(f, 0, 10, edit=opt.edit_)
    before_switch = {k: v.clone() for k, v in f.state_dict().items()}  # a checkpoint of the last sparse step
    master = opt.master(f.up.weight).clone()
    set_step(f, 4, 10, edit=opt.edit_)
    want = f.up.beta * ref.soft_threshold24(master)[0]  # fp32, from the fp32 master (not the bf16 weight)
    assert torch.equal(opt.master(f.up.weight), want)
    assert torch.equal(f.up.weight, want.to(torch.bfloat16))
    # resumed from the last sparse step's checkpoint: the first step of the new process thresholds W
    g = ReLU2FFN.of_width(16, 64).to(torch.bfloat16)
    sparsify_(g, SSTE24Config(dense_warmup_steps=0, sparse_until=4, dense_init="sparse"))
    g.load_state_dict(before_switch)
    set_step(g, 4, 10, edit=edit_in_place)
    assert g.up.baked.item() == 1.0 and (g.up.weight == 0).float().mean() >= 0.5
    # resumed after the switch: W is not thresholded again (the dense phase has trained it since)
    h = ReLU2FFN.of_width(16, 64).to(torch.bfloat16)
    sparsify_(h, SSTE24Config(dense_warmup_steps=0, sparse_until=4, dense_init="sparse"))
    trained = {k: (v + 0.5 if k.endswith("weight") else v) for k, v in f.state_dict().items()}
    h.load_state_dict(trained)
    set_step(h, 5, 10)
    assert torch.equal(h.up.weight, trained["up.weight"])
    # a checkpoint from before `baked` existed loads, as not yet thresholded
    old = {k: v for k, v in before_switch.items() if not k.endswith(".baked") and k != "baked"}
    k = ReLU2FFN.of_width(16, 64).to(torch.bfloat16)
    sparsify_(k, SSTE24Config(dense_warmup_steps=0, sparse_until=4, dense_init="sparse"))
    k.load_state_dict(old)
    assert k.up.baked.item() == 0.0
    with pytest.raises(ValueError, match="invalid sste24.dense_init 'bake'"):
        SSTE24Config(dense_init="bake")


def test_forward_uses_scaled_soft_threshold_and_gradient_passes_straight_through():
    f = _ffn(dense_warmup_steps=0, sparse_until=1.0)
    set_step(f, 0, 10)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    sw_up = (f.up.beta * ref.soft_threshold24(f.up.weight)[0]).detach().requires_grad_()
    sw_down = (f.down.beta * ref.soft_threshold24(f.down.weight)[0]).detach().requires_grad_()
    want = F.linear(torch.relu(F.linear(x, sw_up)) ** 2, sw_down)
    got = f(x)
    torch.testing.assert_close(got, want)
    gy = torch.randn_like(want)
    want.backward(gy)
    got.backward(gy)
    torch.testing.assert_close(f.up.weight.grad, sw_up.grad)  # dL/dW = dL/dS(W): straight through, no beta
    torch.testing.assert_close(f.down.weight.grad, sw_down.grad)


def test_transposed_input_gradient_and_the_packed_products():
    """input_grad=transposed: y = x S(W)^T, dX = dY S(W^T)^T (W^T thresholded along d_out), dW = dY^T x. The packed
    path (ops.sste_pack24 + ops.sparse_mm; on CPU their reference implementations) computes the same in bf16."""
    from elas.sparsity.sste import _SSTELinearFn
    torch.manual_seed(0)
    w = torch.randn(128, 64) * 0.05
    beta = torch.tensor(1.2)
    x = torch.randn(2, 32, 64)
    gy = torch.randn(2, 32, 128)
    s_w = beta * ref.soft_threshold24(w)[0]  # [128, 64], 2:4 along d_in
    s_wt = (beta * ref.soft_threshold24(w.t())[0]).t()  # [128, 64], 2:4 along d_out
    assert not torch.equal(s_w, s_wt)
    out = {}
    for packed in (False, True):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _SSTELinearFn.apply(xx, ww, beta, packed)
        y.backward(gy)
        out[packed] = (y.detach(), xx.grad, ww.grad)
    y, dx, dw = out[False]
    torch.testing.assert_close(y, x @ s_w.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, gy @ s_wt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, gy.reshape(-1, 128).t() @ x.reshape(-1, 64), rtol=1e-5, atol=1e-5)
    for a, b in zip(out[True], out[False]):  # bf16 operands and outputs
        assert a.shape == b.shape and ((a.float() - b).norm() / b.norm()).item() < 1e-2


def test_linear_with_transposed_gradient_compiles_and_switches():
    """The SSTELinear forward of input_grad=transposed, packed on the reference operators, in one graph; dense
    before and after the sparse phase."""
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(64, 128)
    sparsify_(f, SSTE24Config(dense_warmup_steps=1, sparse_until=3, input_grad="transposed"))
    f.up.packed = f.down.packed = True  # what backend=cuda selects; the operators run their CPU twins here
    x = torch.randn(2, 32, 64)
    import torch._dynamo as dynamo
    for step in (0, 1, 3):
        set_step(f, step, 10)
        dynamo.reset()
        ex = dynamo.explain(f)(x)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), f(x))


def test_sparse_tensor_core_backend_needs_the_transposed_gradient():
    with pytest.raises(ValueError, match="needs sste24.input_grad=transposed"):
        SSTE24Config(backend="cuda")
    with pytest.raises(ValueError, match="input_grad 'both'"):
        SSTE24Config(input_grad="both")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot run here"):
            sparsify_(ReLU2FFN.of_width(64, 128), SSTE24Config(backend="cuda", input_grad="transposed"))


def test_a_run_trained_on_the_2to4_kernels_evaluates_and_exports_where_they_cannot_run(monkeypatch):
    """A run with sste24.backend=cuda (or act24's) records backend=cuda; eval, generate and export build its model
    through build.kernels_for_here, which gives them this machine's kernels: the reference where the 2:4 kernels
    cannot run (export always builds on the CPU). The explicit cuda refused that build in one line; training with it
    there still is refused."""
    import elas.kernels
    from elas.build import kernels_for_here
    monkeypatch.setattr(elas.kernels, "_cuda_status", lambda: (False, "no CUDA device"))
    cfg = model_preset("llama-tiny-relu2-w24-a24", n_layers=1, vocab_size=128)
    for m in cfg.methods:
        m.update(backend="cuda", dense_warmup_steps=0)
    cfg.method("sste24").update(input_grad="transposed", sparse_until=1.0)
    with pytest.raises(ValueError, match="kernel backend 'cuda' was requested but cannot run here"):
        build_model(cfg, "cpu")
    here = kernels_for_here(cfg, "cpu")
    assert [m["backend"] for m in cfg.methods] == ["cuda", "cuda"]  # the run's config is not changed
    model = build_model(here, "cpu")
    ref_cfg = model_preset("llama-tiny-relu2-w24-a24", n_layers=1, vocab_size=128)
    ref_cfg.methods = [{**m, "backend": "reference"} for m in cfg.methods]
    want = build_model(ref_cfg, "cpu")
    want.load_state_dict(model.state_dict())
    idx = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    for mdl in (model, want):
        assert set_step(mdl, 5, 10) == ("sparse", "sparse")
    with torch.no_grad():
        assert torch.equal(model(idx), want(idx))


def test_schedule_by_fraction_and_by_step_and_bad_values():
    c = SSTE24Config(dense_warmup_steps=10, sparse_until=0.5)
    assert [c.mode_at(s, 100) for s in (9, 10, 49, 50, 99)] == ["dense", "sparse", "sparse", "dense-final",
                                                                "dense-final"]
    assert SSTE24Config(dense_warmup_steps=0, sparse_until=30).mode_at(30, 100) == "dense-final"
    # nan (`--set ...sparse_until=nan` parses as a float) once passed and failed at the first step after the warm-up
    for bad in ({"sparse_until": 1.5}, {"sparse_until": -1}, {"sparse_until": "half"}, {"sparse_until": float("nan")},
                {"dense_warmup_steps": -2}):
        with pytest.raises(ValueError, match="sste24"):
            SSTE24Config(**bad)


def test_applies_to_full_rank_relu2_only_and_claims_its_weights():
    with pytest.raises(TypeError, match="low-rank"):
        sparsify_(build_model(model_preset("llama-tiny-lowrank-relu2", n_layers=1)), SSTE24Config())
    with pytest.raises(ValueError, match="ffn='relu2'"):
        sparsify_(build_model(model_preset("llama-tiny", n_layers=1)), SSTE24Config())
    m = build_model(model_preset("llama-tiny-relu2-w24", n_layers=1))
    with pytest.raises(ValueError, match="already applied to blocks.0.ffn.up: both would make operand 'up.weight'"):
        sparsify_(m, SSTE24Config())
    assert isinstance(m.blocks[0].ffn.up, SSTELinear) and len(applied_methods(m)) == 1
    sparsify_(m, None)
    assert type(m.blocks[0].ffn.up) is torch.nn.Linear  # taken off again


def test_with_2to4_activations_the_core_multiplies_the_soft_thresholded_weights():
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(16, 64).double()
    sparsify_(f, Act24Config(dense_warmup_steps=0))
    sparsify_(f, SSTE24Config(dense_warmup_steps=0, sparse_until=1.0))  # replaces up/down after act24
    set_step(f, 0, 10)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    su = f.up.beta * ref.soft_threshold24(f.up.weight)[0]
    sd = f.down.beta * ref.soft_threshold24(f.down.weight)[0]
    want = F.linear(ref.relu2_sparsify24(F.linear(x, su))[0], sd)
    torch.testing.assert_close(f(x), want)


def _w24_a24_ffn(path: str, grad_mode: str, dtype=torch.bfloat16, weights_packed: bool = False):
    torch.manual_seed(0)
    f = ReLU2FFN.of_width(64, 256).to(dtype)
    sparsify_(f, Act24Config(dense_warmup_steps=0, path=path, grad_mode=grad_mode, permute_tokens=False))
    sparsify_(f, SSTE24Config(dense_warmup_steps=0, sparse_until=1.0, input_grad="transposed"))
    f.up.packed = f.down.packed = weights_packed  # what backend=cuda selects; the operators' CPU twins run here
    set_step(f, 0, 10)
    return f


def _soft(w, beta):
    return beta * ref.soft_threshold24(w.float())[0]


def test_masked_core_with_2to4_weights_takes_the_transposed_input_gradient():
    """relu2-w24-a24 with input_grad=transposed, masked path, float64, ste: dy2 = dh2 S(W_down^T) (down's input
    gradient through W^T thresholded along d_out); the up-projection's input gradient dy1 S(W_up) (the forward's
    matrix: with 2:4 activations the core multiplies dy1 itself); weight gradients straight through."""
    f = _w24_a24_ffn("masked", "ste", torch.float64)
    x = torch.randn(2, 32, 64, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 32, 64, dtype=torch.float64)
    f(x).backward(gy)
    su, sd = _soft(f.up.weight, f.up.beta).double(), _soft(f.down.weight, f.down.beta).double()
    sdt = _soft(f.down.weight.t(), f.down.beta).double().t()  # [d, d_ff], 2:4 along d (d_out)
    assert not torch.equal(sd, sdt)
    xt, g = x.detach().reshape(-1, 64), gy.reshape(-1, 64)
    y1 = xt @ su.T
    y2s = ref.relu2_sparsify24(y1)[0]
    dy1 = 2 * torch.relu(y1) * (g @ sdt)
    torch.testing.assert_close(x.grad.reshape(-1, 64), dy1 @ su)
    torch.testing.assert_close(f.down.weight.grad, g.T @ y2s)
    torch.testing.assert_close(f.up.weight.grad, dy1.T @ xt)


@pytest.mark.parametrize("weights_packed", [True, False])
@pytest.mark.parametrize("grad_mode", ["ste", "mask"])
def test_packed_core_runs_the_weight_products_as_sparse_gemms_and_matches_masked(grad_mode, weights_packed,
                                                                                   monkeypatch):
    """relu2-w24-a24, packed core (reference kernels on CPU): with S-STE on sparse tensor cores the up-projection
    and dy2 are weight-sparse GEMMs (S(W_up) and S(W_down^T) packed, outputs column-major); with S-STE emulated
    they are dense products (dy2 by S(W_down^T) too); forward and gradients equal the masked definition up to
    bf16 rounding either way."""
    from elas.kernels import ops
    calls = []
    real = ops.sparse_mm_op

    def counting(a_buffer, b, m, k, out_t=False):
        calls.append((m, k, out_t))
        return real(a_buffer, b, m, k, out_t)

    x = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    gy = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    res = {}
    for path in ("masked", "packed"):
        f = _w24_a24_ffn(path, grad_mode, weights_packed=weights_packed and path == "packed")
        if path == "packed":
            monkeypatch.setattr(ops, "sparse_mm_op", counting)
        xi = x.clone().requires_grad_()
        y = f(xi)
        y.backward(gy)
        res[path] = [y.float(), xi.grad.float(), f.up.weight.grad.float(), f.down.weight.grad.float()]
    # S(W_up) [256, 64] and S(W_down^T) [256, 64], each with a column-major output
    assert calls.count((256, 64, True)) == (2 if weights_packed else 0)
    for a, b in zip(res["packed"], res["masked"]):
        assert ((a - b).norm() / b.norm()).item() < 1e-2  # mask mode: relu(y1) rebuilt as sqrt(y2s)


def test_packed_core_with_2to4_weights_traces_as_one_graph():
    import torch._dynamo as dynamo
    f = _w24_a24_ffn("packed", "mask", weights_packed=True)
    x = torch.randn(2, 64, 64, dtype=torch.bfloat16)
    dynamo.reset()
    ex = dynamo.explain(f)(x)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_flip_rate_counts_mask_changes_between_probes():
    m = build_model(model_preset("llama-tiny-relu2-w24", n_layers=1, vocab_size=256))
    set_step(m, 5000, 10000)
    idx = torch.randint(0, 256, (2, 16))
    assert "flip_rate/mean" not in collect_stats(m, lambda: m(idx))  # the first probe has nothing to compare
    w = m.blocks[0].ffn.up.weight
    before = ref.soft_threshold24(w.detach())[1]
    with torch.no_grad():
        w.view(-1, 4)[::2] = w.view(-1, 4)[::2].flip(-1)  # every other group reversed: its mask moves
    st = collect_stats(m, lambda: m(idx))
    want = (ref.soft_threshold24(w.detach())[1] != before).float().mean().item()
    assert 0 < want <= 0.5 and st["flip_rate/0"] == pytest.approx(want)  # up (target 0) changed
    assert st["flip_rate/1"] == 0.0  # down did not


def test_flip_rate_lives_on_the_weights_device():
    """The flip rate is made on the weight's device: collect_stats stacks every method's statistics into one
    tensor, and a CPU value beside CUDA statistics (S-STE with V:N:M) failed. The first probe of a process (a
    run's first, or the first after a resume, the previous mask not being checkpointed) reports none rather than
    a false 0. The meta device stands in for CUDA here."""
    lin = SSTELinear(torch.nn.Linear(16, 8, bias=False, device="meta"))
    lin.stats_sink = []
    lin._record_flips()
    assert lin.stats_sink == []
    lin._record_flips()
    assert [s["flip_rate"].device.type for s in lin.stats_sink] == ["meta"]


@pytest.mark.parametrize("variant", ["relu2-w24", "relu2-w24-a24"])
def test_fullgraph_in_every_phase(variant):
    import torch._dynamo as dynamo
    cfg = model_preset(f"llama-tiny-{variant}", n_layers=2, vocab_size=256)
    for m in cfg.methods:
        m["dense_warmup_steps"] = 10
    cfg.method("sste24")["sparse_until"] = 20
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(0, 256, (2, 64))
    for step in (0, 10, 20):
        set_step(model, step, 100)
        dynamo.reset()
        ex = dynamo.explain(model)(idx, idx)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        lc, le = compiled(idx, idx), model(idx, idx)
        torch.testing.assert_close(lc, le)


# (dense_init, save_every, kill at): a checkpoint inside the sparse phase; (sparse) one right at the switch, so the
# resumed process's first step is the one that thresholds W; one after the switch, which must not threshold again
@pytest.mark.parametrize("dense_init,save_every,fault", [("master", 4, 6), ("sparse", 4, 6), ("sparse", 3, 8),
                                                         ("sparse", 7, 8)])
def test_kill_and_resume_across_both_switches_is_exact(dataset, tmp_path, dense_init, save_every, fault):
    import json
    import signal

    from safetensors.torch import load_file

    def args(out, *extra):
        return ["train", "--preset", "llama-tiny-relu2-w24", "--data", str(dataset), "--out", str(out),
                "--no-progress", *TINY, "--set", "log_every=1", "--set", "model.sste24.dense_warmup_steps=2",
                "--set", "model.sste24.sparse_until=6", "--set", f"model.sste24.dense_init={dense_init}",
                "--max-steps", "9", "--set", f"save_every={save_every}", "--set", "eval_every=100", *extra]

    def losses(run):
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["modes"]) for r in rows if "loss" in r}

    ref_run = run_cli(*args(tmp_path / "ref"))
    assert ref_run.returncode == 0, ref_run.stderr
    killed = run_cli(*args(tmp_path / "run"), env={"ELAS_FAULT_AT_STEP": str(fault)})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(*args(tmp_path / "run", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 10))
    assert [a[s][1] for s in (2, 3, 7)] == [["dense"], ["sparse"], ["dense-final"]]
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    ckpt = tmp_path / "run" / "checkpoints"
    baked = [v.item() for k, v in load_file(str(ckpt / (ckpt / "latest").read_text().strip() / "model.safetensors"))
             .items() if k.endswith(".baked")]
    assert baked and set(baked) == {1.0 if dense_init == "sparse" else 0.0}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("r,c,transpose", [(64, 64, False), (128, 192, False), (192, 64, True), (64, 128, True)])
def test_triton_soft_threshold_pack_equals_the_reference(r, c, transpose):
    """The S-STE pack kernel (on CPU: Triton's interpreter) writes the reference's packed S(W) and S(W^T): the
    same kept positions (metadata and mask bytes) and the same bf16 values, ties and negative weights included."""
    from elas.kernels.cuda.sste import soft_threshold24_packed
    from elas.kernels.packed import unpack24
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(r + c)
    w = torch.randn(r, c, generator=g) * 0.02
    w[1::5] = torch.randint(-2, 3, (len(range(1, r, 5)), c), generator=g).float() * 0.01  # ties
    w = w.to(dev)
    beta = torch.tensor(1.37, device=dev)
    got, want = soft_threshold24_packed(w, beta, transpose), ref.soft_threshold24_packed(w, beta, transpose)
    m, k = (c, r) if transpose else (r, c)
    assert got.shape == want.shape == (m, k)
    assert torch.equal(got.mask_bits, want.mask_bits)
    assert torch.equal(got.meta, want.meta)
    assert torch.equal(got.values.float(), want.values.float())  # by value (+0 / -0 of a zero weight may differ)
    dense = (beta * ref.soft_threshold24((w.t() if transpose else w).float())[0]).to(torch.bfloat16)
    assert torch.equal(unpack24(got).float(), dense.float())
    lean = soft_threshold24_packed(w, beta, transpose, write_bits=False)  # what a weight-sparse GEMM reads
    assert lean.mask_bits.numel() == 0 and torch.equal(lean.buffer.view(torch.int16), got.buffer.view(torch.int16))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("r,c,dtype", [(64, 64, torch.float32), (128, 192, torch.bfloat16), (64, 128, torch.bfloat16)])
def test_triton_dense_soft_threshold_equals_the_reference(r, c, dtype):
    """The dense S(W) kernel (the weight side of relu2-w24-a24's activation-sparse GEMMs) writes the reference's
    values in w's dtype, rounded once from fp32, ties and negative weights included; the op takes it on CUDA
    and the formula elsewhere, with the same values."""
    from elas.kernels.cuda.sste import soft_threshold24_dense
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(r + c)
    w = torch.randn(r, c, generator=g) * 0.02
    w[1::5] = torch.randint(-2, 3, (len(range(1, r, 5)), c), generator=g).float() * 0.01  # ties
    w = w.to(dev, dtype)
    beta = torch.tensor(1.37, device=dev)
    want = (beta.float() * ref.soft_threshold24(w.float())[0]).to(dtype)
    got = soft_threshold24_dense(w, beta)
    assert got.dtype == dtype and torch.equal(got.float(), want.float())
    assert torch.equal(ops.sste_dense24(w, beta).float(), want.float())
    with pytest.raises(ValueError, match="row-major"):
        soft_threshold24_dense(w.t(), beta)


@pytest.mark.gpu
@pytest.mark.parametrize("r,c", [(2048, 8192), (8192, 2048), (1024, 2816)])
def test_gpu_soft_threshold_pack_equals_the_reference(r, c):
    """The 1B / 350M FFN weight shapes, both orientations, against the reference on the GPU."""
    from elas.kernels.cuda.sste import soft_threshold24_packed
    w = torch.randn(r, c, device="cuda") * 0.02
    beta = torch.tensor(0.93, device="cuda")
    for transpose in (False, True):
        got, want = soft_threshold24_packed(w, beta, transpose), ref.soft_threshold24_packed(w, beta, transpose)
        assert torch.equal(got.meta, want.meta) and torch.equal(got.mask_bits, want.mask_bits)
        assert torch.equal(got.values.float(), want.values.float())
    for dtype in (torch.float32, torch.bfloat16):  # the dense S(W), as the 2:4-activation core multiplies it
        wd = w.to(dtype)
        want = (beta * ref.soft_threshold24(wd.float())[0]).to(dtype)
        assert torch.equal(ops.sste_dense24(wd, beta).float(), want.float())


def _gpu_ffn_agrees(methods_of: dict) -> list:
    """Each entry of methods_of (name -> the method configs to apply, in order) on the same 1B-like FFN slice
    [512 -> 2048], bf16 autocast; forward and gradients of the first agree with the last within bf16 rounding."""
    out, ffns = [], []
    for methods in methods_of.values():
        torch.manual_seed(0)
        f = ReLU2FFN.of_width(512, 2048).cuda()
        for m in methods:
            sparsify_(f, m)
        set_step(f, 0, 10)
        x = torch.randn(4, 256, 512, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(x)
        y.float().square().mean().backward()
        out.append((y.float(), x.grad, f.up.weight.grad, f.down.weight.grad))
        ffns.append(f)
    for a, b in zip(out[0], out[-1]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
    return ffns


@pytest.mark.gpu
def test_gpu_packed_sste_ffn_matches_the_emulated_one():
    """backend=cuda: the FFN's four products with S(W) / S(W^T) on sparse tensor cores against the same math on
    dense matrices (input_grad=transposed both), bf16 autocast, forward and gradients."""
    packed, emulated = _gpu_ffn_agrees({b: [SSTE24Config(dense_warmup_steps=0, sparse_until=1.0,
                                                         input_grad="transposed", backend=b)]
                                        for b in ("cuda", "reference")})
    assert packed.up.packed and not emulated.up.packed


@pytest.mark.gpu
@pytest.mark.parametrize("grad_mode", ["ste", "mask"])
def test_gpu_w24_a24_packed_core_matches_the_masked_one(grad_mode):
    """relu2-w24-a24 with input_grad=transposed on the accelerated path (the up-projection and dy2 as
    weight-sparse cuSPARSELt GEMMs with column-major outputs, the rest as relu2-24) against the masked
    definition, bf16 autocast, forward and gradients."""
    _gpu_ffn_agrees({path: [Act24Config(dense_warmup_steps=0, path=path, grad_mode=grad_mode, permute_tokens=False),
                            SSTE24Config(dense_warmup_steps=0, sparse_until=1.0, input_grad="transposed",
                                         backend="cuda" if path == "packed" else "reference")]
                     for path in ("packed", "masked")})


def test_scaled_schedule_scales_a_step_counted_sparse_end():
    """The quality grid scales a recipe's schedule to its run length: a sparse_until given as a step scales like
    the warm-up (a fraction needs nothing); the benchmarks' factor 0 keeps it, so step 0 is sparse."""
    c = SSTE24Config(dense_warmup_steps=1000, sparse_until=30000)
    assert (c.scaled(0.1).dense_warmup_steps, c.scaled(0.1).sparse_until) == (100, 3000)
    assert c.scaled(0).mode_at(0, 10 ** 9) == "sparse"
    assert SSTE24Config(sparse_until=0.5).scaled(0.1).sparse_until == 0.5


def test_version_1_configs_keep_the_master_dense_phase_and_a_grid_refuses_to_mix_them(tmp_path):
    """dense_init's default became `sparse` in config version 2: a version-1 config (a run's config.json) still
    means `master`, and a quality grid does not count such a run as the variant that now resolves to `sparse`."""
    import json

    from elas.config import to_dict
    from elas.sparsity import method_from_dict, method_to_dict
    from elas.train.experiment import check_same_runs, variant_config
    assert method_from_dict({"method": "sste24", "version": 1}).dense_init == "master"
    assert method_from_dict({"method": "sste24"}).dense_init == "sparse"
    assert method_from_dict({"method": "sste24", "version": 1, "dense_init": "sparse"}).dense_init == "sparse"
    assert method_to_dict(SSTE24Config())["version"] == 2
    cfg = variant_config("llama-tiny", "relu2-w24", 10, "data", tmp_path, 2, 1, seed=0)
    run = tmp_path / "relu2-w24"
    run.mkdir()
    saved = to_dict(cfg)
    saved["model"]["methods"] = [{"method": "sste24", "version": 1, "dense_warmup_steps": 1, "sparse_until": 0.5,
                                  "input_grad": "exact", "backend": "reference"}]
    (run / "config.json").write_text(json.dumps(saved))
    (run / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model.sste24.dense_init 'master' -> 'sparse'"):
        check_same_runs([cfg])
    saved["model"]["methods"] = [method_to_dict(m) for m in
                                 [method_from_dict(d) for d in variant_config("llama-tiny", "relu2-w24", 10, "data",
                                                                              tmp_path, 2, 1, seed=0).model.methods]]
    (run / "config.json").write_text(json.dumps(saved))
    check_same_runs([cfg])  # the same model: the run is this variant's
