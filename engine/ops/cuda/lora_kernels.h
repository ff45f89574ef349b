// Launchers of the LoRA shrink (x·Aᵀ, rank-aware split-K) and expand (out += scale·y·Bᵀ) kernels
// over adapter segments. Grids cover capacities (max_segments, slices, K chunks / N tiles) and the
// kernels read the live segment count, slots and ranks from device memory, so launches can be
// captured in a CUDA graph and replayed with other batches. Thread-safe (stateless).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace loraplex::ops::cuda {

// Device layout of ops::LoraSliceWeights (cuda_ops.cc static_asserts that they match).
struct LoraSliceWeightsDev {
  const void* a;  // [rank, in_features] bf16
  const void* b;  // [slice_width, rank] bf16
  int32_t rank;
  float scale;
};

inline constexpr int kLoraMaxRank = 128;  // expand keeps a [rank, tile] block of B in shared memory

struct LoraParams {
  const LoraSliceWeightsDev* table = nullptr;  // [num_slots][num_slices]
  int32_t num_slots = 0;
  int32_t num_slices = 0;
  int32_t in_features = 0;        // multiple of 8
  int32_t max_rank = 0;           // <= kLoraMaxRank
  int32_t slice_offsets[5] = {};  // [num_slices + 1]
  const int32_t* token_rows = nullptr;
  const int32_t* seg_starts = nullptr;
  const int32_t* seg_slots = nullptr;
  const int32_t* num_segments = nullptr;
  int32_t max_segments = 0;
  int32_t num_tokens = 0;
};

// y[row, s·max_rank + j] = Σ_k x[row, k]·A_s[j, k] for j < rank of the segment's slot; zeroes
// those columns first, then accumulates K chunks with fp32 atomics. Other columns untouched.
// x [num_tokens, in_features] bf16 (16-byte aligned rows); y [num_tokens, num_slices·max_rank] F32.
cudaError_t LaunchLoraShrink(const LoraParams& p, const void* x, float* y, cudaStream_t stream);

// out[row, off_s + n] += scale·Σ_j y[row, s·max_rank + j]·B_s[n, j], fp32 math, one bf16 rounding.
// y as above; out [num_tokens, slice_offsets[num_slices]] bf16, in place.
cudaError_t LaunchLoraExpand(const LoraParams& p, const float* y, void* out, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
