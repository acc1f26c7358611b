#!/usr/bin/env bash
# One GPU session: kernel tests, then the kernel benchmarks. Results land in benchmarks/results/<gpu>/ and, when
# $OUT is set (the lent GPU machine), are copied there too.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export ELAS_CACHE_DIR=${ELAS_CACHE_DIR:-.cache/elas}
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'cusparselt', torch.backends.cusparselt.version())"
python -m pytest -q -p no:cacheprovider tests/test_kernels.py "$@" 2>&1 | tail -40
python -m elas bench sparsify --gpu-name "${GPU_NAME:-h100}"
python -m elas bench gemm --gpu-name "${GPU_NAME:-h100}"
if [ -n "${OUT:-}" ]; then
  cp -r benchmarks/results "$OUT/" 2>/dev/null
  cp -r "$ELAS_CACHE_DIR" "$OUT/cache" 2>/dev/null
fi
