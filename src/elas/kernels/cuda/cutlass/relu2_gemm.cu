// A dense GEMM on Hopper through CUTLASS 3.x's sm90 collectives with relu(y1)^2 in its epilogue, as a C-ABI library
// for benchmarks/cutlass_relu2.py (ctypes). The question it answers: does a GEMM with cuBLAS's mainloop rate and
// the ReLU^2 in its epilogue beat cuBLAS + a separate pointwise kernel? (The Triton form, kernels/cuda/relu2_gemm.py,
// lost: its mainloop ran ~1.5x slower than cuBLAS's at K = 512, docs/performance.md.) Built by build.sh with a
// pip-installed nvcc; needs no torch headers.
//
//   mode 0 ("plain"):  D[M, N] = bf16(A[M, K] @ B[K, N])                 (the mainloop alone, against cuBLAS)
//   mode 1 ("relu2"):  D[M, N] = bf16(relu(bf16(A @ B))^2)               (the up-projection's y2; y1 never written)
//   mode 2 ("grad"):   D[M, N] = bf16(2 bf16(sqrt(Y2)) bf16(A @ B))      (the backward's dy1 from dy2 = dh2 wd^T and
//                                                                          the saved y2 [M, N]; dy2 never written),
//                      y2 loaded from global memory by each epilogue thread (Sm90AuxLoad with no stages)
//   mode 3 ("grad_tma"): mode 2 with y2 brought in by the epilogue's TMA producer, pipelined with the tiles'
//                      stores (CUTLASS's LinCombDeEltAct: the dgrad-with-activation fusion); mode 2 measured 0.75x
//                      cuBLAS + the pointwise kernel at the 1B shape, its y2 loads exposed
//
// A row-major [M, K] (K-major), B passed as B^T [N, K] contiguous (K-major: torch's h1 @ wu.T with wu [N, K]),
// D row-major; bf16 in and out, fp32 accumulation. Mode 1 rounds the accumulator to bf16 first, as the model's
// y1 is a bf16 tensor, so D equals the unfused relu(y1)^2 wherever the two GEMMs round y1 alike.
#include <cstdint>
#include <cstdio>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "launch.h"

using namespace cute;

namespace {

using Bf16 = cutlass::bfloat16_t;

// relu(bf16(x))^2 in fp32; the epilogue's output conversion rounds it to bf16 (to nearest even)
template <class T>
struct ReLUSquaredOfBf16 {
  CUTLASS_HOST_DEVICE T operator()(T const& x) const {
    float y = static_cast<float>(Bf16(x));
    y = y > 0.f ? y : 0.f;
    return T(y * y);
  }
};

template <class T, int N>
struct ReLUSquaredOfBf16<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v) const {
    cutlass::Array<T, N> out;
    ReLUSquaredOfBf16<T> f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = f(v[i]);
    return out;
  }
};

// (dy2 accumulator, y2) -> 2 r dy2 with r = bf16(sqrt(y2)) = relu(y1) exactly wherever y2 is a normal bf16 value
// (kernels/cuda/relu2_gemm.py), dy2 rounded to bf16 first as the unfused GEMM writes it
template <class T>
struct ReLUSquaredGrad {
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& y2) const {
    // an approximate square root (MUFU.RSQ) rounds to the same bf16 r: sqrt(bf16(r^2)) lies within a few fp32
    // ulps of r, far from a bf16 rounding boundary; the IEEE sqrtf took 2.4x the epilogue's instructions
    float v = static_cast<float>(y2);
    float r = static_cast<float>(Bf16(v > 0.f ? v * rsqrtf(v) : 0.f));
    return T(2.f * r * static_cast<float>(Bf16(acc)));
  }
};

template <class T, int N>
struct ReLUSquaredGrad<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& acc,
                                                      cutlass::Array<T, N> const& y2) const {
    cutlass::Array<T, N> out;
    ReLUSquaredGrad<T> f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = f(acc[i], y2[i]);
    return out;
  }
};

template <class T>
struct Identity {
  CUTLASS_HOST_DEVICE T operator()(T const& x) const { return x; }
};

template <class T, int N>
struct Identity<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v) const { return v; }
};

namespace fusion = cutlass::epilogue::fusion;

template <template <class> class Act>
using EltAct = fusion::LinCombEltAct<Act, Bf16, float, void, float>;

// mode 2's epilogue tree: ReLUSquaredGrad(accumulator, y2 loaded from global memory by each epilogue thread)
using Y2Load = fusion::Sm90AuxLoad<0, cutlass::epilogue::collective::EpilogueTileAuto, Bf16, cutlass::layout::RowMajor,
                                   void, void, 8>;
using GradTree = fusion::Sm90EVT<fusion::Sm90Compute<ReLUSquaredGrad, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>,
                                 fusion::Sm90AccFetch, Y2Load>;

// mode 3: activation'(alpha acc + beta C, aux) with the aux tensor (y2) loaded through TMA into shared memory
using GradTma = fusion::LinCombDeEltAct<cutlass::layout::RowMajor, ReLUSquaredGrad, Bf16, float, Bf16>;

// epilogue arguments of each fusion: (alpha, beta) for LinCombEltAct, the y2 tensor for the gradient tree
template <class Fusion>
struct FusionArgs {
  template <class Args>
  static Args make(const void*, int, int) { return Args{1.0f, 0.0f}; }
};
template <>
struct FusionArgs<GradTma> {
  template <class Args>
  static Args make(const void* aux, int M, int N) {
    Args args{};
    args.alpha = 1.0f;
    args.beta = 0.0f;
    args.aux_ptr = static_cast<const Bf16*>(aux);
    args.dAux = cutlass::make_cute_packed_stride(typename Args::StrideAux{}, {M, N, 1});
    return args;
  }
};
template <>
struct FusionArgs<GradTree> {
  template <class Args>
  static Args make(const void* aux, int M, int N) {
    using Stride = typename Y2Load::StrideMNL;
    return Args{{}, {static_cast<const Bf16*>(aux), Bf16(0), cutlass::make_cute_packed_stride(Stride{}, {M, N, 1})},
                {}};
  }
};

template <class Fusion, class TileMNK, class ClusterMNK, class MainSchedule, class EpiSchedule>
struct DenseGemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileMNK, ClusterMNK,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8,  // no C
      Bf16, cutlass::layout::RowMajor, 8, EpiSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Bf16, cutlass::layout::RowMajor, 8,       // A: K-major
      Bf16, cutlass::layout::ColumnMajor, 8,    // B: K-major (B^T [N, K] row-major)
      float, TileMNK, ClusterMNK,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments args(const void* a, const void* b, const void* aux, void* d, int M, int N, int K) {
    using EpiArgs = decltype(typename Gemm::Arguments{}.epilogue.thread);
    typename Gemm::Arguments out{
        cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1},
        {static_cast<const Bf16*>(a), cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {M, K, 1}),
         static_cast<const Bf16*>(b), cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {N, K, 1})},
        {FusionArgs<Fusion>::template make<EpiArgs>(aux, M, N), nullptr,
         cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, {M, N, 1}),
         static_cast<Bf16*>(d), cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {M, N, 1})}};
    out.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
    return out;
  }

  // one launch, or iters timed (launch.h)
  static int run(const void* a, const void* b, const void* aux, void* d, int M, int N, int K, void* workspace,
                 size_t ws_bytes, cudaStream_t stream, int iters, float* ms) {
    return elas_cutlass::run<Gemm>(args(a, b, aux, d, M, N, K), workspace, ws_bytes, stream, iters, ms);
  }

  static size_t workspace(int M, int N, int K) {
    return Gemm::get_workspace_size(args(nullptr, nullptr, nullptr, nullptr, M, N, K));
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// the tiles cuBLAS picks at these shapes (nvjet 256x128, 128x256, 64x128 in the 1B step's profile) and their
// neighbours; K = 64 per stage (bf16: 128 bytes, one TMA swizzle width)
#define ELAS_CONFIGS(F)                                                          \
  DenseGemm<F, Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_256, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_256, _128, _64>, Shape<_1, _2, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_64, _256, _64>, Shape<_1, _1, _1>, Ping, PingEpi>
const char* kNames[] = {"128x256x64 coop 1x1", "128x256x64 coop 2x1", "256x128x64 coop 1x1",
                        "256x128x64 coop 1x2", "128x128x64 coop 1x1", "64x256x64 pingpong 1x1"};
constexpr int kConfigs = 6;

template <class... Configs>
struct Table {
  template <int I, class First, class... Rest>
  static int run_at(int config, const void* a, const void* b, const void* aux, void* d, int M, int N, int K,
                    void* ws, size_t ws_bytes, cudaStream_t stream, int iters, float* ms) {
    if (config == I) return First::run(a, b, aux, d, M, N, K, ws, ws_bytes, stream, iters, ms);
    if constexpr (sizeof...(Rest) > 0) {
      return run_at<I + 1, Rest...>(config, a, b, aux, d, M, N, K, ws, ws_bytes, stream, iters, ms);
    }
    return -1;
  }
  template <int I, class First, class... Rest>
  static long long workspace_at(int config, int M, int N, int K) {
    if (config == I) return static_cast<long long>(First::workspace(M, N, K));
    if constexpr (sizeof...(Rest) > 0) return workspace_at<I + 1, Rest...>(config, M, N, K);
    return -1;
  }
  static int run(int config, const void* a, const void* b, const void* aux, void* d, int M, int N, int K, void* ws,
                 size_t ws_bytes, cudaStream_t stream, int iters, float* ms) {
    return run_at<0, Configs...>(config, a, b, aux, d, M, N, K, ws, ws_bytes, stream, iters, ms);
  }
  static long long workspace(int config, int M, int N, int K) { return workspace_at<0, Configs...>(config, M, N, K); }
};

using Plain = Table<ELAS_CONFIGS(EltAct<Identity>)>;
using Relu2 = Table<ELAS_CONFIGS(EltAct<ReLUSquaredOfBf16>)>;
using Grad = Table<ELAS_CONFIGS(GradTree)>;
using GradTmaTable = Table<ELAS_CONFIGS(GradTma)>;

}  // namespace

extern "C" {
int elas_cutlass_dense_configs() { return kConfigs; }
const char* elas_cutlass_dense_config_name(int config) {
  return config >= 0 && config < kConfigs ? kNames[config] : "";
}
long long elas_cutlass_dense_workspace(int config, int mode, int M, int N, int K) {
  if (config < 0 || config >= kConfigs) return -1;
  switch (mode) {
    case 0: return Plain::workspace(config, M, N, K);
    case 1: return Relu2::workspace(config, M, N, K);
    case 2: return Grad::workspace(config, M, N, K);
    case 3: return GradTmaTable::workspace(config, M, N, K);
    default: return -1;
  }
}
// aux: y2 [M, N] bf16 row-major for modes 2 and 3 (unused otherwise). Returns 0 on success; 2 cannot implement,
// 3 workspace too small, 4 initialize, 5 run, 6 CUDA error, -1 bad config or mode
int elas_cutlass_dense_mm(int config, int mode, const void* a, const void* b, const void* aux, void* d, int M, int N,
                          int K, void* workspace, size_t ws_bytes, void* stream, int iters, float* ms) {
  if (config < 0 || config >= kConfigs) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  switch (mode) {
    case 0: return Plain::run(config, a, b, aux, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 1: return Relu2::run(config, a, b, aux, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 2: return Grad::run(config, a, b, aux, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 3: return GradTmaTable::run(config, a, b, aux, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    default: return -1;
  }
}
}
