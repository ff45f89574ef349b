// Row gathers (embedding lookup, GatherRows) and the SwiGLU activation.
#include "engine/ops/cuda/elementwise.h"

#include "engine/ops/cuda/lora_delta.cuh"

namespace loraplex::ops::cuda {
namespace {

// One block per output row. kVec: rows are whole 16-byte vectors and both bases are aligned.
template <bool kVec>
__global__ void GatherRowsKernel(const char* __restrict__ src, int64_t src_rows, int64_t row_bytes,
                                 const int32_t* __restrict__ indices, char* __restrict__ dst) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const int64_t i = blockIdx.x;
  const int32_t index = indices[i];
  const bool valid = index >= 0 && index < src_rows;
  const char* from = src + static_cast<int64_t>(index) * row_bytes;
  char* to = dst + i * row_bytes;
  if constexpr (kVec) {
    const int64_t n = row_bytes / 16;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      reinterpret_cast<uint4*>(to)[j] =
          valid ? reinterpret_cast<const uint4*>(from)[j] : make_uint4(0, 0, 0, 0);
    }
  } else {
    for (int64_t j = threadIdx.x; j < row_bytes; j += blockDim.x) to[j] = valid ? from[j] : 0;
  }
}

__device__ __forceinline__ float SiluMul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// One element per thread step, any inter or alignment.
__global__ void SiluMulKernel(const bf16* __restrict__ gate_up, int64_t num_tokens, int64_t inter,
                              bf16* __restrict__ out) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const int64_t total = num_tokens * inter;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / inter;
    const int64_t c = e - t * inter;
    const float g = ToFloat(gate_up[t * 2 * inter + c]);
    const float u = ToFloat(gate_up[t * 2 * inter + inter + c]);
    out[e] = ToBf16(SiluMul(g, u));
  }
}

// 8 elements (one 16-byte vector of gate, of up and of out) per thread step: inter % 8 == 0 and
// both bases 16-byte aligned, so every row is too. A pending LoRA delta of gate_up (the GEMM
// output) is added as gate and up are loaded, and written back to gate_up (lora_delta.h).
__global__ void SiluMulVecKernel(uint4* __restrict__ gate_up, int64_t num_tokens, int64_t inter_vecs,
                                 uint4* __restrict__ out, LoraDeltaView delta) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const int64_t total = num_tokens * inter_vecs;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / inter_vecs;
    const int64_t c = e - t * inter_vecs;
    float g[8], u[8], o[8], dg[8], du[8];
    const int64_t gi = t * 2 * inter_vecs + c;
    const int64_t ui = gi + inter_vecs;
    Unpack8(gate_up[gi], g);
    Unpack8(gate_up[ui], u);
    const bool fix_g = LoadLoraDelta8(delta, t, c * 8, dg);
    const bool fix_u = LoadLoraDelta8(delta, t, (inter_vecs + c) * 8, du);
    if (fix_g) {
      AddLoraDelta8(g, dg);
      gate_up[gi] = Pack8(g);
    }
    if (fix_u) {
      AddLoraDelta8(u, du);
      gate_up[ui] = Pack8(u);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = SiluMul(g[k], u[k]);
    out[e] = Pack8(o);
  }
}

}  // namespace

cudaError_t LaunchGatherRows(const void* src, int64_t src_rows, int64_t row_bytes,
                             const int32_t* indices, int64_t num_out_rows, void* dst,
                             cudaStream_t stream) {
  if (num_out_rows == 0 || row_bytes == 0) return cudaSuccess;
  const bool vec = row_bytes % 16 == 0 && IsAligned16(src) && IsAligned16(dst);
  const dim3 grid(static_cast<unsigned>(num_out_rows));
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  if (vec) {
    (void)LaunchDependent(GatherRowsKernel<true>, dim3(grid), dim3(256), 0, stream, s, src_rows, row_bytes, indices, d);
  } else {
    (void)LaunchDependent(GatherRowsKernel<false>, dim3(grid), dim3(256), 0, stream, s, src_rows, row_bytes, indices, d);
  }
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(void* gate_up, int64_t num_tokens, int64_t inter, void* out,
                          const LoraDeltaView& delta, cudaStream_t stream) {
  const bool vec = inter % 8 == 0 && IsAligned16(gate_up) && IsAligned16(out);
  const int64_t work = num_tokens * (vec ? inter / 8 : inter);  // thread steps
  if (work == 0) return cudaSuccess;
  const int64_t blocks = (work + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  if (vec) {
    (void)LaunchDependent(SiluMulVecKernel, dim3(grid), dim3(256), 0, stream,
                          static_cast<uint4*>(gate_up), num_tokens, inter / 8,
                          static_cast<uint4*>(out), delta);
  } else {
    // The scalar kernel does not fold a LoRA delta: add it first.
    const cudaError_t added = LaunchLoraDeltaAdd(delta, gate_up, stream);
    if (added != cudaSuccess) return added;
    (void)LaunchDependent(SiluMulKernel, dim3(grid), dim3(256), 0, stream, static_cast<const bf16*>(gate_up), num_tokens, inter,
                                            static_cast<bf16*>(out));
  }
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
