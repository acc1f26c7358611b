// elas: 2:4-sparse x dense GEMM on cuSPARSELt with plans built once per (device, shape, layout, algorithm).
//
// torch's _cslt_sparse_mm rebuilds every descriptor and the plan on each call (~0.7 ms of CPU); here a call
// is a map lookup plus cusparseLtMatmul. Registered as torch.ops.elas_cslt.mm so that dispatch stays in C++,
// and so that torch.compile sees one opaque op (its fake implementation lives in gemm.py).
//
// A: the packed SM90 buffer of a [m, k] bf16 matrix, 2:4 along k (kernels/packed.py), row-major.
// B: [k, n] bf16, either row-major (ld n) or the transpose of a row-major [n, k] (e.g. W.t() of a Linear
//    weight), which is described as opB = T.
// C: [m, n] bf16 row-major, fp32 accumulation; or (ct) column-major, i.e. the row-major [n, m] transpose that is
//    returned: a weight-sparse product S(W) x^T then arrives as [tokens, d_out] without a transposing copy.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusparseLt.h>

#include <chrono>
#include <map>
#include <mutex>
#include <tuple>

#define ELAS_CSLT(expr)                                                                     \
  do {                                                                                      \
    cusparseStatus_t st_ = (expr);                                                          \
    TORCH_CHECK(st_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt error ", static_cast<int>(st_), \
                " in " #expr);                                                              \
  } while (0)

namespace {

struct Plan {
  cusparseLtMatDescriptor_t a, b, c;
  cusparseLtMatmulDescriptor_t mm;
  cusparseLtMatmulAlgSelection_t sel;
  cusparseLtMatmulPlan_t plan;
  size_t workspace = 0;
};

float g_alpha = 1.f, g_beta = 0.f;  // host scalars, constant: safe to read at graph-capture time

// device, m, k, n, b transposed, algorithm id, c column-major
using Key = std::tuple<int, int64_t, int64_t, int64_t, bool, int64_t, bool>;

std::mutex g_mu;
std::map<int, cusparseLtHandle_t*> g_handles;  // one per device, never destroyed (process lifetime)
std::map<Key, Plan*> g_plans;

cusparseLtHandle_t* handle_for(int dev) {
  auto it = g_handles.find(dev);
  if (it != g_handles.end()) return it->second;
  auto* h = new cusparseLtHandle_t;
  ELAS_CSLT(cusparseLtInit(h));
  g_handles[dev] = h;
  return h;
}

void init_descriptors(cusparseLtHandle_t* h, Plan* p, int64_t m, int64_t k, int64_t n, bool bt, bool ct) {
  ELAS_CSLT(cusparseLtStructuredDescriptorInit(h, &p->a, m, k, k, 16, CUDA_R_16BF, CUSPARSE_ORDER_ROW,
                                               CUSPARSELT_SPARSITY_50_PERCENT));
  if (bt) {
    ELAS_CSLT(cusparseLtDenseDescriptorInit(h, &p->b, n, k, k, 16, CUDA_R_16BF, CUSPARSE_ORDER_ROW));
  } else {
    ELAS_CSLT(cusparseLtDenseDescriptorInit(h, &p->b, k, n, n, 16, CUDA_R_16BF, CUSPARSE_ORDER_ROW));
  }
  ELAS_CSLT(cusparseLtDenseDescriptorInit(h, &p->c, m, n, ct ? m : n, 16, CUDA_R_16BF,
                                          ct ? CUSPARSE_ORDER_COL : CUSPARSE_ORDER_ROW));
  ELAS_CSLT(cusparseLtMatmulDescriptorInit(
      h, &p->mm, CUSPARSE_OPERATION_NON_TRANSPOSE,
      bt ? CUSPARSE_OPERATION_TRANSPOSE : CUSPARSE_OPERATION_NON_TRANSPOSE, &p->a, &p->b, &p->c, &p->c,
      CUSPARSE_COMPUTE_32F));
  ELAS_CSLT(cusparseLtMatmulAlgSelectionInit(h, &p->sel, &p->mm, CUSPARSELT_MATMUL_ALG_DEFAULT));
}

Plan* plan_for(cusparseLtHandle_t* h, const Key& key) {
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second;
  const auto& [dev, m, k, n, bt, alg, ct] = key;
  auto* p = new Plan;
  init_descriptors(h, p, m, k, n, bt, ct);
  int alg_id = static_cast<int>(alg);
  ELAS_CSLT(cusparseLtMatmulAlgSetAttribute(h, &p->sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id, sizeof(alg_id)));
  ELAS_CSLT(cusparseLtMatmulPlanInit(h, &p->plan, &p->mm, &p->sel));
  ELAS_CSLT(cusparseLtMatmulGetWorkspace(h, &p->plan, &p->workspace));
  g_plans[key] = p;
  return p;
}

bool is_transposed(const torch::Tensor& b, int64_t k, int64_t n) {
  if (b.stride(1) == 1 && (b.stride(0) == n || n == 1)) return false;
  if (b.stride(0) == 1 && (b.stride(1) == k || k == 1)) return true;
  TORCH_CHECK(false, "elas_cslt.mm: b must be row-major [k, n] or the transpose of a row-major [n, k], got strides ",
              b.strides());
}

}  // namespace

torch::Tensor cslt_mm(const torch::Tensor& buf, const torch::Tensor& b, int64_t m, int64_t k, int64_t alg, bool ct) {
  TORCH_CHECK(buf.is_cuda() && b.is_cuda(), "elas_cslt.mm: CUDA tensors expected");
  TORCH_CHECK(buf.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "elas_cslt.mm: bf16 operands expected");
  TORCH_CHECK(buf.is_contiguous() && buf.numel() == m * k * 9 / 16, "elas_cslt.mm: packed buffer of ", m, "x", k,
              " must hold ", m * k * 9 / 16, " contiguous bf16 elements, got ", buf.numel());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == k, "elas_cslt.mm: b must be [", k, ", n], got ", b.sizes());
  const int64_t n = b.size(1);
  const bool bt = is_transposed(b, k, n);
  c10::cuda::CUDAGuard guard(buf.device());
  const int dev = buf.get_device();
  cusparseLtHandle_t* h;
  Plan* p;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    h = handle_for(dev);
    p = plan_for(h, Key{dev, m, k, n, bt, alg, ct});
  }
  auto c = ct ? torch::empty({n, m}, b.options()) : torch::empty({m, n}, b.options());
  torch::Tensor ws;
  void* ws_ptr = nullptr;
  if (p->workspace > 0) {
    ws = torch::empty({static_cast<int64_t>(p->workspace)}, b.options().dtype(torch::kUInt8));
    ws_ptr = ws.data_ptr();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ELAS_CSLT(cusparseLtMatmul(h, &p->plan, &g_alpha, buf.data_ptr(), b.data_ptr(), &g_beta, c.data_ptr(),
                             c.data_ptr(), ws_ptr, &stream, 1));
  return c;
}

// Diagnostics for the host-overhead budget: workspace bytes of a plan, and the wall time per call of `iters`
// back-to-back calls issued from C++ (no Python), in microseconds.
int64_t cslt_workspace(int64_t m, int64_t k, int64_t n, bool bt, int64_t alg, bool ct) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(g_mu);
  return static_cast<int64_t>(plan_for(handle_for(dev), Key{dev, m, k, n, bt, alg, ct})->workspace);
}

double cslt_host_us(const torch::Tensor& buf, const torch::Tensor& b, int64_t m, int64_t k, int64_t alg,
                    int64_t iters) {
  cslt_mm(buf, b, m, k, alg, false);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) cslt_mm(buf, b, m, k, alg, false);
  auto t1 = std::chrono::steady_clock::now();
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  return std::chrono::duration<double, std::micro>(t1 - t0).count() / iters;
}

int64_t cslt_max_alg(int64_t m, int64_t k, int64_t n, bool bt, bool ct) {
  std::lock_guard<std::mutex> lock(g_mu);
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  cusparseLtHandle_t* h = handle_for(dev);
  Plan p;
  init_descriptors(h, &p, m, k, n, bt, ct);
  int max_id = -1;
  ELAS_CSLT(cusparseLtMatmulAlgGetAttribute(h, &p.sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_id, sizeof(max_id)));
  return max_id;
}

int64_t cslt_version() {
  std::lock_guard<std::mutex> lock(g_mu);
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int v = 0;
  ELAS_CSLT(cusparseLtGetVersion(handle_for(dev), &v));
  return v;
}

TORCH_LIBRARY(elas_cslt, lib) {
  lib.def("mm(Tensor buf, Tensor b, int m, int k, int alg, bool ct=False) -> Tensor");
  lib.def("max_alg(int m, int k, int n, bool bt, bool ct=False) -> int", &cslt_max_alg);
  lib.def("version() -> int", &cslt_version);
  lib.def("workspace(int m, int k, int n, bool bt, int alg, bool ct=False) -> int", &cslt_workspace);
  lib.def("host_us(Tensor buf, Tensor b, int m, int k, int alg, int iters) -> float", &cslt_host_us);
}

TORCH_LIBRARY_IMPL(elas_cslt, CUDA, lib) { lib.impl("mm", &cslt_mm); }
