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


// The same with qkv's values read from LoRA rows (RopeParams::rows). A block takes one head for
// kRopeRowsChunk rows: thread i of a lane holds columns i and i + D/2 (a rotation pair, or two v
// elements), so the rows of B it needs are read once per adapter position, not once per row. The
// slot table and B are read before the wait for the GEMM (written before it); every element of
// qkv is written.
constexpr int kRopeRowsChunk = 8;
constexpr int kRopeRowsLanes = 2;

__global__ void RopeAndCacheKvRowsKernel(RopeParams p) {
  AllowDependentLaunch();
  const LoraRowsView& v = p.rows;
  const int head = blockIdx.x;
  const int half = p.head_dim / 2;
  const int i = static_cast<int>(threadIdx.x) % half;
  const int lane = static_cast<int>(threadIdx.x) / half;
  const int64_t row_width = static_cast<int64_t>(p.num_q_heads + 2 * p.num_kv_heads) * p.head_dim;
  const int64_t c1 = static_cast<int64_t>(head) * p.head_dim + i;  // c1 and c1 + half: one slice
  const int slice = LoraRowsSliceOf(v, c1);
  const int64_t in_slice = c1 - LoraRowsSliceStart(v, slice);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRopeRowsChunk;
  const int rows = static_cast<int>(p.num_tokens - r0 < kRopeRowsChunk ? p.num_tokens - r0 : kRopeRowsChunk);
  __shared__ LoraRowsPositions ps;
  __shared__ int rpos[kRopeRowsChunk];
  __shared__ float u[kRopeRowsChunk][kLoraRowsRank];
  LoadLoraRowsPositions(v, slice, 0, &ps);
  if (threadIdx.x >= kLoraRowsPositions && threadIdx.x < kLoraRowsPositions + kRopeRowsChunk) {
    const int r = static_cast<int>(threadIdx.x) - kLoraRowsPositions;
    rpos[r] = r < rows ? v.row_pos[r0 + r] : -1;
  }
  const float freq = p.inv_freq[i];
  __syncthreads();
  // The first row's B now: adapters' tokens are mostly together.
  int cur = rpos[lane < rows ? lane : 0];
  float b1[kLoraRowsRank] = {}, b2[kLoraRowsRank] = {};
  if (cur >= 0 && ps.stride[cur] > 0) {
    LoadLoraRowsB(ps, cur, in_slice, b1);
    LoadLoraRowsB(ps, cur, in_slice + half, b2);
  }
  WaitForPrecedingKernel();
  const bf16* src = static_cast<const bf16*>(v.src);
  for (int e = threadIdx.x; e < rows * kLoraRowsRank; e += blockDim.x) {
    const int r = e / kLoraRowsRank, j = e % kLoraRowsRank, q = rpos[r];
    u[r][j] = q >= 0 ? ToFloat(src[(r0 + r) * v.stride + v.u_col + (static_cast<int64_t>(q) * v.num_slices + slice) *
                                                                      kLoraRowsRank + j])
                     : 0.0f;
  }
  __syncthreads();
  const int64_t kv_width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const bool rotated = head < p.num_q_heads + p.num_kv_heads;
  for (int r = lane; r < rows; r += kRopeRowsLanes) {
    const int64_t t = r0 + r;
    float x1 = ToFloat(src[t * v.stride + c1]);
    float x2 = ToFloat(src[t * v.stride + c1 + half]);
    const int q = rpos[r];
    if (q >= 0 && ps.stride[q] > 0) {
      if (q != cur) {
        LoadLoraRowsB(ps, q, in_slice, b1);
        LoadLoraRowsB(ps, q, in_slice + half, b2);
        cur = q;
      }
      x1 = ToFloat(ToBf16(x1 + LoraRowsDot(u[r], b1, ps.scale[q])));
      x2 = ToFloat(ToBf16(x2 + LoraRowsDot(u[r], b2, ps.scale[q])));
    }
    bf16* row = static_cast<bf16*>(p.qkv) + t * row_width;
    if (p.token_seq != nullptr && p.token_seq[t] < 0) {  // padding: the row as the GEMM and LoRA left it
      row[c1] = ToBf16(x1);
      row[c1 + half] = ToBf16(x2);
      continue;
    }
    const int64_t slot = p.slot_mapping[t];
    const bool cache = slot >= 0 && slot < p.num_cache_slots;
    bf16 y1 = ToBf16(x1), y2 = ToBf16(x2);
    if (rotated) {
      float sn, cs;
      sincosf(static_cast<float>(p.positions[t]) * freq, &sn, &cs);  // precise, as RopeAndCacheKvKernel
      y1 = ToBf16(x1 * cs - x2 * sn);
      y2 = ToBf16(x2 * cs + x1 * sn);
    }
    row[c1] = y1;
    row[c1 + half] = y2;
    if (cache && head >= p.num_q_heads) {
      bf16* dst = static_cast<bf16*>(rotated ? p.k_cache : p.v_cache) + slot * kv_width +
                  static_cast<int64_t>(rotated ? head - p.num_q_heads : head - p.num_q_heads - p.num_kv_heads) *
                      p.head_dim;
      dst[i] = y1;
      dst[i + half] = y2;
    }
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
                         static_cast<unsigned>((p.num_tokens + kRopeRowsChunk - 1) / kRopeRowsChunk));
    (void)LaunchDependent(RopeAndCacheKvRowsKernel, rows_grid, dim3(static_cast<unsigned>(p.head_dim / 2 * kRopeRowsLanes)),
                          0, stream, p);
  } else {
    (void)LaunchDependent(RopeAndCacheKvKernel, dim3(grid), dim3(kThreads), 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
