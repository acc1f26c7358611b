"""model.norm_kernel=fused: the blocks' RMSNorm backward as one pass (kernels/cuda/rmsnorm.py, kernels/ops.py
residual_rmsnorm). CPU: the reference against autograd of the model's RMSNorm, the Triton kernel under
TRITON_INTERPRET=1 against the reference, the model key through autograd and torch.compile. GPU: the kernel on the
1B shape against the reference."""
import pytest
import torch

from elas.kernels import reference as ref
from elas.model.llama import RMSNorm


def _autograd(x, w, eps, dn, dres):
    """The gradients autograd gives for (x passed on, RMSNorm(x)) with upstream gradients (dres, dn)."""
    x = x.detach().requires_grad_()
    norm = RMSNorm(x.shape[-1], eps).to(w.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    out = norm(x)
    torch.autograd.backward([x, out], [dres, dn]) if dres is not None else out.backward(dn)
    return x.grad, norm.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_res", [True, False])
def test_reference_is_autograd_of_the_norm(dtype, with_res):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    dn, dres = torch.randn(3, 5, 48, generator=g).to(dtype), torch.randn(3, 5, 48, generator=g).to(dtype)
    dx, dw = ref.rmsnorm_backward(dn, x, dres if with_res else None, w, 1e-6)
    want_dx, want_dw = _autograd(x, w, 1e-6, dn, dres if with_res else None)
    assert dx.dtype == dtype and dw.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx, want_dx, **tol)
    torch.testing.assert_close(dw, want_dw, **tol)


@pytest.mark.parametrize("t, d, programs, rows", [(37, 48, 3, None), (37, 48, 3, 4), (8, 2048, 2, None),
                                                  (5, 100, 8, None)])
def test_triton_kernel_matches_the_reference(t, d, programs, rows):
    """Under the interpreter on CPU (CI sets TRITON_INTERPRET=1), on the GPU natively: rows not a multiple of
    ROWS, d not a power of two, programs sharing the rows unevenly; both loop forms (plain, and prefetching the
    next tile, whose last prefetch reads past the rows and must add nothing), each with dres loaded after the
    reductions or with x and dn (res_first), and the two row sums one after the other or as one reduction of
    pairs (fused_sums)."""
    pytest.importorskip("triton")
    from elas.kernels.cuda.rmsnorm import rmsnorm_backward
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    x, dn, dres = (torch.randn(t, d, generator=g) for _ in range(3))
    x = x * (0.2 + 3 * torch.rand(t, 1, generator=g))  # rows of different scales: rstd far from 1, and not one value
    x, dn, dres = (v.to(dev, torch.bfloat16) for v in (x, dn, dres))
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dev)  # fp32 weight with bf16 activations, as under autocast
    for r, prefetch, first, fused in ((dres, False, False, False), (None, False, False, False),
                                      (dres, True, False, False), (None, True, False, False),
                                      (dres, False, True, False), (None, False, True, False),
                                      (dres, True, True, False), (None, True, True, False),
                                      (dres, False, False, True), (dres, True, True, True), (None, True, False, True)):
        dx, dw = rmsnorm_backward(dn, x, r, w, 1e-6, programs=programs, rows=rows, prefetch=prefetch,
                                  res_first=first, fused_sums=fused)
        want_dx, want_dw = ref.rmsnorm_backward(dn, x, r, w, 1e-6)
        assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
        # dx: one bf16 rounding of the same fp32 math; dw: fp32 sums in another order
        torch.testing.assert_close(dx.float(), want_dx.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dw, want_dw, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected"):
        rmsnorm_backward(dn, x, None, w[:-1], 1e-6)
    with pytest.raises(ValueError, match="rows=3: expected a power of two"):
        rmsnorm_backward(dn, x, None, w, 1e-6, rows=3)


def test_launch_settings_defaults_arguments_and_bad_values(monkeypatch):
    """The defaults (4096-element tiles, 4 warps; from d = 2048 the 1B sweep's fastest: 2 programs per SM, the
    prefetching loop, dres first, fused sums), an argument over them (false included), and a bad value of each
    knob as a one-line error naming it."""
    pytest.importorskip("triton")
    from elas.kernels.cuda import rmsnorm
    from elas.kernels.cuda.rmsnorm import launch_settings
    monkeypatch.setattr(rmsnorm, "_OVERRIDE", {})  # (the built-in defaults, whatever this process's environment)
    base = {"per_sm": 4, "rows": 8, "num_warps": 4, "prefetch": False, "res_first": False, "fused_sums": False}
    assert launch_settings(512) == base
    assert launch_settings(1024) == {**base, "rows": 4}
    swept = {"per_sm": 2, "rows": 2, "num_warps": 4, "prefetch": True, "res_first": True, "fused_sums": True}
    assert launch_settings(2048) == swept
    assert launch_settings(4096) == {**swept, "rows": 1}
    assert launch_settings(2048, rows=8, prefetch=False, res_first=False) == {**swept, "rows": 8, "prefetch": False,
                                                                             "res_first": False}
    assert launch_settings(512, per_sm=2, fused_sums=True) == {**base, "per_sm": 2, "fused_sums": True}
    for kw, match in (({"per_sm": 0}, "per_sm=0: expected an integer >= 1"),
                      ({"per_sm": True}, "per_sm=True: expected an integer"),
                      ({"rows": 6}, "rows=6: expected a power of two"),
                      ({"rows": 128}, "rows=128: expected a power of two 1-64"),
                      ({"num_warps": 3}, "num_warps=3: expected a power of two 1-32"),
                      ({"num_warps": 8.0}, "num_warps=8.0: expected a power of two"),
                      ({"prefetch": 1}, "prefetch=1: expected true or false"),
                      ({"res_first": "yes"}, "res_first='yes': expected true or false"),
                      ({"fused_sums": 0}, "fused_sums=0: expected true or false")):
        with pytest.raises(ValueError, match=match):
            launch_settings(2048, **kw)


def _env_run(code: str, value: str):
    import os
    import subprocess
    import sys
    env = {**os.environ, "ELAS_RMSNORM_CONFIG": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_env_overrides_the_launch_settings_and_bad_values_fail_at_import():
    """ELAS_RMSNORM_CONFIG (what benchmarks/rmsnorm_bwd.py --sweep prints) sets the knobs it names for the process,
    an argument still wins; an unknown key or a bad value fails with one line naming it (the key at import, the
    value too, naming the variable)."""
    pytest.importorskip("triton")
    code = ("from elas.kernels.cuda.rmsnorm import launch_settings as s; "
            "print(s(2048)['rows'], s(2048)['prefetch'], s(2048)['res_first'], s(2048)['fused_sums'], "
            "s(2048)['per_sm'], s(2048, rows=2)['rows'])")
    out = _env_run(code, '{"rows": 4, "prefetch": false, "res_first": false, "fused_sums": false}')
    assert out.stdout.split() == ["4", "False", "False", "False", "2", "2"], out.stderr[-500:]
    out = _env_run(code, '{"row": 4}')
    assert out.returncode != 0 and "ELAS_RMSNORM_CONFIG" in out.stderr and "unknown key 'row'" in out.stderr
    out = _env_run(code, '{"rows": 3}')
    assert out.returncode != 0 and "ELAS_RMSNORM_CONFIG='{\"rows\": 3}'" in out.stderr
    assert "rows=3: expected a power of two" in out.stderr
    out = _env_run("import elas.kernels.cuda.rmsnorm", '{"prefetch": 1}')  # at import, before any launch
    assert out.returncode != 0 and "prefetch=1: expected true or false" in out.stderr


def test_env_config_parses_an_object_of_known_keys():
    """The kernels' shared reader of ELAS_<KERNEL>_CONFIG: unset or empty is {}, and anything but a JSON object
    of known keys is a one-line error naming the variable and the keys."""
    from elas.kernels.cuda.overrides import env_config
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("ELAS_TEST_CONFIG", raising=False)
        assert env_config("ELAS_TEST_CONFIG", ("a", "b")) == {}
        mp.setenv("ELAS_TEST_CONFIG", "")
        assert env_config("ELAS_TEST_CONFIG", ("a", "b")) == {}
        mp.setenv("ELAS_TEST_CONFIG", '{"b": 2}')
        assert env_config("ELAS_TEST_CONFIG", ("a", "b")) == {"b": 2}
        for raw, match in (('{"c": 1}', "unknown key 'c'; expected an object with keys among a, b"),
                           ("[1, 2]", "not a JSON object"), ("{a: 1}", "not JSON")):
            mp.setenv("ELAS_TEST_CONFIG", raw)
            with pytest.raises(ValueError, match=match):
                env_config("ELAS_TEST_CONFIG", ("a", "b"))


def _pair(variant="lowrank-relu2", device="cpu"):
    from conftest import preset
    from elas.build import build_model
    cfg = preset(f"llama-tiny-{variant}", None, n_layers=2, vocab_size=256)
    torch.manual_seed(0)
    plain = build_model(cfg, device)
    cfg.norm_kernel = "fused"
    fused = build_model(cfg, device)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _loss_grads(model, idx):
    model.zero_grad(set_to_none=True)
    loss = model(idx, idx)
    loss.backward()
    # names without torch.compile's wrapper prefix
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def test_model_key_gives_the_same_loss_and_gradients():
    plain, fused = _pair()
    assert fused.blocks[0].attn_norm.residual_split is not None and fused.norm.residual_split is None
    idx = torch.randint(0, 256, (2, 16))
    (l1, g1), (l2, g2) = _loss_grads(plain, idx), _loss_grads(fused, idx)
    assert torch.equal(l1, l2)  # the forward is the same ops
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_model_key_compiles_without_graph_breaks():
    import torch._dynamo as dynamo
    _, fused = _pair()
    idx = torch.randint(0, 256, (2, 16))
    dynamo.reset()
    explain = dynamo.explain(fused)(idx, idx)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
    want = _loss_grads(fused, idx)
    got = _loss_grads(torch.compile(fused, fullgraph=True, backend="aot_eager"), idx)
    torch.testing.assert_close(got[0], want[0])
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], msg=n)


def test_bad_norm_kernel_is_a_one_line_error():
    from conftest import preset
    cfg = preset("llama-tiny-lowrank-relu2", None)
    cfg.norm_kernel = "triton"
    with pytest.raises(ValueError, match="norm_kernel='triton'.*torch.*fused"):
        cfg.validate()


def test_norm_kernel_auto_is_fused_on_cuda_with_triton_and_recorded(monkeypatch):
    """The default (auto) resolves to the one-pass backward on CUDA where Triton is installed, to torch elsewhere;
    a config saved before the key (or before auto) loads as torch, the kernels it was trained with."""
    import importlib.util
    from conftest import preset
    from elas.build import build_model, norm_kernel
    from elas.config import ModelConfig, from_dict, to_dict
    cfg = preset("llama-tiny-lowrank-relu2", None)
    assert cfg.norm_kernel == "auto" and norm_kernel(cfg, "cpu") == "torch"
    assert all(b.attn_norm.residual_split is None for b in build_model(cfg, "cpu").blocks)
    from elas.kernels import ops
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    monkeypatch.setattr(ops, "_tk", object())  # (the operators' Triton kernels importable, as on a GPU machine)
    assert norm_kernel(cfg, "cuda") == "fused" and norm_kernel(cfg, torch.device("cuda", 1)) == "fused"
    monkeypatch.setattr(ops, "_tk", None)  # Triton there but the kernels not importable (torch without triton_op)
    assert norm_kernel(cfg, "cuda") == "torch"
    monkeypatch.setattr(ops, "_tk", object())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert norm_kernel(cfg, "cuda") == "torch"
    cfg.norm_kernel = "fused"
    assert norm_kernel(cfg, "cpu") == "fused"  # set: itself (its reference on the CPU)
    old = {k: v for k, v in to_dict(cfg).items() if k != "norm_kernel"}
    assert from_dict(ModelConfig, old).norm_kernel == "torch"


@pytest.mark.gpu
def test_gpu_kernel_at_the_1b_shape():
    from elas.kernels.cuda.rmsnorm import rmsnorm_backward
    x, dn, dres = (torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = 1 + 0.1 * torch.randn(2048, device="cuda")
    dx, dw = rmsnorm_backward(dn, x, dres, w, 1e-6)
    want_dx, want_dw = ref.rmsnorm_backward(dn, x, dres, w, 1e-6)
    assert (dx.float() - want_dx.float()).abs().max().item() <= 2 * want_dx.float().abs().max().item() * 2 ** -8
    torch.testing.assert_close(dw, want_dw, rtol=1e-3, atol=1e-2)


def test_both_kernel_keys_together_train_like_the_default():
    """norm_kernel=fused with relu2_kernel=cutlass (each falls back to its reference on the CPU): the same loss and
    gradients as the default model, so the two keys compose (the step benchmark times them together)."""
    from conftest import preset
    from elas.build import build_model
    cfg = preset("llama-tiny-lowrank-relu2", None, n_layers=2, vocab_size=256)
    torch.manual_seed(0)
    plain = build_model(cfg, "cpu")
    cfg.norm_kernel, cfg.relu2_kernel = "fused", "cutlass"
    both = build_model(cfg, "cpu")
    both.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    (l1, g1), (l2, g2) = _loss_grads(plain, idx), _loss_grads(both, idx)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-7)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_rmsnorm_backward_fake_matches_the_op_for_a_transposed_x():
    """elas::rmsnorm_backward's fake gives dx the real op's layout (contiguous) whatever x's strides are, so that a
    traced graph plans the buffer the kernel writes."""
    from elas.kernels import ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 32, generator=g).transpose(0, 1)  # [6, 4, 32], not contiguous
    dn, w = torch.randn(6, 4, 32, generator=g), torch.randn(32, generator=g)
    torch.library.opcheck(ops.rmsnorm_backward, (dn, x, None, w, 1e-6))
