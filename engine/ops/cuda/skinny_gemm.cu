// See skinny_gemm.h.
#include "engine/ops/cuda/skinny_gemm.h"

#include <algorithm>
#include <atomic>
#include <iterator>

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kStepK = 64;  // K elements of one warp step: 16 consecutive ones a lane, 4 lanes a row

// 16 bytes that are read once: not kept in L1.
__device__ __forceinline__ uint4 LoadStream(const bf16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// d += a·b for one m16n8k16 tile (a: 16 rows × 16 k, b: 16 k × 8 columns), fp32 sums.
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The lane's 16 k-values of one step, for the rows g and g+8 of its 16-row group and for tokens
// (column g of each 8-token tile): mma q of the step takes elements 4q..4q+3 of each lane's 16 (the
// same permutation of k for w and x, so the dot products are unchanged).
__device__ __forceinline__ void MmaStep(float (&d)[4], const uint4& lo0, const uint4& lo1, const uint4& hi0,
                                        const uint4& hi1, const uint4& x0, const uint4& x1) {
  Mma(d, lo0.x, hi0.x, lo0.y, hi0.y, x0.x, x0.y);
  Mma(d, lo0.z, hi0.z, lo0.w, hi0.w, x0.z, x0.w);
  Mma(d, lo1.x, hi1.x, lo1.y, hi1.y, x1.x, x1.y);
  Mma(d, lo1.z, hi1.z, lo1.w, hi1.w, x1.z, x1.w);
}

template <int MT, int RG, int KS>
constexpr int SmemFloats() {
  return KS * MT * 8 * (RG * 16 + 4);
}

// The part of x·wᵀ a warp owns: rows `row0 + [0, 16)` of w (rows >= rows_valid read row
// rows_valid - 1, their sums are dropped), every KS-th step of K from step `ks`, all MT·8 token
// columns (tokens >= m read token m - 1). Stores its partial sums into red[ks][token][row - tile_row0].
template <int MT, int RG, int KS, int U>
__device__ __forceinline__ void WarpTile(const bf16* __restrict__ w, int rows_valid, int row_in_tile,
                                         const bf16* __restrict__ x, int m, int K, int ks, float* red) {
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4;
  const int c = lane % 4;
  float acc[MT][4] = {};
  if (row_in_tile < rows_valid) {
    const int rlo = min(row_in_tile + g, rows_valid - 1);
    const int rhi = min(row_in_tile + g + 8, rows_valid - 1);
    const bf16* wlo = w + static_cast<int64_t>(rlo) * K + c * 16;
    const bf16* whi = w + static_cast<int64_t>(rhi) * K + c * 16;
    int xoff[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) xoff[t] = min(t * 8 + g, m - 1) * K + c * 16;
    const int nsteps = K / (kStepK * KS);
    uint4 wb[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nsteps) {
        const int k0 = (ks + u * KS) * kStepK;
        wb[u][0] = LoadStream(wlo + k0);
        wb[u][1] = LoadStream(wlo + k0 + 8);
        wb[u][2] = LoadStream(whi + k0);
        wb[u][3] = LoadStream(whi + k0 + 8);
      }
    }
    for (int i = 0; i < nsteps; i += U) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i + u < nsteps) {
          const uint4 lo0 = wb[u][0], lo1 = wb[u][1], hi0 = wb[u][2], hi1 = wb[u][3];
          const int next = i + u + U;
          if (next < nsteps) {
            const int k1 = (ks + next * KS) * kStepK;
            wb[u][0] = LoadStream(wlo + k1);
            wb[u][1] = LoadStream(wlo + k1 + 8);
            wb[u][2] = LoadStream(whi + k1);
            wb[u][3] = LoadStream(whi + k1 + 8);
          }
          const int k0 = (ks + (i + u) * KS) * kStepK;
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            const uint4 x0 = __ldg(reinterpret_cast<const uint4*>(x + xoff[t] + k0));
            const uint4 x1 = __ldg(reinterpret_cast<const uint4*>(x + xoff[t] + k0 + 8));
            MmaStep(acc[t], lo0, lo1, hi0, hi1, x0, x1);
          }
        }
      }
    }
  }
  constexpr int kRowStride = RG * 16 + 4;  // +4 floats: the fragment stores hit 32 distinct banks
  float* mine = red + static_cast<int64_t>(ks) * MT * 8 * kRowStride;
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    const int tok = t * 8 + 2 * c;
    const int r = (threadIdx.x / kWarpSize) % RG * 16 + g;
    mine[tok * kRowStride + r] = acc[t][0];
    mine[(tok + 1) * kRowStride + r] = acc[t][1];
    mine[tok * kRowStride + r + 8] = acc[t][2];
    mine[(tok + 1) * kRowStride + r + 8] = acc[t][3];
  }
}

// Resolves a segment to its token range and weights (as lora_kernels.cu does); false when there
// is nothing to do. Identical in every thread.
__device__ __forceinline__ bool SegmentWork(const LoraParams& p, int seg, int slice, int rank_bound, int* begin,
                                            int* end, LoraSliceWeightsDev* w) {
  const int slot = p.seg_slots[seg];
  if (slot < 0 || slot >= p.num_slots) return false;
  *w = p.table[static_cast<int64_t>(slot) * p.num_slices + slice];
  w->rank = min(w->rank, rank_bound);
  if (w->rank <= 0) return false;
  *begin = max(p.seg_starts[seg], 0);
  *end = min(p.seg_starts[seg + 1], p.num_tokens);
  return *begin < *end;
}

__device__ __forceinline__ int RankBound(const LoraParams& p) {
  if (p.live_max_rank == nullptr) return p.max_rank;
  return min(max(*p.live_max_rank, 0), p.max_rank);
}

// delta_mask[row, slice] = 1 exactly where some live segment's tokens include the row and its
// slot has a nonzero rank for the slice (where a LoRA tile writes that row's delta), else 0.
__device__ void WriteDeltaMarks(const LoraParams& p, int nseg, int rank_bound) {
  const int S = p.num_slices;
  for (int e = threadIdx.x; e < p.delta_rows * S; e += blockDim.x) {
    const int row = e / S;
    const int slice = e % S;
    uint8_t covered = 0;
    for (int seg = 0; seg < nseg && !covered; ++seg) {
      int begin, end;
      LoraSliceWeightsDev w;
      if (!SegmentWork(p, seg, slice, rank_bound, &begin, &end, &w)) continue;
      for (int idx = begin; idx < end; ++idx) {
        if (p.token_rows[idx] == row) {
          covered = 1;
          break;
        }
      }
    }
    p.delta_mask[e] = covered;
  }
}

template <int MT, int RG, int KS, int U>
__global__ void __launch_bounds__(RG* KS* kWarpSize, RG* KS <= 8 ? 2 : 1)
    SkinnyGemmKernel(SkinnyGemmArgs a, SkinnyLora lora, int lora_tiles) {
  extern __shared__ float4 smem4[];
  float* red = reinterpret_cast<float*>(smem4);
  constexpr int kRows = RG * 16;
  constexpr int kRowStride = kRows + 4;
  constexpr int kTokens = MT * 8;
  const int warp = threadIdx.x / kWarpSize;
  const int rg = warp % RG;
  const int ks = warp / RG;
  const bf16* x = static_cast<const bf16*>(a.x);
  const LoraParams& p = lora.p;

  if (static_cast<int>(blockIdx.x) >= lora_tiles) {
    // Base tile: rows n0..n0+kRows of w.
    const int n0 = (blockIdx.x - lora_tiles) * kRows;
    const bf16* w = static_cast<const bf16*>(a.w) + static_cast<int64_t>(n0) * a.k;
    WarpTile<MT, RG, KS, U>(w, kRows, rg * 16, x, a.m, a.k, ks, red);
    AllowDependentLaunch();
    __syncthreads();
    bf16* y = static_cast<bf16*>(a.y);
    for (int e = threadIdx.x; e < a.m * (kRows / 8); e += blockDim.x) {
      const int tok = e / (kRows / 8);
      const int n8 = e % (kRows / 8) * 8;
      float v[8] = {};
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        const float* src = red + (static_cast<int64_t>(s) * kTokens + tok) * kRowStride + n8;
        const float4 v0 = *reinterpret_cast<const float4*>(src);
        const float4 v1 = *reinterpret_cast<const float4*>(src + 4);
        v[0] += v0.x, v[1] += v0.y, v[2] += v0.z, v[3] += v0.w;
        v[4] += v1.x, v[5] += v1.y, v[6] += v1.z, v[7] += v1.w;
      }
      *reinterpret_cast<uint4*>(y + static_cast<int64_t>(tok) * a.n + n0 + n8) = Pack8(v);
    }
    return;
  }

  // LoRA tile (segment, slice, chunk).
  const int S = p.num_slices;
  const int nseg = min(max(*p.num_segments, 0), p.max_segments);
  const int rank_bound = RankBound(p);
  if (blockIdx.x == 0) WriteDeltaMarks(p, nseg, rank_bound);
  const int chunk = blockIdx.x % lora.chunks;
  const int slice = blockIdx.x / lora.chunks % S;
  const int seg = blockIdx.x / lora.chunks / S;
  int begin, end;
  LoraSliceWeightsDev lw;
  if (seg >= nseg || !SegmentWork(p, seg, slice, rank_bound, &begin, &end, &lw)) {
    AllowDependentLaunch();
    return;
  }
  const int rank = lw.rank;  // <= max_rank <= kRows (checked at launch)
  WarpTile<MT, RG, KS, U>(static_cast<const bf16*>(lw.a), rank, rg * 16, x, a.m, a.k, ks, red);
  AllowDependentLaunch();
  __syncthreads();
  // ys[tok][j] = Σ_ks partials, in place in red's first KS slab.
  for (int e = threadIdx.x; e < a.m * rank; e += blockDim.x) {
    const int tok = e / rank;
    const int j = e % rank;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < KS; ++k) s += red[(static_cast<int64_t>(k) * kTokens + tok) * kRowStride + j];
    red[tok * kRowStride + j] = s;
  }
  __syncthreads();
  const float* ys = red;
  const int64_t y_row = static_cast<int64_t>(S) * p.max_rank;
  if (chunk == 0) {
    for (int e = threadIdx.x; e < (end - begin) * rank; e += blockDim.x) {
      const int row = p.token_rows[begin + e / rank];
      const int j = e % rank;
      if (row >= 0 && row < a.m) lora.shrink_y[row * y_row + static_cast<int64_t>(slice) * p.max_rank + j] = ys[row * kRowStride + j];
    }
  }
  // Expand: columns [c0, c1) of the slice.
  const int width = p.slice_offsets[slice + 1] - p.slice_offsets[slice];
  const int per = (width + lora.chunks * 8 - 1) / (lora.chunks * 8) * 8;
  const int c0 = chunk * per;
  const int c1 = min(width, c0 + per);
  const int64_t out_row = p.slice_offsets[S];
  const int64_t out_col = p.slice_offsets[slice];
  const bf16* b = static_cast<const bf16*>(lw.b);
  constexpr int kMaxVec = kRows / 8;
  const bool vec = rank % 8 == 0 && IsAligned16(b);
  const int nv = rank / 8;
  for (int n = c0 + threadIdx.x; n < c1; n += blockDim.x) {
    const bf16* b_row = b + static_cast<int64_t>(n) * rank;
    if (vec) {
      uint4 bv[kMaxVec];
#pragma unroll
      for (int v = 0; v < kMaxVec; ++v) bv[v] = v < nv ? __ldg(reinterpret_cast<const uint4*>(b_row) + v) : make_uint4(0, 0, 0, 0);
      for (int idx = begin; idx < end; ++idx) {
        const int row = p.token_rows[idx];
        if (row < 0 || row >= a.m || row >= p.delta_rows) continue;
        const float* yr = ys + row * kRowStride;
        float s = 0.0f;
#pragma unroll
        for (int v = 0; v < kMaxVec; ++v) {
          if (v < nv) {
            float bf[8];
            Unpack8(bv[v], bf);
#pragma unroll
            for (int i = 0; i < 8; ++i) s = fmaf(bf[i], yr[8 * v + i], s);
          }
        }
        p.delta[row * out_row + out_col + n] = __fmul_rn(lw.scale, s);
      }
    } else {
      for (int idx = begin; idx < end; ++idx) {
        const int row = p.token_rows[idx];
        if (row < 0 || row >= a.m || row >= p.delta_rows) continue;
        const float* yr = ys + row * kRowStride;
        float s = 0.0f;
        for (int j = 0; j < rank; ++j) s = fmaf(ToFloat(b_row[j]), yr[j], s);
        p.delta[row * out_row + out_col + n] = __fmul_rn(lw.scale, s);
      }
    }
  }
}

constexpr SkinnyConfig kConfigs[] = {{4, 4, 2}, {2, 8, 2}, {2, 4, 2}, {4, 2, 4}, {4, 4, 4}};

template <int MT, int RG, int KS, int U>
cudaError_t LaunchTile(const SkinnyGemmArgs& a, const SkinnyLora& lora, int lora_tiles, cudaStream_t stream) {
  constexpr size_t kSmem = SmemFloats<MT, RG, KS>() * sizeof(float);
  static std::atomic<bool> configured{false};
  auto kernel = SkinnyGemmKernel<MT, RG, KS, U>;
  if (!configured.load(std::memory_order_acquire)) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (err != cudaSuccess) return err;
    configured.store(true, std::memory_order_release);
  }
  const int base_tiles = a.n / (RG * 16);
  kernel<<<lora_tiles + base_tiles, RG * KS * kWarpSize, kSmem, stream>>>(a, lora, lora_tiles);
  return cudaGetLastError();
}

template <int RG, int KS, int U>
cudaError_t LaunchConfig(const SkinnyGemmArgs& a, const SkinnyLora& lora, int lora_tiles, cudaStream_t stream) {
  const int mt = (a.m + 7) / 8;
  if (mt <= 1) return LaunchTile<1, RG, KS, U>(a, lora, lora_tiles, stream);
  if (mt <= 2) return LaunchTile<2, RG, KS, U>(a, lora, lora_tiles, stream);
  if (mt <= 4) return LaunchTile<4, RG, KS, U>(a, lora, lora_tiles, stream);
  return LaunchTile<8, RG, KS, U>(a, lora, lora_tiles, stream);
}

bool Same(const SkinnyConfig& a, const SkinnyConfig& b) {
  return a.row_groups == b.row_groups && a.k_splits == b.k_splits && a.unroll == b.unroll;
}

}  // namespace

SkinnyConfig SkinnyDefaultConfig() { return kConfigs[0]; }
int SkinnyNumConfigs() { return static_cast<int>(std::size(kConfigs)); }
SkinnyConfig SkinnyConfigAt(int i) { return kConfigs[i]; }

bool SkinnyGemmSupports(const SkinnyConfig& c, int64_t m, int64_t n, int64_t k) {
  return m >= 1 && m <= kSkinnyMaxTokens && n > 0 && k > 0 && k % (kStepK * c.k_splits) == 0 &&
         n % (16 * c.row_groups) == 0 && k <= (1 << 24) && m * k < (int64_t{1} << 31);
}

int SkinnyLoraChunks(const SkinnyConfig& c, const LoraParams& p, int64_t k) {
  int64_t widest = 0;
  for (int s = 0; s < p.num_slices; ++s) widest = std::max<int64_t>(widest, p.slice_offsets[s + 1] - p.slice_offsets[s]);
  const int64_t tile = int64_t{16} * c.row_groups * k;  // elements of w a base tile moves
  const int64_t b = widest * p.max_rank;
  return static_cast<int>(std::clamp<int64_t>((b + tile - 1) / tile, 1, 16));
}

cudaError_t LaunchSkinnyGemm(const SkinnyConfig& c, const SkinnyGemmArgs& a, const SkinnyLora* lora,
                             cudaStream_t stream) {
  if (!SkinnyGemmSupports(c, a.m, a.n, a.k) || !IsAligned16(a.x) || !IsAligned16(a.w) || !IsAligned16(a.y)) {
    return cudaErrorInvalidValue;
  }
  SkinnyLora l;
  int lora_tiles = 0;
  if (lora != nullptr) {
    l = *lora;
    const LoraParams& p = l.p;
    if (p.delta == nullptr || p.delta_mask == nullptr || p.delta_rows != a.m || l.shrink_y == nullptr ||
        p.max_rank > 16 * c.row_groups || p.max_rank < 1 || p.num_slices < 1 || p.num_slices > kLoraMaxSlices ||
        p.in_features != a.k || p.slice_offsets[p.num_slices] != a.n || l.chunks < 1 || p.num_tokens > a.m) {
      return cudaErrorInvalidValue;
    }
    lora_tiles = p.max_segments * p.num_slices * l.chunks;
  }
  for (const SkinnyConfig& k : kConfigs) {
    if (!Same(k, c)) continue;
    if (Same(c, kConfigs[0])) return LaunchConfig<4, 4, 2>(a, l, lora_tiles, stream);
    if (Same(c, kConfigs[1])) return LaunchConfig<2, 8, 2>(a, l, lora_tiles, stream);
    if (Same(c, kConfigs[2])) return LaunchConfig<2, 4, 2>(a, l, lora_tiles, stream);
    if (Same(c, kConfigs[3])) return LaunchConfig<4, 2, 4>(a, l, lora_tiles, stream);
    return LaunchConfig<4, 4, 4>(a, l, lora_tiles, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace loraplex::ops::cuda
