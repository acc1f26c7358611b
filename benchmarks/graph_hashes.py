"""Did a change alter what the compiled step runs? Hashes of the forward and backward FX graphs that AOTAutograd
hands Inductor, per variant, on a 2-layer tiny model under bf16 autocast, each method in its sparse phase (as
`elas bench ffn/step` time it). Run it in two checkouts and compare: equal hashes mean the timed rows' traced
graphs did not change (the custom operators appear in them by name: a change inside one is not seen here, so
check the kernels' diffs beside it). CPU only, ~5 s a variant.

    PYTHONPATH=src python benchmarks/graph_hashes.py [VARIANTS (comma-separated; default: every step variant)]
"""
import hashlib
import json
import sys
import warnings

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

DEFAULT = ("lowrank-relu2,relu2,swiglu,elas,elas-mask,relu2-24,relu2-24-split,relu2-vnm-fast,relu2-w24,"
           "relu2-w24-vnm-fast")


def hashes(variant: str) -> list[str]:
    from elas.bench.ffn import variant_config
    from elas.build import build_model
    from elas.sparsity import set_step
    from elas.bench.ffn import RUN_STEPS, SPARSE_STEP
    codes: list[str] = []

    def record(gm, _example_inputs):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    cfg = variant_config("llama-tiny", variant, n_layers=2, vocab_size=256)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    set_step(model, SPARSE_STEP, RUN_STEPS)  # the methods' sparse phase (dense variants have none)
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    idx = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(idx, idx)
    loss.backward()
    return [hashlib.sha1(c.encode()).hexdigest()[:12] for c in codes]


def main() -> None:
    warnings.filterwarnings("ignore")
    variants = (sys.argv[1] if len(sys.argv) > 1 else DEFAULT).split(",")
    print(json.dumps({v: hashes(v) for v in variants}, indent=1))


if __name__ == "__main__":
    main()
