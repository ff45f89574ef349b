// The GPU sampler. One block of 1024 threads per logits row (a row is up to ~1 MB of F32, read
// from L2 after the first pass).
//
// Candidates are ranked by a 64-bit key: the logit's order-preserving bits above the complement
// of its id, so larger key = higher logit, lower id on a tie, and no two keys are equal. top-k and
// top-p then become thresholds on that key, found by radix selection (8-bit digits from the top,
// one histogram pass each, stopping as soon as the bin that crosses the target is wanted whole):
// top-k counts elements, top-p sums fixed-point weights (exp((l - max) / T) · 2^40 as integers,
// so the sums are exact and the same in any order). The draw walks the kept candidates in id
// order: each thread owns a contiguous range of ids, a block scan of the range sums finds the
// thread whose range holds u · total, and that thread walks its range. Every reduction has a fixed
// shape, so a row's result depends on its logits and SamplingRow alone.
#include <cfloat>

#include "engine/ops/cuda/kernel_utils.cuh"
#include "engine/ops/cuda/sampling.h"

namespace loraplex::ops::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kBins = 256;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kWeightScale = 1099511627776.0f;  // 2^40
constexpr int kPrefilter = 4096;

struct Shared {
  unsigned long long mass[kBins];
  unsigned int count[kBins];
  unsigned long long warp_u64[kWarps];
  float warp_m[kWarps];
  float warp_s[kWarps];
  int warp_arg[kWarps];
  int digit;
  unsigned long long before;   // weight (or count) of the bins above the chosen digit
  unsigned long long digit_total;
  unsigned int digit_count;
  int token;
  int top_count;
  unsigned long long top_key[kSampleMaxTopN];
  int top_id[kSampleMaxTopN];
};

__device__ __forceinline__ uint64_t RankKey(float v, int id) {
  uint32_t b = __float_as_uint(v);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}

__device__ __forceinline__ uint64_t Weight(float v, float max, float inv_t) {
  return static_cast<uint64_t>(expf((v - max) * inv_t) * kWeightScale);  // <= 2^40
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Total of `v` over the block, the same in every thread (fixed tree, exact for integers).
__device__ __forceinline__ uint64_t BlockSumU64(uint64_t v, Shared& sh) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (lane == 0) sh.warp_u64[warp] = v;
  __syncthreads();
  uint64_t t = sh.warp_u64[lane];
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) t += __shfl_xor_sync(kFull, t, o);
  __syncthreads();
  return t;
}

// Sum of `v` over the threads before this one (exclusive scan); *total gets the block's sum.
__device__ __forceinline__ uint64_t BlockExclusiveScanU64(uint64_t v, uint64_t* total, Shared& sh) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  uint64_t incl = v;
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const uint64_t t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == kWarpSize - 1) sh.warp_u64[warp] = incl;
  __syncthreads();
  uint64_t w = sh.warp_u64[lane], w_incl = w;
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const uint64_t t = __shfl_up_sync(kFull, w_incl, o);
    if (lane >= o) w_incl += t;
  }
  const uint64_t warp_before = __shfl_sync(kFull, w_incl - w, warp);
  *total = __shfl_sync(kFull, w_incl, kWarpSize - 1);
  __syncthreads();
  return warp_before + incl - v;
}

// The key threshold K such that the elements with key >= K among those with key >= `lower` are the
// shortest prefix, in key-descending order, whose count (kMass false) or weight (kMass true)
// reaches `need` (>= 1, at most their total).
template <bool kMass>
__device__ uint64_t SelectThreshold(const float* __restrict__ l, int vocab, uint64_t lower, uint64_t need,
                                    float row_max, float inv_t, Shared& sh) {
  uint64_t prefix = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    const uint64_t hi_mask = shift == 56 ? 0ull : ~0ull << (shift + 8);
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      sh.count[b] = 0;
      sh.mass[b] = 0;
    }
    __syncthreads();
    // Whole warps step together so lanes with the same digit can add their count in one atomic
    // (most elements share the top digits: per-lane atomics on one bin would serialise).
    const int lane = threadIdx.x % kWarpSize;
    for (int base = threadIdx.x - lane; base < vocab; base += kThreads) {
      const int i = base + lane;
      const float v = i < vocab ? l[i] : 0.0f;
      const uint64_t key = RankKey(v, i);
      const bool in = i < vocab && key >= lower && (key & hi_mask) == prefix;
      const int d = in ? static_cast<int>((key >> shift) & 0xff) : -1;
      const unsigned group = __match_any_sync(kFull, d);
      if (in && lane == __ffs(group) - 1) atomicAdd(&sh.count[d], static_cast<unsigned>(__popc(group)));
      if (kMass && in) {
        const uint64_t w = Weight(v, row_max, inv_t);
        if (w != 0) atomicAdd(&sh.mass[d], static_cast<unsigned long long>(w));
      }
    }
    __syncthreads();
    if (threadIdx.x < kWarpSize) {
      // Lane j sums digits 255-8j down to 248-8j; a scan over lanes gives the running total from
      // the top digit, and the lane where it reaches `need` finds the digit.
      const int lane = threadIdx.x;
      uint64_t sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int d = 255 - 8 * lane - j;
        sum += kMass ? sh.mass[d] : sh.count[d];
      }
      uint64_t incl = sum;
#pragma unroll
      for (int o = 1; o < kWarpSize; o <<= 1) {
        const uint64_t t = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += t;
      }
      const uint64_t excl = incl - sum;
      const unsigned owner_mask = __ballot_sync(kFull, excl < need && need <= incl);
      const int owner = owner_mask != 0 ? __ffs(owner_mask) - 1 : kWarpSize - 1;
      if (lane == owner) {
        uint64_t run = excl;
        int d = 255 - 8 * lane;
        for (int j = 0; j < 8; ++j) {
          d = 255 - 8 * lane - j;
          const uint64_t v = kMass ? sh.mass[d] : sh.count[d];
          if (run + v >= need) break;
          run += v;
        }
        sh.digit = d;
        sh.before = run;
        sh.digit_total = kMass ? sh.mass[d] : sh.count[d];
        sh.digit_count = sh.count[d];
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(sh.digit) << shift;
    need -= sh.before;
    // The bin is wanted whole (its total is what is still needed) or holds the crossing element
    // alone: every element with this prefix is in, whatever its lower bits.
    const bool done = sh.digit_total == need || sh.digit_count == 1;
    __syncthreads();  // sh is rewritten by the next pass
    if (done) break;
  }
  return prefix;
}

__global__ void __launch_bounds__(kThreads) SampleKernel(const float* __restrict__ logits, int vocab,
                                                         const SamplingRowDev* __restrict__ rows,
                                                         SampledTokenDev* __restrict__ out) {
  __shared__ Shared sh;
  const float* l = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const SamplingRowDev p = rows[blockIdx.x];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  // Pass 1: max, argmax (the lowest id on a tie) and Σ exp(l - max), online in one read.
  float m = -FLT_MAX, s = 0.0f;
  int arg = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = l[i];
    if (v > m) {
      s = s * expf(m - v) + 1.0f;
      m = v;
      arg = i;
    } else {
      s += expf(v - m);
    }
  }
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o), s2 = __shfl_xor_sync(kFull, s, o);
    const int a2 = __shfl_xor_sync(kFull, arg, o);
    const float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    arg = (m2 > m || (m2 == m && a2 < arg)) ? a2 : arg;
    m = mm;
  }
  if (lane == 0) {
    sh.warp_m[warp] = m;
    sh.warp_s[warp] = s;
    sh.warp_arg[warp] = arg;
  }
  __syncthreads();
  m = sh.warp_m[lane];
  s = sh.warp_s[lane];
  arg = sh.warp_arg[lane];
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o), s2 = __shfl_xor_sync(kFull, s, o);
    const int a2 = __shfl_xor_sync(kFull, arg, o);
    const float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    arg = (m2 > m || (m2 == m && a2 < arg)) ? a2 : arg;
    m = mm;
  }
  if (arg >= vocab) arg = 0;  // every logit -inf: no maximum was taken
  const float row_max = m;
  const float log_z = row_max + logf(s);
  __syncthreads();

  int token = arg;
  const bool greedy = p.temperature == 0.0f || p.top_k == 1;
  if (!greedy) {
    const float inv_t = 1.0f / p.temperature;
    uint64_t threshold = 0;
    if (p.top_k > 0 && p.top_k < vocab) {
      threshold = SelectThreshold<false>(l, vocab, 0, static_cast<uint64_t>(p.top_k), row_max, inv_t, sh);
    }
    if (p.top_p < 1.0f) {
      // The mass the top-p prefix must reach, over the top-k survivors; and the top kPrefilter
      // of them, which hold that mass in all but flat distributions: then the mass selection
      // looks at those alone (few elements per histogram bin).
      const int survivors = p.top_k > 0 && p.top_k < vocab ? p.top_k : vocab;
      const uint64_t prefilter =
          survivors > kPrefilter ? SelectThreshold<false>(l, vocab, threshold, kPrefilter, row_max, inv_t, sh) : 0;
      uint64_t kept = 0, kept_top = 0;
      for (int i = threadIdx.x; i < vocab; i += kThreads) {
        const float v = l[i];
        const uint64_t key = RankKey(v, i);
        if (key < threshold) continue;
        const uint64_t w = Weight(v, row_max, inv_t);
        kept += w;
        if (key >= prefilter) kept_top += w;
      }
      kept = BlockSumU64(kept, sh);
      kept_top = BlockSumU64(kept_top, sh);
      const double want = ceil(static_cast<double>(p.top_p) * static_cast<double>(kept));
      const uint64_t need = want < 1.0 ? 1ull : (want > static_cast<double>(kept) ? kept : static_cast<uint64_t>(want));
      const uint64_t lower = kept_top >= need && prefilter > threshold ? prefilter : threshold;
      const uint64_t t = SelectThreshold<true>(l, vocab, lower, need, row_max, inv_t, sh);
      threshold = t > threshold ? t : threshold;
    }
    // The draw: ids in order, each thread a contiguous range.
    const int chunk = (vocab + kThreads - 1) / kThreads;
    const int begin = min(static_cast<int>(threadIdx.x) * chunk, vocab), end = min(begin + chunk, vocab);
    uint64_t mine = 0;
    for (int i = begin; i < end; ++i) {
      const float v = l[i];
      if (RankKey(v, i) >= threshold) mine += Weight(v, row_max, inv_t);
    }
    uint64_t total = 0;
    const uint64_t before = BlockExclusiveScanU64(mine, &total, sh);
    const uint64_t u53 = SplitMix64(SplitMix64(p.seed) ^ static_cast<uint64_t>(p.step)) >> 11;
    const uint64_t target = __umul64hi(u53 << 11, total);  // floor(u · total) < total
    if (threadIdx.x == 0) sh.token = arg;  // unreachable fallback: the max always has weight 2^40
    __syncthreads();
    if (before <= target && target < before + mine) {
      uint64_t run = before;
      for (int i = begin; i < end; ++i) {
        const float v = l[i];
        if (RankKey(v, i) < threshold) continue;
        run += Weight(v, row_max, inv_t);
        if (target < run) {
          sh.token = i;
          break;
        }
      }
    }
    __syncthreads();
    token = sh.token;
  }

  const int top_n = min(min(max(p.top_n, 0), kSampleMaxTopN), vocab);
  if (top_n > 0) {
    const uint64_t threshold = SelectThreshold<false>(l, vocab, 0, static_cast<uint64_t>(top_n), row_max, 1.0f, sh);
    if (threadIdx.x == 0) sh.top_count = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const uint64_t key = RankKey(l[i], i);
      if (key < threshold) continue;
      const int at = atomicAdd(&sh.top_count, 1);
      if (at < kSampleMaxTopN) {
        sh.top_key[at] = key;
        sh.top_id[at] = i;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int n = min(sh.top_count, top_n);
      for (int a = 1; a < n; ++a) {  // insertion sort, key descending (n <= 20)
        const unsigned long long k = sh.top_key[a];
        const int id = sh.top_id[a];
        int b = a - 1;
        for (; b >= 0 && sh.top_key[b] < k; --b) {
          sh.top_key[b + 1] = sh.top_key[b];
          sh.top_id[b + 1] = sh.top_id[b];
        }
        sh.top_key[b + 1] = k;
        sh.top_id[b + 1] = id;
      }
      for (int a = 0; a < n; ++a) {
        out[blockIdx.x].top_ids[a] = sh.top_id[a];
        out[blockIdx.x].top_logprobs[a] = l[sh.top_id[a]] - log_z;
      }
    }
  }
  if (threadIdx.x == 0) {
    out[blockIdx.x].token = token;
    out[blockIdx.x].logprob = l[token] - log_z;
  }
}

}  // namespace

cudaError_t LaunchSample(const float* logits, int64_t num_rows, int64_t vocab, const SamplingRowDev* rows,
                         SampledTokenDev* out, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  if (vocab < 1 || vocab >= 0x7fffffff || num_rows > 0x7fffffff) return cudaErrorInvalidValue;
  SampleKernel<<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(logits, static_cast<int>(vocab), rows,
                                                                          out);
  return cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
