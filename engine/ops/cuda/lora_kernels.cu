// LoRA shrink and expand over adapter segments (tokens sorted by adapter slot). Each segment's
// A and B are read once per step however many tokens it holds; work is proportional to each
// slot's real rank (rank-0 slices exit at once).
#include "engine/ops/cuda/lora_kernels.h"

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kShrinkWarps = 8;
constexpr int kShrinkChunk = kWarpSize * 8;   // K elements per block: one 16-byte vector a lane
constexpr int kShrinkRowsPerWarp = 8;         // A rows a warp keeps in registers per pass
constexpr int kExpandTile = 128;              // output columns per block, one per thread

// Resolves a segment to its token range and the slice weights it uses; false when there is
// nothing to do (segment past the live count, no adapter, rank 0).
__device__ __forceinline__ bool ResolveSegment(const LoraParams& p, int seg, int slice, int* begin,
                                               int* end, LoraSliceWeightsDev* w) {
  if (seg >= *p.num_segments) return false;
  const int slot = p.seg_slots[seg];
  if (slot < 0 || slot >= p.num_slots) return false;
  *w = p.table[static_cast<int64_t>(slot) * p.num_slices + slice];
  w->rank = min(w->rank, p.max_rank);  // a larger rank would spill into the next slice
  if (w->rank <= 0) return false;
  *begin = max(p.seg_starts[seg], 0);
  *end = min(p.seg_starts[seg + 1], p.num_tokens);
  return *begin < *end;
}

// grid (max_segments, num_slices): zero the columns the shrink accumulates into.
__global__ void LoraShrinkZeroKernel(LoraParams p, float* __restrict__ y) {
  int begin, end;
  LoraSliceWeightsDev w;
  if (!ResolveSegment(p, blockIdx.x, blockIdx.y, &begin, &end, &w)) return;
  const int64_t y_row = static_cast<int64_t>(p.num_slices) * p.max_rank;
  const int count = (end - begin) * w.rank;
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    const int i = e / w.rank;
    const int j = e - i * w.rank;
    y[p.token_rows[begin + i] * y_row + blockIdx.y * p.max_rank + j] = 0.0f;
  }
}

// grid (K chunks, num_slices, max_segments). A warp holds up to 8 rows of A's K chunk in
// registers and streams the segment's tokens past them.
__global__ void __launch_bounds__(kShrinkWarps * kWarpSize)
    LoraShrinkKernel(LoraParams p, const bf16* __restrict__ x, float* __restrict__ y) {
  int begin, end;
  LoraSliceWeightsDev w;
  if (!ResolveSegment(p, blockIdx.z, blockIdx.y, &begin, &end, &w)) return;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int k = blockIdx.x * kShrinkChunk + lane * 8;
  const bool k_valid = k < p.in_features;
  const int64_t y_row = static_cast<int64_t>(p.num_slices) * p.max_rank;
  const int y_col = blockIdx.y * p.max_rank;
  const bf16* a = static_cast<const bf16*>(w.a);

  for (int j0 = warp; j0 < w.rank; j0 += kShrinkWarps * kShrinkRowsPerWarp) {
    float af[kShrinkRowsPerWarp][8];
#pragma unroll
    for (int r = 0; r < kShrinkRowsPerWarp; ++r) {
      const int j = j0 + r * kShrinkWarps;
      if (k_valid && j < w.rank) {
        Unpack8(*reinterpret_cast<const uint4*>(a + static_cast<int64_t>(j) * p.in_features + k), af[r]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) af[r][i] = 0.0f;
      }
    }
    for (int idx = begin; idx < end; ++idx) {
      const int64_t row = p.token_rows[idx];
      float xf[8];
      if (k_valid) {
        Unpack8(*reinterpret_cast<const uint4*>(x + row * p.in_features + k), xf);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xf[i] = 0.0f;
      }
#pragma unroll
      for (int r = 0; r < kShrinkRowsPerWarp; ++r) {
        const int j = j0 + r * kShrinkWarps;
        if (j >= w.rank) break;  // j is the same in every lane
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) s += xf[i] * af[r][i];
        s = WarpSum(s);
        if (lane == 0) atomicAdd(y + row * y_row + y_col + j, s);
      }
    }
  }
}

// grid (N tiles of the widest slice, num_slices, max_segments). B's [tile, rank] block is kept
// transposed in shared memory; each token's y values are broadcast from shared memory.
__global__ void __launch_bounds__(kExpandTile)
    LoraExpandKernel(LoraParams p, const float* __restrict__ y, bf16* __restrict__ out) {
  __shared__ bf16 b_t[kLoraMaxRank][kExpandTile + 2];  // +2: rows in different banks
  __shared__ float y_s[kLoraMaxRank];
  const int slice = blockIdx.y;
  const int width = p.slice_offsets[slice + 1] - p.slice_offsets[slice];
  const int n0 = blockIdx.x * kExpandTile;
  if (n0 >= width) return;
  int begin, end;
  LoraSliceWeightsDev w;
  if (!ResolveSegment(p, blockIdx.z, slice, &begin, &end, &w)) return;
  const int r = w.rank;
  const int tile = min(kExpandTile, width - n0);
  const bf16* b = static_cast<const bf16*>(w.b) + static_cast<int64_t>(n0) * r;
  for (int e = threadIdx.x; e < tile * r; e += blockDim.x) {
    const int n = e / r;
    b_t[e - n * r][n] = b[e];  // contiguous global reads; rows n0.. of B are contiguous
  }
  const int64_t y_row = static_cast<int64_t>(p.num_slices) * p.max_rank;
  const int64_t out_row = p.slice_offsets[p.num_slices];
  const int n = threadIdx.x;
  const int col = p.slice_offsets[slice] + n0 + n;
  for (int idx = begin; idx < end; ++idx) {
    const int64_t row = p.token_rows[idx];
    __syncthreads();  // b_t is complete / the previous token's y_s is no longer read
    for (int j = threadIdx.x; j < r; j += blockDim.x) y_s[j] = y[row * y_row + slice * p.max_rank + j];
    __syncthreads();
    if (n < tile) {
      float s = 0.0f;
      for (int j = 0; j < r; ++j) s += y_s[j] * ToFloat(b_t[j][n]);
      bf16* o = out + row * out_row + col;
      *o = ToBf16(ToFloat(*o) + w.scale * s);
    }
  }
}

}  // namespace

cudaError_t LaunchLoraShrink(const LoraParams& p, const void* x, float* y, cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0) return cudaSuccess;
  LoraShrinkZeroKernel<<<dim3(p.max_segments, p.num_slices), 256, 0, stream>>>(p, y);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned k_chunks = (p.in_features + kShrinkChunk - 1) / kShrinkChunk;
  LoraShrinkKernel<<<dim3(k_chunks, p.num_slices, p.max_segments), kShrinkWarps * kWarpSize, 0,
                     stream>>>(p, static_cast<const bf16*>(x), y);
  return cudaGetLastError();
}

cudaError_t LaunchLoraExpand(const LoraParams& p, const float* y, void* out, cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0) return cudaSuccess;
  int max_width = 0;
  for (int s = 0; s < p.num_slices; ++s) {
    max_width = max(max_width, p.slice_offsets[s + 1] - p.slice_offsets[s]);
  }
  if (max_width <= 0) return cudaSuccess;
  const unsigned tiles = (max_width + kExpandTile - 1) / kExpandTile;
  LoraExpandKernel<<<dim3(tiles, p.num_slices, p.max_segments), kExpandTile, 0, stream>>>(
      p, y, static_cast<bf16*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
