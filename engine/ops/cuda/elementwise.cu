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


// SiLU·up reading gate_up from LoRA rows (lora_rows.h). A block takes kSiluRowsCols columns of
// gate and the same of up for kSiluRowsChunk rows; a thread one column of each for every
// kSiluRowsLanes-th of those rows. Threads of a column share its rows of B through the L1, so they
// come from the L2 about once per adapter position. The slot table and the first row's B are read
// before the wait for the GEMM (written before it); after it, the rows' values and shrink values
// all at once. Every element of gate_up is written too.
constexpr int kSiluRowsCols = 64;
constexpr int kSiluRowsLanes = 4;
constexpr int kSiluRowsChunk = 16;
constexpr int kSiluRowsPerThread = kSiluRowsChunk / kSiluRowsLanes;

__global__ void SiluMulRowsKernel(LoraRowsView v, bf16* __restrict__ gate_up, int64_t num_tokens, int64_t inter,
                                  bf16* __restrict__ out) {
  AllowDependentLaunch();
  const int64_t n = blockIdx.x * static_cast<int64_t>(kSiluRowsCols) + threadIdx.x % kSiluRowsCols;
  const int lane = static_cast<int>(threadIdx.x) / kSiluRowsCols;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kSiluRowsChunk;
  const int rows = static_cast<int>(num_tokens - r0 < kSiluRowsChunk ? num_tokens - r0 : kSiluRowsChunk);
  __shared__ LoraRowsPositions ps[2];  // gate, up
  __shared__ int rpos[kSiluRowsChunk];
  __shared__ uint4 u[kSiluRowsChunk][2][2];  // [row][slice] the row's shrink values, packed
  LoadLoraRowsPositions(v, 0, 0, &ps[0]);
  LoadLoraRowsPositions(v, 1, kLoraRowsPositions, &ps[1]);
  if (threadIdx.x >= 2 * kLoraRowsPositions && threadIdx.x < 2 * kLoraRowsPositions + kSiluRowsChunk) {
    const int r = static_cast<int>(threadIdx.x) - 2 * kLoraRowsPositions;
    rpos[r] = r < rows ? v.row_pos[r0 + r] : -1;
  }
  __syncthreads();
  const bool col = n < inter;
  int cur = rpos[lane];
  uint4 bg[2] = {}, bu[2] = {};
  if (col && cur >= 0) {
    if (ps[0].stride[cur] > 0) LoadLoraRowsBPacked(ps[0].b[cur], ps[0].stride[cur], n, bg);
    if (ps[1].stride[cur] > 0) LoadLoraRowsBPacked(ps[1].b[cur], ps[1].stride[cur], n, bu);
  }
  WaitForPrecedingKernel();
  const bf16* src = static_cast<const bf16*>(v.src);
  float g[kSiluRowsPerThread], up[kSiluRowsPerThread];
#pragma unroll
  for (int k = 0; k < kSiluRowsPerThread; ++k) {
    const int r = lane + k * kSiluRowsLanes;
    const bool ok = col && r < rows;
    g[k] = ok ? ToFloat(src[(r0 + r) * v.stride + n]) : 0.0f;
    up[k] = ok ? ToFloat(src[(r0 + r) * v.stride + inter + n]) : 0.0f;
  }
  if (threadIdx.x < rows * 4) {  // 2 slices x 2 vectors a row
    const int r = static_cast<int>(threadIdx.x) / 4, s = (threadIdx.x / 2) % 2, h = threadIdx.x % 2, q = rpos[r];
    u[r][s][h] = q >= 0 ? reinterpret_cast<const uint4*>(src + (r0 + r) * v.stride + v.u_col +
                                                          (static_cast<int64_t>(q) * 2 + s) * kLoraRowsRank)[h]
                        : make_uint4(0, 0, 0, 0);
  }
  __syncthreads();
  if (!col) return;
#pragma unroll
  for (int k = 0; k < kSiluRowsPerThread; ++k) {
    const int r = lane + k * kSiluRowsLanes;
    if (r >= rows) break;
    const int q = rpos[r];
    float gk = g[k], uk = up[k];
    if (q >= 0) {
      if (q != cur) {
        if (ps[0].stride[q] > 0) LoadLoraRowsBPacked(ps[0].b[q], ps[0].stride[q], n, bg);
        if (ps[1].stride[q] > 0) LoadLoraRowsBPacked(ps[1].b[q], ps[1].stride[q], n, bu);
        cur = q;
      }
      if (ps[0].stride[q] > 0) gk = ToFloat(ToBf16(gk + LoraRowsDotPacked(u[r][0], bg, ps[0].scale[q])));
      if (ps[1].stride[q] > 0) uk = ToFloat(ToBf16(uk + LoraRowsDotPacked(u[r][1], bu, ps[1].scale[q])));
    }
    const int64_t t = r0 + r;
    gate_up[t * 2 * inter + n] = ToBf16(gk);
    gate_up[t * 2 * inter + inter + n] = ToBf16(uk);
    out[t * inter + n] = ToBf16(SiluMul(gk, uk));
  }
}

// Prepared, not yet run (LaunchSiluMulRows `row_threads`): SiLU·up's rows reader laid out as
// RopeAndCacheKvRowsKernel, which costs 1.1-1.4 us over plain RoPE where this kernel's layout
// costs ~5 us over plain SiLU·up. A thread takes one row's columns c and c + 1 of gate and of up
// (bf16 pairs); a block kSiluRowThreadsPairs column pairs of kSiluRowThreadsRows rows, sharing its
// rows of B through the L1. No shared memory and no barrier: the row's position, its weights
// there and its rows of B are read before the wait for the GEMM, its values and shrink values
// right after it, all at once.
constexpr int kSiluRowThreadsPairs = 32;
constexpr int kSiluRowThreadsRows = 8;

__global__ void SiluMulRowThreadsKernel(LoraRowsView v, bf16* __restrict__ gate_up, int64_t num_tokens,
                                        int64_t inter, bf16* __restrict__ out) {
  AllowDependentLaunch();
  const int64_t c = 2 * (blockIdx.x * static_cast<int64_t>(kSiluRowThreadsPairs) + threadIdx.x % kSiluRowThreadsPairs);
  const int64_t t = static_cast<int64_t>(blockIdx.y) * kSiluRowThreadsRows + threadIdx.x / kSiluRowThreadsPairs;
  if (c >= inter || t >= num_tokens) return;
  const int q = v.row_pos[t];
  LoraSliceWeightsDev w[2] = {};
  uint4 b[2][2][2] = {};  // [slice][column c, c + 1][half]
  if (q >= 0 && q < kLoraRowsPositions) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      w[s] = v.info[q * kLoraMaxSlices + s];
      if (w[s].rank <= 0 || w[s].b == nullptr) continue;
      LoadLoraRowsBPacked(static_cast<const bf16*>(w[s].b), w[s].rank, c, b[s][0]);
      LoadLoraRowsBPacked(static_cast<const bf16*>(w[s].b), w[s].rank, c + 1, b[s][1]);
    }
  }
  WaitForPrecedingKernel();
  const bf16* src = static_cast<const bf16*>(v.src) + t * v.stride;
  const __nv_bfloat162 g2 = *reinterpret_cast<const __nv_bfloat162*>(src + c);
  const __nv_bfloat162 u2 = *reinterpret_cast<const __nv_bfloat162*>(src + inter + c);
  float x[2][2] = {{__low2float(g2), __high2float(g2)}, {__low2float(u2), __high2float(u2)}};  // [slice][column]
  if (q >= 0 && q < kLoraRowsPositions) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (w[s].rank <= 0 || w[s].b == nullptr) continue;
      const uint4* up = reinterpret_cast<const uint4*>(src + v.u_col + (static_cast<int64_t>(q) * 2 + s) * kLoraRowsRank);
      const uint4 u[2] = {up[0], up[1]};
#pragma unroll
      for (int k = 0; k < 2; ++k) x[s][k] = ToFloat(ToBf16(x[s][k] + LoraRowsDotPacked(u, b[s][k], w[s].scale)));
    }
  }
  bf16* row = gate_up + t * 2 * inter;
  *reinterpret_cast<__nv_bfloat162*>(row + c) = __floats2bfloat162_rn(x[0][0], x[0][1]);
  *reinterpret_cast<__nv_bfloat162*>(row + inter + c) = __floats2bfloat162_rn(x[1][0], x[1][1]);
  *reinterpret_cast<__nv_bfloat162*>(out + t * inter + c) =
      __floats2bfloat162_rn(SiluMul(x[0][0], x[1][0]), SiluMul(x[0][1], x[1][1]));
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
                              cudaStream_t stream, bool row_threads) {
  if (rows.num_slices != 2 || rows.rows < num_tokens || rows.u_col != 2 * inter || rows.slice_offsets[1] != inter) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0 || inter == 0) return cudaSuccess;
  if (row_threads && inter % 2 == 0 && reinterpret_cast<uintptr_t>(gate_up) % 4 == 0 &&
      reinterpret_cast<uintptr_t>(out) % 4 == 0) {
    const dim3 grid(static_cast<unsigned>((inter / 2 + kSiluRowThreadsPairs - 1) / kSiluRowThreadsPairs),
                    static_cast<unsigned>((num_tokens + kSiluRowThreadsRows - 1) / kSiluRowThreadsRows));
    (void)LaunchDependent(SiluMulRowThreadsKernel, grid, dim3(kSiluRowThreadsPairs * kSiluRowThreadsRows), 0, stream,
                          rows, static_cast<bf16*>(gate_up), num_tokens, inter, static_cast<bf16*>(out));
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>((inter + kSiluRowsCols - 1) / kSiluRowsCols),
                  static_cast<unsigned>((num_tokens + kSiluRowsChunk - 1) / kSiluRowsChunk));
  (void)LaunchDependent(SiluMulRowsKernel, grid, dim3(kSiluRowsCols * kSiluRowsLanes), 0, stream, rows,
                        static_cast<bf16*>(gate_up),
                        num_tokens, inter, static_cast<bf16*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
