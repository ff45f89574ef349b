// Tensor-core LoRA for long segments (prefill). See lora_prefill.h.
//
// Work items: a segment's tokens (in the sorted order) are cut into tiles of 64. Tiles are
// numbered without a prefix pass: segment s owns virtual tiles from Base(s) = seg_starts[s]/64 + s
// on, which leaves room for its ceil(len/64) tiles (Base grows by at least that much per segment),
// so an item finds its segment by a binary search over seg_starts and the spare virtual tiles
// exit at once. Shrink item = (tile, slice, 64-wide block of rank rows): a K loop over 64-element
// steps, X rows and A rows double-buffered in shared memory with cp.async, 4 warps of bf16 wmma
// (16 token rows each). Expand item = (tile, 128 output columns of one slice): y rounded to bf16
// and B staged in shared memory, rank in chunks of 64, 4 warps of wmma (32 x 64 each), then an
// epilogue that adds scale·delta into out with one bf16 rounding. No atomics: every output
// element belongs to one item, so results are deterministic.
#include <mma.h>

#include <algorithm>

#include "engine/ops/cuda/kernel_utils.cuh"
#include "engine/ops/cuda/lora_prefill.h"

namespace loraplex::ops::cuda {
namespace {

using namespace nvcuda;

constexpr int kTile = 64;        // tokens per item
constexpr int kThreads = 128;    // 4 warps
constexpr int kKStep = 64;       // shrink: K elements per stage
constexpr int kLd = kKStep + 8;  // bf16 row stride of staged tiles (144 bytes: 16-byte aligned, staggered banks)
constexpr int kRankBlock = 64;   // shrink: rank rows per item; expand: rank per pass
constexpr int kExpandCols = 128;
constexpr int kLdC = kExpandCols + 4;  // F32 row stride of the expand's result tile
constexpr int kLdCs = kRankBlock + 4;  // F32 row stride of the shrink's result tile

__device__ __forceinline__ int Base(const int32_t* seg_starts, int s) { return max(seg_starts[s], 0) / kTile + s; }

// The live segment count and the virtual tiles that cover every segment's tokens.
__device__ __forceinline__ int LiveSegments(const LoraParams& p) {
  return min(max(*p.num_segments, 0), p.max_segments);
}
__device__ __forceinline__ int VirtualTiles(const LoraParams& p, int nseg) { return p.num_tokens / kTile + nseg + 1; }

// Segment s and sorted positions [begin, end) of virtual tile v; false for a spare tile. Same
// answer in every thread.
__device__ __forceinline__ bool LocateTile(const LoraParams& p, int nseg, int v, int* seg, int* begin, int* end) {
  if (nseg <= 0 || Base(p.seg_starts, 0) > v) return false;
  int lo = 0, hi = nseg - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (Base(p.seg_starts, mid) <= v) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int start = max(p.seg_starts[lo], 0);
  const int stop = min(p.seg_starts[lo + 1], p.num_tokens);
  *seg = lo;
  *begin = start + (v - Base(p.seg_starts, lo)) * kTile;
  *end = min(*begin + kTile, stop);
  return *begin < *end;
}

// The slice weights of segment `seg`; false when its slot does not adapt the slice.
__device__ __forceinline__ bool SliceOf(const LoraParams& p, int seg, int slice, LoraSliceWeightsDev* w) {
  const int slot = p.seg_slots[seg];
  if (slot < 0 || slot >= p.num_slots) return false;
  *w = p.table[static_cast<int64_t>(slot) * p.num_slices + slice];
  w->rank = min(w->rank, p.max_rank);
  return w->rank > 0;
}

// Shrink item = (tile, slice, rank block, K split); with splits > 1 the split's sums go to
// partials[split] and LoraShrinkTcReduceKernel adds them up.
__global__ void __launch_bounds__(kThreads) LoraShrinkTcKernel(LoraParams p, const bf16* __restrict__ x,
                                                                float* __restrict__ y, int splits, int steps_per_split) {
  // Two stages of [64 tokens][64 k] X and [64 rank rows][64 k] A; the result tile reuses them.
  __shared__ __align__(128) bf16 stage[2][2][kTile][kLd];
  const int nseg = LiveSegments(p);
  if (nseg == 0) return;
  const int S = p.num_slices;
  const int rank_blocks = (p.max_rank + kRankBlock - 1) / kRankBlock;
  const int64_t items = static_cast<int64_t>(VirtualTiles(p, nseg)) * S * rank_blocks * splits;
  const int K = p.in_features;
  const int nk_total = (K + kKStep - 1) / kKStep;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t y_row = static_cast<int64_t>(S) * p.max_rank;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    int64_t rest = item;
    const int split = static_cast<int>(rest % splits);
    rest /= splits;
    const int rb = static_cast<int>(rest % rank_blocks);
    rest /= rank_blocks;
    const int slice = static_cast<int>(rest % S);
    const int v = static_cast<int>(rest / S);
    const int kt0 = split * steps_per_split;
    const int nk = min(steps_per_split, nk_total - kt0);
    if (nk <= 0) continue;
    float* dst = splits > 1 ? p.partials + static_cast<int64_t>(split) * p.num_tokens * y_row : y;
    int seg, begin, end;
    if (!LocateTile(p, nseg, v, &seg, &begin, &end)) continue;
    LoraSliceWeightsDev w;
    if (!SliceOf(p, seg, slice, &w) || rb * kRankBlock >= w.rank) continue;
    const int rows = end - begin;
    const int r0 = rb * kRankBlock;
    const int rrows = min(kRankBlock, w.rank - r0);
    const bf16* a = static_cast<const bf16*>(w.a);
    const bool a_vec = IsAligned16(a);

    // Each thread copies 4 of the 512 16-byte vectors of each tile per stage.
    auto load_stage = [&](int buf, int kt) {
      const int k0 = (kt0 + kt) * kKStep;
      for (int e = threadIdx.x; e < kTile * (kKStep / 8); e += kThreads) {
        const int r = e / (kKStep / 8);
        const int c = (e % (kKStep / 8)) * 8;
        bf16* xs = &stage[buf][0][r][c];
        if (r < rows && k0 + c < K) {
          CpAsync16(xs, x + static_cast<int64_t>(p.token_rows[begin + r]) * K + k0 + c);
        } else {
          *reinterpret_cast<uint4*>(xs) = make_uint4(0, 0, 0, 0);
        }
        bf16* as = &stage[buf][1][r][c];
        if (r < rrows && k0 + c < K) {
          const bf16* src = a + static_cast<int64_t>(r0 + r) * K + k0 + c;
          if (a_vec) {
            CpAsync16(as, src);
          } else {
            for (int i = 0; i < 8; ++i) as[i] = src[i];
          }
        } else {
          *reinterpret_cast<uint4*>(as) = make_uint4(0, 0, 0, 0);
        }
      }
      CpAsyncCommit();
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRankBlock / 16];
#pragma unroll
    for (int n = 0; n < kRankBlock / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
    const int nfrag = (rrows + 15) / 16;  // rank columns past rrows are zero: skip their products

    __syncthreads();  // the previous item's result tile (in `stage`) has been read
    load_stage(0, 0);
    for (int kt = 0; kt < nk; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < nk) {
        load_stage(buf ^ 1, kt + 1);
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      __syncthreads();
      if (warp * 16 < rows) {
#pragma unroll
        for (int kk = 0; kk < kKStep / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, &stage[buf][0][warp * 16][kk * 16], kLd);
#pragma unroll
          for (int n = 0; n < kRankBlock / 16; ++n) {
            if (n >= nfrag) break;
            // B = Aᵀ: A's rows (rank) are B's columns, k contiguous: column-major with stride kLd.
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, &stage[buf][1][n * 16][kk * 16], kLd);
            wmma::mma_sync(acc[n], fa, fb, acc[n]);
          }
        }
      }
      __syncthreads();  // this buffer is refilled two steps on
    }

    float* cs = reinterpret_cast<float*>(&stage[0][0][0][0]);  // [kTile][kLdCs]
    if (warp * 16 < rows) {
#pragma unroll
      for (int n = 0; n < kRankBlock / 16; ++n) {
        if (n < nfrag) wmma::store_matrix_sync(cs + warp * 16 * kLdCs + n * 16, acc[n], kLdCs, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * rrows; e += kThreads) {
      const int i = e / rrows, j = e % rrows;
      dst[static_cast<int64_t>(p.token_rows[begin + i]) * y_row + slice * p.max_rank + r0 + j] = cs[i * kLdCs + j];
    }
  }
}

// y = Σ_split partials[split] over the (row, column) pairs the shrink wrote, in split order.
__global__ void __launch_bounds__(kThreads) LoraShrinkTcReduceKernel(LoraParams p, float* __restrict__ y,
                                                                      int splits) {
  const int nseg = LiveSegments(p);
  if (nseg == 0) return;
  const int S = p.num_slices;
  const int64_t items = static_cast<int64_t>(VirtualTiles(p, nseg)) * S;
  const int64_t y_row = static_cast<int64_t>(S) * p.max_rank;
  const int64_t stride = static_cast<int64_t>(p.num_tokens) * y_row;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int slice = static_cast<int>(item % S);
    const int v = static_cast<int>(item / S);
    int seg, begin, end;
    if (!LocateTile(p, nseg, v, &seg, &begin, &end)) continue;
    LoraSliceWeightsDev w;
    if (!SliceOf(p, seg, slice, &w)) continue;
    const int rows = end - begin;
    for (int e = threadIdx.x; e < rows * w.rank; e += kThreads) {
      const int i = e / w.rank, j = e % w.rank;
      const int64_t at = static_cast<int64_t>(p.token_rows[begin + i]) * y_row + slice * p.max_rank + j;
      float sum = 0.0f;
      for (int sp = 0; sp < splits; ++sp) sum += p.partials[sp * stride + at];
      y[at] = sum;
    }
  }
}

// Expand shared memory: y tile and B tile while multiplying, the F32 result tile after.
struct ExpandSmem {
  union {
    struct {
      bf16 ys[kTile][kLd];         // [64 tokens][64 rank]
      bf16 bs[kExpandCols][kLd];   // [128 columns][64 rank]
    } in;
    float c[kTile][kLdC];          // [64 tokens][128 columns]
  };
};

__global__ void __launch_bounds__(kThreads) LoraExpandTcKernel(LoraParams p, int total_col_tiles,
                                                                int4 col_tile_offsets, const float* __restrict__ y,
                                                                bf16* __restrict__ out) {
  __shared__ __align__(128) ExpandSmem sm;
  const int nseg = LiveSegments(p);
  if (nseg == 0) return;
  const int S = p.num_slices;
  const int64_t items = static_cast<int64_t>(VirtualTiles(p, nseg)) * total_col_tiles;
  const int warp = threadIdx.x / kWarpSize;
  const int wm = warp / 2, wn = warp % 2;  // warp's 32 rows x 64 columns of the 64 x 128 tile
  const int64_t y_row = static_cast<int64_t>(S) * p.max_rank;
  const int64_t out_row = p.slice_offsets[S];

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int tile = static_cast<int>(item % total_col_tiles);
    const int v = static_cast<int>(item / total_col_tiles);
    // Offsets past the last slice equal the total, so no tile reaches them.
    const int slice = (tile >= col_tile_offsets.y) + (tile >= col_tile_offsets.z) + (tile >= col_tile_offsets.w);
    const int first_tile = slice == 0   ? col_tile_offsets.x
                           : slice == 1 ? col_tile_offsets.y
                           : slice == 2 ? col_tile_offsets.z
                                        : col_tile_offsets.w;
    int seg, begin, end;
    if (!LocateTile(p, nseg, v, &seg, &begin, &end)) continue;
    LoraSliceWeightsDev w;
    if (!SliceOf(p, seg, slice, &w)) continue;
    const int rows = end - begin;
    const int r = w.rank;
    const int width = p.slice_offsets[slice + 1] - p.slice_offsets[slice];
    const int n0 = (tile - first_tile) * kExpandCols;
    if (n0 >= width) continue;
    const int cols = min(kExpandCols, width - n0);
    const bf16* b = static_cast<const bf16*>(w.b);
    const bool b_vec = IsAligned16(b) && r % 8 == 0;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    for (int k0 = 0; k0 < r; k0 += kRankBlock) {
      const int kr = min(kRankBlock, r - k0);
      const int kp = (kr + 15) / 16 * 16;  // staged rank, padded with zeros to whole mma steps
      __syncthreads();  // the previous pass (or item) no longer reads sm
      for (int e = threadIdx.x; e < kTile * kp; e += kThreads) {
        const int i = e / kp, j = e % kp;
        const float val = i < rows && j < kr
                              ? y[static_cast<int64_t>(p.token_rows[begin + i]) * y_row + slice * p.max_rank + k0 + j]
                              : 0.0f;
        sm.in.ys[i][j] = ToBf16(val);
      }
      if (b_vec && kr % 8 == 0) {
        const int vecs = kp / 8;
        for (int e = threadIdx.x; e < kExpandCols * vecs; e += kThreads) {
          const int n = e / vecs, c = (e % vecs) * 8;
          uint4 val = make_uint4(0, 0, 0, 0);
          if (n < cols && c < kr) val = __ldg(reinterpret_cast<const uint4*>(b + static_cast<int64_t>(n0 + n) * r + k0 + c));
          *reinterpret_cast<uint4*>(&sm.in.bs[n][c]) = val;
        }
      } else {
        for (int e = threadIdx.x; e < kExpandCols * kp; e += kThreads) {
          const int n = e / kp, j = e % kp;
          sm.in.bs[n][j] = n < cols && j < kr ? b[static_cast<int64_t>(n0 + n) * r + k0 + j] : ToBf16(0.0f);
        }
      }
      __syncthreads();
      for (int kk = 0; kk < kp; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.in.ys[wm * 32 + i * 16][kk], kLd);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // Bᵀ: B's rows (output columns) hold the rank contiguously: column-major with stride kLd.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &sm.in.bs[wn * 64 + j * 16][kk], kLd);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      }
    }
    __syncthreads();  // sm.in is read no more: the result tile takes its place
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(&sm.c[wm * 32 + i * 16][wn * 64 + j * 16], acc[i][j], kLdC, wmma::mem_row_major);
      }
    }
    __syncthreads();
    const int64_t col0 = p.slice_offsets[slice] + n0;
    const bool out_vec = out_row % 8 == 0 && col0 % 8 == 0 && cols == kExpandCols && IsAligned16(out);
    if (out_vec) {
      for (int e = threadIdx.x; e < rows * (kExpandCols / 8); e += kThreads) {
        const int i = e / (kExpandCols / 8), c = (e % (kExpandCols / 8)) * 8;
        uint4* o = reinterpret_cast<uint4*>(out + static_cast<int64_t>(p.token_rows[begin + i]) * out_row + col0 + c);
        float f[8];
        Unpack8(*o, f);
#pragma unroll
        for (int q = 0; q < 8; ++q) f[q] += w.scale * sm.c[i][c + q];
        *o = Pack8(f);
      }
    } else {
      for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
        const int i = e / cols, n = e % cols;
        bf16* o = out + static_cast<int64_t>(p.token_rows[begin + i]) * out_row + col0 + n;
        *o = ToBf16(ToFloat(*o) + w.scale * sm.c[i][n]);
      }
    }
  }
}

}  // namespace

cudaError_t LaunchLoraShrinkTc(const LoraParams& p, int num_blocks, size_t partial_bytes, const void* x, float* y,
                               cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0 || num_blocks <= 0 || p.max_rank <= 0) return cudaSuccess;
  // A tile's K loop is latency-bound (two stages in flight): split K into chunks of ~1024 (at
  // most 8), as far as the scratch holds the partial sums.
  const int steps = (p.in_features + kKStep - 1) / kKStep;
  int splits = std::min(8, std::max(1, steps / 16));
  const size_t per_split = static_cast<size_t>(p.num_tokens) * p.num_slices * p.max_rank * sizeof(float);
  if (p.partials == nullptr || per_split == 0) {
    splits = 1;
  } else {
    splits = static_cast<int>(std::min<size_t>(splits, partial_bytes / per_split));
    splits = std::max(splits, 1);
  }
  const int steps_per_split = (steps + splits - 1) / splits;
  splits = (steps + steps_per_split - 1) / steps_per_split;
  LoraShrinkTcKernel<<<num_blocks, kThreads, 0, stream>>>(p, static_cast<const bf16*>(x), y, splits,
                                                            steps_per_split);
  if (splits == 1) return cudaGetLastError();
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  LoraShrinkTcReduceKernel<<<num_blocks, kThreads, 0, stream>>>(p, y, splits);
  return cudaGetLastError();
}

cudaError_t LaunchLoraExpandTc(const LoraParams& p, int num_blocks, const float* y, void* out, cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0 || num_blocks <= 0 || p.max_rank <= 0) return cudaSuccess;
  if (p.num_slices > 4) return cudaErrorInvalidValue;
  int offsets[4] = {0, 0, 0, 0};
  int total = 0;
  for (int s = 0; s < p.num_slices; ++s) {
    offsets[s] = total;
    total += (p.slice_offsets[s + 1] - p.slice_offsets[s] + kExpandCols - 1) / kExpandCols;
  }
  for (int s = p.num_slices; s < 4; ++s) offsets[s] = total;
  if (total == 0) return cudaSuccess;
  LoraExpandTcKernel<<<num_blocks, kThreads, 0, stream>>>(p, total, make_int4(offsets[0], offsets[1], offsets[2], offsets[3]),
                                                            y, static_cast<bf16*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
