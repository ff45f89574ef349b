// Device helpers for kernels that read a GEMM output pending as LoRA rows (lora_rows.h) and add
// its LoRA as they load it. Included only by .cu files of engine/ops/cuda.
#pragma once

#include "engine/ops/cuda/kernel_utils.cuh"
#include "engine/ops/cuda/lora_rows.h"

namespace loraplex::ops::cuda {

__device__ __forceinline__ int LoraRowsSliceOf(const LoraRowsView& v, int64_t col) {
  return SliceOfColumn<kLoraMaxSlices>(v.slice_offsets, v.num_slices, col);
}

__device__ __forceinline__ int32_t LoraRowsSliceStart(const LoraRowsView& v, int slice) {
  int32_t off = 0;
#pragma unroll
  for (int s = 1; s < kLoraMaxSlices; ++s) {
    if (s == slice) off = v.slice_offsets[s];
  }
  return off;
}

// What one row needs to add the LoRA of one slice: its shrink values and the adapter's B.
struct LoraRowsSlice {
  float u[kLoraRowsRank];
  const bf16* b = nullptr;  // [slice width, stride] bf16
  int stride = 0;           // the adapter's rank for this slice (B's row length)
  int rank = 0;             // min(stride, kLoraRowsRank): the terms summed
  float scale = 0.0f;
  int32_t start = 0;        // the slice's first output column
};

// Loads row `row`'s shrink values and its adapter's B for `slice`; false when the row has no
// adapter there (no position, or rank 0 at its position). The shrink values are 16-byte aligned
// (the executor registers only weights whose rows and columns are multiples of 8).
__device__ __forceinline__ bool LoadLoraRowsSlice(const LoraRowsView& v, int64_t row, int slice, LoraRowsSlice* out) {
  const int pos = v.row_pos[row];
  if (pos < 0 || pos >= kLoraRowsPositions) return false;
  const LoraSliceWeightsDev w = v.info[pos * kLoraMaxSlices + slice];
  if (w.rank <= 0 || w.b == nullptr) return false;
  out->b = static_cast<const bf16*>(w.b);
  out->stride = w.rank;
  out->rank = w.rank < kLoraRowsRank ? w.rank : kLoraRowsRank;
  out->scale = w.scale;
  out->start = LoraRowsSliceStart(v, slice);
  const uint4* u = reinterpret_cast<const uint4*>(static_cast<const bf16*>(v.src) + row * v.stride + v.u_col +
                                                  (static_cast<int64_t>(pos) * v.num_slices + slice) * kLoraRowsRank);
  float lo[8], hi[8];
  Unpack8(u[0], lo);
  Unpack8(u[1], hi);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    out->u[j] = lo[j];
    out->u[8 + j] = hi[j];
  }
  return true;
}

// bf16(scale·Σ_j u_j·B[n, j]) as a float, for output column `col` of the slice.
__device__ __forceinline__ float LoraRowsDelta(const LoraRowsSlice& s, int64_t col) {
  const bf16* b = s.b + (col - s.start) * s.stride;
  float acc = 0.0f;
  if (s.rank == kLoraRowsRank && s.stride == kLoraRowsRank && IsAligned16(b)) {
    float lo[8], hi[8];
    Unpack8(reinterpret_cast<const uint4*>(b)[0], lo);
    Unpack8(reinterpret_cast<const uint4*>(b)[1], hi);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += s.u[j] * lo[j];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += s.u[8 + j] * hi[j];
  } else {
#pragma unroll
    for (int j = 0; j < kLoraRowsRank; ++j) {
      if (j < s.rank) acc += s.u[j] * ToFloat(b[j]);
    }
  }
  return ToFloat(ToBf16(s.scale * acc));
}

// The value y[row, col] gets: the GEMM's, with the row's LoRA added (the delta path's rounding).
__device__ __forceinline__ bf16 LoraRowsValue1(const LoraRowsView& v, int64_t row, int64_t col) {
  const bf16 y = static_cast<const bf16*>(v.src)[row * v.stride + col];
  LoraRowsSlice s;
  if (!LoadLoraRowsSlice(v, row, LoraRowsSliceOf(v, col), &s)) return y;
  return ToBf16(ToFloat(y) + LoraRowsDelta(s, col));
}

// The weights of `slice` at every position (LoraRowsView::info), loaded with whatever else the
// caller loads first, so nothing waits on a row's position before B.
__device__ __forceinline__ void LoadLoraRowsWeights(const LoraRowsView& v, int slice,
                                                    LoraSliceWeightsDev (&at)[kLoraRowsPositions]) {
#pragma unroll
  for (int p = 0; p < kLoraRowsPositions; ++p) at[p] = v.info[p * kLoraMaxSlices + slice];
}

// at[p] for a position p (selected in registers, not indexed through local memory).
__device__ __forceinline__ LoraSliceWeightsDev LoraRowsWeightsAt(const LoraSliceWeightsDev (&at)[kLoraRowsPositions],
                                                                 int p) {
  LoraSliceWeightsDev w = at[0];
#pragma unroll
  for (int pp = 1; pp < kLoraRowsPositions; ++pp) {
    if (pp == p) w = at[pp];
  }
  return w;
}

// Row `row` of a B of `stride` columns (the adapter's rank), packed as kLoraRowsRank bf16 with
// zeros past the rank (the shrink values there are zero too: the install kernel zeroes those
// spare rows).
__device__ __forceinline__ void LoadLoraRowsBPacked(const bf16* b, int stride, int64_t row, uint4 (&out)[2]) {
  const bf16* p = b + row * stride;
  if (stride == kLoraRowsRank && IsAligned16(p)) {
    out[0] = reinterpret_cast<const uint4*>(p)[0];
    out[1] = reinterpret_cast<const uint4*>(p)[1];
    return;
  }
  if (stride == 8 && IsAligned16(p)) {
    out[0] = reinterpret_cast<const uint4*>(p)[0];
    out[1] = make_uint4(0, 0, 0, 0);
    return;
  }
  union {
    uint4 v[2];
    bf16 h[kLoraRowsRank];
  } packed;
#pragma unroll
  for (int j = 0; j < kLoraRowsRank; ++j) packed.h[j] = j < stride ? p[j] : ToBf16(0.0f);
  out[0] = packed.v[0];
  out[1] = packed.v[1];
}

// bf16(scale·Σ_j u_j·b_j) as a float, u and b packed bf16 (the sum in LoraRowsDelta's order).
__device__ __forceinline__ float LoraRowsDotPacked(const uint4 (&u)[2], const uint4 (&b)[2], float scale) {
  float uf[8], bf[8], acc = 0.0f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    Unpack8(u[h], uf);
    Unpack8(b[h], bf);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += uf[j] * bf[j];
  }
  return ToFloat(ToBf16(scale * acc));
}

}  // namespace loraplex::ops::cuda
