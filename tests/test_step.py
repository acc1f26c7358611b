"""The gradient half of a training step (train/step.py): eager on CPU, CUDA-graph replay on GPU."""
import json

import pytest
import torch

from elas.config import model_preset
from elas.build import build_model
from elas.sparsity import set_step
from elas.train.step import StepGrads

from conftest import TINY, run_cli

# small, but every width a multiple of 64 so that the packed 2:4 path runs on a GPU; d_ff 1280 gives the 95/5
# split 64 dense features (at smaller widths it rounds to none)
SMALL = dict(n_layers=2, d_model=128, n_heads=2, intermediate=852, vocab_size=512, max_seq_len=64)


def _model(variant: str, device: str, dense_warmup_steps: int | None = None, **over):
    name = "llama-tiny" if variant == "swiglu" else f"llama-tiny-{variant}"
    extra = {"rank": 64} if "lowrank" in variant or variant.startswith("elas") else {}
    cfg = model_preset(name, **{**SMALL, **extra, **over})  # (at d_model 128 a rank of 64 saves nothing in the
    # attention, which is then full-rank: d_model=256 makes it low-rank, as fuse_qkv needs)
    if dense_warmup_steps is not None and cfg.methods:
        cfg.method("act24")["dense_warmup_steps"] = dense_warmup_steps
    torch.manual_seed(0)
    return build_model(cfg, device)


def _batches(n: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 512, (n, batch, seq + 1), generator=g)
    return [(idx[k, :, :-1], idx[k, :, 1:]) for k in range(n)]


def _manual(model, micro, clip, autocast):
    """The textbook loop, written out: the reference StepGrads must equal."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in micro:
        with autocast():
            loss = model(x, y)
        (loss / len(micro)).backward()
        total += loss.item()
    gnorm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
    return total / len(micro), gnorm.item(), [p.grad.clone() for p in model.parameters()]


def test_eager_step_equals_the_textbook_loop():
    from contextlib import nullcontext
    model = _model("elas", "cpu", dense_warmup_steps=0)
    set_step(model, 0, 1)
    micro = _batches(3, 2, 16)
    want_loss, want_norm, want_grads = _manual(model, micro, 0.5, nullcontext)
    model.zero_grad(set_to_none=True)
    sg = StepGrads(model, model, nullcontext, grad_accum=3, grad_clip=0.5)
    for _ in range(2):  # the second call runs with gradients already allocated: they must be zeroed, not summed
        loss, gnorm = sg.run(micro, mode=True)
        assert loss.item() == pytest.approx(want_loss, rel=1e-6)
        assert gnorm.item() == pytest.approx(want_norm, rel=1e-6)
        for p, g in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert sg.captures == 0 and not sg.graphs


def test_cpu_trainer_says_its_steps_are_eager(dataset, tmp_path):
    r = run_cli("train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(tmp_path / "r"),
                "--no-progress", *TINY, "--max-steps", "2", "--set", "eval_every=2", "--set", "save_every=2")
    assert r.returncode == 0, r.stderr
    assert "eager steps (CPU)" in r.stdout


VARIANTS = ["swiglu", "relu2", "relu2-24", "relu2-24-split", "lowrank-relu2", "elas", "elas-mask"]


@pytest.mark.gpu
def test_gpu_a_destroyed_graph_leaves_another_graphs_gemm_workspace():
    """Graphs captured with graph_capture hold a cuBLAS workspace each, in their own pools: destroying the first
    (as a mode switch drops the step graph) frees nothing the second replays into, here refilled with NaN. This
    guards graph_capture's own mechanism (a workspace dropped from torch's map after the capture must stay in the
    graph's pool); it does not reproduce pytorch#193402: with plain torch.cuda.graph the same sequence showed no
    damage either on torch 2.11 (H100, benchmarks/cublas_workspace.py torch)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}  # torch's default workspace,
    # the one this guards (ELAS_CUBLAS_WORKSPACE=none would run cuBLAS without one: kernels/cublas.py)
    r = subprocess.run([sys.executable, "benchmarks/cublas_workspace.py", "elas"], cwd=root, capture_output=True,
                       text=True, timeout=300, env=env)  # (a process of its own: a fault would poison this one)
    m = re.search(r"max rel\. error (\S+), refill elements overwritten (\d+)", r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr[-2000:]
    assert float(m[1]) < 2e-2 and int(m[2]) == 0, r.stdout  # (eager may take another split: rounding)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_graph_step_equals_eager_step(variant):
    # (relu2-24-split carries the 95/5 split: its feature selection must be sync-free)
    model = _model(variant, "cuda", dense_warmup_steps=0)
    set_step(model, 0, 1)
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    micro = _batches(2, 4, 64)
    eager = StepGrads(model, model, bf16, grad_accum=2, grad_clip=1.0)
    l0, n0 = eager.run(micro, mode=True)
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    graphed = StepGrads(model, model, bf16, grad_accum=2, grad_clip=1.0, graphs=True)
    for seed in (0, 1, 0):  # replays read the refilled inputs (seed 1 differs), and repeat exactly
        l1, n1 = graphed.run(_batches(2, 4, 64, seed), mode=True)
        if seed == 1:
            assert l1.item() != l0.item()
    assert graphed.graphs and graphed.captures == 1, "capture fell back to eager"
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5) and n1.item() == pytest.approx(n0.item(), rel=1e-3)
    for p, g in zip(model.parameters(), g0):
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=1e-4)
    if any(getattr(m, "act24", None) for m in model.modules()):
        graphed.run(micro, mode=False)  # a new mode (dense warm-up <-> 2:4) is a new graph
        assert graphed.captures == 2


@pytest.mark.gpu
def test_gpu_fused_qkv_and_norm_kernel_step_like_the_plain_model():
    """fuse_qkv (one down-projection GEMM, the up-projections' input gradients side by side: elas::mm_side_by_side)
    and the one-pass RMSNorm backward, compiled whole and replayed from a CUDA graph, give the plain eager model's
    loss, clip norm and gradients (bf16 autocast: to bf16 rounding)."""
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    base = _model("lowrank-relu2", "cuda", fuse_qkv=False, norm_kernel="torch", d_model=256)
    fused = _model("lowrank-relu2", "cuda", fuse_qkv=True, norm_kernel="fused", d_model=256)
    assert fused.blocks[0].attn.fuse_qkv and not base.blocks[0].attn.fuse_qkv
    fused.load_state_dict(base.state_dict())
    micro = _batches(2, 4, 64)
    l0, n0 = StepGrads(base, base, bf16, grad_accum=2, grad_clip=1.0).run(micro, mode=True)
    graphed = StepGrads(fused, torch.compile(fused, fullgraph=True), bf16, grad_accum=2, grad_clip=1.0, graphs=True)
    for _ in range(3):  # warm-up, capture, replay
        l1, n1 = graphed.run(micro, mode=True)
    assert graphed.graphs and graphed.captures == 1, "capture fell back to eager"
    assert l1.item() == pytest.approx(l0.item(), rel=2e-3) and n1.item() == pytest.approx(n0.item(), rel=2e-2)
    for (name, a), b in zip(fused.named_parameters(), base.parameters()):
        err = (a.grad.float() - b.grad.float()).norm() / b.grad.float().norm().clamp_min(1e-12)
        assert err < 3e-2, (name, err.item())


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adamw", "loro_adamw"])
def test_gpu_trainer_graphs_reproduce_eager_losses(dataset, tmp_path, optimizer):
    """Graph steps log the eager steps' losses, across the dense -> 2:4 switch (a recapture) and, with LORO, across
    exact steps (eager optimizer work between replays)."""
    extra = ["--optimizer", optimizer, "--set", "loro_exact_every=3", "--set", "loro_rewarm_steps=1"] \
        if optimizer == "loro_adamw" else []
    args = [*extra, "--preset", "llama-tiny-elas", "--data", str(dataset), "--no-progress", *TINY, "--max-steps", "8",
            "--set", "log_every=1", "--set", "eval_every=8", "--set", "save_every=8",
            "--set", "model.act24.dense_warmup_steps=4", "--set", "model.intermediate=176", "--set", "model.d_model=128",
            "--set", "model.rank=64", "--set", "seq_len=64", "--set", "model.max_seq_len=64"]
    runs = {}
    for graphs in ("true", "false"):
        r = run_cli("train", *args, "--out", str(tmp_path / graphs), "--set", f"cuda_graphs={graphs}")
        assert r.returncode == 0, r.stderr[-2000:]
        assert ("CUDA graph" in r.stdout) == (graphs == "true"), r.stdout
        recs = [json.loads(ln) for ln in (tmp_path / graphs / "metrics.jsonl").read_text().splitlines()]
        runs[graphs] = {x["step"]: x for x in recs if "loss" in x}
        assert "capture of the training step failed" not in r.stderr, r.stderr[-2000:]
    a, b = runs["true"], runs["false"]
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a[8]["sparse"] and not a[4]["sparse"]  # the run crossed the dense -> 2:4 switch (a recapture)
    for s in a:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-3), (s, a[s]["loss"], b[s]["loss"])
        assert a[s]["y2_zero_frac/mean"] == pytest.approx(b[s]["y2_zero_frac/mean"], abs=1e-3)


@pytest.mark.gpu
def test_gpu_failed_capture_falls_back_to_eager_and_frees_its_memory():
    model = _model("relu2", "cuda")
    calls = []

    class SyncsInForward(torch.nn.Module):  # .item() cannot be captured
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, y):
            loss = self.m(x, y)
            calls.append(loss.item())
            return loss

    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    micro = _batches(1, 4, 64)
    want, _ = StepGrads(model, model, bf16, 1, 1.0).run(micro)
    model.zero_grad(set_to_none=True)
    sg = StepGrads(model, SyncsInForward(model), bf16, 1, 1.0, graphs=True)
    loss, _ = sg.run(micro)
    assert not sg.graphs and sg.captures == 0
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss, _ = sg.run(micro)  # later steps stay eager
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.randn(4, device="cuda").isfinite().all()  # the CUDA generator left its capture state


def test_probe_stats_equal_the_statistics_of_the_training_forward(dataset, tmp_path):
    """Log steps measure the sparsity statistics with a no-grad probe forward on the step's first sequences; on
    the same sequences and weights they equal the definition applied to the pre-activations y1 that the training
    forward computes (from every FFN's input, captured here by hooks)."""
    from elas.config import apply_overrides, train_config
    from elas.kernels import reference as ref
    from elas.model import ReLU2FFN
    from elas.sparsity import relu2_stats
    from elas.train import Trainer
    from elas.train.trainer import PROBE_SEQS
    cfg = train_config("llama-tiny-elas")
    over = dict(kv.split("=", 1) for kv in TINY[1::2])  # TINY is ["--set", "key=value", ...]
    apply_overrides(cfg, {**over, "data_dir": str(dataset), "out_dir": str(tmp_path / "r"), "device": "cpu",
                          "model.act24.dense_warmup_steps": 0})
    tr = Trainer(cfg, progress=False, log=lambda *a: None)
    set_step(tr.model, 0, 1)
    x, y = next(tr.batches.micro_batches(0, 1))
    y1s = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: y1s.append(mod.up(inp[0]).detach()))
             for m in tr.model.modules() if isinstance(m, ReLU2FFN)]
    with torch.no_grad():
        tr.model(x[:PROBE_SEQS], y[:PROBE_SEQS])
    for h in hooks:
        h.remove()
    probed = tr._probe_stats(x[:PROBE_SEQS], y[:PROBE_SEQS])
    assert len(y1s) == cfg.model.n_layers
    for i, y1 in enumerate(y1s):
        y1 = y1.reshape(-1, y1.shape[-1])
        want = relu2_stats(y1, ref.relu2_sparsify24(y1)[1])
        for k, v in want.items():
            assert probed[f"{k}/{i}"] == pytest.approx(v.item(), abs=1e-6), (k, i)
    assert 0 < probed["y2_zero_frac/mean"] < 1 and 0 < probed["dropped_nnz_frac/mean"] < 1
    _, _, logged = tr.train_step(0, track_stats=True)  # what a log step records: the same probe
    assert logged == pytest.approx(probed)


def test_compiled_regions_compile_once_per_mode_and_equal_eager():
    """The trainer's compiled step (train/parallelize.py): every block and the loss head compiled, the blocks
    sharing one graph; a new sparsity mode compiles once more, repeated steps and gradient accumulation compile
    nothing; losses, norms and gradients equal the uncompiled model's."""
    from contextlib import nullcontext

    from elas.train.parallelize import compile_counts, compile_regions
    torch._dynamo.reset()
    eager, comp = _model("elas", "cpu", dense_warmup_steps=2), _model("elas", "cpu", dense_warmup_steps=2)
    compile_regions(comp, backend="aot_eager")
    micro = _batches(2, 2, 32)
    compiled_per_step = []
    for step in range(4):
        modes = set_step(eager, step, 10)
        assert set_step(comp, step, 10) == modes
        before = compile_counts()
        want = StepGrads(eager, eager, nullcontext, 2, 1.0).run(micro, modes)
        got = StepGrads(comp, comp, nullcontext, 2, 1.0).run(micro, modes)
        compiled_per_step.append(compile_counts() - before)
        assert got[0].item() == pytest.approx(want[0].item(), rel=1e-6)
        assert got[1].item() == pytest.approx(want[1].item(), rel=1e-5)
        for p, q in zip(eager.parameters(), comp.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
    # step 0: one block graph (shared by both blocks) + the loss head; step 2: the block in mode "sparse"
    assert compiled_per_step == [2, 0, 1, 0]


def test_evaluation_through_compiled_regions_compiles_once_and_equals_eager(dataset):
    """evaluate() runs full batches through the compiled regions (one no-grad graph per region, compiled at the
    first evaluation and reused after) and a last, smaller batch eagerly (no compile for its shape); the loss is
    the uncompiled model's."""
    from contextlib import nullcontext

    from elas.data.loader import TokenWindows
    from elas.train.parallelize import compile_counts, compile_regions
    from elas.train.trainer import evaluate
    torch._dynamo.reset()
    eager, comp = _model("elas", "cpu", dense_warmup_steps=0), _model("elas", "cpu", dense_warmup_steps=0)
    for m in (eager, comp):
        set_step(m, 5, 10)  # sparse
    compile_regions(comp, backend="aot_eager")
    windows = TokenWindows(dataset, "val", 32)
    assert windows.n >= 5
    tokens = 5 * 32  # 5 windows: batches of 2, 2 and 1
    want = evaluate(eager, windows, tokens, 2, "cpu", nullcontext)
    counts = []
    for _ in range(2):
        before = compile_counts()
        got = evaluate(comp, windows, tokens, 2, "cpu", nullcontext)
        counts.append(compile_counts() - before)
        assert got[1] == want[1] == 5 * 32 and got[0] == pytest.approx(want[0], rel=1e-6)
    assert counts == [2, 0]  # the block (shared by both blocks) and the loss head, once; the batch of 1: none


@pytest.mark.gpu
@pytest.mark.parametrize("variant,checkpointed", [("lowrank-relu2", False), ("elas", False), ("relu2-24", False),
                                                  ("elas", True), ("relu2-24", True)])
def test_gpu_compiled_graph_step_equals_eager_step(variant, checkpointed):
    """The trainer's default on CUDA: Inductor-compiled regions inside the captured step; checkpointed: with
    activation checkpointing (the packed 2:4 operator recomputed in the backward)."""
    _compiled_graph_step_vs_eager(variant, checkpointed)


def _compiled_graph_step_vs_eager(variant: str, checkpointed: bool = False, **keys):
    """The plain model (three q, k, v GEMMs) run eagerly against one with `keys` compiled and replayed as the
    trainer does; keys that are not kernel keys (d_model) shape both."""
    from elas.config import KERNEL_KEYS
    from elas.train.parallelize import checkpoint_blocks, compile_regions
    torch._dynamo.reset()
    shape = {k: v for k, v in keys.items() if k not in KERNEL_KEYS}
    eager = _model(variant, "cuda", dense_warmup_steps=0, fuse_qkv=False, **shape)
    comp = _model(variant, "cuda", dense_warmup_steps=0, **keys)
    if keys.get("fuse_qkv"):  # (the default: d_model=256 makes the attention low-rank, so that it fuses)
        assert comp.blocks[0].attn.fuse_qkv
    set_step(eager, 0, 1), set_step(comp, 0, 1)
    if checkpointed:
        checkpoint_blocks(comp)
    compile_regions(comp)
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    micro = _batches(2, 4, 64)
    l0, n0 = StepGrads(eager, eager, bf16, grad_accum=2, grad_clip=1.0).run(micro, mode=True)
    graphed = StepGrads(comp, comp, bf16, grad_accum=2, grad_clip=1.0, graphs=True)
    for seed in (1, 0):
        l1, n1 = graphed.run(_batches(2, 4, 64, seed), mode=True)
    assert graphed.graphs and graphed.captures == 1, "capture fell back to eager"
    assert l1.item() == pytest.approx(l0.item(), rel=2e-3) and n1.item() == pytest.approx(n0.item(), rel=2e-2)
    for p, q in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["lowrank-relu2", "elas"])
@pytest.mark.parametrize("keys", [{"attn_backend": "cudnn"}, {"fuse_qkv": True, "d_model": 256}, {"pdl": True},
                                  {"defer_residual": True}])
def test_gpu_model_keys_on_the_compiled_graph_step_equal_the_default(variant, keys):
    """model.attn_backend=cudnn, model.fuse_qkv=true, model.pdl=true and model.defer_residual=true inside the
    trainer's default step (compiled regions in a captured graph): the loss, norm and gradients of the default
    model run eagerly."""
    _compiled_graph_step_vs_eager(variant, **keys)


def test_pdl_key_reaches_only_the_compiled_regions(monkeypatch):
    """model.pdl=true: compile_regions passes Inductor's triton.enable_pdl to each block and the loss head (and
    nothing otherwise), leaving the global Inductor config alone; a torch without the option gets a one-line error."""
    import torch._inductor.config as inductor
    from elas.train import parallelize
    seen, before = [], inductor.triton.enable_pdl
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)  # nn.Module.compile calls it too
    for pdl in (False, True):
        seen.clear()
        model = _model("lowrank-relu2", "cpu", pdl=pdl)
        parallelize.compile_regions(model)
        assert len(seen) == len(model.blocks) + 1
        assert all(kw.get("options") == ({"triton.enable_pdl": True} if pdl else None) for kw in seen), seen
    assert inductor.triton.enable_pdl == before
    monkeypatch.delattr(inductor.triton, "enable_pdl", raising=False)
    with pytest.raises(ValueError, match="model.pdl=true needs"):
        parallelize.compile_regions(_model("lowrank-relu2", "cpu", pdl=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs Hopper or later")
def test_gpu_pdl_kernels_wait_on_the_device():
    """model.pdl=true: the compiled block's Triton kernels carry the device-side wait (gdc_wait) that makes an
    early launch safe, and the block's output equals the block compiled without it, to bf16 rounding: the two
    compilations may choose different kernel configurations (reduction orders), and did on an H100."""
    from torch._inductor.utils import run_and_get_code
    from elas.train.parallelize import compile_regions
    outs, codes = [], []
    for pdl in (False, True):
        torch._dynamo.reset()
        model = _model("lowrank-relu2", "cuda", pdl=pdl)
        compile_regions(model)
        idx = torch.randint(0, model.cfg.vocab_size, (2, 64), device="cuda")
        # (a cached graph would come back without its code being written: compiled afresh)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch._inductor.config.patch(fx_graph_cache=False):
            loss, code = run_and_get_code(lambda: model(idx, idx))
        outs.append(loss.float())
        codes.append("\n".join(code))
    assert "gdc_wait" in codes[1] and "gdc_wait" not in codes[0]
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=0)


def test_clipping_folded_into_fused_adamw_equals_clip_then_step():
    """With a fused AdamW, StepGrads leaves the gradients unscaled and hands max(1, norm / clip) to the optimizer
    as its grad_scale (one pass over the gradients fewer); the parameters after the step equal clip_grad_norm_
    followed by the step, whether the clip bites (0.05) or not (100)."""
    from contextlib import nullcontext
    micro = _batches(2, 2, 16)
    for clip in (0.05, 100.0):
        ref, folded = _model("lowrank-relu2", "cpu"), _model("lowrank-relu2", "cpu")
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (ref, folded)]
        for _ in range(2):
            _, want_norm, _ = _manual(ref, micro, clip, nullcontext)
            opts[0].step()
            sg = StepGrads(folded, folded, nullcontext, 2, clip, clip_into=opts[1])
            _, norm = sg.run(micro, mode=True)
            assert sg.clip_into is opts[1] and norm.item() == pytest.approx(want_norm, rel=1e-5)
            opts[1].step()
        for p, q in zip(ref.parameters(), folded.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # an optimizer that cannot take a grad_scale (not fused) keeps clip_grad_norm_
    m = _model("lowrank-relu2", "cpu")
    assert StepGrads(m, m, nullcontext, 1, 1.0, clip_into=torch.optim.AdamW(m.parameters())).clip_into is None


@pytest.mark.parametrize("variant", ["elas", "relu2-24"])
def test_activation_checkpointing_recomputes_exactly_and_saves_less(variant):
    """checkpoint_blocks: the same losses and gradients bit for bit (the 2:4 selection recomputes exactly), far
    fewer bytes kept for the backward, the same state-dict keys; compiled (aot_eager) it traces in one graph per
    block mode and still equals eager."""
    from contextlib import nullcontext

    from elas.train.parallelize import checkpoint_blocks, compile_counts, compile_regions
    micro = _batches(1, 2, 32)
    plain, ckpt = _model(variant, "cpu", dense_warmup_steps=0), _model(variant, "cpu", dense_warmup_steps=0)
    keys = list(ckpt.state_dict())
    checkpoint_blocks(ckpt)
    checkpoint_blocks(ckpt)  # idempotent
    assert list(ckpt.state_dict()) == keys
    for m in (plain, ckpt):
        set_step(m, 0, 1)

    def saved_bytes(model):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            model(*micro[0])
        return sum(sizes)

    assert saved_bytes(ckpt) < 0.6 * saved_bytes(plain)
    want = StepGrads(plain, plain, nullcontext, 1, 1.0).run(micro, True)
    got = StepGrads(ckpt, ckpt, nullcontext, 1, 1.0).run(micro, True)
    assert got[0].item() == want[0].item() and got[1].item() == want[1].item()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad)
    with torch.no_grad():  # evaluation: no checkpoint, the plain forward
        assert torch.equal(ckpt(micro[0][0]), plain(micro[0][0]))
    torch._dynamo.reset()
    compile_regions(ckpt, backend="aot_eager")
    before = compile_counts()
    comp = StepGrads(ckpt, ckpt, nullcontext, 1, 1.0).run(micro, True)
    assert compile_counts() - before == 2  # the (checkpointed) block, shared by both blocks, and the loss head
    assert comp[0].item() == pytest.approx(want[0].item(), rel=1e-6)
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)


def test_trainer_with_activation_checkpointing_logs_it_and_matches(dataset, tmp_path):
    runs = {}
    for ac in ("false", "true"):
        out = tmp_path / ac
        r = run_cli("train", "--preset", "llama-tiny-elas", "--data", str(dataset), "--out", str(out), "--no-progress",
                    *TINY, "--max-steps", "3", "--set", "eval_every=3", "--set", "log_every=1", "--set",
                    f"activation_checkpointing={ac}")
        assert r.returncode == 0, r.stderr
        assert ("activation checkpointing" in r.stdout) == (ac == "true")
        runs[ac] = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(ln)]
    assert runs["true"] == runs["false"] and len(runs["true"]) == 3



@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["elas", "relu2-24"])
def test_gpu_fsdp2_on_the_packed_path_equals_the_unsharded_model(tmp_path, variant):
    """FSDP2 (a one-process NCCL group) over compiled blocks on the accelerated 2:4 path: built on meta for the
    GPU, sharded, initialised by name; its loss and gradients equal the unsharded model's (same initial values)
    up to bf16 rounding: gathers in bf16 there, autocast casts here."""
    import torch.distributed as dist

    from elas.train.parallelize import compile_regions, shard_fsdp
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        name = f"llama-tiny-{variant}"
        cfg = model_preset(name, **SMALL, **({"rank": 64} if variant == "elas" else {}))
        cfg.method("act24")["dense_warmup_steps"] = 0
        (x, y), = _batches(1, 4, 64)
        x, y = x.cuda(), y.cuda()
        out = {}
        for sharded in (False, True):
            model = build_model(cfg, "meta", materialise_on="cuda")
            assert "accelerated path" in next(m.description for m in model.modules() if hasattr(m, "description"))
            compile_regions(model)
            if sharded:
                shard_fsdp(model, torch.device("cuda"), bf16=True)
            model.to_empty(device="cuda")
            model.init_weights(0)
            set_step(model, 0, 1)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not sharded):
                loss = model(x, y)
            loss.backward()
            grads = {n: (p.grad.full_tensor() if sharded else p.grad).float() for n, p in model.named_parameters()}
            out[sharded] = (loss.item(), grads)
        (l0, g0), (l1, g1) = out[False], out[True]
        assert l1 == pytest.approx(l0, rel=1e-2)
        assert g0.keys() == g1.keys()
        for n in g0:
            assert ((g1[n] - g0[n]).norm() / g0[n].norm().clamp(min=1e-12)).item() < 5e-2, n
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant,norm_kernel,residual_dtype", [
    ("lowrank-relu2", "torch", "compute"), ("elas", "fused", "compute"), ("relu2-24", "torch", "fp32")])
@pytest.mark.parametrize("autocast", [False, True])
def test_deferred_residual_computes_what_the_plain_blocks_do(variant, norm_kernel, residual_dtype, autocast):
    """model.defer_residual: each block hands the next its FFN output and the next adds it where it normalises (the
    last: the loss head). The same adds in the same order: losses and gradients bit for bit, eagerly (with and
    without grad accumulation) and compiled, where every block runs one graph (the first block's
    zeros are an FFN output's kind: its dtype, requiring grad), also with an fp32 residual stream under bf16
    autocast; logits, and decoding with and without a KV cache, unchanged."""
    from contextlib import nullcontext

    from elas.model.generate import sample
    from elas.train.parallelize import compile_counts, compile_regions
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else nullcontext
    micro = _batches(2, 2, 32)
    keys = dict(dense_warmup_steps=0, norm_kernel=norm_kernel, residual_dtype=residual_dtype)
    plain, defer = _model(variant, "cpu", **keys), _model(variant, "cpu", defer_residual=True, **keys)
    for m in (plain, defer):
        set_step(m, 0, 1)
    for accum in (1, 2):
        want = StepGrads(plain, plain, ctx, accum, 1.0).run(micro[:accum], True)
        got = StepGrads(defer, defer, ctx, accum, 1.0).run(micro[:accum], True)
        assert got[0].item() == want[0].item() and got[1].item() == want[1].item()
        for p, q in zip(plain.parameters(), defer.parameters()):
            assert torch.equal(p.grad, q.grad)
    with torch.no_grad(), ctx():
        assert torch.equal(defer(micro[0][0]), plain(micro[0][0]))  # logits
    prompt = micro[0][0][:1, :8]
    for cache in (True, False):  # (with the cache the plain form; without, every step the deferred one)
        assert torch.equal(sample(defer, prompt, 4, temperature=0.0, use_cache=cache),
                           sample(plain, prompt, 4, temperature=0.0, use_cache=cache))
    torch._dynamo.reset()
    for m in (plain, defer):
        compile_regions(m, backend="aot_eager")
    want = StepGrads(plain, plain, ctx, 2, 1.0).run(micro, True)
    counts = []
    for _ in range(2):
        before = compile_counts()
        got = StepGrads(defer, defer, ctx, 2, 1.0).run(micro, True)
        counts.append(compile_counts() - before)
        assert got[0].item() == want[0].item()
    assert counts == [2, 0]  # the block (one graph for both blocks) and the loss head, once
    for p, q in zip(plain.parameters(), defer.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_deferred_residual_with_checkpointing_equals_and_the_trainer_refuses_it():
    """Checkpointed deferred blocks compute the same (bit for bit), but each keeps two inputs (x and the pending
    FFN output: one more [batch, seq, d_model] a layer), so the trainer's config refuses the pair."""
    from contextlib import nullcontext

    from elas.config import TrainConfig
    from elas.train.parallelize import checkpoint_blocks
    micro = _batches(1, 2, 32)
    plain, defer = _model("elas", "cpu", dense_warmup_steps=0), _model("elas", "cpu", dense_warmup_steps=0,
                                                                       defer_residual=True)
    checkpoint_blocks(defer)
    for m in (plain, defer):
        set_step(m, 0, 1)
    want = StepGrads(plain, plain, nullcontext, 1, 1.0).run(micro, True)
    got = StepGrads(defer, defer, nullcontext, 1, 1.0).run(micro, True)
    assert got[0].item() == want[0].item()
    for p, q in zip(plain.parameters(), defer.parameters()):
        assert torch.equal(p.grad, q.grad)
    cfg = TrainConfig(model=defer.cfg, seq_len=32, activation_checkpointing=True)
    with pytest.raises(ValueError, match="activation_checkpointing=true with model.defer_residual=true"):
        cfg.validate()


def test_a_resume_keeps_this_runs_adamw_implementation(tmp_path):
    """A checkpoint of a CPU run (torch AdamW with foreach/fused off) resumed where AdamW is fused (CUDA; fused
    AdamW on CPU stands in here): the groups keep this run's implementation, which takes the clip folded into
    grad_scale (the saved groups' flags made the resumed step fail)."""
    from contextlib import nullcontext
    from elas.train.checkpoint import load_optimizer, save_checkpoint

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 4)
        return m, [{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias], "weight_decay": 0.0}]

    x, y = torch.randn(2, 4), torch.randn(2, 4)
    m, groups = make()
    opt = torch.optim.AdamW(groups, lr=1e-3, eps=1e-8, foreach=False)
    StepGrads(m, lambda a, b: ((m(a) - b) ** 2).mean(), nullcontext, 1, 1.0, optimizer=opt).run([(x, y)])
    ck = save_checkpoint(tmp_path, 1, m, opt, {"step": 1, "tokens": 0})
    m2, groups2 = make()
    opt2 = torch.optim.AdamW(groups2, lr=1e-3, eps=1e-8, fused=True)
    load_optimizer(ck, m2, opt2)
    assert all(g["fused"] and not g["foreach"] for g in opt2.param_groups)
    StepGrads(m2, lambda a, b: ((m2(a) - b) ** 2).mean(), nullcontext, 1, 1.0, optimizer=opt2).run([(x, y)])
    assert int(opt2.state[m2.weight]["step"]) == 2


@pytest.mark.parametrize("kind", ["master", "loro"])
def test_clip_norm_of_bf16_gradients_is_fp32_on_the_reference_backend(kind):
    """bf16 parameters on the reference backend (CPU, or CUDA without Triton): the clipping norm is the fp32 norm of
    the bf16 gradients, as the Triton backend's grad_norm kernel gives (torch's foreach norm of bf16 tensors is a
    bf16 number: the clip coefficient and the logged grad_norm were rounded to 8 bits, and the + 1e-6 vanished)."""
    from elas.model.lowrank import LowRankLinear
    from elas.optim import LOROAdamW, MasterAdamW
    torch.manual_seed(0)
    model = torch.nn.Sequential(LowRankLinear(64, 48, 8), torch.nn.Linear(48, 32)).to(torch.bfloat16)
    if kind == "master":
        opt = MasterAdamW(model.parameters(), lr=1e-3, backend="reference")
    else:
        opt = LOROAdamW(model, lr=1e-3, exact_every=100, d_model=64, backend="reference")
    x, y = torch.randn(16, 64).bfloat16(), torch.randn(16, 32).bfloat16()
    fwd = lambda a, b: (model(a).float() - b.float()).pow(2).mean()  # noqa: E731
    fwd(x, y).backward()
    want = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    opt.zero_grad(set_to_none=True)
    from contextlib import nullcontext
    sg = StepGrads(model, fwd, nullcontext, grad_accum=1, grad_clip=1e-3, optimizer=opt)
    _, gnorm = sg.run([(x, y)])
    assert gnorm.dtype == torch.float32
    torch.testing.assert_close(gnorm, want, rtol=1e-6, atol=0)
    if kind == "master":  # the clip folded into the update: max(1, (norm + 1e-6) / clip) in fp32
        assert opt.grad_scale.dtype == torch.float32
        torch.testing.assert_close(opt.grad_scale, (want + 1e-6) / 1e-3, rtol=1e-6, atol=0)
