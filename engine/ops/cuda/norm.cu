// RMSNorm, with and without the fused residual add. One block per row. A decode step normalises
// one or a few rows, so the kernel is latency-bound: every thread issues all of its loads (16-byte
// vectors) before its first store and keeps the row in registers, which costs one memory round
// trip per pass instead of one per loop iteration (stores through pointers that may alias the
// inputs otherwise serialise each iteration's loads behind the previous iteration's stores).
#include "engine/ops/cuda/norm.h"

#include "engine/ops/cuda/lora_delta.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kVec = 8;  // bf16 per 16-byte vector
// Threads per block of the vector path; wider rows take more vectors per thread. 512 threads
// leave 128 registers each, enough for 8 vectors (64 floats + 8 weight vectors) without spills.
constexpr int kMaxThreads = 512;
constexpr int kMaxVecsPerThread = 8;  // 8 · 8 · 512 = hidden 32768; wider rows take the scalar path

int RoundUpToWarp(int64_t n) {
  return static_cast<int>((n + kWarpSize - 1) / kWarpSize * kWarpSize);
}

// Vector path: hidden % 8 == 0 and every pointer 16-byte aligned. Thread t owns vectors
// t, t + blockDim.x, ... (kVecsPerThread of them at most), reads them all before writing any, and
// writes only those, so out, x and residual may alias one another.
// kAdd: residual += x first, and normalise the rounded residual. A pending LoRA delta of x (the
// GEMM output) is added to x as it is loaded and written back to x (lora_delta.h).
template <bool kAdd, int kVecsPerThread>
__global__ void __launch_bounds__(kMaxThreads)
    RmsNormVecKernel(bf16* x, bf16* residual, const bf16* __restrict__ weight, int64_t hidden,
                     float eps, bf16* out, LoraDeltaView delta) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int num_vecs = static_cast<int>(hidden / kVec);
  uint4* xr = reinterpret_cast<uint4*>(x + row * hidden);
  uint4* rr = kAdd ? reinterpret_cast<uint4*>(residual + row * hidden) : nullptr;
  uint4* orow = reinterpret_cast<uint4*>(out + row * hidden);
  const uint4* w = reinterpret_cast<const uint4*>(weight);

  float v[kVecsPerThread][kVec];
  uint4 wv[kVecsPerThread];
  uint4 x_fixed[kVecsPerThread];  // x with the LoRA delta, written back with the outputs
  bool fixed[kVecsPerThread];
  float sum_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    fixed[j] = false;
    if (i >= num_vecs) continue;
    Unpack8(xr[i], v[j]);
    wv[j] = w[i];  // loaded now so its latency hides behind the reduction
    if constexpr (kAdd) {
      float d[kVec];
      fixed[j] = LoadLoraDelta8(delta, row, static_cast<int64_t>(i) * kVec, d);
      if (fixed[j]) {
        AddLoraDelta8(v[j], d);
        x_fixed[j] = Pack8(v[j]);
      }
    }
    if constexpr (kAdd) {
      float r[kVec];
      Unpack8(rr[i], r);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[j][k] = ToFloat(ToBf16(r[k] + v[j][k]));
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum_sq += v[j][k] * v[j][k];
  }
  const float total = BlockSum(sum_sq, scratch);
  const float inv = rsqrtf(total / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i >= num_vecs) continue;
    if (fixed[j]) xr[i] = x_fixed[j];
    // v holds bf16-exact values, so packing it writes back the rounded residual unchanged.
    if constexpr (kAdd) rr[i] = Pack8(v[j]);
    float wf[kVec];
    Unpack8(wv[j], wf);
    float o[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) o[k] = v[j][k] * inv * wf[k];
    orow[i] = Pack8(o);
  }
}

// Any hidden size or alignment (odd sizes, views at odd offsets). The first pass only loads, so
// its loads pipeline; the second recomputes the rounded residual from x and residual, then writes.
// Each thread reads element i before writing it and no other thread touches i, so out, x and
// residual may alias one another.
template <bool kAdd>
__global__ void RmsNormScalarKernel(const bf16* x, bf16* residual, const bf16* __restrict__ weight,
                                    int64_t hidden, float eps, bf16* out) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const bf16* xr = x + row * hidden;
  bf16* rr = kAdd ? residual + row * hidden : nullptr;
  bf16* orow = out + row * hidden;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = ToFloat(xr[i]);
    if constexpr (kAdd) v = ToFloat(ToBf16(ToFloat(rr[i]) + v));
    sum_sq += v * v;
  }
  const float total = BlockSum(sum_sq, scratch);
  const float inv = rsqrtf(total / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = ToFloat(xr[i]);
    if constexpr (kAdd) {
      const bf16 r = ToBf16(ToFloat(rr[i]) + v);
      rr[i] = r;
      v = ToFloat(r);
    }
    orow[i] = ToBf16(v * inv * ToFloat(weight[i]));
  }
}

template <bool kAdd>
cudaError_t Launch(void* x, void* residual, const void* weight, int64_t rows, int64_t hidden,
                   float eps, void* out, const LoraDeltaView& delta, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  bf16* xp = static_cast<bf16*>(x);
  bf16* rp = static_cast<bf16*>(residual);
  const bf16* wp = static_cast<const bf16*>(weight);
  bf16* op = static_cast<bf16*>(out);
  const dim3 grid(static_cast<unsigned>(rows));
  const int64_t num_vecs = hidden / kVec;
  const bool vec = hidden % kVec == 0 && IsAligned16(x) && IsAligned16(weight) && IsAligned16(out) &&
                   (!kAdd || IsAligned16(residual)) &&
                   num_vecs <= static_cast<int64_t>(kMaxThreads) * kMaxVecsPerThread;
  if (!vec) {
    // The scalar kernel does not fold a LoRA delta: add it first.
    const cudaError_t added = LaunchLoraDeltaAdd(delta, xp, stream);
    if (added != cudaSuccess) return added;
    const int threads = RoundUpToWarp(hidden < kMaxThreads ? hidden : kMaxThreads);
    (void)LaunchDependent(RmsNormScalarKernel<kAdd>, dim3(grid), dim3(threads), 0, stream, xp, rp, wp, hidden, eps, op);
    return cudaGetLastError();
  }
  // The fewest vectors per thread that fit the row in kMaxThreads threads.
  int per_thread = 1;
  while (num_vecs > static_cast<int64_t>(kMaxThreads) * per_thread) {
    per_thread *= 2;
  }
  const int threads = RoundUpToWarp((num_vecs + per_thread - 1) / per_thread);
  switch (per_thread) {
    case 1:
      (void)LaunchDependent(RmsNormVecKernel<kAdd, 1>, dim3(grid), dim3(threads), 0, stream, xp, rp, wp, hidden, eps, op,
                            delta);
      break;
    case 2:
      (void)LaunchDependent(RmsNormVecKernel<kAdd, 2>, dim3(grid), dim3(threads), 0, stream, xp, rp, wp, hidden, eps, op,
                            delta);
      break;
    case 4:
      (void)LaunchDependent(RmsNormVecKernel<kAdd, 4>, dim3(grid), dim3(threads), 0, stream, xp, rp, wp, hidden, eps, op,
                            delta);
      break;
    default:
      (void)LaunchDependent(RmsNormVecKernel<kAdd, kMaxVecsPerThread>, dim3(grid), dim3(threads), 0, stream, xp, rp, wp, hidden, eps, op,
                            delta);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchRmsNorm(const void* x, const void* weight, int64_t rows, int64_t hidden,
                          float eps, void* out, cudaStream_t stream) {
  // No delta to fold: the kernels only read x (they share a signature with AddRmsNorm's, which
  // writes the folded delta back to x).
  return Launch<false>(const_cast<void*>(x), nullptr, weight, rows, hidden, eps, out, LoraDeltaView{}, stream);
}

cudaError_t LaunchAddRmsNorm(void* x, void* residual, const void* weight, int64_t rows,
                             int64_t hidden, float eps, void* out, const LoraDeltaView& delta,
                             cudaStream_t stream) {
  return Launch<true>(x, residual, weight, rows, hidden, eps, out, delta, stream);
}

}  // namespace loraplex::ops::cuda
