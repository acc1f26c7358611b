"""MasterAdamW: bf16 parameters with fp32 master weights (optim/master.py), its Triton kernel (interpreter on CPU),
the training step that captures it, and the trainer's param_dtype."""
import json

import pytest
import torch

from elas.cli import main
from elas.optim.master import MasterAdamW
from elas.train.step import StepGrads

from conftest import TINY

SHAPES = [(37, 5), (9000,), (64, 130), (3,)]  # odd sizes: partial blocks, a tensor of several chunks' worth
# every numel a multiple of 8, as every weight of the presets: the kernel's vectorised form (ALIGN = 8)
ALIGNED = [(40, 8), (17000,), (64, 136), (8,)]


def _params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _grads(step, shapes=SHAPES):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).bfloat16() for s in shapes]


def _master_opt(backend, lr=1e-2, moment_dtype=torch.float32, shapes=SHAPES):
    ps = [torch.nn.Parameter(w.bfloat16()) for w in _params(shapes=shapes)]
    groups = [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
    return ps, MasterAdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, backend=backend, moment_dtype=moment_dtype)


def test_equals_torch_adamw_on_fp32_parameters_fed_the_same_bf16_gradients():
    """The point of the masters: the fp32 trajectory is torch AdamW's over fp32 weights (what autocast training
    had), and the bf16 parameters are its rounding, at every step; the clipping scale divides the gradients."""
    ref = [torch.nn.Parameter(w.bfloat16().float()) for w in _params()]  # the masters start at the rounded init
    topt = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    ps, opt = _master_opt("reference")
    for step in range(4):
        scale = 1.0 + step / 2
        for p, q, g in zip(ref, ps, _grads(step)):
            p.grad = g.float() / scale
            q.grad = g.clone()
        opt.grad_scale = torch.tensor(scale)
        topt.step()
        opt.step()
        for p, q in zip(ref, ps):
            torch.testing.assert_close(opt.state[q]["master"], p.detach(), rtol=2e-6, atol=1e-7)
            assert torch.equal(q.detach(), opt.state[q]["master"].bfloat16())
    assert all(g["step"] == 4 for g in opt.param_groups)


@pytest.mark.parametrize("shapes", [SHAPES, ALIGNED], ids=["odd-sizes", "aligned"])
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16], ids=["fp32-moments", "bf16-moments"])
def test_triton_kernel_equals_the_reference(moment_dtype, shapes):
    """The fused kernel (interpreter on CPU) against the reference: bf16 parameters bit for bit, fp32 state to a
    few ulps; with a clipping scale, with fp32 (accumulated) gradients, and dry passes that change nothing. With
    bf16 moments, the moments too bit for bit (the stochastic rounding's hash included). Both forms: scalar
    accesses (odd sizes) and vectorised ones (every numel a multiple of 8)."""
    from elas.optim.master_triton import alignment
    assert alignment([torch.Size(s).numel() for s in shapes]) == (8 if shapes is ALIGNED else 1)
    (pa, oa), (pb, ob) = (_master_opt(b, moment_dtype=moment_dtype, shapes=shapes) for b in ("reference", "triton"))
    for step in range(3):
        grads = _grads(step, shapes)
        for ps, o in ((pa, oa), (pb, ob)):
            if step == 2:  # two accumulated micro-batches: the update reads fp32 sums
                for half in (0, 1):
                    for p, g in zip(ps, grads):
                        p.grad = g * (0.5 if half else 1.0)
                    o.accumulate(first=half == 0)
            else:
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
            o.grad_scale = torch.tensor(1.7) if step else None
            if o.backend == "triton":
                before = [p.detach().clone() for p in ps]
                o.apply(dry=True)
                assert all(torch.equal(p, b) for p, b in zip(ps, before))
            o.step()
    assert ob._align == (8 if shapes is ALIGNED else 1)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert ob.state[b][k].dtype == (torch.float32 if k == "master" else moment_dtype)
            # (atol: a moment near zero after cancellation, g - m, keeps the absolute error of its inputs)
            torch.testing.assert_close(ob.state[b][k], oa.state[a][k], rtol=1e-6, atol=1e-8)
        if moment_dtype == torch.bfloat16:
            assert torch.equal(ob.state[b]["exp_avg_sq"], oa.state[a]["exp_avg_sq"])


@pytest.mark.parametrize("shapes", [SHAPES, ALIGNED], ids=["odd-sizes", "aligned"])
def test_grad_norm_kernel_equals_the_fp32_norm(shapes):
    """grad_norm: one launch over the update's table (interpreter on CPU) gives the fp32 norm of the gradients
    the update reads: the bf16 .grads, then, while accumulating, the fp32 sums; the reference backend has none."""
    ps, opt = _master_opt("triton", shapes=shapes)
    grads = _grads(0, shapes)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    want = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads]))
    torch.testing.assert_close(opt.grad_norm(), want, rtol=1e-5, atol=0)
    for half in (0, 1):
        for p, g in zip(ps, grads):
            p.grad = g * (0.5 if half else 1.0)
        opt.accumulate(first=half == 0)
    torch.testing.assert_close(opt.grad_norm(), 1.5 * want, rtol=1e-5, atol=0)
    assert _master_opt("reference", shapes=shapes)[1].grad_norm() is None


def test_sync_table_points_the_captured_buffers_at_new_gradients():
    """What a graph replay whose update runs outside the graph (LORO) relies on: after a capture the gradients live
    at new addresses, and sync_table() rewrites the table's rows in place (the captured norm kernel reads the same
    table, chunk and sum buffers) to point at them; the norm then reads the new gradients."""
    ps, opt = _master_opt("triton")
    for p, g in zip(ps, _grads(0)):
        p.grad = g.clone()
    opt.grad_norm()
    buffers = [t.data_ptr() for t in (opt._tab, opt._chunks, opt._sumsq)]
    new = _grads(1)
    for p, g in zip(ps, new):
        p.grad = g.clone()  # new buffers, as the capture's private pool gives
    assert opt._tab[:, 1].tolist() != [p.grad.data_ptr() for p in ps]
    opt.sync_table()
    assert opt._tab[:, 1].tolist() == [p.grad.data_ptr() for p in ps]
    assert [t.data_ptr() for t in (opt._tab, opt._chunks, opt._sumsq)] == buffers
    want = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in new]))
    torch.testing.assert_close(opt.grad_norm(), want, rtol=1e-5, atol=0)
    _master_opt("reference")[1].sync_table()  # nothing to sync without the kernel


def test_table_follows_which_tensors_have_gradients():
    """Another set of tensors with gradients, of the same count but other sizes, gets its own chunks: the norm and
    the update read the new set whole (interpreter on CPU)."""
    ps, opt = _master_opt("triton")
    grads = _grads(0)
    for p, g in zip(ps[:3], grads[:3]):  # (37, 5), (9000,), (64, 130) have gradients
        p.grad = g.clone()
    want = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads[:3]]))
    torch.testing.assert_close(opt.grad_norm(), want, rtol=1e-5, atol=0)
    ps[0].grad = None
    ps[3].grad = grads[3].clone()  # the same count, other sizes: (9000,), (64, 130), (3,)
    want = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads[1:]]))
    torch.testing.assert_close(opt.grad_norm(), want, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [SHAPES, ALIGNED], ids=["odd-sizes", "aligned"])
def test_gpu_grad_norm_kernel_equals_the_fp32_norm(shapes):
    """grad_norm compiled (vectorised loads for aligned sizes) against the fp32 norm of the same CUDA gradients."""
    ps = [torch.nn.Parameter(w.bfloat16().cuda()) for w in _params(shapes=shapes)]
    opt = MasterAdamW(ps, lr=1e-2, backend="triton")
    grads = [g.cuda() for g in _grads(0, shapes)]
    for p, g in zip(ps, grads):
        p.grad = g
    want = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads]))
    torch.testing.assert_close(opt.grad_norm(), want, rtol=1e-5, atol=0)
    assert opt._align == (8 if shapes is ALIGNED else 1)


def test_state_dict_round_trip_keeps_fp32_state_and_refuses_fp32_optimizer_state():
    ps, opt = _master_opt("reference")
    for p, g in zip(ps, _grads(0)):
        p.grad = g
    opt.step()
    saved = opt.state_dict()
    qs, other = _master_opt("reference")
    for p, q in zip(ps, qs):
        q.data.copy_(p.data)
    other.load_state_dict(saved)
    for q in qs:
        assert all(other.state[q][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    for o, params in ((opt, ps), (other, qs)):
        for p, g in zip(params, _grads(1)):
            p.grad = g
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    fp32 = [torch.nn.Parameter(w) for w in _params()]
    torch_opt = torch.optim.AdamW(fp32)
    for p in fp32:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    with pytest.raises(ValueError, match="param_dtype=fp32"):
        _master_opt("reference")[1].load_state_dict(torch_opt.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [SHAPES, ALIGNED], ids=["odd-sizes", "aligned"])
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16], ids=["fp32-moments", "bf16-moments"])
def test_gpu_kernel_equals_the_reference(moment_dtype, shapes):
    """The compiled kernel (integer hash, bit tricks and, for aligned sizes, vectorised accesses on the GPU, not
    the interpreter) against the reference on the same CUDA tensors over steps with a clipping scale. The GPU may
    contract a multiply and an add into one FMA where torch rounds twice: fp32 state agrees to a few ulps of its
    operands (of the tensor's scale, not of an element where beta m and (1 - beta) g cancel), and a last-bit difference in fp32 changes the bf16 rounding of an element with probability ~2^-16, so all but a
    few bf16 elements are equal and those differ by one bf16 ulp."""
    runs = []
    for backend in ("reference", "triton"):
        ps = [torch.nn.Parameter(w.bfloat16().cuda()) for w in _params(shapes=shapes)]
        opt = MasterAdamW([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:]}], lr=1e-2, betas=(0.9, 0.95),
                          backend=backend, moment_dtype=moment_dtype)
        for step in range(3):
            for p, g in zip(ps, _grads(step, shapes)):
                p.grad = g.cuda()
            opt.grad_scale = torch.tensor(1.3, device="cuda") if step else None
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    assert ob._align == (8 if shapes is ALIGNED else 1)
    for a, b in zip(pa, pb):
        for x, y in ((a, b), (oa.state[a]["exp_avg"], ob.state[b]["exp_avg"]),
                     (oa.state[a]["exp_avg_sq"], ob.state[b]["exp_avg_sq"])):
            assert x.dtype == y.dtype
            if x.dtype == torch.float32:
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6 * x.abs().max().item())
                continue
            differ = x != y
            assert differ.float().mean().item() < 1e-3
            ulp = (x.float().abs().view(torch.int32) - y.float().abs().view(torch.int32)).abs() >> 16
            assert torch.all(ulp[differ] <= 1)


@pytest.mark.gpu
def test_gpu_dry_warm_up_compiles_the_binary_that_the_update_runs():
    """The warm-up before a capture launches the update with dry=1, the update itself dry=0: one compiled binary
    serves both (Triton specialises an integer equal to 1 as a constant unless told not to), so nothing compiles
    while a graph is being captured; and the dry launch moves nothing."""
    from elas.optim import master_triton
    ps = [torch.nn.Parameter(w.bfloat16().cuda()) for w in _params(shapes=ALIGNED)]
    opt = MasterAdamW([{"params": ps}], lr=1e-2, backend="triton")
    for p, g in zip(ps, _grads(0, ALIGNED)):
        p.grad = g.cuda()
    before = [p.detach().clone() for p in ps]
    kernel = master_triton._adamw_kernel

    def binaries():  # (device_caches: device -> (the binaries by specialisation key, ...))
        return sum(len(c[0]) for c in kernel.device_caches.values())
    for c in kernel.device_caches.values():  # the binaries earlier tests compiled are not this test's
        c[0].clear()
    opt.prepare()
    opt.apply(dry=True)
    torch.cuda.synchronize()
    assert all(torch.equal(a, p) for a, p in zip(before, ps))
    n = binaries()
    opt.apply()
    torch.cuda.synchronize()
    assert binaries() == n >= 1
    assert not all(torch.equal(a, p) for a, p in zip(before, ps))


def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_stalls():
    """Why v is rounded stochastically: a second moment decaying by beta2 = 0.999 per step (g = 0) changes by less
    than half a bf16 ulp, so rounded to nearest it never moves; rounded stochastically its mean follows the fp32
    decay. The bits differ between elements, tensors and steps, and each value lies on one of its two neighbours."""
    from elas.optim.master import sr_bf16
    x = torch.full((20000,), 1.0 + 2 ** -10)  # a quarter of the way from 1 to the next bf16 (1 + 2^-8... ulp 2^-7)
    r = sr_bf16(x, 0, torch.tensor(1)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(r.mean().item() - x[0].item()) < 2e-4  # ~1/8 of the elements round up
    assert not torch.equal(r, sr_bf16(x, 0, torch.tensor(2)).float())
    assert not torch.equal(r, sr_bf16(x, 1, torch.tensor(1)).float())
    assert torch.equal(sr_bf16(x, 3, torch.tensor(5)), sr_bf16(x, 3, torch.tensor(5)))
    near, sr = torch.ones(20000, dtype=torch.bfloat16), torch.ones(20000, dtype=torch.bfloat16)
    for step in range(1, 1001):
        near = (near.float() * 0.999).bfloat16()
        sr = sr_bf16(sr.float() * 0.999, 0, torch.tensor(step))
    assert torch.all(near == 1.0)
    assert sr.float().mean().item() == pytest.approx(0.999 ** 1000, rel=0.02)


def test_bf16_moments_follow_the_fp32_trajectory_and_load_either_state():
    """optim_state_dtype=bf16 changes the numerics by rounding only: on a least-squares problem the loss after 300
    steps is within 2% of the fp32 moments' (and far below the start). A state saved with fp32 moments loads into
    an optimizer with bf16 moments (cast) and the reverse: a resume may change the setting."""
    g = torch.Generator().manual_seed(0)
    a, want = torch.randn(256, 64, generator=g), torch.randn(64, 8, generator=g)
    b = a @ want + 0.01 * torch.randn(256, 8, generator=g)

    def fit(moment_dtype):
        w = torch.nn.Parameter(torch.zeros(64, 8, dtype=torch.bfloat16))
        opt = MasterAdamW([w], lr=3e-2, betas=(0.9, 0.999), eps=1e-8, backend="reference", moment_dtype=moment_dtype)
        for _ in range(300):
            w.grad = (2 * a.T @ (a @ opt.state[w]["master"] - b) / len(a)).bfloat16()
            opt.step()
        return ((a @ opt.state[w]["master"] - b) ** 2).mean().item(), opt
    start = (b ** 2).mean().item()
    (l32, o32), (l16, o16) = fit(torch.float32), fit(torch.bfloat16)
    assert l16 < start / 1e5 and l16 == pytest.approx(l32, rel=0.02)
    assert o16.state[o16.param_groups[0]["params"][0]]["exp_avg_sq"].dtype == torch.bfloat16
    for src, dst_dtype in ((o32, torch.bfloat16), (o16, torch.float32)):
        w = torch.nn.Parameter(torch.zeros(64, 8, dtype=torch.bfloat16))
        dst = MasterAdamW([w], backend="reference", moment_dtype=dst_dtype)
        dst.load_state_dict(src.state_dict())
        got, ref = dst.state[w], src.state[src.param_groups[0]["params"][0]]
        assert got["master"].dtype == torch.float32 and got["exp_avg"].dtype == dst_dtype
        torch.testing.assert_close(got["exp_avg_sq"].float(), ref["exp_avg_sq"].float(), rtol=1e-2, atol=0)


def test_bf16_moments_need_bf16_parameters_and_the_rounding_is_the_same_in_chunks():
    """Each optimizer refuses bf16 moments where it has no masters, and a dtype it does not keep; the reference's
    chunked rounding is the whole tensor's (the hash reads each element's index in the tensor)."""
    from elas.build import build_model
    from elas.config import TrainConfig, model_preset
    from elas.optim import LOROAdamW, build_optimizer
    from elas.optim.master import sr_bf16
    cfg = model_preset("llama-tiny-elas")
    cfg.n_layers, cfg.methods = 1, []
    fp32 = build_model(cfg, "cpu")
    with pytest.raises(ValueError, match="bf16 moments only over bf16 parameters"):
        LOROAdamW(fp32, d_model=cfg.d_model, moment_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="optim_state_dtype=bf16 is for bf16 parameters.*torch.float32"):
        build_optimizer(fp32, TrainConfig(model=cfg, optim_state_dtype="bf16"))
    for make in (lambda: MasterAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))],
                                     moment_dtype=torch.float16),
                 lambda: LOROAdamW(fp32, d_model=cfg.d_model, moment_dtype=torch.float16)):
        with pytest.raises(ValueError, match="float32 or bfloat16, got torch.float16"):
            make()
    x = torch.randn(1000) * 1e-3
    assert torch.equal(sr_bf16(x, 2, torch.tensor(9), chunk=77), sr_bf16(x, 2, torch.tensor(9)))


def test_refuses_fp32_parameters():
    with pytest.raises(ValueError, match="bf16 parameters"):
        MasterAdamW([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("clip_into", [None, False], ids=["clip-in-kernel", "clip-the-gradients"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_step_with_accumulation_equals_the_fp32_sum_of_micro_batch_gradients(backend, clip_into, monkeypatch):
    """StepGrads with MasterAdamW and 2 micro-batches: the update reads the fp32 sum of the two bf16 gradients
    (not a bf16 .grad accumulation), and the clipping norm is that sum's, whether torch measures it (reference)
    or the optimizer's kernel (triton: the interpreter on CPU), and whether the kernel applies the clip or the
    gradients are scaled first."""
    from contextlib import nullcontext
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False).bfloat16()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, y):
            return ((self.lin(x.float().bfloat16()) - y.float().bfloat16()) ** 2).float().mean()

    model = M()
    xs = [torch.randn(4, 16), torch.randn(4, 16)]
    ys = [torch.randn(4, 8), torch.randn(4, 8)]
    want = torch.zeros(8, 16)
    for x, y in zip(xs, ys):
        lin.weight.grad = None
        (model(x, y) / 2).backward()
        want += lin.weight.grad.float()
    lin.weight.grad = None
    from elas.optim import master_triton
    launches = []
    sumsq = master_triton.grad_sumsq
    monkeypatch.setattr(master_triton, "grad_sumsq", lambda *a, **k: launches.append(1) or sumsq(*a, **k))
    opt = MasterAdamW(model.parameters(), lr=1e-2, backend=backend)
    sg = StepGrads(model, model, nullcontext, grad_accum=2, grad_clip=1e-3, optimizer=opt, clip_into=clip_into)
    w0 = opt.state[lin.weight]["master"].clone()
    _, norm = sg.run(list(zip(xs, ys)))
    scale = 1.0 if clip_into is None else 1e-3 / (want.norm().item() + 1e-6)  # the gradients, scaled in place
    assert sg.accumulates and torch.allclose(opt.grads()[0], want * scale, rtol=1e-6, atol=0)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(want.norm().item(), rel=1e-6)
    assert len(launches) == (backend == "triton")  # the norm from the optimizer's one kernel
    assert not torch.equal(opt.state[lin.weight]["master"], w0) and lin.weight.grad is None


def _train(dataset, out, *extra):
    return ["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), "--no-progress",
            *TINY, "--set", "log_every=1", "--set", "model.act24.dense_warmup_steps=2", *extra]


@pytest.mark.parametrize("extra", [[], ["--set", "optim_state_dtype=fp32"],
                                   ["--optimizer", "loro_adamw", "--set", "loro_exact_every=2",
                                    "--set", "loro_rewarm_steps=1", "--set", "grad_accum=2", "--set", "batch_size=2"],
                                   ["--optimizer", "loro_adamw", "--set", "loro_exact_every=2",
                                    "--set", "loro_rewarm_steps=1", "--set", "optim_state_dtype=fp32"]],
                         ids=["adamw", "adamw-fp32-moments", "loro-accum", "loro-fp32-moments"])
def test_trainer_with_bf16_parameters_trains_and_resumes_exactly(dataset, tmp_path, extra, capsys):
    """param_dtype=bf16 on CPU (the reference update): the model's parameters are bf16, the masters are in the
    checkpoint, and a run resumed from step 3 logs the losses of the uninterrupted one bit for bit (AdamW; LORO
    with exact steps and two accumulated micro-batches). The moments are bf16 by default (optim_state_dtype=auto
    over bf16 parameters), recorded so in config.json; fp32 where asked."""
    common = ["--set", "param_dtype=bf16", "--set", "eval_every=100", "--set", "save_every=3", *extra]
    assert main(_train(dataset, tmp_path / "ref", "--max-steps", "6", *common)) == 0
    fp32_moments = "optim_state_dtype=fp32" in extra
    moments = "fp32 Adam moments" if fp32_moments else "bf16 Adam moments"
    assert f"parameters in bf16, fp32 master weights and {moments}" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ref" / "config.json").read_text())["optim_state_dtype"]
    assert saved == ("fp32" if fp32_moments else "bf16")
    assert main(_train(dataset, tmp_path / "run", "--max-steps", "3", *common)) == 0
    assert main(_train(dataset, tmp_path / "run", "--max-steps", "6", *common, "--resume")) == 0

    def losses(run):
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and a == b and a[6] < a[1]
    blob = torch.load(tmp_path / "run" / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=False)
    st = next(iter(blob["optimizer"]["state"].values()))
    assert st["master"].dtype == torch.float32
    assert st["exp_avg_sq"].dtype == (torch.float32 if fp32_moments else torch.bfloat16)
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert {t.dtype for k, t in weights.items() if "norm" not in k} == {torch.bfloat16}


@pytest.mark.parametrize("extra, match", [
    (["--set", "param_dtype=bf16", "--set", "precision=fp32"], "precision=bf16 or auto"),
    (["--set", "param_dtype=half"], "invalid param_dtype"),
    (["--set", "optim_state_dtype=fp16"], "invalid optim_state_dtype='fp16': expected auto, fp32 or bf16"),
    (["--set", "optim_state_dtype=bf16"], "this run holds them in fp32 (param_dtype=auto on cpu)"),
    (["--set", "optim_state_dtype=bf16", "--optimizer", "loro_adamw"], "for bf16 parameters"),
])
def test_bad_param_dtype_is_one_clear_line(dataset, tmp_path, capsys, extra, match):
    assert main(_train(dataset, tmp_path / "x", "--max-steps", "1", *extra)) != 0
    assert match in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_gpu_graph_step_with_master_adamw_equals_eager_steps(moments):
    """On the GPU: the update captured with the step (MasterAdamW in the graph, dry warm-up passes) moves the
    weights as eager steps do, over three steps with clipping, and the warm-up moved nothing; with bf16 moments
    too (each replay reads its step, the rounding's seed, from device memory)."""
    from elas.bench.ffn import variant_config
    from elas.build import build_model
    from elas.config import TrainConfig
    from elas.optim import build_optimizer
    from elas.train.parallelize import hold_params_in
    cfg = variant_config("llama-60m", "lowrank-relu2", max_seq_len=64)
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, "cuda")
        hold_params_in(model, torch.bfloat16)
        opt = build_optimizer(model, TrainConfig(model=cfg, lr=1e-3, optim_state_dtype=moments))
        assert isinstance(opt, MasterAdamW) and opt.backend == "triton"
        assert opt.moment_dtype == (torch.bfloat16 if moments == "bf16" else torch.float32)
        sg = StepGrads(model, model, lambda: torch.autocast("cuda", dtype=torch.bfloat16), 1, 0.5, graphs=graphs,
                       optimizer=opt)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            idx = torch.randint(0, cfg.vocab_size, (4, 65), generator=g)
            loss, _ = sg.run([(idx[:, :-1], idx[:, 1:])], mode=True)
            losses.append(loss.item())
        assert sg.step_in_graph == graphs and (not graphs or sg.captures == 1)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (l0, p0), (l1, p1) = runs
    assert l0 == pytest.approx(l1, rel=1e-3)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-3)


def test_loro_over_bf16_parameters_follows_the_fp32_trajectory_through_exact_steps():
    """LOROAdamW with masters: fed the same gradients, its fp32 masters are the factors LORO computes over fp32
    parameters (lazy steps and, at step 2 and 4, exact steps with QR/SVD), and the bf16 parameters their rounding."""
    from elas.build import build_model
    from elas.config import model_preset
    from elas.optim import LOROAdamW
    from elas.train.parallelize import hold_params_in
    cfg = model_preset("llama-tiny-elas")
    cfg.n_layers, cfg.methods = 1, []
    torch.manual_seed(0)
    fp32 = build_model(cfg, "cpu")
    bf16 = build_model(cfg, "cpu")
    hold_params_in(bf16, torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(fp32.parameters(), bf16.parameters()):
            p.copy_(q.float())
    opts = [LOROAdamW(m, lr=1e-2, exact_every=2, rewarm_steps=1, d_model=cfg.d_model, weight_decay=0.1)
            for m in (fp32, bf16)]
    assert not opts[0].has_masters and opts[1].has_masters
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        for p, q in zip(fp32.parameters(), bf16.parameters()):
            grad = (torch.randn(p.shape, generator=g) * 1e-2).bfloat16()
            p.grad, q.grad = grad.float(), grad
        for o in opts:
            o.step()
    for p, q in zip(fp32.parameters(), bf16.parameters()):
        torch.testing.assert_close(opts[1].state[q]["master"], p.detach(), rtol=1e-5, atol=1e-7)
        assert torch.equal(q.detach(), opts[1].state[q]["master"].bfloat16())


@pytest.mark.parametrize("moment_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)],
                         ids=["fp32-moments", "bf16-moments"])
def test_loro_fused_lazy_steps_equal_the_foreach_path(moment_dtype, tol):
    """LOROAdamW over bf16 parameters: the lazy steps as the fused kernel (interpreter here) give the foreach
    path's masters up to rounding (1e-6 of each tensor's norm); after an exact step (foreach in both) and the
    moment reset, the low-rank products W = M N^T and the dense parameters stay that close (the factors
    themselves are an SVD's, defined up to rotations within near-equal singular values). With bf16 moments the
    two paths round the same values (the same stochastic bits) but compute them in another order, so a moment
    now and then lands on the other bf16 neighbour: 1e-3."""
    from elas.build import build_model
    from elas.config import model_preset
    from elas.optim import LOROAdamW
    from elas.train.parallelize import hold_params_in
    cfg = model_preset("llama-tiny-elas")
    cfg.n_layers, cfg.methods, cfg.vocab_size = 1, [], 256  # (a small vocabulary: the interpreter's time)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model(cfg, "cpu")
        hold_params_in(m, torch.bfloat16)
        models.append(m)
    opts = [LOROAdamW(m, lr=1e-2, exact_every=3, rewarm_steps=1, d_model=cfg.d_model, weight_decay=0.1, backend=b,
                      moment_dtype=moment_dtype) for m, b in zip(models, ("reference", "triton"))]
    assert opts[1].backend == "triton" and opts[0].backend == "reference"
    g = torch.Generator().manual_seed(5)

    def worst():
        return max(((opts[1].state[q]["master"] - opts[0].state[p]["master"]).norm()
                    / opts[0].state[p]["master"].norm()).item()
                   for p, q in zip(models[0].parameters(), models[1].parameters()))
    for step in range(5):  # lazy, lazy, exact, lazy (after the reset), lazy
        grads = [(torch.randn(p.shape, generator=g) * 1e-2).bfloat16() for p in models[0].parameters()]
        for m, o in zip(models, opts):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            o.step()
        if step == 1:
            assert worst() < tol
    from elas.model.lowrank import LowRankLinear
    for a, b in zip(models[0].modules(), models[1].modules()):
        if isinstance(a, LowRankLinear):
            wa = opts[0].state[a.weight_out]["master"] @ opts[0].state[a.weight_in]["master"].T
            wb = opts[1].state[b.weight_out]["master"] @ opts[1].state[b.weight_in]["master"].T
            assert ((wb - wa).norm() / wa.norm()).item() < 10 * tol
    dense = [(p, q) for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()) if "weight_" not in n]
    assert all(((opts[1].state[q]["master"] - opts[0].state[p]["master"]).norm()
                / opts[0].state[p]["master"].norm()).item() < tol for p, q in dense)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(q.detach(), opts[1].state[q]["master"].bfloat16())
        assert opts[1].state[q]["k"] == opts[0].state[p]["k"] == 2
        assert opts[1].state[q]["exp_avg_sq"].dtype == opts[0].state[p]["exp_avg_sq"].dtype == moment_dtype


def test_dry_run_checks_and_names_bf16_moments(dataset, tmp_path, capsys):
    """--dry-run refuses bf16 moments over fp32 parameters (the CPU's default) in one line, as a run would, and
    names the moments a run would keep."""
    assert main(_train(dataset, tmp_path / "x", "--dry-run", "--set", "optim_state_dtype=bf16")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim_state_dtype=bf16 is for bf16 parameters" in err
    assert main(_train(dataset, tmp_path / "x", "--dry-run", "--set", "optim_state_dtype=bf16",
                       "--set", "param_dtype=bf16")) == 0
    assert "grad clip 1, bf16 Adam moments\n" in capsys.readouterr().out
    # the default (auto) says what it resolves to on this machine: fp32 moments over the CPU's fp32 parameters
    assert main(_train(dataset, tmp_path / "x", "--dry-run")) == 0
    assert "grad clip 1, fp32 Adam moments (optim_state_dtype=auto, as on this machine's cpu)" in \
        capsys.readouterr().out
    assert main(_train(dataset, tmp_path / "x", "--dry-run", "--set", "param_dtype=bf16")) == 0
    assert "grad clip 1, bf16 Adam moments (optim_state_dtype=auto, as on this machine's cpu)" in \
        capsys.readouterr().out
    assert not (tmp_path / "x").exists()


def test_a_run_saved_before_auto_moments_resumes_with_fp32_moments(dataset, tmp_path):
    """config.json files written before optim_state_dtype existed trained fp32 moments: loaded as fp32, not as
    today's default (auto, bf16 over bf16 parameters), so a resume does not switch them."""
    from elas.config import TrainConfig, from_dict, to_dict
    d = to_dict(TrainConfig())
    assert d["optim_state_dtype"] == "auto"
    del d["optim_state_dtype"]
    assert from_dict(TrainConfig, d).optim_state_dtype == "fp32"
    common = ["--set", "param_dtype=bf16", "--set", "eval_every=100", "--set", "save_every=2"]
    run = tmp_path / "run"
    assert main(_train(dataset, run, "--max-steps", "2", *common, "--set", "optim_state_dtype=fp32")) == 0
    cfg = json.loads((run / "config.json").read_text())
    del cfg["optim_state_dtype"]
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(_train(dataset, run, "--max-steps", "4", *common, "--resume")) == 0
    assert json.loads((run / "config.json").read_text())["optim_state_dtype"] == "fp32"
    blob = torch.load(run / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=False)
    assert next(iter(blob["optimizer"]["state"].values()))["exp_avg_sq"].dtype == torch.float32


def test_recorded_bf16_moments_without_a_checkpoint_name_the_key_to_set(dataset, tmp_path, capsys):
    """A one-GPU run (param_dtype auto, bf16 moments resolved and recorded in config.json) stopped before its first
    checkpoint, resumed where the parameters are fp32 (the CPU here): one line naming optim_state_dtype=auto as
    the way out, since the user never set the key; with it the run starts."""
    import shutil
    run = tmp_path / "run"
    assert main(_train(dataset, run, "--max-steps", "2", "--set", "param_dtype=bf16", "--set", "eval_every=100")) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["optim_state_dtype"] == "bf16"
    cfg["param_dtype"] = "auto"  # as a GPU run records it
    (run / "config.json").write_text(json.dumps(cfg))
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert main(_train(dataset, run, "--max-steps", "2", "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "optim_state_dtype=bf16 is for bf16 parameters" in err[-1] and "or optim_state_dtype=auto" in err[-1]
    assert main(_train(dataset, run, "--max-steps", "2", "--resume", "auto", "--set", "optim_state_dtype=auto")) == 0
    assert json.loads((run / "config.json").read_text())["optim_state_dtype"] == "fp32"


def test_a_resume_keeps_its_checkpoints_moments_and_names_conflicts_past_a_damaged_checkpoint(dataset, tmp_path,
                                                                                               monkeypatch, capsys):
    """optim_state_dtype=auto on a resume takes the moments of the checkpoint it resumes, also where the config
    is the preset's (`--resume` without --out resumes runs/PRESET); a damaged newest checkpoint is skipped when
    the parameters' dtype is checked, so the conflict named is the one the resume would meet."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--no-progress", *TINY,
            "--set", "log_every=1", "--set", "model.act24.dense_warmup_steps=2", "--set", "eval_every=100",
            "--set", "save_every=2", "--set", "param_dtype=bf16"]
    assert main(base + ["--max-steps", "2", "--set", "optim_state_dtype=fp32"]) == 0
    assert main(base + ["--max-steps", "4", "--resume"]) == 0  # (no --out: the preset's config, auto)
    run = tmp_path / "runs" / "llama-tiny-elas"
    blob = torch.load(run / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=False)
    assert next(iter(blob["optimizer"]["state"].values()))["exp_avg_sq"].dtype == torch.float32
    # the newest checkpoint's trainer.json damaged: the conflict is step 2's, named before anything else
    (run / "checkpoints" / "step-00000004" / "trainer.json").write_text("")
    capsys.readouterr()
    assert main(_train(dataset, run, "--max-steps", "6", "--set", "param_dtype=fp32", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("elas: error: checkpoint step-00000002 holds the optimizer state of bf16 parameters")
    assert (run / "checkpoints" / "step-00000004").is_dir()  # (nothing moved aside before the refusal)
