// Row-major y[M,N] = x[M,K]·w[N,K]ᵀ + beta·y through cuBLASLt (bf16 operands, fp32 compute,
// bf16 or F32 y), run as the column-major TN problem yᵀ = w·xᵀ. The heuristic's algorithm is
// cached per (M bucket, N, K, y dtype, alignment) and checked once per exact M; matrix layouts are
// cached per exact shape. Prepare chooses the buckets' algorithms ahead of use (at start-up). One
// caller-owned workspace serves every call (and captured graphs). Engine thread only.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <tuple>

#include "absl/status/statusor.h"

namespace loraplex::ops::cuda {

class CublasLtGemm {
 public:
  // `workspace` (device, `workspace_bytes`) must outlive this object and any graph it is used in.
  // sm_count_target > 0: algorithms are chosen for that many SMs (cuBLASLt's hint for a GEMM that
  // shares the GPU with a concurrent stream); 0: all of the device's.
  static absl::StatusOr<std::unique_ptr<CublasLtGemm>> Create(void* workspace, size_t workspace_bytes,
                                                              int sm_count_target = 0);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // x [m, k] bf16; w [n, k] bf16; y [m, n] F32 when y_f32 else bf16 (read only when beta != 0).
  absl::Status Run(const void* x, const void* w, void* y, bool y_f32, int64_t m, int64_t n,
                   int64_t k, float beta, cudaStream_t stream);
  // Chooses the algorithm of every M bucket up to max_m for Run with these pointers' alignment
  // and this (n, k, y dtype), so no Run of those shapes pays for the heuristic. Runs nothing.
  absl::Status Prepare(const void* x, const void* w, const void* y, bool y_f32, int64_t max_m, int64_t n,
                       int64_t k);
  // Prepare for the M buckets from min_m to max_m (bf16 y), choosing each bucket's algorithm by
  // timing cuBLASLt's first few candidates on `stream` (runs GEMMs: x [max_m, k] and y [max_m, n]
  // are read and written; synchronizes). Once per shape; later calls for it do nothing.
  absl::Status PrepareTimed(const void* x, const void* w, void* y, int64_t min_m, int64_t max_m, int64_t n,
                            int64_t k, cudaStream_t stream);
  int64_t num_algorithms() const { return static_cast<int64_t>(bucket_algos_.size()); }
  // PrepareTimed clears the L2 before every timed call (on by default; see PrepareTimed).
  void set_timed_l2_cold(bool cold) { timed_l2_cold_ = cold; }

 private:
  // (m or m bucket, n, k, y_f32, alignment in bytes)
  using Key = std::tuple<int64_t, int64_t, int64_t, bool, int>;
  struct Plan {
    cublasLtMatrixLayoutOpaque_t w_layout, x_layout, y_layout;
    cublasLtMatmulAlgo_t algo;
  };

  CublasLtGemm() = default;
  absl::Status InitLayouts(int64_t m, int64_t n, int64_t k, bool y_f32, Plan* plan);
  // Up to `count` of cuBLASLt's candidates for `plan` at `alignment`, best first; how many it found.
  absl::StatusOr<int> Candidates(Plan& plan, int alignment, int count, cublasLtMatmulHeuristicResult_t* results);
  absl::StatusOr<cublasLtMatmulAlgo_t> Heuristic(Plan& plan, int alignment);
  absl::StatusOr<Plan*> GetPlan(int64_t m, int64_t n, int64_t k, bool y_f32, int alignment);

  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatmulPreference_t preference_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, cublasLtMatmulAlgo_t> bucket_algos_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  std::set<Key> timed_;  // bucket keys PrepareTimed has chosen
  bool timed_l2_cold_ = true;
};

}  // namespace loraplex::ops::cuda
