// The skinny decode GEMM (skinny_gemm.h). A block takes kNTile rows of W (output columns) over one
// split of K, streams 64-wide k steps of W and x through a kStages-deep cp.async pipeline into
// XOR-swizzled shared memory, and multiplies them with mma.sync m16n8k16 (bf16 in, fp32 sums):
// 4 warps of 32 columns each, x's rows padded to one 16-row tile with zeros. 3 blocks share an SM
// (72 KiB of shared memory each), so 9 stages of W are in flight on every SM. Splits write fp32
// partials; the last split of a column tile to finish (a counter a tile) sums them in split order
// and writes y, so results do not depend on timing and no second kernel sits between this GEMM and
// the next op.
// bench/skinny_gemm_probe.cu is the measured prototype (the choice of 3 blocks and 4 stages, and
// where the kernel beats cuBLASLt: bench/RESULTS.md, eleventh session).
#include "engine/ops/cuda/skinny_gemm.h"

#include <algorithm>

#include "engine/ops/cuda/kernel_utils.cuh"

namespace loraplex::ops::cuda {
namespace {

constexpr int kNTile = 128;               // W rows (output columns) a block
constexpr int kKStep = 64;                // k a pipeline stage
constexpr int kStages = 4;
constexpr int kWarps = 4;                 // 32 of the tile's columns each
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kBlocksPerSm = 3;
constexpr int kMaxSplits = 32;
constexpr int kRowBytes = kKStep * 2;     // a tile row: 8 chunks of 16 bytes
constexpr int kWStageBytes = kNTile * kRowBytes;
constexpr int kXStageBytes = kSkinnyGemmMaxRows * kRowBytes;
constexpr int kSmemBytes = kStages * (kWStageBytes + kXStageBytes);
static_assert(kSkinnyGemmMaxRows == 16, "one m16 tile of x");

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][64] bf16 tile: the chunk index is
// XORed with the row's low bits, so the 8 rows one ldmatrix matrix reads fall in 8 bank groups.
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

// y = x·Wᵀ over k in [blockIdx.y·k_len, +k_len) for W rows [blockIdx.x·kNTile, +kNTile).
// One split (gridDim.y 1): writes y[m][n] (bf16). Else writes partial[blockIdx.y][m][n] (F32), and
// the tile's last split to arrive (counters[blockIdx.x], back to 0 after) writes y as the sum of
// the splits in split order. k_len is a multiple of kKStep. W's rows below prefetch_rows are the
// model's (never written by a kernel of the step), so a block of those fetches its first stages
// of W before the wait for the kernel before; x, every write and the other blocks' W come after
// it.
// kHoist: each thread's copy addresses (its chunk of W rows tid/8 + 16·i and of x row tid/8, the
// same in every stage) computed once before the pipeline and advanced by a k step a stage,
// instead of the copy loops' index arithmetic every stage: 91 instructions a k step instead of
// 338 in the loop's SASS, for a kernel Nsight Compute found bound by instruction issue
// (bench/RESULTS.md, twelfth session). The same copies into the same places: the same bits.
// On an H200 base decode steps are 1.1-1.4% faster with it at batches 1 and 8, and LoRA steps
// 0.6% slower where it runs beside the LoRA kernels (thirteenth session), so Gemm takes it and
// GemmWithLora's GEMM by default does not (SetSkinnyGemmHoistForTest).
template <bool kHoist>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    SkinnyGemmKernel(const bf16* __restrict__ x, const bf16* __restrict__ w, int M, int N, int K, int k_len,
                     int prefetch_rows, float* __restrict__ partial, unsigned* __restrict__ counters,
                     bf16* __restrict__ y) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* w_s = smem;
  unsigned char* x_s = smem + kStages * kWStageBytes;
  const int n0 = blockIdx.x * kNTile;
  const int k0 = blockIdx.y * k_len;
  const int steps = k_len / kKStep;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  AllowDependentLaunch();  // the next op may be scheduled now; it waits for this kernel to complete

  constexpr int kPass = kThreads / 8;  // rows a pass of the block's threads copies
  static_assert(kNTile % kPass == 0 && kSkinnyGemmMaxRows % kPass == 0);
  constexpr int kWCopies = kNTile / kPass, kXCopies = kSkinnyGemmMaxRows / kPass;
  const int my_row = tid >> 3, my_chunk = tid & 7;
  const uint32_t my_off = TileOffset(my_row, my_chunk);  // rows kPass apart share the swizzle
  StageCopies<kWCopies> w_copies;
  StageCopies<kXCopies> x_copies;
  if constexpr (kHoist) {
    w_copies.Init(w, K, n0 + my_row, kPass, N, k0 + my_chunk * 8);
    x_copies.Init(x, K, my_row, kPass, M, k0 + my_chunk * 8);
  }

  // One stage's copies of `rows` rows of `src` from row `first` (zeros at or past `limit`),
  // hoisted (`hoisted`'s addresses) or with the index arithmetic done here.
  auto load = [&](uint32_t dst, const auto& hoisted, const bf16* src, int first, int rows, int limit, int step) {
    if constexpr (kHoist) {
      hoisted.Issue(dst + my_off, kPass * kRowBytes, step * kKStep);
      return;
    }
    const int k = k0 + step * kKStep;
#pragma unroll
    for (int c = tid; c < rows * 8; c += kThreads) {
      const int row = c >> 3, chunk = c & 7;
      const bool ok = first + row < limit;
      CpAsync16OrZero(dst + TileOffset(row, chunk),
                      src + static_cast<int64_t>(ok ? first + row : 0) * K + k + chunk * 8, ok);
    }
  };
  auto load_w = [&](int stage, int step) {
    load(SmemAddr(w_s + stage * kWStageBytes), w_copies, w, n0, kNTile, N, step);
  };
  auto load_x = [&](int stage, int step) {
    load(SmemAddr(x_s + stage * kXStageBytes), x_copies, x, 0, kSkinnyGemmMaxRows, M, step);
  };

  // The first kStages - 1 stages: W of all of them, then (x being the kernel before's output) x
  // after the wait. Group s holds x of stage s, and group 0 also every prefetched W, so the
  // main loop's count of groups in flight holds as if each stage were one group.
  // A block whose rows reach past prefetch_rows (W rows a kernel of the step writes: the LoRA
  // rows' spare rows) loads them only after the wait.
  const bool early = n0 + kNTile <= prefetch_rows;
  for (int s = 0; s < kStages - 1; ++s) {
    if (early && s < steps) load_w(s, s);
  }
  WaitForPrecedingKernel();
  for (int s = 0; s < kStages - 1; ++s) {
    if (!early && s < steps) load_w(s, s);
    if (s < steps) load_x(s, s);
    CpAsyncCommit();
  }
  float acc[4][4] = {};
  for (int step = 0; step < steps; ++step) {
    CpAsyncWait<kStages - 2>();  // this thread's copies of `step` have landed
    __syncthreads();             // everyone's; and the stage about to be refilled is no longer read
    const int next = step + kStages - 1;
    if (next < steps) {
      load_w(next % kStages, next);
      load_x(next % kStages, next);
    }
    CpAsyncCommit();
    const int st = step % kStages;
    const uint32_t wb = SmemAddr(w_s + st * kWStageBytes), xb = SmemAddr(x_s + st * kXStageBytes);
#pragma unroll
    for (int kk = 0; kk < kKStep / 16; ++kk) {
      // x: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
      uint32_t a[4];
      Ldmatrix4(xb + TileOffset((lane & 7) + 8 * ((lane >> 3) & 1), kk * 2 + (lane >> 4)), a);
      // W: two n8 tiles at a time, matrices (tile 0, k 0-7), (tile 0, k 8-15), (tile 1, ...).
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        const int q = lane >> 3;
        Ldmatrix4(wb + TileOffset(warp * 32 + np * 16 + (q >> 1) * 8 + (lane & 7), kk * 2 + (q & 1)), b);
        MmaBf16(acc[np * 2], a, b[0], b[1]);
        MmaBf16(acc[np * 2 + 1], a, b[2], b[3]);
      }
    }
  }
  CpAsyncWait<0>();
  // Accumulator nt: rows lane/4 (+8), columns nt·8 + 2·(lane%4) (+1) of the warp's 32.
  const bool split = gridDim.y > 1;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int n = n0 + warp * 32 + nt * 8 + 2 * (lane & 3);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = (lane >> 2) + 8 * half;
      if (m >= M) continue;
      const float v0 = acc[nt][2 * half], v1 = acc[nt][2 * half + 1];
      if (split) {
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
  if (!split) return;
  // The last split of this tile: its own and every other split's partials are visible (each block
  // fences its writes before it counts itself), so it sums them, in split order.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
    if (last) counters[blockIdx.x] = 0;  // for the next launch, which starts after this one ends
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int cols = min(kNTile, N - n0), splits = static_cast<int>(gridDim.y);
  const int64_t stride = static_cast<int64_t>(M) * N;  // one split's partials
  if ((N & 3) == 0) {  // 4 columns a thread (cols and n0 are multiples of 4), every split's load in flight
    const int quads = cols / 4;
    for (int e = tid; e < M * quads; e += kThreads) {
      const int m = e / quads, n = n0 + (e % quads) * 4;
      const float* p = partial + static_cast<int64_t>(m) * N + n;
      float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
      for (int i = 0; i < splits; ++i) {
        const float4 v = __ldcg(reinterpret_cast<const float4*>(p + i * stride));
        sum.x += v.x;
        sum.y += v.y;
        sum.z += v.z;
        sum.w += v.w;
      }
      __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(y + static_cast<int64_t>(m) * N + n);
      out[0] = __floats2bfloat162_rn(sum.x, sum.y);
      out[1] = __floats2bfloat162_rn(sum.z, sum.w);
    }
  } else {
    for (int e = tid; e < M * cols; e += kThreads) {
      const int m = e / cols, n = n0 + e % cols;
      const float* p = partial + static_cast<int64_t>(m) * N + n;
      float sum = 0.0f;
#pragma unroll 8
      for (int i = 0; i < splits; ++i) sum += __ldcg(p + i * stride);
      y[static_cast<int64_t>(m) * N + n] = __float2bfloat16(sum);
    }
  }
}

}  // namespace

int SkinnyGemmSplits(int64_t m, int64_t n, int64_t k, int num_sms, bool even) {
  if (m < 1 || m > kSkinnyGemmMaxRows || n < 1 || k < kKStep || k % kKStep != 0 || num_sms <= 0) return 0;
  if (n > (int64_t{1} << 30) || k > (int64_t{1} << 30)) return 0;
  const int64_t tiles = (n + kNTile - 1) / kNTile, steps = k / kKStep, slots = int64_t{kBlocksPerSm} * num_sms;
  // The most splits (dividing the k steps) whose blocks all run at once.
  int splits = 0;
  for (int s = 1; s <= kMaxSplits && s <= steps && tiles * s <= slots; ++s) {
    if (steps % s == 0) splits = s;
  }
  if (splits == 0) return 0;
  // Every SM must get (about) as many blocks as the busiest: at 90% or less of that, cuBLASLt's
  // tiles are dealt better (gate_up of an 8B model: 224 blocks on 132 SMs, 1.05x cuBLASLt's time).
  const int64_t blocks = tiles * splits, busiest = (blocks + num_sms - 1) / num_sms;
  if (even && blocks * 10 < busiest * num_sms * 9) return 0;
  return splits;
}

size_t SkinnyGemmPartialBytes(int64_t m, int64_t n, int splits) {
  return splits > 1 ? static_cast<size_t>(splits) * static_cast<size_t>(m) * static_cast<size_t>(n) * sizeof(float) : 0;
}

size_t SkinnyGemmMaxPartialBytes(int num_sms) {
  return static_cast<size_t>(std::max(num_sms, 1)) * kBlocksPerSm * kSkinnyGemmMaxRows * kNTile * sizeof(float);
}

int SkinnyGemmMaxTiles(int num_sms) { return std::max(num_sms, 1) * kBlocksPerSm; }

cudaError_t InitSkinnyGemm() {
  const cudaError_t e = cudaFuncSetAttribute(SkinnyGemmKernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             kSmemBytes);
  if (e != cudaSuccess) return e;
  return cudaFuncSetAttribute(SkinnyGemmKernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
}

cudaError_t LaunchSkinnyGemm(const void* x, const void* w, int m, int n, int k, int splits,
                             const SkinnyGemmScratch& scratch, void* y, cudaStream_t stream, bool hoisted,
                             int prefetch_rows) {
  const int tiles = (n + kNTile - 1) / kNTile;
  if (m < 1 || m > kSkinnyGemmMaxRows || n < 1 || k % kKStep != 0 || splits < 1 || (k / kKStep) % splits != 0 ||
      !IsAligned16(x) || !IsAligned16(w) || !IsAligned16(y)) {
    return cudaErrorInvalidValue;
  }
  if (splits > 1 && (scratch.partial == nullptr || scratch.counters == nullptr || tiles > scratch.num_counters ||
                     SkinnyGemmPartialBytes(m, n, splits) > scratch.partial_bytes)) {
    return cudaErrorInvalidValue;
  }
  return LaunchDependent(hoisted ? SkinnyGemmKernel<true> : SkinnyGemmKernel<false>,
                         dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)), dim3(kThreads), kSmemBytes,
                         stream, static_cast<const bf16*>(x), static_cast<const bf16*>(w), m, n, k, k / splits,
                         prefetch_rows < 0 ? n : prefetch_rows, scratch.partial, scratch.counters, static_cast<bf16*>(y));
}

}  // namespace loraplex::ops::cuda
