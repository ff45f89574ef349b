// Launchers of the LoRA shrink (x·Aᵀ) and expand (out += scale·y·Bᵀ) kernels over adapter
// segments, for decode and small prefill steps. The kernels read the live segment count, slots and
// ranks from device memory and size their work from them, so launches can be captured in a CUDA
// graph and replayed with other batches.
// Thread-safe (stateless); launches that share `delta` must be stream-ordered.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/ops/cuda/lora_delta.h"

namespace loraplex::ops::cuda {

// Device layout of ops::LoraSliceWeights (cuda_ops.cc static_asserts that they match).
struct LoraSliceWeightsDev {
  const void* a;  // [rank, in_features] bf16
  const void* b;  // [slice_width, rank] bf16
  int32_t rank;
  float scale;
};

inline constexpr int kLoraMaxRank = 128;     // y columns a block stages per token in shared memory
// Tokens a LoRA step may have (LoraParams::num_tokens): the kernels number a step's work items in
// 32 bits, which this keeps far from overflowing.
inline constexpr int kLoraMaxStepTokens = 1 << 20;
inline constexpr int kLoraMaxSlices = kLoraDeltaMaxSlices;
// Ranks up to this are narrow (ops::kNarrowLoraRank; LoraParams::expand_classes).
inline constexpr int kLoraNarrowRank = 16;
// Rank classes (ops::LoraRankClass, LoraParams::class_ends) and the highest rank of class c.
inline constexpr int kLoraRankClasses = 4;
__host__ __device__ constexpr int LoraRankClassBound(int c) {
  return c == 0 ? kLoraNarrowRank : c == 1 ? 32 : c == 2 ? 64 : 128;
}
// Output columns of an expand work item when the step's ranks are <= 16; a bound of r > 16 gives
// kLoraExpandTile·16/r (so an item moves about the same bytes of B whatever the rank).
inline constexpr int kLoraExpandTile = 1024;
// Tokens of a segment an expand item takes by default (LoraParams::expand_tokens).
inline constexpr int kLoraExpandTokens = 2;
__host__ __device__ constexpr int LoraExpandTileWidth(int rank_bound) {
  return rank_bound <= 16 ? kLoraExpandTile : rank_bound >= kLoraExpandTile * 16 ? 1 : kLoraExpandTile * 16 / rank_bound;
}

// Expand tiles of width `tw` over the first num_slices slices of `offsets` (slice s is columns
// offsets[s]..offsets[s + 1]); N > num_slices. A fixed trip count, so device code indexes the
// parameter array with constants only.
template <int N>
__host__ __device__ inline int LoraExpandTiles(const int32_t (&offsets)[N], int num_slices, int tw) {
  int tiles = 0;
  for (int s = 0; s + 1 < N; ++s) {
    if (s < num_slices) tiles += (offsets[s + 1] - offsets[s] + tw - 1) / tw;
  }
  return tiles;
}

struct LoraParams {
  const LoraSliceWeightsDev* table = nullptr;  // [num_slots][num_slices]
  int32_t num_slots = 0;
  int32_t num_slices = 0;
  int32_t in_features = 0;                     // multiple of 8
  int32_t max_rank = 0;                        // <= kLoraMaxRank
  int32_t slice_offsets[kLoraMaxSlices + 1] = {};
  const int32_t* token_rows = nullptr;
  const int32_t* seg_starts = nullptr;
  const int32_t* seg_slots = nullptr;
  const int32_t* num_segments = nullptr;
  // [1] or null: a bound on every live segment's rank (LoraSegments::max_rank). The shrink makes
  // row items and the expand sizes its tiles for it rather than for max_rank.
  const int32_t* live_max_rank = nullptr;
  // [kLoraRankClasses] or null: the segments are ordered by rank class and class_ends[c] ends
  // class c's (LoraSegments::class_ends).
  const int32_t* class_ends = nullptr;
  int32_t max_segments = 0;
  int32_t segments_bound = 0;  // host only: LoraSegments::segments_bound, or max_segments without one
  int32_t num_tokens = 0;
  // Split-K scratch of the tensor-core shrink (lora_prefill.h): partial sums [splits, num_tokens,
  // num_slices·max_rank] F32.
  float* partials = nullptr;
  int32_t num_blocks = 0;  // blocks per launch; they walk the step's work items
  // Shrink only: warps a block (8 or 16; 0: 16 for in_features > kLoraShrinkWideInput, else 8). A
  // 16-warp block takes a whole SM's registers, so a grid of G blocks occupies G SMs.
  int32_t shrink_warps = 0;
  // Shrink only: its item shape. 0: 4 rows of A x up to 4 of a segment's tokens; 2: 4-16 rows x one
  // token at a time (ShrinkOneTokenItems: less work when segments hold one token); 1: the latter
  // when the step's mean segment length is below 2 tokens and 16-row items would fill a quarter of
  // the grid (OneTokenShape). The same y bits either way.
  int32_t shrink_shape = 0;
  // Shrink only: rows of A an item of the one-token shape (4, 8 or 16); 0: the most that still
  // give every block an item.
  int32_t shrink_rows = 0;
  // Shrink only: number only the step's real items (each (segment, slice) pair's rows up to its
  // own rank), evenly over the grid, from a prefix of the pairs' counts each block builds in
  // shared memory first; else every pair has items up to the step's rank bound and those past its
  // rank are skipped, so with mixed ranks some blocks get several real items while others idle.
  // For steps of more than 512 (segment, slice) pairs the plain numbering. The same y bits.
  bool shrink_balanced = false;
  // Shrink only (GemmWithLora's in-line chain): launch it as a programmatic dependent of the kernel
  // before it; while that kernel finishes, each block resolves its items and asks the L2 for
  // their rows of A. It reads x and writes y and the delta marks only after that kernel completed.
  bool prefetch_a = false;
  // Expand only: launch it as a programmatic dependent of the kernel before it (the shrink), so
  // it reads the segment arrays, slot table and B while that kernel still runs, and y and out
  // only after it has finished.
  bool overlap_shrink = true;
  // Expand only: 0 runs each block's items one after another, holding an item's B in registers
  // while it waits for y; 2 or 3 streams them (LoraExpandStreamKernel): each block keeps this many
  // items' tiles of B and their y in shared memory, copying the next ones (cp.async) while it
  // multiplies the current one. The same out or delta bits either way.
  int32_t expand_stages = 0;
  // Expand only, streamed (expand_stages 2 or 3), with class_ends: rank classes. 0: every
  // segment's items are streamed at the tile width of the step's rank bound. 1: class 0's
  // segments (ranks up to kLoraNarrowRank) take the item-by-item expand's items instead
  // (full-width tiles, kLoraExpandTokens tokens an item, B held in registers), numbered first; the
  // others are streamed as with 0. 2: as 1, and classes 1-3 are streamed each at its own tile
  // width, so an item moves about the same bytes of B whatever its rank. Ranks are clamped to
  // their class's bound. The same bits in every case.
  int32_t expand_classes = 0;
  // Expand only: about how many of a segment's tokens an item takes (the segment's tokens are
  // split over mean segment length / expand_tokens items, at most 64); 0: kLoraExpandTokens. Each
  // split reads the item's tile of B again; the same bits whatever the split.
  int32_t expand_tokens = 0;
  // Delta mode (GemmWithLora): the expand writes scale·y·Bᵀ into `delta` [delta_rows,
  // slice_offsets[num_slices]] (BF16 with bf16_delta, else F32) instead of adding it to out, and
  // sets delta_mask[row, slice] ([delta_rows, num_slices] bytes) for every (row, slice) it wrote;
  // the shrink of the same module clears delta_mask first (set it in both params). Rows of
  // segments must be < delta_rows.
  void* delta = nullptr;
  uint8_t* delta_mask = nullptr;
  int32_t delta_rows = 0;
  // Expand only: the product scale·y·Bᵀ is rounded to bf16 before it is added to out (in place)
  // or stored (a BF16 delta, half the bytes of an F32 one), as PEFT rounds lora_B's output. The
  // in-place and delta paths give the same bits either way.
  bool bf16_delta = false;
};

// Inputs wider than this run the shrink with 16 warps a block (else 8).
inline constexpr int kLoraShrinkWideInput = 8192;

// Grid of the shrink for a step of `num_tokens` tokens: the most items it can have at max_rank,
// capped at 3/4 of the SMs when it runs beside the GEMM, else at 2 blocks an SM (all resident).
int LoraShrinkBlocks(int num_sms, int num_tokens, int num_slices, int max_rank, bool beside_gemm = true);

// y[row, s·max_rank + j] = Σ_k x[row, k]·A_s[j, k] for j < rank of the segment's slot (fp32 sums
// in a fixed order, so results are deterministic). Other columns untouched.
// x [num_tokens, in_features] bf16 (16-byte aligned rows); y [num_tokens, num_slices·max_rank] F32.
cudaError_t LaunchLoraShrink(const LoraParams& p, const void* x, float* y, cudaStream_t stream);

// out[row, off_s + n] += scale·Σ_j y[row, s·max_rank + j]·B_s[n, j], fp32 math, one bf16 rounding
// (two with bf16_delta: the product, then the sum).
// y as above; out [num_tokens, slice_offsets[num_slices]] bf16, in place. With overlap_shrink, the
// kernel launched just before must not write the segment arrays, the slot table or B (the shrink
// does not); the launch still completes only after that kernel has.
// In delta mode `out` is not touched (see LoraParams::delta).
cudaError_t LaunchLoraExpand(const LoraParams& p, const float* y, void* out, cudaStream_t stream);

// The delta-mode expand's output as a view a consumer kernel can fold in (lora_delta.h).
LoraDeltaView LoraDeltaOf(const LoraParams& p);

}  // namespace loraplex::ops::cuda
