"""The benchmark report: the committed result files render, and the ratios in the tables are the JSON's."""
import json
from pathlib import Path

from elas.bench.profile import breakdown, category, span_and_gaps, top_kernels
from elas.bench.report import mode_step_tables, render, step_tables
import pytest
import torch

from elas.bench.step import ratios, step_config

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_committed_results_render():
    text = render(RESULTS)
    for title in ("### 2:4 GEMM (h100)", "### FFN and training step (h100)", "### FFN and training step, batch x0.5"):
        assert title in text


def test_step_table_ratios_come_from_the_rows():
    doc = json.loads((RESULTS / "h100" / "step.json").read_text())
    by = {(r["model"], r["variant"]): r for r in doc["rows"]}
    e, d = by[("llama-1b", "elas")], by[("llama-1b", "lowrank-relu2")]
    line = next(ln for ln in step_tables(doc).splitlines() if ln.startswith("| llama-1b | elas | 64x256"))
    assert f"**{e['tokens_per_s'] / d['tokens_per_s']:.2f}x**" in line
    assert f"{e['step_ms_eager']:.1f}" in line
    # a row whose capture failed says so, and a row without eager timings (older files) still renders
    rows = [dict(r) for r in doc["rows"]]
    rows[0]["step_timing"] = "eager"
    for r in rows[1:]:
        r.pop("step_ms_eager", None)
    text = step_tables({**doc, "rows": rows})
    assert "(eager: capture out of memory)" in text and "| llama-1b | elas |" in text


def test_kernel_categories():
    """Names as the H200 profile printed them (benchmarks/results/h200/step.json keeps the raw table)."""
    names = {
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "GEMM",
        "sm90_xmma_sparse_gemm_bf16bf16_bf16f32_f32_tt_t_tilesize128x256x64": "sparse GEMM",
        "_bwd_kernel": "2:4 sparsify/pack", "_kernel": "2:4 sparsify/pack",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata": "optimizer",
        "triton_poi_fused__to_copy_1": "copy", "triton_poi_fused__unsafe_view_clone_transpose_view_5": "copy",
        "triton_poi_fused__to_copy_add_cat_mul_neg_slice_4": "elementwise",
        "triton_poi_fused__unsafe_view_mul_relu_view_2": "elementwise",
        "triton_red_fused__log_softmax_nll_loss_forward_3": "CE", "Memcpy HtoD (Pinned -> Device)": "copy",
        "_attn_fwd": "attention", "_attn_bwd": "attention",  # elas's (kernels/cuda/attention.py)
        "_xent_grad_kernel": "CE",  # elas's (kernels/cuda/xent.py)
    }
    assert {n: category(n) for n in names} == names
    b = breakdown({"nvjet_a": 2.0, "nvjet_b": 1.5, "_kernel": 0.5})
    assert b == {"2:4 sparsify/pack": 0.5, "GEMM": 3.5}
    # the JSON keeps names cut to 160 characters: template instantiations that differ only after that are summed
    grouped = "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9x" * 3
    top = top_kernels({grouped + "A": 4.0, grouped + "B": 3.0, "nvjet_x": 5.0, "_kernel": 0.25}, n=2)
    assert top == {grouped[:160]: 7.0, "nvjet_x": 5.0}


def test_profiled_span_counts_only_the_time_no_kernel_covers():
    """The profiled steps' span and gaps: overlapping kernels (two streams) are busy once, a kernel inside another
    adds no gap, and gaps between kernels sum; whatever order the profiler lists them in."""
    assert span_and_gaps([]) == (0.0, 0.0)
    ivs = [(10.0, 20.0), (0.0, 5.0), (12.0, 15.0), (18.0, 25.0), (30.0, 31.0)]
    assert span_and_gaps(ivs) == (31.0, 5.0 + 5.0)  # busy 0-5, 10-25, 30-31
    assert span_and_gaps([(0.0, 4.0), (4.0, 9.0)]) == (9.0, 0.0)  # back to back


def test_step_modes_table_and_ratios():
    """The committed H200 step rows render, and every ratio is the rows' tokens/s quotient (same process)."""
    doc = json.loads((RESULTS / "h200" / "step.json").read_text())
    rows = ratios([{k: v for k, v in r.items() if not k.startswith("vs_")} for r in doc["rows"]])
    by = {(r["variant"], r["mode"]): r for r in rows}
    e, d, c = by[("elas", "elas")], by[("lowrank-relu2", "elas")], by[("lowrank-relu2", "torch.compile")]
    assert e["vs_twin"] == e["tokens_per_s"] / d["tokens_per_s"]
    assert d["vs_torch_compile"] == d["tokens_per_s"] / c["tokens_per_s"]
    assert "vs_twin" not in d and "vs_torch_compile" not in c  # no ratio of a row to itself
    busy = c["step_ms"] - c["breakdown_ms"]["idle"]  # plain compile's GPU-busy time: the stricter measure
    assert d["vs_torch_compile_busy"] == busy / d["step_ms"] < d["vs_torch_compile"]
    text = mode_step_tables({**doc, "rows": rows})
    assert (f"| {d['step_ms']:.1f} | {d['tokens_per_s']:,.0f} | - | {d['vs_torch_compile']:.2f}x "
            f"(busy {d['vs_torch_compile_busy']:.3f}x) |") in text
    assert "by kernel category" in text and "| idle |" in text
    # the twin ran in two modes here: its best is established by this file, and the cell does not say otherwise
    assert f"{e['vs_twin']:.2f}x ({e['twin_mode']}) |" in text
    # with the twin's other mode gone, the cell says the ratio is against the only mode run
    alone = ratios([r for r in rows if r["variant"] != "lowrank-relu2" or r["mode"] == "elas"])
    text = mode_step_tables({**doc, "rows": alone})
    assert f"({e['twin_mode']}, its only mode run here) |" in text
    assert "| gaps |" not in text  # a file from before the profiled gaps: no column of dashes
    # with one row's profiled gaps recorded, the column appears, that row's value in it, the others' "-"
    rows[0] = {**rows[0], "profiled_gap_ms": 1.234}
    lines = mode_step_tables({**doc, "rows": rows}).splitlines()
    at = next(i for i, ln in enumerate(lines) if "| idle |" in ln)
    assert lines[at].endswith("| idle | gaps | kernels |")
    table = [ln.split(" | ") for ln in lines[at + 2:] if ln.startswith("| ")][:len(rows)]  # the category rows
    gaps = [c[-2] for c in table]
    assert all(len(c) == len(lines[at].split(" | ")) for c in table)
    assert gaps.count("1.2") == 1 and gaps.count("-") == len(table) - 1


def test_loss_table_pairs_the_two_implementations():
    from elas.bench.report import loss_table
    rows = [{"tokens": 8192, "d_model": 2048, "vocab": 32000, "impl": impl, "compiled": comp, "ms": ms,
             "peak_extra_gb": gb, "loss": 10.4} for impl, comp, ms, gb in
            (("logits", False, 6.0, 3.1), ("chunked", False, 4.0, 0.9), ("logits", True, 5.0, 2.5),
             ("chunked", True, 4.5, 0.8))]
    text = loss_table({"rows": rows})
    assert "| 8192 | 2048 x 32000 | eager | 6.00 | 4.00 | 1.50x | 3.10 | 0.90 |" in text
    assert "| 8192 | 2048 x 32000 | compiled | 5.00 | 4.50 | 1.11x | 2.50 | 0.80 |" in text


def test_step_variant_options_set_method_keys_and_bad_ones_fail_in_one_line():
    cfg = step_config("llama-60m", "elas+act24.fused=true+act24.grad_mode=mask", "elas", 256)
    (m,) = cfg.methods
    assert m["fused"] is True and m["grad_mode"] == "mask"
    assert step_config("llama-60m", "elas", "elas", 256).methods[0]["fused"] is False
    for bad, says in (("lowrank-relu2+act24.fused=true", "does not apply"), ("elas+act24.fuse=true", "fused"),
                      ("elas+act24.fused=maybe", "true or false"), ("elas+fused", "KEY=VALUE"),
                      ("elas+optim_state_dtype=fp8", "invalid optim_state_dtype='fp8'.*fp32 or bf16")):
        with pytest.raises(ValueError, match=says):
            step_config("llama-60m", bad, "elas", 256)


def test_step_variant_training_keys_reach_the_optimizer_not_the_model():
    """optim_state_dtype is a training setting: the model (and the plain modes' row, shared with the twin without
    it) is the variant's without it; the elas mode's optimizer keeps its moments in bf16."""
    from elas.bench.step import plain_config
    from elas.config import train_keys
    from elas.optim import build_optimizer
    from elas.build import build_model
    from elas.config import TrainConfig
    v = "lowrank-relu2+optim_state_dtype=bf16+fuse_qkv=true"
    assert train_keys(v) == ("lowrank-relu2+fuse_qkv=true", {"optim_state_dtype": "bf16"})
    assert step_config("llama-60m", v, "elas", 256) == step_config("llama-60m", "lowrank-relu2+fuse_qkv=true",
                                                                  "elas", 256)
    assert plain_config("llama-60m", v, 256) == plain_config("llama-60m", "lowrank-relu2", 256)
    cfg = step_config("llama-60m", v, "elas", 64)
    model = build_model(cfg, "cpu").bfloat16()
    opt = build_optimizer(model, TrainConfig(model=cfg, **train_keys(v)[1]))
    assert opt.moment_dtype == torch.bfloat16
    assert {st["exp_avg_sq"].dtype for st in opt.state.values()} == {torch.bfloat16}


def test_infer_ratios_take_the_dense_twins_best_prefill_mode():
    from elas.bench.infer import with_twin_ratios
    rows = with_twin_ratios([
        {"model": "m", "variant": "lowrank-relu2", "prefill_ms": 17.0, "prefill_graph_ms": 10.0,
         "decode_ms_per_token": 4.0},
        {"model": "m", "variant": "elas", "prefill_ms": 25.0, "prefill_graph_ms": 11.0, "decode_ms_per_token": 5.0}])
    assert "prefill_vs_twin" not in rows[0]  # the twin has no ratio to itself
    r = rows[1]
    assert r["twin_prefill_mode"] == "captured"  # 10 ms captured beats 17 ms called
    assert r["prefill_vs_twin"] == 10.0 / 25.0 and r["prefill_graph_vs_twin"] == 10.0 / 11.0
    assert r["decode_vs_twin"] == 4.0 / 5.0


def test_infer_table_shows_the_compiled_decode_its_ratio_or_its_failure():
    from elas.bench.infer import with_twin_ratios
    from elas.bench.report import infer_table
    base = {"model": "m", "batch": 8, "prompt": 512, "prefill_ms": 2.0, "prefill_tokens_per_s": 1.0,
            "decode_path": "dense"}
    rows = with_twin_ratios([
        {**base, "variant": "lowrank-relu2", "decode_ms_per_token": 4.0, "decode_compiled_ms_per_token": 3.0},
        {**base, "variant": "elas", "decode_ms_per_token": 5.0, "decode_compiled_ms_per_token": "RuntimeError: x"},
        {**base, "variant": "relu2", "decode_ms_per_token": 4.0}])
    assert rows[1]["decode_vs_twin"] == 3.0 / 5.0 and "decode_compiled_vs_twin" not in rows[1]  # twin's best
    text = infer_table({"env": {}, "command": "c", "rows": rows})
    assert "| 3.000 | - |" in text and "failed: RuntimeError: x | - |" in text and text.count("| - | - |") >= 1


def test_loro_bench_rejects_bad_options_before_any_gpu_work():
    from elas.bench.loro import bench_loro
    with pytest.raises(ValueError, match="unknown solver 'qr'"):
        bench_loro(solvers=("qr",))
    with pytest.raises(ValueError, match="unknown size 'llama-9b'"):
        bench_loro(sizes=("llama-9b",))
    with pytest.raises(ValueError, match="invalid grad_rank 0"):
        bench_loro(grad_rank=0)


@pytest.mark.parametrize("variant", ["elas", "relu2-24", "relu2-w24", "relu2-w24-a24", "relu2-vnm",
                                     "relu2-w24+sste24.input_grad=transposed"])
def test_bench_models_run_every_method_in_its_sparse_phase(variant, monkeypatch):
    """A bench row of a sparse variant times its sparse phase. S-STE's phase ends at a fraction of the run: the
    benches once set step 0 of a one-step run, which put it in its final dense phase, so its rows timed dense
    GEMMs under the sparse name. set_sparse refuses such a model."""
    import elas.bench.ffn as bf
    from elas.build import build_model
    from elas.sparsity import applied_methods
    cfg = bf.variant_config("llama-60m", variant)
    model = build_model(cfg.__class__(**{**vars(cfg), "n_layers": 1}), "cpu")
    modes = bf.set_sparse(model)
    assert modes and all(str(m).startswith("sparse") for m in modes)
    assert all(getattr(t, "active", True) for a in applied_methods(model) for _, t in a.targets)
    monkeypatch.setattr(bf, "RUN_STEPS", 1)  # the old call: step 0 of a run of one step
    if variant.startswith(("relu2-w24", "relu2-vnm")):  # sste24 and vnm end their sparse phase at half the run
        with pytest.raises(RuntimeError, match="not in its sparse phase"):
            bf.set_sparse(model)
    else:
        bf.set_sparse(model)


def test_a_failed_capture_names_the_error_that_broke_it():
    """torch raises "operation failed due to a previous error during capture" at the capture's end; the error
    that broke the capture is its __context__, and the one line names both."""
    from elas.kernels.cuda.gemm import capture_failure, capture_origin

    def unsafe_call():
        raise RuntimeError("no tuned cuSPARSELt algorithm for 8192x2048x8192 during CUDA-graph capture\nmore")
    try:
        try:
            unsafe_call()
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        line, where = capture_failure(e), capture_origin(e)
    assert line.startswith("no tuned cuSPARSELt algorithm") and "then: CUDA error" in line and "\n" not in line
    assert where.startswith("test_bench.py:") and "unsafe_call" in where.split(" <- ")[0]  # innermost first
    assert capture_failure(RuntimeError("out of memory")) == "out of memory"


def test_sste_packing_table_renders_the_rows():
    from elas.bench.report import sste_table
    doc = {"command": "elas bench sste", "env": {"gpu": "G", "torch": "t"}, "rows": [
        {"R": 8192, "C": 2048, "dtype": "bfloat16", "transpose": True, "ms": 0.04, "tb_per_s": 1.25,
         "copy_tb_per_s": 3.9, "variants_ms": {"tiles2_warps8": 0.05, "tiles1_warps4_nobits": 0.03}}]}
    text = sste_table(doc)
    assert "| 8192 x 2048 | bfloat16 | S(W^T) | 0.0400 | **1.25** | 3.90 | tiles1_warps4_nobits (0.0300) |" in text


def test_detached_work_outlives_its_call_and_reports_its_status(tmp_path):
    """benchmarks/detached.sh: work started in its own session, waited for by a later command (exit 0 and the
    work's status once it ended, 3 while it runs), clear errors for a bad name or a name never started."""
    import subprocess
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "detached.sh")

    def sh(*args):
        return subprocess.run(["bash", script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert sh("start", "job", "bash", "-c", "echo hello; sleep 1; exit 7").returncode == 0
    r = sh("wait", "job", "30")
    assert r.returncode == 0 and "hello" in r.stdout and "job ended with status 7" in r.stdout
    r = sh("start", "slow", "sleep", "20")
    try:
        assert sh("wait", "slow", "0").returncode == 3
        r = sh("start", "slow", "true")
        assert r.returncode == 2 and "already running" in r.stderr
    finally:
        subprocess.run(["kill", "--", f"-{(tmp_path / 'runs/detached/slow.pid').read_text().strip()}"])
    r = sh("start", "a b", "true")
    assert r.returncode == 2 and "invalid NAME 'a b'" in r.stderr
    assert sh("status", "never").returncode == 4


def test_every_default_step_variant_builds_its_config_in_every_mode():
    """The default variant list of `elas bench step` must resolve at every size (a row that cannot is found only
    after minutes of GPU time otherwise); swiglu-aligned is SwiGLU at the tile-aligned width, beside the published."""
    from elas.bench.step import MODES, STEP_VARIANTS
    for size in ("llama-60m", "llama-1b"):
        for variant in STEP_VARIANTS:
            for mode in MODES:
                assert step_config(size, variant, mode, 256).max_seq_len == 256
    assert step_config("llama-1b", "swiglu", "elas", 256).intermediate == 5461
    aligned = step_config("llama-1b", "swiglu-aligned", "torch.compile", 256)
    assert aligned.intermediate == 5504 and aligned.residual_dtype == "fp32"


def test_gpu_script_sizes_stage_checks_every_invocation_before_the_gpu(tmp_path):
    """benchmarks/run_gpu.sh sizes on a machine without a GPU: every `elas bench` it runs must get past its
    variant, key and size checks and stop only at the GPU check, and its errors must reach the output (a bad name
    found on the GPU machine costs a call's device time; one hidden by the output filter costs more)."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SIZES_")}, "SIZES_DIR": str(tmp_path / "sizes"), "SIZES_MODELS": "llama-60m llama-1b",
           "PYTHONPATH": str(root / "src"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if torch_has_cuda():
        pytest.skip("a GPU is present: the stage would run")
    r = subprocess.run(["bash", "benchmarks/run_gpu.sh", "sizes"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("elas: error")]
    assert len(errors) == 6, r.stdout + r.stderr  # 2 sizes x (dense, sparse) step calls, 2 ffn calls
    assert all("needs a CUDA GPU" in e for e in errors), errors


def torch_has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def test_sass_count_compiles_every_pointwise_kernel_for_sm90_without_a_gpu():
    """benchmarks/sass_count.py: each pointwise kernel (the six 2:4 ones, the backward's word form, the
    sparsifier's word form with and without the mask bits, the ReLU^2 backward pass, the RMSNorm backward in six
    forms (the loops, where dres is loaded, the row sums fused or not), the optimizer's
    update in its four forms) compiled for sm_90 by Triton, its SASS counted (the
    kernels' static cost, readable on a machine without a GPU; it breaks when a kernel's signature changes). The
    update's aligned forms load and store 16-byte vectors; its unaligned forms cannot."""
    import os
    import subprocess
    import sys
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel has no cuobjdump")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/sass_count.py"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if "per element" in line and "SASS =" in line]
    assert len(rows) == 20, r.stdout
    assert len([line for line in rows if line.startswith("rmsnorm backward")]) == 6, r.stdout
    adamw = [line for line in rows if line.startswith("adamw")]
    assert len(adamw) == 4 and all(("LDG.E.128" in line and "STG.E.128" in line) == ("align 8" in line)
                                   for line in adamw), adamw
    for line in rows:  # every kernel vectorises its main loads and spills nothing
        assert "LDG.E.128" in line or "LDG.E.64" in line or "LDG.E'" in line, line
        assert "local 0 B" in line, line


def test_cutlass_relu2_benchmark_checks_before_it_times():
    """benchmarks/cutlass_relu2.py: its output check tells a GEMM that rounds y1 to the neighbouring bf16 value
    (another accumulation order) from a wrong one, and without its library it stops with a one-line message."""
    import subprocess
    import sys
    import torch
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from cutlass_relu2 import mismatch
    want = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.bfloat16)
    one_ulp = want.clone()
    one_ulp[1] = 2.015625  # the bf16 value after 2.0
    m = mismatch(one_ulp, want)
    assert m["differ_frac"] == 0.25 and 0 < m["rel_fro"] < 1e-2 and m["max_rel"] == pytest.approx(2 ** -7)
    assert mismatch(want * 2, want)["rel_fro"] > 0.5
    r = subprocess.run([sys.executable, "benchmarks/cutlass_relu2.py", "no/such/lib.so"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no library at no/such/lib.so" in r.stderr



def test_cutlass_probe_tells_a_fault_from_a_wrong_or_absent_form(tmp_path):
    """benchmarks/cutlass_probe.py: each form in a child process; a child that dies after starting a launch is a
    "fault" naming that configuration and shape, one whose outputs disagree is "wrong", one whose every launch is
    refused "absent", a clean one "ok"; a hung child is cut off by the timeout. (The children here are stand-ins
    that print what the real child prints.)"""
    import json
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cutlass_probe import probe

    def line(**kw):
        return json.dumps(kw)
    ok = [line(start="c0", shape=[8, 8, 8]), line(config="c0", shape=[8, 8, 8], rc=0, wrong=None)]
    scripts = {
        "relu2": (ok, 0),
        "ste_grad_y2s": (ok + [line(start="c1", shape=[8, 8, 8])], 134),  # died inside c1's launch
        "grad": ([line(start="c0", shape=[8, 8, 8]),
                  line(config="c0", shape=[8, 8, 8], rc=0, wrong="relative error 1.0e+00 > 0.02 on rows 0:8")], 0),
        "rope": ([line(start="c0", shape=[8, 8, 8]), line(config="c0", shape=[8, 8, 8], rc=1, wrong=None)], 0),
    }
    for form, (lines, code) in scripts.items():
        (tmp_path / f"{form}.py").write_text(
            "import sys\n" + "".join(f"print({x!r}, flush=True)\n" for x in lines)
            + ("sys.stderr.write('CUDA error: an illegal memory access was encountered\\n')\n" if code else "")
            + f"sys.exit({code})\n")
    (tmp_path / "grad_tma.py").write_text("import time\nprint('{\"start\": \"c0\", \"shape\": [8, 8, 8]}', flush=True)\n"
                                         "time.sleep(60)\n")
    rows = {r["form"]: r for r in probe(list(scripts) + ["grad_tma"],
                                        argv=lambda f: [sys.executable, str(tmp_path / f"{f}.py")], timeout=5)}
    assert rows["relu2"]["status"] == "ok" and rows["relu2"]["configs_ran"] == 1
    fault = rows["ste_grad_y2s"]
    assert fault["status"] == "fault" and fault["fault"].startswith("in c1 at [8, 8, 8]: exit 134")
    assert "illegal memory access" in fault["fault"]
    assert rows["grad"]["status"] == "wrong" and "c0 [8, 8, 8]: relative error" in rows["grad"]["wrong"][0]
    assert rows["rope"]["status"] == "absent"
    assert rows["grad_tma"]["status"] == "fault" and "timed out" in rows["grad_tma"]["fault"]


def test_bench_step_records_a_failing_row_and_runs_the_next(monkeypatch):
    """A row that raises (here a kernel that cannot run the shape) is recorded with its error; the rows after it
    still run."""
    from elas.bench import step as st
    monkeypatch.setattr(st, "step_config", lambda *a: None)

    def row(size, variant, mode, batch, *a):
        if variant == "elas":
            raise RuntimeError("no CUTLASS configuration runs mode 6 at 8192x8192x512 (cfg0: wrong)\nmore")
        return {"model": size, "variant": variant, "mode": mode, "batch": batch, "step_ms": 1.0,
                "step_ms_synced": 1.0, "tokens_per_s": 1.0, "peak_mem_gb": 0.0, "compile_s": 0.0}
    monkeypatch.setattr(st, "step_row", row)
    logged = []
    rows = st.bench_step(variants=("elas", "lowrank-relu2"), modes=("elas",), log=logged.append)
    assert rows[0]["error"] == "RuntimeError: no CUTLASS configuration runs mode 6 at 8192x8192x512 (cfg0: wrong)"
    assert rows[1]["step_ms"] == 1.0 and "RuntimeError" in logged[0]

def test_plain_rows_ignore_elas_kernel_keys_and_are_timed_once(monkeypatch):
    """Under plain torch.compile a variant's elas kernel keys do not apply (PLAIN is set after the variant's
    keys): variants that differ only in them are one model there, timed once, and each elas row's
    vs_torch_compile is against that row. A key that changes the model (the rank) gets its own plain row."""
    from elas.bench import step as st
    fused = ("lowrank-relu2+fuse_qkv=true+pdl=true+norm_kernel=fused+relu2_kernel=cutlass+defer_residual=true"
             "+ce_kernel=triton")
    plain = step_config("llama-60m", fused, "torch.compile", 256)
    assert (plain.fuse_qkv, plain.pdl, plain.norm_kernel, plain.relu2_kernel) == (False, False, "torch", "torch")
    assert plain.defer_residual is False and plain.ce_kernel == "torch"
    assert step_config("llama-60m", fused, "elas", 256).fuse_qkv is True
    timed = []

    def row(size, variant, mode, batch, *a):
        timed.append((variant, mode))
        tps = {"elas": 2.0, "torch.compile": 1.0}[mode] * (1.5 if variant == fused and mode == "elas" else 1.0)
        tps *= 0.5 if variant.endswith("rank=64") and mode == "torch.compile" else 1.0
        return {"model": size, "variant": variant, "mode": mode, "batch": batch, "step_ms": 1.0,
                "step_ms_synced": 1.0, "tokens_per_s": tps, "peak_mem_gb": 0.0, "compile_s": 0.0,
                "plain_config": st.plain_config(size, variant, 256)}
    monkeypatch.setattr(st, "step_row", row)
    logged = []
    variants = ("lowrank-relu2", fused, "lowrank-relu2+rank=64")
    rows = st.bench_step(sizes=("llama-60m",), variants=variants, modes=("elas", "torch.compile"), log=logged.append)
    assert timed == [(v, "elas") for v in variants] + [(variants[0], "torch.compile"), (variants[2], "torch.compile")]
    assert any("the same model as lowrank-relu2's row" in line for line in logged)
    got = {r["variant"]: r.get("vs_torch_compile") for r in ratios(rows) if r["mode"] == "elas"}
    assert got == {variants[0]: 2.0, fused: 3.0, variants[2]: 4.0}


def test_graph_hashes_tell_a_changed_step_from_the_same_one():
    """benchmarks/graph_hashes.py: the same variant hashes alike twice; a key that changes what the step runs
    (norm_kernel=fused) changes both the forward and the backward graph's hash."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from graph_hashes import hashes
    base = hashes("lowrank-relu2")
    assert len(base) == 2 and hashes("lowrank-relu2") == base
    fused = hashes("lowrank-relu2+norm_kernel=fused")
    assert fused[0] != base[0] and fused[1] != base[1]


def test_clock_sampler_summarises_and_never_fails_a_benchmark():
    """bench.timing.Clocks: readings taken on a thread while inside the block, summarised as median / min clock
    and median power; a reader that cannot read (no NVML, no GPU) leaves the summary empty."""
    import time

    from elas.bench.timing import Clocks
    seq = iter([(1980, 300.0), (1755, 690.0), (1755, 700.0), (1800, 650.0)] * 1000)
    with Clocks(period=0.001, read=lambda: next(seq)) as c:
        time.sleep(0.05)
    s = c.summary()
    assert s["clock_samples"] >= 4 and s["sm_clock_mhz_min"] == 1755 and 1755 <= s["sm_clock_mhz"] <= 1980
    assert 300.0 <= s["power_w"] <= 700.0

    def broken():
        raise ModuleNotFoundError("pynvml")

    with Clocks(read=broken) as c:
        pass
    assert c.summary() == {}


def test_launch_sources_count_each_device_activity_by_its_launching_ops():
    """benchmarks/launch_sources.py: every kernel, memset and memcpy attached to a host op is counted per step by
    its kind and the op chain that launched it (innermost first), most frequent first."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace as E
    spec = importlib.util.spec_from_file_location(
        "launch_sources", Path(__file__).parent.parent / "benchmarks" / "launch_sources.py")
    ls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ls)
    graph = E(name="## Call CompiledFxGraph fabc ##", kernels=[], cpu_parent=E(name="CompiledFunctionBackward",
                                                                                  kernels=[], cpu_parent=None))
    zero = E(name="aten::zero_", cpu_parent=graph,
             kernels=[E(name="Memset (Device)"), E(name="Memset (Unknown)"), E(name="Memset (Device)")])
    mm = E(name="aten::mm", cpu_parent=graph, kernels=[E(name="nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT")])
    copy = E(name="aten::copy_", cpu_parent=None, kernels=[E(name="Memcpy DtoD (Device -> Device)")])
    rows = ls.count_sources([graph, zero, mm, copy, graph.cpu_parent], steps=1)
    assert rows[0] == (3.0, "memset", "aten::zero_ < ## Call CompiledFxGraph fabc ## < CompiledFunctionBackward")
    assert (1.0, "memcpy Device -> Device", "aten::copy_") in rows
    assert (1.0, "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "aten::mm < ## Call CompiledFxGraph fabc ##"
            " < CompiledFunctionBackward") in rows and len(rows) == 3
    assert ls.count_sources([zero], steps=3)[0][0] == 1.0


def test_moments_script_sets_the_two_validation_curves_side_by_side(tmp_path):
    """benchmarks/moments.py (run_gpu.sh moments): the steps both runs validated at, the relative gap of each and
    the largest; runs without a common validation step are one line."""
    import subprocess
    import sys
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "moments.py")
    for name, losses in (("a", {200: 4.0, 400: 3.0}), ("b", {200: 4.04, 400: 2.97, 600: 2.5})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "val_loss": v}) + "\n" + json.dumps({"step": s, "loss": v + 1}) + "\n"
            for s, v in losses.items()))
    r = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "m.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "m.json").read_text())
    assert [c["step"] for c in got["curve"]] == [200, 400]
    assert got["final_rel"] == pytest.approx(-0.01) and got["max_abs_rel"] == pytest.approx(0.01)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": 1.0}) + "\n")
    r = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "n.json")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no validation step in both" in r.stderr


def test_cublas_workspace_choice():
    """torch's default workspace unless ELAS_CUBLAS_WORKSPACE=none asks for none; a CUBLAS_WORKSPACE_CONFIG of the
    user's wins either way."""
    from elas.kernels.cublas import VAR, apply_choice
    env = {}
    assert apply_choice(env) is None and env == {}
    env = {"ELAS_CUBLAS_WORKSPACE": "torch"}
    assert apply_choice(env) is None and VAR not in env
    env = {"ELAS_CUBLAS_WORKSPACE": "none"}
    assert apply_choice(env) == ":0:0" and env[VAR] == ":0:0"
    env = {"ELAS_CUBLAS_WORKSPACE": "none", VAR: ":4096:8"}
    assert apply_choice(env) == ":4096:8" and env[VAR] == ":4096:8"
    with pytest.raises(ValueError, match="ELAS_CUBLAS_WORKSPACE='0'"):
        apply_choice({"ELAS_CUBLAS_WORKSPACE": "0"})


def test_cli_applies_the_cublas_choice_except_for_the_grid(tmp_path, monkeypatch, capsys):
    """`elas` commands apply ELAS_CUBLAS_WORKSPACE before the command runs (torch reads the variable at the first
    GEMM); `elas experiment` leaves torch's default, so that a grid's later runs run the GEMMs of its first ones."""
    import os

    import elas.cli
    seen = {}

    def spy(name):  # records the variable as the command starts, then runs it
        real = getattr(elas.cli, name)

        def run(args):
            seen[name] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
            return real(args)
        return run
    for name in ("cmd_model", "cmd_experiment"):  # the parser binds them when main() builds it
        monkeypatch.setattr(elas.cli, name, spy(name))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # (conftest puts back what was there)
    monkeypatch.delenv("ELAS_CUBLAS_WORKSPACE", raising=False)
    assert elas.cli.main(["model", "--preset", "llama-60m"]) == 0
    assert seen == {"cmd_model": None}  # the default: torch's workspace
    monkeypatch.setenv("ELAS_CUBLAS_WORKSPACE", "none")
    assert elas.cli.main(["experiment", "--plan", "--size", "llama-tiny", "--steps", "10",
                          "--out", str(tmp_path / "g")]) == 0
    assert seen["cmd_experiment"] is None and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert elas.cli.main(["model", "--preset", "llama-60m"]) == 0
    assert seen["cmd_model"] == ":0:0"
    capsys.readouterr()


def test_cublas_resume_warning():
    """A resumed run whose cuBLAS workspace setting is not its checkpoint's is told so in one line; checkpoints that
    predate the key, and agreeing settings, say nothing."""
    from elas.kernels.cublas import describe, resume_warning
    assert resume_warning({}, {}) is None
    assert resume_warning({"cublas_workspace_config": ":0:0"}, {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}) is None
    assert resume_warning({"cublas_workspace_config": None}, {}) is None
    w = resume_warning({"cublas_workspace_config": None}, {"CUBLAS_WORKSPACE_CONFIG": ":0:0"})
    assert w.startswith("elas: warning:") and ":0:0 here but was unset (torch's default)" in w and "\n" not in w
    w = resume_warning({"cublas_workspace_config": ":0:0"}, {})
    assert "unset (torch's default) here but was :0:0" in w
    assert "without a workspace" in describe(":0:0") and "torch's default" in describe(None)


def test_bench_environment_records_the_cublas_setting(monkeypatch):
    from elas.bench.kernels import environment
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    assert environment()["cublas_workspace_config"] == ":0:0"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    assert environment()["cublas_workspace_config"] is None


def test_report_contents_links_each_heading_once():
    """The contents list `elas bench report` keeps: headings of levels 2-4 nested by level, GitHub's anchors (a
    repeated one numbered through the whole document), nothing from code blocks or the generated tables."""
    from elas.bench.report import CONTENTS, GENERATED, contents, slug
    assert slug("The 1.2x target: `step.json` (H100; 1B)", {}) == "the-12x-target-stepjson-h100-1b"
    assert slug("ReLU² 2:4 `fuse_qkv`", {}) == "relu-24-fuse_qkv"  # ('²' is no decimal digit: GitHub drops it)
    seen = {}
    assert [slug(h, seen) for h in ("Echo", "Echo", "Echo 1")] == ["echo", "echo-1", "echo-1-1"]
    assert contents("## B ##\n~~~\n## no\n~~~\n````\n```\n## no2\n````\n ## [a link](http://x.y) `k`").splitlines() \
        == ["- [B](#b)", "- [a link `k`](#a-link-k)"]
    text = "\n".join(["# Title", CONTENTS[0], CONTENTS[1], "## Kernels (H100)", "### A: b", "```", "## not one",
                      "```", "#### Deep", "##### too deep", "## Kernels (H100)", GENERATED[0], "### Kernels (H100)",
                      GENERATED[1], "## After"])
    assert contents(text).splitlines() == [
        "- [Kernels (H100)](#kernels-h100)", "  - [A: b](#a-b)", "    - [Deep](#deep)",
        "- [Kernels (H100)](#kernels-h100-1)", "- The generated tables (`elas bench report`), at the end",
        "- [After](#after)"]


def test_report_update_doc_keeps_the_contents(tmp_path):
    from elas.bench.report import CONTENTS, GENERATED, update_doc
    doc = tmp_path / "p.md"
    doc.write_text("\n".join(["# P", CONTENTS[0], "- stale", CONTENTS[1], "## A", GENERATED[0], "old", GENERATED[1],
                              ""]))
    (tmp_path / "results" / "h100").mkdir(parents=True)
    (tmp_path / "results" / "h100" / "gemm.json").write_text(
        (Path(__file__).parents[1] / "benchmarks" / "results" / "h100" / "gemm.json").read_text())
    assert update_doc(doc, tmp_path / "results") is True
    text = doc.read_text()
    assert "- stale" not in text and "old" not in text and "- [A](#a)" in text
    assert text.index(CONTENTS[0]) < text.index("- [A](#a)") < text.index(CONTENTS[1]) < text.index("## A")
    # run again: nothing to change, said so (the CLI printed "updated" either way), the file left as it was
    from elas.cli import main
    mtime = doc.stat().st_mtime_ns
    assert main(["bench", "report", "--doc", str(doc), "--results", str(tmp_path / "results")]) == 0
    assert doc.stat().st_mtime_ns == mtime


def test_report_names_a_missing_doc_and_the_flag(tmp_path, capsys):
    """Outside the repository the default doc (docs/performance.md, relative) is missing: one line naming --doc,
    not a bare "[Errno 2]"."""
    from elas.cli import main
    assert main(["bench", "report", "--doc", str(tmp_path / "none.md"), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--doc {tmp_path / 'none.md'}: no such file" in err and "give --doc" in err and err.count("\n") == 1


def test_report_refuses_a_doc_without_markers(tmp_path, capsys):
    from elas.cli import main
    doc = tmp_path / "x.md"
    doc.write_text("# nothing to keep\n")
    assert main(["bench", "report", "--doc", str(doc), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has neither the tables' markers" in err and doc.read_text() == "# nothing to keep\n"


def test_trainer_cublas_note_on_cuda_only(monkeypatch):
    """The trainer's resume check (logged after "resumed from"): a CUDA run warns where its checkpoint was written
    under another cuBLAS workspace setting; a CPU run never does."""
    from types import SimpleNamespace

    from elas.train.trainer import Trainer
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    saved = {"cublas_workspace_config": None}
    note = Trainer._cublas_note(SimpleNamespace(device=torch.device("cuda")), saved)
    assert note.startswith("elas: warning: CUBLAS_WORKSPACE_CONFIG is :0:0 here but was unset")
    assert Trainer._cublas_note(SimpleNamespace(device=torch.device("cpu")), saved) is None
    assert Trainer._cublas_note(SimpleNamespace(device=torch.device("cuda")), {}) is None  # older checkpoints


def test_report_refuses_markers_out_of_order(tmp_path):
    from elas.bench.report import CONTENTS, update_doc
    doc = tmp_path / "p.md"
    text = "\n".join(["# P", CONTENTS[1], "## A", CONTENTS[0], ""])
    doc.write_text(text)
    with pytest.raises(ValueError, match="has no <!-- END CONTENTS --> after it"):
        update_doc(doc, tmp_path)
    assert doc.read_text() == text



def test_environment_records_the_kernels_launch_overrides(monkeypatch):
    """A step timed under ELAS_<KERNEL>_CONFIG (kernels/cuda/overrides.py) says so in its JSON's env; unset or empty
    variables add nothing."""
    from elas.bench.kernels import environment
    monkeypatch.setenv("ELAS_RMSNORM_CONFIG", '{"rows": 4}')
    monkeypatch.setenv("ELAS_XENT_CONFIG", "")
    monkeypatch.delenv("ELAS_ATTN_CONFIG", raising=False)
    env = environment()
    assert env["elas_rmsnorm_config"] == '{"rows": 4}'
    assert "elas_xent_config" not in env and "elas_attn_config" not in env


def test_loss_step_resets_gradients_and_matches_the_loss():
    """bench/loss.py's shared closure (the loss benchmark and benchmarks/xent.py): each call starts from no
    gradient, so repeated timed calls give the gradient of one call, not a sum."""
    from elas.bench.loss import loss_inputs, loss_step
    from elas.model.loss import linear_cross_entropy
    h, w, t = loss_inputs(64, 16, 50, device="cpu")
    assert h.dtype == torch.bfloat16 and w.dtype == torch.float32 and h.requires_grad and w.requires_grad
    step = loss_step(linear_cross_entropy, h, w, t)
    first = step().detach()
    g1 = w.grad.clone()
    assert torch.equal(step().detach(), first) and torch.equal(w.grad, g1)


def test_backward_sweep_checks_every_form_before_it_times_it(monkeypatch):
    """bench/kernels.py's sweep of the 2:4 backward kernel (run by `elas bench sparsify` on the GPU), on the CPU
    under the interpreter with a stand-in timer: every form of each use (grid and word) computes the default's
    bytes, is timed, and the fastest is named; a form whose bytes differ is listed, not timed."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    from elas.bench import kernels as kb
    from elas.kernels.cuda import sparsify
    calls = []

    def fake_ms(fn):  # each form a different time; the second form timed is the fastest
        calls.append(fn)
        return 1.0 if len(calls) != 2 else 0.5
    monkeypatch.setattr(kb, "graph_ms", fake_ms)
    y1 = torch.randn(128, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    lines = []
    out = kb._backward_sweep(y1, log=lines.append)
    assert set(out) == {"ste", "mask", "mask_split"}
    assert "(2.00x: ELAS_BWD24_CONFIG='{\"rows\": 64, \"num_warps\": 4, \"words\": false}')" in lines[0], lines[0]
    for use in ("ste", "mask"):  # 4 grid forms (+ mask mode's word form) at 2 rows x 2 warps
        assert len(out[use]["variants_ms"]) == (8 if use == "mask" else 4) and "mismatched" not in out[use], out[use]
        assert ("rows128_warps4_words" in out[use]["variants_ms"]) == (use == "mask")
    assert len(out["mask_split"]["variants_ms"]) == 4
    assert out["ste"]["best"]["form"] == "rows64_warps4" and out["ste"]["best"]["vs_default"] == 2.0
    assert out["ste"]["best"]["env"] == 'ELAS_BWD24_CONFIG={"rows": 64, "num_warps": 4, "words": false}'
    assert "env" not in out["mask_split"]["best"]  # (the variable does not reach the split)
    # a form that computes other bytes (here: the grid forms without the split, which pass words=False, with one
    # wrong element) is reported
    real = sparsify.relu2_sparse24_backward

    def broken(*args, **kw):
        g = real(*args, **kw)
        if kw.get("words") is False:
            g.dy1[-1, -1] += 1
        return g
    monkeypatch.setattr(sparsify, "relu2_sparse24_backward", broken)
    out = kb._backward_sweep(y1, log=lambda *a: None)
    for use in ("ste", "mask"):  # (the word forms pass words=True: not broken here)
        assert len(out[use]["mismatched"]) == 4 and len(out[use]["variants_ms"]) == (4 if use == "mask" else 0)
    assert "best" not in out["ste"] and "mismatched" not in out["mask_split"]


def test_bwd24_env_names_the_fastest_forms_of_a_mode(tmp_path):
    """benchmarks/bwd24_env.py (what run_gpu.sh bwd24_step exports in its swept process): the mode's fastest
    backward form, and the forward's word form only where it beat every tile launch of its kind (with the mask
    bits for mask mode, without for ste), else the tile form by name; a value with spaces and quotes survives the
    stage's export loop. The rows of the removed persistent form, which the committed sweep holds and names
    fastest in places, are passed over, and so are ste's word rows (that form was removed): the value it prints is
    one the kernel's module accepts, for a form that still exists."""
    import importlib.util
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from bwd24_env import assignments
    bwd = {"mask": {"variants_ms": {"rows64_warps8": 1.0, "rows64_warps8_words": 0.8, "rows128_warps4_words": 0.9,
                                    "rows64_warps8_persistent2_prefetch": 0.7}},
           "ste": {"variants_ms": {"rows64_warps8": 1.0, "rows128_warps4": 0.9, "rows64_warps8_persistent4": 0.5,
                                   "rows64_warps4_words": 0.6},  # (ste's word form, removed: passed over too)
                   "best": {"env": 'ELAS_BWD24_CONFIG={"rows": 64, "num_warps": 8, "per_sm": 4, "prefetch": false}'}}}
    doc = {"rows": [{"K": 2176, "backward": {}}, {"K": 8192, "backward": bwd, "variants_ms": {
        "tiles2_warps8_rows128": 1.0, "words_groups16_warps8": 0.9, "tiles2_warps8_rows128_nobits": 0.7,
        "words_groups32_warps4_nobits": 0.8}}]}
    assert assignments(doc, "mask") == ['ELAS_BWD24_CONFIG={"rows": 64, "num_warps": 8, "words": true}',
                                        'ELAS_SPARSIFY_CONFIG={"words": true, "groups": 16, "num_warps": 8}']
    # (a tile launch was faster without the bits: said, whatever the module's default form)
    assert assignments(doc, "ste") == ['ELAS_BWD24_CONFIG={"rows": 128, "num_warps": 4, "words": false}',
                                       'ELAS_SPARSIFY_CONFIG={"words": false}']
    with pytest.raises(SystemExit, match="no row for K=4096"):
        assignments(doc, "mask", 4096)
    lines = "\n".join(assignments(doc, "mask"))
    r = subprocess.run(["bash", "-c", 'while IFS= read -r a; do export "${a?}"; done <<< "$CFG"; '
                        'printf "%s|%s" "$ELAS_BWD24_CONFIG" "$ELAS_SPARSIFY_CONFIG"'],
                       env={"CFG": lines, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.stdout == ('{"rows": 64, "num_warps": 8, "words": true}|'
                        '{"words": true, "groups": 16, "num_warps": 8}'), r.stderr
    # the committed sweep, whose ste rows name a persistent form fastest at K = 8192: the fastest form that is left,
    # which the kernel's module takes at import
    committed = json.loads((root / "benchmarks/results/h100/sparsify_bwd24.json").read_text())
    assert "persistent" in committed["rows"][0]["backward"]["ste"]["best"]["form"]  # (what makes this case)
    env = dict(a.split("=", 1) for a in assignments(committed, "ste"))
    assert env["ELAS_BWD24_CONFIG"] == '{"rows": 64, "num_warps": 8, "words": false}'
    if importlib.util.find_spec("triton") is not None:
        code = "import elas.kernels.cuda.sparsify as S; print(S.bwd_settings(False))"
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.stdout.strip() == "(64, 8, False)", r.stderr[-500:]


def test_committed_sparse_ratios_are_against_the_twins_fastest_mode(tmp_path):
    """benchmarks/ratio_audit.py over the committed step files: elas mode is the fastest mode of every variant
    timed in several modes; the ratios the tables show against a faster kernel form of the twin than the stored
    ones took (today's rule) are exactly the eight of the files that timed such a form; a tampered ratio and a
    file whose compiled row beats elas mode are reported."""
    import glob
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from ratio_audit import audit
    files = sorted(glob.glob(str(RESULTS / "*" / "step*.json")) + glob.glob(str(RESULTS / "*" / "*" / "step.json")))
    a = audit(files)
    assert a["ratios"] >= 93 and a["elas_not_fastest"] == [], a
    assert {(Path(f).name, v) for f, v, *_ in a["restated"]} == {
        ("step_elas_fuse.json", "elas+act24.cutlass=true"),
        ("step_elas_fuse.json", "elas+act24.cutlass=true+fuse_qkv=true"),
        ("step_mask_cutlass.json", "relu2-24"), ("step_mask_cutlass.json", "relu2-24+act24.cutlass=true"),
        ("step_elas_cutlass.json", "elas"), ("step_elas_cutlass.json", "elas+act24.cutlass=true"),
        ("step_elas_cutlass_keys.json", "elas"), ("step_elas_cutlass_keys.json", "elas+act24.cutlass=true")}
    assert all(now < stored for _, _, stored, now, _ in a["restated"])  # (a faster twin: lower ratios)
    doc = json.loads((RESULTS / "h200" / "step.json").read_text())
    r = next(r for r in doc["rows"] if "vs_twin" in r)
    r["vs_twin"] *= 1.01
    plain = next(x for x in doc["rows"] if x["mode"] == "torch.compile")
    elas = next(x for x in doc["rows"] if x["mode"] == "elas" and x["variant"] == plain["variant"]
                and (x["model"], x["batch"]) == (plain["model"], plain["batch"]))
    plain["step_ms"] = elas["step_ms"] / 2
    (tmp_path / "step.json").write_text(json.dumps(doc))
    a = audit([str(tmp_path / "step.json")])
    assert len(a["restated"]) == 1 and len(a["elas_not_fastest"]) == 1


# --- the harness's and the report's promises (each failed before its fix) ---

def test_results_folder_is_named_after_the_gpu_model():
    from elas.cli import UserError, gpu_folder
    assert gpu_folder("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_folder("NVIDIA H100 PCIe") == "h100"
    assert gpu_folder("NVIDIA H200") == "h200"
    assert gpu_folder("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_folder("NVIDIA L40S") == "l40s"
    with pytest.raises(UserError, match="--gpu-name"):
        gpu_folder("Some Accelerator")


_DOC = "x\n<!-- BEGIN GENERATED: elas bench report -->\nkept\n<!-- END GENERATED -->\n"


def test_report_refuses_a_results_folder_with_nothing_to_render(tmp_path, capsys):
    from elas.cli import main
    doc = tmp_path / "d.md"
    doc.write_text(_DOC)
    gpu = Path(__file__).parents[1] / "benchmarks" / "results" / "h100"  # a GPU's folder, not their parent
    assert main(["bench", "report", "--doc", str(doc), "--results", str(gpu)]) == 2
    assert "no result file to render" in capsys.readouterr().err and doc.read_text() == _DOC


@pytest.mark.parametrize("text,what", [
    ('{"command": "elas bench step", "rows": [{"model": ', "JSONDecodeError"),  # truncated
    (json.dumps({"command": "elas bench step", "env": {}}), "KeyError"),  # no rows
    (json.dumps({"rows": [{"model": "llama-1b", "variant": "relu2", "mode": "elas", "batch": 32, "seq": 256,
                           "step_ms": 100.0, "tokens_per_s": 8e4, "peak_mem_gb": 2.0}]}), "KeyError"),  # no compile_s
])
def test_report_names_the_file_it_cannot_render(tmp_path, capsys, text, what):
    from elas.cli import main
    (tmp_path / "res" / "h100").mkdir(parents=True)
    (tmp_path / "res" / "h100" / "step_x.json").write_text(text)
    (tmp_path / "d.md").write_text(_DOC)
    assert main(["bench", "report", "--doc", str(tmp_path / "d.md"), "--results", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "step_x.json: cannot render it" in err and what in err and "Traceback" not in err
    assert (tmp_path / "d.md").read_text() == _DOC


def test_report_writes_its_plots_beside_the_doc_whatever_the_working_folder(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import shutil

    from elas.cli import main
    (tmp_path / "res" / "h100").mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "benchmarks" / "results" / "h100" / "step.json", tmp_path / "res" / "h100")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "d.md").write_text(_DOC)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["bench", "report", "--doc", str(tmp_path / "out" / "d.md"), "--results", str(tmp_path / "res")]) == 0
    assert "](img/step_h100.png)" in (tmp_path / "out" / "d.md").read_text()
    assert (tmp_path / "out" / "img" / "step_h100.png").exists() and not (tmp_path / "elsewhere" / "docs").exists()


def test_plot_step_declines_rows_it_cannot_draw(tmp_path):
    from elas.bench.report import plot_step
    assert plot_step({"rows": []}, tmp_path / "a.png") is False
    row = {"model": "llama-1b", "variant": "relu2", "tokens_per_s": 1.0, "ffn_act_mem_gb": 1.0}
    assert plot_step({"rows": [row]}, tmp_path / "b.png") is False  # no SwiGLU row to relate it to
    assert not list(tmp_path.iterdir())


def test_gemm_table_keeps_the_workspace_bytes_out_of_the_microseconds():
    from elas.bench.report import gemm_table
    out = gemm_table({"rows": [], "host_overhead": {"elas_us": 17.1, "workspace_bytes": 2367.0}})
    times = next(line for line in out.splitlines() if line.startswith("Host time"))
    assert "elas 17.1" in times and "workspace" not in times
    assert "workspace of that call: 2,367 bytes" in out


def _ffn_row(variant, ms, compiled, eager, timing="graph"):
    return {"model": "llama-60m", "variant": variant, "batch": 1, "seq": 256, "ffn_ms": ms, "ffn_ms_eager": eager,
            "ffn_ms_compiled": compiled, "ffn_ms_best": min(t for t in (ms, compiled, eager) if t is not None),
            "ffn_timing": timing, "ffn_act_mem_gb": 1.0, "path": "p"}


def test_ffn_ratios_compare_timings_of_one_kind():
    """A row whose capture failed holds an eager time in ffn_ms: no ratio against the twin's graph replay; and
    "best" is the faster graph-replayed timing, never the eager one (which an older file stored as best)."""
    from elas.bench.report import ffn_table
    twin = _ffn_row("relu2", 2.0, 1.9, 1.5)  # eager 1.5 ms: faster than its graph timings, and not comparable
    eager_row = _ffn_row("relu2-24", 4.0, 1.0, 4.0, timing="eager")
    out = ffn_table({"rows": [twin, eager_row]})
    line = next(ln for ln in out.splitlines() if "| relu2-24 |" in ln)
    cells = [c.strip() for c in line.split("|")]
    assert cells[4] == "4.000 (eager)" and cells[5] == "-"  # not 2.0 / 4.0 = 0.50x
    assert cells[7] == "**1.90x**"  # the twin's best graph timing (1.9) over the row's compiled one (1.0), not 1.5
    assert cells[9] == "0.38x"  # eager against eager: 1.5 / 4.0


def test_compile_bench_measures_the_twin_first_whatever_the_order(monkeypatch):
    import elas.bench.compile as bc
    monkeypatch.setattr(bc, "graph_breaks", lambda *a, **k: [])
    ms = {"lowrank-relu2": 100.0, "elas": 90.0}
    seen = []
    monkeypatch.setattr(bc, "compiled_step_ms", lambda size, v, *a: seen.append(v) or {
        "model": size, "variant": v, "compiled_step_ms": ms[v], "compile_s": 1.0, "peak_mem_gb": 1.0})
    for asked in (["lowrank-relu2", "elas"], ["elas", "lowrank-relu2"], ["elas"]):
        seen.clear()
        rows = bc.bench_compile("llama-1b", asked, log=lambda s: None)
        assert seen == ["lowrank-relu2", "elas"]
        assert next(r for r in rows if r["variant"] == "elas")["ratio_vs_dense"] == pytest.approx(100 / 90)


@pytest.mark.parametrize("argv,msg", [
    (["bench", "loss", "--sizes", "bogus"], "--sizes bogus applies to bench infer, ffn, compile, step, loro, not loss"),
    (["bench", "gemm", "--modes", "elas"], "--modes elas applies to bench step, not gemm"),
    (["bench", "infer", "--no-profile"], "--no-profile applies to bench step, not infer"),
    (["bench", "sste", "--m", "5"], "--m 5 applies to bench gemm, sparsify, epilogue, not sste"),
    (["bench", "ffn", "--optimizer", "adamw"], "--optimizer adamw applies to bench step, not ffn"),
    (["bench", "report", "--gpu-name", "h100"], "--gpu-name h100 applies to bench"),
    (["bench", "step", "--solvers", "qr"], "--solvers qr applies to bench loro, not step"),
    (["bench", "step", "--optimizer", "loro_adamw", "--variants", "elas,relu2"],
     "--optimizer loro_adamw needs low-rank variants; relu2 is full-rank"),
])
def test_bench_refuses_options_its_benchmark_would_ignore(capsys, argv, msg):
    from elas.cli import main
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_bench_step_with_loro_defaults_to_the_low_rank_variants(monkeypatch):
    import elas.cli as C
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(C, "_choices", lambda text, valid, flag, _f=C._choices: (seen.setdefault(flag, text),
                                                                                   _f(text, valid, flag))[1])
    assert C.main(["bench", "step", "--optimizer", "loro_adamw"]) == 2  # (no GPU here: stops at that check)
    assert set(seen["--variants"].split(",")) == {"lowrank-relu2", "elas", "elas-mask"}


def test_sparsifier_forms_count_as_2to4_work_in_the_profile():
    for name in ("_kernel", "_words_kernel", "_dense_kernel", "_sste_kernel", "_sste_dense_kernel", "_bwd_kernel"):
        assert category(name) == "2:4 sparsify/pack", name


def test_old_step_table_gives_no_ratio_across_timings():
    from elas.bench.report import step_tables
    base = {"model": "llama-1b", "batch": 32, "seq": 256, "mfu": None, "peak_mem_gb": 1.0, "ffn_ms": 1.0,
            "ffn_act_mem_gb": 1.0, "path": "p"}
    rows = [{**base, "variant": "swiglu", "step_ms": 200.0, "tokens_per_s": 1.0, "step_timing": "eager"},
            {**base, "variant": "relu2", "step_ms": 100.0, "tokens_per_s": 3.0}]
    line = next(ln for ln in step_tables({"rows": rows}).splitlines() if ln.startswith("| llama-1b | relu2 | 32x"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[7] == "-" and cells[10] == "-"  # vs SwiGLU (eager) refused; MFU unknown


def test_profile_counts_template_gemms_and_the_clipping_norm_where_they_belong():
    """Inductor's template GEMMs (max-autotune: triton_tem_*mm*) are GEMMs, not elementwise work (20 ms a step of
    benchmarks/results/h200/inductor_knobs.json); MasterAdamW's clipping norm (_sumsq_kernel) and foreach_norm's
    cleanup are the optimizer's clipping norms, as the category says."""
    for name in ("triton_tem_fused_mm_t_2", "triton_tem_fused__unsafe_view_mm_mul_relu_t_view_5",
                 "triton_tem_fused__to_copy_mm_mul_view_1", "triton_tem_fused_addmm_3", "triton_tem_fused_bmm_0"):
        assert category(name) == "GEMM", name
    assert category("_sumsq_kernel") == "optimizer"
    assert category("void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, true, float>(float") \
        == "optimizer"
    # a pointwise kernel fused around a GEMM is still pointwise
    assert category("triton_poi_fused__grouped_mm__to_copy_clamp_index_lt_mul_t_transpose_view_12") == "elementwise"


def test_bench_loss_keeps_the_rows_measured_before_a_failing_one(tmp_path, monkeypatch):
    import elas.bench.kernels as kb
    import elas.bench.loss as bl
    from elas.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kb, "environment", lambda: {"gpu": "NVIDIA H100 80GB HBM3"})
    done = []

    def row(tokens, d, vocab, impl, compiled):
        if len(done) == 2:  # the first compiled row fails (an Inductor error, out of memory, ...)
            raise RuntimeError("compile failed")
        done.append((impl, compiled))
        return {"tokens": tokens, "d_model": d, "vocab": vocab, "impl": impl, "compiled": compiled, "ms": 1.0,
                "peak_extra_gb": 0.1, "loss": 10.4}

    monkeypatch.setattr(bl, "loss_row", row)
    with pytest.raises(RuntimeError, match="compile failed"):
        main(["bench", "loss", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "loss.json").read_text())["rows"]
    assert [(r["impl"], r["compiled"]) for r in rows] == [("logits", False), ("chunked", False)]


@pytest.mark.parametrize("what", ["gemm", "sparsify", "epilogue"])
def test_bench_refuses_a_token_count_the_2to4_layout_cannot_take(capsys, what):
    """--m rows of the packed operand: the SM90 layout takes multiples of 64 only (packed.check_shape); another
    value is refused before any GPU work, not as a traceback from the first kernel."""
    from elas.cli import main
    assert main(["bench", what, "--m", "100"]) == 2
    err = capsys.readouterr().err
    assert "invalid --m 100" in err and "multiple of 64" in err and "Traceback" not in err


@pytest.mark.parametrize("what", ["step", "ffn"])
@pytest.mark.parametrize("variant,says", [("elas+fused", "KEY=VALUE"),
                                          ("elas+act24.fused=true+act24.fused=false", "given twice")])
def test_bench_variant_with_a_malformed_option_fails_in_one_line(capsys, what, variant, says):
    from elas.cli import main
    assert main(["bench", what, "--variants", variant]) == 2
    err = capsys.readouterr().err
    assert f"invalid --variants value {variant!r}" in err and says in err


def test_swiglu_aligned_takes_kernel_keys_as_the_other_step_variants_do():
    """The CLI accepts swiglu-aligned+KEY=VALUE (it checks the name before the keys) and ratios() counts it as a
    form of swiglu-aligned; the config must then be SwiGLU at the rounded width with the key set."""
    from elas.bench.step import plain_config
    plain = step_config("llama-60m", "swiglu-aligned", "elas", 256)
    keyed = step_config("llama-60m", "swiglu-aligned+fuse_qkv=true", "elas", 256)
    assert keyed.fuse_qkv is True and keyed.intermediate == plain.intermediate and plain.intermediate % 128 == 0
    # plain torch.compile drops elas's kernel keys: one plain row serves both
    assert plain_config("llama-60m", "swiglu-aligned+fuse_qkv=true", 256) == plain_config("llama-60m",
                                                                                         "swiglu-aligned", 256)


@pytest.mark.parametrize("what", ["ffn", "compile"])
def test_bench_refuses_an_infinite_batch_scale_in_one_line(capsys, what):
    from elas.cli import main
    assert main(["bench", what, "--batch-scale", "inf"]) == 2
    assert "invalid --batch-scale inf" in capsys.readouterr().err


def test_report_names_a_result_file_that_is_json_but_not_an_object(tmp_path):
    """A result file holding valid JSON that is not an object (a list, say) is one ValueError naming the file,
    not an AttributeError traceback from a renderer."""
    from elas.bench.report import render
    (tmp_path / "h100").mkdir()
    (tmp_path / "h100" / "gemm.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="gemm.json: cannot render it"):
        render(tmp_path, img=tmp_path / "img")


def _fake_profile(monkeypatch, events):
    """kernel_times on CPU: the profiler replaced by one that lists `events` (name, start us, end us, annotation)."""
    import types
    from torch.autograd import DeviceType
    import torch.profiler

    class Prof:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def events(self):
            return [types.SimpleNamespace(name=n, device_type=DeviceType.CUDA, is_user_annotation=ann,
                                          time_range=types.SimpleNamespace(start=s, end=e, elapsed_us=lambda s=s, e=e: e - s))
                    for n, s, e, ann in events]
    monkeypatch.setattr(torch.profiler, "profile", Prof)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def test_kernel_times_keeps_aten_lambda_kernels_and_drops_annotations(monkeypatch):
    """ATen's kernels built from lambdas carry '#' in their names ("{lambda()#3}"): autocast's casts, eager's
    silu / rsqrt / pow ... are kernels, counted; only GPU-side user annotations are left out (they span kernels)."""
    from elas.bench.profile import kernel_times
    cast = ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::direct_copy_kernel_cuda"
            "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::"
            "{lambda(float)#1}, std::array<char*, 2ul> >(int, ...)")
    _fake_profile(monkeypatch, [("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 0, 1000, False),
                                (cast, 1000, 1500, False), ("Optimizer.step#AdamW.step", 0, 1500, True),
                                ("ProfilerStep#1", 0, 1500, None)])  # (a profiler that does not flag it)
    span = {}
    kernels = kernel_times(lambda: None, iters=1, span=span)
    assert kernels == {"nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": 1.0, cast: 0.5}
    assert span == {"span_ms": 1.5, "gap_ms": 0.0}


def test_idle_counts_overlapping_kernels_once(monkeypatch):
    """Two kernels that overlap (two streams, programmatic dependent launch) keep the GPU busy for their union: the
    step's idle time is step time less that union, not less their summed times."""
    from elas.bench.profile import busy_ms, kernel_times
    _fake_profile(monkeypatch, [("nvjet_a", 0, 1000, False), ("_kernel", 500, 1500, False)])
    span = {}
    kernels = kernel_times(lambda: None, iters=1, span=span)
    assert sum(kernels.values()) == 2.0 and busy_ms(span) == 1.5
    assert 2.0 - busy_ms(span) == 0.5  # a 2 ms step: 0.5 ms idle (the summed times said 0)


def test_kernel_categories_read_the_op_not_the_launch_template_or_its_consumer():
    """ATen's LoadWithCast / StoreWithCast / gpu_kernel_impl_nocast name how a kernel loads, not what it computes;
    Inductor's pointwise kernels named after the op they feed (sparse_mm, SDPA) are not that op."""
    add = ("void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>, 4, "
           "TrivialOffsetCalculator<2, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, "
           "at::native::memory::LoadWithCast<2>, at::native::memory::StoreWithCast<1> >(int, ...)")
    mul = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::BinaryFunctor<float, "
           "float, float, at::native::binary_internal::MulFunctor<float> > >(at::TensorIteratorBase&, ...)::{lambda(int)#1}>")
    cast = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
            "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#12}>")
    assert category(add) == "elementwise" and category(mul) == "elementwise" and category(cast) == "copy"
    for name in ("triton_poi_fused_sparse_mm_t_view_1", "triton_poi_fused__to_copy__unsafe_view_add_mul_sparse_mm_t_view_4",
                 "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy__unsafe_view_add_cat_mul_split_sub_"
                 "transpose_view_1"):
        assert category(name) == "elementwise", name
    assert category("triton_tem_fused_mm_t_2") == "GEMM"  # (Inductor's template GEMMs stay GEMMs)


def test_ratios_compare_rows_of_one_sequence_length_and_checkpointing():
    base = {"model": "llama-7b", "batch": 48, "seq": 256, "mode": "elas", "activation_checkpointing": False}
    sparse = {**base, "variant": "elas", "tokens_per_s": 30000.0, "step_ms": 400.0}
    for other in ({"activation_checkpointing": True}, {"seq": 2048}):
        twin = {**base, **other, "variant": "lowrank-relu2", "tokens_per_s": 22000.0, "step_ms": 550.0}
        assert "vs_twin" not in ratios([sparse, twin])[0], other
    assert ratios([sparse, {**base, "variant": "lowrank-relu2", "tokens_per_s": 20000.0, "step_ms": 600.0}])[0][
        "vs_twin"] == 1.5


def test_bench_environment_records_the_blas_settings(monkeypatch):
    """run_gpu.sh blas_env exports any VAR=VALUE (e.g. CUBLASLT_WORKSPACE_SIZE=0): the JSON must say which."""
    from elas.bench.kernels import environment
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "0")
    monkeypatch.setenv("TORCH_BLAS_PREFER_CUBLASLT", "1")
    env = environment()
    assert env["cublaslt_workspace_size"] == "0" and env["torch_blas_prefer_cublaslt"] == "1"


def test_gpu_script_blas_env_reports_no_stale_rows(tmp_path):
    """A blas_env setting whose run writes no step.json (failed, cut off) says so: an earlier call's file in its
    folder (a warm machine keeps runs/) is not printed as this call's measurement."""
    import os
    import subprocess
    import sys
    if torch_has_cuda():
        pytest.skip("a GPU is present: the stage would run")
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "elas").mkdir()
    (tmp_path / "elas" / "step.json").write_text(json.dumps({"rows": [
        {"model": "llama-1b", "variant": "lowrank-relu2", "mode": "elas", "step_ms": 65.49}]}))
    env = {**os.environ, "BLAS_DIR": str(tmp_path), "BLAS_SETTINGS": "elas", "PYTHONPATH": str(root / "src"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "benchmarks/run_gpu.sh", "blas_env"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert "no step.json" in r.stdout and "65.49" not in r.stdout, r.stdout + r.stderr
