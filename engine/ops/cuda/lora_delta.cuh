// Device helpers for kernels that fold a pending LoRA delta (lora_delta.h) into the values they
// load. Included only by .cu files of engine/ops/cuda.
#pragma once

#include "engine/ops/cuda/kernel_utils.cuh"
#include "engine/ops/cuda/lora_delta.h"

namespace loraplex::ops::cuda {

// The slice of output column `col` (constant indices only: a dynamically indexed parameter array
// would go through local memory).
__device__ __forceinline__ int LoraDeltaSlice(const LoraDeltaView& d, int64_t col) {
  int slice = 0;
#pragma unroll
  for (int s = 1; s < kLoraDeltaMaxSlices; ++s) {
    if (s < d.num_slices && col >= d.slice_offsets[s]) slice = s;
  }
  return slice;
}

// The delta of 8 output columns col..col+7 (col % 8 == 0, so one slice) of `row`, loaded
// together with its mark (one round trip): false when there is none to add.
__device__ __forceinline__ bool LoadLoraDelta8(const LoraDeltaView& d, int64_t row, int64_t col, float (&out)[8]) {
  if (d.delta == nullptr || row >= d.rows) return false;
  const uint8_t marked = d.mask[row * d.num_slices + LoraDeltaSlice(d, col)];
  const float4* p = reinterpret_cast<const float4*>(d.delta + row * d.width + col);
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
  return ToBf16(ToFloat(v) + __ldcg(d.delta + row * d.width + col));
}

// Σ_i b[i]·y[i] over 8 bf16 of b and 8 floats of y (16-byte aligned shared memory), in a fixed
// order: the expand's partial sums, which every kernel that applies B repeats bit for bit.
__device__ __forceinline__ float LoraDot8(const uint4& b, const float* y) {
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

// `row`'s slice weights under a row expand (lora_delta.h), the rank clamped to the step's bound as
// the expand clamps it; false when the row has none (no slot, rank 0). Reads only arrays the host
// wrote before the step (slot of the row, slot table, rank bound), so a kernel may call it before
// it waits for the kernel before it. The same answer in every thread of a row.
__device__ __forceinline__ bool ResolveLoraRow(const LoraRowExpandView& e, int64_t row, LoraSliceWeightsDev* w) {
  if (e.table == nullptr || row >= e.rows) return false;
  const int slot = e.row_slots[row];
  if (slot < 0 || slot >= e.num_slots) return false;
  const int bound = e.rank_bound == nullptr ? e.max_rank : min(max(*e.rank_bound, 0), e.max_rank);
  *w = e.table[slot];
  w->rank = min(w->rank, bound);
  return w->rank > 0;
}

// The expand's product for 8 columns col..col+7 of a row with weights `w` (resolved above) and the
// row's y in shared memory (w.rank floats, 16-byte aligned): d[c] = scale·Σ_j y[j]·B[col + c, j],
// summed exactly as LoraExpandKernel sums it (LoraDot8 partials for ranks of 8, 16, 32 or 64 with
// B 16-byte aligned; one element at a time otherwise).
__device__ __forceinline__ void LoraRowDelta8(const LoraSliceWeightsDev& w, int64_t col, const float* y_s,
                                              float (&d)[8]) {
  const int r = w.rank;
  const bf16* b = static_cast<const bf16*>(w.b) + col * r;
  const int nv = r / 8;
  if (r % 8 == 0 && (nv == 1 || nv == 2 || nv == 4 || nv == 8) && IsAligned16(w.b)) {
    float s[8] = {};
    for (int v = 0; v < nv; v += 2) {  // two vectors of 8 columns in flight: 16 loads
      uint4 bv[8][2];
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const uint4* row = reinterpret_cast<const uint4*>(b + static_cast<int64_t>(c) * r);
        bv[c][0] = __ldg(row + v);
        bv[c][1] = v + 1 < nv ? __ldg(row + v + 1) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        s[c] += LoraDot8(bv[c][0], y_s + 8 * v);
        if (v + 1 < nv) s[c] += LoraDot8(bv[c][1], y_s + 8 * (v + 1));
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) d[c] = __fmul_rn(w.scale, s[c]);
    return;
  }
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const bf16* b_row = b + static_cast<int64_t>(c) * r;
    float s = 0.0f;
    for (int j = 0; j < r; ++j) s += ToFloat(b_row[j]) * y_s[j];
    d[c] = __fmul_rn(w.scale, s);
  }
}

}  // namespace loraplex::ops::cuda
