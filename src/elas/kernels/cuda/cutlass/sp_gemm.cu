// A 2:4 sparse GEMM on Hopper's sparse tensor cores through CUTLASS 3.x's sm90 collectives, as a C-ABI library
// for benchmarks/cutlass_sparse.py (ctypes): is a kernel of our own, tuned for elas's shapes, faster than
// cuSPARSELt? Built by build.sh with a pip-installed nvcc; needs no torch headers.
//
//   D[M, N] (bf16, row-major) = A[M, K] (2:4 along K, bf16) @ B[K, N] (bf16, K-major: B^T [N, K] contiguous)
//
// A is passed compressed in CUTLASS's sm90 format (not cuSPARSELt's): values [M, K/2] row-major (a group's two
// kept values in column order) and metadata E, one nibble i0 | i1 << 2 per group of 4 columns at the position
// benchmarks/cutlass_sparse.py's cutlass_meta_offset() gives (checked there against this library's own layout
// through elas_cutlass_sp_meta_offset). Accumulation in fp32.
#include <cstdint>
#include <cstdio>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/util/packed_stride.hpp"
#include "launch.h"

using namespace cute;

namespace {

using Bf16 = cutlass::bfloat16_t;

template <class TileMNK, class ClusterMNK, class MainSchedule, class EpiSchedule>
struct SpGemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileMNK, ClusterMNK,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8,  // no C
      Bf16, cutlass::layout::RowMajor, 8, EpiSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Bf16, cutlass::layout::RowMajor, 16,      // A: K-major; 16 logical = 8 stored values = 16 bytes per TMA row
      Bf16, cutlass::layout::ColumnMajor, 8,    // B: K-major
      float, TileMNK, ClusterMNK,
      // as many pipeline stages as shared memory holds beside the epilogue's
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename Mainloop::SparseConfig;

  static typename Gemm::Arguments args(const void* a, const void* e, const void* b, void* d, int M, int N, int K) {
    auto problem = make_shape(M, N, K, 1);
    typename Gemm::Arguments out{
        cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1},
        {static_cast<const typename Mainloop::ElementA*>(a), SparseConfig::fill_layoutA(problem),
         static_cast<const Bf16*>(b), cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {N, K, 1}),
         static_cast<const typename Mainloop::ElementE*>(e), SparseConfig::fill_layoutE(problem)},
        {{1.0f, 0.0f}, nullptr, cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, {M, N, 1}),
         static_cast<Bf16*>(d), cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {M, N, 1})}};
    out.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
    return out;
  }

  // one launch, or iters timed (launch.h)
  static int run(const void* a, const void* e, const void* b, void* d, int M, int N, int K, void* workspace,
                 size_t ws_bytes, cudaStream_t stream, int iters, float* ms) {
    return elas_cutlass::run<Gemm>(args(a, e, b, d, M, N, K), workspace, ws_bytes, stream, iters, ms);
  }

  static size_t workspace(int M, int N, int K) {
    return Gemm::get_workspace_size(args(nullptr, nullptr, nullptr, nullptr, M, N, K));
  }

  // the metadata layout's offset (in logical elements; 8 per byte, a nibble per group of 4) of element (m, k)
  static long long meta_offset(int M, int K, int m, int k) {
    return static_cast<long long>(SparseConfig::fill_layoutE(make_shape(M, 1, K, 1))(m, k, 0));
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// every configuration keeps K = 128 per tile, so that the metadata layout (which depends on min(tile K, 128))
// is the same for all of them
using C0 = SpGemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using C1 = SpGemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
using C2 = SpGemm<Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using C3 = SpGemm<Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
using C4 = SpGemm<Shape<_64, _128, _128>, Shape<_1, _1, _1>, Ping, PingEpi>;
using C5 = SpGemm<Shape<_64, _256, _128>, Shape<_1, _2, _1>, Ping, PingEpi>;
// larger tiles: a sparse A tile is half the bytes of a dense one, so B's bytes dominate each stage; a 256-row tile
// reuses each B tile over twice the rows, and K = 256 halves the k-steps (the metadata layout is unchanged: K >= 128)
using C6 = SpGemm<Shape<_256, _128, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using C7 = SpGemm<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
using C8 = SpGemm<Shape<_256, _128, _128>, Shape<_1, _2, _1>, Coop, CoopEpi>;
using C9 = SpGemm<Shape<_128, _128, _256>, Shape<_2, _1, _1>, Coop, CoopEpi>;
const char* kNames[] = {"128x128x128 coop 1x1", "128x128x128 coop 2x1", "128x256x128 coop 1x1",
                        "128x256x128 coop 2x1", "64x128x128 pingpong 1x1", "64x256x128 pingpong 1x2",
                        "256x128x128 coop 1x1", "256x128x128 coop 2x1", "256x128x128 coop 1x2",
                        "128x128x256 coop 2x1"};
constexpr int kConfigs = 10;

}  // namespace

#define ELAS_DISPATCH(config, CALL)  \
  switch (config) {                  \
    case 0: return C0::CALL;         \
    case 1: return C1::CALL;         \
    case 2: return C2::CALL;         \
    case 3: return C3::CALL;         \
    case 4: return C4::CALL;         \
    case 5: return C5::CALL;         \
    case 6: return C6::CALL;         \
    case 7: return C7::CALL;         \
    case 8: return C8::CALL;         \
    case 9: return C9::CALL;         \
    default: return -1;              \
  }

extern "C" {
int elas_cutlass_sp_configs() { return kConfigs; }
const char* elas_cutlass_sp_config_name(int config) { return config >= 0 && config < kConfigs ? kNames[config] : ""; }
long long elas_cutlass_sp_workspace(int config, int M, int N, int K) {
  ELAS_DISPATCH(config, workspace(M, N, K))
}
long long elas_cutlass_sp_meta_offset(int M, int K, int m, int k) { return C0::meta_offset(M, K, m, k); }
int elas_cutlass_sp_mm(int config, const void* a, const void* e, const void* b, void* d, int M, int N, int K,
                       void* workspace, size_t ws_bytes, void* stream, int iters, float* ms) {
  ELAS_DISPATCH(config, run(a, e, b, d, M, N, K, workspace, ws_bytes, static_cast<cudaStream_t>(stream), iters, ms))
}
}
