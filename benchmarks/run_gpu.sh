#!/usr/bin/env bash
# One GPU session: kernel tests, then benchmarks. Usage: benchmarks/run_gpu.sh STAGE...
# stages: tests kernels ffn step step-half loro quality (default: tests kernels ffn). Results land in benchmarks/results/<gpu>/ and, when $OUT is set (the lent GPU
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
      tests) python -m pytest -o addopts="" -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests/ 2>&1 | tail -15 ;;
      kernels) python -m elas bench sparsify --gpu-name "$GPU"; python -m elas bench gemm --gpu-name "$GPU" ;;
      ffn) python -m elas bench ffn --gpu-name "$GPU" ;;
      step) python -m elas bench step --gpu-name "$GPU" ;;
      step-half) python -m elas bench step --batch-scale 0.5 --gpu-name "$GPU" ;;
      loro) python -m elas bench loro --gpu-name "$GPU" ;;
      quality)  # the quality grid on a prepared dataset; QUALITY_* select the part to run in this call
        timeout "${QUALITY_TIMEOUT:-520}" python -m elas experiment --size llama-60m --steps "${QUALITY_STEPS:-500}" \
          --batch-size 256 --grad-accum 1 --data "${QUALITY_DATA:-data/quality-32k}" --out runs/quality \
          ${QUALITY_VARIANTS:+--variants $QUALITY_VARIANTS} 2>&1 | grep -v "^elas: \|it/s"
        [ -n "${OUT:-}" ] && tar czf "$OUT/quality_runs.tgz" --exclude=checkpoints runs/quality ;;
    esac
  done
done
if [ -n "${OUT:-}" ]; then
  cp -r benchmarks/results "$OUT/" 2>/dev/null
  mkdir -p "$OUT/cache" && cp "$ELAS_CACHE_DIR"/*.json "$OUT/cache/" 2>/dev/null
fi
