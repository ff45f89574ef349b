// Paged causal GQA attention. A block serves one (token, kv head) and the q heads of its group,
// so each K/V row is loaded once per group; its 4 warps take interleaved 32-key chunks, a lane
// scores one key against every q head of the group, and the chunk's V rows are accumulated with
// lanes owning head_dim/32 dims. Online softmax in fp32; warps merge through shared memory.
// With num_splits > 1, grid.z splits the context and a second kernel merges the partials.
#include "engine/ops/cuda/attention.h"

#include <algorithm>

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kKeysPerPass = kWarps * kWarpSize;

template <int N>
__device__ __forceinline__ void LoadBf16(const bf16* src, float (&f)[N]) {
  if constexpr (N == 8) {
    Unpack8(*reinterpret_cast<const uint4*>(src), f);
  } else if constexpr (N == 4) {
    const uint2 raw = *reinterpret_cast<const uint2*>(src);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const float2 a = __bfloat1622float2(h[0]);
    const float2 b = __bfloat1622float2(h[1]);
    f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
  } else if constexpr (N == 2) {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src));
    f[0] = a.x, f[1] = a.y;
  } else {
    static_assert(N == 1);  // head_dim 32: one dim per lane
    f[0] = ToFloat(*src);
  }
}

// G: the group size this instance is built for (>= the real one, extra heads compute zeros).
template <int D, int G>
__global__ void __launch_bounds__(kWarps * kWarpSize) AttentionKernel(AttentionParams p) {
  constexpr int kDimsPerLane = D / kWarpSize;
  __shared__ float q_s[G][D];
  __shared__ float acc_s[kWarps][G][D];
  __shared__ float ml_s[kWarps][G][2];

  const int t = blockIdx.x;
  const int hkv = blockIdx.y;
  const int split = blockIdx.z;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int group = p.num_q_heads / p.num_kv_heads;

  const int seq = p.token_seq[t];
  int ctx = 0;
  if (seq >= 0 && seq < p.max_seqs) {
    ctx = min(p.positions[t] + 1, p.max_blocks_per_seq * p.block_size);
    ctx = max(ctx, 0);
  }
  const int begin = split * p.keys_per_split;
  const int end = split == p.num_splits - 1 ? ctx : min(ctx, begin + p.keys_per_split);

  const bf16* q_row = static_cast<const bf16*>(p.qkv) + static_cast<int64_t>(t) * p.qkv_row;
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
    const int g = e / D;
    const int d = e - g * D;
    q_s[g][d] = g < group ? ToFloat(q_row[(hkv * group + g) * D + d]) * p.softmax_scale : 0.0f;
  }
  __syncthreads();

  float m[G], l[G], acc[G][kDimsPerLane];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[g][i] = 0.0f;
  }

  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * D;
  const bf16* k_base = static_cast<const bf16*>(p.k_cache) + hkv * D;
  const bf16* v_base = static_cast<const bf16*>(p.v_cache) + hkv * D;
  const int32_t* table = p.block_tables + static_cast<int64_t>(max(seq, 0)) * p.max_blocks_per_seq;

  for (int base = begin + warp * kWarpSize; base < end; base += kKeysPerPass) {
    const int j = base + lane;
    int64_t slot = -1;
    if (j < end) {
      const int block = table[j / p.block_size];
      const int64_t s = static_cast<int64_t>(block) * p.block_size + j % p.block_size;
      if (block >= 0 && s < p.num_cache_slots) slot = s;
    }
    float score[G];
#pragma unroll
    for (int g = 0; g < G; ++g) score[g] = 0.0f;
    if (slot >= 0) {
      const bf16* k_row = k_base + slot * kv_row;
#pragma unroll 4
      for (int c = 0; c < D / 8; ++c) {
        float kf[8];
        Unpack8(reinterpret_cast<const uint4*>(k_row)[c], kf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int i = 0; i < 8; ++i) score[g] += q_s[g][c * 8 + i] * kf[i];
        }
      }
    }
    float prob[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float s = slot >= 0 ? score[g] : -INFINITY;
      const float m_new = fmaxf(m[g], WarpMax(s));
      prob[g] = slot >= 0 ? __expf(s - m_new) : 0.0f;
      const float corr = m[g] == -INFINITY ? 0.0f : __expf(m[g] - m_new);
      l[g] = l[g] * corr + WarpSum(prob[g]);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) acc[g][i] *= corr;
      m[g] = m_new;
    }
    const int n = min(kWarpSize, end - base);
    for (int jj = 0; jj < n; ++jj) {
      const long long s = __shfl_sync(0xffffffffu, static_cast<long long>(slot), jj);
      float pj[G];
#pragma unroll
      for (int g = 0; g < G; ++g) pj[g] = __shfl_sync(0xffffffffu, prob[g], jj);
      if (s < 0) continue;  // s is the same in every lane
      float vf[kDimsPerLane];
      LoadBf16<kDimsPerLane>(v_base + s * kv_row + lane * kDimsPerLane, vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) acc[g][i] += pj[g] * vf[i];
      }
    }
  }

#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      ml_s[warp][g][0] = m[g];
      ml_s[warp][g][1] = l[g];
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc_s[warp][g][lane * kDimsPerLane + i] = acc[g][i];
  }
  __syncthreads();

  for (int e = threadIdx.x; e < group * D; e += blockDim.x) {
    const int g = e / D;
    const int d = e - g * D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, ml_s[w][g][0]);
    float sum = 0.0f, a = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float mw = ml_s[w][g][0];
        if (mw == -INFINITY) continue;
        const float f = __expf(mw - mx);
        sum += ml_s[w][g][1] * f;
        a += acc_s[w][g][d] * f;
      }
    }
    const int h = hkv * group + g;
    if (p.num_splits == 1) {
      bf16* out = static_cast<bf16*>(p.out) + static_cast<int64_t>(t) * p.num_q_heads * D;
      out[h * D + d] = ToBf16(sum > 0.0f ? a / sum : 0.0f);
    } else {
      float* part = p.partial + ((static_cast<int64_t>(t) * p.num_q_heads + h) * p.num_splits + split) * (D + 2);
      part[2 + d] = a;
      if (d == 0) {
        part[0] = mx;
        part[1] = sum;
      }
    }
  }
}

// One block per (token, q head), one thread per dim.
__global__ void AttentionCombineKernel(AttentionParams p) {
  const int t = blockIdx.x;
  const int h = blockIdx.y;
  const int d = threadIdx.x;
  const int D = p.head_dim;
  const float* part = p.partial + (static_cast<int64_t>(t) * p.num_q_heads + h) * p.num_splits * (D + 2);
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, part[s * (D + 2)]);
  float sum = 0.0f, a = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float ms = part[s * (D + 2)];
      if (ms == -INFINITY) continue;
      const float f = __expf(ms - mx);
      sum += part[s * (D + 2) + 1] * f;
      a += part[s * (D + 2) + 2 + d] * f;
    }
  }
  bf16* out = static_cast<bf16*>(p.out) + static_cast<int64_t>(t) * p.num_q_heads * D;
  out[h * D + d] = ToBf16(sum > 0.0f ? a / sum : 0.0f);
}

template <int D, int G>
void LaunchFor(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_tokens, p.num_kv_heads, p.num_splits);
  AttentionKernel<D, G><<<grid, kWarps * kWarpSize, 0, stream>>>(p);
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
  p->keys_per_split = 0;
  const int64_t blocks = static_cast<int64_t>(p->num_tokens) * p->num_kv_heads;
  constexpr int kMinKeysPerSplit = 2 * kKeysPerPass;
  if (blocks == 0 || blocks >= 2 * num_sms || max_context_len <= kMinKeysPerSplit) return;
  int64_t splits = (2 * num_sms + blocks - 1) / blocks;
  splits = std::min<int64_t>(splits, (max_context_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  splits = std::min<int64_t>(splits, 64);
  const int64_t per_split_bytes =
      static_cast<int64_t>(p->num_tokens) * p->num_q_heads * (p->head_dim + 2) * sizeof(float);
  splits = std::min<int64_t>(splits, static_cast<int64_t>(scratch_bytes) / per_split_bytes);
  if (splits <= 1) return;
  int64_t keys = (max_context_len + splits - 1) / splits;
  keys = (keys + kKeysPerPass - 1) / kKeysPerPass * kKeysPerPass;
  p->keys_per_split = static_cast<int32_t>(keys);
  p->num_splits = static_cast<int32_t>((max_context_len + keys - 1) / keys);
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
  AttentionCombineKernel<<<dim3(p.num_tokens, p.num_q_heads), p.head_dim, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
