// A measurement kernel (ops_cuda_test "TIME beside"): reads memory with blocks of one warp held
// to 32 registers a thread and no shared memory. Every decode GEMM cuBLASLt picks for the Llama
// shapes runs one CTA of 384 threads x 168 registers per SM (bench/ncu_lora.sh with NCU_KERNELS
// empty), which leaves exactly one such warp's registers free on each SM: the question the probe
// answers is whether LoRA work shaped like this can run beside the GEMM without delaying it, and
// how fast it moves bytes there.
#include "engine/ops/cuda/beside_probe.h"

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

// Four 16-byte loads a lane in flight (16 of the 32 registers).
__global__ void __maxnreg__(32) BesideProbeKernel(const uint4* __restrict__ src, int64_t vecs, uint32_t* sink) {
  uint32_t acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpSize;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  for (; i + 3 * stride < vecs; i += 4 * stride) {
    const uint4 a = __ldcs(src + i);
    const uint4 b = __ldcs(src + i + stride);
    const uint4 c = __ldcs(src + i + 2 * stride);
    const uint4 d = __ldcs(src + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < vecs; i += stride) {
    const uint4 a = __ldcs(src + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // the loads must not be dropped
}

}  // namespace

cudaError_t LaunchBesideProbe(const void* src, int64_t bytes, int blocks, uint32_t* sink, cudaStream_t stream) {
  if (bytes <= 0 || blocks <= 0) return cudaSuccess;
  static const cudaError_t attr = cudaFuncSetAttribute(
      BesideProbeKernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (attr != cudaSuccess) return attr;
  BesideProbeKernel<<<blocks, kWarpSize, 0, stream>>>(static_cast<const uint4*>(src), bytes / 16, sink);
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
