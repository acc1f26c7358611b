#!/usr/bin/env bash
# Build one of our CUTLASS libraries for sm_90a on any x86 machine (no GPU needed): nvcc, the CUDA headers and
# CUTLASS's headers all come from pip wheels into a scratch folder (~200 MB unpacked). cudart is linked statically,
# so the library needs only the driver on the GPU machine (CUDA 13 minor-version compatibility: a 13.0 driver runs it).
#   src/elas/kernels/cuda/cutlass/build.sh sp     -> build/cutlass_sp/libelas_cutlass_sp.so       (sp_gemm.cu: 2:4 sparse GEMM)
#   src/elas/kernels/cuda/cutlass/build.sh relu2  -> build/cutlass_relu2/libelas_cutlass_relu2.so (relu2_gemm.cu: ReLU^2 epilogues)
#   src/elas/kernels/cuda/cutlass/build.sh check  -> builds and runs layout_check.cu on this machine's CPU: the register
#                                                     layout facts relu2_gemm.cu's 2:4 epilogues rely on
# A second argument overrides the output folder; TOOLS=DIR reuses the scratch folder.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
case ${1:-} in
  sp) src=sp_gemm.cu ;;
  relu2) src=relu2_gemm.cu ;;
  check) src=layout_check.cu ;;
  *) echo "usage: $0 sp|relu2|check [OUT_DIR]: which library to build, got '${1:-}'" >&2; exit 2 ;;
esac
name=cutlass_$1
out=${2:-build/$name}
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
flags=(-std=c++17 -arch=sm_90a -O3 --expt-relaxed-constexpr -Xcompiler -fPIC -DNDEBUG -I"$here" -I"$cutlass/include"
       -I"$cutlass/tools/util/include" -I"$cu/include" -I"$cu/include/cccl" -L"$cu/lib")
if [ "$1" = check ]; then
  time "$cu/bin/nvcc" "${flags[@]}" -o "$out/layout_check" "$here/$src"
  "$out/layout_check"
  exit
fi
time "$cu/bin/nvcc" "${flags[@]}" -shared -o "$out/libelas_$name.so" "$here/$src"
ls -la "$out/libelas_$name.so"
