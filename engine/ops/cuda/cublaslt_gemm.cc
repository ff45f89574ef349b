#include "engine/ops/cuda/cublaslt_gemm.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace loraplex::ops::cuda {
namespace {

absl::Status LtError(cublasStatus_t status, absl::string_view what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuBLASLt ", what, ": ", cublasLtGetStatusString(status)));
}

// Heuristic choices are shared by all M in a bucket: powers of two up to 256, then multiples of
// 256 (prefill sizes vary every step; decode buckets are the graph buckets).
int64_t MBucket(int64_t m) {
  if (m > 256) return (m + 255) / 256 * 256;
  int64_t b = 1;
  while (b < m) b *= 2;
  return b;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CublasLtGemm>> CublasLtGemm::Create(void* workspace, size_t workspace_bytes,
                                                                    int sm_count_target) {
  std::unique_ptr<CublasLtGemm> g(new CublasLtGemm());
  g->workspace_ = workspace;
  g->workspace_bytes_ = workspace_bytes;
  LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtCreate(&g->handle_), "create handle"));
  LORAPLEX_RETURN_IF_ERROR(
      LtError(cublasLtMatmulDescCreate(&g->desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "create matmul desc"));
  const cublasOperation_t trans_w = CUBLAS_OP_T;
  const cublasOperation_t trans_x = CUBLAS_OP_N;
  LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtMatmulDescSetAttribute(
      g->desc_, CUBLASLT_MATMUL_DESC_TRANSA, &trans_w, sizeof trans_w), "set TRANSA"));
  LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtMatmulDescSetAttribute(
      g->desc_, CUBLASLT_MATMUL_DESC_TRANSB, &trans_x, sizeof trans_x), "set TRANSB"));
  if (sm_count_target > 0) {
    const int32_t sms = sm_count_target;
    LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtMatmulDescSetAttribute(
        g->desc_, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms, sizeof sms), "set SM count target"));
  }
  LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtMatmulPreferenceCreate(&g->preference_), "create preference"));
  const uint64_t ws = workspace_bytes;
  LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtMatmulPreferenceSetAttribute(
      g->preference_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws), "set workspace"));
  return g;
}

CublasLtGemm::~CublasLtGemm() {
  if (preference_ != nullptr) cublasLtMatmulPreferenceDestroy(preference_);
  if (desc_ != nullptr) cublasLtMatmulDescDestroy(desc_);
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

absl::Status CublasLtGemm::InitLayouts(int64_t m, int64_t n, int64_t k, bool y_f32, Plan* plan) {
  // Column-major view: w is k×n (ld k) used transposed, x is k×m (ld k), y is n×m (ld n).
  LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtMatrixLayoutInit(&plan->w_layout, CUDA_R_16BF, k, n, k), "w layout"));
  LORAPLEX_RETURN_IF_ERROR(LtError(cublasLtMatrixLayoutInit(&plan->x_layout, CUDA_R_16BF, k, m, k), "x layout"));
  LORAPLEX_RETURN_IF_ERROR(LtError(
      cublasLtMatrixLayoutInit(&plan->y_layout, y_f32 ? CUDA_R_32F : CUDA_R_16BF, n, m, n), "y layout"));
  return absl::OkStatus();
}

absl::StatusOr<int> CublasLtGemm::Candidates(Plan& plan, int alignment, int count,
                                              cublasLtMatmulHeuristicResult_t* results) {
  const uint32_t align = static_cast<uint32_t>(alignment);
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    LORAPLEX_RETURN_IF_ERROR(
        LtError(cublasLtMatmulPreferenceSetAttribute(preference_, attr, &align, sizeof align), "set alignment"));
  }
  int found = 0;
  LORAPLEX_RETURN_IF_ERROR(LtError(
      cublasLtMatmulAlgoGetHeuristic(handle_, desc_, &plan.w_layout, &plan.x_layout, &plan.y_layout,
                                     &plan.y_layout, preference_, count, results, &found),
      "heuristic"));
  return found;
}

absl::StatusOr<cublasLtMatmulAlgo_t> CublasLtGemm::Heuristic(Plan& plan, int alignment) {
  cublasLtMatmulHeuristicResult_t result{};
  LORAPLEX_ASSIGN_OR_RETURN(const int found, Candidates(plan, alignment, 1, &result));
  if (found == 0) return absl::InternalError("cuBLASLt heuristic found no algorithm");
  return result.algo;
}

absl::StatusOr<CublasLtGemm::Plan*> CublasLtGemm::GetPlan(int64_t m, int64_t n, int64_t k,
                                                                bool y_f32, int alignment) {
  const Key key{m, n, k, y_f32, alignment};
  if (auto it = plans_.find(key); it != plans_.end()) return it->second.get();
  auto plan = std::make_unique<Plan>();
  const Key bucket_key{MBucket(m), n, k, y_f32, alignment};
  auto algo_it = bucket_algos_.find(bucket_key);
  if (algo_it == bucket_algos_.end()) {
    Plan bucket_plan;
    LORAPLEX_RETURN_IF_ERROR(InitLayouts(MBucket(m), n, k, y_f32, &bucket_plan));
    LORAPLEX_ASSIGN_OR_RETURN(cublasLtMatmulAlgo_t algo, Heuristic(bucket_plan, alignment));
    algo_it = bucket_algos_.emplace(bucket_key, algo).first;
  }
  LORAPLEX_RETURN_IF_ERROR(InitLayouts(m, n, k, y_f32, plan.get()));
  plan->algo = algo_it->second;
  // The bucket's algorithm was chosen for a larger M; keep it only if cuBLASLt accepts this shape.
  cublasLtMatmulHeuristicResult_t check{};
  const cublasStatus_t st = cublasLtMatmulAlgoCheck(handle_, desc_, &plan->w_layout, &plan->x_layout,
                                                    &plan->y_layout, &plan->y_layout, &plan->algo, &check);
  if (st != CUBLAS_STATUS_SUCCESS || check.workspaceSize > workspace_bytes_) {
    LORAPLEX_ASSIGN_OR_RETURN(plan->algo, Heuristic(*plan, alignment));
  }
  return plans_.emplace(key, std::move(plan)).first->second.get();
}

namespace {

// The largest power of two (<= 256) dividing every address: algorithms may assume no more.
int Alignment(const void* x, const void* w, const void* y) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) |
                         reinterpret_cast<uintptr_t>(y) | 256u;
  return static_cast<int>(bits & (~bits + 1));
}

}  // namespace

absl::Status CublasLtGemm::Prepare(const void* x, const void* w, const void* y, bool y_f32, int64_t max_m,
                                   int64_t n, int64_t k) {
  if (n == 0) return absl::OkStatus();
  const int alignment = Alignment(x, w, y);
  for (int64_t m = 1; m <= max_m; m = MBucket(m) + 1) {
    LORAPLEX_RETURN_IF_ERROR(GetPlan(MBucket(m), n, k, y_f32, alignment).status());
  }
  return absl::OkStatus();
}

absl::Status CublasLtGemm::PrepareTimed(const void* x, const void* w, void* y, int64_t min_m, int64_t max_m,
                                        int64_t n, int64_t k, cudaStream_t stream) {
  if (n == 0 || max_m < 1) return absl::OkStatus();
  const int alignment = Alignment(x, w, y);
  // Each candidate timed kSweeps times over kRuns calls, its best sweep counting: one sweep of 5
  // calls picked gate_up's M = 32 algorithm 5% slower in one of two processes.
  // With timed_l2_cold_ every timed call starts with the L2 cleared (a write over kFlushBytes of
  // scratch, outside the timing) and the calls' own times are summed: in a step the weight comes
  // from HBM, while back-to-back calls find a weight smaller than the L2 (o and its spare rows:
  // 34 MB of an H200's 50 MB) there and may favour algorithms that win only on L2 hits. Two
  // processes each way (bench/runs/2026-11-30-eighteenth/4-l2-cold-timing): batch 64 with one or 4
  // r16 adapters (o and down as LoRA rows) 1.092-1.094x the base step -> 1.076-1.081x; batch 32
  // unchanged (1.059-1.076x against 1.063-1.074x).
  constexpr int kCandidates = 8, kWarmup = 2, kRuns = 10, kSweeps = 3;
  constexpr size_t kFlushBytes = 128u << 20;
  cudaEvent_t start = nullptr, stop = nullptr;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
    if (start != nullptr) cudaEventDestroy(start);
    (void)cudaGetLastError();
    return absl::InternalError("cuBLASLt PrepareTimed: cannot create events");
  }
  void* flush = nullptr;
  if (timed_l2_cold_ && cudaMalloc(&flush, kFlushBytes) != cudaSuccess) {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    (void)cudaGetLastError();
    return absl::InternalError("cuBLASLt PrepareTimed: cannot allocate the L2 flush buffer");
  }
  absl::Status status = absl::OkStatus();
  for (int64_t m = MBucket(std::max<int64_t>(1, min_m)); status.ok() && m <= MBucket(max_m); m = MBucket(m + 1)) {
    const Key key{m, n, k, false, alignment};
    if (timed_.count(key) > 0) continue;
    Plan plan;
    status = InitLayouts(m, n, k, false, &plan);
    if (!status.ok()) break;
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    absl::StatusOr<int> candidates = Candidates(plan, alignment, kCandidates, results);
    status = candidates.status();
    if (!status.ok()) break;
    const int found = *candidates;
    const float alpha = 1.0f, beta = 0.0f;
    int best = -1;
    float best_ms = 0.0f;
    for (int sweep = 0; sweep < kSweeps; ++sweep) {
      for (int i = 0; i < found; ++i) {
        if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > workspace_bytes_) continue;
        bool ok = true;
        float ms = 0.0f;
        for (int r = 0; ok && r < kWarmup + kRuns; ++r) {
          if (flush != nullptr) {
            ok = cudaMemsetAsync(flush, r & 0xff, kFlushBytes, stream) == cudaSuccess &&
                 cudaEventRecord(start, stream) == cudaSuccess;
          } else if (r == kWarmup) {
            ok = cudaEventRecord(start, stream) == cudaSuccess;
          }
          ok = ok && cublasLtMatmul(handle_, desc_, &alpha, w, &plan.w_layout, x, &plan.x_layout, &beta, y,
                                    &plan.y_layout, y, &plan.y_layout, &results[i].algo, workspace_, workspace_bytes_,
                                    stream) == CUBLAS_STATUS_SUCCESS;
          if (flush != nullptr) {
            float call_ms = 0.0f;
            ok = ok && cudaEventRecord(stop, stream) == cudaSuccess && cudaEventSynchronize(stop) == cudaSuccess &&
                 cudaEventElapsedTime(&call_ms, start, stop) == cudaSuccess;
            if (r >= kWarmup) ms += call_ms;
          }
        }
        if (flush == nullptr) {
          ok = ok && cudaEventRecord(stop, stream) == cudaSuccess && cudaEventSynchronize(stop) == cudaSuccess &&
               cudaEventElapsedTime(&ms, start, stop) == cudaSuccess;
        }
        if (!ok) {
          (void)cudaStreamSynchronize(stream);
          (void)cudaGetLastError();
          continue;
        }
        if (best < 0 || ms < best_ms) {
          best = i;
          best_ms = ms;
        }
      }
    }
    timed_.insert(key);
    if (best < 0) continue;  // the heuristic's own choice stays (GetPlan)
    bucket_algos_[key] = results[best].algo;
    // Plans of this bucket's M made before keep the old algorithm: rebuild them.
    for (auto it = plans_.begin(); it != plans_.end();) {
      const auto& [pm, pn, pk, pf, pa] = it->first;
      if (MBucket(pm) == m && pn == n && pk == k && !pf && pa == alignment) {
        it = plans_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (flush != nullptr) cudaFree(flush);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return status;
}

absl::Status CublasLtGemm::Run(const void* x, const void* w, void* y, bool y_f32, int64_t m,
                               int64_t n, int64_t k, float beta, cudaStream_t stream) {
  if (m == 0 || n == 0) return absl::OkStatus();
  LORAPLEX_ASSIGN_OR_RETURN(Plan* plan, GetPlan(m, n, k, y_f32, Alignment(x, w, y)));
  const float alpha = 1.0f;
  return LtError(cublasLtMatmul(handle_, desc_, &alpha, w, &plan->w_layout, x, &plan->x_layout, &beta,
                                y, &plan->y_layout, y, &plan->y_layout, &plan->algo, workspace_,
                                workspace_bytes_, stream),
                 absl::StrCat("matmul m=", m, " n=", n, " k=", k));
}

}  // namespace loraplex::ops::cuda
