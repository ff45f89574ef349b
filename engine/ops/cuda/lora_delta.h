// A LoRA delta that GemmWithLora computed beside its GEMM and left for the kernel that reads the
// GEMM's output next (cuda_ops.cc: "pending LoRA delta"). That kernel adds it while it loads the
// output, so the step needs no separate add kernel: for each (row, slice) the expand marked,
// out[row, c] becomes bf16(float(out[row, c]) + float(delta[row, c])) exactly as LaunchLoraDeltaAdd
// would leave it, and the consumer writes that value back, so memory ends up identical too.
// Plain C++ (no CUDA headers); the device helpers are in lora_delta.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace loraplex::ops::cuda {

inline constexpr int kLoraDeltaMaxSlices = 4;

struct LoraDeltaView {
  const void* delta = nullptr;    // [rows, width] BF16 (bf16) or F32; null: no delta to add
  bool bf16 = false;
  const uint8_t* mask = nullptr;  // [rows, num_slices]: 1 where the expand wrote the slice's delta
  int32_t rows = 0;
  int32_t width = 0;              // slice_offsets[num_slices]; a multiple of 8
  int32_t num_slices = 0;
  int32_t slice_offsets[kLoraDeltaMaxSlices + 1] = {};  // multiples of 8

  __host__ __device__ bool empty() const { return delta == nullptr; }
};

// out[row, c] = bf16(float(out[row, c]) + delta[row, c]) wherever the mask is set; other elements
// keep their bits. out [rows, width] bf16, 16-byte aligned. Nothing for an empty view.
cudaError_t LaunchLoraDeltaAdd(const LoraDeltaView& d, void* out, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
