"""Static cost of the 2:4 pointwise kernels, on any machine: each kernel compiled by Triton for sm_90 (no GPU
needed), then its SASS read with the cuobjdump the Triton wheel ships. Prints registers, shared memory, local
memory (spills), SASS instructions per element and the memory instructions (their widths show whether loads
and stores are vectorised; BAR counts the layout conversions through shared memory).

Why: a pointwise kernel is either memory-bound or issue-bound. At ~1e12 warp instructions/s (H200: 132 SMs x 4
schedulers x ~1.9 GHz) a kernel of N thread-instructions per element over a [8192, 8192] tensor spends about
N x 2.1 us issuing, against ~49 us to read y1 and write its packed 2:4 once at the copy rate: beyond ~25
instructions per element the sparsifier is issue-bound. Counts depend on the Triton version: compare versions
only with the one the GPU machine runs (its Triton's count is the one that times).

    python benchmarks/sass_count.py            # every kernel
    python benchmarks/sass_count.py sparsify   # the kernels whose name contains 'sparsify'
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from elas.kernels.cuda import sparsify as S  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
MEMORY_OPS = ("LDG", "STG", "LDS", "STS", "BAR", "ATOMG", "RED")
BF16, U8, I32 = "*bf16", "*u8", "*i32"


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 8, not_div16=()):
    """fn compiled as the launcher would specialise it for our shapes: pointers and integer arguments divisible
    by 16 (vectorised accesses depend on it), except those named in not_div16."""
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in signature if n not in not_div16}
    src = ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def sass_stats(kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    res = re.search(r"REG:(\d+).*?SHARED:(\d+) LOCAL:(\d+)", usage)
    ops: collections.Counter = collections.Counter()
    memory: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m and not m.group(1).startswith("NOP"):
            ops[m.group(1).split(".")[0]] += 1
            if m.group(1).split(".")[0] in MEMORY_OPS:
                memory[m.group(1)] += 1
    return {"regs": int(res.group(1)), "shared": int(res.group(2)), "local": int(res.group(3)),
            "instructions": sum(ops.values()), "top": ops.most_common(8), "memory": dict(sorted(memory.items()))}


def kernels():
    """(name, kernel fn, signature, constexprs, elements per program, warps) of each 2:4 pointwise kernel at its
    default launch."""
    sp = {"y1_ptr": BF16, "val_ptr": BF16, "meta_ptr": U8, "bits_ptr": U8, "count_ptr": I32, "K": "i32",
          "stride": "i32"}
    rows, bk = S.DEFAULT_ROWS, 32 * S.DEFAULT_TILES
    for bits in (False, True):
        yield (f"sparsify{'' if bits else ' (no mask bits)'}", S._kernel, sp,
               {"TILES": S.DEFAULT_TILES, "COUNT": False, "ROWS": rows, "WRITE_BITS": bits},
               rows * bk, S.DEFAULT_WARPS)
    for bits in (False, True):  # the word form (y1 as int64 words of four bf16): its default groups and warps
        yield (f"sparsify, words{'' if bits else ' (no mask bits)'}", S._words_kernel,
               {"y1_ptr": "*i64", "val_ptr": I32, "meta_ptr": U8, "bits_ptr": U8, "K": "i32"},
               {"GB": S.WORDS_GROUPS, "WRITE_BITS": bits}, 64 * 4 * S.WORDS_GROUPS, S.WORDS_WARPS)
    dense = {"y1_ptr": BF16, "out_ptr": BF16, "M": "i32", "K": "i32", "stride_in": "i32", "stride_out": "i32"}
    yield "sparsify, dense form (V:N:M)", S._dense_kernel, dense, {"ROWS": S.DENSE_ROWS, "BK": S.DENSE_BK,
                                                                  "ROUND_BF16": True}, S.DENSE_ROWS * S.DENSE_BK, \
        S.DENSE_WARPS
    bwd = {"dy2_ptr": BF16, "val_ptr": BF16, "bits_ptr": U8, "y1_ptr": BF16, "y2s_ptr": BF16, "dy1_ptr": BF16,
           "dval_ptr": BF16, "K": "i32"}
    for name, ste, from_y1 in (("backward ste", True, True), ("backward mask", False, False)):
        yield name, S._bwd_kernel, bwd, {"STE": ste, "FROM_Y1": from_y1, "BK": 128, "ROWS": S.BWD_ROWS}, \
            S.BWD_ROWS * 128, S.BWD_WARPS
    words = {"dy2_ptr": "*i64", "val_ptr": I32, "bits_ptr": U8, "y2s_ptr": "*i64", "dy1_ptr": "*i64", "dval_ptr": I32,
             "K": "i32"}  # mask mode's word form: a group's four bf16 as one int64
    yield "backward mask, words", S._bwd_words_kernel, words, {"GB": 32, "ROWS": S.BWD_ROWS}, S.BWD_ROWS * 128, \
        S.BWD_WARPS
    split = {"dy2_ptr": BF16, "val_ptr": BF16, "bits_ptr": U8, "y1_ptr": BF16, "dy1_ptr": BF16, "dval_ptr": BF16,
             "yt_val_ptr": BF16, "yt_meta_ptr": U8, "dt_val_ptr": BF16, "dt_meta_ptr": U8, "slot_ptr": I32,
             "y2d_ptr": BF16, "dy1d_ptr": BF16, "M": "i32", "K": "i32", "ND": "i32"}
    yield "backward mask, 95/5 split", S._bwd_split_kernel, split, {"STE": False, "FROM_Y1": False,
                                                                    "ROWS": S.BWD_ROWS}, S.BWD_ROWS * 64, \
        S.SPLIT_BWD_WARPS
    # the dense step's pointwise kernels (relu2_kernel=cutlass's backward pass; norm_kernel=fused), for their
    # registers and spills; the norm's count is per element of one loop iteration (ROWS rows at d = 2048)
    from elas.kernels.cuda import relu2_gemm as R, rmsnorm as N
    yield "relu2 grad (pointwise)", R._relu2_grad_kernel, {"dy2_ptr": BF16, "y2_ptr": BF16, "out_ptr": BF16,
                                                           "n": "i32"}, {"BLOCK": 4096}, 4096, 8
    c = N.launch_settings(2048)  # each form at the default's tile and warps (the last form is the default)
    rows = c["rows"]
    for prefetch, first, fused in ((False, False, False), (False, True, False), (True, False, False),
                                   (True, True, False), (False, False, True), (True, True, True)):
        default = (prefetch, first, fused) == (c["prefetch"], c["res_first"], c["fused_sums"])
        yield (f"rmsnorm backward (d 2048, {c['num_warps']} warps{', prefetch' if prefetch else ''}"
               f"{', res_first' if first else ''}{', fused_sums' if fused else ''}{': default' if default else ''})",
               N._rmsnorm_bwd_kernel, {"dn_ptr": BF16, "x_ptr": BF16, "dres_ptr": BF16, "w_ptr": "*fp32",
                                       "dx_ptr": BF16, "part_ptr": "*fp32", "T": "i32", "D": "i32", "eps": "fp32"},
               {"HAS_RES": True, "ROWS": rows, "BLOCK_D": 2048, "PREFETCH": prefetch, "RES_FIRST": first,
                "FUSED_SUMS": fused}, rows * 2048, c["num_warps"])
    # the optimizer's update (MasterAdamW, LORO): the loop's body counted once, per element of one iteration
    # (BLOCK elements); bf16 moments add the stochastic rounding's hash
    from elas.optim import master_triton as M
    for bf16 in (False, True):
        for align in (1, 8):
            yield f"adamw ({'bf16' if bf16 else 'fp32'} moments, align {align})", M._adamw_kernel, {
                "tab": "*i64", "chunks": "*i64", "scal": "*fp32", "gscale": "*fp32", "dry": "i32"}, {
                "HAS_SCALE": False, "GRAD_FP32": False, "MOMENTS_BF16": bf16, "SCAL": 9, "BLOCK": M.BLOCK,
                "ITERS": M.ITERS, "ALIGN": align}, M.BLOCK, M.WARPS


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    if not CUOBJDUMP.exists():
        print(f"no cuobjdump in this Triton wheel ({CUOBJDUMP}): cannot read SASS here", file=sys.stderr)
        return 2
    want = argv[0] if argv else ""
    print(f"Triton {triton.__version__}, sm_90, default launches; instructions per element = per-thread SASS x "
          f"threads / elements of a program")
    for name, fn, sig, ce, elems, warps in kernels():
        if want not in name:
            continue
        # ND: the split's dense count; eps: a float
        st = sass_stats(compile_sm90(fn, sig, ce, warps, not_div16=("ND", "eps", "dry")))
        per = st["instructions"] * 32 * warps / elems
        print(f"{name:28s} regs {st['regs']:3d}  shared {st['shared']:5d} B  local {st['local']} B  "
              f"{st['instructions']:5d} SASS = {per:5.1f} per element  memory {st['memory']}")
        print(f"{'':28s} most frequent: {', '.join(f'{op} {n}' for op, n in st['top'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
