// Device helpers for kernels that fold a pending LoRA delta (lora_delta.h) into the values they
// load. Included only by .cu files of engine/ops/cuda.
#pragma once

#include "engine/ops/cuda/kernel_utils.cuh"
#include "engine/ops/cuda/lora_delta.h"

namespace loraplex::ops::cuda {

__device__ __forceinline__ int LoraDeltaSlice(const LoraDeltaView& d, int64_t col) {
  return SliceOfColumn<kLoraDeltaMaxSlices>(d.slice_offsets, d.num_slices, col);
}

// The delta of 8 output columns col..col+7 (col % 8 == 0, so one slice) of `row`, loaded
// together with its mark (one round trip): false when there is none to add.
__device__ __forceinline__ bool LoadLoraDelta8(const LoraDeltaView& d, int64_t row, int64_t col, float (&out)[8]) {
  if (d.delta == nullptr || row >= d.rows) return false;
  const uint8_t marked = d.mask[row * d.num_slices + LoraDeltaSlice(d, col)];
  const int64_t at = row * d.width + col;
  if (d.bf16) {
    Unpack8(__ldcg(reinterpret_cast<const uint4*>(static_cast<const bf16*>(d.delta) + at)), out);
    return marked != 0;
  }
  const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(d.delta) + at);
  const float4 a = __ldcg(p);
  const float4 b = __ldcg(p + 1);
  out[0] = a.x;
  out[1] = a.y;
  out[2] = a.z;
  out[3] = a.w;
  out[4] = b.x;
  out[5] = b.y;
  out[6] = b.z;
  out[7] = b.w;
  return marked != 0;
}

// v: 8 bf16-exact values of the GEMM output; adds the delta with the add kernel's rounding.
__device__ __forceinline__ void AddLoraDelta8(float (&v)[8], const float (&delta)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = ToFloat(ToBf16(v[k] + delta[k]));
}

// One element: the value the add kernel would leave at (row, col) of the output, given its bits
// `v`; *changed (when not null): whether the element was marked.
__device__ __forceinline__ bf16 FoldLoraDelta1(const LoraDeltaView& d, int64_t row, int64_t col, bf16 v,
                                               bool* changed = nullptr) {
  if (changed != nullptr) *changed = false;
  if (d.delta == nullptr || row >= d.rows) return v;
  if (!d.mask[row * d.num_slices + LoraDeltaSlice(d, col)]) return v;
  if (changed != nullptr) *changed = true;
  const int64_t at = row * d.width + col;
  const float delta =
      d.bf16 ? __uint_as_float(static_cast<uint32_t>(__ldcg(static_cast<const uint16_t*>(d.delta) + at)) << 16)
             : __ldcg(static_cast<const float*>(d.delta) + at);
  return ToBf16(ToFloat(v) + delta);
}

}  // namespace loraplex::ops::cuda
