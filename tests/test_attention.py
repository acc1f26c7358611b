"""model.attn_backend=triton: causal attention with the rotary embedding inside (kernels/cuda/attention.py).

CPU (CI): the Triton kernels under TRITON_INTERPRET=1 on small, odd shapes against the reference twin; the twin
against the model's default path (apply_rope + SDPA) and its autograd; the operator's registration (opcheck); the
model with the key against the default, eager and compiled without a graph break; bad settings. GPU: bf16 on the
1B shape against the default path, and a training step of the model.
"""
import pytest
import torch
import torch.nn.functional as F

from elas.build import build_model
from elas.config import model_preset
from elas.kernels import ops
from elas.kernels import reference as ref
from elas.model.llama import apply_rope, rope_tables

triton = pytest.importorskip("triton")
from elas.kernels.cuda import attention  # noqa: E402

SMALL_FWD = {"bm": 16, "bn": 16, "warps": 1, "stages": 1}
# (launch settings a test leaves out come from BWD_CONFIG, the defaults: these spell out the rotating backward that
# takes rowsum(dO * O) per query block, so that path stays tested whatever the defaults are)
SMALL_BWD = {"blk": 16, "warps": 1, "stages": 1, "delta_pre": False, "split": False, "save_rotated": False}
SMALL = {"warps": 1, "stages": 1, "delta_pre": False, "split": False, "save_rotated": False}


def default_path(q, k, v, cos, sin):
    """What Attention.forward computes with attn_backend=torch, [b, s, h, hd] in and out."""
    cos, sin = cos[:q.shape[1]], sin[:q.shape[1]]
    qr, kr = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
    return F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True).transpose(1, 2)


def qkv(b, s, h, d, dtype=torch.float32, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # q, k, v as column blocks of one [b, s, 3 h d] projection output (fuse_qkv's layout)
        x = torch.randn(b, s, 3 * h * d, generator=g, dtype=dtype)
        return tuple(t.view(b, s, h, d) for t in x.split(h * d, dim=-1))
    return tuple(torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(3))


def test_reference_is_the_default_path_and_its_gradient():
    b, s, h, d = 2, 24, 3, 32
    q, k, v = (t.requires_grad_() for t in qkv(b, s, h, d))
    cos, sin = rope_tables(d, 32, 10000.0)
    want = default_path(q, k, v, cos, sin)
    do = torch.randn_like(want)
    want.backward(do)
    o, lse = ref.rope_attention(q.detach(), k.detach(), v.detach(), cos, sin)
    torch.testing.assert_close(o, want.detach(), atol=1e-5, rtol=1e-5)
    assert lse.shape == (b * h, s) and lse.dtype == torch.float32
    grads = ref.rope_attention_backward(do, q.detach(), k.detach(), v.detach(), cos, sin)
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)
    # from the saved rotation (fp32: rounding it changes nothing): the same gradients w.r.t. the unrotated q, k
    _, _, qr, kr = ref.rope_attention(q.detach(), k.detach(), v.detach(), cos, sin, save_rotated=True)
    for got, t in zip(ref.rope_attention_backward(do, qr, kr, v.detach(), cos, sin, rotated=True), (q, k, v)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)
    # bf16: the saved rotation is apply_rope's (rounded alike), and the backward from it stays within bf16 rounding
    qb, kb, vb, dob = (t.detach().bfloat16() for t in (q, k, v, do))
    _, _, qr, kr = ref.rope_attention(qb, kb, vb, cos, sin, save_rotated=True)
    assert qr.dtype == torch.bfloat16
    assert torch.equal(qr, apply_rope(qb, cos[:s], sin[:s])) and torch.equal(kr, apply_rope(kb, cos[:s], sin[:s]))
    for got, want in zip(ref.rope_attention_backward(dob, qr, kr, vb, cos, sin, rotated=True),
                         ref.rope_attention_backward(dob, qb, kb, vb, cos, sin)):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("s,d,strided,fwd,bwd", [
    (40, 32, False, SMALL_FWD, SMALL_BWD), (33, 64, True, SMALL_FWD, SMALL_BWD), (16, 32, True, SMALL_FWD, SMALL_BWD),
    # query blocks wider than key blocks (as the defaults: 128 x 64) and the reverse, a diagonal inside a block
    (70, 32, False, {"bm": 32, "bn": 16, "warps": 1, "stages": 1}, {**SMALL, "blk": 32}),
    (17, 32, True, {"bm": 16, "bn": 32, "warps": 1, "stages": 1}, {**SMALL, "blk": 32}),
    (5, 32, False, {"bm": 64, "bn": 16, "warps": 1, "stages": 1}, {**SMALL, "blk": 64}),
    # the backward's other launch settings: sub-steps of 16 rows, rowsum(dO * O) in its own pass, two launches (and
    # a register cap, which the interpreter takes and ignores)
    (70, 32, True, {**SMALL_FWD, "maxnreg": 96}, {**SMALL, "blk": 32, "sub": 16, "maxnreg": 168}),
    (40, 64, False, SMALL_FWD, {**SMALL, "blk": 32, "sub": 16, "delta_pre": True, "split": True}),
    (33, 32, False, SMALL_FWD, {**SMALL, "blk": 16, "delta_pre": True}),
    (24, 32, True, SMALL_FWD, {**SMALL, "blk": 32, "split": True}),
    # the forward's saved rotation read by the backward (save_rotated), with the other settings
    (40, 32, True, SMALL_FWD, {**SMALL_BWD, "save_rotated": True}),
    (70, 64, False, {"bm": 32, "bn": 16, "warps": 1, "stages": 1},
     {**SMALL, "blk": 32, "sub": 16, "delta_pre": True, "split": True, "save_rotated": True}),
    # the committed defaults (FWD_CONFIG, BWD_CONFIG), as training launches them
    (70, 64, True, None, None),
])
def test_triton_kernels_match_the_reference(s, d, strided, fwd, bwd):
    # odd lengths: partial blocks on both sides of the diagonal; strided: q, k, v views of one projection output
    b, h = 2, 2
    q, k, v = qkv(b, s, h, d, strided=strided, seed=s)
    cos, sin = rope_tables(d, 80, 10000.0)
    saved = bool(attention.launch_settings("bwd", bwd)["save_rotated"])
    o, lse, *rot = attention.rope_attention_forward(q, k, v, cos, sin, fwd, save_rotated=saved)
    r_o, r_lse, *r_rot = ref.rope_attention(q, k, v, cos, sin, save_rotated=saved)
    assert o.is_contiguous() and o.shape == q.shape and len(rot) == 2 * saved
    torch.testing.assert_close(o, r_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)
    for got, want in zip(rot, r_rot):  # q and k rotated, [b, s, h, d] contiguous
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    do = torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(1))
    qk = rot if saved else (q, k)  # (the backward reads the saved rotation in place of q and k)
    got = attention.rope_attention_backward(do, *qk, v, o, lse, cos, sin, bwd, rotated=saved)
    if saved:  # the rotation it reads is the one it would compute (rounded alike): the same gradients, bit for bit
        plain = attention.rope_attention_backward(do, q, k, v, o, lse, cos, sin,
                                                  {**(bwd or {}), "save_rotated": False})
        assert all(torch.equal(a, p) for a, p in zip(got, plain))
    for g, r in zip(got, ref.rope_attention_backward(do, q, k, v, cos, sin)):
        assert g.is_contiguous()
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_triton_kernels_in_bf16_round_as_the_default_path():
    # bf16 in and out: within bf16 rounding of the fp32 reference (the rotation rounded as apply_rope rounds it)
    b, s, h, d = 1, 32, 2, 32
    q, k, v = qkv(b, s, h, d, dtype=torch.bfloat16)
    cos, sin = rope_tables(d, 32, 10000.0)
    o, lse = attention.rope_attention_forward(q, k, v, cos, sin, SMALL_FWD)
    r_o, _ = ref.rope_attention(q, k, v, cos, sin)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), r_o.float(), atol=2e-2, rtol=2e-2)
    do = torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = attention.rope_attention_backward(do, q, k, v, o, lse, cos, sin, SMALL_BWD)
    for g, r in zip(got, ref.rope_attention_backward(do, q, k, v, cos, sin)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)


def test_operator_registration():
    q, k, v = qkv(1, 8, 2, 32)
    cos, sin = rope_tables(32, 8, 10000.0)
    for op in (ops.rope_attention_op, ops.rope_attention_saved_op):
        torch.library.opcheck(op, (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
                                   cos, sin))


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(1, 8, 2, 16)), "head_dim 16"),
    (dict(k=torch.zeros(1, 9, 2, 32)), "one shape"),
    (dict(cos=torch.zeros(4, 16)), r"expected \[>= 8, 16\]"),
])
def test_bad_inputs_are_one_line_errors(bad, match):
    args = dict(q=torch.zeros(1, 8, 2, 32), k=torch.zeros(1, 8, 2, 32), v=torch.zeros(1, 8, 2, 32),
                cos=torch.zeros(8, 16), sin=torch.zeros(8, 16))
    if "q" in bad:
        args.update(k=bad["q"], v=bad["q"])
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.rope_attention(**args)


def test_config_refuses_what_the_kernel_cannot_do():
    with pytest.raises(ValueError, match="model.attn_backend='triton'.*rope_kernel=torch"):
        model_preset("llama-tiny-relu2", attn_backend="triton", rope_kernel="cutlass")
    with pytest.raises(ValueError, match="power of two >= 32.*16"):
        model_preset("llama-tiny-relu2", attn_backend="triton", n_heads=8)


def _loss_and_grads(backend, compiled=False):
    """(loss, gradients, calls of the installed attention op per block) of one step of a tiny model."""
    torch.manual_seed(0)
    cfg = model_preset("llama-tiny-relu2", vocab_size=256, attn_backend=backend)
    model = build_model(cfg)
    calls = []
    for blk in model.blocks:  # count the op's calls: a model that never took the op's path would pass otherwise
        if blk.attn.attn_op is not None:
            op = blk.attn.attn_op
            blk.attn.attn_op = lambda *a, op=op: calls.append(1) or op(*a)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    loss = fn(idx, idx)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls) / len(model.blocks)


@pytest.mark.parametrize("save_rotated", [False, True])
def test_model_with_triton_attention_equals_the_default(save_rotated, monkeypatch):
    monkeypatch.setitem(attention.BWD_CONFIG, "save_rotated", save_rotated)  # (which op ops.rope_attention takes)
    assert ops._save_rotated() is save_rotated
    want_loss, want, none = _loss_and_grads("torch")
    assert none == 0
    for compiled in (False, True):  # compiled: fullgraph, so a graph break fails
        loss, grads, calls = _loss_and_grads("triton", compiled)
        assert calls == 1  # once per block (compiled: as it traces)
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
        for n, g in grads.items():
            torch.testing.assert_close(g, want[n], atol=1e-5, rtol=1e-4, msg=n)
    model = build_model(model_preset("llama-tiny-relu2", attn_backend="triton"))
    assert all(blk.attn.attn_op is ops.rope_attention for blk in model.blocks)
    assert build_model(model_preset("llama-tiny-relu2")).blocks[0].attn.attn_op is None


def test_saved_rotation_only_where_a_backward_comes(monkeypatch):
    monkeypatch.setitem(attention.BWD_CONFIG, "save_rotated", True)
    calls = []
    real = ops.rope_attention_saved_op
    monkeypatch.setattr(ops, "rope_attention_saved_op", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv(1, 8, 2, 32)
    cos, sin = rope_tables(32, 8, 10000.0)
    with torch.no_grad():  # evaluation: the plain form, no rotated copies written
        ops.rope_attention(q.requires_grad_(), k.requires_grad_(), v, cos, sin)
    ops.rope_attention(q.detach(), k.detach(), v, cos, sin)  # nothing to differentiate: likewise
    assert calls == []
    ops.rope_attention(q, k, v, cos, sin).sum().backward()
    assert calls == [1] and q.grad is not None and k.grad is not None


def test_auto_takes_the_kernel_where_it_applies(monkeypatch):
    import importlib.util
    from elas.build import attn_backend
    from elas.config import TrainConfig, from_dict, to_dict
    cfg = model_preset("llama-tiny-lowrank-relu2")  # head_dim 32
    assert cfg.attn_backend == "auto" and attn_backend(cfg, "cpu") == "torch"
    assert build_model(cfg, "cpu").blocks[0].attn.attn_op is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # a Hopper GPU
    assert attn_backend(cfg, "cuda") == "triton" and attn_backend(cfg, torch.device("cuda", 1)) == "triton"
    for hd in (64, 128):
        assert attn_backend(model_preset("llama-tiny-lowrank-relu2", d_model=4 * hd), "cuda") == "triton"
    for what, keys in (("rotation in the q/k GEMMs", {"rope_kernel": "cutlass"}),
                       ("head_dim 48", {"d_model": 192}), ("head_dim 16", {"d_model": 64}),
                       ("head_dim 256: its shared memory", {"d_model": 1024})):
        assert attn_backend(model_preset("llama-tiny-lowrank-relu2", **keys), "cuda") == "torch", what
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # less shared memory
    assert attn_backend(cfg, "cuda") == "torch"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert attn_backend(cfg, "cuda") == "torch"
    for name in ("torch", "triton", "flash"):  # set: itself (triton's reference off CUDA)
        assert attn_backend(model_preset("llama-tiny-lowrank-relu2", attn_backend=name), "cpu") == name
    # the step benchmark: plain torch.compile and eager take torch's attention (what a user gets without elas), the
    # elas mode its default, a variant's key only in elas mode
    from elas.bench.step import step_config
    for mode, want in (("torch.compile", "torch"), ("eager", "torch"), ("elas", "auto")):
        assert step_config("llama-tiny", "lowrank-relu2", mode, 32).attn_backend == want, mode
    assert step_config("llama-tiny", "lowrank-relu2+attn_backend=triton", "torch.compile", 32).attn_backend == "torch"
    assert step_config("llama-tiny", "lowrank-relu2+attn_backend=triton", "elas", 32).attn_backend == "triton"
    # a run trained with elas's kernel, evaluated elsewhere: the machine's own choice (its reference off CUDA would
    # build [B, H, S, S] scores in fp32)
    from elas.build import kernels_for_here
    trained = model_preset("llama-tiny-lowrank-relu2", attn_backend="triton")
    assert kernels_for_here(trained, "cpu").attn_backend == "auto" and trained.attn_backend == "triton"
    # a config.json of version 2 ran torch's order under "auto" (or before the key): it resumes so; version 3 keeps it
    train = to_dict(TrainConfig())
    for version, given, want in ((2, "auto", "torch"), (2, None, "torch"), (2, "triton", "triton"),
                                 (3, "auto", "auto")):
        model = {k: v for k, v in train["model"].items() if k != "attn_backend" or given is not None}
        if given is not None:
            model["attn_backend"] = given
        loaded = from_dict(TrainConfig, {**train, "model": model, "config_version": version})
        assert loaded.model.attn_backend == want, (version, given)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64),
                                     (torch.float32, 128)])
def test_gpu_triton_attention_matches_the_default_path(dtype, d):
    # the 1B model's heads (d 64) at the training length; d 128 and fp32 (no autocast): what attn_backend=auto
    # also takes elas's kernel for
    b, s, h = 4, 256, 32
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=g, dtype=dtype, requires_grad=True)
               for _ in range(3))
    cos, sin = rope_tables(d, s, 10000.0, "cuda")
    do = torch.randn(b, s, h, d, device="cuda", generator=g, dtype=dtype)
    outs = {}
    for name, fn in (("default", default_path), ("triton", ops.rope_attention)):
        for t in (q, k, v):
            t.grad = None
        y = fn(q, k, v, cos, sin)
        y.backward(do)
        outs[name] = [y.float(), *(t.grad.float() for t in (q, k, v))]
    r_o, _ = ref.rope_attention(q.float(), k.float(), v.float(), cos, sin)
    r_g = ref.rope_attention_backward(do.float(), q.float(), k.float(), v.float(), cos, sin)
    for what, r, mine, theirs in zip("o dq dk dv".split(), [r_o, *r_g], outs["triton"], outs["default"]):
        err_mine = ((mine - r).abs().max() / r.abs().max()).item()
        err_theirs = ((theirs - r).abs().max() / r.abs().max()).item()
        # bf16 rounding of P and dS as flash attention rounds them: no further from fp32 than twice cuDNN's error;
        # fp32 products in full precision (not TF32): near the reference's own rounding
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        assert err_mine <= max(2 * err_theirs, tol), (what, err_mine, err_theirs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_saved_rotation_gives_the_same_gradients():
    # the 1B layer's shape in bf16: the backward reading the forward's rotated q and k (save_rotated) computes what
    # the one that rotates them on load computes (the same rounded rotation, the same products; two kernels may
    # contract the rotation's multiply-adds differently, so a rotated element may differ by one bf16 step)
    b, s, h, d = 4, 256, 32, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
    cos, sin = rope_tables(d, s, 10000.0, "cuda")
    o, lse = attention.rope_attention_forward(q, k, v, cos, sin)
    o2, lse2, qr, kr = attention.rope_attention_forward(q, k, v, cos, sin, save_rotated=True)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    want = [apply_rope(t, cos, sin) for t in (q, k)]  # (apply_rope rounds as the kernel does, up to fma contraction)
    for got, w in zip((qr, kr), want):
        torch.testing.assert_close(got.float(), w.float(), atol=1e-2, rtol=1e-2)
    plain = attention.rope_attention_backward(do, q, k, v, o, lse, cos, sin)
    saved = attention.rope_attention_backward(do, qr, kr, v, o, lse, cos, sin, rotated=True)
    for a, c in zip(plain, saved):
        assert ((a.float() - c.float()).abs().max() / a.float().abs().max()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("save_rotated", [False, True])
def test_gpu_model_step_with_triton_attention(save_rotated, monkeypatch):
    monkeypatch.setitem(attention.BWD_CONFIG, "save_rotated", save_rotated)  # (the operator's form: ops.py)
    losses = {}
    for backend in ("torch", "auto"):  # (auto: elas's kernel on a GPU)
        torch.manual_seed(0)
        cfg = model_preset("llama-60m-lowrank-relu2", n_layers=2, attn_backend=backend)
        model = build_model(cfg, "cuda")
        idx = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(1))
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.compile(model)(idx, idx)
        loss.backward()
        losses[backend] = (loss.item(), model.blocks[0].attn.q.weight_in.grad.float())
        assert all((blk.attn.attn_op is not None) == (backend == "auto") for blk in model.blocks)
    assert abs(losses["torch"][0] - losses["auto"][0]) < 2e-3 * abs(losses["torch"][0])
    ga, gt = losses["torch"][1], losses["auto"][1]
    assert ((ga - gt).norm() / ga.norm()).item() < 2e-2


def test_fp32_products_are_not_tf32_on_the_gpu(monkeypatch):
    # Triton's dot takes fp32 operands as TF32 unless told otherwise; torch's attention keeps fp32
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert attention._dot_mode(torch.zeros(1, dtype=torch.float32)) == 1  # input_precision="ieee"
    assert attention._dot_mode(torch.zeros(1, dtype=torch.bfloat16)) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention._dot_mode(torch.zeros(1, dtype=torch.bfloat16)) == 2


@pytest.mark.parametrize("kind,config,match", [
    ("bwd", {"blk": 32, "sub": 24}, "powers of two >= 16"),
    ("bwd", {"blk": 64, "sub": 8}, "powers of two >= 16"),  # tl.dot needs every side >= 16 (the interpreter not)
    ("bwd", {"blk": 32, "sub": 64}, "sub <= blk"),
    ("fwd", {"bm": 64, "bn": 48}, "powers of two"),
    ("bwd", {"blk": 64, "subs": 32}, "launch setting 'subs': expected one of blk, sub"),
    ("fwd", {"bm": 64, "maxnreg": 300}, "maxnreg 24-255"),
    ("bwd", {"save_rotated": 1}, "true or false"),
])
def test_bad_launch_settings_are_one_line_errors(kind, config, match):
    with pytest.raises(ValueError, match=match):
        attention.launch_settings(kind, config)


def test_launch_settings_step_by_the_given_block_and_cap_registers():
    base = {**attention.BWD_CONFIG, "blk": 32, "sub": 16}  # (as ELAS_ATTN_CONFIG or the sweep leaves it)
    assert attention.launch_settings("bwd", {"blk": 64}, base)["sub"] == 64  # base's sub was for base's blk
    assert attention.launch_settings("bwd", None, base)["sub"] == 16
    assert attention.launch_settings("bwd", {"blk": 128, "sub": 32})["sub"] == 32
    assert attention._regs({"maxnreg": 96}) == {"maxnreg": 96} and attention._regs({"maxnreg": None}) == {}


def test_the_saved_forward_takes_its_register_cap_where_none_is_named():
    # the cap the sweep chose for bf16 at head_dim 64 with the default tiles (FWD_SAVED_MAXNREG); not at 128, where
    # it would spill for no block, nor in fp32 or with other tiles, where it was not measured
    bf16, fp32 = torch.bfloat16, torch.float32
    assert attention.forward_settings(None, 64, bf16, True)["maxnreg"] == 128
    assert "maxnreg" not in attention.forward_settings(None, 64, bf16, False)  # the plain forward: the compiler's
    assert "maxnreg" not in attention.forward_settings(None, 128, bf16, True)
    assert "maxnreg" not in attention.forward_settings(None, 64, fp32, True)
    assert "maxnreg" not in attention.forward_settings({"bm": 128}, 64, bf16, True)
    assert attention.forward_settings({"maxnreg": None}, 64, bf16, True)["maxnreg"] is None  # a named setting decides
    assert attention.forward_settings({"maxnreg": 96}, 64, bf16, True)["maxnreg"] == 96


class RecordFills:
    """A dispatch mode that records every tensor made up of zeros or a fill value (name, shape)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Record(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.made = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func.__name__.startswith(("zeros", "new_zeros", "zero_", "fill_", "full")):
                    self.made.append((func.__name__, tuple(out.shape)))
                return out
        return Record()


def test_the_forward_launch_takes_the_cap(monkeypatch):
    # what rope_attention_forward hands the kernel's launch (the interpreter ignores maxnreg, so a stub records it)
    seen = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(kw)
    monkeypatch.setattr(attention, "_attn_fwd", Launch())
    q, k, v = (t.to(torch.bfloat16) for t in qkv(1, 64, 2, 64))
    cos, sin = rope_tables(64, 64, 10000.0)
    attention.rope_attention_forward(q, k, v, cos, sin, save_rotated=True)
    attention.rope_attention_forward(q, k, v, cos, sin)
    attention.rope_attention_forward(q.float(), k.float(), v.float(), cos, sin, save_rotated=True)
    assert seen[0]["maxnreg"] == 128 and "maxnreg" not in seen[1] and "maxnreg" not in seen[2]
    assert seen[0]["SAVE_ROT"] and not seen[1]["SAVE_ROT"]


def test_the_backward_makes_up_no_zero_gradients_for_the_saved_outputs():
    # outputs nothing differentiates (attention's lse and rotated q, k; relu2_ffn_op's y2 [T, d_ff]; act24_ffn_op's
    # saved tensors): eager autograd must not allocate and fill zero gradients for them on every backward
    q, k, v = (t.requires_grad_() for t in qkv(2, 16, 2, 32))
    cos, sin = rope_tables(32, 16, 10000.0)
    t, dm, ff = 64, 16, 64
    h1, wu, wd = (torch.randn(*s, dtype=torch.bfloat16).requires_grad_() for s in ((t, dm), (ff, dm), (ff, dm)))
    for name, run, leaves in (
            ("saved", lambda: ops.rope_attention_saved_op(q, k, v, cos, sin)[0], (q, k, v)),
            ("plain", lambda: ops.rope_attention_op(q, k, v, cos, sin)[0], (q, k, v)),
            ("relu2", lambda: ops.relu2_ffn(h1.float(), wu.float(), wd.float()), (h1, wu, wd)),
            ("act24 ste", lambda: ops.act24_ffn(h1, wu, wd, False), (h1, wu, wd)),
            ("act24 mask", lambda: ops.act24_ffn(h1, wu, wd, True), (h1, wu, wd))):
        out = run()
        with RecordFills() as r:
            out.float().sum().backward()
        assert r.made == [], name
        assert all(x.grad is not None for x in leaves), name
        for x in leaves:
            x.grad = None
    # what the backward saves is not a result: differentiating it is refused (not zeros, not a crash inside)
    y2 = ops.relu2_ffn_op(h1, wu, wd)[1]
    s0 = ops.act24_ffn_op(h1, wu, wd, False, None)[1]
    lse, qr = ops.rope_attention_saved_op(q, k, v, cos, sin)[1:3]
    assert not any(t.requires_grad for t in (y2, s0, lse, qr))


def test_env_overrides_the_launch_settings_and_refuses_bad_keys():
    import os
    import subprocess
    import sys
    code = ("from elas.kernels.cuda import attention as a; "
            "print(a.BWD_CONFIG['blk'], a.BWD_CONFIG['sub'], a.FWD_CONFIG['bm'])")
    env = {**os.environ, "ELAS_ATTN_CONFIG": '{"bwd": {"blk": 128}, "fwd": {"bm": 128}}'}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["128", "128", "128"], out.stderr[-500:]
    env["ELAS_ATTN_CONFIG"] = '{"bwd": {"blok": 128}}'
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "launch setting 'blok'" in out.stderr


@pytest.mark.parametrize("config", [{"warps": True}, {"stages": 1.5}, {"stages": True}, {"warps": 4.0},
                                    {"maxnreg": 100.0}, {"stages": "2"}, 5])
def test_attention_launch_settings_refuse_non_integers(config):
    with pytest.raises(ValueError, match="launch settings"):
        attention.launch_settings("fwd", config)


@pytest.mark.parametrize("value", ['{"fwd": 5}', '{"fwd": {"warps": true}}', '{"bwd": {"blok": 64}}'])
def test_attention_env_config_fails_at_import_naming_the_variable(value):
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", "import elas.kernels.cuda.attention"], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1", "ELAS_ATTN_CONFIG": value})
    assert r.returncode != 0 and "ValueError: ELAS_ATTN_CONFIG=" in r.stderr, r.stderr[-300:]


def test_attention_refuses_mixed_dtypes():
    """fp32 q/k with a bf16 v ran and drifted from the reference by ~3e-3 (P is cast to v's dtype)."""
    q = torch.randn(1, 8, 2, 32)
    cos, sin = torch.ones(8, 16), torch.zeros(8, 16)
    with pytest.raises(ValueError, match="one dtype"):
        attention.rope_attention_forward(q, q, q.bfloat16(), cos, sin)
