// RMSNorm, with and without the fused residual add. One block per row; the second pass re-reads
// the row (it is in L1/L2) rather than holding a hidden-size row in registers.
#include "engine/ops/cuda/norm.h"

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kThreads = 256;

// kAdd: residual += x first, and normalise the rounded residual.
template <bool kAdd>
__global__ void RmsNormKernel(const bf16* x, bf16* residual,
                              const bf16* __restrict__ weight, int64_t hidden, float eps,
                              bf16* out) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const bf16* xr = x + row * hidden;
  bf16* rr = kAdd ? residual + row * hidden : nullptr;
  bf16* orow = out + row * hidden;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = ToFloat(xr[i]);
    if constexpr (kAdd) {
      const bf16 r = ToBf16(ToFloat(rr[i]) + v);
      rr[i] = r;
      v = ToFloat(r);
    }
    sum_sq += v * v;
  }
  const float total = BlockSum(sum_sq, scratch);
  const float inv = rsqrtf(total / static_cast<float>(hidden) + eps);
  // Each thread re-reads exactly the elements it wrote above, so aliasing out with x or residual
  // is safe.
  const bf16* src = kAdd ? rr : xr;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    orow[i] = ToBf16(ToFloat(src[i]) * inv * ToFloat(weight[i]));
  }
}

}  // namespace

cudaError_t LaunchRmsNorm(const void* x, const void* weight, int64_t rows, int64_t hidden,
                          float eps, void* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const bf16*>(x), nullptr, static_cast<const bf16*>(weight), hidden, eps,
      static_cast<bf16*>(out));
  return cudaGetLastError();
}

cudaError_t LaunchAddRmsNorm(const void* x, void* residual, const void* weight, int64_t rows,
                             int64_t hidden, float eps, void* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  RmsNormKernel<true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const bf16*>(x), static_cast<bf16*>(residual), static_cast<const bf16*>(weight),
      hidden, eps, static_cast<bf16*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
