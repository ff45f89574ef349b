// The GPU sampler. A cluster of C = 1, 2, 4 or 8 blocks of 1024 threads per logits row (a row is up
// to ~1 MB of F32, read from L2 after the first pass): every pass over the row is dealt over the
// cluster's threads, and its sums, scans, histograms and candidates are merged through distributed
// shared memory (integers, so the merge order cannot change them, and every C gives the same
// bits). C is the most blocks with which all the launch's rows run at once (QuerySampleWave). One
// block a row took ~170 us for a top-p draw over 128K logits, its passes bound by one SM; 8 take
// ~58 us (bench/RESULTS.md, tenth session).
//
// Candidates are ranked by a 64-bit key: the logit's order-preserving bits above the complement
// of its id, so larger key = higher logit, lower id on a tie, and no two keys are equal. top-k,
// top-p and top-n then become thresholds on that key: top-k and top-n count elements, top-p sums
// fixed-point weights (exp((l - max) / T) · 2^40 as integers, so the sums are exact and the same
// in any order). A threshold is found by a histogram of logit distance below the maximum (one
// pass, then the one bin that crosses the target sorted exactly in shared memory), or, when that
// bin is too full to sort there (nearly flat rows), by radix selection (8-bit digits from the top,
// one histogram pass each, stopping as soon as the bin that crosses the target is wanted whole).
// The draw walks the kept candidates in id order: each of the row's threads owns a contiguous
// range of ids, a scan of the range sums over the row finds the thread whose range holds
// u · total, and that thread walks its range. Every reduction has a fixed shape, so a row's result
// depends on its logits and SamplingRow alone. The first pass (max, argmax, softmax sum) runs split
// over 16 blocks a row when the caller gives scratch, so greedy rows cost little.
#include <cooperative_groups.h>

#include <cfloat>

#include "engine/ops/cuda/kernel_utils.cuh"
#include "engine/ops/cuda/sampling.h"

namespace loraplex::ops::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 1024;
// Blocks a row (C, a cluster): up to 8 (the portable cluster size), as many as keep the launch's
// rows running at once (LaunchSample).
constexpr int kMaxCluster = 8;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kBins = 256;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kWeightScale = 1099511627776.0f;  // 2^40
// Histogram selection: 2048 bins of 1/32 logit below the row's maximum (the last bin takes the
// rest); the bin where the running count or weight reaches the target is sorted exactly, when it
// holds at most kCandidates elements (else the radix selection runs).
constexpr int kHistBins = 2048;
constexpr float kBinsPerLogit = 32.0f;
constexpr int kCandidates = 2048;
// Per-row partial statistics of the first pass, computed by kStatsBlocks blocks per row.
constexpr int kStatsBlocks = 16;
constexpr int kStatsThreads = 256;

struct Shared {
  union {
    struct {  // radix selection: one 8-bit digit per pass
      unsigned long long mass[kBins];
      unsigned int count[kBins];
    };
    struct {  // histogram selection: bins of logit distance below the maximum
      unsigned long long hmass[kHistBins];
      unsigned int hcount[kHistBins];
    };
    unsigned long long merged[kCandidates];  // the crossing bin's keys from every block of the row
  };
  unsigned long long cand[kCandidates];  // keys of this block's part of the crossing bin
  // Radix selection: the digits' counts and weights summed over the row's blocks.
  unsigned long long row_mass[kBins];
  unsigned int row_count[kBins];
  int num_cand;
  unsigned long long warp_u64[kWarps];
  unsigned long long block_u64;  // this block's part of a cluster sum or scan
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
  uint32_t b = v == 0.0f ? 0u : __float_as_uint(v);  // -0 ranks as +0: they compare equal
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

// The row's C blocks wait for one another (C == 1: the block alone).
template <int C>
__device__ __forceinline__ void RowSync() {
  if constexpr (C == 1) {
    __syncthreads();
  } else {
    cg::this_cluster().sync();
  }
}

// This block's rank among its row's C blocks.
template <int C>
__device__ __forceinline__ int BlockRank() {
  if constexpr (C == 1) return 0;
  return static_cast<int>(cg::this_cluster().block_rank());
}

// This thread's index among its row's kThreads·C threads (the row's blocks in rank order).
template <int C>
__device__ __forceinline__ int RowThread() {
  return BlockRank<C>() * kThreads + static_cast<int>(threadIdx.x);
}

// Block `rank`'s copy of `x` (a field of this block's shared memory) in the row's cluster.
template <int C, typename T>
__device__ __forceinline__ T* InBlock(T* x, int rank) {
  if constexpr (C == 1) return x;
  return cg::this_cluster().map_shared_rank(x, rank);
}

// Total of `v` over the row's threads, the same in every thread (exact for integers).
template <int C>
__device__ __forceinline__ uint64_t RowSumU64(uint64_t v, Shared& sh) {
  const uint64_t block = BlockSumU64(v, sh);
  if constexpr (C == 1) return block;
  if (threadIdx.x == 0) sh.block_u64 = block;
  RowSync<C>();
  uint64_t t = 0;
  for (int r = 0; r < C; ++r) t += *InBlock<C>(&sh.block_u64, r);
  RowSync<C>();  // block_u64 is rewritten by the next merge
  return t;
}

// Sum of `v` over the row's threads before this one (exclusive scan, blocks in rank order);
// *total gets the row's sum.
template <int C>
__device__ __forceinline__ uint64_t RowExclusiveScanU64(uint64_t v, uint64_t* total, Shared& sh) {
  uint64_t block_total = 0;
  const uint64_t before = BlockExclusiveScanU64(v, &block_total, sh);
  if constexpr (C == 1) {
    *total = block_total;
    return before;
  }
  if (threadIdx.x == 0) sh.block_u64 = block_total;
  RowSync<C>();
  const int me = BlockRank<C>();
  uint64_t prefix = 0, sum = 0;
  for (int r = 0; r < C; ++r) {
    const uint64_t x = *InBlock<C>(&sh.block_u64, r);
    if (r < me) prefix += x;
    sum += x;
  }
  RowSync<C>();
  *total = sum;
  return prefix + before;
}

// The key threshold K such that the elements with key >= K among those with key >= `lower` are the
// shortest prefix, in key-descending order, whose count (kMass false) or weight (kMass true)
// reaches `need` (>= 1, at most their total).
template <bool kMass, int C>
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
    for (int base = RowThread<C>() - lane; base < vocab; base += (kThreads * C)) {
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
    RowSync<C>();  // every block's histogram of this pass is complete
    for (int d = threadIdx.x; d < kBins; d += kThreads) {  // the row's histogram
      unsigned c = 0;
      unsigned long long w = 0;
      for (int r = 0; r < C; ++r) {
        const Shared* o = InBlock<C>(&sh, r);
        c += o->count[d];
        if (kMass) w += o->mass[d];
      }
      sh.row_count[d] = c;
      sh.row_mass[d] = w;
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
        sum += kMass ? sh.row_mass[d] : sh.row_count[d];
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
          const uint64_t v = kMass ? sh.row_mass[d] : sh.row_count[d];
          if (run + v >= need) break;
          run += v;
        }
        sh.digit = d;
        sh.before = run;
        sh.digit_total = kMass ? sh.row_mass[d] : sh.row_count[d];
        sh.digit_count = sh.row_count[d];
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(sh.digit) << shift;
    need -= sh.before;
    // The bin is wanted whole (its total is what is still needed) or holds the crossing element
    // alone: every element with this prefix is in, whatever its lower bits.
    const bool done = sh.digit_total == need || sh.digit_count == 1;
    RowSync<C>();  // no block reads this one's histogram any more: the next pass rewrites it
    if (done) break;
  }
  return prefix;
}


__device__ __forceinline__ float KeyValue(uint64_t key) {
  const uint32_t b = static_cast<uint32_t>(key >> 32);
  return __uint_as_float((b & 0x80000000u) ? (b & 0x7fffffffu) : ~b);
}

__device__ __forceinline__ int HistBin(float v, float row_max) {
  return static_cast<int>(fminf((row_max - v) * kBinsPerLogit, static_cast<float>(kHistBins - 1)));
}

// As SelectThreshold, in two passes: a histogram over logit distance finds the bin where the
// running count (or weight) reaches `need`, then that bin's elements are sorted in shared memory.
// false (nothing decided) when the bin holds more than kCandidates elements.
template <bool kMass, int C>
__device__ bool FastSelect(const float* __restrict__ l, int vocab, uint64_t lower, uint64_t need, float row_max,
                           float inv_t, Shared& sh, uint64_t* threshold) {
  for (int b = threadIdx.x; b < kHistBins; b += kThreads) {
    sh.hcount[b] = 0;
    sh.hmass[b] = 0;
  }
  __syncthreads();
  for (int i = RowThread<C>(); i < vocab; i += (kThreads * C)) {
    const float v = l[i];
    if (RankKey(v, i) < lower) continue;
    const int bin = HistBin(v, row_max);
    atomicAdd(&sh.hcount[bin], 1u);
    if (kMass) {
      const uint64_t w = Weight(v, row_max, inv_t);
      if (w != 0) atomicAdd(&sh.hmass[bin], static_cast<unsigned long long>(w));
    }
  }
  RowSync<C>();  // every block's histogram is complete
  // Bins in order (bin 0 holds the largest logits), each the sum of every block's: each thread
  // sums two, a block scan finds the thread whose bins hold the crossing (the same in every block).
  const int b0 = 2 * threadIdx.x;
  uint64_t v0 = 0, v1 = 0;
  for (int r = 0; r < C; ++r) {
    const Shared* o = InBlock<C>(&sh, r);
    v0 += kMass ? o->hmass[b0] : o->hcount[b0];
    v1 += kMass ? o->hmass[b0 + 1] : o->hcount[b0 + 1];
  }
  uint64_t total = 0;
  const uint64_t before = BlockExclusiveScanU64(v0 + v1, &total, sh);
  if (before < need && need <= before + v0 + v1) {
    const bool first = need <= before + v0;
    sh.digit = first ? b0 : b0 + 1;
    sh.before = first ? before : before + v0;
  }
  if (threadIdx.x == 0) sh.num_cand = 0;
  __syncthreads();
  const int crossing = sh.digit;
  const uint64_t need_in_bin = need - sh.before;
  unsigned in_bin = 0;
  for (int r = 0; r < C; ++r) in_bin += InBlock<C>(&sh, r)->hcount[crossing];
  const bool fits = in_bin <= static_cast<unsigned>(kCandidates);  // same in every thread of the row
  RowSync<C>();  // no block reads this one's histogram any more (merged and the radix selection reuse it)
  if (!fits) return false;
  for (int i = RowThread<C>(); i < vocab; i += (kThreads * C)) {
    const float v = l[i];
    const uint64_t key = RankKey(v, i);
    if (key < lower || HistBin(v, row_max) != crossing) continue;
    sh.cand[atomicAdd(&sh.num_cand, 1)] = key;
  }
  RowSync<C>();  // every block's candidates are gathered
  // Every block copies the row's candidates (blocks in rank order) into its own `merged`.
  int n = 0;
  for (int r = 0; r < C; ++r) {
    const Shared* o = InBlock<C>(&sh, r);
    const int count = o->num_cand;
    for (int j = threadIdx.x; j < count; j += kThreads) sh.merged[n + j] = o->cand[j];
    n += count;
  }
  RowSync<C>();  // no block reads this one's candidates any more
  // Rank sort, descending (keys are unique): each thread ranks its two candidates, then writes them.
  uint64_t mine[2] = {0, 0};
  int rank[2] = {-1, -1};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int idx = threadIdx.x + k * kThreads;
    if (idx >= n) continue;
    mine[k] = sh.merged[idx];
    int r = 0;
    for (int j = 0; j < n; ++j) r += sh.merged[j] > mine[k] ? 1 : 0;
    rank[k] = r;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (rank[k] >= 0) sh.merged[rank[k]] = mine[k];
  }
  __syncthreads();
  if (!kMass) {
    *threshold = sh.merged[need_in_bin - 1];  // the need_in_bin-th largest of the bin
    __syncthreads();  // merged is rewritten by the next selection
    return true;
  }
  // The running weight over the sorted bin: each thread two consecutive candidates.
  const int c0 = 2 * threadIdx.x;
  const uint64_t w0 = c0 < n ? Weight(KeyValue(sh.merged[c0]), row_max, inv_t) : 0;
  const uint64_t w1 = c0 + 1 < n ? Weight(KeyValue(sh.merged[c0 + 1]), row_max, inv_t) : 0;
  uint64_t bin_total = 0;
  const uint64_t run = BlockExclusiveScanU64(w0 + w1, &bin_total, sh);
  if (run < need_in_bin && need_in_bin <= run + w0 + w1) sh.token = need_in_bin <= run + w0 ? c0 : c0 + 1;
  __syncthreads();
  *threshold = sh.merged[sh.token];
  __syncthreads();
  return true;
}

template <bool kMass, int C>
__device__ uint64_t Select(const float* __restrict__ l, int vocab, uint64_t lower, uint64_t need, float row_max,
                           float inv_t, Shared& sh) {
  uint64_t threshold = 0;
  if (FastSelect<kMass, C>(l, vocab, lower, need, row_max, inv_t, sh, &threshold)) return threshold;
  return SelectThreshold<kMass, C>(l, vocab, lower, need, row_max, inv_t, sh);
}

// Running (max, Σ exp(l - max), argmax with the lowest id on a tie), merged.
__device__ __forceinline__ void Merge(float& m, float& s, int& arg, float m2, float s2, int a2) {
  const float mm = fmaxf(m, m2);
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  arg = (m2 > m || (m2 == m && a2 < arg)) ? a2 : arg;
  m = mm;
}

__device__ __forceinline__ void WarpMerge(float& m, float& s, int& arg) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o), s2 = __shfl_xor_sync(kFull, s, o);
    const int a2 = __shfl_xor_sync(kFull, arg, o);
    Merge(m, s, arg, m2, s2, a2);
  }
}

// Statistics of elements [begin, end) of a row, strided over the block, merged in a fixed tree.
// Every thread gets the result. `scratch` holds 3 x 32 words.
__device__ void RowStats(const float* __restrict__ l, int begin, int end, float* scratch_m, float* scratch_s,
                         int* scratch_arg, float* m_out, float* s_out, int* arg_out) {
  float m = -FLT_MAX, s = 0.0f;
  int arg = 0x7fffffff;
  for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = l[i];
    if (v > m) {
      s = s * expf(m - v) + 1.0f;
      m = v;
      arg = i;
    } else {
      s += expf(v - m);
    }
  }
  WarpMerge(m, s, arg);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    scratch_m[warp] = m;
    scratch_s[warp] = s;
    scratch_arg[warp] = arg;
  }
  __syncthreads();
  const int warps = blockDim.x / kWarpSize;
  m = lane < warps ? scratch_m[lane] : -FLT_MAX;
  s = lane < warps ? scratch_s[lane] : 0.0f;
  arg = lane < warps ? scratch_arg[lane] : 0x7fffffff;
  WarpMerge(m, s, arg);
  __syncthreads();
  *m_out = m;
  *s_out = s;
  *arg_out = arg;
}

// First pass split over kStatsBlocks blocks per row (a row is too much for one SM to read fast).
__global__ void __launch_bounds__(kStatsThreads) SampleStatsKernel(const float* __restrict__ logits, int vocab,
                                                                   float4* __restrict__ partials) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  __shared__ float sm[kWarpSize], ss[kWarpSize];
  __shared__ int sa[kWarpSize];
  const int row = blockIdx.y, part = blockIdx.x;
  const int chunk = (vocab + kStatsBlocks - 1) / kStatsBlocks;
  const int begin = min(part * chunk, vocab), end = min(begin + chunk, vocab);
  float m, s;
  int arg;
  RowStats(logits + static_cast<int64_t>(row) * vocab, begin, end, sm, ss, sa, &m, &s, &arg);
  if (threadIdx.x == 0) partials[static_cast<int64_t>(row) * kStatsBlocks + part] = make_float4(m, s, __int_as_float(arg), 0.0f);
}

// Row blockIdx.x / C, by the C blocks of one cluster (launched with that cluster size). Every
// block computes the same thresholds; block 0 of the cluster writes the result.
template <int C>
__global__ void __launch_bounds__(kThreads)
    SampleKernel(const float* __restrict__ logits, int vocab, const SamplingRowDev* __restrict__ rows,
                 SampledTokenDev* __restrict__ out, const float4* __restrict__ partials) {
  PdlEnter();  // before any global memory access (see kernel_utils.cuh)
  __shared__ Shared sh;
  const bool leader = BlockRank<C>() == 0;
  const int64_t row = blockIdx.x / C;
  const float* l = logits + row * vocab;
  const SamplingRowDev p = rows[row];
  const bool greedy = p.temperature == 0.0f || p.top_k == 1;
  // A greedy row without top-n takes no pass over the row: the leader alone reads the first pass.
  if (!leader && greedy && p.top_n <= 0) return;

  // Pass 1: max, argmax (the lowest id on a tie) and Σ exp(l - max), from the partials when the
  // stats kernel ran (merged in part order), else online in one read.
  float m, s;
  int arg;
  if (partials != nullptr) {
    m = -FLT_MAX;
    s = 0.0f;
    arg = 0x7fffffff;
    for (int part = 0; part < kStatsBlocks; ++part) {
      const float4 q = partials[row * kStatsBlocks + part];
      Merge(m, s, arg, q.x, q.y, __float_as_int(q.z));
    }
  } else {
    RowStats(l, 0, vocab, sh.warp_m, sh.warp_s, sh.warp_arg, &m, &s, &arg);  // the same in every block
  }
  if (arg >= vocab) arg = 0;  // every logit -inf: no maximum was taken
  const float row_max = m;
  const float log_z = row_max + logf(s);

  int token = arg;
  if (!greedy) {
    const float inv_t = 1.0f / p.temperature;
    uint64_t threshold = 0;
    if (p.top_k > 0 && p.top_k < vocab) {
      threshold = Select<false, C>(l, vocab, 0, static_cast<uint64_t>(p.top_k), row_max, inv_t, sh);
    }
    if (p.top_p < 1.0f) {
      // The mass the top-p prefix must reach, over the top-k survivors.
      uint64_t kept = 0;
      for (int i = RowThread<C>(); i < vocab; i += (kThreads * C)) {
        const float v = l[i];
        if (RankKey(v, i) >= threshold) kept += Weight(v, row_max, inv_t);
      }
      kept = RowSumU64<C>(kept, sh);
      const double want = ceil(static_cast<double>(p.top_p) * static_cast<double>(kept));
      const uint64_t need = want < 1.0 ? 1ull : (want > static_cast<double>(kept) ? kept : static_cast<uint64_t>(want));
      const uint64_t t = Select<true, C>(l, vocab, threshold, need, row_max, inv_t, sh);
      threshold = t > threshold ? t : threshold;
    }
    // The draw: ids in order, each of the row's threads a contiguous range.
    const int chunk = (vocab + (kThreads * C) - 1) / (kThreads * C);
    const int begin = min(RowThread<C>() * chunk, vocab), end = min(begin + chunk, vocab);
    uint64_t mine = 0;
    for (int i = begin; i < end; ++i) {
      const float v = l[i];
      if (RankKey(v, i) >= threshold) mine += Weight(v, row_max, inv_t);
    }
    uint64_t total = 0;
    const uint64_t before = RowExclusiveScanU64<C>(mine, &total, sh);
    const uint64_t u53 = SplitMix64(SplitMix64(p.seed) ^ static_cast<uint64_t>(p.step)) >> 11;
    const uint64_t target = __umul64hi(u53 << 11, total);  // floor(u · total) < total
    if (threadIdx.x == 0) sh.token = arg;  // unreachable fallback: the max always has weight 2^40
    RowSync<C>();
    if (before <= target && target < before + mine) {  // one thread of the row: it tells every block
      uint64_t run = before;
      for (int i = begin; i < end; ++i) {
        const float v = l[i];
        if (RankKey(v, i) < threshold) continue;
        run += Weight(v, row_max, inv_t);
        if (target < run) {
          for (int r = 0; r < C; ++r) *InBlock<C>(&sh.token, r) = i;
          break;
        }
      }
    }
    RowSync<C>();
    token = sh.token;
  }

  const int top_n = min(min(max(p.top_n, 0), kSampleMaxTopN), vocab);
  if (top_n > 0) {
    const uint64_t threshold = Select<false, C>(l, vocab, 0, static_cast<uint64_t>(top_n), row_max, 1.0f, sh);
    // The row's top_n keys, gathered into the leader block.
    if (leader && threadIdx.x == 0) sh.top_count = 0;
    RowSync<C>();
    Shared* lead = InBlock<C>(&sh, 0);
    for (int i = RowThread<C>(); i < vocab; i += (kThreads * C)) {
      const uint64_t key = RankKey(l[i], i);
      if (key < threshold) continue;
      const int at = atomicAdd(&lead->top_count, 1);
      if (at < kSampleMaxTopN) {
        lead->top_key[at] = key;
        lead->top_id[at] = i;
      }
    }
    RowSync<C>();
    if (leader && threadIdx.x == 0) {
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
        out[row].top_ids[a] = sh.top_id[a];
        out[row].top_logprobs[a] = l[sh.top_id[a]] - log_z;
      }
    }
  }
  if (leader && threadIdx.x == 0) {
    out[row].token = token;
    out[row].logprob = l[token] - log_z;
  }
}

// The launch configuration of SampleKernel<C> over `num_rows` rows: clusters of C blocks, a
// programmatic dependent. `attribute` backs config.attrs.
template <int C>
cudaLaunchConfig_t SampleConfig(int64_t num_rows, cudaStream_t stream, cudaLaunchAttribute (&attribute)[2]) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(num_rows * C));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  attribute[1].id = cudaLaunchAttributeClusterDimension;
  attribute[1].val.clusterDim.x = C;
  attribute[1].val.clusterDim.y = 1;
  attribute[1].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = C == 1 ? 1 : 2;
  return config;
}

template <int C>
cudaError_t LaunchSampleKernel(int64_t num_rows, cudaStream_t stream, const float* logits, int vocab,
                               const SamplingRowDev* rows, SampledTokenDev* out, const float4* partials) {
  cudaLaunchAttribute attribute[2];
  const cudaLaunchConfig_t config = SampleConfig<C>(num_rows, stream, attribute);
  return cudaLaunchKernelEx(&config, SampleKernel<C>, logits, vocab, rows, out, partials);
}

// Clusters of C blocks of SampleKernel<C> the GPU holds at once (C = 1: blocks).
template <int C>
cudaError_t SampleClustersAtOnce(int* n) {
  if constexpr (C == 1) {
    int device = 0, sms = 0, per_sm = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, SampleKernel<1>, kThreads, 0);
    *n = sms * per_sm;
    return e;
  } else {
    cudaLaunchAttribute attribute[2];
    const cudaLaunchConfig_t config = SampleConfig<C>(64, nullptr, attribute);
    return cudaOccupancyMaxActiveClusters(n, SampleKernel<C>, &config);
  }
}

}  // namespace

cudaError_t QuerySampleWave(SampleWave* wave) {
  cudaError_t e = SampleClustersAtOnce<1>(&wave->rows[0]);
  if (e == cudaSuccess) e = SampleClustersAtOnce<2>(&wave->rows[1]);
  if (e == cudaSuccess) e = SampleClustersAtOnce<4>(&wave->rows[2]);
  if (e == cudaSuccess) e = SampleClustersAtOnce<8>(&wave->rows[3]);
  return e;
}

size_t SampleScratchBytes(int64_t num_rows) {
  return static_cast<size_t>(num_rows) * kStatsBlocks * sizeof(float4);
}

cudaError_t LaunchSample(const float* logits, int64_t num_rows, int64_t vocab, const SamplingRowDev* rows,
                         SampledTokenDev* out, void* scratch, size_t scratch_bytes, const SampleWave& wave,
                         int blocks_per_row, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  if (vocab < 1 || vocab >= 0x7fffffff || num_rows > 0x7fffffff / kMaxCluster) return cudaErrorInvalidValue;
  float4* partials = nullptr;
  if (scratch != nullptr && scratch_bytes >= SampleScratchBytes(num_rows) && num_rows <= 65535 &&
      vocab >= kStatsBlocks * kStatsThreads) {
    partials = static_cast<float4*>(scratch);
    (void)LaunchDependent(SampleStatsKernel, dim3(kStatsBlocks, static_cast<unsigned>(num_rows)), dim3(kStatsThreads),
                          0, stream, logits, static_cast<int>(vocab), partials);
  }
  // Each block takes an SM (1024 threads at 64 registers): as many blocks a row as keep the launch
  // within one wave. One row: ~58 us for a top-p draw over 128K logits with 8 blocks, ~166 us with
  // one; 128 rows with 8 blocks each (8 waves) took 507 us against 238 us with one, and 32 rows
  // with 4 each (more clusters than the GPCs hold at once) 151 us against 180 us with one.
  int fit = blocks_per_row;
  if (fit <= 0) {
    fit = num_rows <= wave.rows[3] ? 8 : num_rows <= wave.rows[2] ? 4 : num_rows <= wave.rows[1] ? 2 : 1;
  }
  const int v = static_cast<int>(vocab);
  const float4* pp = partials;
  const cudaError_t launched = fit >= 8   ? LaunchSampleKernel<8>(num_rows, stream, logits, v, rows, out, pp)
                               : fit >= 4 ? LaunchSampleKernel<4>(num_rows, stream, logits, v, rows, out, pp)
                               : fit >= 2 ? LaunchSampleKernel<2>(num_rows, stream, logits, v, rows, out, pp)
                                          : LaunchSampleKernel<1>(num_rows, stream, logits, v, rows, out, pp);
  return launched != cudaSuccess ? launched : cudaGetLastError();
}

}  // namespace loraplex::ops::cuda
