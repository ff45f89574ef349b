// LoRA shrink and expand over adapter segments (tokens sorted by adapter slot), for decode and
// small prefill steps (long steps use the tensor-core kernels of lora_prefill.cu).
//
// Both kernels are bandwidth kernels: what they must move is each active adapter's A and B once
// per step, with 16-byte loads into registers, many in flight. Both read the live segment count,
// slots and ranks on the device, so a captured graph replays any batch without a grid resize.
//
// Shrink: item = (segment, slice, 4 rows of A, group of up to 4 of the segment's tokens). A
// block covers the item's whole K range: its warps take interleaved 256-element steps, each lane
// loads the rows' and tokens' vectors (two steps in flight) and accumulates 16 sums, which the
// block reduces in a fixed order (a multi-value warp butterfly, then shared memory) straight into
// y: no split-K scratch, no counters, no cross-block hand-off. Rows past a slot's rank cost only
// the metadata reads. A step whose segments hold one token each (distinct adapters in decode)
// takes one-token items instead (ShrinkOneTokenItems: 4, 8 or 16 rows x that token), which load
// and multiply only that token; both shapes give y the same bits. A step can number only the real
// items (LoraParams::shrink_balanced: a prefix of each (segment, slice) pair's item count in shared
// memory), so with mixed ranks each block's share of them is even. The grid is capped at 3/4 of the
// SMs: the shrink runs beside the GEMM and each of its blocks holds an SM's registers that a GEMM
// CTA would need (a larger grid made whole steps slower, a smaller one the shrink too long;
// bench/runs/2026-11-29-rows).
// Expand: item = (segment, output tile of one slice, token split); a tile is 1024 columns, or
// 1024·16/r for a step whose rank bound r > 16 when full-width items would leave blocks idle (an
// item then moves the same bytes of B whatever the rank). A thread keeps the B rows (rank bf16
// each, contiguous) of up to 4 of its columns in registers and applies them to each token (staging
// y for 8 tokens at once measured slower, bench/runs/2026-11-29-rows); it adds scale·delta into
// the output in place, or (GemmWithLora) writes it into a delta buffer (BF16 with
// LoraParams::bf16_delta, else F32) and marks the (row, slice) pairs it wrote, so it can run
// beside the GEMM; the kernel that reads the GEMM output next folds the delta in (lora_delta.h).
// Steps with ranks above 16 (LoraSegments::wide_ranks) run the streamed expand instead
// (LoraExpandStreamKernel): the same items at tiles of at most 32 KB of B, 2-3 of them in flight a
// block through shared memory (cp.async), the same bits. With rank classes (LoraParams::
// expand_classes; the segments ordered by class, LoraSegments::class_ends) its build with classes
// gives the narrow segments the item-by-item items and streams the others at their class's tile
// width (off by default: see kLoraWideExpandClasses in cuda_ops.cc).
// Work is proportional to each slot's real rank; rank-0 slices and empty segments cost nothing.
#include "engine/ops/cuda/lora_kernels.h"

#include <algorithm>

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kThreads = 256;              // expand block
constexpr int kStep = kWarpSize * 8;       // K elements a warp covers with one 16-byte vector a lane
constexpr int kMaxTokenSplits = 64;
constexpr int kExpandColumnsPerThread = kLoraExpandTile / kThreads;
constexpr int kExpandBlocksPerSm = 2;  // register cap 128: the expand holds B vectors in registers

__device__ __forceinline__ uint4 Load8(const bf16* p, bool aligned) {
  if (aligned) return __ldg(reinterpret_cast<const uint4*>(p));
  // Composed in registers (a uint16_t view of a uint4 would put it in local memory).
  const uint16_t* s = reinterpret_cast<const uint16_t*>(p);
  auto pair = [s](int i) { return static_cast<uint32_t>(s[i]) | (static_cast<uint32_t>(s[i + 1]) << 16); };
  return make_uint4(pair(0), pair(2), pair(4), pair(6));
}

// Σ_i a[i]·b[i] over 8 bf16 of a and 8 floats of b, one fused multiply-add after another: the
// one order every Dot8 sums in, so every path gives the same bits.
__device__ __forceinline__ float Dot8Float(const uint4& a, const float (&b)[8]) {
  const __nv_bfloat162* ha = reinterpret_cast<const __nv_bfloat162*>(&a);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = __bfloat1622float2(ha[i]);
    s = fmaf(fa.x, b[2 * i], s);
    s = fmaf(fa.y, b[2 * i + 1], s);
  }
  return s;
}

// The same over 8 bf16 of b (a caller that multiplies one vector by many converts it once and
// passes the floats to Dot8Float).
__device__ __forceinline__ float Dot8(const uint4& a, const uint4& b) {
  const __nv_bfloat162* ha = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* hb = reinterpret_cast<const __nv_bfloat162*>(&b);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = __bfloat1622float2(ha[i]);
    const float2 fb = __bfloat1622float2(hb[i]);
    s = fmaf(fa.x, fb.x, s);
    s = fmaf(fa.y, fb.y, s);
  }
  return s;
}

// The same over 8 floats of y in 16-byte aligned shared memory.
__device__ __forceinline__ float Dot8(const uint4& b, const float* y) {
  const float4 y0 = *reinterpret_cast<const float4*>(y);
  const float4 y1 = *reinterpret_cast<const float4*>(y + 4);
  const float yv[8] = {y0.x, y0.y, y0.z, y0.w, y1.x, y1.y, y1.z, y1.w};
  return Dot8Float(b, yv);
}

// n / d, and n % d into *rem (d > 0), in 32-bit arithmetic: a 64-bit division is a long software
// routine, and the kernels decode an item number this way for every item they take. A step's item
// numbers stay far below 2^32 (LoraParams::num_tokens <= kLoraMaxStepTokens).
__device__ __forceinline__ uint32_t DivMod(uint32_t n, int d, int* rem) {
  const uint32_t q = n / static_cast<uint32_t>(d);
  *rem = static_cast<int>(n - q * static_cast<uint32_t>(d));
  return q;
}

// The step's rank bound: max_rank, or less when the step says so (LoraParams::live_max_rank).
// Identical in every thread.
__device__ __forceinline__ int LiveMaxRank(const LoraParams& p) {
  if (p.live_max_rank == nullptr) return p.max_rank;
  return min(max(*p.live_max_rank, 0), p.max_rank);
}

// Resolves a segment to its token range and the slice weights it uses; false when there is
// nothing to do (no adapter, rank 0, no tokens). The same answer in every thread. Ranks are
// clamped to `rank_bound` (the kernels made work only that far; a larger rank would also spill
// into the next slice's y columns).
__device__ __forceinline__ bool ResolveSegment(const LoraParams& p, int seg, int slice, int rank_bound, int* begin,
                                               int* end, LoraSliceWeightsDev* w) {
  const int slot = p.seg_slots[seg];
  if (slot < 0 || slot >= p.num_slots) return false;
  *w = p.table[static_cast<int64_t>(slot) * p.num_slices + slice];
  w->rank = min(w->rank, rank_bound);
  if (w->rank <= 0) return false;
  *begin = max(p.seg_starts[seg], 0);
  *end = min(p.seg_starts[seg + 1], p.num_tokens);
  return *begin < *end;
}

// Live segments and how many ways each segment's tokens are split (about LoraParams::expand_tokens
// tokens an item, from the mean segment length over all rows, which needs no second dependent
// load; 1 in decode with a segment a request). Identical in every thread of the launch.
__device__ __forceinline__ int TokenSplits(const LoraParams& p, int nseg, int per_item, int max_token_splits) {
  if (nseg == 0) return 1;
  return max(1, min(p.num_tokens / nseg / per_item, max_token_splits));
}

__device__ __forceinline__ void LiveSegments(const LoraParams& p, int max_token_splits, int* nseg,
                                             int* token_splits) {
  *nseg = min(max(*p.num_segments, 0), p.max_segments);
  *token_splits = TokenSplits(p, *nseg, p.expand_tokens > 0 ? p.expand_tokens : kLoraExpandTokens, max_token_splits);
}

// The shrink (see the top of the file). kItemWarps: 8, or 16 for inputs wider than
// kLoraShrinkWideInput (down_proj), so each warp still has few steps.
constexpr int kRowItemRows = 4;
constexpr int kRowItemTokens = 4;
constexpr int kRowItemValues = kRowItemRows * kRowItemTokens;  // sums a lane carries (16)

// Sums v[i] over the warp's lanes for every i < 16 with 16 shuffles (not 16·5): each stage
// exchanges half the values with the lane `o` apart. Lane l returns the sum of index (l >> 1) & 15.
template <int N>  // a stage: N values in, N/2 out, exchanged with the lane N apart
__device__ __forceinline__ void WarpFold(float (&v)[kRowItemValues], int lane) {
  const bool upper = (lane & N) != 0;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float send = upper ? v[i] : v[i + N / 2];
    const float keep = upper ? v[i + N / 2] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, N);
  }
}

__device__ __forceinline__ float WarpSum16(float (&v)[kRowItemValues], int lane) {
  static_assert(kRowItemValues == 16);
  WarpFold<16>(v, lane);
  WarpFold<8>(v, lane);
  WarpFold<4>(v, lane);
  WarpFold<2>(v, lane);
  return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 1);
}

// The balanced enumeration (LoraParams::shrink_balanced): item i of the step's
// Σ_(segment, slice) mult·ceil(rank / rows) real items, numbered pair after pair ((segment,
// slice) pairs in order), found from an inclusive prefix of the pairs' counts in shared memory.
// The plain enumeration numbers every pair's items up to the step's rank bound, so in a step of
// mixed ranks a block's share of real items depends on where the high ranks fall; here blocks
// take ceil(real / grid) items at most.
constexpr int kShrinkBalancedMaxPairs = 512;  // (segment, slice) pairs the prefix holds

// Fills pair_end[i] with the real items of pairs 0..i and returns their total, or -1 when the
// step has more pairs than the prefix holds (the plain enumeration then). Every thread of the
// block must call it; identical result in every thread.
__device__ __forceinline__ int BuildShrinkItemPrefix(const LoraParams& p, int nseg, int live_rank, int mult,
                                                     int rows_per_item, int32_t* pair_end) {
  const int S = p.num_slices;
  const int pairs = nseg * S;
  if (pairs > kShrinkBalancedMaxPairs) return -1;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    int begin, end;
    LoraSliceWeightsDev w;
    pair_end[i] = ResolveSegment(p, i / S, i % S, live_rank, &begin, &end, &w)
                      ? mult * ((w.rank + rows_per_item - 1) / rows_per_item)
                      : 0;
  }
  __syncthreads();
  if (threadIdx.x < kWarpSize) {  // warp 0 scans 32 pairs at a time
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 0; base < pairs; base += kWarpSize) {
      const int i = base + lane;
      int v = i < pairs ? pair_end[i] : 0;
#pragma unroll
      for (int o = 1; o < kWarpSize; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
      }
      if (i < pairs) pair_end[i] = v + carry;
      carry += __shfl_sync(0xffffffffu, v, kWarpSize - 1);
    }
  }
  __syncthreads();
  return pairs == 0 ? 0 : pair_end[pairs - 1];
}

// The pair of balanced item `item` (< the prefix's total) and the item's number within it.
__device__ __forceinline__ int ShrinkItemPair(const int32_t* pair_end, int pairs, int64_t item, int* local) {
  int lo = 0, hi = pairs - 1;  // the first pair whose end is past item
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (pair_end[mid] > item) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  *local = static_cast<int>(item - (lo == 0 ? 0 : pair_end[lo - 1]));
  return lo;
}

// The shrink's one-token item shape (LoraParams::shrink_shape): item = (segment, slice, kRows rows
// of A), its tokens one at a time, each lane carrying the rows' sums for that token. A segment of
// one token (decode with an adapter a request) then loads and multiplies only what it needs,
// where the 4-row x 4-token items load and multiply 3 copies of it. A warp keeps 16 rows of one
// K step in flight, 8 rows of one or 4 rows of 2. Fewer rows an item make more items, for steps
// with few segments. Each warp walks the same K steps in the same order and
// the reduction is the same 16-value tree (unused values are zero), so y gets the same bits as
// from the general items, whatever kRows.
template <int kItemWarps, int kRows>
__device__ __forceinline__ void ShrinkOneTokenItems(const LoraParams& p, const bf16* __restrict__ x,
                                                    float* __restrict__ y, int nseg, int live_rank,
                                                    const int32_t* pair_end, int balanced_items, int grid,
                                                    float (&red)[kItemWarps][kRowItemValues]) {
  static_assert(kRows == 4 || kRows == 8 || kRows == 16);
  constexpr int kInFlight = kRows == 4 ? 2 : 1;  // K steps a round (more spilled at the 128-register cap)
  const int S = p.num_slices;
  const int K = p.in_features;
  const int row_groups = (live_rank + kRows - 1) / kRows;
  // balanced_items >= 0: that many real items (BuildShrinkItemPrefix with kRows rows an item).
  const int64_t items = balanced_items >= 0 ? balanced_items : static_cast<int64_t>(nseg) * S * row_groups;
  const int steps_total = (K + kStep - 1) / kStep;
  const int64_t y_row = static_cast<int64_t>(S) * p.max_rank;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t item = blockIdx.x; item < items; item += grid) {
    int rg, slice, seg;
    if (balanced_items >= 0) {
      int local;
      const int pair = ShrinkItemPair(pair_end, nseg * S, item, &local);
      seg = pair / S;
      slice = pair % S;
      rg = local;
    } else {
      seg = static_cast<int>(DivMod(DivMod(static_cast<uint32_t>(item), row_groups, &rg), S, &slice));
    }
    int begin, end;
    LoraSliceWeightsDev w;
    if (!ResolveSegment(p, seg, slice, live_rank, &begin, &end, &w)) continue;
    const int r0 = rg * kRows;
    if (r0 >= w.rank) continue;
    const int rows = min(kRows, w.rank - r0);
    const bf16* a = static_cast<const bf16*>(w.a) + static_cast<int64_t>(r0) * K;
    const bool a_vec = IsAligned16(w.a);
    const int64_t col = static_cast<int64_t>(slice) * p.max_rank + r0;
    for (int t = begin; t < end; ++t) {
      const int64_t xr = p.token_rows[t];
      float acc[kRowItemValues] = {};
      for (int s0 = warp; s0 < steps_total; s0 += kInFlight * kItemWarps) {
        uint4 av[kInFlight][kRows], xv[kInFlight];
#pragma unroll
        for (int h = 0; h < kInFlight; ++h) {
          const int64_t k = static_cast<int64_t>(s0 + h * kItemWarps) * kStep + lane * 8;
          const bool in = s0 + h * kItemWarps < steps_total && k < K;
          xv[h] = in ? __ldg(reinterpret_cast<const uint4*>(x + xr * K + k)) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            av[h][r] = in && r < rows ? Load8(a + static_cast<int64_t>(r) * K + k, a_vec) : make_uint4(0, 0, 0, 0);
          }
        }
#pragma unroll
        for (int h = 0; h < kInFlight; ++h) {
          if (s0 + h * kItemWarps >= steps_total) break;  // zeros past the end: no bits to add
          float xf[8];  // the token's vector, converted once for all the rows
          Unpack8(xv[h], xf);
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r] += Dot8Float(av[h][r], xf);
        }
      }
      const float sum = WarpSum16(acc, lane);
      if ((lane & 1) == 0) red[warp][(lane >> 1) & (kRowItemValues - 1)] = sum;
      __syncthreads();
      if (threadIdx.x < rows) {
        float total = 0.0f;
#pragma unroll
        for (int wi = 0; wi < kItemWarps; ++wi) total += red[wi][threadIdx.x];
        y[xr * y_row + col + threadIdx.x] = total;
      }
      __syncthreads();  // red is rewritten by the next token
    }
  }
}

// Rows an item of the one-token shape: LoraParams::shrink_rows, or the fewest that make no more
// items than the grid has blocks (16 when even those are more): every block then streams one
// item's rows whole. Measured per module with 32 one-token segments (bench/runs/2026-11-29-seventh):
// qkv and gate_up were fastest with 16 rows, o and down with 8. Identical in every thread.
__device__ __forceinline__ int OneTokenRows(const LoraParams& p, int nseg, int live_rank) {
  if (p.shrink_rows != 0) return p.shrink_rows;
  const int64_t per_rows = static_cast<int64_t>(nseg) * p.num_slices;
  if (per_rows * ((live_rank + 3) / 4) <= gridDim.x) return 4;
  if (per_rows * ((live_rank + 7) / 8) <= gridDim.x) return 8;
  return 16;
}

// Whether a step takes the one-token items (LoraParams::shrink_shape): forced, or segments of
// fewer than 2 tokens on average that are enough for 16-row items to fill a quarter of the grid
// (fewer made batch-8 steps slower than the general items). Identical in every thread.
__device__ __forceinline__ bool OneTokenShape(const LoraParams& p, int nseg, int live_rank) {
  if (p.shrink_shape == 2) return true;
  return p.shrink_shape == 1 && p.num_tokens < 2 * nseg &&
         4 * static_cast<int64_t>(nseg) * p.num_slices * ((live_rank + 15) / 16) >= gridDim.x;
}

// The general shape's item `item`: its segment's tokens and weights, slice, token group and row
// group; false when it has nothing to do. Plain enumeration (balanced_pairs < 0): (segment, slice,
// token group, row group up to row_groups), row group fastest. Balanced (the prefix of
// BuildShrinkItemPrefix over balanced_pairs pairs, `groups` x the pair's row groups each): the
// pair's items token group by token group, row group fastest. Identical in every thread.
__device__ __forceinline__ bool GeneralShrinkItem(const LoraParams& p, int64_t item, int groups, int row_groups,
                                                  int live_rank, const int32_t* pair_end, int balanced_pairs,
                                                  int* slice, int* g, int* rg, int* begin, int* end,
                                                  LoraSliceWeightsDev* w) {
  const int S = p.num_slices;
  int seg;
  int local = 0;
  if (balanced_pairs >= 0) {
    const int pair = ShrinkItemPair(pair_end, balanced_pairs, item, &local);
    seg = pair / S;
    *slice = pair % S;
  } else {
    seg = static_cast<int>(DivMod(DivMod(DivMod(static_cast<uint32_t>(item), row_groups, rg), groups, g), S, slice));
  }
  if (!ResolveSegment(p, seg, *slice, live_rank, begin, end, w)) return false;
  if (balanced_pairs >= 0) {
    const int rgs = (w->rank + kRowItemRows - 1) / kRowItemRows;
    *rg = local % rgs;
    *g = local / rgs;
  }
  return *rg * kRowItemRows < w->rank;
}

// kOneToken: the build that can also take the one-token item shape (LoraParams::shrink_shape != 0);
// the default build carries only the general items. kBalanced: the build of the balanced
// numbering (LoraParams::shrink_balanced); the plain builds carry none of it (its prefix and
// mapping made them spill at the 128-register cap, and their shrinks 2-3% slower).
template <int kItemWarps, bool kOneToken, bool kBalanced>
__global__ void __launch_bounds__(kItemWarps * kWarpSize, 16 / kItemWarps)
    LoraShrinkRowsKernel(LoraParams p, const bf16* __restrict__ x, float* __restrict__ y) {
  __shared__ float red[kItemWarps][kRowItemValues];
  // The balanced enumeration's prefix (LoraParams::shrink_balanced): dynamic shared memory, so
  // the plain launch holds no more of an SM's shared memory than before (the GEMM beside it).
  extern __shared__ int32_t pair_end[];
  AllowDependentLaunch();  // the expand may take SMs this launch leaves idle; it waits for y itself
  const int S = p.num_slices;
  // The segment arrays, slot table and A are not written by the kernels of a step, so they may be
  // read before the kernel before this one has completed (prefetch_a).
  const int nseg = min(max(*p.num_segments, 0), p.max_segments);
  const int live_rank = LiveMaxRank(p);
  // Token groups per segment from the mean segment length (a longer segment's group takes more
  // passes): identical in every thread.
  const int groups = nseg == 0 ? 1 : max(1, (p.num_tokens / nseg + kRowItemTokens - 1) / kRowItemTokens);
  const int row_groups = (live_rank + kRowItemRows - 1) / kRowItemRows;
  // The balanced build: real items only, evenly over the grid (-1: the plain enumeration). Reads
  // only the segment arrays and slot table, so it too may run before the kernel before this one
  // has completed. Its items depend on the shape, so that is chosen first.
  bool one_token = false;
  int one_token_rows = kRowItemRows;
  int balanced = -1;
  if constexpr (kBalanced) {
    if constexpr (kOneToken) {
      one_token = nseg > 0 && live_rank > 0 && OneTokenShape(p, nseg, live_rank);  // same in every block
      if (one_token) one_token_rows = OneTokenRows(p, nseg, live_rank);
    }
    if (nseg > 0 && live_rank > 0) {
      balanced = BuildShrinkItemPrefix(p, nseg, live_rank, one_token ? 1 : groups, one_token_rows, pair_end);
    }
  }
  const int grid = gridDim.x;
  const int balanced_pairs = balanced >= 0 ? nseg * S : -1;
  const int64_t items = balanced >= 0 ? balanced : static_cast<int64_t>(nseg) * S * groups * row_groups;
  const int K = p.in_features;
  if (p.prefetch_a) {
    // A thread an item of this block (the first token group's item: the others read the same
    // rows), numbered as the general shape numbers them (plainly when the balanced prefix counts
    // one-token items): an item's rows reach the L2 whichever block asks for them.
    const int prefetch_pairs = one_token ? -1 : balanced_pairs;
    const int64_t prefetch_items =
        prefetch_pairs >= 0 ? items : static_cast<int64_t>(nseg) * S * groups * row_groups;
    for (int64_t item = blockIdx.x + static_cast<int64_t>(threadIdx.x) * gridDim.x; item < prefetch_items;
         item += static_cast<int64_t>(blockDim.x) * gridDim.x) {
      int slice, g, rg, begin, end;
      LoraSliceWeightsDev w;
      if (!GeneralShrinkItem(p, item, groups, row_groups, live_rank, pair_end, prefetch_pairs, &slice, &g, &rg,
                             &begin, &end, &w) ||
          g != 0 || !IsAligned16(w.a)) {
        continue;
      }
      const int rows = min(kRowItemRows, w.rank - rg * kRowItemRows);
      PrefetchL2(static_cast<const bf16*>(w.a) + static_cast<int64_t>(rg) * kRowItemRows * K,
                 static_cast<uint32_t>(rows) * K * 2);
    }
  }
  WaitForPrecedingKernel();  // x, and marks the kernel before may read (nothing when launched plainly)
  // GemmWithLora's expand marks the (row, slice) pairs it writes into the delta buffer: start
  // from none (the expand reads the marks only after this kernel has completed).
  if (p.delta_mask != nullptr) {
    const int64_t n = static_cast<int64_t>(p.delta_rows) * S;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      p.delta_mask[e] = 0;
    }
  }
  if (nseg == 0 || live_rank == 0 || static_cast<int>(blockIdx.x) >= grid) return;
  if constexpr (kOneToken) {
    if (kBalanced ? one_token : OneTokenShape(p, nseg, live_rank)) {  // same in every block
      switch (kBalanced ? one_token_rows : OneTokenRows(p, nseg, live_rank)) {
        case 16: ShrinkOneTokenItems<kItemWarps, 16>(p, x, y, nseg, live_rank, pair_end, balanced, grid, red); break;
        case 8: ShrinkOneTokenItems<kItemWarps, 8>(p, x, y, nseg, live_rank, pair_end, balanced, grid, red); break;
        default: ShrinkOneTokenItems<kItemWarps, 4>(p, x, y, nseg, live_rank, pair_end, balanced, grid, red); break;
      }
      return;
    }
  }
  const int steps_total = (K + kStep - 1) / kStep;
  const int64_t y_row = static_cast<int64_t>(S) * p.max_rank;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t item = blockIdx.x; item < items; item += grid) {
    int slice, g, rg, begin, end;
    LoraSliceWeightsDev w;
    if (!GeneralShrinkItem(p, item, groups, row_groups, live_rank, pair_end, balanced_pairs, &slice, &g, &rg, &begin,
                           &end, &w)) {
      continue;
    }
    const int r0 = rg * kRowItemRows;
    const int rows = min(kRowItemRows, w.rank - r0);
    const bf16* a = static_cast<const bf16*>(w.a) + static_cast<int64_t>(r0) * K;
    const bool a_vec = IsAligned16(w.a);  // K is a multiple of 8: every row stays aligned
    const int64_t col = static_cast<int64_t>(slice) * p.max_rank + r0;
    for (int t0 = begin + g * kRowItemTokens; t0 < end; t0 += groups * kRowItemTokens) {
      const int nt = min(kRowItemTokens, end - t0);
      int xrow[kRowItemTokens];
#pragma unroll
      for (int t = 0; t < kRowItemTokens; ++t) xrow[t] = p.token_rows[t < nt ? t0 + t : t0];  // extras: unused
      float acc[kRowItemValues] = {};
      // Two steps per round, all of their loads issued before the math.
      for (int s0 = warp; s0 < steps_total; s0 += 2 * kItemWarps) {
        uint4 av[2][kRowItemRows], xv[2][kRowItemTokens];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t k = static_cast<int64_t>(s0 + h * kItemWarps) * kStep + lane * 8;
          const bool in = s0 + h * kItemWarps < steps_total && k < K;
#pragma unroll
          for (int r = 0; r < kRowItemRows; ++r) {
            av[h][r] = in && r < rows ? Load8(a + static_cast<int64_t>(r) * K + k, a_vec) : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int t = 0; t < kRowItemTokens; ++t) {
            xv[h][t] = in ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(xrow[t]) * K + k))
                          : make_uint4(0, 0, 0, 0);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int r = 0; r < kRowItemRows; ++r) {
#pragma unroll
            for (int t = 0; t < kRowItemTokens; ++t) acc[r * kRowItemTokens + t] += Dot8(av[h][r], xv[h][t]);
          }
        }
      }
      const float sum = WarpSum16(acc, lane);
      if ((lane & 1) == 0) red[warp][(lane >> 1) & (kRowItemValues - 1)] = sum;
      __syncthreads();
      if (threadIdx.x < kRowItemValues) {
        const int r = threadIdx.x / kRowItemTokens;
        const int t = threadIdx.x % kRowItemTokens;
        if (r < rows && t < nt) {
          float total = 0.0f;
#pragma unroll
          for (int wi = 0; wi < kItemWarps; ++wi) total += red[wi][threadIdx.x];
          int row = xrow[0];  // xrow[t] with constant indices (no local memory)
#pragma unroll
          for (int tt = 1; tt < kRowItemTokens; ++tt) row = tt == t ? xrow[tt] : row;
          y[static_cast<int64_t>(row) * y_row + col + r] = total;
        }
      }
      __syncthreads();  // red is rewritten by the next pass
    }
  }
}

// The expand's result for output element `at`: `product` (scale·sum, rounded on its own, no fused
// multiply-add) stored into the delta buffer, or added to out in place. Both modes give out the
// same bits once the delta is added (lora_delta.h); with bf16_delta both round the product to bf16
// first.
__device__ __forceinline__ void StoreLoraProduct(const LoraParams& p, int64_t at, float product,
                                                 bf16* __restrict__ out) {
  if (p.bf16_delta) {
    const bf16 rounded = ToBf16(product);
    if (p.delta != nullptr) {
      static_cast<bf16*>(p.delta)[at] = rounded;
    } else {
      out[at] = ToBf16(ToFloat(out[at]) + ToFloat(rounded));
    }
  } else if (p.delta != nullptr) {
    static_cast<float*>(p.delta)[at] = product;
  } else {
    out[at] = ToBf16(ToFloat(out[at]) + product);
  }
}

// One expand work item: columns n0 + threadIdx.x + c·kThreads (c < kExpandColumnsPerThread) of
// one slice for the tokens first, first + step, ... < end. NV > 0: rank = 8·NV and B 16-byte
// aligned, so a column's B row is NV vectors held in registers across tokens, CPT columns at a
// time (8 vectors a thread in flight). NV = 0: any rank, B rows streamed through L1 per token.
// Writes out[row, out_col + n] += scale·s in place, or in delta mode delta[row, out_col + n] =
// scale·s and delta_mask[row, slice] = 1.
// The tile is `tw` columns wide (kLoraExpandTile or narrower for a higher rank bound).
template <int NV>
__device__ __forceinline__ void ExpandItem(const LoraParams& p, const LoraSliceWeightsDev& w, int slice, int width,
                                           int n0, int tw, int first, int end, int step, int64_t y_col,
                                           int64_t out_col, const float* __restrict__ y, bf16* __restrict__ out,
                                           float* y_s) {
  constexpr int kCpt = NV == 0 ? 1 : (8 / NV < kExpandColumnsPerThread ? 8 / NV : kExpandColumnsPerThread);
  constexpr int kHeld = NV == 0 ? 1 : NV;
  const int r = w.rank;
  const int64_t y_row = static_cast<int64_t>(p.num_slices) * p.max_rank;
  const int64_t out_row = p.slice_offsets[p.num_slices];
  const bf16* b = static_cast<const bf16*>(w.b);
  for (int c0 = 0; c0 < kExpandColumnsPerThread && c0 * kThreads < tw; c0 += kCpt) {
    uint4 bv[kCpt][kHeld];
    bool valid[kCpt];
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      const int in_tile = threadIdx.x + (c0 + c) * kThreads;
      const int n = n0 + in_tile;
      valid[c] = in_tile < tw && n < width;
#pragma unroll
      for (int v = 0; v < kHeld; ++v) {
        bv[c][v] = (NV > 0 && valid[c]) ? __ldg(reinterpret_cast<const uint4*>(b + static_cast<int64_t>(n) * r) + v)
                                        : make_uint4(0, 0, 0, 0);
      }
    }
    WaitForPrecedingKernel();  // y (and out, the delta marks) are the preceding kernels' outputs
    for (int idx = first; idx < end; idx += step) {
      const int64_t row = p.token_rows[idx];
      if (p.delta != nullptr && row >= p.delta_rows) continue;  // outside the buffer (same in every thread)
      __syncthreads();  // the previous token's y_s is no longer read
      if (threadIdx.x < r) y_s[threadIdx.x] = y[row * y_row + y_col + threadIdx.x];
      if (p.delta_mask != nullptr && threadIdx.x == 0) p.delta_mask[row * p.num_slices + slice] = 1;
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kCpt; ++c) {
        if (!valid[c]) continue;
        const int n = n0 + threadIdx.x + (c0 + c) * kThreads;
        float s = 0.0f;
        if constexpr (NV > 0) {
#pragma unroll
          for (int v = 0; v < NV; ++v) s += Dot8(bv[c][v], y_s + 8 * v);
        } else {
          const bf16* b_row = b + static_cast<int64_t>(n) * r;
          for (int j = 0; j < r; ++j) s += ToFloat(b_row[j]) * y_s[j];
        }
        StoreLoraProduct(p, row * out_row + out_col + n, __fmul_rn(w.scale, s), out);
      }
    }
  }
}

// The slice of expand tile `tile` (tiles of width `tw` numbered slice after slice, as
// LoraExpandTiles counts them) and the number of that slice's first tile. Constant indices only (a
// dynamically indexed parameter array would go through local memory).
__device__ __forceinline__ void TileSlice(const LoraParams& p, int tw, int tile, int* slice, int* first_tile) {
  int acc = 0;
  *slice = 0;
  *first_tile = 0;
#pragma unroll
  for (int s = 0; s < kLoraMaxSlices; ++s) {
    if (s < p.num_slices) {
      if (tile >= acc) {
        *slice = s;
        *first_tile = acc;
      }
      acc += (p.slice_offsets[s + 1] - p.slice_offsets[s] + tw - 1) / tw;
    }
  }
}

// What an expand item (segment, tile, token split; numbered with the token split fastest, then
// the tile, as LoraExpandTiles counts tiles) has to do: the slot's weights for the tile's slice,
// the slice, the tile's first column in the slice and the item's first token index (its tokens are
// first, first + token_splits, ... < end). False when it has nothing to do. The same answer in
// every thread.
struct ExpandWork {
  LoraSliceWeightsDev w;
  int slice, n0, first, end;
};

// The items are numbered over segments seg_base, seg_base + 1, ... (a rank class's, with
// LoraParams::expand_classes); ranks are clamped to `live_rank`.
__device__ __forceinline__ bool DecodeExpandItem(const LoraParams& p, int64_t item, int tw, int total_tiles,
                                                 int token_splits, int live_rank, ExpandWork* work,
                                                 int seg_base = 0) {
  int ts, tile;
  const int seg =
      seg_base + static_cast<int>(DivMod(DivMod(static_cast<uint32_t>(item), token_splits, &ts), total_tiles, &tile));
  int slice_first_tile, begin;
  TileSlice(p, tw, tile, &work->slice, &slice_first_tile);
  if (!ResolveSegment(p, seg, work->slice, live_rank, &begin, &work->end, &work->w)) return false;
  work->first = begin + ts;
  work->n0 = (tile - slice_first_tile) * tw;
  return work->first < work->end;
}

// One resolved item of the item-by-item shape (tiles of `tw` columns, the segment's tokens split
// `token_splits` ways), B held in registers for the ranks adapters use. y_s: kLoraMaxRank floats
// of shared memory (16-byte aligned).
__device__ __forceinline__ void ExpandItemAnyRank(const LoraParams& p, const ExpandWork& work, int tw,
                                                  int token_splits, const float* __restrict__ y,
                                                  bf16* __restrict__ out, float* y_s) {
  const LoraSliceWeightsDev& w = work.w;
  const int slice = work.slice, n0 = work.n0, first = work.first, end = work.end;
  const int width = p.slice_offsets[slice + 1] - p.slice_offsets[slice];
  const int64_t y_col = static_cast<int64_t>(slice) * p.max_rank;
  const int64_t out_col = p.slice_offsets[slice];
  const int nv = IsAligned16(w.b) && w.rank % 8 == 0 ? w.rank / 8 : 0;
  switch (nv) {  // the ranks adapters use get register-held B rows; others the general path
    case 1: ExpandItem<1>(p, w, slice, width, n0, tw, first, end, token_splits, y_col, out_col, y, out, y_s); break;
    case 2: ExpandItem<2>(p, w, slice, width, n0, tw, first, end, token_splits, y_col, out_col, y, out, y_s); break;
    case 4: ExpandItem<4>(p, w, slice, width, n0, tw, first, end, token_splits, y_col, out_col, y, out, y_s); break;
    case 8: ExpandItem<8>(p, w, slice, width, n0, tw, first, end, token_splits, y_col, out_col, y, out, y_s); break;
    default: ExpandItem<0>(p, w, slice, width, n0, tw, first, end, token_splits, y_col, out_col, y, out, y_s); break;
  }
}

// The item-by-item expand (LoraExpandKernel): a block takes its items one after another. y_s:
// kLoraMaxRank floats of shared memory.
__device__ __forceinline__ void ExpandItemByItem(const LoraParams& p, const float* __restrict__ y,
                                                 bf16* __restrict__ out, float* y_s) {
  const int S = p.num_slices;
  int nseg, token_splits;
  LiveSegments(p, kMaxTokenSplits, &nseg, &token_splits);
  const int live_rank = LiveMaxRank(p);
  if (nseg == 0 || live_rank == 0) {
    if (blockIdx.x == 0) WaitForPrecedingKernel();  // this launch completes only after the shrink (see the end)
    return;
  }
  // When full-width tiles leave blocks idle, tiles narrow as the step's rank bound grows, so an
  // item of a rank-64 adapter moves as many bytes of B as one of a rank-16 adapter instead of 4x
  // (and takes as long). When full-width items already fill the grid they stay (fewer, longer
  // items: at batch 128 narrow ones made the step slower).
  int tw = kLoraExpandTile;
  int total_tiles = LoraExpandTiles(p.slice_offsets, S, tw);
  if (static_cast<int64_t>(nseg) * total_tiles * token_splits < gridDim.x) {
    tw = LoraExpandTileWidth(live_rank);
    total_tiles = LoraExpandTiles(p.slice_offsets, S, tw);
  }
  const int64_t items = static_cast<int64_t>(nseg) * total_tiles * token_splits;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    ExpandWork work;
    if (!DecodeExpandItem(p, item, tw, total_tiles, token_splits, live_rank, &work)) continue;
    ExpandItemAnyRank(p, work, tw, token_splits, y, out, y_s);
  }
  // Block 0 waits before it exits, so the launch's completion implies the shrink's: the next
  // kernel on the stream (the next module's shrink, which rewrites y and the delta marks) relies
  // on it.
  // Blocks without work exit at once: launched early beside the shrink, a block that waited
  // would hold an SM's registers (half of them) that the GEMM running beside it needs.
  if (blockIdx.x == 0) WaitForPrecedingKernel();
}

__global__ void __launch_bounds__(kThreads, kExpandBlocksPerSm)
    LoraExpandKernel(LoraParams p, const float* __restrict__ y, bf16* __restrict__ out) {
  __shared__ __align__(16) float y_s[kLoraMaxRank];
  ExpandItemByItem(p, y, out, y_s);
}

// The streamed expand (LoraParams::expand_stages): the same items as LoraExpandKernel's at the
// narrow tile width (an item's B is at most kStreamStageB bytes), but a block keeps kStages of
// them in flight: while it multiplies item i, the copies of items i+1 .. i+kStages-1 (their B
// tile, contiguous in memory, and their tokens' y) run as cp.async into shared memory. A block
// that walks several items (gate_up with 32 adapters, mixed ranks) then keeps HBM busy instead of
// waiting for each item's B and y in turn. Items are resolved (segment, slot, tokens) a warp's
// worth at a time into a ring in shared memory, with the items that have nothing to do left out.
// Every column sums its B row in the same order as ExpandItem (the same Dot8 partials for ranks
// 8, 16, 32 and 64, element by element for others), so out and the delta get the same bits.
constexpr int kStreamTokens = 4;                         // tokens whose y a stage holds
constexpr int kStreamStageB = 32768;                     // bytes of B a stage holds
constexpr int kStreamStageY = kStreamTokens * kLoraMaxRank;  // floats of y a stage holds
constexpr int kStreamRing = 64;                          // resolved items a block keeps
static_assert(kLoraExpandTile * 16 * 2 <= kStreamStageB, "a tile of rank <= 16 fits a stage");
static_assert(kStreamRing >= 2 * kWarpSize, "a resolve round must not overwrite items in flight");

struct StreamItem {
  const bf16* b;  // the tile's first B row (B + n0·rank)
  float scale;
  int32_t rank, slice, first, end, n0, cols;
  int32_t rows[kStreamTokens];  // rows of the first kStreamTokens tokens (first, first + step, ...); -1 past end
};

// A B row's 16-byte vector v is stored at v ^ StreamSwizzle(n, NV) within its row in shared
// memory, so the 8 lanes of a quarter warp reading vector v of 8 consecutive columns hit 8
// different bank groups (rows of 32-256 bytes would otherwise share them). n is the column in the
// slice, so the order of the sums never depends on the tiling.
__device__ __forceinline__ int StreamSwizzle(int n, int nv) {
  return nv >= 8 ? (n & 7) : ((n * nv) >> 3) & (nv - 1);
}

// Whether an item's tile was copied as 16-byte vectors into its swizzled place (else element by
// element, in order) and is read as Dot8 vectors. The same answer at copy and at use.
__device__ __forceinline__ bool StreamVectorTile(const StreamItem& it) {
  const int nv = it.rank / 8;
  return it.rank % 8 == 0 && (nv == 1 || nv == 2 || nv == 4 || nv == 8) && IsAligned16(it.b);
}

// The streamed items of a step: up to 3 groups numbered one after another, each (segment of its
// range, tile of its width, token split), ranks clamped to its bound. With rank classes
// (LoraParams::expand_classes) the groups are classes 1-3's segments (2), or all of them at the
// step's rank bound (1); without, one group of every segment at the step's rank bound. Constant
// indices only.
constexpr int kStreamGroups = 3;
struct StreamGroups {
  int64_t end[kStreamGroups];  // items of groups 0..g
  int tw[kStreamGroups], tiles[kStreamGroups], seg_base[kStreamGroups], rank_bound[kStreamGroups];
};

// Resolves the block's next kWarpSize raw items (item = first + k·gridDim.x for k from *raw) and
// appends those with work to the ring. Every warp runs it (the same loads, the same answer: every
// thread keeps *tail and *raw in registers); warp 0 writes the ring.
template <bool kClasses>  // false: group 0 only
__device__ __forceinline__ void StreamResolve(const LoraParams& p, const StreamGroups& gr, int token_splits,
                                              int first, StreamItem* ring, int* tail, int64_t* raw) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t item = first + (*raw + lane) * static_cast<int64_t>(gridDim.x);
  StreamItem it;
  bool valid = false;
  ExpandWork work;
  int tw = 0, tiles = 0, seg_base = 0, rank_bound = 0;
  int64_t local = -1;
#pragma unroll
  for (int g = 0; g < (kClasses ? kStreamGroups : 1); ++g) {  // the group whose items include item
    const int64_t start = g == 0 ? 0 : gr.end[g - 1];
    if (item >= start && item < gr.end[g]) {
      local = item - start;
      tw = gr.tw[g];
      tiles = gr.tiles[g];
      seg_base = gr.seg_base[g];
      rank_bound = gr.rank_bound[g];
    }
  }
  if (local >= 0 && DecodeExpandItem(p, local, tw, tiles, token_splits, rank_bound, &work, seg_base)) {
    valid = true;
    it.n0 = work.n0;
    it.cols = min(tw, p.slice_offsets[work.slice + 1] - p.slice_offsets[work.slice] - it.n0);
    it.b = static_cast<const bf16*>(work.w.b) + static_cast<int64_t>(it.n0) * work.w.rank;
    it.scale = work.w.scale;
    it.rank = work.w.rank;
    it.slice = work.slice;
    it.first = work.first;
    it.end = work.end;
#pragma unroll
    for (int t = 0; t < kStreamTokens; ++t) {
      const int idx = it.first + t * token_splits;
      it.rows[t] = idx < it.end ? p.token_rows[idx] : -1;
    }
  }
  const unsigned ballot = __ballot_sync(0xffffffffu, valid);
  if (valid && threadIdx.x < kWarpSize) {
    ring[(*tail + __popc(ballot & ((1u << lane) - 1u))) % kStreamRing] = it;
  }
  *tail += __popc(ballot);
  *raw += kWarpSize;
}

// Whether a token row takes part (delta mode writes only rows inside the buffer).
__device__ __forceinline__ bool StreamRowLive(const LoraParams& p, int row) {
  return row >= 0 && (p.delta == nullptr || row < p.delta_rows);
}

// Starts the copy of an item's B tile into `b_s` (cp.async; element by element and synchronous
// when the tile is not 16-byte aligned).
__device__ __forceinline__ void StreamCopyB(const StreamItem& it, unsigned char* b_s) {
  const int64_t elems = static_cast<int64_t>(it.cols) * it.rank;
  if (StreamVectorTile(it)) {
    const int nv = it.rank / 8;
    const int shift = __ffs(nv) - 1;
    const int chunks = static_cast<int>(elems / 8);
    for (int c = threadIdx.x; c < chunks; c += kThreads) {
      const int n = c >> shift, v = c & (nv - 1);
      CpAsync16(b_s + 16 * ((n << shift) + (v ^ StreamSwizzle(it.n0 + n, nv))), it.b + 8 * static_cast<int64_t>(c));
    }
  } else {
    bf16* dst = reinterpret_cast<bf16*>(b_s);
    for (int64_t e = threadIdx.x; e < elems; e += kThreads) dst[e] = it.b[e];
  }
}

// Starts the copy of the item's first kStreamTokens tokens' y into `y_s` (rows of kLoraMaxRank).
__device__ __forceinline__ void StreamCopyY(const LoraParams& p, const StreamItem& it, const float* __restrict__ y,
                                            float* y_s) {
  const int64_t y_row = static_cast<int64_t>(p.num_slices) * p.max_rank;
  const int64_t y_col = static_cast<int64_t>(it.slice) * p.max_rank;
  for (int e = threadIdx.x; e < kStreamTokens * it.rank; e += kThreads) {
    const int t = e / it.rank, j = e - t * it.rank;
    const int row = it.rows[t];
    if (StreamRowLive(p, row)) CpAsync4(y_s + t * kLoraMaxRank + j, y + row * y_row + y_col + j);
  }
}

// The item's columns for its first NT tokens of `rows` (their y in y_s): each thread's columns
// sum their B row against every token's y and write scale·sum.
template <int NT>
__device__ __forceinline__ void StreamColumns(const LoraParams& p, const StreamItem& it, bool vec, int nv,
                                              int64_t out_row, int64_t out_col, const int (&rows)[kStreamTokens],
                                              const unsigned char* b_s, const float* y_s, bf16* __restrict__ out) {
  for (int nl = threadIdx.x; nl < it.cols; nl += kThreads) {
    float acc[NT] = {};
    if (vec) {
      const int swz = StreamSwizzle(it.n0 + nl, nv);
      const uint4* row_s = reinterpret_cast<const uint4*>(b_s) + nl * nv;
      for (int v = 0; v < nv; ++v) {
        const uint4 bv = row_s[v ^ swz];
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] += Dot8(bv, y_s + t * kLoraMaxRank + 8 * v);
      }
    } else {
      const bf16* row_s = reinterpret_cast<const bf16*>(b_s) + static_cast<int64_t>(nl) * it.rank;
      for (int j = 0; j < it.rank; ++j) {
        const float bj = ToFloat(row_s[j]);
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[t] += bj * y_s[t * kLoraMaxRank + j];
      }
    }
    const int n = it.n0 + nl;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (!StreamRowLive(p, rows[t])) continue;
      StoreLoraProduct(p, static_cast<int64_t>(rows[t]) * out_row + out_col + n, __fmul_rn(it.scale, acc[t]), out);
    }
  }
}

// Multiplies one item whose B tile and first tokens' y are in shared memory; tokens past the
// first kStreamTokens are loaded into y_s here (all threads take part: the calls contain
// __syncthreads, and the same count of them in every thread).
__device__ __forceinline__ void StreamMultiply(const LoraParams& p, const StreamItem& it, int step,
                                              const unsigned char* b_s, float* y_s, const float* __restrict__ y,
                                              bf16* __restrict__ out) {
  const int64_t out_row = p.slice_offsets[p.num_slices];
  const int64_t out_col = p.slice_offsets[it.slice];
  const int ntok = (it.end - it.first + step - 1) / step;
  const bool vec = StreamVectorTile(it);
  const int nv = it.rank / 8;
  for (int c0 = 0; c0 < ntok; c0 += kStreamTokens) {
    int rows[kStreamTokens];
#pragma unroll
    for (int t = 0; t < kStreamTokens; ++t) rows[t] = it.rows[t];
    if (c0 > 0) {  // later tokens of a long item: y loaded here (rare in decode)
      const int64_t y_row = static_cast<int64_t>(p.num_slices) * p.max_rank;
      const int64_t y_col = static_cast<int64_t>(it.slice) * p.max_rank;
#pragma unroll
      for (int t = 0; t < kStreamTokens; ++t) {
        const int idx = it.first + (c0 + t) * step;
        rows[t] = idx < it.end ? p.token_rows[idx] : -1;
      }
      __syncthreads();  // the previous tokens' y is no longer read
      for (int e = threadIdx.x; e < kStreamTokens * it.rank; e += kThreads) {
        const int t = e / it.rank, j = e - t * it.rank;
        int row = rows[0];  // rows[t] with constant indices (no local memory)
#pragma unroll
        for (int tt = 1; tt < kStreamTokens; ++tt) row = tt == t ? rows[tt] : row;
        if (StreamRowLive(p, row)) y_s[t * kLoraMaxRank + j] = y[row * y_row + y_col + j];
      }
      __syncthreads();
    }
    if (p.delta_mask != nullptr && threadIdx.x == 0) {
#pragma unroll
      for (int t = 0; t < kStreamTokens; ++t) {
        if (StreamRowLive(p, rows[t])) p.delta_mask[static_cast<int64_t>(rows[t]) * p.num_slices + it.slice] = 1;
      }
    }
    switch (min(kStreamTokens, ntok - c0)) {
      case 1: StreamColumns<1>(p, it, vec, nv, out_row, out_col, rows, b_s, y_s, out); break;
      case 2: StreamColumns<2>(p, it, vec, nv, out_row, out_col, rows, b_s, y_s, out); break;
      case 3: StreamColumns<3>(p, it, vec, nv, out_row, out_col, rows, b_s, y_s, out); break;
      default: StreamColumns<4>(p, it, vec, nv, out_row, out_col, rows, b_s, y_s, out); break;
    }
  }
}

template <int kStages>
__host__ __device__ constexpr int StreamSmemBytes() {
  return kStages * (kStreamStageB + kStreamStageY * static_cast<int>(sizeof(float)));
}

// kClasses: the build with rank classes (LoraParams::expand_classes and class_ends); the other
// streams every segment as before classes (its code and registers unchanged).
template <int kStages, bool kClasses>
__global__ void __launch_bounds__(kThreads, kExpandBlocksPerSm)
    LoraExpandStreamKernel(LoraParams p, const float* __restrict__ y, bf16* __restrict__ out) {
  static_assert(kStages >= 2);
  extern __shared__ __align__(16) unsigned char stream_smem[];
  __shared__ StreamItem ring[kStreamRing];
  __shared__ __align__(16) float narrow_y[kLoraMaxRank];  // class 0's items (ExpandItem's y_s)
  unsigned char* b_stage = stream_smem;
  float* y_stage = reinterpret_cast<float*>(stream_smem + kStages * kStreamStageB);
  // The classes' ends, loaded beside the segment count rather than after it (every later load
  // depends on them; the build with classes still costs uniform-rank steps 2-4.6% of a step: see
  // kLoraWideExpandClasses in cuda_ops.cc).
  int class_end[kLoraRankClasses - 1] = {};
  if constexpr (kClasses) {
#pragma unroll
    for (int c = 0; c + 1 < kLoraRankClasses; ++c) class_end[c] = __ldg(p.class_ends + c);
  }
  int nseg, token_splits;
  LiveSegments(p, kMaxTokenSplits, &nseg, &token_splits);
  const int live_rank = LiveMaxRank(p);
  StreamGroups gr;
  // Class 0 (narrow segments, item by item): its items are numbered first, on blocks 0, 1, ...;
  // the streamed ones follow on the next blocks round the grid.
  int64_t narrow_items = 0;
  int narrow_splits = 1, narrow_tiles = 0;
  if (kClasses && nseg > 0) {
    // The classes' segment ranges, clamped to the live count (the last class takes the rest).
    int ends[kLoraRankClasses];
#pragma unroll
    for (int c = 0; c < kLoraRankClasses; ++c) {
      const int prev = c == 0 ? 0 : ends[c - 1];
      ends[c] = c + 1 == kLoraRankClasses ? nseg : min(max(class_end[c], prev), nseg);
    }
    narrow_tiles = LoraExpandTiles(p.slice_offsets, p.num_slices, kLoraExpandTile);
    narrow_splits = TokenSplits(p, nseg, kLoraExpandTokens, kMaxTokenSplits);
    narrow_items = static_cast<int64_t>(ends[0]) * narrow_tiles * narrow_splits;
    int64_t end = 0;
#pragma unroll
    for (int g = 0; g < kStreamGroups; ++g) {
      // Classes 1-3 (2), or classes 1-3 together in the last group (1).
      const bool own = p.expand_classes == 2 || g + 1 == kStreamGroups;
      const int first_seg = p.expand_classes == 2 ? ends[g] : ends[0];
      const int segs = own ? ends[g + 1] - first_seg : 0;
      gr.rank_bound[g] = min(p.expand_classes == 2 ? LoraRankClassBound(g + 1) : kLoraMaxRank, live_rank);
      gr.tw[g] = LoraExpandTileWidth(gr.rank_bound[g]);
      gr.tiles[g] = LoraExpandTiles(p.slice_offsets, p.num_slices, gr.tw[g]);
      gr.seg_base[g] = first_seg;
      end += static_cast<int64_t>(segs) * gr.tiles[g] * token_splits;
      gr.end[g] = end;
    }
  } else {
#pragma unroll
    for (int g = 0; g < kStreamGroups; ++g) {
      gr.rank_bound[g] = live_rank;
      gr.tw[g] = LoraExpandTileWidth(live_rank);
      gr.tiles[g] = LoraExpandTiles(p.slice_offsets, p.num_slices, gr.tw[g]);
      gr.seg_base[g] = 0;
      gr.end[g] = static_cast<int64_t>(nseg) * gr.tiles[g] * token_splits;  // groups 1 and 2 empty
    }
  }
  const int64_t items = gr.end[kStreamGroups - 1];
  const int first =
      kClasses ? static_cast<int>((blockIdx.x + gridDim.x - narrow_items % gridDim.x) % gridDim.x) : blockIdx.x;
  const int64_t raw_count = items > first ? (items - first + gridDim.x - 1) / gridDim.x : 0;
  int tail = 0;  // items resolved into the ring (identical in every thread)
  int64_t raw = 0;
  while (tail < kStages && raw < raw_count) {
    StreamResolve<kClasses>(p, gr, token_splits, first, ring, &tail, &raw);
  }
  if (tail > 0) {
    __syncthreads();  // the ring
    // B while the shrink still runs (PDL); y only after it has finished.
#pragma unroll
    for (int s = 0; s + 1 < kStages; ++s) {
      if (s < tail) StreamCopyB(ring[s], b_stage + s * kStreamStageB);
    }
  }
  // Class 0's items while those copies run (each loads its B, then waits for the shrink).
  for (int64_t item = blockIdx.x; kClasses && item < narrow_items; item += gridDim.x) {
    ExpandWork work;
    if (!DecodeExpandItem(p, item, kLoraExpandTile, narrow_tiles, narrow_splits,
                          min(LoraRankClassBound(0), live_rank), &work)) {
      continue;
    }
    ExpandItemAnyRank(p, work, kLoraExpandTile, narrow_splits, y, out, narrow_y);
  }
  if (tail == 0) {  // nothing (more) to do; see LoraExpandKernel's end
    if (blockIdx.x == 0) WaitForPrecedingKernel();
    return;
  }
  WaitForPrecedingKernel();
#pragma unroll
  for (int s = 0; s + 1 < kStages; ++s) {
    if (s < tail) StreamCopyY(p, ring[s], y, y_stage + s * kStreamStageY);
    CpAsyncCommit();
  }
  for (int i = 0; i < tail; ++i) {
    CpAsyncWait<kStages - 2>();  // this thread's copies of item i have landed
    __syncthreads();             // everyone's; and item i-1's stage is no longer read
    const int next = i + kStages - 1;
    if (next < tail) {
      const int st = next % kStages;
      StreamCopyB(ring[next % kStreamRing], b_stage + st * kStreamStageB);
      StreamCopyY(p, ring[next % kStreamRing], y, y_stage + st * kStreamStageY);
    }
    CpAsyncCommit();  // possibly empty: one group an iteration keeps the wait's count right
    const int st = i % kStages;
    StreamMultiply(p, ring[i % kStreamRing], token_splits, b_stage + st * kStreamStageB, y_stage + st * kStreamStageY,
                   y, out);
    // Keep the item the next iteration starts copying resolved (the ring holds items i..tail-1,
    // fewer than kStages + kWarpSize, so a round does not overwrite any in flight).
    while (tail <= i + kStages && raw < raw_count) {
      StreamResolve<kClasses>(p, gr, token_splits, first, ring, &tail, &raw);
    }
  }
}

}  // namespace

LoraDeltaView LoraDeltaOf(const LoraParams& p) {
  LoraDeltaView d;
  d.delta = p.delta;
  d.bf16 = p.bf16_delta;
  d.mask = p.delta_mask;
  d.rows = p.delta_rows;
  d.num_slices = p.num_slices;
  for (int s = 0; s <= p.num_slices; ++s) d.slice_offsets[s] = p.slice_offsets[s];
  d.width = p.slice_offsets[p.num_slices];
  return d;
}

int LoraShrinkBlocks(int num_sms, int num_tokens, int num_slices, int max_rank, bool beside_gemm) {
  const int64_t cap = std::max(1, beside_gemm ? num_sms * 3 / 4 : num_sms * 2);
  const int64_t most = static_cast<int64_t>(std::max(1, num_tokens)) * std::max(1, num_slices) *
                       ((std::max(1, max_rank) + kRowItemRows - 1) / kRowItemRows);
  return static_cast<int>(std::max<int64_t>(1, std::min(cap, most)));
}

cudaError_t LaunchLoraShrink(const LoraParams& p, const void* x, float* y, cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0 || p.num_blocks <= 0) return cudaSuccess;
  const int warps = p.shrink_warps != 0 ? p.shrink_warps : p.in_features > kLoraShrinkWideInput ? 16 : 8;
  const bf16* xb = static_cast<const bf16*>(x);
  const dim3 grid(p.num_blocks);
  // The balanced enumeration's prefix: a word per (segment, slice) pair the step can have.
  const size_t smem = p.shrink_balanced ? sizeof(int32_t) * static_cast<size_t>(std::min<int64_t>(
                                                               kShrinkBalancedMaxPairs,
                                                               static_cast<int64_t>(p.max_segments) * p.num_slices))
                                        : 0;
  auto launch = [&](auto kernel, int kernel_warps) {
    return LaunchMaybeDependent(p.prefetch_a, kernel, grid, dim3(kernel_warps * kWarpSize), smem, stream, p, xb, y);
  };
  if (p.shrink_balanced) {
    if (p.shrink_shape != 0) {
      return warps == 16 ? launch(LoraShrinkRowsKernel<16, true, true>, 16) : launch(LoraShrinkRowsKernel<8, true, true>, 8);
    }
    return warps == 16 ? launch(LoraShrinkRowsKernel<16, false, true>, 16) : launch(LoraShrinkRowsKernel<8, false, true>, 8);
  }
  if (p.shrink_shape != 0) {
    return warps == 16 ? launch(LoraShrinkRowsKernel<16, true, false>, 16) : launch(LoraShrinkRowsKernel<8, true, false>, 8);
  }
  return warps == 16 ? launch(LoraShrinkRowsKernel<16, false, false>, 16) : launch(LoraShrinkRowsKernel<8, false, false>, 8);
}

namespace {
template <int kStages, bool kClasses>
cudaError_t LaunchLoraExpandStreamBuild(const LoraParams& p, const float* y, void* out, cudaStream_t stream) {
  constexpr int kSmem = StreamSmemBytes<kStages>();
  // More than the default 48 KB of dynamic shared memory, once per build of the kernel.
  static const cudaError_t attribute = cudaFuncSetAttribute(LoraExpandStreamKernel<kStages, kClasses>,
                                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attribute != cudaSuccess) return attribute;
  return LaunchMaybeDependent(p.overlap_shrink, LoraExpandStreamKernel<kStages, kClasses>, dim3(p.num_blocks),
                              dim3(kThreads), kSmem, stream, p, y, static_cast<bf16*>(out));
}

template <int kStages>
cudaError_t LaunchLoraExpandStream(const LoraParams& p, const float* y, void* out, cudaStream_t stream) {
  if (p.expand_classes != 0 && p.class_ends != nullptr) {
    return LaunchLoraExpandStreamBuild<kStages, true>(p, y, out, stream);
  }
  return LaunchLoraExpandStreamBuild<kStages, false>(p, y, out, stream);
}
}  // namespace

cudaError_t LaunchLoraExpand(const LoraParams& p, const float* y, void* out, cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0 || p.num_blocks <= 0 || p.slice_offsets[p.num_slices] == 0) {
    return cudaSuccess;
  }
  // As a programmatic dependent of the shrink: the expand loads B while the shrink still runs.
  if (p.expand_stages == 2 || p.expand_stages == 3) {
    return p.expand_stages == 2 ? LaunchLoraExpandStream<2>(p, y, out, stream) : LaunchLoraExpandStream<3>(p, y, out, stream);
  }
  return LaunchMaybeDependent(p.overlap_shrink, LoraExpandKernel, dim3(p.num_blocks), dim3(kThreads), 0, stream, p, y,
                              static_cast<bf16*>(out));
}

}  // namespace loraplex::ops::cuda
