#!/usr/bin/env bash
# Build libelas_cutlass_relu2.so for sm_90a on any x86 machine (no GPU needed), with the tools of
# benchmarks/cutlass_sp/build.sh (nvcc, CUDA and CUTLASS headers from pip wheels; cudart linked statically).
# Usage: benchmarks/cutlass_relu2/build.sh [OUT_DIR (default build/cutlass_relu2)] ; TOOLS=DIR reuses the scratch folder.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-build/cutlass_relu2}
tools=${TOOLS:-build/cuda_tools}
mkdir -p "$out" "$tools"
if [ ! -x "$tools/nvidia/cu13/bin/nvcc" ]; then
  pip download --quiet --no-deps -d "$tools/wheels" nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt \
    nvidia-cuda-runtime nvidia-cuda-cccl "nvidia-cutlass==4.2.0.0"
  for w in "$tools"/wheels/*.whl; do python -m zipfile -e "$w" "$tools"; done
  chmod +x "$tools"/nvidia/cu13/bin/* "$tools"/nvidia/cu13/nvvm/bin/*
fi
cu=$tools/nvidia/cu13
cutlass=$tools/cutlass_library/source
"$cu/bin/nvcc" --version | tail -1
time "$cu/bin/nvcc" -std=c++17 -arch=sm_90a -O3 --expt-relaxed-constexpr -Xcompiler -fPIC -shared \
  -DNDEBUG -I"$cutlass/include" -I"$cutlass/tools/util/include" -I"$cu/include" -I"$cu/include/cccl" \
  -L"$cu/lib" -o "$out/libelas_cutlass_relu2.so" "$here/relu2_gemm.cu"
ls -la "$out/libelas_cutlass_relu2.so"
