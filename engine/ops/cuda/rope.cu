// Fused rotate-half RoPE on q, k and the paged K/V cache write: blockIdx.x is the token, and the
// token's rotation pairs and v elements are spread over gridDim.y blocks so that every thread does
// about one of each (a loop of dependent load/store round trips per thread was the latency of a
// decode step's call). A token's rotated k is written to the cache by the thread that computed it.
#include "engine/ops/cuda/rope.h"

#include "engine/ops/cuda/lora_delta.cuh"
#include "engine/ops/cuda/lora_rows.cuh"

namespace loraplex::ops::cuda {
namespace {

__global__ void RopeAndCacheKvKernel(RopeParams p) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const int64_t t = blockIdx.x;
  const int half = p.head_dim / 2;
  const int64_t row_width = static_cast<int64_t>(p.num_q_heads + 2 * p.num_kv_heads) * p.head_dim;
  bf16* row = static_cast<bf16*>(p.qkv) + t * row_width;
  const int first = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  const int stride = static_cast<int>(gridDim.y * blockDim.x);
  if (p.token_seq != nullptr && p.token_seq[t] < 0) {
    // A padding row is left as is, but a pending LoRA delta still lands in it (lora_delta.h).
    if (!p.delta.empty()) {
      for (int64_t e = first; e < row_width; e += stride) {
        bool changed;
        const bf16 v = FoldLoraDelta1(p.delta, t, e, row[e], &changed);
        if (changed) row[e] = v;
      }
    }
    return;
  }
  const float pos = static_cast<float>(p.positions[t]);
  const int64_t slot = p.slot_mapping[t];
  const bool cache = slot >= 0 && slot < p.num_cache_slots;
  const int64_t kv_width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  bf16* k_dst = static_cast<bf16*>(p.k_cache) + slot * kv_width;
  bf16* v_dst = static_cast<bf16*>(p.v_cache) + slot * kv_width;

  const int rotated_heads = p.num_q_heads + p.num_kv_heads;
  for (int e = first; e < rotated_heads * half; e += stride) {
    const int head = e / half;
    const int i = e - head * half;
    bf16* h = row + static_cast<int64_t>(head) * p.head_dim;
    float s, c;
    sincosf(pos * p.inv_freq[i], &s, &c);  // precise: angles reach ~1e5 rad at long contexts
    // A pending LoRA delta is added before the rotation (the GEMM output plus delta is what the
    // separate add kernel would have left here).
    const int64_t col = static_cast<int64_t>(head) * p.head_dim + i;
    const float x1 = ToFloat(FoldLoraDelta1(p.delta, t, col, h[i]));
    const float x2 = ToFloat(FoldLoraDelta1(p.delta, t, col + half, h[i + half]));
    const bf16 y1 = ToBf16(x1 * c - x2 * s);
    const bf16 y2 = ToBf16(x2 * c + x1 * s);
    h[i] = y1;
    h[i + half] = y2;
    if (cache && head >= p.num_q_heads) {
      const int64_t off = static_cast<int64_t>(head - p.num_q_heads) * p.head_dim;
      k_dst[off + i] = y1;
      k_dst[off + i + half] = y2;
    }
  }
  if (cache || !p.delta.empty()) {
    const int64_t v_col = static_cast<int64_t>(p.num_q_heads + p.num_kv_heads) * p.head_dim;
    bf16* v_src = row + v_col;
    for (int64_t e = first; e < kv_width; e += stride) {
      bool changed;
      const bf16 v = FoldLoraDelta1(p.delta, t, v_col + e, v_src[e], &changed);
      if (changed) v_src[e] = v;
      if (cache) v_dst[e] = v;
    }
  }
}


// The same with qkv's values read from LoRA rows (RopeParams::rows): a thread takes one row's
// columns i and i + D/2 of one head (a rotation pair, or two v elements), a block kRopeRowsRows
// rows of one head. Everything the GEMM does not write (the row's adapter, its rows of B, the
// angle) is read before the wait for it, in two rounds; after it, the row's two values and its
// shrink values, all at once. Every element of qkv is written.
constexpr int kRopeRowsRows = 4;

__global__ void RopeAndCacheKvRowsKernel(RopeParams p) {
  AllowDependentLaunch();
  const LoraRowsView& v = p.rows;
  const int head = blockIdx.x;
  const int half = p.head_dim / 2;
  const int i = static_cast<int>(threadIdx.x) % half;
  const int64_t t = static_cast<int64_t>(blockIdx.y) * kRopeRowsRows + threadIdx.x / half;
  if (t >= p.num_tokens) return;
  const int64_t c1 = static_cast<int64_t>(head) * p.head_dim + i;  // c1 and c1 + half: one slice
  const int slice = LoraRowsSliceOf(v, c1);
  const int64_t in_slice = c1 - LoraRowsSliceStart(v, slice);
  // The row's position and the slice's weights at every position in one round of loads (not the
  // weights at the position after it), then the row's B.
  const int q = v.row_pos[t];
  LoraSliceWeightsDev at[kLoraRowsPositions];
  LoadLoraRowsWeights(v, slice, at);
  uint4 b1[2] = {}, b2[2] = {};
  float scale = 0.0f;
  bool lora = false;
  if (q >= 0 && q < kLoraRowsPositions) {
    const LoraSliceWeightsDev w = LoraRowsWeightsAt(at, q);
    if (w.rank > 0 && w.b != nullptr) {
      lora = true;
      scale = w.scale;
      LoadLoraRowsBPacked(static_cast<const bf16*>(w.b), w.rank, in_slice, b1);
      LoadLoraRowsBPacked(static_cast<const bf16*>(w.b), w.rank, in_slice + half, b2);
    }
  }
  const bool padding = p.token_seq != nullptr && p.token_seq[t] < 0;
  const bool rotated = head < p.num_q_heads + p.num_kv_heads;
  float sn = 0.0f, cs = 1.0f;
  if (!padding && rotated) {
    sincosf(static_cast<float>(p.positions[t]) * p.inv_freq[i], &sn, &cs);  // precise, as RopeAndCacheKvKernel
  }
  const int64_t slot = padding ? -1 : p.slot_mapping[t];
  WaitForPrecedingKernel();
  const bf16* src = static_cast<const bf16*>(v.src) + t * v.stride;
  float x1 = ToFloat(src[c1]);
  float x2 = ToFloat(src[c1 + half]);
  if (lora) {
    const uint4* up = reinterpret_cast<const uint4*>(
        src + v.u_col + (static_cast<int64_t>(q) * v.num_slices + slice) * kLoraRowsRank);
    const uint4 u[2] = {up[0], up[1]};
    x1 = ToFloat(ToBf16(x1 + LoraRowsDotPacked(u, b1, scale)));
    x2 = ToFloat(ToBf16(x2 + LoraRowsDotPacked(u, b2, scale)));
  }
  bf16* row = static_cast<bf16*>(p.qkv) + t * static_cast<int64_t>(p.num_q_heads + 2 * p.num_kv_heads) * p.head_dim;
  bf16 y1 = ToBf16(x1), y2 = ToBf16(x2);
  if (!padding && rotated) {
    y1 = ToBf16(x1 * cs - x2 * sn);
    y2 = ToBf16(x2 * cs + x1 * sn);
  }
  row[c1] = y1;
  row[c1 + half] = y2;
  if (!padding && slot >= 0 && slot < p.num_cache_slots && head >= p.num_q_heads) {
    const int64_t kv_width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
    bf16* dst = static_cast<bf16*>(rotated ? p.k_cache : p.v_cache) + slot * kv_width +
                static_cast<int64_t>(rotated ? head - p.num_q_heads : head - p.num_q_heads - p.num_kv_heads) *
                    p.head_dim;
    dst[i] = y1;
    dst[i + half] = y2;
  }
}

}  // namespace

cudaError_t LaunchRopeAndCacheKv(const RopeParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  // Enough blocks per token for one rotation pair (and one v element) per thread.
  const int64_t pairs = static_cast<int64_t>(p.num_q_heads + p.num_kv_heads) * (p.head_dim / 2);
  const int64_t v_elems = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const int64_t work = pairs > v_elems ? pairs : v_elems;
  const int64_t per_token = (work + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(p.num_tokens),
                  static_cast<unsigned>(per_token < 1 ? 1 : per_token > 64 ? 64 : per_token));
  if (!p.rows.empty()) {
    const dim3 rows_grid(static_cast<unsigned>(p.num_q_heads + 2 * p.num_kv_heads),
                         static_cast<unsigned>((p.num_tokens + kRopeRowsRows - 1) / kRopeRowsRows));
    (void)LaunchDependent(RopeAndCacheKvRowsKernel, rows_grid, dim3(static_cast<unsigned>(p.head_dim / 2 * kRopeRowsRows)),
                          0, stream, p);
  } else {
    (void)LaunchDependent(RopeAndCacheKvKernel, dim3(grid), dim3(kThreads), 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
