"""Zero graph breaks: torch.compile(model, fullgraph=True) traces every 2:4 variant, dense warm-up and sparse.

On CPU the operators run their reference implementations (the packed path forced with path="packed", the masked
path by default); `aot_eager` traces forward and backward through AOTAutograd without Inductor. Compiled and
eager losses and gradients must agree. The GPU test does the same with the real operators (Triton, cuSPARSELt)."""
import pytest
import torch

from elas.build import build_model
from elas.sparsity import set_step

from conftest import preset

VARIANTS = ["elas", "elas-mask", "relu2-24"]


def _compiled_vs_eager(model, idx, backend):
    import torch._dynamo as dynamo
    dynamo.reset()
    explain = dynamo.explain(model)(idx, idx)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = []
    for fwd in (compiled, model):
        model.zero_grad(set_to_none=True)
        loss = fwd(idx, idx)
        loss.backward()
        out.append((loss.detach().float(), [p.grad.float().clone() for p in model.parameters()]))
    return explain, out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", ["masked", "packed"])
def test_fullgraph_on_the_reference_operators(variant, path):
    cfg = preset(f"llama-tiny-{variant}", 10, n_layers=2, vocab_size=256)
    cfg.method("act24")["path"] = path
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(0, 256, (2, 64))  # 128 tokens: the packed layout's multiple of 64
    for step, mode in ((0, "dense"), (10, "sparse")):
        assert set_step(model, step, 100) == (mode,)
        explain, ((lc, gc), (le, ge)) = _compiled_vs_eager(model, idx, "aot_eager")
        assert (explain.graph_count, explain.graph_break_count) == (1, 0), (mode, explain.break_reasons)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_fullgraph_with_the_real_operators(variant):
    """Inductor over the Triton/cuSPARSELt operators; bf16 autocast as in training."""
    cfg = preset(f"llama-tiny-{variant}", 10, n_layers=2, vocab_size=512, d_model=128, n_heads=2, intermediate=852,
                 max_seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda")
    assert all(c.packed for a in model._elas_methods for _, c in a.targets)
    idx = torch.randint(0, 512, (4, 64), device="cuda")
    for step in (0, 10):
        set_step(model, step, 100)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            explain, ((lc, gc), (le, ge)) = _compiled_vs_eager(model, idx, "inductor")
        assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
        assert abs(lc.item() - le.item()) < 2e-2 * abs(le.item())
        # Inductor reorders bf16 arithmetic, so y1 differs in its last bits and a 2:4 selection between near-equal
        # values can flip; in mask mode dy1 follows the selection, so a small tensor's gradient can move by a few
        # percent (measured 5.1% on one [128] gradient, H200, torch 2.11): per tensor 10% there, 5% elsewhere
        tol = 1e-1 if "mask" in variant and step else 5e-2
        for a, b in zip(gc, ge):
            assert ((a - b).norm() / b.norm().clamp(min=1e-12)).item() < tol


@pytest.mark.parametrize("attn_backend", ["math", "cudnn"])
def test_attention_backend_choice_traces_and_keeps_the_loss(attn_backend):
    """model.attn_backend puts one SDPA backend first (torch's others follow: on CPU `cudnn` falls through to the
    math kernel): the model still compiles as one graph, and loss and gradients equal the default's."""
    import torch._dynamo as dynamo
    torch.manual_seed(0)
    base = build_model(preset("llama-tiny-lowrank-relu2", n_layers=2, vocab_size=256))
    chosen = build_model(preset("llama-tiny-lowrank-relu2", n_layers=2, vocab_size=256, attn_backend=attn_backend))
    chosen.load_state_dict(base.state_dict())
    assert base.blocks[0].attn.backends is None and chosen.blocks[0].attn.backends[0].name.lower().startswith(
        {"math": "math", "cudnn": "cudnn"}[attn_backend])
    idx = torch.randint(0, 256, (2, 32))
    explain, ((lc, gc), (le, ge)) = _compiled_vs_eager(chosen, idx, "aot_eager")
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
    dynamo.reset()
    want = base(idx, idx)
    want.backward()
    torch.testing.assert_close(lc, want.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(gc, base.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_every_elas_operator_lowers_through_inductor():
    """Inductor runs an elas:: operator through its fallback, whose factory takes the operator as its own `kernel`
    argument: a schema argument of a reserved name fails there ("got multiple values for argument 'kernel'"),
    though eager and aot_eager run. So no operator's schema may use one, and the ReLU^2 core's operator (the one
    that did) compiles with Inductor on the CPU, its loss and gradients equal to eager's."""
    import inspect
    from torch._inductor.ir import FallbackKernel
    from elas.kernels import ops
    reserved = set(inspect.signature(FallbackKernel.create).parameters) - {"args", "kwargs"}
    names = [n for n in dir(torch.ops.elas) if not n.startswith("_") and n != "name"]
    assert "relu2_ffn" in names and len(names) >= 10  # the operators registered by importing elas.kernels
    for n in names:
        for ov in getattr(torch.ops.elas, n).overloads():
            args = {a.name for a in getattr(torch.ops.elas, n).__getattr__(ov)._schema.arguments}
            assert not args & reserved, f"elas::{n} has argument(s) {args & reserved}, reserved by Inductor"
    h1, wu, wd = (torch.randn(s, requires_grad=True) for s in ((16, 8), (24, 8), (24, 4)))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: ops.relu2_ffn(a, b, c, kernel="cutlass").sum(), fullgraph=True)
    out = []
    for fn in (f, lambda a, b, c: ops.relu2_ffn(a, b, c, kernel="cutlass").sum()):
        loss = fn(h1, wu, wd)
        grads = torch.autograd.grad(loss, (h1, wu, wd))
        out.append((loss.detach(), grads))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(out[0][1], out[1][1]))


def test_a_schedule_of_many_modes_compiles_every_one(monkeypatch):
    """Two methods switching at different steps (2:4 weights dense 2 steps, sparse to 6; V:N:M dense 4, sparse to
    10): five mode combinations, each a training and an evaluation graph of every compiled region. Dynamo's
    default limit (8 per code object) stopped such a run at its fifth mode (a hard failure under fullgraph); the
    trainer raises it from the schedule (run_modes, allow_mode_graphs) before compiling."""
    from contextlib import nullcontext

    import torch._dynamo.config as dynamo

    from elas.config import model_preset
    from elas.sparsity import run_modes
    from elas.train.parallelize import allow_mode_graphs, compile_counts, compile_regions
    from elas.train.step import StepGrads
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo, name, 8)  # (torch's default; restored after the test)
    cfg = model_preset("llama-tiny-relu2-w24-vnm", n_layers=1, d_model=64, n_heads=2, intermediate=128,
                       vocab_size=256, max_seq_len=32)
    for m in cfg.methods:
        m.update({"vnm": dict(dense_warmup_steps=4, sparse_until=10, recluster_steps=2, v=32),
                  "sste24": dict(dense_warmup_steps=2, sparse_until=6)}[m["method"]])
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    steps = 12
    modes = run_modes(model, steps)
    assert {(a, b.split("/")[0]) for a, b in modes} == {("dense", "dense"), ("sparse", "dense"), ("sparse", "sparse"),
                                                       ("dense-final", "sparse"), ("dense-final", "dense-final")}
    assert allow_mode_graphs(len(modes)) >= 2 * 5
    compile_regions(model, backend="aot_eager")
    idx = torch.randint(0, 256, (2, 2, 33))
    micro = [(idx[k, :, :-1], idx[k, :, 1:]) for k in range(2)]
    grads = StepGrads(model, model, nullcontext, 2, 1.0)
    before = compile_counts()
    for step in range(steps):
        grads.run(micro, set_step(model, step, steps))
        with torch.no_grad():
            model.eval()
            model(*micro[0])
            model.train()
    assert compile_counts() - before >= 2 * 5  # every mode's training and evaluation graphs, none refused
    torch._dynamo.reset()
