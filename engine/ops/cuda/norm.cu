// RMSNorm, with and without the fused residual add. One block per row. A decode step normalises
// one or a few rows, so the kernel is latency-bound: every thread issues all of its loads (16-byte
// vectors) before its first store and keeps the row in registers, which costs one memory round
// trip per pass instead of one per loop iteration (stores through pointers that may alias the
// inputs otherwise serialise each iteration's loads behind the previous iteration's stores).
#include "engine/ops/cuda/norm.h"

#include <cooperative_groups.h>

#include "engine/ops/cuda/lora_delta.cuh"
#include "engine/ops/cuda/lora_rows.cuh"

namespace loraplex::ops::cuda {
namespace {

namespace cg = cooperative_groups;

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

// AddRmsNorm reading x from LoRA rows (lora_rows.h; a one-slice module: o or down). A row tile
// of kNormRowsTile rows is spread over a cluster of kNormRowsCluster blocks, each taking
// hidden / kNormRowsCluster columns, a warp kNormRowsWarpCols of them. The LoRA is summed on the
// tensor cores transposed, deltaᵀ = B·uᵀ (mma.sync m16n8k16: the adapter's B rows are the 16 rows
// of A, the tile's 8 rows the 8 columns), for each adapter position among the tile's rows with the
// shrink values of rows at other positions zeroed. MMA tile j's row m is column
// 8·(m % 8) + 2j + m / 8 of the warp's 64, so a thread's results are 8 adjacent columns of 2 rows
// (2q and 2q + 1 of the tile), and it loads the 8 B rows of exactly those columns. Then
// x = bf16(y + bf16(scale·sum)) (written back), residual = bf16(residual + x), and the row's sum
// of squares over warps, the block and the cluster (distributed shared memory) normalises it.
// The positions, slot table, B of the first two positions and the norm weight are read before
// the wait for the GEMM.
constexpr int kNormRowsTile = 8;        // rows a tile: the MMA's n
constexpr int kNormRowsCluster = 8;     // blocks a tile (the portable cluster size)
constexpr int kNormRowsWarpCols = 64;   // a warp's columns: 4 MMA tiles of 16
constexpr int kNormRowsMaxWarps = 16;   // a block's warps at most (hidden 8192)

// This thread's A operands of the 4 MMA tiles for one position: words q and q + 4 (ranks 2q..2q+1
// and 2q+8..2q+9) of B's rows col .. col + 7, zero past the rank.
__device__ __forceinline__ void LoadNormRowsB(const LoraSliceWeightsDev& w, int64_t col, int q, uint32_t (&out)[8][2]) {
  const bf16* b = static_cast<const bf16*>(w.b);
  if (w.rank <= 0 || b == nullptr) {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e][0] = out[e][1] = 0u;
    return;
  }
  if (w.rank == kLoraRowsRank && (reinterpret_cast<uintptr_t>(b) & 3u) == 0) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const unsigned* row = reinterpret_cast<const unsigned*>(b + (col + e) * kLoraRowsRank);
      out[e][0] = __ldg(row + q);
      out[e][1] = __ldg(row + q + 4);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const bf16* row = b + (col + e) * w.rank;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = 2 * q + 8 * h;
      const bf16 lo = k < w.rank ? row[k] : ToBf16(0.0f), hi = k + 1 < w.rank ? row[k + 1] : ToBf16(0.0f);
      out[e][h] = static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
    }
  }
}

// Adds position p's LoRA to x ([row 2q / 2q + 1][column]) for the rows there.
__device__ __forceinline__ void AddNormRowsPosition(int p, const int (&pos)[2], int pos_g, const uint32_t (&u)[2],
                                                    const LoraSliceWeightsDev& w, const uint32_t (&b)[8][2],
                                                    float (&x)[2][8]) {
  if (w.rank <= 0 || w.b == nullptr) return;
  const uint32_t b0 = pos_g == p ? u[0] : 0u, b1 = pos_g == p ? u[1] : 0u;  // uᵀ: row g of the tile
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t a[4] = {b[2 * j][0], b[2 * j + 1][0], b[2 * j][1], b[2 * j + 1][1]};
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    MmaBf16(acc, a, b0, b1);
    // acc: (column 2j, row 2q), (2j, 2q + 1), (2j + 1, 2q), (2j + 1, 2q + 1) of this thread's.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e % 2, m = 2 * j + e / 2;
      if (pos[h] == p) x[h][m] = ToFloat(ToBf16(x[h][m] + ToFloat(ToBf16(w.scale * acc[e]))));
    }
  }
}

__global__ void __launch_bounds__(kNormRowsMaxWarps * 32)
    AddRmsNormRowsKernel(LoraRowsView v, bf16* x, bf16* residual, const bf16* __restrict__ weight,
                         int64_t num_tokens, int64_t hidden, float eps, bf16* out) {
  AllowDependentLaunch();
  __shared__ float warp_sums[kNormRowsMaxWarps][kNormRowsTile];
  __shared__ float block_sums[kNormRowsTile];
  __shared__ float totals[kNormRowsTile];
  cg::cluster_group cluster = cg::this_cluster();
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, q = lane % 4, warps = static_cast<int>(blockDim.x) / 32;
  const int64_t col = (static_cast<int64_t>(cluster.block_rank()) * warps + warp) * kNormRowsWarpCols + 8 * g;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kNormRowsTile;
  const int64_t rows[2] = {r0 + 2 * q, r0 + 2 * q + 1};
  const int64_t row_g = r0 + g;
  int pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) pos[h] = rows[h] < num_tokens ? v.row_pos[rows[h]] : -1;
  int pos_g = row_g < num_tokens ? v.row_pos[row_g] : -1;
  LoraSliceWeightsDev info[kLoraRowsPositions];
  LoadLoraRowsWeights(v, 0, info);
  const uint4 wv = *reinterpret_cast<const uint4*>(weight + col);
  if (pos_g < 0 || pos_g >= kLoraRowsPositions) pos_g = -1;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (pos[h] < 0 || pos[h] >= kLoraRowsPositions) pos[h] = -1;
  }
  unsigned present = __reduce_or_sync(0xffffffffu, pos_g >= 0 ? 1u << pos_g : 0u);
  const int p0 = present != 0 ? __ffs(present) - 1 : -1;
  const unsigned rest = p0 >= 0 ? present & ~(1u << p0) : 0u;
  const int p1 = rest != 0 ? __ffs(rest) - 1 : -1;
  LoraSliceWeightsDev w0 = {}, w1 = {};
  uint32_t b0[8][2], b1[8][2];
  if (p0 >= 0) {
    w0 = LoraRowsWeightsAt(info, p0);
    LoadNormRowsB(w0, col, q, b0);
  }
  if (p1 >= 0) {
    w1 = LoraRowsWeightsAt(info, p1);
    LoadNormRowsB(w1, col, q, b1);
  }
  WaitForPrecedingKernel();
  const bf16* src = static_cast<const bf16*>(v.src);
  uint4 yv[2], rv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool ok = rows[h] < num_tokens;
    yv[h] = ok ? *reinterpret_cast<const uint4*>(src + rows[h] * v.stride + col) : make_uint4(0, 0, 0, 0);
    rv[h] = ok ? *reinterpret_cast<const uint4*>(residual + rows[h] * hidden + col) : make_uint4(0, 0, 0, 0);
  }
  uint32_t u[2] = {0u, 0u};  // row g's shrink values at its position: ranks 2q..2q+1, 2q+8..2q+9
  if (pos_g >= 0) {
    const uint32_t* up = reinterpret_cast<const uint32_t*>(src + row_g * v.stride + v.u_col +
                                                           static_cast<int64_t>(pos_g) * kLoraRowsRank);
    u[0] = up[q];
    u[1] = up[q + 4];
  }
  float xs[2][8];
#pragma unroll
  for (int h = 0; h < 2; ++h) Unpack8(yv[h], xs[h]);
  if (p0 >= 0) AddNormRowsPosition(p0, pos, pos_g, u, w0, b0, xs);
  if (p1 >= 0) AddNormRowsPosition(p1, pos, pos_g, u, w1, b1, xs);
  present = p1 >= 0 ? rest & ~(1u << p1) : 0u;
  while (present != 0) {  // rows of 3 or more adapters in one tile: their B now
    const int p = __ffs(present) - 1;
    present &= present - 1;
    w0 = LoraRowsWeightsAt(info, p);
    LoadNormRowsB(w0, col, q, b0);
    AddNormRowsPosition(p, pos, pos_g, u, w0, b0, xs);
  }
  // residual + x, rounded, and its squares summed: this thread's 8 columns, then the 8 threads of
  // each row (lanes q + 4g), the warps, the blocks of the cluster.
  float rs[2][8], sq[2] = {0.0f, 0.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float r[8];
    Unpack8(rv[h], r);
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      rs[h][m] = ToFloat(ToBf16(r[m] + xs[h][m]));
      sq[h] += rs[h][m] * rs[h][m];
    }
#pragma unroll
    for (int off = 4; off < 32; off *= 2) sq[h] += __shfl_xor_sync(0xffffffffu, sq[h], off);
  }
  if (g == 0) {
    warp_sums[warp][2 * q] = sq[0];
    warp_sums[warp][2 * q + 1] = sq[1];
  }
  __syncthreads();
  if (threadIdx.x < kNormRowsTile) {
    float t = 0.0f;
    for (int w = 0; w < warps; ++w) t += warp_sums[w][threadIdx.x];
    block_sums[threadIdx.x] = t;
  }
  cluster.sync();  // every block's sums written
  if (threadIdx.x < kNormRowsTile) {
    float t = 0.0f;
    for (int b = 0; b < static_cast<int>(cluster.num_blocks()); ++b) t += cluster.map_shared_rank(block_sums, b)[threadIdx.x];
    totals[threadIdx.x] = t;
  }
  cluster.sync();  // every remote read done (no block leaves early); totals visible in the block
  float wf[8];
  Unpack8(wv, wf);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (rows[h] >= num_tokens) continue;
    const float inv = rsqrtf(totals[2 * q + h] / static_cast<float>(hidden) + eps);
    float o[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) o[m] = rs[h][m] * inv * wf[m];
    *reinterpret_cast<uint4*>(x + rows[h] * hidden + col) = Pack8(xs[h]);
    *reinterpret_cast<uint4*>(residual + rows[h] * hidden + col) = Pack8(rs[h]);
    *reinterpret_cast<uint4*>(out + rows[h] * hidden + col) = Pack8(o);
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

cudaError_t LaunchAddRmsNormRows(const LoraRowsView& rows, void* x, void* residual, const void* weight,
                                 int64_t num_tokens, int64_t hidden, float eps, void* out, cudaStream_t stream) {
  if (rows.num_slices != 1 || rows.rows < num_tokens || rows.u_col != hidden ||
      hidden % (kNormRowsCluster * kNormRowsWarpCols) != 0 ||
      hidden / (kNormRowsCluster * kNormRowsWarpCols) > kNormRowsMaxWarps || !IsAligned16(rows.src) ||
      rows.stride % 8 != 0 || !IsAligned16(x) || !IsAligned16(residual) || !IsAligned16(weight) || !IsAligned16(out)) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  const int warps = static_cast<int>(hidden / (kNormRowsCluster * kNormRowsWarpCols));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(kNormRowsCluster, static_cast<unsigned>((num_tokens + kNormRowsTile - 1) / kNormRowsTile));
  config.blockDim = dim3(static_cast<unsigned>(warps * 32));
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  attribute[1].id = cudaLaunchAttributeClusterDimension;
  attribute[1].val.clusterDim.x = kNormRowsCluster;
  attribute[1].val.clusterDim.y = 1;
  attribute[1].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 2;
  return cudaLaunchKernelEx(&config, AddRmsNormRowsKernel, static_cast<const LoraRowsView&>(rows), static_cast<bf16*>(x),
                            static_cast<bf16*>(residual), static_cast<const bf16*>(weight), num_tokens, hidden, eps,
                            static_cast<bf16*>(out));
}

}  // namespace loraplex::ops::cuda
