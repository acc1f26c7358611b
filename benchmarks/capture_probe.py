"""Which part of one FFN block's forward+backward fails CUDA-graph capture, each part in a fresh process (after a
failed capture a process's later CUDA work can fail too). Needs a CUDA GPU.

    PYTHONPATH=src python benchmarks/capture_probe.py VARIANT [SIZE]
    e.g. relu2-w24-a24+sste24.backend=cuda+sste24.input_grad=transposed llama-1b

Parts, as `elas bench ffn` runs them (bf16 block, batch of the size's bench row, three warm-up calls on a side
stream, then the capture):
  forward        ffn(x)
  no-dx          ffn(x.detach()).backward(gy): no gradient into the input leaf
  full           ffn(x).backward(gy): what `elas bench ffn` captures
  full-compiled  the same through torch.compile(ffn)
Prints one line per part: ok, or the error that broke the capture and where it was raised.
"""
import subprocess
import sys


def _part(variant: str, size: str, part: str) -> None:
    import torch

    from elas.bench.ffn import BATCH, set_sparse, variant_config
    from elas.build import build_model
    from elas.kernels.cuda.gemm import capture_failure, capture_graph, capture_origin
    cfg = variant_config(size, variant)
    torch.manual_seed(0)
    model = build_model(cfg.__class__(**{**vars(cfg), "n_layers": 1}), "cuda").to(torch.bfloat16)
    set_sparse(model)
    ffn = model.blocks[0].ffn
    x = torch.randn(BATCH[size], 256, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    run = torch.compile(ffn) if part == "full-compiled" else ffn
    fn = {"forward": lambda: run(x), "no-dx": lambda: run(x.detach()).backward(gy),
          "full": lambda: run(x).backward(gy), "full-compiled": lambda: run(x).backward(gy)}[part]
    for _ in range(3):  # eager calls first, as the benchmark times them before it captures
        fn()
    x.grad = None
    ffn.zero_grad(set_to_none=True)
    try:
        capture_graph(fn, reps=1, warmup=3)
        print(f"{part}: ok")
    except RuntimeError as e:
        print(f"{part}: fails: {capture_failure(e, 200)} at {capture_origin(e)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--part":
        _part(*sys.argv[2:5])
        return
    variant = sys.argv[1] if len(sys.argv) > 1 else "relu2-w24-a24+sste24.backend=cuda+sste24.input_grad=transposed"
    size = sys.argv[2] if len(sys.argv) > 2 else "llama-1b"
    for part in ("forward", "no-dx", "full", "full-compiled"):
        r = subprocess.run([sys.executable, __file__, "--part", variant, size, part], capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(part + ":")]
        print(lines[-1] if lines else f"{part}: the process failed (rc {r.returncode}): {r.stderr.strip()[-300:]}")


if __name__ == "__main__":
    main()
