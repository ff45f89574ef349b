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


// SiLU·up reading gate_up from LoRA rows (lora_rows.h), the LoRA summed on the tensor cores. A
// warp takes 16 rows and kSiluMmaCols columns of gate and of up; for each adapter position among
// its rows it multiplies the rows' shrink values [16 rows, 16 ranks] (rows at other positions
// zeroed) by B's rows of its columns with mma.sync m16n8k16 (bf16 in, fp32 sums), then rounds
// scale·sum to bf16 as LoraRowsDelta does. The MMA's 8 columns of tile j, index i, are column
// (i/2)·8 + 2j + i%2 of the warp's 32, so a thread's results are 8 adjacent columns of 2 rows,
// loaded and stored as 16-byte vectors. Every element of gate_up is written too.
constexpr int kSiluMmaCols = 32;  // a warp's columns: 4 MMA tiles of 8
constexpr int kSiluMmaWarps = 4;  // a block's warps, side by side along the columns

// This thread's B operands of the 4 MMA tiles of one slice: for tile j, B[n, 2q..2q+1] and
// B[n, 2q+8..2q+9] as bf16 pairs, n = bcol + 2j; zero past the rank (`stride` columns a row) and
// for n >= `width`.
__device__ __forceinline__ void LoadSiluMmaSlice(const bf16* b, int stride, int64_t bcol, int64_t width, int q,
                                                 uint32_t (&out)[4][2]) {
  if (stride == kLoraRowsRank && (reinterpret_cast<uintptr_t>(b) & 3u) == 0) {  // every row 4-byte aligned
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = bcol + 2 * j;
      const unsigned* row = reinterpret_cast<const unsigned*>(b + (n < width ? n : 0) * kLoraRowsRank);
      out[j][0] = n < width ? __ldg(row + q) : 0u;
      out[j][1] = n < width ? __ldg(row + q + 4) : 0u;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = bcol + 2 * j;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = 2 * q + 8 * h;
      const bf16* row = b + n * stride;
      const bf16 lo = n < width && k < stride ? row[k] : ToBf16(0.0f);
      const bf16 hi = n < width && k + 1 < stride ? row[k + 1] : ToBf16(0.0f);
      out[j][h] = static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
    }
  }
}

// The B operands of one position, both slices, 4 MMA tiles.
struct SiluMmaB {
  uint32_t w[2][4][2];  // [slice][tile][word]
};

__device__ __forceinline__ void LoadSiluMmaPosition(const LoraSliceWeightsDev (&w)[2], int64_t bcol, int64_t inter,
                                                    int q, SiluMmaB* out) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (w[s].rank > 0 && w[s].b != nullptr) {
      LoadSiluMmaSlice(static_cast<const bf16*>(w[s].b), w[s].rank, bcol, inter, q, out->w[s]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) out->w[s][j][0] = out->w[s][j][1] = 0u;
    }
  }
}

// Adds position p's LoRA to x ([slice][row half][column]) for the rows there: for each slice, the
// rows' shrink values (zero for rows at other positions) times B on the tensor cores.
__device__ __forceinline__ void AddSiluMmaPosition(int p, const int (&pos)[2], const uint32_t (&u)[2][2][2],
                                                   const LoraSliceWeightsDev (&w)[2], const SiluMmaB& b,
                                                   float (&x)[2][2][8]) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (w[s].rank <= 0 || w[s].b == nullptr) continue;
    const uint32_t a[4] = {pos[0] == p ? u[0][s][0] : 0u, pos[1] == p ? u[1][s][0] : 0u,
                           pos[0] == p ? u[0][s][1] : 0u, pos[1] == p ? u[1][s][1] : 0u};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      MmaBf16(acc, a, b.w[s][j][0], b.w[s][j][1]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2, m = 2 * j + e % 2;
        if (pos[h] == p) x[s][h][m] = ToFloat(ToBf16(x[s][h][m] + ToFloat(ToBf16(w[s].scale * acc[e]))));
      }
    }
  }
}

// The chain of dependent loads is kept short, as the block often starts only when the GEMM ends:
// the rows' positions and the slot table at every position together; then B for the first two
// positions present; after the wait, the rows' values and their shrink values (at their own
// positions) together.
__global__ void __launch_bounds__(kSiluMmaWarps * 32) SiluMulRowsMmaKernel(LoraRowsView v, bf16* __restrict__ gate_up,
                                                                         int64_t num_tokens, int64_t inter,
                                                                         bf16* __restrict__ out) {
  AllowDependentLaunch();
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, q = lane % 4;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kSiluMmaWarps + threadIdx.x / 32) * kSiluMmaCols;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 16;
  if (c0 >= inter) return;  // whole warps
  const int64_t rows[2] = {r0 + g, r0 + g + 8};
  int pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) pos[h] = rows[h] < num_tokens ? v.row_pos[rows[h]] : -1;
  LoraSliceWeightsDev info[kLoraRowsPositions][2];
#pragma unroll
  for (int p = 0; p < kLoraRowsPositions; ++p) {
#pragma unroll
    for (int s = 0; s < 2; ++s) info[p][s] = v.info[p * kLoraMaxSlices + s];
  }
  unsigned mine = 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (pos[h] < 0 || pos[h] >= kLoraRowsPositions) pos[h] = -1;
    if (pos[h] >= 0) mine |= 1u << pos[h];
  }
  unsigned present = __reduce_or_sync(0xffffffffu, mine);
  auto weights_at = [&](int p, LoraSliceWeightsDev (&w)[2]) {
#pragma unroll
    for (int pp = 0; pp < kLoraRowsPositions; ++pp) {
      if (pp == p) {
        w[0] = info[pp][0];
        w[1] = info[pp][1];
      }
    }
  };
  const int64_t bcol = c0 + (g / 2) * 8 + (g % 2);  // B's rows this thread loads: tile j's column g
  const int p0 = present != 0 ? __ffs(present) - 1 : -1;
  const unsigned rest = p0 >= 0 ? present & ~(1u << p0) : 0u;
  const int p1 = rest != 0 ? __ffs(rest) - 1 : -1;
  LoraSliceWeightsDev w0[2] = {}, w1[2] = {};
  SiluMmaB b0, b1;
  if (p0 >= 0) {
    weights_at(p0, w0);
    LoadSiluMmaPosition(w0, bcol, inter, q, &b0);
  }
  if (p1 >= 0) {
    weights_at(p1, w1);
    LoadSiluMmaPosition(w1, bcol, inter, q, &b1);
  }
  WaitForPrecedingKernel();
  const bf16* src = static_cast<const bf16*>(v.src);
  const int64_t col = c0 + 8 * q;  // this thread's 8 columns
  const bool cols_ok = col < inter;
  uint4 raw[2][2];          // [slice][row half]
  uint32_t u[2][2][2] = {};  // [row half][slice][word]: shrink values k = 2q, 2q + 1 and 2q + 8, 2q + 9
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool row_ok = rows[h] < num_tokens;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      raw[s][h] = cols_ok && row_ok ? *reinterpret_cast<const uint4*>(src + rows[h] * v.stride + s * inter + col)
                                    : make_uint4(0, 0, 0, 0);
      if (pos[h] >= 0) {
        const uint32_t* up = reinterpret_cast<const uint32_t*>(
            src + rows[h] * v.stride + v.u_col + (static_cast<int64_t>(pos[h]) * 2 + s) * kLoraRowsRank);
        u[h][s][0] = up[q];
        u[h][s][1] = up[q + 4];
      }
    }
  }
  float x[2][2][8];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
#pragma unroll
    for (int h = 0; h < 2; ++h) Unpack8(raw[s][h], x[s][h]);
  }
  if (p0 >= 0) AddSiluMmaPosition(p0, pos, u, w0, b0, x);
  if (p1 >= 0) AddSiluMmaPosition(p1, pos, u, w1, b1, x);
  // Positions past the first two (rows of 3 or 4 adapters in one 16-row tile): B now.
  present = p1 >= 0 ? rest & ~(1u << p1) : 0u;
  while (present != 0) {
    const int p = __ffs(present) - 1;
    present &= present - 1;
    weights_at(p, w0);
    LoadSiluMmaPosition(w0, bcol, inter, q, &b0);
    AddSiluMmaPosition(p, pos, u, w0, b0, x);
  }
  if (!cols_ok) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (rows[h] >= num_tokens) continue;
    float o[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) o[m] = SiluMul(x[0][h][m], x[1][h][m]);
    bf16* row = gate_up + rows[h] * 2 * inter;
    *reinterpret_cast<uint4*>(row + col) = Pack8(x[0][h]);
    *reinterpret_cast<uint4*>(row + inter + col) = Pack8(x[1][h]);
    *reinterpret_cast<uint4*>(out + rows[h] * inter + col) = Pack8(o);
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
  if (rows.num_slices != 2 || rows.rows < num_tokens || rows.u_col != 2 * inter || rows.slice_offsets[1] != inter) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0 || inter == 0) return cudaSuccess;
  // 16-byte vectors of 8 columns: every row of the view, gate_up and out start 16-byte aligned.
  const bool aligned = IsAligned16(rows.src) && rows.stride % 8 == 0 && IsAligned16(gate_up) && IsAligned16(out);
  if (inter % 8 != 0 || !aligned) return cudaErrorInvalidValue;
  const int64_t warps = (inter + kSiluMmaCols - 1) / kSiluMmaCols;
  const dim3 grid(static_cast<unsigned>((warps + kSiluMmaWarps - 1) / kSiluMmaWarps),
                  static_cast<unsigned>((num_tokens + 15) / 16));
  (void)LaunchDependent(SiluMulRowsMmaKernel, grid, dim3(kSiluMmaWarps * 32), 0, stream, rows,
                        static_cast<bf16*>(gate_up), num_tokens, inter, static_cast<bf16*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
