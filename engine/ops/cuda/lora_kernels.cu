// LoRA shrink and expand over adapter segments (tokens sorted by adapter slot).
//
// Both kernels are bandwidth kernels in decode: what they must move is each active adapter's A
// and B once per step. So each work item streams a contiguous piece of one adapter's weights with
// 16-byte loads (cp.async into shared memory, or into registers), many in flight, and a fixed grid
// of persistent blocks (a few per SM) walks all items, so no block waits on an empty one and a
// captured graph needs no grid resize. Split factors come from the live segments on the device.
//
// Work is numbered per live (segment, slice) pair: every block loads the pairs' ranks in
// parallel, prefix-sums each pair's item count in shared memory and binary-searches its own items
// in it. A pair's item count is proportional to its bytes (width x rank), so a batch of mixed
// ranks costs in proportion to its ranks, not to the largest; rank-0 slices and empty segments
// get no items at all.
//
// Shrink: item = (segment, slice, token split, 16-row stage, K chunk of up to 2048). The block
// copies its rows of A's chunk into shared memory (cp.async, up to 64 KB in flight), then each
// warp takes 2 rows, streams the item's tokens past them and warp-reduces each dot product.
// K chunks write fp32 partials; the last block to finish a (segment, slice, token split) sums them
// in chunk order into y (no atomics on y, no zeroing pass, no grid-wide barrier).
// Expand: item = (segment, output tile of one slice, token split), the tile 64/rank columns a
// thread (32 KB of B an item at ranks 8..64). A thread keeps the B rows (rank bf16 each,
// contiguous) of its columns in registers and applies them to each token. It adds into the
// output in place, or (GemmWithLora) writes scale·y·Bᵀ into an F32 delta buffer and marks the
// (row, slice) pairs it wrote, so it can run beside the GEMM; LoraAddDelta then folds the delta in.
#include "engine/ops/cuda/lora_kernels.h"

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kStep = kWarpSize * 8;       // K elements a warp covers with one 16-byte vector a lane
constexpr int kMaxStepsPerSplit = 8;       // K chunk of a split: up to 8 warp steps (2048 elements)
constexpr int kStageRows = 16;             // A rows a block stages in shared memory at once
constexpr int kRowsPerWarp = kStageRows / (kThreads / kWarpSize);
constexpr int kStageRowVecs = kMaxStepsPerSplit * kWarpSize;  // 16-byte vectors of a staged row
// A stage (16 rows x 2048 bf16 = 64 KB) plus one token's x chunk (4 KB): three blocks fit an SM.
constexpr int kShrinkSmemBytes = (kStageRows + 1) * kStageRowVecs * 16;
constexpr int kTokensPerItem = 2;          // tokens an item handles one after another (latency-bound)
constexpr int kMaxTokenSplits = 64;
constexpr int kExpandBlocksPerSm = 2;  // register cap 128: the expand holds B vectors in registers
constexpr int kShrinkBlocksPerSm = 3;  // register cap 85: A is staged in shared memory
constexpr int kAddThreads = 256;

// Programmatic dependent launch (sm_90): the expand is launched while the shrink still runs, loads
// its B rows, then waits here for the shrink's y. A no-op in a kernel not launched that way.
__device__ __forceinline__ void WaitForPrecedingKernel() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void AllowDependentLaunch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_all;" ::: "memory"); }

__device__ __forceinline__ uint4 Load8(const bf16* p, bool aligned) {
  if (aligned) return __ldg(reinterpret_cast<const uint4*>(p));
  uint4 v;
  uint16_t* h = reinterpret_cast<uint16_t*>(&v);
  const uint16_t* s = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = s[i];
  return v;
}

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

// Σ_i b[i]·y[i] over 8 bf16 of b and 8 floats of y (16-byte aligned shared memory).
__device__ __forceinline__ float Dot8(const uint4& b, const float* y) {
  const __nv_bfloat162* hb = reinterpret_cast<const __nv_bfloat162*>(&b);
  const float4 y0 = *reinterpret_cast<const float4*>(y);
  const float4 y1 = *reinterpret_cast<const float4*>(y + 4);
  const float yv[8] = {y0.x, y0.y, y0.z, y0.w, y1.x, y1.y, y1.z, y1.w};
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fb = __bfloat1622float2(hb[i]);
    s = fmaf(fb.x, yv[2 * i], s);
    s = fmaf(fb.y, yv[2 * i + 1], s);
  }
  return s;
}

// Resolves a segment to its token range and the slice weights it uses; false when there is
// nothing to do (no adapter, rank 0, no tokens). The same answer in every thread.
__device__ __forceinline__ bool ResolveSegment(const LoraParams& p, int seg, int slice, int* begin,
                                               int* end, LoraSliceWeightsDev* w) {
  const int slot = p.seg_slots[seg];
  if (slot < 0 || slot >= p.num_slots) return false;
  *w = p.table[static_cast<int64_t>(slot) * p.num_slices + slice];
  w->rank = min(w->rank, p.max_rank);  // a larger rank would spill into the next slice
  if (w->rank <= 0) return false;
  *begin = max(p.seg_starts[seg], 0);
  *end = min(p.seg_starts[seg + 1], p.num_tokens);
  return *begin < *end;
}

// Live segments and how many ways each segment's tokens are split (about kTokensPerItem tokens an
// item, from the mean segment length over all rows, which needs no second dependent load; 1 in
// decode). Identical in every thread of the launch.
__device__ __forceinline__ void LiveSegments(const LoraParams& p, int max_token_splits, int* nseg,
                                             int* token_splits) {
  *nseg = min(max(*p.num_segments, 0), p.max_segments);
  *token_splits = 1;
  if (*nseg == 0) return;
  const int mean = p.num_tokens / *nseg;
  *token_splits = max(1, min(mean / kTokensPerItem, max_token_splits));
}

// Shared memory of the work walk: an inclusive prefix of item counts over up to kThreads pairs.
struct WalkSmem {
  int scan[kThreads];
  int warp_sums[kWarps];
};

// Inclusive prefix sum of `v` over the block into ws.scan; returns the block's total. Every
// thread must call it (it contains __syncthreads).
__device__ __forceinline__ int BlockInclusiveScan(int v, WalkSmem& ws) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += u;
  }
  __syncthreads();  // readers of the previous scan are done
  if (lane == kWarpSize - 1) ws.warp_sums[warp] = v;
  __syncthreads();
  for (int i = 0; i < warp; ++i) v += ws.warp_sums[i];
  ws.scan[threadIdx.x] = v;
  __syncthreads();
  return ws.scan[kThreads - 1];
}

// Sum of count(i) over pairs 0 .. num_pairs-1, in every thread.
template <typename Count>
__device__ __forceinline__ int64_t TotalItems(int num_pairs, const Count& count, WalkSmem& ws) {
  int64_t total = 0;
  for (int c0 = 0; c0 < num_pairs; c0 += kThreads) {
    const int i = c0 + threadIdx.x;
    total += BlockInclusiveScan(i < num_pairs ? count(i) : 0, ws);
  }
  return total;
}

// Calls body(pair, local) for this block's share of the items: pair i owns count(i)·per_unit
// consecutive item numbers (pairs in order), and the block takes item numbers blockIdx.x,
// blockIdx.x + gridDim.x, ... `local` is the item's index within its pair. Every thread calls it
// and `body` runs in every thread for every item (so it may use __syncthreads).
template <typename Count, typename Body>
__device__ __forceinline__ void ForEachItem(int num_pairs, int per_unit, const Count& count, const Body& body,
                                            WalkSmem& ws) {
  int64_t first = 0;  // item number of the chunk's first item
  int64_t next = blockIdx.x;
  for (int c0 = 0; c0 < num_pairs; c0 += kThreads) {
    const int i = c0 + threadIdx.x;
    const int total = BlockInclusiveScan(i < num_pairs ? count(i) * per_unit : 0, ws);
    while (next < first + total) {
      const int local = static_cast<int>(next - first);
      int lo = 0, hi = kThreads - 1;  // the first pair whose inclusive prefix passes `local`
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (ws.scan[mid] > local) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      body(c0 + lo, local - (lo > 0 ? ws.scan[lo - 1] : 0));
      next += gridDim.x;
    }
    first += total;
  }
}

__global__ void __launch_bounds__(kThreads, kShrinkBlocksPerSm)
    LoraShrinkKernel(LoraParams p, const bf16* __restrict__ x, float* __restrict__ y) {
  extern __shared__ uint4 shrink_smem[];
  uint4* a_s = shrink_smem;                                // [kStageRows][kStageRowVecs]
  uint4* x_s = shrink_smem + kStageRows * kStageRowVecs;  // [kStageRowVecs]
  __shared__ int last_block;
  __shared__ WalkSmem ws;
  AllowDependentLaunch();  // the expand may take SMs this launch leaves idle; it waits for y itself
  const int S = p.num_slices;
  // GemmWithLora's expand marks the (row, slice) pairs it writes into the delta buffer: start
  // from none (the expand runs after this kernel has completed).
  if (p.delta_mask != nullptr) {
    const int64_t n = static_cast<int64_t>(p.delta_rows) * S;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
         e += static_cast<int64_t>(gridDim.x) * kThreads) {
      p.delta_mask[e] = 0;
    }
  }
  int nseg, token_splits;
  // Counters are per (segment, slice, token split): the split count must fit the counter array.
  LiveSegments(p, max(1, min(kMaxTokenSplits, p.counter_capacity / max(1, p.max_segments * S))), &nseg,
               &token_splits);
  if (nseg == 0) return;
  const int K = p.in_features;
  const int steps_total = (K + kStep - 1) / kStep;
  const int min_splits = (steps_total + kMaxStepsPerSplit - 1) / kMaxStepsPerSplit;
  const int max_splits = max(min_splits, min(steps_total, p.max_splits));
  // A unit = (segment, slice, token split, 16-row stage of the slot's real rank), so a rank-64
  // adapter is spread over 4x the blocks of a rank-16 one instead of making its blocks 4x longer.
  const auto units = [&](int pair) -> int {
    int begin = 0, end = 0;
    LoraSliceWeightsDev w;
    if (!ResolveSegment(p, pair / S, pair % S, &begin, &end, &w)) return 0;
    return (w.rank + kStageRows - 1) / kStageRows * min(token_splits, end - begin);
  };
  const int num_pairs = nseg * S;
  const int64_t total_units = TotalItems(num_pairs, units, ws);
  if (total_units == 0) return;
  // As many items as persistent blocks where the K chunks allow (one round, no tail), never fewer
  // splits than a 2048-element chunk needs.
  int splits = static_cast<int>(min(max(static_cast<int64_t>(p.num_blocks) / total_units,
                                        static_cast<int64_t>(min_splits)),
                                    static_cast<int64_t>(max_splits)));
  const int steps_per_split = (steps_total + splits - 1) / splits;
  splits = (steps_total + steps_per_split - 1) / steps_per_split;

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t y_row = static_cast<int64_t>(S) * p.max_rank;
  const int64_t partial_stride = static_cast<int64_t>(p.num_tokens) * y_row;  // one K chunk's partials

  ForEachItem(num_pairs, splits, units, [&](int pair, int local) {
    const int seg = pair / S;
    const int slice = pair % S;
    int begin = 0, end = 0;
    LoraSliceWeightsDev w;
    ResolveSegment(p, seg, slice, &begin, &end, &w);  // true: the pair has items
    const int stages = (w.rank + kStageRows - 1) / kStageRows;
    const int ks = local % splits;
    const int unit = local / splits;
    const int stage = unit % stages;
    const int ts = unit / stages;  // < min(token_splits, end - begin)
    const int first = begin + ts;
    const int r0 = stage * kStageRows;
    const bf16* a = static_cast<const bf16*>(w.a);
    const bool a_vec = IsAligned16(a);
    const int step0 = ks * steps_per_split;
    const int nsteps = min(steps_per_split, steps_total - step0);
    const int col = slice * p.max_rank;
    float* dst = splits > 1 ? p.partials + ks * partial_stride : y;

    // The stage's rows of A's chunk go to shared memory through cp.async (16 bytes a copy, all in
    // flight at once, no registers held), with the first token's x beside them.
    const int chunk_vecs = nsteps * kWarpSize;  // 16-byte vectors of one row's chunk
    const int64_t k0 = static_cast<int64_t>(step0) * kStep;
    const bf16* x_first = x + static_cast<int64_t>(p.token_rows[first]) * K;
    {
      const int rows = min(kStageRows, w.rank - r0);
      __syncthreads();  // the previous item no longer reads the buffers
      for (int e = threadIdx.x; e < rows * chunk_vecs; e += kThreads) {
        const int rr = e / chunk_vecs;
        const int v = e - rr * chunk_vecs;
        if (k0 + v * 8 >= K) continue;
        const bf16* src = a + static_cast<int64_t>(r0 + rr) * K + k0 + v * 8;
        if (a_vec) {
          CpAsync16(&a_s[rr * kStageRowVecs + v], src);
        } else {
          a_s[rr * kStageRowVecs + v] = Load8(src, false);
        }
      }
      for (int v = threadIdx.x; v < chunk_vecs; v += kThreads) {
        if (k0 + v * 8 < K) CpAsync16(&x_s[v], x_first + k0 + v * 8);
      }
      CpAsyncWaitAll();
      __syncthreads();
      for (int idx = first; idx < end; idx += token_splits) {
        const int64_t row = p.token_rows[idx];
        float s[kRowsPerWarp] = {};
#pragma unroll
        for (int i = 0; i < kMaxStepsPerSplit; ++i) {
          const int v = lane + i * kWarpSize;
          if (i < nsteps && k0 + v * 8 < K) {
            const uint4 xv = idx == first ? x_s[v] : __ldg(reinterpret_cast<const uint4*>(x + row * K + k0) + v);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) {
              const int rr = warp + r * kWarps;
              if (rr < rows) s[r] += Dot8(a_s[rr * kStageRowVecs + v], xv);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int rr = warp + r * kWarps;
          if (rr >= rows) break;  // the same in every lane
          const float sum = WarpSum(s[r]);
          if (lane == 0) dst[row * y_row + col + r0 + rr] = sum;
        }
      }
    }
    if (splits == 1) return;

    // Publish this chunk's partials; the last chunk of the group to arrive reduces them.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      int* counter = p.counters + (static_cast<int64_t>(seg) * S + slice) * token_splits + ts;
      const int arrived = atomicAdd(counter, 1) + 1;
      last_block = arrived == splits * stages;  // every chunk of every stage
      if (last_block) atomicExch(counter, 0);  // ready for the next launch
    }
    __syncthreads();
    if (last_block) {
      __threadfence();
      const int count = (end - first + token_splits - 1) / token_splits;
      for (int e = threadIdx.x; e < count * w.rank; e += kThreads) {
        const int i = e / w.rank;
        const int j = e - i * w.rank;
        const int64_t at = static_cast<int64_t>(p.token_rows[first + i * token_splits]) * y_row + col + j;
        float s = 0.0f;
        for (int c = 0; c < splits; ++c) s += __ldcg(p.partials + c * partial_stride + at);
        y[at] = s;
      }
    }
    __syncthreads();  // last_block is rewritten by the next item
  }, ws);
}

// Output columns a thread of an expand item covers for a slot of rank `rank`: 64/rank, so an item
// moves about 32 KB of B whatever the rank (8 columns at rank 8 .. 1 at rank 64 and above).
__device__ __forceinline__ int ExpandColumnsPerThread(int rank) { return min(8, max(1, 64 / rank)); }

// One expand work item: columns n0 + threadIdx.x + c·kThreads (c < cpt) of one slice for the
// tokens first, first + step, ... < end. NV > 0: rank = 8·NV and B 16-byte aligned, so a column's
// B row is NV vectors held in registers across tokens (cpt = 8/NV columns: 8 vectors a thread in
// flight). NV = 0: any rank, B rows streamed through L1 per token, one column at a time.
// Writes out[row, out_col + n] += scale·s in place, or with p.delta delta[row, out_col + n] =
// scale·s and delta_mask[row, slice] = 1.
template <int NV>
__device__ __forceinline__ void ExpandItem(const LoraParams& p, const LoraSliceWeightsDev& w, int slice, int width,
                                           int n0, int cpt, int first, int end, int step, int64_t y_col,
                                           int64_t out_col, const float* __restrict__ y, bf16* __restrict__ out,
                                           float* y_s) {
  constexpr int kCpt = NV == 0 ? 1 : 8 / NV;
  constexpr int kHeld = NV == 0 ? 1 : NV;
  const int r = w.rank;
  const int64_t y_row = static_cast<int64_t>(p.num_slices) * p.max_rank;
  const int64_t out_row = p.slice_offsets[p.num_slices];
  const bf16* b = static_cast<const bf16*>(w.b);
  for (int c0 = 0; c0 < cpt; c0 += kCpt) {
    uint4 bv[kCpt][kHeld];
    bool valid[kCpt];
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      const int n = n0 + threadIdx.x + (c0 + c) * kThreads;
      valid[c] = c0 + c < cpt && n < width;
#pragma unroll
      for (int v = 0; v < kHeld; ++v) {
        bv[c][v] = (NV > 0 && valid[c]) ? __ldg(reinterpret_cast<const uint4*>(b + static_cast<int64_t>(n) * r) + v)
                                        : make_uint4(0, 0, 0, 0);
      }
    }
    WaitForPrecedingKernel();  // y (and out, the delta mask) are the preceding kernels' outputs
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
        const int64_t at = row * out_row + out_col + n;
        if (p.delta != nullptr) {
          p.delta[at] = __fmul_rn(w.scale, s);
        } else {
          // The product rounded on its own (no fused multiply-add), as the delta path stores it:
          // both paths give the same bits.
          out[at] = ToBf16(ToFloat(out[at]) + __fmul_rn(w.scale, s));
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, kExpandBlocksPerSm)
    LoraExpandKernel(LoraParams p, const float* __restrict__ y, bf16* __restrict__ out) {
  __shared__ __align__(16) float y_s[kLoraMaxRank];
  __shared__ WalkSmem ws;
  const int S = p.num_slices;
  int nseg, token_splits;
  LiveSegments(p, kMaxTokenSplits, &nseg, &token_splits);
  // Items of a pair: (output tile, token split), the tile ExpandColumnsPerThread(rank)·kThreads
  // columns wide.
  const auto items = [&](int pair) -> int {
    int begin = 0, end = 0;
    LoraSliceWeightsDev w;
    const int slice = pair % S;
    if (!ResolveSegment(p, pair / S, slice, &begin, &end, &w)) return 0;
    const int width = p.slice_offsets[slice + 1] - p.slice_offsets[slice];
    const int tile = ExpandColumnsPerThread(w.rank) * kThreads;
    return (width + tile - 1) / tile * min(token_splits, end - begin);
  };
  ForEachItem(nseg * S, 1, items, [&](int pair, int local) {
    const int seg = pair / S;
    const int slice = pair % S;
    int begin = 0, end = 0;
    LoraSliceWeightsDev w;
    ResolveSegment(p, seg, slice, &begin, &end, &w);  // true: the pair has items
    const int splits_here = min(token_splits, end - begin);
    const int ts = local % splits_here;
    const int tile = local / splits_here;
    const int cpt = ExpandColumnsPerThread(w.rank);
    const int first = begin + ts;
    const int width = p.slice_offsets[slice + 1] - p.slice_offsets[slice];
    const int n0 = tile * cpt * kThreads;
    const int64_t y_col = static_cast<int64_t>(slice) * p.max_rank;
    const int64_t out_col = p.slice_offsets[slice];
    const int nv = IsAligned16(w.b) && w.rank % 8 == 0 ? w.rank / 8 : 0;
    switch (nv) {  // the ranks adapters use get register-held B rows; others the general path
      case 1: ExpandItem<1>(p, w, slice, width, n0, cpt, first, end, token_splits, y_col, out_col, y, out, y_s); break;
      case 2: ExpandItem<2>(p, w, slice, width, n0, cpt, first, end, token_splits, y_col, out_col, y, out, y_s); break;
      case 4: ExpandItem<4>(p, w, slice, width, n0, cpt, first, end, token_splits, y_col, out_col, y, out, y_s); break;
      case 8: ExpandItem<8>(p, w, slice, width, n0, cpt, first, end, token_splits, y_col, out_col, y, out, y_s); break;
      default: ExpandItem<0>(p, w, slice, width, n0, cpt, first, end, token_splits, y_col, out_col, y, out, y_s); break;
    }
  }, ws);
  // Every block waits before it exits, so the launch's completion implies the shrink's: the next
  // kernel on the stream (another module's shrink reusing the split-K scratch) relies on it.
  WaitForPrecedingKernel();
}

struct AddDeltaParams {
  const float* delta;
  const uint8_t* mask;
  int32_t rows;
  int32_t num_slices;
  int32_t slice_offsets[kLoraMaxSlices + 1];
};

// out[row, c..c+7] = bf16(float(out) + delta) where the expand marked (row, slice of c); one
// thread per 8 columns. The mask, delta and out loads are issued together (one round trip); rows
// the expand did not mark keep their bits.
__global__ void __launch_bounds__(kAddThreads) LoraAddDeltaKernel(AddDeltaParams p, bf16* __restrict__ out) {
  // Constant indices only (a dynamically indexed parameter array would go through local memory).
  int width = p.slice_offsets[1];
#pragma unroll
  for (int s = 2; s <= kLoraMaxSlices; ++s) {
    if (s <= p.num_slices) width = p.slice_offsets[s];
  }
  const int vecs_per_row = width / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kAddThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.rows) * vecs_per_row) return;
  const int64_t row = idx / vecs_per_row;
  const int col = static_cast<int>(idx - row * vecs_per_row) * 8;
  int slice = 0;
#pragma unroll
  for (int s = 1; s < kLoraMaxSlices; ++s) {
    if (s < p.num_slices && col >= p.slice_offsets[s]) slice = s;
  }
  const int64_t at = row * width + col;
  const uint8_t marked = p.mask[row * p.num_slices + slice];
  const float4 d0 = __ldcg(reinterpret_cast<const float4*>(p.delta + at));
  const float4 d1 = __ldcg(reinterpret_cast<const float4*>(p.delta + at) + 1);
  uint4* o = reinterpret_cast<uint4*>(out + at);
  const uint4 ov = *o;
  if (!marked) return;
  float f[8];
  Unpack8(ov, f);
  f[0] += d0.x;
  f[1] += d0.y;
  f[2] += d0.z;
  f[3] += d0.w;
  f[4] += d1.x;
  f[5] += d1.y;
  f[6] += d1.z;
  f[7] += d1.w;
  *o = Pack8(f);
}

}  // namespace

int LoraShrinkMinSplits(int in_features) {
  const int steps = (in_features + kStep - 1) / kStep;
  return (steps + kMaxStepsPerSplit - 1) / kMaxStepsPerSplit;
}

cudaError_t PrepareLoraKernels() {
  return cudaFuncSetAttribute(LoraShrinkKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShrinkSmemBytes);
}

cudaError_t LaunchLoraShrink(const LoraParams& p, const void* x, float* y, cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0 || p.num_blocks <= 0) return cudaSuccess;
  LoraShrinkKernel<<<p.num_blocks, kThreads, kShrinkSmemBytes, stream>>>(p, static_cast<const bf16*>(x), y);
  return cudaGetLastError();
}

cudaError_t LaunchLoraExpand(const LoraParams& p, const float* y, void* out, cudaStream_t stream) {
  if (p.max_segments == 0 || p.num_slices == 0 || p.num_blocks <= 0 || p.slice_offsets[p.num_slices] == 0) {
    return cudaSuccess;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.num_blocks);
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = p.overlap_shrink ? 1 : 0;
  return cudaLaunchKernelEx(&config, LoraExpandKernel, p, y, static_cast<bf16*>(out));
}

cudaError_t LaunchLoraAddDelta(const LoraParams& p, void* out, cudaStream_t stream) {
  const int width = p.slice_offsets[p.num_slices];
  const int64_t threads = static_cast<int64_t>(p.delta_rows) * (width / 8);
  if (threads == 0) return cudaSuccess;
  AddDeltaParams a;
  a.delta = p.delta;
  a.mask = p.delta_mask;
  a.rows = p.delta_rows;
  a.num_slices = p.num_slices;
  for (int s = 0; s <= kLoraMaxSlices; ++s) a.slice_offsets[s] = p.slice_offsets[s];
  const int64_t blocks = (threads + kAddThreads - 1) / kAddThreads;
  LoraAddDeltaKernel<<<static_cast<unsigned>(blocks), kAddThreads, 0, stream>>>(a, static_cast<bf16*>(out));
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
