#!/usr/bin/env bash
# One GPU session: kernel tests, then benchmarks. Usage: benchmarks/run_gpu.sh STAGE...
# stages: tests kernels bwd24 bwd24_step epilogue infer ffn step sizes compile loss xent loro vnm cutlass cutlass_probe cutlass_relu2 rmsnorm norm norm_sweep norm_target target moments elas_cutlass mask_cutlass attention attn_ncu launches full_rank blas_env quality grid (default: tests kernels ffn); STEP_ARGS / TESTS narrow
# the step benchmark and the test selection. Results land in benchmarks/results/<gpu>/ and, when $OUT is set (the lent GPU
# machine), are copied there too, with the tuned cuSPARSELt algorithm cache.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export ELAS_CACHE_DIR=${ELAS_CACHE_DIR:-.cache/elas}
# the extension build, Triton's and Inductor's caches: carried between calls as .cache (tarred into $OUT)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-.cache/torch_ext} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-.cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-.cache/inductor} PYTHONUNBUFFERED=1
GPU=${GPU_NAME:-h100}
failed=0  # a failed test stage makes the script exit 1 (after the other stages), so a chain can stop on it
mkdir -p runs
# the CUTLASS forms that faulted on this machine (cutlass_probe stage; a file kept while the machine stays warm): the
# library treats them as absent, so the stages that use it run to the end (cutlass_relu2.skipped)
[ -f runs/cutlass_skip ] && export ELAS_CUTLASS_SKIP=${ELAS_CUTLASS_SKIP:-$(cat runs/cutlass_skip)}
# the log lines elas prints ("elas: ...") and warnings left out of a call's output, its errors ("elas: error: ...") kept;
# line-buffered, so that a detached run's log shows each line as it comes
quiet() { grep --line-buffered -v -E '^elas: ([^e]|e[^r])|Warning|warn\(|it/s' ; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'cusparselt', torch.backends.cusparselt.version())"
for what in "${@:-tests kernels ffn}"; do
  for w in $what; do
    case $w in
      # (all GPU tests took more than 560 s on an H100 on 2026-12-05: split them over two calls, e.g.
      # TESTS="tests/test_[a-r]*.py" then TESTS="tests/test_[s-z]*.py")
      tests) timeout "${TESTS_TIMEOUT:-560}" python -m pytest -o addopts="" -q -p no:cacheprovider --durations=15 \
               --continue-on-collection-errors -m gpu ${TESTS:-tests/} > runs/gpu_tests.log 2>&1 || failed=1
             tail -45 runs/gpu_tests.log; [ -n "${OUT:-}" ] && cp runs/gpu_tests.log "$OUT/" ;;
      kernels) python -m elas bench sparsify --gpu-name "$GPU"; python -m elas bench gemm --gpu-name "$GPU" ;;
      epilogue) python -m elas bench epilogue --gpu-name "$GPU" ;;
      bwd24)  # the 2:4 sparsifier and its backward at the 1B step's tokens (8192) and every ELAS width: each launch
              # and word form, byte-checked against the default before it is timed (minutes, compiles included):
              # benchmarks/results/$GPU/bwd24/sparsify.json
        # (the widths one by one, the 1B width first, each written when done: a cut-off, at BWD24_TIMEOUT s (default
        # 540), keeps what finished)
        timeout "${BWD24_TIMEOUT:-540}" python -m elas bench sparsify --gpu-name "$GPU" --m 8192 \
          --out "benchmarks/results/$GPU/bwd24" || failed=1
        # (also under runs/: the next call's copy of the working tree removes the untracked results file)
        mkdir -p runs/bwd24 && cp "benchmarks/results/$GPU/bwd24/sparsify.json" runs/bwd24/ 2>/dev/null ;;
      bwd24_step)  # the 1B steps whose backward runs without the split in one mode (BWD24_MODE: mask, the default:
                   # relu2-24 and elas-mask; ste: elas) beside their dense twins, in two processes: with bwd24's
                   # fastest forms of that mode at K = 8192 (benchmarks/bwd24_env.py: ELAS_BWD24_CONFIG, and
                   # ELAS_SPARSIFY_CONFIG where the forward's word form won; bwd24_step_<mode>_swept/step.json)
                   # and with the default (bwd24_step_<mode>_default/); run bwd24 first. BWD24_VARIANTS replaces
                   # the variants (~3 min a process)
        mode=${BWD24_MODE:-mask}
        case $mode in mask) vs=lowrank-relu2,elas-mask,relu2,relu2-24 ;; ste) vs=lowrank-relu2,elas ;;
          *) echo "bwd24_step: BWD24_MODE=$mode: expected mask or ste" >&2; vs= ;; esac
        sweep=runs/bwd24/sparsify.json; [ -f "$sweep" ] || sweep=benchmarks/results/$GPU/bwd24/sparsify.json
        cfg=$(python benchmarks/bwd24_env.py "$sweep" "$mode") || cfg=
        if [ -z "$vs" ]; then
          failed=1
        elif [ -z "$cfg" ]; then
          echo "bwd24_step: no sweep on this machine ($sweep): run bwd24 first" >&2
          failed=1
        else
          echo "swept: $cfg"
          for form in swept default; do
            ( unset ELAS_BWD24_CONFIG ELAS_SPARSIFY_CONFIG
              if [ "$form" = swept ]; then while IFS= read -r a; do export "${a?}"; done <<< "$cfg"; fi
              timeout "${STEP_TIMEOUT:-560}" python -m elas bench step --gpu-name "$GPU" --sizes llama-1b --batches 32 \
                --modes elas --variants "${BWD24_VARIANTS:-$vs}" \
                --out "benchmarks/results/$GPU/bwd24_step_${mode}_$form" 2>&1 | quiet
              [ "${PIPESTATUS[0]}" -eq 0 ] ) || failed=1
            [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C benchmarks/results "$GPU" 2>/dev/null
          done
        fi ;;
      infer) python -m elas bench infer --gpu-name "$GPU" ;;
      ffn) python -m elas bench ffn --gpu-name "$GPU" ;;
      step) timeout "${STEP_TIMEOUT:-560}" python -m elas bench step --gpu-name "$GPU" ${STEP_ARGS:-} 2>&1 \
              | quiet ;;
      compile) timeout "${COMPILE_TIMEOUT:-560}" python -m elas bench compile --gpu-name "$GPU" ${COMPILE_ARGS:-} ;;
      loro) python -m elas bench loro --gpu-name "$GPU" ;;
      vnm)  # V:N:M's grouped path (own mode, contiguous clusters) at m=16, m=8 and top-2 routing, its selection kernel,
            # torch's grouped GEMM against dense at these shapes, the full recipe
        python benchmarks/vnm_select.py "benchmarks/results/$GPU"
        python benchmarks/grouped_gemm.py "benchmarks/results/$GPU"
        own=relu2-vnm-fast  # own mode, grouped, m=16, contiguous clusters (config.VARIANTS)
        full=relu2-w24-vnm-fast
        python -m elas bench ffn --gpu-name "$GPU" --sizes llama-350m,llama-1b \
          --variants relu2,$own,$own+vnm.m=8,$own+vnm.topk=2,$full
        timeout "${STEP_TIMEOUT:-560}" python -m elas bench step --gpu-name "$GPU" --sizes llama-350m,llama-1b \
          --modes elas --variants relu2,$own,$own+vnm.m=8,$own+vnm.topk=2,$full 2>&1 | quiet ;;
      loss) python -m elas bench loss --gpu-name "$GPU" ;;
      xent)  # the chunked loss's per-chunk kernel against Inductor's form, its launch settings, then the whole loss
             # compiled with each (benchmarks/xent.py; ~1 min)
        python benchmarks/xent.py "${XENT_OUT:-benchmarks/results/$GPU}" ;;
      sizes)  # every size, ratios in one process each (the FFN-kernels issue's re-measure): per size and batch, the dense
              # rows in elas's default mode and under plain torch.compile (is elas's mode the twin's best, and by how
              # much), then the sparse rows in elas's mode beside their twins again; then the FFN table. SIZES_MODELS,
              # SIZES_BATCHES, SIZES_FFN=0 narrow it; SIZES_DENSE, SIZES_SPARSE replace the row lists (the dense twins
              # with their fastest keys, e.g. relu2+relu2_kernel=cutlass beside relu2-24+act24.cutlass=true);
              # SIZES_NO_PROFILE=1 skips the profile of each row (~10 s a row).
              # Results under SIZES_DIR/<size>-b<batch>-{dense,sparse}/: an
              # ignored folder by default, since a call's copy of the working tree removes what a detached run wrote
        d=${SIZES_DIR:-runs/sizes}
        # the sparse rows: the papers' variants, and how many d_ff GEMMs run sparse in each gradient mode (the FFN-kernels
        # issue's items 2 and 6): Haziza's split (4 of 6) on ELAS mask and relu2 (relu2-24-split), relu2-24 (mask: 2 of
        # 6) and its ste form (1)
        sparse=${SIZES_SPARSE:-lowrank-relu2,relu2,elas,elas-mask,elas-mask+act24.wgrad_dense_frac=0.05+act24.permute_tokens=true,relu2-24,relu2-24-split,relu2-24+act24.grad_mode=ste}
        step() { timeout "${STEP_TIMEOUT:-1800}" python -m elas bench step --gpu-name "$GPU" ${SIZES_NO_PROFILE:+--no-profile} \
                   --out "$d/$1" ${@:2} 2>&1 | quiet ; }
        for size in ${SIZES_MODELS:-llama-60m llama-130m llama-350m llama-1b}; do
          dense=${SIZES_DENSE:-lowrank-relu2,relu2}  # relu2_kernel=auto: the CUTLASS forward with ELAS_CUTLASS_RELU2
          [ "$size" = llama-1b ] && [ -z "${SIZES_DENSE:-}" ] && dense+=,swiglu-aligned  # ELAS vs SwiGLU: a 1B target
          for b in ${SIZES_BATCHES:-32}; do
            step "$size-b$b-dense" --sizes "$size" --batches "$b" --variants "$dense" --modes elas,torch.compile
            step "$size-b$b-sparse" --sizes "$size" --batches "$b" --modes elas --variants "$sparse"
          done
        done
        if [ "${SIZES_FFN:-1}" != 0 ]; then
          python -m elas bench ffn --gpu-name "$GPU" --out "$d/ffn"
          python -m elas bench ffn --gpu-name "$GPU" --out "$d/ffn-modes" --sizes llama-350m,llama-1b \
            --variants "lowrank-relu2,relu2,${sparse#lowrank-relu2,relu2,}"
        fi
        [ -n "${OUT:-}" ] && tar czf "$OUT/sizes.tgz" "$d" ;;
      cutlass)  # our CUTLASS sm90 sparse GEMM against cuSPARSELt and cuBLAS; the library is built off the GPU machine
                # (src/elas/kernels/cuda/cutlass/build.sh sp) and carried: carry build/cutlass_sp
        python benchmarks/cutlass_sparse.py build/cutlass_sp/libelas_cutlass_sp.so "benchmarks/results/$GPU" ;;
      rmsnorm)  # the one-pass RMSNorm backward against Inductor's at 60M-1B shapes (~1 min; its launch knobs'
                # sweep: norm_sweep, at the 1B shape)
        python benchmarks/rmsnorm_bwd.py "benchmarks/results/$GPU" || failed=1 ;;
      norm_sweep)  # the norm backward's launch knobs swept at the 1B shape (216 settings, ~2 min): runs/rmsnorm/
                   # rmsnorm_bwd.json (what norm_target reads: its first shape) and benchmarks/results/$GPU/
                   # rmsnorm_bwd_1b.json; NORM_ONLY picks the shapes (a part of their descriptions, e.g. 350M; empty:
                   # all five, 60M-1B, ~2 min each, into rmsnorm_bwd_sweep.json)
        only=${NORM_ONLY-1B, batch 32}
        name=rmsnorm_bwd_sweep.json; [ "$only" = "1B, batch 32" ] && name=rmsnorm_bwd_1b.json
        rm -f runs/rmsnorm/rmsnorm_bwd.json "benchmarks/results/$GPU/$name"  # (not an earlier call's)
        mkdir -p "benchmarks/results/$GPU"
        python benchmarks/rmsnorm_bwd.py runs/rmsnorm --sweep ${only:+--only "$only"} \
          && cp runs/rmsnorm/rmsnorm_bwd.json "benchmarks/results/$GPU/$name" || failed=1 ;;
      norm_target)  # the 1.2x target's rows (the target stage) with norm_sweep's fastest settings at the 1B shape
                    # (ELAS_RMSNORM_CONFIG), beside plain compile: norm_target_swept/step.json (its env records the
                    # setting). The built-in settings' rows: the target stage itself, in a process of its own
        rm -rf "benchmarks/results/$GPU/norm_target_swept"
        cfg=$(python -c "import json, sys; r = [r for r in json.load(open(sys.argv[1]))['rows'] if r['what'] == sys.argv[2]]
print(r[0]['env'].split('=', 1)[1])" runs/rmsnorm/rmsnorm_bwd.json "1B, batch 32 x 256" 2>/dev/null) || cfg=
        if [ -z "$cfg" ]; then
          echo "norm_target: no sweep on this machine (runs/rmsnorm/rmsnorm_bwd.json): run norm_sweep first" >&2
          failed=1
        else
          echo "swept: ELAS_RMSNORM_CONFIG=$cfg"
          ELAS_RMSNORM_CONFIG=$cfg OUT= TARGET_OUT="benchmarks/results/$GPU/norm_target_swept" \
            bash benchmarks/run_gpu.sh target || failed=1
          [ -f "benchmarks/results/$GPU/norm_target_swept/step.json" ] || failed=1
        fi ;;
      norm)  # the one-pass RMSNorm backward against Inductor's kernels, then the 1B dense step with it, with the
             # CUTLASS ReLU^2 forward, with the rotary embedding in the q/k GEMM's epilogue (with and without
             # fuse_qkv), and with all three keys (ELAS_CUTLASS_RELU2; carry build/cutlass_relu2), beside the default
        python benchmarks/rmsnorm_bwd.py "benchmarks/results/$GPU"
        v=lowrank-relu2+relu2_kernel=torch; all=$v+relu2_kernel=cutlass+norm_kernel=fused+rope_kernel=cutlass
        k=${ELAS_CUTLASS_RELU2:+,$v+relu2_kernel=cutlass,$v+rope_kernel=cutlass,$v+fuse_qkv=true+rope_kernel=cutlass,$all,$all+fuse_qkv=true}
        timeout "${STEP_TIMEOUT:-560}" python -m elas bench step --gpu-name "$GPU" --sizes llama-1b --modes elas \
          --variants "$v,$v+norm_kernel=fused$k" --out "${NORM_OUT:-benchmarks/results/$GPU/step_norm}" 2>&1 | quiet ;;
      target)  # the 1.2x target's row in one process: the dense 1B twin in elas mode (relu2_kernel=auto: cutlass with
               # ELAS_CUTLASS_RELU2, carry build/cutlass_relu2; norm_kernel=auto: the one-pass norm backward, 1.013x
               # the former default on an H100: add $v+norm_kernel=torch to TARGET_MORE to time it again; fuse_qkv:
               # the q/k/v down-projections as one GEMM, the default since 2026-12-05; attn_backend=auto: elas's
               # attention kernel, the default since 2026-12-06, with ELAS_ATTN_CONFIG's launch settings if set; bf16
               # Adam moments over bf16 parameters, the default since 2026-12-06; ce_kernel=auto: the loss's one-pass
               # kernel), with the loss's torch ops (ce_kernel=torch: the former default), and plain torch.compile
               # of the same model (none of elas's kernels); TARGET_MORE adds variants (e.g. relu2: the full-rank
               # form; $v+fuse_qkv=false: three q/k/v GEMMs; $v+attn_backend=torch and $v+optim_state_dtype=fp32,
               # earlier defaults, timed in the target files of 2026-12-06); TARGET_BATCHES: per-GPU batches (default 32;
               # the issue's targets also name 64)
        v=lowrank-relu2; k=,$v+ce_kernel=torch
        k=$k${TARGET_MORE:+,$TARGET_MORE}  # (e.g. $v+pdl=true: timed on the H100 2026-12-05, no gain)
        timeout "${STEP_TIMEOUT:-560}" python -m elas bench step --gpu-name "$GPU" --sizes llama-1b \
          --batches "${TARGET_BATCHES:-32}" --modes elas,torch.compile --variants "$v$k" \
          --out "${TARGET_OUT:-benchmarks/results/$GPU/step_target}" 2>&1 | quiet
        [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1 ;;
      elas_cutlass)  # the 1B ELAS step with its d_ff-wide GEMMs on CUTLASS (act24.cutlass=auto, the default since
                     # 2026-12-07: the up-projection with the sparsifier and the dy2 GEMM with the backward's pointwise
                     # work in their epilogues) beside ELAS without them (act24.cutlass=false), the dense twin with
                     # its own CUTLASS forward (relu2_kernel=auto) and without it (torch), and the full-rank
                     # SwiGLU step at the aligned width (the "ELAS >= 2.0x SwiGLU" target; ELAS_SWIGLU=0 leaves it
                     # out); needs ELAS_CUTLASS_RELU2 (carry build/cutlass_relu2)
        v=lowrank-relu2 sw=,swiglu-aligned
        [ "${ELAS_SWIGLU:-1}" = 0 ] && sw=
        timeout "${STEP_TIMEOUT:-560}" python -m elas bench step --gpu-name "$GPU" --sizes llama-1b --modes elas \
          --variants "$v+relu2_kernel=torch,$v,elas,elas+act24.cutlass=false$sw" \
          --out "${ELAS_CUTLASS_OUT:-benchmarks/results/$GPU/step_elas_cutlass}" 2>&1 | quiet ;;
      mask_cutlass)  # the mask-mode CUTLASS forms (act24.cutlass=true with Haziza's gradient: modes 7 and 8) in the 1B
                     # full-rank step: relu2-24 beside relu2 with its own CUTLASS forward (auto) and without (torch);
                     # MASK_VARIANTS adds rows (e.g. lowrank-relu2,elas-mask,elas-mask+act24.cutlass=true); needs
                     # ELAS_CUTLASS_RELU2 (carry build/cutlass_relu2)
        v=relu2+relu2_kernel=torch,relu2,relu2-24,relu2-24+act24.cutlass=true${MASK_VARIANTS:+,$MASK_VARIANTS}
        timeout "${STEP_TIMEOUT:-560}" python -m elas bench step --gpu-name "$GPU" --sizes llama-1b --modes elas \
          --variants "$v" --out "${MASK_OUT:-benchmarks/results/$GPU/step_mask_cutlass}" 2>&1 | quiet ;;
      attention)  # model.attn_backend=triton (kernels/cuda/attention.py; what the default, auto, takes on Hopper):
                  # its launch settings swept and the layer's attention against torch's (rotary + cuDNN SDPA), then
                  # in one process the 1B step with torch's attention, with elas's (the default) and with fp32 moments
                  # (the former default; bf16 since 2026-12-06) too, all with the sweep's best settings, beside plain torch.compile (one row: elas's keys do not
                  # reach it): the 1.2x target's rows; ATTN_OUT (default benchmarks/results/$GPU) gets
                  # attention.json and step_attn/step.json (committed as step_attn.json)
        d=${ATTN_OUT:-benchmarks/results/$GPU}
        # the sweep writes into runs/attn first: a sweep cut off or failed leaves no file there, and the step rows
        # then run the committed defaults (said so), not an earlier sweep's settings
        rm -f runs/attn/attention.json
        timeout "${SWEEP_TIMEOUT:-240}" python benchmarks/attention.py runs/attn ${ATTN_SIZES:-llama-1b} 2>&1 | grep -v -E 'Warning|warn\(' | tail -14
        cfg=
        if [ -f runs/attn/attention.json ]; then
          mkdir -p "$d" && cp runs/attn/attention.json "$d/"
          cfg=$(python -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][0]
print(json.dumps({'fwd': r['triton_fwd_config'], 'bwd': r['triton_bwd_config']}))" runs/attn/attention.json)
        else
          echo "attention: the sweep wrote nothing; the step rows run the committed launch settings"
        fi
        ELAS_ATTN_CONFIG=$cfg timeout "${STEP_TIMEOUT:-340}" python -m elas bench step --gpu-name "$GPU" --sizes llama-1b \
          --modes elas,torch.compile --variants lowrank-relu2+attn_backend=torch,lowrank-relu2,lowrank-relu2+optim_state_dtype=fp32 \
          --out "$d/step_attn" 2>&1 | quiet | grep -E '^step|error' ;;
      attn_ncu)  # Nsight Compute on elas's attention kernels (forward, backward): where their warps stall
                 # (WarpStateStats; SourceCounters: the SASS lines that take the stalls) beside throughput and
                 # occupancy; the report, its details page and the SASS table into ATTN_OUT (default runs/attn)
        d=${ATTN_OUT:-runs/attn}; mkdir -p "$d"
        ncu --clock-control none --kernel-name regex:'_attn_(fwd|bwd)' --launch-skip 4 --launch-count 2 --section SpeedOfLight \
          --section Occupancy --section ComputeWorkloadAnalysis --section WarpStateStats --section SourceCounters \
          -o "$d/attn" -f python benchmarks/attention_profile.py llama-1b 32 > "$d/ncu.log" 2>&1 || tail -5 "$d/ncu.log"
        ncu -i "$d/attn.ncu-rep" --page details > "$d/attn_details.txt" 2>&1
        ncu -i "$d/attn.ncu-rep" --page source --csv --print-source sass > "$d/attn_sass.csv" 2>&1 || true
        grep -E "_attn_|Duration|Registers|Achieved Occupancy|Stall|stall|Warp Cycles|Issue Slot" "$d/attn_details.txt" \
          | head -60 ;;
      full_rank)  # the 1B full-rank steps in one process: relu2 in both forms (its CUTLASS forward, the default where the
                  # library is built, and relu2_kernel=torch) beside relu2-24 and relu2-24-split (~2 min), then the
                  # AccumulateGrad copies of relu2-24's step (launch_sources: none expected since W_down's gradient is
                  # written in its parameter's layout); step_full_rank/step.json, launch_sources_relu2-24.json
        timeout "${STEP_TIMEOUT:-400}" python -m elas bench step --gpu-name "$GPU" --sizes llama-1b --batches 32 \
          --modes elas --variants relu2,relu2+relu2_kernel=torch,relu2-24,relu2-24-split \
          --out "benchmarks/results/$GPU/step_full_rank" 2>&1 | quiet | grep -E '^step|error'
        python benchmarks/launch_sources.py relu2-24 llama-1b 32 "benchmarks/results/$GPU/launch_sources_relu2-24.json" \
          2>&1 | quiet | grep -E 'AccumulateGrad|Device -> Device' ;;
      launches)  # which host ops launch the 1B step's ~1,700 kernels and ~350 memsets (graph capture off, so that each
                 # launch names its op): the dense twin and ELAS
        for v in ${LAUNCH_VARIANTS:-lowrank-relu2 elas}; do
          python benchmarks/launch_sources.py "$v" llama-1b 32 "benchmarks/results/$GPU/launch_sources_$v.json" 2>&1 \
            | quiet | head -30
        done ;;
      blas_env)  # cuBLAS's workspace settings, one process each (torch reads them once per process), then one line per
                 # row: step ms, memsets, GEMM ms (~1 min a setting, the first ~2 min: the compile). `elas` is elas's
                 # default (torch's workspace), ELAS_CUBLAS_WORKSPACE=none cuBLAS without one (kernels/cublas.py);
                 # any other VAR=VALUE is exported on top of the default.
                 # BLAS_SETTINGS replaces the list; BLAS_SIZES (llama-1b), BLAS_VARIANTS (lowrank-relu2) and
                 # BLAS_MODES (elas; e.g. elas,torch.compile) the rows of each
        d=${BLAS_DIR:-runs/blas_env}
        settings=${BLAS_SETTINGS:-elas ELAS_CUBLAS_WORKSPACE=none}
        for e in $settings; do
          ( unset CUBLAS_WORKSPACE_CONFIG ELAS_CUBLAS_WORKSPACE  # (the caller's would change every row)
            [ "$e" != elas ] && export "${e?}"
            # an earlier call's file (a warm machine keeps runs/) must not stand in for a run that writes none
            rm -f "$d/$e/step.json"
            timeout "${STEP_TIMEOUT:-240}" python -m elas bench step --gpu-name "$GPU" --sizes "${BLAS_SIZES:-llama-1b}" \
              --modes "${BLAS_MODES:-elas}" --variants "${BLAS_VARIANTS:-lowrank-relu2}" --out "$d/$e" 2>&1 | quiet \
              | grep -E '^step|error' )
        done
        python - "$d" $settings <<'PY'
import json, sys
from pathlib import Path
for s in sys.argv[2:]:  # this call's settings only (a warm machine may hold an earlier call's folders)
    f = Path(sys.argv[1]) / s / "step.json"
    if not f.is_file():
        print(f"{s:30s} no step.json (failed or cut off)")
        continue
    for r in json.loads(f.read_text())["rows"]:
        if "step_ms" not in r:  # a row that failed (e.g. out of memory) carries its error instead
            print(f"{s:30s} {r.get('model')} {r.get('variant')} {r.get('mode')}: {r.get('error', 'no step_ms')}")
            continue
        # (memsets from the 40 most launched kernels: a handful may fall outside them)
        memsets = sum(n for k, n in r.get("kernel_launches_top", {}).items() if k.startswith("Memset"))
        print(f"{s:30s} {r['model']:10s} {r['variant']:16s} {r['mode']:13s} step {r['step_ms']:7.2f} ms"
              f"  memsets {memsets:5.0f}  launches {r.get('kernel_launches')}"
              f"  GEMM {r.get('breakdown_ms', {}).get('GEMM', 0):6.2f} ms  idle {r.get('breakdown_ms', {}).get('idle', 0):5.2f} ms")
PY
        [ -n "${OUT:-}" ] && tar czf "$OUT/blas_env.tgz" "$d" ;;
      cutlass_probe)  # each form of the CUTLASS ReLU^2 library (and the rotary GEMM) launched in a process of its own:
                      # the ones that fault are skipped by every later stage (ELAS_CUTLASS_SKIP); carry build/cutlass_relu2
        python benchmarks/cutlass_probe.py build/cutlass_relu2/libelas_cutlass_relu2.so runs
        export ELAS_CUTLASS_SKIP=$(cat runs/cutlass_skip 2>/dev/null)
        [ -n "${OUT:-}" ] && cp runs/cutlass_probe.json "$OUT/" ;;
      cutlass_relu2)  # a CUTLASS sm90 dense GEMM with relu(y1)^2 in its epilogue against cuBLAS + the separate kernel;
                      # built off the GPU machine (src/elas/kernels/cuda/cutlass/build.sh relu2): carry build/cutlass_relu2
        python benchmarks/cutlass_relu2.py build/cutlass_relu2/libelas_cutlass_relu2.so "${CUTLASS_OUT:-runs/cutlass}" ;;
      grid)  # the quality issue's grid on the site-packages corpus, prepared here when missing (~100 s on 16 cores; its
             # SHA-1 is printed, to check that calls and sessions share it); GRID_* select this call's part (GRID_BATCH x GRID_ACCUM
             # sequences per step: 512 x 1 at 60M; 256 x 2 at 130M, so that two processes fit on one GPU). A run cut
             # off by the timeout resumes in the next call while the machine is still warm (runs/ and data/ stay),
             # but a machine can be taken back between calls and checkpoints are too large to come back: two runs
             # at 1480 and 1880 of 2000 steps were lost so (2026-12-05): runs whose estimate does not fit before
             # the timeout are not started (--time-left; a 60M run alone: ~4.7 min on an H100, after ~100 s of
             # data preparation on a fresh machine)
        [ -f data/sp-32k/meta.json ] || python -m elas data prepare --source site-packages --out data/sp-32k \
          --vocab-size 32000 --max-mb 0 --val-frac 0.01 2>&1 | tail -1
        [ -f data/stdlib-sp32k/meta.json ] || python -m elas data prepare --source stdlib --tokenizer data/sp-32k \
          --out data/stdlib-sp32k --max-mb 0 --val-frac 0.05 2>&1 | tail -1
        python -c "import json; m = json.load(open('data/sp-32k/meta.json')); print('corpus', m['train_tokens'], 'tokens, sha1', m.get('train_sha1'))"
        # GRID_FROM: a folder of finished runs (e.g. docs/results/grid-60m) copied in first, so a fresh machine skips them;
        # GRID_ESTIMATE_FROM: another size's finished runs (e.g. docs/results/grid-60m for GRID_SIZE=llama-130m), whose
        # GPU times scaled by training FLOPs estimate the runs not done yet (--time-left starts only what fits). A 130M
        # run (~8-12 GPU-min by that estimate, twice that with GRID_PARALLEL=2) fits no 10-minute call: run the stage
        # detached (detached.sh, README) with GRID_TIMEOUT and GRID_TIME_LEFT set from the session's device time left
        mkdir -p "runs/grid-${GRID_SIZE:-llama-60m}"
        for r in ${GRID_FROM:+$GRID_FROM/*/}; do
          [ -f "$r/summary.json" ] && [ ! -e "runs/grid-${GRID_SIZE:-llama-60m}/$(basename "$r")" ] \
            && cp -r "$r" "runs/grid-${GRID_SIZE:-llama-60m}/" && echo "from $GRID_FROM: $(basename "$r")"
        done
        # default: what is left of a 10-minute call after the data (SECONDS: since this script started), less ~90 s
        # for what follows the stop (each run's checkpoint on SIGTERM, the summary, the archives): a call that ran
        # past its limit returned nothing. -k: a run that ignores the stop is killed 30 s later (its last checkpoint
        # stands)
        size=${GRID_SIZE:-llama-60m} limit=${GRID_TIMEOUT:-$((510 - SECONDS))} n=${GRID_PARALLEL:-1}
        [ "$limit" -lt 60 ] && limit=60
        grid() {
          # --time-left: a run whose estimate (the grid's done runs) does not fit before the timeout is not started
          # (a margin for the interpreter's start and the estimate's error; GRID_TIME_LEFT=0: every run starts)
          local tl=${GRID_TIME_LEFT:-$((limit > 135 ? limit - 45 : limit * 2 / 3))} budget=()
          [ "$tl" != 0 ] && budget=(--time-left "$tl" ${GRID_ESTIMATE_FROM:+--estimate-from "$GRID_ESTIMATE_FROM"})
          timeout -k 30 "$limit" python -m elas experiment --size "$size" --steps "${GRID_STEPS:-2000}" \
            ${budget[@]+"${budget[@]}"} \
            --batch-size "${GRID_BATCH:-512}" --grad-accum "${GRID_ACCUM:-1}" --data data/sp-32k --transfer-data data/stdlib-sp32k \
            --out "runs/grid-$size" --seeds "${GRID_SEEDS:-0}" ${1:+--variants $1} 2>&1 | quiet
        }
        if [ "$n" -le 1 ]; then
          grid "${GRID_VARIANTS:-}"
        else  # GRID_PARALLEL=N: the variants dealt round-robin to N processes on the one GPU, so that one trains
              # while another compiles or evaluates (their wall times overlap); then the whole grid is summarised.
              # Each run then takes about N times its GPU time: --time-left starts it only where that fits
          all=${GRID_VARIANTS:-$(python -c "from elas.train.experiment import grid_variants as g; print(','.join(g(${GRID_STEPS:-2000})))")}
          IFS=, read -ra vs <<< "$all"; IFS=, read -ra seeds <<< "${GRID_SEEDS:-0}"
          todo=()  # (only variants with a run left: done ones, e.g. GRID_FROM's, would leave a process idle)
          for v in "${vs[@]}"; do
            for s in "${seeds[@]}"; do
              r=$v; [ "$s" = 0 ] || r=$v.seed$s
              [ -f "runs/grid-$size/$r/summary.json" ] || { todo+=("$v"); break; }
            done
          done
          [ "${#todo[@]}" -lt "$n" ] && n=${#todo[@]}
          for ((p = 0; p < n; p++)); do
            part=""
            for ((i = p; i < ${#todo[@]}; i += n)); do part+="${part:+,}${todo[i]}"; done
            [ -n "$part" ] && { ELAS_GRID_SHARED=$n grid "$part" | sed -u "s/^/[$p] /" & }
          done
          wait
          python -m elas experiment --size "$size" --out "runs/grid-$size" --summarize-only 2>&1 | quiet
        fi
        [ -n "${OUT:-}" ] && tar czf "$OUT/grid.tgz" --exclude=checkpoints runs/grid-* ;;
      moments)  # optim_state_dtype=bf16 against fp32 moments in training: the 60M dense low-rank model with AdamW,
                # MOMENTS_STEPS steps (default 1000) on the site-packages corpus, the same seed and data, once each;
                # the validation curves side by side (moments.json). A run cut off resumes in the next call (warm)
        [ -f data/sp-32k/meta.json ] || python -m elas data prepare --source site-packages --out data/sp-32k \
          --vocab-size 32000 --max-mb 0 --val-frac 0.01 2>&1 | tail -1
        for d in fp32 bf16; do
          timeout "${MOMENTS_TIMEOUT:-270}" python -m elas train --preset llama-60m-lowrank-relu2 --optimizer adamw \
            --data data/sp-32k --out "runs/moments-$d" --max-steps "${MOMENTS_STEPS:-1000}" --no-progress --resume auto \
            --set batch_size=256 --set eval_every=200 --set save_every=200 --set optim_state_dtype=$d 2>&1 | quiet | tail -2
        done
        python benchmarks/moments.py runs/moments-fp32 runs/moments-bf16 "benchmarks/results/$GPU/moments.json" ;;
      quality)  # the quality grid on a prepared dataset; QUALITY_* select the part to run in this call
        timeout "${QUALITY_TIMEOUT:-520}" python -m elas experiment --size llama-60m --steps "${QUALITY_STEPS:-500}" \
          --batch-size 256 --grad-accum 1 --data "${QUALITY_DATA:-data/quality-32k}" --out runs/quality \
          ${QUALITY_VARIANTS:+--variants $QUALITY_VARIANTS} 2>&1 | quiet
        [ -n "${OUT:-}" ] && tar czf "$OUT/quality_runs.tgz" --exclude=checkpoints runs/quality ;;
    esac
    # the results so far into $OUT after every stage: a call cut off at its limit still brings back the stages it
    # finished (one archive: at most 8 files come back from a call)
    [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C benchmarks/results "$GPU" 2>/dev/null
  done
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/cache.tgz" .cache 2>/dev/null
  [ "$(stat -c %s "$OUT/cache.tgz")" -gt 15000000 ] && tar czf "$OUT/cache.tgz" --exclude=.cache/inductor .cache
fi
exit "$failed"
