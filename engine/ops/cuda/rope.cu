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


// The same with qkv's values read from LoRA rows (RopeParams::rows): each thread loads its row's
// shrink values for its slice and its columns' rows of B, and writes every element of qkv.
__global__ void RopeAndCacheKvRowsKernel(RopeParams p) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const LoraRowsView& v = p.rows;
  const int64_t t = blockIdx.x;
  const int half = p.head_dim / 2;
  const int64_t row_width = static_cast<int64_t>(p.num_q_heads + 2 * p.num_kv_heads) * p.head_dim;
  bf16* row = static_cast<bf16*>(p.qkv) + t * row_width;
  const bf16* src = static_cast<const bf16*>(v.src) + t * v.stride;
  const int first = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  const int stride = static_cast<int>(gridDim.y * blockDim.x);
  if (p.token_seq != nullptr && p.token_seq[t] < 0) {
    for (int64_t e = first; e < row_width; e += stride) row[e] = LoraRowsValue1(v, t, e);
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
    const int64_t col = static_cast<int64_t>(head) * p.head_dim + i;
    float s, c;
    sincosf(pos * p.inv_freq[i], &s, &c);  // precise: angles reach ~1e5 rad at long contexts
    float x1 = ToFloat(src[col]);
    float x2 = ToFloat(src[col + half]);
    LoraRowsSlice lora;  // a head lies in one slice (slices start at head boundaries)
    if (LoadLoraRowsSlice(v, t, LoraRowsSliceOf(v, col), &lora)) {
      x1 = ToFloat(ToBf16(x1 + LoraRowsDelta(lora, col)));
      x2 = ToFloat(ToBf16(x2 + LoraRowsDelta(lora, col + half)));
    }
    const bf16 y1 = ToBf16(x1 * c - x2 * s);
    const bf16 y2 = ToBf16(x2 * c + x1 * s);
    bf16* h = row + static_cast<int64_t>(head) * p.head_dim;
    h[i] = y1;
    h[i + half] = y2;
    if (cache && head >= p.num_q_heads) {
      const int64_t off = static_cast<int64_t>(head - p.num_q_heads) * p.head_dim;
      k_dst[off + i] = y1;
      k_dst[off + i + half] = y2;
    }
  }
  const int64_t v_col = static_cast<int64_t>(p.num_q_heads + p.num_kv_heads) * p.head_dim;
  for (int64_t e = first; e < kv_width; e += stride) {
    const bf16 value = LoraRowsValue1(v, t, v_col + e);
    row[v_col + e] = value;
    if (cache) v_dst[e] = value;
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
    (void)LaunchDependent(RopeAndCacheKvRowsKernel, dim3(grid), dim3(kThreads), 0, stream, p);
  } else {
    (void)LaunchDependent(RopeAndCacheKvKernel, dim3(grid), dim3(kThreads), 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
