// Dense GEMMs on Hopper through CUTLASS 3.x's sm90 collectives with the model's pointwise work in their epilogues
// (ReLU^2 and its backward, ELAS's 2:4 work, the rotary embedding), as a C-ABI library for
// kernels/cuda/cutlass_relu2.py and benchmarks/cutlass_relu2.py (ctypes). The question it answers: does a GEMM
// with cuBLAS's mainloop rate and the pointwise work in its epilogue beat cuBLAS + a separate pointwise kernel?
// (The Triton form, kernels/cuda/relu2_gemm.py, lost: its mainloop ran ~1.5x slower than cuBLAS's at K = 512,
// docs/performance.md.) Built by build.sh with a pip-installed nvcc; needs no torch headers. The register-layout
// facts the 2:4 and rotary epilogues rely on are checked on any machine by layout_check.cu (build.sh check).
//
//   mode 0 ("plain"):  D[M, N] = bf16(A[M, K] @ B[K, N])                 (the mainloop alone, against cuBLAS)
//   mode 1 ("relu2"):  D[M, N] = bf16(relu(bf16(A @ B))^2)               (the up-projection's y2; y1 never written)
//   mode 2 ("grad"):   D[M, N] = bf16(2 bf16(sqrt(Y2)) bf16(A @ B))      (the backward's dy1 from dy2 = dh2 wd^T and
//                                                                          the saved y2 [M, N]; dy2 never written),
//                      y2 loaded from global memory by each epilogue thread (Sm90AuxLoad with no stages)
//   mode 3 ("grad_tma"): mode 2 with y2 brought in by the epilogue's TMA producer, pipelined with the tiles'
//                      stores (CUTLASS's LinCombDeEltAct: the dgrad-with-activation fusion); mode 2 measured 0.75x
//                      cuBLAS + the pointwise kernel at the 1B shape, its y2 loads exposed
//   mode 4 ("ste_grad"): D[M, N] = dy1 = Y1 > 0 ? bf16(2 Y1 bf16(A @ B)) : 0, Y1 [M, N] through TMA (mode 3's
//                      pipeline): the 2:4 FFN's straight-through backward (ELAS) with y1 saved by the forward
//   mode 5 ("ste_grad_y2s"): mode 4, and a second output Y2S[M, N] = relu(Y1)^2 with 2 of every 4 columns kept
//                      (largest first, the earlier column on ties: the forward's selection), stored through the
//                      epilogue's TMA pipeline: what the 2:4 backward kernel (kernels/cuda/sparsify.py, ste mode
//                      without the split) writes, with dy2 never written and y1 read once
//   mode 6 ("relu2_pack24"): D[M, N] = y1 = bf16(A @ B), and relu(y1)^2 with 2 of every 4 columns kept, packed in
//                      the SM90 cuSPARSELt layout (docs/sm90_layout.md: values [M, N/2] bf16, then metadata
//                      [M*N/8] bytes, in one buffer) from the epilogue's registers: the 2:4 FFN's forward in ste
//                      mode (ELAS) without the separate sparsifier's read of y1
//   mode 7 ("relu2s_pack24"): mode 6 with D[M, N] = y2s = relu(y1)^2 at the kept columns, zero elsewhere: the 2:4
//                      FFN's forward in mask mode (Haziza's gradient), whose backward reads y2s (not y1)
//   mode 8 ("grad_pack24"): D[M, N] = dy1 = mode 3's 2 bf16(sqrt(Y2S)) bf16(A @ B) with Y2S the forward's y2s
//                      through TMA, and dy1 packed 2:4 with y2s's choice (the forward's) in the SM90 layout: the
//                      mask-mode backward's dy1 for both the dense weight gradient and the 2:4 input gradient
//   rope (its own entry point, elas_cutlass_rope_mm): D[L, M, N] = the batched product A[L, M, K] B[L, N, K]^T with
//                      rotary embeddings applied in the epilogue to the columns l*N + n < rot_cols (the q and k
//                      projections): each adjacent column pair (2i, 2i+1) of a head is rotated by the angle of
//                      position m % seq and frequency i, the attention's q and k columns having been interleaved
//                      per head by the caller (model/llama.py: q.k is unchanged by a permutation shared by both)
//
// A row-major [M, K] (K-major), B passed as B^T [N, K] contiguous (K-major: torch's h1 @ wu.T with wu [N, K]),
// D row-major; bf16 in and out, fp32 accumulation. Mode 1 rounds the accumulator to bf16 first, as the model's
// y1 is a bf16 tensor, so D equals the unfused relu(y1)^2 wherever the two GEMMs round y1 alike.
#include <cstdint>
#include <cstring>
#include <cstdio>

#include <cuda_bf16.h>

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
namespace fusion = cutlass::epilogue::fusion;

// An epilogue functor on fragments: Sm90Compute calls Fn on Array<ElementCompute, FragmentSize>; the functors
// below are written per element and take this form there
template <template <class> class Fn, class T, int N>
struct Elementwise {
  template <class... Rest>
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& a, Rest const&... rest) const {
    cutlass::Array<T, N> out;
    Fn<T> f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = f(a[i], rest[i]...);
    return out;
  }
};

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
struct ReLUSquaredOfBf16<cutlass::Array<T, N>> : Elementwise<ReLUSquaredOfBf16, T, N> {};

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
struct ReLUSquaredGrad<cutlass::Array<T, N>> : Elementwise<ReLUSquaredGrad, T, N> {};

// (dy2 accumulator, y1) -> the straight-through gradient: +0 where y1 <= 0, else bf16(2 y1 bf16(dy2)); y1 and dy2
// are bf16 values, so 2 y1 dy2 is exact in fp32 and the output conversion rounds once, as the Triton kernel does
template <class T>
struct SteGrad {
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& y1) const {
    float y = static_cast<float>(y1);
    return y > 0.f ? T(2.f * y * static_cast<float>(Bf16(acc))) : T(0.f);
  }
};

template <class T, int N>
struct SteGrad<cutlass::Array<T, N>> : Elementwise<SteGrad, T, N> {};

// mode 5's root: SteGrad of (acc, y1); its third input (the stored y2s) only ties the store into the graph
template <class T>
struct SteGradAfterStore {
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& y1, T const&) const { return SteGrad<T>{}(acc, y1); }
};

template <class T, int N>
struct SteGradAfterStore<cutlass::Array<T, N>> : Elementwise<SteGradAfterStore, T, N> {};

#if defined(__CUDA_ARCH__)
// The 2:4 choice of one group by keys: a key is a square's fp32 bits (a non-negative float, so keys order as the
// values) with 3 - column in its low 2 bits, which are zero in the square of a bf16 value (at most 16 significant
// bits; tests/test_relu2_gemm.py checks every bf16 value). The two largest of the group's four keys are then the
// rule's choice (the larger square; of equal ones the earlier column), by six integer min/max where comparing the
// squares took ~30 instructions. (A subnormal square's low bits need not be zero: they are cleared for its key, so
// keys stay distinct, which the 2:4 metadata needs; two such squares within 3 ulps of each other may then be chosen
// otherwise than the rule does, and where a kept value is taken from its key (modes 6, 7) its bf16 rounding can
// differ in the last place.)
// s0, s1: this lane's squares (+0 for a non-positive y1), its group's columns c, c + 1, c = 0 on the even lane of
// the pair and 2 on the odd one. Returns this lane's keys (k0, k1) and the kept keys t1 > t2 (the same in both
// lanes). Every lane of the warp calls it together (one shuffle each way).
CUTLASS_DEVICE void keep24_keys(float s0, float s1, bool even, uint32_t& k0, uint32_t& k1, uint32_t& t1,
                                uint32_t& t2) {
  uint32_t const c = even ? 0u : 2u;
  k0 = (__float_as_uint(s0) & ~3u) | (3u - c);
  k1 = (__float_as_uint(s1) & ~3u) | (2u - c);
  uint32_t const p0 = __shfl_xor_sync(0xffffffffu, k0, 1), p1 = __shfl_xor_sync(0xffffffffu, k1, 1);
  uint32_t const m1 = max(k0, k1), n1 = min(k0, k1), m2 = max(p0, p1), n2 = min(p0, p1);
  t1 = max(m1, m2);
  t2 = max(min(m1, m2), max(n1, n2));
}

// The same choice for a whole group in one lane (modes 6-8, whose lanes split the groups between them). The
// group's four keys k[c] carry 3 - c in their low 2 bits (distinct, so the kept ones are exactly those >= t2);
// e and l are the two kept keys, e the one of the earlier column (3 - its low bits). (No array is indexed by a
// column known only at run time: that would put it in local memory.)
CUTLASS_DEVICE void top2_keys(uint32_t const (&k)[4], uint32_t& t2, uint32_t& e, uint32_t& l) {
  uint32_t const m1 = max(k[0], k[1]), n1 = min(k[0], k[1]), m2 = max(k[2], k[3]), n2 = min(k[2], k[3]);
  uint32_t const t1 = max(m1, m2);
  t2 = max(min(m1, m2), max(n1, n2));
  bool const t1_first = (t1 & 3u) > (t2 & 3u);
  e = t1_first ? t1 : t2;
  l = t1_first ? t2 : t1;
}

// The keys of relu(y1)^2 for a group whose y1 values lo, hi hold as bf16x2 bits (columns 0, 1 and 2, 3; the earlier
// column in the low half), the squares exact in fp32, as keep24_keys makes them: fmaxf(y, 0) is +-0 for a non-positive
// y1 and 0 for NaN (fmaxf returns the number), and its square +0, as `y > 0 ? y * y : 0` gives.
CUTLASS_DEVICE void relu2_keys(uint32_t lo, uint32_t hi, uint32_t (&k)[4]) {
  uint32_t const h[4] = {lo << 16, lo & 0xffff0000u, hi << 16, hi & 0xffff0000u};  // the fp32 bits of each y1
  CUTLASS_PRAGMA_UNROLL
  for (int c = 0; c < 4; ++c) {
    float const y = fmaxf(__uint_as_float(h[c]), 0.f);
    k[c] = (__float_as_uint(y * y) & ~3u) | (3u - c);
  }
}

// bf16x2 bits of (x, y), x in the low half
CUTLASS_DEVICE uint32_t bf16x2_bits(float x, float y) {
  __nv_bfloat162 const v = __floats2bfloat162_rn(x, y);
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}
#endif

// y1 -> y2s = relu(y1)^2 with 2 of every 4 columns kept, chosen on the exact fp32 squares by the rule of the
// Triton kernels' _keep24: i is kept when fewer than 2 others beat it, j beating i if its square is larger, or
// equal and j earlier (keep24_keys).
//
// Where the 4 columns of a group live: the epilogue hands each thread its fragment of the accumulator tile in the
// Hopper MMA's register layout (also stmatrix's source layout): elements 2i and 2i+1 are one row's columns c and
// c+1 with c = 2 (lane % 4) modulo 8, and lane ^ 1 holds columns c ^ 2, c ^ 2 + 1 of the same row at the same
// index. So a group is an even lane's pair (its first two columns) and the odd lane's next to it; one shuffle
// gives each thread the other half. Every thread of the warp calls this together (the epilogue's visit has no
// per-thread predicate: TMA clips the stores), as the shuffle requires.
template <class T>
struct Relu2Keep24 {
  CUTLASS_HOST_DEVICE T operator()(T const& y1) const { return y1; }  // (unused: the selection needs a group)
};

template <class T, int N>
struct Relu2Keep24<cutlass::Array<T, N>> {
  static_assert(N % 2 == 0, "the fragment holds column pairs");
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& y1) const {
    cutlass::Array<T, N> out;
#if defined(__CUDA_ARCH__)
    bool const even = (threadIdx.x & 1) == 0;  // holds columns 0, 1 of its group
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; i += 2) {
      float a = static_cast<float>(y1[i]), b = static_cast<float>(y1[i + 1]);
      a = a > 0.f ? a * a : 0.f;  // exact: y1 is a bf16 value (and +0, never -0, for the keys)
      b = b > 0.f ? b * b : 0.f;
      uint32_t k0, k1, t1, t2;
      keep24_keys(a, b, even, k0, k1, t1, t2);
      out[i] = T((k0 == t1 || k0 == t2) ? a : 0.f);
      out[i + 1] = T((k1 == t1 || k1 == t2) ? b : 0.f);
    }
#endif
    return out;
  }
};

// What a visitor node needs that uses no shared memory, no producer loads and no workspace, and reads each register
// element's (m, n, l) coordinate (modelled on CUTLASS's Sm90AuxStore without shared memory): the CUTLASS interface,
// with the node's work in Derived::apply(params, coords, shape MNL, epi_v, fragment) -> fragment, where coords
// (CPY, CPY_M, CPY_N) gives the subtile's coordinate of each element of the thread's fragment (index
// epi_v * FragmentSize + i), and Derived::check(shape MNKL, args) says whether a problem can run.
template <class Derived, class Args>
struct CoordNode {
  struct SharedStorage {};
  using Arguments = Args;
  using Params = Args;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) { return args; }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& shape, Arguments const& args) { return Derived::check(shape, args); }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE CoordNode() {}
  CUTLASS_HOST_DEVICE CoordNode(Params const& params, SharedStorage const&) : params_ptr(&params) {}
  Params const* params_ptr = nullptr;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }
  template <class... A>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::ProducerLoadArgs<A...> const&) {
    return fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CTensor, class ProblemShapeMNL>
  struct ConsumerStoreCallbacks : fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor&& tC_c, ProblemShapeMNL shape, Params const* params_ptr)
        : tC_c(cute::forward<CTensor>(tC_c)), shape(shape), params_ptr(params_ptr) {}
    CTensor tC_c;  // (CPY, CPY_M, CPY_N, EPI_M, EPI_N): the (m, n, l) coordinate of each register element
    ProblemShapeMNL shape;
    Params const* params_ptr;

    template <typename ElementAccumulator, int FragmentSize, class... Inputs>
    CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m,
                              int epi_n, Inputs const&... frg_inputs) {
      return Derived::apply(*params_ptr, tC_c(_, _, _, epi_m, epi_n), shape, epi_v, frg_inputs...);
    }
  };

  template <bool ReferenceSrc, class... A>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::ConsumerStoreArgs<A...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto shape = make_shape(M, N, L);
    Tensor coords = make_identity_tensor(shape);
    Tensor tC_c = fusion::sm90_partition_for_epilogue<ReferenceSrc>(coords, args.tile_shape_mnk, args.tile_coord_mnkl,
                                                                    args.epi_tile, args.tiled_copy, args.thread_idx);
    return ConsumerStoreCallbacks<decltype(tC_c), decltype(shape)>(cute::move(tC_c), shape, params_ptr);
  }
};

// The packed 2:4 store of modes 6-8: a visitor node (modelled on CUTLASS's Sm90AuxStore without shared memory)
// that chooses 2 of every 4 columns of its input tile and writes the kept values straight from registers to
// global memory, in the SM90 layout: values row-major [M, N/2], and one metadata byte per group and 16-row slab,
// holding rows r (low nibble) and r + 8 (high).
// - Y1 (mode 6, the forward in ste mode): input y1 (bf16 values); writes 2:4(relu(y1)^2), passes y1 on (D = y1).
// - Y2s (mode 7, the forward in mask mode): the same choice; passes on y2s = relu(y1)^2 with the other two columns
//   of each group zeroed (D = y2s, what the backward reads), instead of y1.
// - Grad (mode 8, the backward in mask mode): inputs dy1 and the forward's y2s; keeps the columns y2s kept (its
//   top two by the bf16 bits, ties to the earlier column: y2s is zero outside the kept ones, so this is the
//   forward's choice wherever a kept square is not zero in bf16) and writes the packed dy1; passes dy1 on.
// The lanes split the groups: of a column pair of lanes (lane, lane ^ 1: a group's columns 0, 1 and 2, 3), the
// even lane chooses the groups of row r0 and the odd lane those of row r0 + 8 (pairs p = 2j + h, h the row half),
// each sending the other its half of the other's group: one shuffle and one choice per group, where both lanes
// choosing every group of their pairs took twice the instructions (cutlass_ncu.json: mode 6 issued ~340
// instructions per warp and subtile over the plain GEMM's, instruction-bound).
// The stores are whole sectors: per epilogue subtile a warp holds 16 rows x 32 columns (layout_check.cu, fact 4:
// element 4j + 2h + e of a thread is row r + 8h, column c0 + 8j + e, c0 = 2 (lane % 4) + a multiple of 32). A
// row's 32 columns pack into 32 bytes of values, which its quad gathers with two shuffles so that each lane
// stores 16 contiguous bytes; and the slab's 8 groups x 16 rows are one 64-byte run of metadata, which the quad's
// first lane stores 8 bytes of. (Its first form stored each group's 4 bytes and each metadata byte alone, and
// both lanes chose every group: 0.68x cuBLAS + the sparsifier on the H200; the integer keys made it 1.02x.)
// tests/test_relu2_gemm.py replays the lane exchanges in torch against the reference packer.
// Needs M, N multiples of 64 (the layout's tile) and the epilogue's 16-element fragments (every sm90 tile here).
struct Pack24Args {
  Bf16* values = nullptr;   // [M, N/2]
  uint8_t* meta = nullptr;  // [M * N / 8], the layout's tiled order
};

enum class Pack24Kind { Y1, Y2s, Grad };

template <Pack24Kind Kind>
struct Pack24Node : CoordNode<Pack24Node<Kind>, Pack24Args> {
  using CoordNode<Pack24Node<Kind>, Pack24Args>::CoordNode;

  template <class ProblemShape>
  static bool check(ProblemShape const& shape, Pack24Args const& args) {
    auto [M, N, K, L] = shape;
    return args.values != nullptr && args.meta != nullptr && M % 64 == 0 && N % 64 == 0 && L == 1;
  }

#if defined(__CUDA_ARCH__)
  // where a lane's fragment lies (site below): the problem's M, N, the lane, its first row and column
  struct Site {
    int M, N, lane, r0, col0;
  };

  // the fragment's column pairs as bf16x2 bits: w[p] = pair p (the earlier column low)
  template <class Frag>
  CUTLASS_DEVICE static void words(Frag const& frg, uint32_t (&w)[8]) {
    CUTLASS_PRAGMA_UNROLL
    for (int p = 0; p < 8; ++p)
      w[p] = static_cast<uint32_t>(Bf16(frg[2 * p]).raw()) | (static_cast<uint32_t>(Bf16(frg[2 * p + 1]).raw()) << 16);
  }

  // the stores of a lane's kept pairs (bf16x2 bits) and nibbles of its groups j = 0..3 (group 2j + (lane % 4) / 2
  // of the row r0 + 8 (lane & 1) in the block of 32 columns from col0 & ~31)
  CUTLASS_DEVICE static void store(Pack24Args const& params, uint32_t const (&kept)[4], uint32_t const (&nib)[4],
                                   Site const& at) {
    int const M = at.M, N = at.N, lane = at.lane, r0 = at.r0, col0 = at.col0;
    // values: in a quad, lane q holds row r0 + 8 (q & 1), groups 2j + (q >> 1). Lane q writes that row's groups
    // 4 (q >> 1) .. 4 (q >> 1) + 3 (16 bytes): its own two there and two from lane q ^ 2 (the same row's other
    // groups): the low lanes (q >> 1 = 0) send their groups 4, 6 (j = 2, 3), the high ones their groups 1, 3
    // (j = 0, 1). (Every index a constant, the lane's half chosen by selects: an index known only at run time
    // puts an array in local memory.)
    int const q = lane & 3;
    bool const low = (q >> 1) == 0;
    uint32_t const got0 = __shfl_xor_sync(0xffffffffu, low ? kept[2] : kept[0], 2);
    uint32_t const got1 = __shfl_xor_sync(0xffffffffu, low ? kept[3] : kept[1], 2);
    int const row = r0 + 8 * (q & 1);
    if (row < M && col0 < N) {
      uint4 const chunk = low ? make_uint4(kept[0], got0, kept[1], got1) : make_uint4(got0, kept[2], got1, kept[3]);
      int const cb = col0 & ~31;  // the block's first column
      *reinterpret_cast<uint4*>(params.values + static_cast<size_t>(row) * (N / 2) + cb / 2 + 8 * (q >> 1)) = chunk;
    }
    // metadata: byte (r % 8) * 8 + 2 (g % 4) + g / 4 of the slab's 64 holds group g's nibbles of rows r (low) and
    // r + 8 (high). Byte j of a lane's word is its group 2j + (q >> 1); the even lanes add the odd lane's row
    // r0 + 8 as high nibbles, and lane 0 of the quad takes lane 2's word (the odd groups)
    uint32_t const mine = nib[0] | (nib[1] << 8) | (nib[2] << 16) | (nib[3] << 24);
    uint32_t const both = mine | (__shfl_xor_sync(0xffffffffu, mine, 1) << 4);
    uint32_t const odd = __shfl_xor_sync(0xffffffffu, both, 2);
    if (q == 0 && r0 < M && col0 < N) {
      // in the slab's order a row's bytes are groups 0, 4, 1, 5, 2, 6, 3, 7: bytes 0, 2 of both, 0, 2 of odd, then
      // 1, 3 of both, 1, 3 of odd (a byte permute each)
      uint32_t const lo = __byte_perm(both, odd, 0x6420), hi = __byte_perm(both, odd, 0x7531);
      int const g = (col0 & ~31) >> 2;  // the block's first group (a multiple of 8)
      size_t const offset = static_cast<size_t>(r0 >> 6) * (N / 32) * 256 + (g >> 3) * 256 + ((r0 & 63) >> 4) * 64 +
                            (r0 & 7) * 8;
      *reinterpret_cast<uint2*>(params.meta + offset) = make_uint2(lo, hi);
    }
  }

  // where this lane's fragment lies, after checking the layout the node relies on (fact 4 and lane ^ 1 holding the group's other half): a trap, not a bad
  // buffer
  template <int FragmentSize, class Coords, class Shape>
  CUTLASS_DEVICE static Site site(Coords const& coord, Shape const& shape, int epi_v) {
    static_assert(FragmentSize == 16, "a warp's subtile of 16 rows x 32 columns (layout_check.cu, fact 4)");
    int const lane = threadIdx.x & 31;
    auto const c0 = coord(epi_v * FragmentSize);
    int const r0 = static_cast<int>(get<0>(c0)), col0 = static_cast<int>(get<1>(c0));
    auto const c1 = coord(epi_v * FragmentSize + 2), c2 = coord(epi_v * FragmentSize + 4);
    if ((r0 & 15) >= 8 || (col0 & 31) != 2 * (lane & 3) || get<0>(c1) != r0 + 8 || get<1>(c1) != col0 ||
        get<0>(c2) != r0 || get<1>(c2) != col0 + 8)
      __trap();
    return Site{static_cast<int>(get<0>(shape)), static_cast<int>(get<1>(shape)), lane, r0, col0};
  }
#endif

  // modes 6 and 7: the input y1
  template <class Coords, class Shape, class ElementInput, int FragmentSize>
  CUTLASS_DEVICE static auto apply(Pack24Args const& params, Coords const& coord, Shape const& shape, int epi_v,
                                   cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
    cutlass::Array<ElementInput, FragmentSize> out = frg_input;
#if defined(__CUDA_ARCH__)
    static_assert(Kind != Pack24Kind::Grad, "mode 8 takes dy1 and y2s");
    Site const at = site<FragmentSize>(coord, shape, epi_v);
    uint32_t w[8];
    words(frg_input, w);
    bool const even = (at.lane & 1) == 0;
    uint32_t kept[4], nib[4];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) {
      uint32_t const got = __shfl_xor_sync(0xffffffffu, even ? w[2 * j + 1] : w[2 * j], 1);
      uint32_t k[4], t2, e, l;
      relu2_keys(even ? w[2 * j] : got, even ? got : w[2 * j + 1], k);
      top2_keys(k, t2, e, l);
      nib[j] = (3u - (e & 3u)) | ((3u - (l & 3u)) << 2);
      // the kept squares, the earlier column low: a key with its low bits cleared is the square itself
      kept[j] = bf16x2_bits(__uint_as_float(e & ~3u), __uint_as_float(l & ~3u));
      if constexpr (Kind == Pack24Kind::Y2s) {
        // y2s of all four columns (zero where not kept); the lane keeps its own half and sends the other half
        // back to the lane that holds it (its pair 2j + 1 - h)
        // (from the keys, as the packed values are: the two agree also for a subnormal square)
        auto const value = [&](int c) { return k[c] >= t2 ? __uint_as_float(k[c] & ~3u) : 0.f; };
        uint32_t const half01 = bf16x2_bits(value(0), value(1));
        uint32_t const half23 = bf16x2_bits(value(2), value(3));
        uint32_t const back = __shfl_xor_sync(0xffffffffu, even ? half23 : half01, 1);
        uint32_t const own = even ? half01 : half23;
        uint32_t const pair_h0 = even ? own : back, pair_h1 = even ? back : own;  // pairs 2j (row r0), 2j + 1
        out[4 * j] = Bf16::bitcast(static_cast<uint16_t>(pair_h0 & 0xffffu));
        out[4 * j + 1] = Bf16::bitcast(static_cast<uint16_t>(pair_h0 >> 16));
        out[4 * j + 2] = Bf16::bitcast(static_cast<uint16_t>(pair_h1 & 0xffffu));
        out[4 * j + 3] = Bf16::bitcast(static_cast<uint16_t>(pair_h1 >> 16));
      }
    }
    store(params, kept, nib, at);
#endif
    return out;
  }

  // mode 8: the inputs dy1 and y2s
  template <class Coords, class Shape, class ElementDy1, class ElementY2s, int FragmentSize>
  CUTLASS_DEVICE static auto apply(Pack24Args const& params, Coords const& coord, Shape const& shape, int epi_v,
                                   cutlass::Array<ElementDy1, FragmentSize> const& frg_dy1,
                                   cutlass::Array<ElementY2s, FragmentSize> const& frg_y2s) {
#if defined(__CUDA_ARCH__)
    static_assert(Kind == Pack24Kind::Grad, "modes 6 and 7 take y1");
    Site const at = site<FragmentSize>(coord, shape, epi_v);
    uint32_t d[8], y[8];
    words(frg_dy1, d);
    words(frg_y2s, y);
    bool const even = (at.lane & 1) == 0;
    uint32_t kept[4], nib[4];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) {
      uint32_t const gy = __shfl_xor_sync(0xffffffffu, even ? y[2 * j + 1] : y[2 * j], 1);
      uint32_t const gd = __shfl_xor_sync(0xffffffffu, even ? d[2 * j + 1] : d[2 * j], 1);
      uint32_t const ylo = even ? y[2 * j] : gy, yhi = even ? gy : y[2 * j + 1];
      uint32_t const dlo = even ? d[2 * j] : gd, dhi = even ? gd : d[2 * j + 1];
      // y2s is a non-negative bf16 (zero where not kept): its magnitude bits order as its values (a -0 as +0),
      // with 2 bits left below them for the column
      uint32_t const k[4] = {((ylo & 0x7fffu) << 2) | 3u, ((ylo >> 14) & 0x1fffcu) | 2u, ((yhi & 0x7fffu) << 2) | 1u,
                             (yhi >> 14) & 0x1fffcu};
      uint32_t t2, e, l;
      top2_keys(k, t2, e, l);
      uint32_t const first = 3u - (e & 3u), second = 3u - (l & 3u);
      nib[j] = first | (second << 2);
      // dy1 of the kept columns (bytes 2c, 2c + 1 of dlo:dhi), the earlier one low
      kept[j] = __byte_perm(dlo, dhi, 0x1010u + first * 0x22u + second * 0x2200u);
    }
    store(params, kept, nib, at);
#endif
    return frg_dy1;
  }
};

using Pack24Store = Pack24Node<Pack24Kind::Y1>;

// The rotary embedding of the q and k projections as a visitor node: the input y (bf16 values of D before the
// rotation) comes in column pairs (layout_check.cu, fact 1), so each pair (x0, x1) = columns (2i, 2i+1) of a head
// turns into (x0 cos - x1 sin, x1 cos + x0 sin), cos and sin [seq, head_dim/2] fp32 at (m % seq, i), in fp32, as
// model/llama.py apply_rope computes it (its halves x1, x2 are the pair here). Columns l*N + n >= rot_cols (v) pass.
struct RopeArgs {
  float const* cos = nullptr;  // [seq, head_dim/2]
  float const* sin = nullptr;
  int seq = 1, head_dim = 2, rot_cols = 0;
};

struct RopeNode : CoordNode<RopeNode, RopeArgs> {
  using CoordNode::CoordNode;

  template <class ProblemShape>
  static bool check(ProblemShape const& shape, RopeArgs const& args) {
    auto [M, N, K, L] = shape;  // whole heads per batch: a head's columns n % head_dim lie in one batch
    return args.cos != nullptr && args.sin != nullptr && args.seq > 0 && args.head_dim % 2 == 0 &&
           N % args.head_dim == 0;
  }

  template <class Coords, class Shape, class ElementInput, int FragmentSize>
  CUTLASS_DEVICE static auto apply(RopeArgs const& p, Coords const& coord, Shape const& shape, int epi_v,
                                   cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
    cutlass::Array<float, FragmentSize> out;
#if defined(__CUDA_ARCH__)
    // the thread's 16 elements: rows r0 + 8h, columns col0 + 8j (+1), j < 4 (layout_check.cu, fact 4). Each row's
    // position and each block's pair index are computed once (integer division by run-time values costs ~20
    // instructions); the first form computed both per pair and loaded cos and sin a float at a time, 8 rows x
    // 16 bytes per warp load (0.51x cuBLAS + the rotation at the 1B q shape on the H200)
    static_assert(FragmentSize == 16, "a warp's subtile of 16 rows x 32 columns (layout_check.cu, fact 4)");
    int const N = static_cast<int>(get<1>(shape));
    int const half = p.head_dim / 2;
    auto const c0 = coord(epi_v * FragmentSize);
    int const r0 = static_cast<int>(get<0>(c0)), col0 = static_cast<int>(get<1>(c0));
    int const l = static_cast<int>(get<2>(c0));
    int const lane = threadIdx.x & 31, q = lane & 3;
    {
      auto const c1 = coord(epi_v * FragmentSize + 2), c2 = coord(epi_v * FragmentSize + 4);
      if ((r0 & 15) >= 8 || (col0 & 31) != 2 * q || get<0>(c1) != r0 + 8 || get<1>(c1) != col0 ||
          get<0>(c2) != r0 || get<1>(c2) != col0 + 8)
        __trap();
    }
    int const cb = col0 & ~31;  // the block's first column
    // cos and sin of (row h, block j), at table index pos_h * half + i_j
    float co[2][4] = {}, si[2][4] = {};
    if (p.head_dim % 32 == 0) {
      // a 32-column block lies in one head, so the quad's 16 pair indices are consecutive: lane q loads 4 of them
      // (16 bytes, aligned: half % 4 == 0 and the block starts at pair (cb % head_dim) / 2, a multiple of 16) and
      // a transpose in the quad gives lane q the indices q + 4j
      int const base_i = (cb % p.head_dim) / 2;
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        int const at = ((r0 + 8 * h) % p.seq) * half + base_i + 4 * q;
        float4 const vc = __ldg(reinterpret_cast<float4 const*>(p.cos + at));
        float4 const vs = __ldg(reinterpret_cast<float4 const*>(p.sin + at));
        float const c4[4] = {vc.x, vc.y, vc.z, vc.w}, s4[4] = {vs.x, vs.y, vs.z, vs.w};
        // round t: lane q takes from lane (q + t) % 4 = j its component q (= (j - t) % 4 there), which is index
        // q + 4j; the indices are run-time values, so the arrays are read and written by selects
        CUTLASS_PRAGMA_UNROLL
        for (int t = 0; t < 4; ++t) {
          int const send = (q - t) & 3;  // the component lane (q - t) % 4 asks of this lane
          float sc = c4[0], ss = s4[0];
          CUTLASS_PRAGMA_UNROLL
          for (int k = 1; k < 4; ++k) {
            sc = send == k ? c4[k] : sc;
            ss = send == k ? s4[k] : ss;
          }
          int const src = (lane & ~3) | ((q + t) & 3);
          float const gc = __shfl_sync(0xffffffffu, sc, src), gs = __shfl_sync(0xffffffffu, ss, src);
          int const j = (q + t) & 3;
          CUTLASS_PRAGMA_UNROLL
          for (int k = 0; k < 4; ++k) {  // (a select per entry keeps the arrays in registers)
            co[h][k] = k == j ? gc : co[h][k];
            si[h][k] = k == j ? gs : si[h][k];
          }
        }
      }
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        int const pos = (r0 + 8 * h) % p.seq;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j) {
          int const at = pos * half + ((col0 + 8 * j) % p.head_dim) / 2;
          co[h][j] = __ldg(p.cos + at);
          si[h][j] = __ldg(p.sin + at);
        }
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) {
      bool const rot = l * N + col0 + 8 * j < p.rot_cols;  // q and k: whole heads, so a pair is in or out
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        int const e = 4 * j + 2 * h;
        float const x0 = static_cast<float>(frg_input[e]), x1 = static_cast<float>(frg_input[e + 1]);
        out[e] = rot ? x0 * co[h][j] - x1 * si[h][j] : x0;
        out[e + 1] = rot ? x1 * co[h][j] + x0 * si[h][j] : x1;
      }
    }
#endif
    return out;
  }
};

template <class T>
struct Identity {
  CUTLASS_HOST_DEVICE T operator()(T const& x) const { return x; }
};

template <class T, int N>
struct Identity<cutlass::Array<T, N>> : Elementwise<Identity, T, N> {};

template <template <class> class Act>
using EltAct = fusion::LinCombEltAct<Act, Bf16, float, void, float>;

// mode 2's epilogue tree: ReLUSquaredGrad(accumulator, y2 loaded from global memory by each epilogue thread)
using Y2Load = fusion::Sm90AuxLoad<0, cutlass::epilogue::collective::EpilogueTileAuto, Bf16, cutlass::layout::RowMajor,
                                   void, void, 8>;
using GradTree = fusion::Sm90EVT<fusion::Sm90Compute<ReLUSquaredGrad, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>,
                                 fusion::Sm90AccFetch, Y2Load>;

// mode 3: activation'(alpha acc + beta C, aux) with the aux tensor (y2) loaded through TMA into shared memory
using GradTma = fusion::LinCombDeEltAct<cutlass::layout::RowMajor, ReLUSquaredGrad, Bf16, float, Bf16>;

// mode 4: the same fusion with the straight-through gradient, the aux tensor being y1
using SteGradTma = fusion::LinCombDeEltAct<cutlass::layout::RowMajor, SteGrad, Bf16, float, Bf16>;

// An [M, N] bf16 row-major tensor through the epilogue's TMA pipeline, loaded (Load) or stored (Store), for a
// tile and schedule: its shared-memory stages and layouts are the epilogue's own, resolved by CUTLASS's
// descriptors as its builder resolves them (the graphs of modes 5 and 8)
template <class TileMNK, class EpiSchedule>
struct AuxTma {
  using Desc = cutlass::epilogue::collective::detail::EpilogueDescriptor<
      TileMNK, cutlass::epilogue::collective::EpilogueTileAuto, void, Bf16, EpiSchedule>;
  using LoadDesc = cutlass::epilogue::collective::detail::AuxLoadDescriptor<Desc, cutlass::layout::RowMajor, Bf16>;
  using StoreDesc = cutlass::epilogue::collective::detail::AuxStoreDescriptor<Desc, cutlass::layout::RowMajor, Bf16>;
  using Load = fusion::Sm90AuxLoad<LoadDesc::Stages, typename Desc::EpilogueTile, Bf16, typename LoadDesc::Stride,
                                   typename LoadDesc::SmemLayoutAtom, typename LoadDesc::CopyOpS2R>;
  using Store = fusion::Sm90AuxStore<StoreDesc::Stages, typename Desc::EpilogueTile, Bf16,
                                     cutlass::FloatRoundStyle::round_to_nearest, typename StoreDesc::Stride,
                                     typename StoreDesc::SmemLayoutAtom, typename StoreDesc::CopyOpR2S>;
};

// mode 5's graph, which depends on the tile and schedule (AuxTma): node 0 the accumulator, 1 y1 through TMA,
// 2 y2s = Relu2Keep24(y1), 3 the store of y2s through TMA, 4 (root, written as D) SteGrad(acc, y1)
struct SteY2sTag {};

template <class TileMNK, class EpiSchedule>
struct SteY2sGraph {
  using Aux = AuxTma<TileMNK, EpiSchedule>;
  using Y2s = fusion::Sm90Compute<Relu2Keep24, float, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using Dy1 = fusion::Sm90Compute<SteGradAfterStore, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using type = fusion::Sm90TopologicalVisitor<
      float, cute::tuple<cute::seq<>, cute::seq<>, cute::seq<1>, cute::seq<2>, cute::seq<0, 1, 3>>,
      fusion::Sm90AccFetch, typename Aux::Load, Y2s, typename Aux::Store, Dy1>;
};

// mode 6's tree: D = y1, passed through the packed store; y1 = bf16(acc) rounded before it (what D holds)
using Y1Bf16 = fusion::Sm90EVT<fusion::Sm90Compute<Identity, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>,
                               fusion::Sm90AccFetch>;
using Pack24Tree = fusion::Sm90EVT<fusion::Sm90Compute<Identity, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>,
                                   fusion::Sm90EVT<Pack24Store, Y1Bf16>>;
// mode 7's: D = y2s (the kept squares, zero elsewhere), from the packed store's output
using Pack24MaskedTree =
    fusion::Sm90EVT<fusion::Sm90Compute<Identity, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>,
                    fusion::Sm90EVT<Pack24Node<Pack24Kind::Y2s>, Y1Bf16>>;

// mode 8's graph, which depends on the tile and schedule (AuxTma): node 0 the accumulator (dy2), 1 y2s
// through TMA, 2 dy1 = ReLUSquaredGrad(acc, y2s) (mode 3's formula), 3 (root, written as D) the packed store of
// dy1 with y2s's choice, passing dy1 on
struct Grad24Tag {};

template <class TileMNK, class EpiSchedule>
struct Grad24Graph {
  using Dy1 = fusion::Sm90Compute<ReLUSquaredGrad, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using type = fusion::Sm90TopologicalVisitor<
      float, cute::tuple<cute::seq<>, cute::seq<>, cute::seq<0, 1>, cute::seq<2, 1>>,
      fusion::Sm90AccFetch, typename AuxTma<TileMNK, EpiSchedule>::Load, Dy1, Pack24Node<Pack24Kind::Grad>>;
};

// the rope GEMM's tree: D = bf16(rope(bf16(acc))): y rounded to bf16 first, as the unfused GEMM writes q and k
using RopeTree = fusion::Sm90EVT<fusion::Sm90Compute<Identity, Bf16, float, cutlass::FloatRoundStyle::round_to_nearest>,
                                 fusion::Sm90EVT<RopeNode, Y1Bf16>>;

// the epilogue's fusion type of a configuration: the fusion itself, or mode 5's or 8's graph for its tile
template <class Fusion, class TileMNK, class EpiSchedule>
struct FusionFor {
  using type = Fusion;
};
template <class TileMNK, class EpiSchedule>
struct FusionFor<SteY2sTag, TileMNK, EpiSchedule> {
  using type = typename SteY2sGraph<TileMNK, EpiSchedule>::type;
};
template <class TileMNK, class EpiSchedule>
struct FusionFor<Grad24Tag, TileMNK, EpiSchedule> {
  using type = typename Grad24Graph<TileMNK, EpiSchedule>::type;
};

// epilogue arguments of each fusion: (alpha, beta) for LinCombEltAct, the aux tensors for the others (aux: the
// input y2 or y1 [M, N]; aux_out: mode 5's y2s [M, N])
template <class Fusion>
struct FusionArgs {
  template <class Args>
  static Args make(const void*, void*, int, int) { return Args{1.0f, 0.0f}; }
};
template <class Fusion>
struct DeEltActArgs {
  template <class Args>
  static Args make(const void* aux, void*, int M, int N) {
    Args args{};
    args.alpha = 1.0f;
    args.beta = 0.0f;
    args.aux_ptr = static_cast<const Bf16*>(aux);
    args.dAux = cutlass::make_cute_packed_stride(typename Args::StrideAux{}, {M, N, 1});
    return args;
  }
};
template <>
struct FusionArgs<GradTma> : DeEltActArgs<GradTma> {};
template <>
struct FusionArgs<SteGradTma> : DeEltActArgs<SteGradTma> {};
template <>
struct FusionArgs<GradTree> {
  template <class Args>
  static Args make(const void* aux, void*, int M, int N) {
    using Stride = typename Y2Load::StrideMNL;
    return Args{{}, {static_cast<const Bf16*>(aux), Bf16(0), cutlass::make_cute_packed_stride(Stride{}, {M, N, 1})},
                {}};
  }
};
// the stride of an [M, N] row-major aux tensor read or written through TMA (modes 5 and 8)
inline auto row_major(int M, int N) {
  return cutlass::make_cute_packed_stride(cutlass::detail::TagToStrideC_t<cutlass::layout::RowMajor>{}, {M, N, 1});
}

// aux_out of modes 6-8: the packed buffer [M, N*9/16] bf16, values then metadata (byte M*N on)
inline Pack24Args pack24_args(void* aux_out, int M, int N) {
  auto* meta = aux_out == nullptr ? nullptr : static_cast<uint8_t*>(aux_out) + static_cast<size_t>(M) * N;
  return Pack24Args{static_cast<Bf16*>(aux_out), meta};
}
template <>
struct FusionArgs<Pack24Tree> {
  template <class Args>
  static Args make(const void*, void* aux_out, int M, int N) { return Args{{{{}, {}}, pack24_args(aux_out, M, N)}, {}}; }
};
template <>
struct FusionArgs<Pack24MaskedTree> : FusionArgs<Pack24Tree> {};
template <>
struct FusionArgs<Grad24Tag> {
  template <class Args>
  static Args make(const void* aux, void* aux_out, int M, int N) {
    // one argument per node, in the graph's order: acc, y2s, dy1, the packed store (the root)
    return Args{{}, {static_cast<const Bf16*>(aux), Bf16(0), row_major(M, N)}, {}, pack24_args(aux_out, M, N)};
  }
};
template <>
struct FusionArgs<SteY2sTag> {
  template <class Args>
  static Args make(const void* aux, void* aux_out, int M, int N) {
    auto const stride = row_major(M, N);
    // one argument per node, in the graph's order: acc, y1, Relu2Keep24, the store, the root
    return Args{{}, {static_cast<const Bf16*>(aux), Bf16(0), stride}, {}, {static_cast<Bf16*>(aux_out), stride}, {}};
  }
};

template <class Gemm>
using EpiArgs_t = decltype(typename Gemm::Arguments{}.epilogue.thread);

template <class Fusion, class TileMNK, class ClusterMNK, class MainSchedule, class EpiSchedule>
struct DenseGemm {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileMNK, ClusterMNK,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8,  // no C
      Bf16, cutlass::layout::RowMajor, 8, EpiSchedule,
      typename FusionFor<Fusion, TileMNK, EpiSchedule>::type>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Bf16, cutlass::layout::RowMajor, 8,       // A: K-major
      Bf16, cutlass::layout::ColumnMajor, 8,    // B: K-major (B^T [N, K] row-major)
      float, TileMNK, ClusterMNK,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments args(const void* a, const void* b, const void* aux, void* aux_out, void* d, int M,
                                       int N, int K) {
    using EpiArgs = decltype(typename Gemm::Arguments{}.epilogue.thread);
    typename Gemm::Arguments out{
        cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1},
        {static_cast<const Bf16*>(a), cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {M, K, 1}),
         static_cast<const Bf16*>(b), cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {N, K, 1})},
        {FusionArgs<Fusion>::template make<EpiArgs>(aux, aux_out, M, N), nullptr,
         cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, {M, N, 1}),
         static_cast<Bf16*>(d), cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {M, N, 1})}};
    out.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
    return out;
  }

  // the batched form (the rope GEMM): A [L, M, K] with row stride lda and batch stride a_batch (a view of the q/k/v
  // down-projections' [T, 3r] output), B [L, N, K] packed, D [L, M, N] packed
  static typename Gemm::Arguments batched_args(const void* a, const void* b, void* d, int L, int M, int N, int K,
                                               long long lda, long long a_batch, EpiArgs_t<Gemm> epi) {
    typename Kernel::StrideA stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {M, K, L});
    cute::get<0>(stride_a) = lda;
    cute::get<2>(stride_a) = a_batch;
    typename Gemm::Arguments out{
        cutlass::gemm::GemmUniversalMode::kBatched, {M, N, K, L},
        {static_cast<const Bf16*>(a), stride_a,
         static_cast<const Bf16*>(b), cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {N, K, L})},
        {epi, nullptr, cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, {M, N, L}),
         static_cast<Bf16*>(d), cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {M, N, L})}};
    out.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
    return out;
  }

  // one launch, or iters timed (launch.h)
  static int run(const void* a, const void* b, const void* aux, void* aux_out, void* d, int M, int N, int K,
                 void* workspace, size_t ws_bytes, cudaStream_t stream, int iters, float* ms) {
    return elas_cutlass::run<Gemm>(args(a, b, aux, aux_out, d, M, N, K), workspace, ws_bytes, stream, iters, ms);
  }

  static size_t workspace(int M, int N, int K) {
    return Gemm::get_workspace_size(args(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K));
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// the tiles cuBLAS picks at these shapes (nvjet 256x128, 128x256, 64x128 in the 1B step's profile) and their
// neighbours; K = 64 per stage (bf16: 128 bytes, one TMA swizzle width). The ping-pong ones run one consumer warp
// group's epilogue under the other's MMA: for the epilogues with real work (the 2:4 choice), which a cooperative
// kernel cannot overlap with the tile's mainloop (performance.md: modes 5 and 6 on the H200)
#define ELAS_CONFIGS(F)                                                          \
  DenseGemm<F, Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_256, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_256, _128, _64>, Shape<_1, _2, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>,        \
  DenseGemm<F, Shape<_64, _256, _64>, Shape<_1, _1, _1>, Ping, PingEpi>,         \
  DenseGemm<F, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Ping, PingEpi>
const char* kNames[] = {"128x256x64 coop 1x1", "128x256x64 coop 2x1", "256x128x64 coop 1x1",
                        "256x128x64 coop 1x2", "128x128x64 coop 1x1", "64x256x64 pingpong 1x1",
                        "128x128x64 pingpong 1x1"};
constexpr int kConfigs = 7;

template <class... Configs>
struct Table {
  template <int I, class First, class... Rest>
  static int run_at(int config, const void* a, const void* b, const void* aux, void* aux_out, void* d, int M, int N,
                    int K, void* ws, size_t ws_bytes, cudaStream_t stream, int iters, float* ms) {
    if (config == I) return First::run(a, b, aux, aux_out, d, M, N, K, ws, ws_bytes, stream, iters, ms);
    if constexpr (sizeof...(Rest) > 0) {
      return run_at<I + 1, Rest...>(config, a, b, aux, aux_out, d, M, N, K, ws, ws_bytes, stream, iters, ms);
    }
    return -1;
  }
  template <int I, class First, class... Rest>
  static long long workspace_at(int config, int M, int N, int K) {
    if (config == I) return static_cast<long long>(First::workspace(M, N, K));
    if constexpr (sizeof...(Rest) > 0) return workspace_at<I + 1, Rest...>(config, M, N, K);
    return -1;
  }
  static int run(int config, const void* a, const void* b, const void* aux, void* aux_out, void* d, int M, int N,
                 int K, void* ws, size_t ws_bytes, cudaStream_t stream, int iters, float* ms) {
    return run_at<0, Configs...>(config, a, b, aux, aux_out, d, M, N, K, ws, ws_bytes, stream, iters, ms);
  }
  static long long workspace(int config, int M, int N, int K) { return workspace_at<0, Configs...>(config, M, N, K); }
};

using Plain = Table<ELAS_CONFIGS(EltAct<Identity>)>;
using Relu2 = Table<ELAS_CONFIGS(EltAct<ReLUSquaredOfBf16>)>;
using Grad = Table<ELAS_CONFIGS(GradTree)>;
using GradTmaTable = Table<ELAS_CONFIGS(GradTma)>;
using SteGradTable = Table<ELAS_CONFIGS(SteGradTma)>;
using SteY2sTable = Table<ELAS_CONFIGS(SteY2sTag)>;
using Pack24Table = Table<ELAS_CONFIGS(Pack24Tree)>;
using Pack24MaskedTable = Table<ELAS_CONFIGS(Pack24MaskedTree)>;
using Grad24Table = Table<ELAS_CONFIGS(Grad24Tag)>;

// the rope GEMM's configurations, run through their batched arguments
template <class... Configs>
struct RopeTable {
  template <int I, class First, class... Rest>
  static int run_at(int config, const void* a, const void* b, void* d, int L, int M, int N, int K, long long lda,
                    long long a_batch, RopeArgs const& rope, void* ws, size_t ws_bytes, cudaStream_t stream,
                    int iters, float* ms, long long* ws_needed) {
    if (config == I) {
      using Gemm = typename First::Gemm;
      EpiArgs_t<Gemm> epi{{{{}, {}}, rope}, {}};  // D = Identity(rope(Identity(acc)))
      auto args = First::batched_args(a, b, d, L, M, N, K, lda, a_batch, epi);
      if (ws_needed != nullptr) {
        *ws_needed = static_cast<long long>(Gemm::get_workspace_size(args));
        return 0;
      }
      return elas_cutlass::run<Gemm>(args, ws, ws_bytes, stream, iters, ms);
    }
    if constexpr (sizeof...(Rest) > 0) {
      return run_at<I + 1, Rest...>(config, a, b, d, L, M, N, K, lda, a_batch, rope, ws, ws_bytes, stream, iters, ms,
                                    ws_needed);
    }
    return -1;
  }
  static int run(int config, const void* a, const void* b, void* d, int L, int M, int N, int K, long long lda,
                 long long a_batch, RopeArgs const& rope, void* ws, size_t ws_bytes, cudaStream_t stream,
                 int iters, float* ms, long long* ws_needed) {
    return run_at<0, Configs...>(config, a, b, d, L, M, N, K, lda, a_batch, rope, ws, ws_bytes, stream, iters, ms,
                                 ws_needed);
  }
};
using Rope = RopeTable<ELAS_CONFIGS(RopeTree)>;

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
    case 4: return SteGradTable::workspace(config, M, N, K);
    case 5: return SteY2sTable::workspace(config, M, N, K);
    case 6: return Pack24Table::workspace(config, M, N, K);
    case 7: return Pack24MaskedTable::workspace(config, M, N, K);
    case 8: return Grad24Table::workspace(config, M, N, K);
    default: return -1;
  }
}
// aux: the input tensor [M, N] bf16 row-major of modes 2-5 and 8 (y2, y1 for 4 and 5, y2s for 8); aux_out: mode
// 5's y2s [M, N] bf16 row-major, or modes 6-8's packed buffer [M, N*9/16] bf16 (unused otherwise). Returns 0 on success; 2 cannot implement, 3 workspace too small, 4 initialize,
// 5 run, 6 CUDA error, -1 bad config or mode
int elas_cutlass_dense_mm_aux(int config, int mode, const void* a, const void* b, const void* aux, void* aux_out,
                              void* d, int M, int N, int K, void* workspace, size_t ws_bytes, void* stream, int iters,
                              float* ms) {
  if (config < 0 || config >= kConfigs) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  switch (mode) {
    case 0: return Plain::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 1: return Relu2::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 2: return Grad::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 3: return GradTmaTable::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 4: return SteGradTable::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 5: return SteY2sTable::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 6: return Pack24Table::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 7: return Pack24MaskedTable::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    case 8: return Grad24Table::run(config, a, b, aux, aux_out, d, M, N, K, workspace, ws_bytes, s, iters, ms);
    default: return -1;
  }
}
// The rope GEMM: D [L, M, N] = A [L, M, K] (row stride lda, batch stride a_batch) x B [L, N, K]^T, with the
// columns l*N + n < rot_cols rotated (RopeNode); cos, sin [seq, head_dim/2] fp32. ws_needed != nullptr: only the
// workspace size is written there. Returns as elas_cutlass_dense_mm_aux.
int elas_cutlass_rope_mm(int config, const void* a, const void* b, void* d, int L, int M, int N, int K, long long lda,
                         long long a_batch, const float* cos, const float* sin, int seq, int head_dim, int rot_cols,
                         void* workspace, size_t ws_bytes, void* stream, int iters, float* ms, long long* ws_needed) {
  if (config < 0 || config >= kConfigs) return -1;
  RopeArgs rope{cos, sin, seq, head_dim, rot_cols};
  return Rope::run(config, a, b, d, L, M, N, K, lda, a_batch, rope, workspace, ws_bytes,
                   static_cast<cudaStream_t>(stream), iters, ms, ws_needed);
}
// the entry point of libraries built before mode 5 (no second aux tensor)
int elas_cutlass_dense_mm(int config, int mode, const void* a, const void* b, const void* aux, void* d, int M, int N,
                          int K, void* workspace, size_t ws_bytes, void* stream, int iters, float* ms) {
  return elas_cutlass_dense_mm_aux(config, mode, a, b, aux, nullptr, d, M, N, K, workspace, ws_bytes, stream, iters,
                                   ms);
}
}
