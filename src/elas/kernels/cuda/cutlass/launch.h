// What our CUTLASS libraries share: one launch of a CUTLASS 3.x device GEMM, optionally timed by events.
#pragma once
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace elas_cutlass {

// iters == 0: one run. iters > 0: one run, then iters runs between two events on `stream`: *ms = their mean.
// Returns 0 on success; 2 cannot implement, 3 workspace too small, 4 initialize, 5 run, 6 CUDA error.
template <class Gemm>
int run(typename Gemm::Arguments const& arguments, void* workspace, size_t ws_bytes, cudaStream_t stream, int iters,
        float* ms) {
  Gemm gemm;
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return 2;
  if (Gemm::get_workspace_size(arguments) > ws_bytes) return 3;
  if (gemm.initialize(arguments, workspace, stream) != cutlass::Status::kSuccess) return 4;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 5;
  if (iters > 0) {
    cudaEvent_t t0, t1;
    cudaEventCreate(&t0);
    cudaEventCreate(&t1);
    cudaEventRecord(t0, stream);
    for (int i = 0; i < iters; ++i) gemm.run(stream);
    cudaEventRecord(t1, stream);
    cudaEventSynchronize(t1);
    cudaEventElapsedTime(ms, t0, t1);
    *ms /= iters;
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 6;
}

}  // namespace elas_cutlass
