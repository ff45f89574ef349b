// Paged causal GQA attention. A block serves one (token, kv head, context split) and every q
// head of the kv head's group, so each K/V row is read once per group. The block walks its keys
// in tiles: lane groups of D/8 lanes read one 16-byte slice each of a K row and reduce the dot
// products with shuffles, one warp per q head turns the tile's scores into fp32 online-softmax
// weights, and the same lane groups accumulate the weighted V rows. Splits are sized from each
// token's LIVE context (read on the device), so a launch sized from the cache capacity costs
// only an early exit per unused split; a second kernel merges the live splits' partials.
#include "engine/ops/cuda/attention.h"

#include <algorithm>

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTile = 128;  // keys scored per softmax step
// A split covers at least this many keys (and a multiple of it), so short contexts use few
// splits and the merge reads few partials.
constexpr int kMinKeysPerSplit = 32;
constexpr int kMaxSplits = 64;
// K/V rows a lane has in flight at once.
constexpr int kUnroll = 4;

// The keys token `t` attends to: cache positions [0, ctx). 0 for padding rows.
__device__ __forceinline__ int ContextOf(const AttentionParams& p, int t, int* seq_out) {
  const int seq = p.token_seq[t];
  *seq_out = seq;
  if (seq < 0 || seq >= p.max_seqs) return 0;
  return max(min(p.positions[t] + 1, p.max_blocks_per_seq * p.block_size), 0);
}

// Keys per split for a context of `ctx`: the context spread over num_splits, at least
// kMinKeysPerSplit and a multiple of it. The attention and merge kernels both use this, so they
// agree on which splits are live (ceil(ctx / keys)).
__device__ __forceinline__ int KeysPerSplit(int ctx, int num_splits) {
  const int even = (ctx + num_splits - 1) / num_splits;
  return max((even + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1) * kMinKeysPerSplit;
}

// G: the group size this instance is built for (>= the real one; extra heads see zero q).
template <int D, int G>
__global__ void __launch_bounds__(kThreads) AttentionKernel(AttentionParams p) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  constexpr int kLanesPerKey = D / 8;                     // 16-byte slice per lane
  constexpr int kKeyGroups = kThreads / kLanesPerKey;     // keys in flight per step
  __shared__ float score_s[G][kTile];                     // scores, then softmax weights
  __shared__ int64_t slot_s[kTile];                       // cache slot per key, -1: skip
  __shared__ float m_s[G], l_s[G], corr_s[G];
  __shared__ float red_s[kKeyGroups][G][D];               // per key group accumulators

  const int t = blockIdx.x;
  const int hkv = blockIdx.y;
  const int split = blockIdx.z;
  const int key_group = threadIdx.x / kLanesPerKey;
  const int sub = threadIdx.x % kLanesPerKey;  // owns dims [sub*8, sub*8+8)
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int group = p.num_q_heads / p.num_kv_heads;

  int seq;
  const int ctx = ContextOf(p, t, &seq);
  const int keys_per_split = p.num_splits == 1 ? max(ctx, 1) : KeysPerSplit(ctx, p.num_splits);
  const int live_splits = (ctx + keys_per_split - 1) / keys_per_split;
  const int begin = split * keys_per_split;
  // A split past the live context has nothing to do, and the merge skips it. With one split the
  // block still runs so that padding rows get their zero output.
  if (p.num_splits > 1 && begin >= ctx) return;
  const int end = min(ctx, begin + keys_per_split);

  // q of the group's heads, this lane's 8 dims, pre-scaled.
  float q[G][8];
  const bf16* q_row = static_cast<const bf16*>(p.qkv) + static_cast<int64_t>(t) * p.qkv_row;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) q[g][i] = 0.0f;
    if (g < group) {
      // Scalar loads: the qkv view carries no alignment promise, and this is read once.
      const bf16* q_head = q_row + (hkv * group + g) * D + sub * 8;
#pragma unroll
      for (int i = 0; i < 8; ++i) q[g][i] = ToFloat(q_head[i]) * p.softmax_scale;
    }
  }
  if (threadIdx.x < G) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.0f;
  }

  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
  }

  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * D;
  const bf16* k_base = static_cast<const bf16*>(p.k_cache) + hkv * D + sub * 8;
  const bf16* v_base = static_cast<const bf16*>(p.v_cache) + hkv * D + sub * 8;
  const int32_t* table = p.block_tables + static_cast<int64_t>(max(seq, 0)) * p.max_blocks_per_seq;

  for (int tile = begin; tile < end; tile += kTile) {
    const int n = min(kTile, end - tile);
    // Scores: key group kg takes keys kg, kg + kKeyGroups, ... of the tile, kUnroll at a time so
    // that several K rows are in flight per lane. The loop bound is block-uniform so that whole
    // warps reach the shuffles.
    for (int base = 0; base < n; base += kKeyGroups * kUnroll) {
      const int k0 = base + key_group;
      int64_t slot[kUnroll];
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = k0 + u * kKeyGroups;
        slot[u] = -1;
        if (k < n) {
          const int j = tile + k;
          const int block = table[j / p.block_size];
          const int64_t s = static_cast<int64_t>(block) * p.block_size + j % p.block_size;
          if (block >= 0 && s < p.num_cache_slots) slot[u] = s;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        raw[u] = slot[u] >= 0 ? *reinterpret_cast<const uint4*>(k_base + slot[u] * kv_row) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = k0 + u * kKeyGroups;
        float kf[8];
        Unpack8(raw[u], kf);
        float s[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          s[g] = 0.0f;
#pragma unroll
          for (int i = 0; i < 8; ++i) s[g] += q[g][i] * kf[i];
          // Lane groups are aligned runs of kLanesPerKey lanes, so xor offsets below it stay
          // inside the group.
#pragma unroll
          for (int o = kLanesPerKey / 2; o > 0; o >>= 1) s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
        }
        if (sub == 0 && k < n) {
          slot_s[k] = slot[u];
#pragma unroll
          for (int g = 0; g < G; ++g) score_s[g][k] = slot[u] >= 0 ? s[g] : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Online softmax over the tile, one warp per q head.
    for (int g = warp; g < G; g += kWarps) {
      float mx = -INFINITY;
      for (int k = lane; k < n; k += kWarpSize) mx = fmaxf(mx, score_s[g][k]);
      mx = WarpMax(mx);
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int k = lane; k < n; k += kWarpSize) {
        const float s = score_s[g][k];
        const float w = s == -INFINITY ? 0.0f : __expf(s - m_new);
        score_s[g][k] = w;
        sum += w;
      }
      sum = WarpSum(sum);  // every lane has read m_s[g] before lane 0 rewrites it
      if (lane == 0) {
        const float corr = m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
        corr_s[g] = corr;
        l_s[g] = l_s[g] * corr + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();

    // Weighted V rows, same key-to-lane-group mapping as the scores.
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float corr = corr_s[g];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
    }
    for (int k0 = key_group; k0 < n; k0 += kKeyGroups * kUnroll) {
      int64_t slot[kUnroll];
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = k0 + u * kKeyGroups;
        slot[u] = k < n ? slot_s[k] : -1;
        raw[u] = slot[u] >= 0 ? *reinterpret_cast<const uint4*>(v_base + slot[u] * kv_row) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (slot[u] < 0) continue;
        const int k = k0 + u * kKeyGroups;
        float vf[8];
        Unpack8(raw[u], vf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float w = score_s[g][k];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] += w * vf[i];
        }
      }
    }
    __syncthreads();  // the next tile overwrites score_s / slot_s
  }

#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) red_s[key_group][g][sub * 8 + i] = acc[g][i];
  }
  __syncthreads();

  for (int e = threadIdx.x; e < group * D; e += kThreads) {
    const int g = e / D;
    const int d = e - g * D;
    float a = 0.0f;
#pragma unroll
    for (int kg = 0; kg < kKeyGroups; ++kg) a += red_s[kg][g][d];
    const float sum = l_s[g];
    const int h = hkv * group + g;
    if (live_splits <= 1) {
      // The whole context was this block's: write the result, the merge skips this token.
      bf16* out = static_cast<bf16*>(p.out) + static_cast<int64_t>(t) * p.num_q_heads * D;
      out[h * D + d] = ToBf16(sum > 0.0f ? a / sum : 0.0f);
    } else {
      float* part = p.partial + ((static_cast<int64_t>(t) * p.num_q_heads + h) * p.num_splits + split) * (D + 2);
      part[2 + d] = a;
      if (d == 0) {
        part[0] = m_s[g];
        part[1] = sum;
      }
    }
  }
}

// One block per (token, q head), one thread per dim; reads only the token's live splits.
__global__ void AttentionCombineKernel(AttentionParams p) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  const int t = blockIdx.x;
  const int h = blockIdx.y;
  const int d = threadIdx.x;
  const int D = p.head_dim;
  int seq;
  const int ctx = ContextOf(p, t, &seq);
  const int keys_per_split = KeysPerSplit(ctx, p.num_splits);
  const int live_splits = (ctx + keys_per_split - 1) / keys_per_split;
  if (live_splits == 1) return;  // the attention kernel wrote this row
  const float* part = p.partial + (static_cast<int64_t>(t) * p.num_q_heads + h) * p.num_splits * (D + 2);
  float mx = -INFINITY;
  for (int s = 0; s < live_splits; ++s) mx = fmaxf(mx, part[s * (D + 2)]);
  float sum = 0.0f, a = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < live_splits; ++s) {
      const float ms = part[s * (D + 2)];
      if (ms == -INFINITY) continue;
      const float f = __expf(ms - mx);
      sum += part[s * (D + 2) + 1] * f;
      a += part[s * (D + 2) + 2 + d] * f;
    }
  }
  // Padding rows (no live split) get zeros here.
  bf16* out = static_cast<bf16*>(p.out) + static_cast<int64_t>(t) * p.num_q_heads * D;
  out[h * D + d] = ToBf16(sum > 0.0f ? a / sum : 0.0f);
}

template <int D, int G>
void LaunchFor(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_tokens, p.num_kv_heads, p.num_splits);
  (void)LaunchDependent(AttentionKernel<D, G>, dim3(grid), dim3(kThreads), 0, stream, p);
}

template <int D>
void LaunchForDim(const AttentionParams& p, cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  if (group <= 1) {
    LaunchFor<D, 1>(p, stream);
  } else if (group <= 2) {
    LaunchFor<D, 2>(p, stream);
  } else if (group <= 4) {
    LaunchFor<D, 4>(p, stream);
  } else {
    LaunchFor<D, 8>(p, stream);
  }
}

}  // namespace

bool AttentionSupported(int head_dim, int num_q_heads, int num_kv_heads) {
  if (head_dim != 32 && head_dim != 64 && head_dim != 128 && head_dim != 256) return false;
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) return false;
  const int group = num_q_heads / num_kv_heads;
  return group >= 1 && group <= 8;
}

void ChooseAttentionSplits(int num_sms, size_t scratch_bytes, int32_t max_context_len,
                           AttentionParams* p) {
  p->num_splits = 1;
  const int64_t blocks = static_cast<int64_t>(p->num_tokens) * p->num_kv_heads;
  // Aim for ~4 blocks per SM; unused splits of short contexts exit at once.
  const int64_t target = 4 * static_cast<int64_t>(num_sms);
  if (blocks == 0 || blocks >= target || max_context_len <= kMinKeysPerSplit) return;
  int64_t splits = (target + blocks - 1) / blocks;
  splits = std::min<int64_t>(splits, (max_context_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  splits = std::min<int64_t>(splits, kMaxSplits);
  const int64_t per_split_bytes =
      static_cast<int64_t>(p->num_tokens) * p->num_q_heads * (p->head_dim + 2) * sizeof(float);
  splits = std::min<int64_t>(splits, static_cast<int64_t>(scratch_bytes) / per_split_bytes);
  if (splits > 1) p->num_splits = static_cast<int32_t>(splits);
}

cudaError_t LaunchAttention(const AttentionParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  switch (p.head_dim) {
    case 32:
      LaunchForDim<32>(p, stream);
      break;
    case 64:
      LaunchForDim<64>(p, stream);
      break;
    case 128:
      LaunchForDim<128>(p, stream);
      break;
    case 256:
      LaunchForDim<256>(p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  (void)LaunchDependent(AttentionCombineKernel, dim3(p.num_tokens, p.num_q_heads), dim3(p.head_dim), 0, stream, p);
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
