// A LoRA delta that GemmWithLora computed beside its GEMM and left for the kernel that reads the
// GEMM's output next (cuda_ops.cc: "pending LoRA delta"). That kernel adds it while it loads the
// output, so the step needs no separate add kernel: for each (row, slice) the expand marked,
// out[row, c] becomes bf16(float(out[row, c]) + delta[row, c]) exactly as LaunchLoraDeltaAdd
// would leave it, and the consumer writes that value back, so memory ends up identical too.
// Plain C++ (no CUDA headers); the device helpers are in lora_delta.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace loraplex::ops::cuda {

inline constexpr int kLoraDeltaMaxSlices = 4;
inline constexpr int kLoraRowExpandMaxRank = 128;  // lora_kernels.h's kLoraMaxRank

// Device layout of ops::LoraSliceWeights (cuda_ops.cc static_asserts that they match).
struct LoraSliceWeightsDev {
  const void* a;  // [rank, in_features] bf16
  const void* b;  // [slice_width, rank] bf16
  int32_t rank;
  float scale;
};

struct LoraDeltaView {
  const float* delta = nullptr;   // [rows, width] F32; null: no delta to add
  const uint8_t* mask = nullptr;  // [rows, num_slices]: 1 where the expand wrote the slice's delta
  int32_t rows = 0;
  int32_t width = 0;              // slice_offsets[num_slices]; a multiple of 8
  int32_t num_slices = 0;
  int32_t slice_offsets[kLoraDeltaMaxSlices + 1] = {};  // multiples of 8

  __host__ __device__ bool empty() const { return delta == nullptr; }
};

// A one-slice expand (o's or down's) left for the AddRmsNorm that reads its GEMM output: instead of
// a delta, the norm gets the shrink's y and each row's slot, and computes the row's
// scale·y·Bᵀ itself while it loads the row (cuda_ops.cc: SetLoraNormExpandForTest). Every element
// gets the bits the expand kernel would give: the same sums in the same order, the product
// rounded on its own, then bf16(float(out) + product).
struct LoraRowExpandView {
  const LoraSliceWeightsDev* table = nullptr;  // [num_slots] (one slice); null: nothing to apply
  const int32_t* row_slots = nullptr;          // [rows] slot of each row, -1 for none
  const int32_t* rank_bound = nullptr;         // [1] or null: LoraParams::live_max_rank
  const float* y = nullptr;                    // [rows, y_stride] F32; the row's rank columns first
  int64_t y_stride = 0;
  int32_t num_slots = 0;
  int32_t rows = 0;
  int32_t max_rank = 0;  // <= kLoraRowExpandMaxRank

  __host__ __device__ bool empty() const { return table == nullptr; }
};

// out[row, c] = bf16(float(out[row, c]) + delta[row, c]) wherever the mask is set; other elements
// keep their bits. out [rows, width] bf16, 16-byte aligned. Nothing for an empty view.
cudaError_t LaunchLoraDeltaAdd(const LoraDeltaView& d, void* out, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
