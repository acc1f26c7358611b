"""The chunked LM loss's per-chunk work: the torch form compiled by Inductor (what model.ce_kernel=torch runs in the
compiled step) against our one-pass kernel (kernels/cuda/xent.py) and its launch settings, then the whole loss
(LM head GEMMs included, forward + backward, compiled) with each; one process, CUDA-graph replays (the loss:
back-to-back calls), every result
checked against the reference first. The loss is timed with the sweep's fastest launch settings, which the script
prints last as ELAS_XENT_CONFIG (for a step run that follows it).

    PYTHONPATH=src python benchmarks/xent.py [OUT_DIR (default benchmarks/results/<gpu>)]

Shapes: one chunk of logits [2048, 32000] bf16 (the chunk model/loss.py takes at the presets' vocabulary), and the
loss of 8192 tokens (batch 32 x 256) at d = 2048 (1B), 1024 (350M), 768 (130M), 512 (60M). Writes OUT_DIR/xent.json
and prints a table last.
"""
import json
import sys
from pathlib import Path

import torch

CHUNK, VOCAB = 2048, 32000
SETTINGS = [dict(one_block=True, num_warps=w) for w in (8, 16, 32)] + [
    dict(one_block=False, block=b, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)]
LOSS_DIMS = (2048, 1024, 768, 512)


def torch_form(z, t, scale):
    """model/loss.py's torch ops for one chunk (model.ce_kernel=torch): fp32 logits, lse, the gradient scaled."""
    zf = z.float()
    lse = torch.logsumexp(zf, dim=1)
    nll = lse - zf.gather(1, t[:, None]).squeeze(1)
    g = zf.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, t[:, None], -torch.ones_like(g[:, :1]))
    return g.mul_(scale[:, None]).to(z.dtype), nll


def main() -> None:
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent / "src"))
    from elas.bench.loss import loss_inputs, loss_step
    from elas.bench.timing import graph_ms, throughput_ms
    from elas.kernels import ops
    from elas.kernels import reference as ref
    from elas.kernels.cuda.xent import launch_settings, softmax_xent_grad
    from elas.model.loss import linear_cross_entropy
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "results" / gpu.split()[-1].lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # logits of the spread a trained head gives (std ~3), targets, 1/n on rows in the loss and 0 on 1 in 10
    z = (3 * torch.randn(CHUNK, VOCAB, device="cuda")).bfloat16()
    t = torch.randint(0, VOCAB, (CHUNK,), device="cuda")
    scale = torch.full((CHUNK,), 1 / 8192, device="cuda")
    scale[::10] = 0
    want_g, want_nll = ref.softmax_xent_grad(z.double(), t, scale.double())

    def check(name, g, nll):
        # g: one bf16 rounding of the exact value; nll: fp32 sums
        err = ((g.double() - want_g).norm() / want_g.norm()).item()
        err_n = ((nll.double() - want_nll).abs().max() / want_nll.abs().max()).item()
        assert err < 4e-3 and err_n < 1e-5, f"{name}: g error {err:.2e}, nll error {err_n:.2e}"
        return err

    moved = 2 * CHUNK * VOCAB * 2  # z read once, g written (bf16): the bytes the one-pass form must move
    rows, table = [], []
    compiled = torch.compile(torch_form)
    check("inductor", *compiled(z, t, scale))
    base = graph_ms(lambda: compiled(z, t, scale))
    rows.append({"form": "inductor (ce_kernel=torch)", "ms": base, "tb_s": moved / base / 1e9})
    default = launch_settings(VOCAB)  # (ELAS_XENT_CONFIG's, where set)
    for s in [None] + SETTINGS:
        kw = s or {}
        name = "default " + str(dict(zip(("one_block", "block", "num_warps"), default))) if s is None else str(kw)
        try:
            err = check(name, *softmax_xent_grad(z, t, scale, **kw))
        except Exception as e:  # e.g. out of registers: reported, not fatal
            rows.append({"form": name, "error": str(e).splitlines()[0][:160]})
            continue
        ms = graph_ms(lambda: softmax_xent_grad(z, t, scale, **kw))
        one, block, warps = launch_settings(VOCAB, kw.get("block"), kw.get("num_warps"), kw.get("one_block"))
        rows.append({"form": name, "ms": ms, "tb_s": moved / ms / 1e9, "vs_inductor": base / ms, "g_rel_err": err,
                     "settings": {"one_block": one, "block": block, "num_warps": warps}})
    best = min((r for r in rows if "settings" in r), key=lambda r: r["ms"])
    for r in rows:
        table.append(f"chunk [{CHUNK}, {VOCAB}] {r['form']:60s} " + (
            f"{r['ms']:.4f} ms  {r['tb_s']:.2f} TB/s" + (f"  {r['vs_inductor']:.2f}x Inductor" if "vs_inductor" in r
                                                          else "") if "ms" in r else r["error"]))

    env = {"torch": torch.__version__, "gpu": gpu, "cuda": torch.version.cuda}
    import triton
    env["triton"] = triton.__version__
    result = {"env": env, "chunk": rows, "best": best["settings"], "loss": []}
    (out_dir / "xent.json").write_text(json.dumps(result, indent=1))  # (kept if the loss part fails)
    print("\n".join(table), flush=True)
    table = []
    from elas.kernels.cuda import xent
    xent._OVERRIDE = dict(best["settings"])  # the loss timed with the sweep's fastest settings
    loss_rows = []
    for d in LOSS_DIMS:  # the whole loss, compiled, fwd + bwd, as in the step (bf16 h, fp32 master weight, autocast)
        h, w, tt = loss_inputs(8192, d, VOCAB)
        out = {}
        for kernel in ("torch", "triton"):
            step = loss_step(torch.compile(lambda h, w, tt, k=kernel: linear_cross_entropy(
                h, w, tt, grad_kernel=ops.softmax_xent_grad if k == "triton" else None)), h, w, tt)
            loss = step()
            # back-to-back calls, no sync between them (a compiled forward + backward did not capture into a graph)
            out[kernel] = (loss.detach().clone(), h.grad.clone(), w.grad.clone(), throughput_ms(step, iters=20))
        (l0, gh0, gw0, ms0), (l1, gh1, gw1, ms1) = out["torch"], out["triton"]
        eh = ((gh1.float() - gh0.float()).norm() / gh0.float().norm()).item()
        ew = ((gw1 - gw0).norm() / gw0.norm()).item()
        assert abs(l1.item() - l0.item()) < 1e-3 * abs(l0.item()) and eh < 1e-2 and ew < 1e-2, (l0, l1, eh, ew)
        loss_rows.append({"tokens": 8192, "d": d, "vocab": VOCAB, "settings": best["settings"], "torch_ms": ms0,
                          "triton_ms": ms1,
                          "speedup": ms0 / ms1, "saved_ms": ms0 - ms1, "loss_torch": l0.item(),
                          "loss_triton": l1.item(), "grad_h_rel_diff": eh, "grad_w_rel_diff": ew})
        table.append(f"loss 8192 x d {d} x {VOCAB}, compiled fwd+bwd: ce_kernel=torch {ms0:.3f} ms, triton "
                     f"{ms1:.3f} ms ({ms0 / ms1:.3f}x, {ms0 - ms1:.3f} ms less); grads differ {eh:.1e} / {ew:.1e}")
    result["loss"] = loss_rows
    (out_dir / "xent.json").write_text(json.dumps(result, indent=1))
    print("\n".join(table))
    print(f"best settings: ELAS_XENT_CONFIG='{json.dumps(best['settings'])}'")


if __name__ == "__main__":
    main()
