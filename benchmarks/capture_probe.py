"""Which part of one FFN block's forward+backward fails CUDA-graph capture, each part in a fresh process (after a
failed capture a process's later CUDA work can fail too). Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/capture_probe.py VARIANT [SIZE [BATCH]]
    e.g. relu2-w24-a24+sste24.backend=cuda+sste24.input_grad=transposed llama-1b
         relu2-24-split llama-60m 32   (its capture fails in `elas bench ffn` at batch 256, works in the step at 32)

Parts, as `elas bench ffn` runs them (bf16 block, batch of the size's bench row, three warm-up calls on a side
stream, then the capture):
  forward        ffn(x)
  no-dx          ffn(x.detach()).backward(gy): no gradient into the input leaf
  full           ffn(x).backward(gy): what `elas bench ffn` captures
  full-compiled  the same through torch.compile(ffn)
  wgrad-gemm     the split's weight-gradient sparse GEMM alone: y2s^T packed 2:4 along the tokens [d_ff, T] @ dh2
                 [T, d_model] on cuSPARSELt (K = T: 65536 at 60M's bench batch), to tell it from the rest
Prints one line per part: ok, or the error that broke the capture and where it was raised.
"""
import subprocess
import sys


def _part(variant: str, size: str, part: str, batch: str = "") -> None:
    import torch

    from elas.bench.ffn import BATCH, set_sparse, variant_config
    from elas.build import build_model
    from elas.kernels import ops
    from elas.kernels.cuda.gemm import capture_failure, capture_graph, capture_origin
    cfg = variant_config(size, variant)
    torch.manual_seed(0)
    b = int(batch) if batch else BATCH[size]
    if part == "wgrad-gemm":
        y2s_t = torch.randn(cfg.ffn_width, b * 256, device="cuda", dtype=torch.bfloat16)
        packed = ops.relu2_sparsify24_packed(y2s_t)[0]  # [d_ff, T], 2:4 along the tokens
        dh2 = torch.randn(b * 256, cfg.d_model, device="cuda", dtype=torch.bfloat16)
        fn, model = (lambda: ops.sparse_mm(packed, dh2)), None
    else:
        model = build_model(cfg.__class__(**{**vars(cfg), "n_layers": 1}), "cuda").to(torch.bfloat16)
        set_sparse(model)
        ffn = model.blocks[0].ffn
        x = torch.randn(b, 256, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn_like(x)
        run = torch.compile(ffn) if part == "full-compiled" else ffn
        fn = {"forward": lambda: run(x), "no-dx": lambda: run(x.detach()).backward(gy),
              "full": lambda: run(x).backward(gy), "full-compiled": lambda: run(x).backward(gy)}[part]
    for _ in range(3):  # eager calls first, as the benchmark times them before it captures
        fn()
    if model is not None:
        x.grad = None
        ffn.zero_grad(set_to_none=True)
    try:
        capture_graph(fn, reps=1, warmup=3)
        print(f"{part}: ok")
    except RuntimeError as e:
        print(f"{part}: fails: {capture_failure(e, 200)} at {capture_origin(e)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--part":
        _part(*sys.argv[2:6])
        return
    variant = sys.argv[1] if len(sys.argv) > 1 else "relu2-w24-a24+sste24.backend=cuda+sste24.input_grad=transposed"
    size = sys.argv[2] if len(sys.argv) > 2 else "llama-1b"
    batch = sys.argv[3] if len(sys.argv) > 3 else ""
    for part in ("forward", "no-dx", "full", "full-compiled", "wgrad-gemm"):
        r = subprocess.run([sys.executable, __file__, "--part", variant, size, part, batch], capture_output=True,
                           text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(part + ":")]
        print(lines[-1] if lines else f"{part}: the process failed (rc {r.returncode}): {r.stderr.strip()[-300:]}")


if __name__ == "__main__":
    main()
