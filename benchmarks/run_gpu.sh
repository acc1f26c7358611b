#!/usr/bin/env bash
# One GPU session: kernel tests, then benchmarks. Usage: benchmarks/run_gpu.sh [tests|kernels|ffn|step]...
# (default: tests kernels ffn). Results land in benchmarks/results/<gpu>/ and, when $OUT is set (the lent GPU
# machine), are copied there too, with the tuned cuSPARSELt algorithm cache.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export ELAS_CACHE_DIR=${ELAS_CACHE_DIR:-.cache/elas}
GPU=${GPU_NAME:-h100}
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'cusparselt', torch.backends.cusparselt.version())"
for what in "${@:-tests kernels ffn}"; do
  for w in $what; do
    case $w in
      tests) python -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests/ 2>&1 | tail -15 ;;
      kernels) python -m elas bench sparsify --gpu-name "$GPU"; python -m elas bench gemm --gpu-name "$GPU" ;;
      ffn) python -m elas bench ffn --gpu-name "$GPU" ;;
      step) python -m elas bench step --gpu-name "$GPU" ;;
      step-half) python -m elas bench step --batch-scale 0.5 --gpu-name "$GPU" ;;
    esac
  done
done
if [ -n "${OUT:-}" ]; then
  cp -r benchmarks/results "$OUT/" 2>/dev/null
  mkdir -p "$OUT/cache" && cp "$ELAS_CACHE_DIR"/*.json "$OUT/cache/" 2>/dev/null
fi
