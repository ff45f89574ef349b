// Row gathers (embedding lookup, GatherRows) and the SwiGLU activation.
#include "engine/ops/cuda/elementwise.h"

#include "engine/ops/cuda/lora_delta.cuh"
#include "engine/ops/cuda/lora_rows.cuh"

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


// SiluMulVecKernel reading gate_up from LoRA rows (lora_rows.h): a block takes kRowsVecs column
// vectors of gate and up for kRowsLanes x kRowsTokens rows, so the rows of B its columns need
// (one per adapter position) are read from the L2 once and then from the L1. Every element of
// gate_up is written too.
constexpr int kRowsVecs = 16;
constexpr int kRowsLanes = 16;
constexpr int kRowsTokens = 2;

__global__ void SiluMulRowsKernel(LoraRowsView v, uint4* __restrict__ gate_up, int64_t num_tokens,
                                  int64_t inter_vecs, uint4* __restrict__ out) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const int64_t c = blockIdx.x * static_cast<int64_t>(kRowsVecs) + threadIdx.x % kRowsVecs;
  if (c >= inter_vecs) return;
  const int64_t inter = inter_vecs * 8;
  const int64_t first = blockIdx.y * static_cast<int64_t>(kRowsLanes * kRowsTokens) + threadIdx.x / kRowsVecs;
#pragma unroll
  for (int i = 0; i < kRowsTokens; ++i) {
    const int64_t t = first + i * kRowsLanes;
    if (t >= num_tokens) break;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const bf16*>(v.src) + t * v.stride);
    float g[8], u[8], o[8];
    Unpack8(src[c], g);
    Unpack8(src[inter_vecs + c], u);
    LoraRowsSlice lora;
    if (LoadLoraRowsSlice(v, t, 0, &lora)) {
#pragma unroll
      for (int k = 0; k < 8; ++k) g[k] = ToFloat(ToBf16(g[k] + LoraRowsDelta(lora, c * 8 + k)));
    }
    if (LoadLoraRowsSlice(v, t, 1, &lora)) {
#pragma unroll
      for (int k = 0; k < 8; ++k) u[k] = ToFloat(ToBf16(u[k] + LoraRowsDelta(lora, inter + c * 8 + k)));
    }
    gate_up[t * 2 * inter_vecs + c] = Pack8(g);
    gate_up[t * 2 * inter_vecs + inter_vecs + c] = Pack8(u);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = SiluMul(g[k], u[k]);
    out[t * inter_vecs + c] = Pack8(o);
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

cudaError_t LaunchSiluMulRows(const LoraRowsView& rows, void* gate_up, int64_t num_tokens, int64_t inter, void* out,
                              cudaStream_t stream) {
  if (inter % 8 != 0 || !IsAligned16(gate_up) || !IsAligned16(out) || rows.num_slices != 2 ||
      rows.rows < num_tokens || rows.u_col != 2 * inter || rows.slice_offsets[1] != inter) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0 || inter == 0) return cudaSuccess;
  const int64_t inter_vecs = inter / 8;
  const dim3 grid(static_cast<unsigned>((inter_vecs + kRowsVecs - 1) / kRowsVecs),
                  static_cast<unsigned>((num_tokens + kRowsLanes * kRowsTokens - 1) / (kRowsLanes * kRowsTokens)));
  (void)LaunchDependent(SiluMulRowsKernel, grid, dim3(kRowsVecs * kRowsLanes), 0, stream, rows,
                        static_cast<uint4*>(gate_up), num_tokens, inter_vecs, static_cast<uint4*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
