"""Registers, shared memory and spills of elas's attention kernels (kernels/cuda/attention.py) for sm_90a, compiled
on a machine with no GPU: which launch settings fit more blocks on an SM, before any device time is spent.

    python benchmarks/attention_regs.py fwd '[{"bm": 64, "bn": 32, "warps": 4, "stages": 2, "maxnreg": 96}, ...]'
    python benchmarks/attention_regs.py bwd '[{"blk": 64, "sub": 32, "warps": 4, "stages": 1, "delta_pre": true}]'

A forward setting may add "save_rotated": true (the forward that also writes q and k rotated); a backward setting's
save_rotated compiles the backward that reads them.

The kernels are specialised as a launch at the 1B shapes specialises them (head_dim 64, bf16, unless ATTN_HEAD_DIM
and ATTN_DTYPE say otherwise; pointers and integer arguments divisible by 16). A forward setting is completed as the
launch completes it (attention.forward_settings: the saved form's register cap where one applies). With the Triton of the GPU machine (3.6: put its wheel's files first on PYTHONPATH) the
figures match Nsight Compute's there: 128 registers and 57,344 B for the forward at 64 x 64, 4 warps, 2 stages;
255 registers for the backward at 64-row blocks (2026-12-06, H100). Blocks an SM: 65,536 registers and 228 KB of
shared memory an SM (H100), registers allocated per warp in units of 256.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, "src")
from elas.kernels.cuda import attention  # noqa: E402

# the launch's head_dim and tensor dtype (ATTN_HEAD_DIM, ATTN_DTYPE=bf16|fp32): what fits where auto takes the kernel
HEAD_DIM = int(os.environ.get("ATTN_HEAD_DIM", "64"))
DTYPE = os.environ.get("ATTN_DTYPE", "bf16")
if DTYPE not in ("bf16", "fp32") or HEAD_DIM not in (32, 64, 128, 256):
    raise SystemExit(f"attention_regs: ATTN_DTYPE={DTYPE!r}, ATTN_HEAD_DIM={HEAD_DIM}: expected bf16 or fp32 and "
                     "32, 64, 128 or 256")
DOT = int(DTYPE == "fp32")  # (attention._dot_mode on a GPU)
FWD_ARGS = ("*q_ptr *k_ptr *v_ptr *cos_ptr *sin_ptr *o_ptr *lse_ptr *qr_ptr *kr_ptr sqb sqs sqh skb sks skh svb svs svh "
            "S H "
            "scale_log2").split()
BWD_ARGS = ("*q_ptr *k_ptr *v_ptr *cos_ptr *sin_ptr *o_ptr *do_ptr *lse_ptr *delta_ptr *dq_ptr *dk_ptr *dv_ptr sqb sqs "
            "sqh skb sks skh svb svs svh sdb sds sdh S H scale scale_log2").split()
FP32_PTRS = {"cos_ptr", "sin_ptr", "lse_ptr", "delta_ptr"}


def signature(args: list[str], consts: dict) -> tuple[dict, dict]:
    """(signature, attributes) of a launch: DTYPE tensors, fp32 tables, i32 integers divisible by 16."""
    sig = {}
    for a in args:
        name = a.lstrip("*")
        sig[name] = ("*fp32" if name in FP32_PTRS else "*" + DTYPE) if a[0] == "*" else (
            "fp32" if name.startswith("scale") else "i32")
    sig.update({k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t[0] == "*" or t == "i32"}
    return sig, attrs


def usage(fn, args: list[str], consts: dict, setting: dict) -> dict:
    sig, attrs = signature(args, consts)
    opts = {"num_warps": setting["warps"], "num_stages": setting["stages"], **attention._regs(setting)}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs, stack = int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))
    smem = k.metadata.shared
    warp_regs = -(-regs * 32 // 256) * 256
    blocks = min(65536 // (warp_regs * setting["warps"]), (228 * 1024) // max(smem + 1024, 1), 32)
    return {"registers": regs, "spill_stack_bytes": stack, "shared_bytes": smem, "blocks_per_sm": blocks}


def main() -> None:
    which, settings = sys.argv[1], json.loads(sys.argv[2])
    if which not in ("fwd", "bwd"):
        raise SystemExit(f"attention_regs: kernel {which!r}: expected fwd or bwd")
    print(f"Triton {triton.__version__}, sm_90a, head_dim {HEAD_DIM}, {DTYPE}")
    for s in settings:
        if which == "fwd":
            c = attention.forward_settings({k: v for k, v in s.items() if k != "save_rotated"}, HEAD_DIM,
                                           getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[DTYPE]),
                                           bool(s.get("save_rotated")))
            consts = {"HALF": HEAD_DIM // 2, "BM": c["bm"], "BN": c["bn"], "DOT": DOT,
                      "SAVE_ROT": bool(s.get("save_rotated"))}
            rows = [usage(attention._attn_fwd, FWD_ARGS, consts, c)]
        else:
            c = attention.launch_settings("bwd", s)
            consts = {"HALF": HEAD_DIM // 2, "BLK": c["blk"], "SUB": c["sub"],
                      "DELTA_PRE": bool(c.get("delta_pre")), "ROTATED": bool(c.get("save_rotated"))}
            rows = [usage(attention._attn_bwd, BWD_ARGS, {**consts, "PHASE": p, "DOT": DOT}, c)
                    for p in ((1, 2) if c.get("split") else (0,))]
        print(which, s, *rows)


if __name__ == "__main__":
    main()
