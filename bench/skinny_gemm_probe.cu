// A probe for putting the LoRA work inside the decode GEMM (bench/RESULTS.md, tenth and eleventh
// sessions): can a GEMM of our own stream a decode step's weights, y[M,N] = x[M,K]·W[N,K]ᵀ in bf16
// with fp32 sums and M <= 64, as fast as cuBLASLt, and what does rank-16 LoRA cost inside it?
//
// For each Llama-3-8B projection (qkv, o, gate_up, down) and M = 1, 8, 32, 64 it times cuBLASLt
// (the executor's CublasLtGemm) and this file's kernel at 1, 2 and 3 blocks an SM (the pipeline as
// deep as the shared memory then allows), with k steps of 64 and (b1k32..b3k32: smaller stages,
// so more of them) of 32, and every split of K, each as a CUDA graph of 20 calls over enough
// weight copies to miss the L2, and checks the output against cuBLASLt's. Then the same
// sweep with rank-16 LoRA of 1 and of 4 adapters inside the kernel: every block also streams its
// split of each adapter's A with W, multiplies it with x on the tensor cores (s = x·Aᵀ, a k16
// substep a warp), and adds scale·s·Bᵀ of each token's adapter to its own sums before it writes
// (the expand is linear in s, so the splits' parts add up). Checked against cuBLASLt plus a plain
// delta kernel, and the reference shrink against the host. "no adapter bytes" times the same
// kernel with the adapters' copies zero-filled: what the kernel's structure costs without the bytes.
// Not part of the engine. Usage (GPU host): skinny_gemm_probe (PROBE_SHAPE=qkv, PROBE_M=1: only
// those; PROBE_M takes any M up to 64; PROBE_CONFIG=b3:8: only that configuration and split count of
// the plain kernel, and no LoRA-inside sweeps, for a profiler: bench/ncu_skinny.sh). Prints one
// line per case; exit 1 on a wrong result.
//
// The kernel: a block takes 128 rows of W (output columns) over one split of K, streams 64- (or
// 32-) wide k steps of W and x through a cp.async pipeline into XOR-swizzled shared memory, and multiplies
// them with mma.sync m16n8k16 (bf16 in, fp32 accumulate): 4 warps of 32 columns each, x padded to
// whole 16-row tiles. Splits write fp32 partials that a second kernel sums in split order
// (deterministic); one split writes y directly.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "engine/ops/cuda/cublaslt_gemm.h"
#include "engine/ops/cuda/kernel_utils.cuh"

namespace {

using loraplex::ops::cuda::bf16;
using loraplex::ops::cuda::CpAsync16OrZero;
using loraplex::ops::cuda::CpAsyncCommit;
using loraplex::ops::cuda::CpAsyncWait;
using loraplex::ops::cuda::kWarpSize;
using loraplex::ops::cuda::Ldmatrix4;
using loraplex::ops::cuda::MmaBf16;
using loraplex::ops::cuda::SmemAddr;
using loraplex::ops::cuda::StageCopies;
using loraplex::ops::cuda::WarpSum;

constexpr int kNTile = 128;                 // W rows (output columns) a block
constexpr int kKStep = 64;                  // the unit of a split of K (every kernel's k step divides it)
constexpr int kWarps = 4;                   // 32 of the tile's columns each
constexpr int kThreads = kWarps * kWarpSize;
// A kernel's k step KS (64 or 32) sets its tile rows: KS·2 bytes, KS/8 chunks of 16 bytes.
template <int KS>
constexpr int RowBytes() {
  return KS * 2;
}
template <int KS>
constexpr int Chunks() {
  return KS / 8;
}

#define PROBE_CHECK(call)                                                                        \
  do {                                                                                           \
    const cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][KS] bf16 tile, swizzled so that
// the 8 rows one ldmatrix matrix reads at one chunk fall in 8 different 16-byte bank groups: for
// KS 64 (8 chunks, 128-byte rows) the chunk is XORed with row % 8; for KS 32 (4 chunks, two rows a
// 128-byte line) with (row / 2) % 4, the row's parity already picking the line's half.
template <int KS>
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  static_assert(KS == 64 || KS == 32);
  if constexpr (KS == 64) {
    return static_cast<uint32_t>(row * RowBytes<KS>() + ((chunk ^ (row & 7)) << 4));
  } else {
    return static_cast<uint32_t>(row * RowBytes<KS>() + ((chunk ^ ((row >> 1) & 3)) << 4));
  }
}

constexpr int kRank = 16;         // the probe's LoRA rank
constexpr int kMaxAdapters = 4;   // adapters a LoRA step of the probe may mix
constexpr int kBTileBytes = kNTile * kRank * 2;  // one adapter's B rows for a block's columns

// The LoRA of a step: token m uses adapter token_adapter[m] (-1: none), whose B is b[a] ([N, kRank]
// bf16) and whose shrink output is s[m, a·kRank + j] (F32, [M, kMaxAdapters·kRank]).
struct ProbeLora {
  const float* s = nullptr;
  const int* token_adapter = nullptr;
  const bf16* a[kMaxAdapters] = {};  // [kRank, K] each; read by the in-GEMM shrink only
  const bf16* b[kMaxAdapters] = {};
  int num_adapters = 0;
  float scale = 0.0f;
};

constexpr int kAStageBytes = kRank * RowBytes<64>();  // one adapter's A rows for a k step (KS 64 only)
constexpr int kSmemPerSm = 233472;                // an H100/H200 SM's shared memory; 1 KiB a block is reserved

// A pipeline stage: W, x (16·MT rows) and each adapter's A for one k step of KS.
template <int MT, int kInShrink, int KS>
constexpr int StageBytes() {
  return (kNTile + 16 * MT) * RowBytes<KS>() + kInShrink * kAStageBytes;
}
// After the stages: each adapter's B rows for the block's columns, s and the token's adapter.
template <int MT, int kInShrink>
constexpr int FixedBytes() {
  return kInShrink > 0 ? kInShrink * kBTileBytes + 16 * MT * kRank * 4 + 16 * MT * 4 : 0;
}
// As many stages as let kBlocks blocks share an SM (16 at most); fewer than 2: no such kernel.
template <int MT, int kInShrink, int kBlocks, int KS>
constexpr int Stages() {
  const int s = (kSmemPerSm / kBlocks - 1024 - FixedBytes<MT, kInShrink>()) / StageBytes<MT, kInShrink, KS>();
  return s > 16 ? 16 : s;
}
template <int MT, int kInShrink, int kBlocks, int KS>
constexpr int SmemBytes() {
  return Stages<MT, kInShrink, kBlocks, KS>() * StageBytes<MT, kInShrink, KS>() + FixedBytes<MT, kInShrink>();
}

// y = x·Wᵀ over k in [blockIdx.y·k_len, +k_len) for W rows [blockIdx.x·kNTile, +kNTile); x has M
// <= 16·MT rows. partial != null: writes partial[blockIdx.y][m][n] (F32); else y[m][n] (bf16).
// kInShrink > 0: LoRA of up to kInShrink adapters (ProbeLora) inside the GEMM. Every block also streams the k steps
// of its split of each adapter's A (kInShrink adapters at most), multiplies them with x as it does
// W (warp w takes k16 substep w of every stage), sums the warps' parts of s for its split in
// shared memory and adds scale·s_split·Bᵀ to its own partial: the expand is linear in s, so the
// splits' sums add up to the whole. Each block reads all of A for its split from the L2.
// k_len is a multiple of kKStep; rows of x and W are 16-byte aligned.
// kBlocks: blocks an SM, which sets the pipeline's depth (Stages); KS: k a stage (64, or 32 for
// smaller stages and so more of them; the in-GEMM shrink needs 64: a k16 substep a warp).
// kHoist: each thread's W and x copy addresses (its rows and chunk, the same in every stage)
// computed once before the pipeline, and only advanced by a k step per stage, in place of the
// per-copy index arithmetic of `load` (the plain kernel only). Nsight Compute found the kernel
// bound by instruction issue at 12 warps an SM (bench/RESULTS.md, twelfth session).
template <int MT, int kInShrink, int kBlocks, int KS = 64, bool kHoist = false>
__global__ void __launch_bounds__(kThreads) SkinnyGemmKernel(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                             int M, int N, int K, int k_len,
                                                             float* __restrict__ partial, bf16* __restrict__ y,
                                                             const __grid_constant__ ProbeLora lora) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr bool kLora = kInShrink > 0;
  constexpr int kStages = Stages<MT, kInShrink, kBlocks, KS>();
  static_assert(kStages >= 2);
  static_assert(kInShrink == 0 || KS == 64, "the in-GEMM shrink gives each warp one k16 substep of 64");
  constexpr int kXRows = 16 * MT;
  constexpr int kRowBytes = RowBytes<KS>();
  constexpr int kChunks = Chunks<KS>();
  constexpr int kWStageBytes = kNTile * kRowBytes;
  constexpr int kXStageBytes = kXRows * kRowBytes;
  unsigned char* w_s = smem;
  unsigned char* x_s = smem + kStages * kWStageBytes;
  unsigned char* ash_s = x_s + kStages * kXStageBytes;                          // [stage][adapter][kRank][64]
  unsigned char* b_s = ash_s + kStages * kInShrink * kAStageBytes;              // [adapter][128][kRank]
  float* s_s = reinterpret_cast<float*>(b_s + kInShrink * kBTileBytes);      // [kXRows][kRank]
  int* a_s = reinterpret_cast<int*>(s_s + kXRows * kRank);                     // [kXRows]
  const int n0 = blockIdx.x * kNTile;
  const int k0 = blockIdx.y * k_len;
  const int steps = k_len / KS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // kHoist: this thread copies chunk `my_chunk` of W rows my_row + i·kWPass (i < kWCopies) and of
  // x rows my_row + i·kWPass (i < kXCopies); rows kWPass apart share a swizzle, so their
  // shared-memory offsets are i·kWPass rows past the first.
  static_assert(!kHoist || (kInShrink == 0 && KS == 64), "the hoisted copies are the plain kernel's, k step 64");
  constexpr int kWPass = kThreads / kChunks;  // rows one pass of the block's threads covers
  constexpr int kWCopies = kNTile / kWPass;
  constexpr int kXCopies = (kXRows + kWPass - 1) / kWPass;
  static_assert(!kHoist || (kNTile % kWPass == 0 && kXRows % kWPass == 0));
  const int my_chunk = tid % kChunks, my_row = tid / kChunks;
  const uint32_t my_off = TileOffset<KS>(my_row, my_chunk);
  StageCopies<kWCopies> w_copies;
  StageCopies<kXCopies> x_copies;
  if constexpr (kHoist) {
    w_copies.Init(w, K, n0 + my_row, kWPass, N, k0 + my_chunk * 8);
    x_copies.Init(x, K, my_row, kWPass, M, k0 + my_chunk * 8);
  }

  auto load = [&](int stage, int step) {
    if constexpr (kHoist) {
      w_copies.Issue(SmemAddr(w_s + stage * kWStageBytes) + my_off, kWPass * kRowBytes, step * KS);
      x_copies.Issue(SmemAddr(x_s + stage * kXStageBytes) + my_off, kWPass * kRowBytes, step * KS);
      return;
    }
    const int k = k0 + step * KS;
    const uint32_t wb = SmemAddr(w_s + stage * kWStageBytes);
#pragma unroll
    for (int c = tid; c < kNTile * kChunks; c += kThreads) {
      const int row = c / kChunks, chunk = c % kChunks;
      const bool ok = n0 + row < N;
      CpAsync16OrZero(wb + TileOffset<KS>(row, chunk), w + static_cast<int64_t>(ok ? n0 + row : 0) * K + k + chunk * 8,
                      ok);
    }
    const uint32_t xb = SmemAddr(x_s + stage * kXStageBytes);
#pragma unroll
    for (int c = tid; c < kXRows * kChunks; c += kThreads) {
      const int row = c / kChunks, chunk = c % kChunks;
      const bool ok = row < M;
      CpAsync16OrZero(xb + TileOffset<KS>(row, chunk), x + static_cast<int64_t>(ok ? row : 0) * K + k + chunk * 8, ok);
    }
    if constexpr (kInShrink > 0) {
      const uint32_t ab = SmemAddr(ash_s + stage * kInShrink * kAStageBytes);
#pragma unroll
      for (int c = tid; c < kInShrink * kRank * 8; c += kThreads) {
        const int ad = c / (kRank * 8), row = (c >> 3) % kRank, chunk = c & 7;
        const bool ok = ad < lora.num_adapters;
        CpAsync16OrZero(ab + ad * kAStageBytes + TileOffset<KS>(row, chunk),
                        (ok ? lora.a[ad] + static_cast<int64_t>(row) * K + k : x) + chunk * 8, ok);
      }
    }
  };

  float acc[MT][4][4] = {};
  float sacc[MT][kInShrink > 0 ? 2 * kInShrink : 1][4] = {};  // s for k16 substep `warp` of each stage
  const bool add_lora = kLora;
  if (add_lora) {  // the block's rows of every adapter's B, with the first stage
    for (int c = tid; c < lora.num_adapters * kNTile * 2; c += kThreads) {
      const int a = c / (kNTile * 2), row = (c / 2) % kNTile, half = c % 2;
      const bool ok = n0 + row < N;
      CpAsync16OrZero(SmemAddr(b_s + a * kBTileBytes + row * kRank * 2 + half * 16),
                lora.b[a] + static_cast<int64_t>(ok ? n0 + row : 0) * kRank + half * 8, ok);
    }
  }
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    CpAsyncCommit();
  }
  for (int step = 0; step < steps; ++step) {
    CpAsyncWait<kStages - 2>();  // this thread's copies of `step` have landed
    __syncthreads();             // everyone's; and the stage about to be refilled is no longer read
    const int next = step + kStages - 1;
    if (next < steps) load(next % kStages, next);
    CpAsyncCommit();
    const int st = step % kStages;
    const uint32_t wb = SmemAddr(w_s + st * kWStageBytes), xb = SmemAddr(x_s + st * kXStageBytes);
#pragma unroll
    for (int kk = 0; kk < KS / 16; ++kk) {
      // x: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Ldmatrix4(xb + TileOffset<KS>(mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1), kk * 2 + (lane >> 4)), a[mt]);
      }
      // W: two n8 tiles at a time, matrices (tile 0, k 0-7), (tile 0, k 8-15), (tile 1, ...).
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        const int q = lane >> 3;
        Ldmatrix4(wb + TileOffset<KS>(warp * 32 + np * 16 + (q >> 1) * 8 + (lane & 7), kk * 2 + (q & 1)), b);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          MmaBf16(acc[mt][np * 2], a[mt], b[0], b[1]);
          MmaBf16(acc[mt][np * 2 + 1], a[mt], b[2], b[3]);
        }
      }
      if constexpr (kInShrink > 0) {
        if (kk == warp) {  // s += x·Aᵀ for this substep, every adapter (two n8 tiles of rank each)
          const uint32_t ab = SmemAddr(ash_s + st * kInShrink * kAStageBytes);
          const int q = lane >> 3;
#pragma unroll
          for (int ad = 0; ad < kInShrink; ++ad) {
            uint32_t b[4];
            Ldmatrix4(ab + ad * kAStageBytes + TileOffset<KS>((q >> 1) * 8 + (lane & 7), kk * 2 + (q & 1)), b);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              MmaBf16(sacc[mt][ad * 2], a[mt], b[0], b[1]);
              MmaBf16(sacc[mt][ad * 2 + 1], a[mt], b[2], b[3]);
            }
          }
        }
      }
    }
  }
  CpAsyncWait<0>();
  if (add_lora) {
    if constexpr (kInShrink > 0) {
      // The warps' parts of s -> red[warp][m][ad·kRank + j] in the (now idle) W stages, summed in
      // warp order (deterministic); each token keeps its own adapter's kRank values.
      constexpr int kCols = kInShrink * kRank;
      float* red = reinterpret_cast<float*>(w_s);
      static_assert(kWarps * kXRows * kCols * 4 <= kStages * StageBytes<MT, kInShrink, KS>());
      __syncthreads();  // every warp is done reading the stages
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int t = 0; t < 2 * kInShrink; ++t) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int m = mt * 16 + (lane >> 2) + 8 * half, c = t * 8 + 2 * (lane & 3);
            red[(warp * kXRows + m) * kCols + c] = sacc[mt][t][2 * half];
            red[(warp * kXRows + m) * kCols + c + 1] = sacc[mt][t][2 * half + 1];
          }
        }
      }
      __syncthreads();
      for (int e = tid; e < kXRows * kRank; e += kThreads) {
        const int m = e / kRank, j = e % kRank;
        const int a = m < M ? lora.token_adapter[m] : -1;
        float v = 0.0f;
        if (a >= 0) {
#pragma unroll
          for (int w = 0; w < kWarps; ++w) v += red[(w * kXRows + m) * kCols + a * kRank + j];
        }
        s_s[e] = v;
        if (j == 0) a_s[m] = a;
      }
    }
    __syncthreads();  // s_s, a_s and (every thread's cp.async having landed) b_s
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int nl = warp * 32 + nt * 8 + 2 * (lane & 3);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int m = mt * 16 + (lane >> 2) + 8 * half;
          const int a = a_s[m];
          if (a < 0) continue;
          const __nv_bfloat162* b0 = reinterpret_cast<const __nv_bfloat162*>(b_s + a * kBTileBytes + nl * kRank * 2);
          const __nv_bfloat162* b1 = b0 + kRank / 2;
          float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
          for (int j = 0; j < kRank / 2; ++j) {
            const float2 f0 = __bfloat1622float2(b0[j]), f1 = __bfloat1622float2(b1[j]);
            const float s0 = s_s[m * kRank + 2 * j], s1 = s_s[m * kRank + 2 * j + 1];
            d0 = fmaf(f0.x, s0, fmaf(f0.y, s1, d0));
            d1 = fmaf(f1.x, s0, fmaf(f1.y, s1, d1));
          }
          acc[mt][nt][2 * half] += lora.scale * d0;
          acc[mt][nt][2 * half + 1] += lora.scale * d1;
        }
      }
    }
  }
  // Accumulator (mt, nt): rows mt·16 + lane/4 (+8), columns nt·8 + 2·(lane%4) (+1) of the warp's 32.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int n = n0 + warp * 32 + nt * 8 + 2 * (lane & 3);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = mt * 16 + (lane >> 2) + 8 * half;
        if (m >= M) continue;
        const float v0 = acc[mt][nt][2 * half], v1 = acc[mt][nt][2 * half + 1];
        if (partial != nullptr) {
          float* p = partial + (static_cast<int64_t>(blockIdx.y) * M + m) * N + n;
          if (n < N) p[0] = v0;
          if (n + 1 < N) p[1] = v1;
        } else {
          bf16* p = y + static_cast<int64_t>(m) * N + n;
          if (n < N) p[0] = __float2bfloat16(v0);
          if (n + 1 < N) p[1] = __float2bfloat16(v1);
        }
      }
    }
  }
}

// y[e] = Σ_split partial[split][e] in split order.
__global__ void ReduceSplitsKernel(const float* __restrict__ partial, int splits, int64_t elems, bf16* __restrict__ y) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= elems) return;
  float s = 0.0f;
  for (int i = 0; i < splits; ++i) s += partial[i * elems + e];
  y[e] = __float2bfloat16(s);
}

__global__ void FillKernel(bf16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2bfloat16((static_cast<float>(h & 0xffff) / 65536.0f - 0.5f) * scale);
  }
}

// The reference shrink: s[m, a·kRank + j] = Σ_k x[m, k]·A_a[j, k] for the token's adapter a (a
// block a token, a warp per 2 of the kRank rows).
__global__ void __launch_bounds__(256) ProbeShrinkKernel(const bf16* __restrict__ x, int K, ProbeLora lora,
                                                         const bf16* const* __restrict__ a_ptrs, float* __restrict__ s) {
  const int m = blockIdx.x;
  const int a = lora.token_adapter[m];
  if (a < 0) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const bf16* A = a_ptrs[a];
  for (int j = warp * 2; j < warp * 2 + 2; ++j) {
    float sum = 0.0f;
    for (int k = lane * 8; k < K; k += kWarpSize * 8) {
      const uint4 xv = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + k);
      const uint4 av = *reinterpret_cast<const uint4*>(A + static_cast<int64_t>(j) * K + k);
      const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xv);
      const __nv_bfloat162* ah = reinterpret_cast<const __nv_bfloat162*>(&av);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 fx = __bfloat1622float2(xh[i]), fa = __bfloat1622float2(ah[i]);
        sum = fmaf(fx.x, fa.x, fmaf(fx.y, fa.y, sum));
      }
    }
    sum = WarpSum(sum);
    if (lane == 0) s[static_cast<int64_t>(m) * kMaxAdapters * kRank + a * kRank + j] = sum;
  }
}

// The reference delta: y_ref[m, n] = float(base[m, n]) + scale·Σ_j s[m, a·kRank + j]·B_a[n, j].
__global__ void ProbeReferenceKernel(const bf16* __restrict__ base, int M, int N, ProbeLora lora, float* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(M) * N) return;
  const int m = static_cast<int>(e / N), n = static_cast<int>(e % N);
  float v = __bfloat162float(base[e]);
  const int a = lora.token_adapter[m];
  if (a >= 0) {
    float d = 0.0f;
    for (int j = 0; j < kRank; ++j) {
      d += lora.s[static_cast<int64_t>(m) * kMaxAdapters * kRank + a * kRank + j] *
           __bfloat162float(lora.b[a][static_cast<int64_t>(n) * kRank + j]);
    }
    v += lora.scale * d;
  }
  out[e] = v;
}

// Launches the GEMM (kInShrink > 0: with that many adapters' LoRA inside it) with the x tile
// that fits M and kBlocks blocks an SM; false where no pipeline of 2 stages fits.
template <int MT, int kInShrink, int kBlocks, int KS, bool kHoist = false>
bool LaunchOurs(const bf16* x, const bf16* w, int M, int N, int K, int splits, float* partial, bf16* y,
                const ProbeLora& lora, cudaStream_t stream) {
  if constexpr (Stages<MT, kInShrink, kBlocks, KS>() < 2) {
    return false;
  } else {
    constexpr auto kernel = SkinnyGemmKernel<MT, kInShrink, kBlocks, KS, kHoist>;
    constexpr int smem = SmemBytes<MT, kInShrink, kBlocks, KS>();
    static const bool configured = [] {
      PROBE_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      int blocks = 0;
      PROBE_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem));
      cudaFuncAttributes attr;
      PROBE_CHECK(cudaFuncGetAttributes(&attr, kernel));
      std::printf("  [kernel MT=%d in-shrink=%d k step %d%s: %d stages, %d B shared, %d registers, %zu B local, %d "
                  "blocks an SM]\n",
                  MT, kInShrink, KS, kHoist ? " hoisted" : "", Stages<MT, kInShrink, kBlocks, KS>(), smem,
                  attr.numRegs, attr.localSizeBytes, blocks);
      return true;
    }();
    (void)configured;
    kernel<<<dim3((N + kNTile - 1) / kNTile, splits), kThreads, smem, stream>>>(x, w, M, N, K, K / splits,
                                                                               splits > 1 ? partial : nullptr, y, lora);
    if (splits > 1) {
      const int64_t elems = static_cast<int64_t>(M) * N;
      ReduceSplitsKernel<<<static_cast<unsigned>((elems + 255) / 256), 256, 0, stream>>>(partial, splits, elems, y);
    }
    return true;
  }
}

template <int kInShrink, int kBlocks, int KS, bool kHoist>
bool Ours(const bf16* x, const bf16* w, int M, int N, int K, int splits, float* partial, bf16* y,
          const ProbeLora& lora, cudaStream_t s) {
  if (M <= 16) return LaunchOurs<1, kInShrink, kBlocks, KS, kHoist>(x, w, M, N, K, splits, partial, y, lora, s);
  if (M <= 32) return LaunchOurs<2, kInShrink, kBlocks, KS, kHoist>(x, w, M, N, K, splits, partial, y, lora, s);
  return LaunchOurs<4, kInShrink, kBlocks, KS, kHoist>(x, w, M, N, K, splits, partial, y, lora, s);
}

// Ours with kInShrink adapters' LoRA (0: none) at `blocks` (1-3) blocks an SM, k step KS, the
// copies' addresses hoisted out of the pipeline (kHoist, plain kernel only) or not.
template <int kInShrink, int KS = 64, bool kHoist = false>
bool OursAt(int blocks, const bf16* x, const bf16* w, int M, int N, int K, int splits, float* partial, bf16* y,
            const ProbeLora& lora, cudaStream_t s) {
  switch (blocks) {
    case 1: return Ours<kInShrink, 1, KS, kHoist>(x, w, M, N, K, splits, partial, y, lora, s);
    case 2: return Ours<kInShrink, 2, KS, kHoist>(x, w, M, N, K, splits, partial, y, lora, s);
    default: return Ours<kInShrink, 3, KS, kHoist>(x, w, M, N, K, splits, partial, y, lora, s);
  }
}

// Median microseconds a call of `body(copy)` over a CUDA graph of 20 calls, 7 replays.
template <typename Body>
double TimeGraph(cudaStream_t stream, int copies, Body body) {
  constexpr int kCalls = 20;
  cudaGraph_t graph;
  PROBE_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int c = 0; c < kCalls; ++c) body(c % copies);
  PROBE_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  PROBE_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  PROBE_CHECK(cudaEventCreate(&start));
  PROBE_CHECK(cudaEventCreate(&stop));
  std::vector<double> us;
  for (int rep = 0; rep < 8; ++rep) {
    PROBE_CHECK(cudaEventRecord(start, stream));
    PROBE_CHECK(cudaGraphLaunch(exec, stream));
    PROBE_CHECK(cudaEventRecord(stop, stream));
    PROBE_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    PROBE_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (rep > 0) us.push_back(ms * 1000.0 / kCalls);  // the first replay warms up
  }
  PROBE_CHECK(cudaEventDestroy(start));
  PROBE_CHECK(cudaEventDestroy(stop));
  PROBE_CHECK(cudaGraphExecDestroy(exec));
  PROBE_CHECK(cudaGraphDestroy(graph));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

std::vector<float> Download(const bf16* d, size_t n) {
  std::vector<bf16> h(n);
  PROBE_CHECK(cudaMemcpy(h.data(), d, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = __bfloat162float(h[i]);
  return f;
}

struct Shape {
  const char* name;
  int n, k;
};

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  cudaStream_t stream;
  PROBE_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  constexpr size_t kWorkspace = 32u << 20;
  void* workspace = nullptr;
  PROBE_CHECK(cudaMalloc(&workspace, kWorkspace));
  auto lt = loraplex::ops::cuda::CublasLtGemm::Create(workspace, kWorkspace);
  if (!lt.ok()) {
    std::fprintf(stderr, "cuBLASLt: %s\n", lt.status().ToString().c_str());
    return 2;
  }
  const Shape shapes[] = {{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}};
  constexpr int kMaxM = 64;
  int failures = 0;
  std::printf("%-8s %3s | %-22s | %-34s | %s\n", "shape", "M", "cuBLASLt us (GB/s)", "ours: best splits, us (GB/s, x)",
              "all splits us; max |ours - cuBLASLt| / max |y|");
  // PROBE_SHAPE=qkv / PROBE_M=1: only that shape / batch (for a profiler).
  const char* only_shape = std::getenv("PROBE_SHAPE");
  const char* only_m = std::getenv("PROBE_M");
  const int probe_m = only_m != nullptr ? std::atoi(only_m) : 0;
  if (only_m != nullptr && (probe_m < 1 || probe_m > 64)) {
    std::fprintf(stderr, "PROBE_M '%s' is not in 1..64\n", only_m);
    return 2;
  }
  // PROBE_CONFIG=bN:S or bNk32:S: that configuration (as the sweep names it) at S splits only.
  std::string only_config;
  int only_splits = 0;
  if (const char* config = std::getenv("PROBE_CONFIG"); config != nullptr) {
    const std::string c = config;
    const size_t colon = c.find(':');
    only_config = c.substr(0, colon);
    only_splits = colon == std::string::npos ? 0 : std::atoi(c.c_str() + colon + 1);
    if (only_config.empty() || only_splits < 1) {
      std::fprintf(stderr, "PROBE_CONFIG '%s' is not NAME:SPLITS (e.g. b3:8)\n", config);
      return 2;
    }
  }
  for (const Shape& sh : shapes) {
    if (only_shape != nullptr && std::string(only_shape) != sh.name) continue;
    const int64_t w_elems = static_cast<int64_t>(sh.n) * sh.k;
    const int copies = static_cast<int>(std::clamp<int64_t>(400'000'000 / (w_elems * 2), 2, 16));
    std::vector<bf16*> w(copies);
    for (int c = 0; c < copies; ++c) {
      PROBE_CHECK(cudaMalloc(&w[c], w_elems * sizeof(bf16)));
      FillKernel<<<1024, 256, 0, stream>>>(w[c], w_elems, 17u + c, 0.05f);
    }
    bf16 *x, *y_ref, *y;
    PROBE_CHECK(cudaMalloc(&x, static_cast<size_t>(kMaxM) * sh.k * sizeof(bf16)));
    PROBE_CHECK(cudaMalloc(&y_ref, static_cast<size_t>(kMaxM) * sh.n * sizeof(bf16)));
    PROBE_CHECK(cudaMalloc(&y, static_cast<size_t>(kMaxM) * sh.n * sizeof(bf16)));
    FillKernel<<<256, 256, 0, stream>>>(x, static_cast<int64_t>(kMaxM) * sh.k, 5u, 2.0f);
    float* partial;
    const int max_splits = 32;
    PROBE_CHECK(cudaMalloc(&partial, static_cast<size_t>(max_splits) * kMaxM * sh.n * sizeof(float)));
    // LoRA: kMaxAdapters adapters' A [kRank, K] and B [N, kRank], the shrink output, the reference.
    bf16* lora_a[kMaxAdapters];
    bf16* lora_b[kMaxAdapters];
    for (int a = 0; a < kMaxAdapters; ++a) {
      PROBE_CHECK(cudaMalloc(&lora_a[a], static_cast<size_t>(kRank) * sh.k * sizeof(bf16)));
      PROBE_CHECK(cudaMalloc(&lora_b[a], static_cast<size_t>(sh.n) * kRank * sizeof(bf16)));
      FillKernel<<<256, 256, 0, stream>>>(lora_a[a], static_cast<int64_t>(kRank) * sh.k, 101u + a, 0.05f);
      FillKernel<<<256, 256, 0, stream>>>(lora_b[a], static_cast<int64_t>(sh.n) * kRank, 201u + a, 0.5f);
    }
    bf16** d_a_ptrs;
    PROBE_CHECK(cudaMalloc(&d_a_ptrs, sizeof(lora_a)));
    PROBE_CHECK(cudaMemcpy(d_a_ptrs, lora_a, sizeof(lora_a), cudaMemcpyHostToDevice));
    float *s_buf, *ref_f32;
    int* d_token_adapter;
    PROBE_CHECK(cudaMalloc(&s_buf, static_cast<size_t>(kMaxM) * kMaxAdapters * kRank * sizeof(float)));
    PROBE_CHECK(cudaMalloc(&ref_f32, static_cast<size_t>(kMaxM) * sh.n * sizeof(float)));
    PROBE_CHECK(cudaMalloc(&d_token_adapter, kMaxM * sizeof(int)));
    PROBE_CHECK(cudaStreamSynchronize(stream));
    const std::vector<int> batches = probe_m > 0 ? std::vector<int>{probe_m} : std::vector<int>{1, 8, 32, 64};
    for (int M : batches) {
      const double bytes = 2.0 * (w_elems + static_cast<double>(M) * sh.k + static_cast<double>(M) * sh.n);
      auto lt_call = [&](int c) {
        const absl::Status s = (*lt)->Run(x, w[c], y_ref, false, M, sh.n, sh.k, 0.0f, stream);
        if (!s.ok()) {
          std::fprintf(stderr, "cuBLASLt: %s\n", s.ToString().c_str());
          std::exit(2);
        }
      };
      lt_call(0);  // chooses the algorithm outside the capture
      PROBE_CHECK(cudaStreamSynchronize(stream));
      const double lt_us = TimeGraph(stream, copies, lt_call);
      lt_call(0);
      PROBE_CHECK(cudaStreamSynchronize(stream));
      const std::vector<float> ref = Download(y_ref, static_cast<size_t>(M) * sh.n);
      float ref_max = 0.0f;
      for (float v : ref) ref_max = std::max(ref_max, std::fabs(v));
      // Every split of K at 1, 2 and 3 blocks an SM (the pipeline as deep as the shared memory
      // allows); the fastest, and the largest error against `want` (relative to its largest value).
      struct Sweep {
        double us = 1e30;
        int blocks = 0, splits = 0;
        float err = 0.0f;
        std::string all;
      };
      // Configurations: `blocks` 1-3 at a k step of 64, 11-13 the same at a k step of 32, 21-23 at
      // a k step of 64 with the copies' addresses hoisted (the plain kernel only), named b1..b3,
      // b1k32..b3k32 and b1h..b3h.
      auto config_name = [](int blocks) {
        return blocks > 20   ? "b" + std::to_string(blocks - 20) + "h"
               : blocks > 10 ? "b" + std::to_string(blocks - 10) + "k32"
                             : "b" + std::to_string(blocks);
      };
      auto sweep = [&](int in_shrink, const ProbeLora& lora, const std::vector<float>& want) {
        float want_max = 0.0f;
        for (float v : want) want_max = std::max(want_max, std::fabs(v));
        auto call = [&](int blocks, const bf16* wc, int splits, const ProbeLora& l) {
          if (blocks > 20) return OursAt<0, 64, true>(blocks - 20, x, wc, M, sh.n, sh.k, splits, partial, y, l, stream);
          if (blocks > 10) return OursAt<0, 32>(blocks - 10, x, wc, M, sh.n, sh.k, splits, partial, y, l, stream);
          switch (in_shrink) {
            case 0: return OursAt<0>(blocks, x, wc, M, sh.n, sh.k, splits, partial, y, l, stream);
            case 1: return OursAt<1>(blocks, x, wc, M, sh.n, sh.k, splits, partial, y, l, stream);
            default: return OursAt<4>(blocks, x, wc, M, sh.n, sh.k, splits, partial, y, l, stream);
          }
        };
        Sweep r;
        std::vector<int> configs = {1, 2, 3};
        if (in_shrink == 0) configs.insert(configs.end(), {11, 12, 13, 21, 22, 23});
        for (int blocks : configs) {
          if (!only_config.empty() && config_name(blocks) != only_config) continue;
          r.all += " " + config_name(blocks);
          for (int splits : {1, 2, 4, 7, 8, 14, 16, 32}) {
            if ((sh.k / kKStep) % splits != 0) continue;
            if (only_splits > 0 && splits != only_splits) continue;
            if (!call(blocks, w[0], splits, lora)) break;  // no such kernel
            PROBE_CHECK(cudaStreamSynchronize(stream));
            const std::vector<float> got = Download(y, want.size());
            float diff = 0.0f;
            for (size_t i = 0; i < got.size(); ++i) diff = std::max(diff, std::fabs(got[i] - want[i]));
            r.err = std::max(r.err, diff / std::max(want_max, 1e-6f));
            const double us = TimeGraph(stream, copies, [&](int c) { call(blocks, w[c], splits, lora); });
            PROBE_CHECK(cudaGetLastError());
            char buf[32];
            std::snprintf(buf, sizeof(buf), " %d:%.1f", splits, us);
            r.all += buf;
            if (us < r.us) {
              r.us = us;
              r.blocks = blocks;
              r.splits = splits;
            }
          }
        }
        if (in_shrink > 0) {  // the same kernel with no adapter bytes (A zero-filled, no B): its own cost
          ProbeLora no_bytes = lora;
          no_bytes.num_adapters = 0;
          const double us = TimeGraph(stream, copies, [&](int c) { call(r.blocks, w[c], r.splits, no_bytes); });
          char buf[48];
          std::snprintf(buf, sizeof(buf), "; no adapter bytes %.1f", us);
          r.all += buf;
        }
        return r;
      };
      // Outputs are rounded to bf16 (2^-8 relative) after sums in another order: a few ulps of
      // the largest output is the most an honest kernel differs by.
      const Sweep plain = sweep(0, ProbeLora{}, ref);
      const bool ok = plain.err <= 0.02f;
      if (!ok) ++failures;
      std::printf("%-8s %3d | %8.2f us (%6.0f)   | %s splits %2d %8.2f us (%6.0f, %.3fx) |%s; %.4f %s\n", sh.name, M,
                  lt_us, bytes / lt_us * 1e-3, config_name(plain.blocks).c_str(), plain.splits, plain.us,
                  bytes / plain.us * 1e-3, plain.us / lt_us, plain.all.c_str(), plain.err, ok ? "ok" : "WRONG");
      // The same GEMM with rank-16 LoRA of 1 and of 4 adapters (tokens dealt round-robin) inside it.
      for (int n_adapters : {1, 4}) {
        if (!only_config.empty()) break;  // PROBE_CONFIG: the plain kernel only
        std::vector<int> token_adapter(kMaxM, -1);
        for (int m = 0; m < M; ++m) token_adapter[m] = m % n_adapters;
        PROBE_CHECK(cudaMemcpy(d_token_adapter, token_adapter.data(), kMaxM * sizeof(int), cudaMemcpyHostToDevice));
        ProbeLora lora;
        lora.s = s_buf;
        lora.token_adapter = d_token_adapter;
        lora.num_adapters = n_adapters;
        lora.scale = 0.5f;
        for (int a = 0; a < n_adapters; ++a) {
          lora.a[a] = lora_a[a];
          lora.b[a] = lora_b[a];
        }
        // The reference: a plain shrink kernel (checked against the host below), cuBLASLt, a delta.
        ProbeShrinkKernel<<<M, 256, 0, stream>>>(x, sh.k, lora, d_a_ptrs, s_buf);
        lt_call(0);
        const int64_t elems = static_cast<int64_t>(M) * sh.n;
        ProbeReferenceKernel<<<static_cast<unsigned>((elems + 255) / 256), 256, 0, stream>>>(y_ref, M, sh.n, lora,
                                                                                            ref_f32);
        PROBE_CHECK(cudaStreamSynchronize(stream));
        std::vector<float> want(static_cast<size_t>(elems));
        PROBE_CHECK(cudaMemcpy(want.data(), ref_f32, elems * sizeof(float), cudaMemcpyDeviceToHost));
        float s_rel = 0.0f;
        {  // the shrink against the host: s of each token's adapter, fp32 sums of the bf16 products
          const std::vector<float> hx = Download(x, static_cast<size_t>(M) * sh.k);
          std::vector<float> hs(static_cast<size_t>(kMaxM) * kMaxAdapters * kRank);
          PROBE_CHECK(cudaMemcpy(hs.data(), s_buf, hs.size() * sizeof(float), cudaMemcpyDeviceToHost));
          float s_err = 0.0f, s_max = 0.0f;
          for (int a = 0; a < n_adapters; ++a) {
            const std::vector<float> ha = Download(lora_a[a], static_cast<size_t>(kRank) * sh.k);
            for (int m = 0; m < M; ++m) {
              if (token_adapter[m] != a) continue;
              for (int j = 0; j < kRank; ++j) {
                double want_s = 0.0;
                for (int k = 0; k < sh.k; ++k) {
                  want_s += static_cast<double>(hx[static_cast<size_t>(m) * sh.k + k]) *
                            ha[static_cast<size_t>(j) * sh.k + k];
                }
                const float got_s = hs[static_cast<size_t>(m) * kMaxAdapters * kRank + a * kRank + j];
                s_err = std::max(s_err, static_cast<float>(std::fabs(got_s - want_s)));
                s_max = std::max(s_max, static_cast<float>(std::fabs(want_s)));
              }
            }
          }
          s_rel = s_err / std::max(s_max, 1e-6f);
        }
        const Sweep in = sweep(n_adapters, lora, want);
        const float rel = std::max(in.err, s_rel);
        const bool lora_ok = rel <= 0.02f;
        if (!lora_ok) ++failures;
        const double lora_bytes = bytes + 2.0 * n_adapters * kRank * (sh.k + sh.n);
        std::printf("%-8s %3d |   + LoRA r16 x %d adapters inside: b%d splits %2d %8.2f us (%6.0f GB/s), %.3fx "
                    "cuBLASLt alone, %.3fx ours alone |%s; %.4f %s\n",
                    sh.name, M, n_adapters, in.blocks, in.splits, in.us, lora_bytes / in.us * 1e-3, in.us / lt_us,
                    in.us / plain.us, in.all.c_str(), rel, lora_ok ? "ok" : "WRONG");
      }
    }
    for (bf16* p : w) PROBE_CHECK(cudaFree(p));
    PROBE_CHECK(cudaFree(x));
    PROBE_CHECK(cudaFree(y_ref));
    PROBE_CHECK(cudaFree(y));
    PROBE_CHECK(cudaFree(partial));
    for (int a = 0; a < kMaxAdapters; ++a) {
      PROBE_CHECK(cudaFree(lora_a[a]));
      PROBE_CHECK(cudaFree(lora_b[a]));
    }
    PROBE_CHECK(cudaFree(d_a_ptrs));
    PROBE_CHECK(cudaFree(s_buf));
    PROBE_CHECK(cudaFree(ref_f32));
    PROBE_CHECK(cudaFree(d_token_adapter));
  }
  PROBE_CHECK(cudaFree(workspace));
  PROBE_CHECK(cudaStreamDestroy(stream));
  std::printf("%s\n", failures == 0 ? "PASS" : "FAIL");
  return failures == 0 ? 0 : 1;
}
