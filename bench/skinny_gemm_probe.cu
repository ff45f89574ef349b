// A probe for putting the LoRA work inside the decode GEMM (bench/RESULTS.md, tenth session, "What
// would close the gaps"): can a GEMM of our own stream a decode step's weights, y[M,N] =
// x[M,K]·W[N,K]ᵀ in bf16 with fp32 sums and M <= 64, as fast as cuBLASLt? If it can, the expand
// can go into its epilogue and the shrink into extra output rows, with no side chain holding SMs.
//
// For each Llama-3-8B projection (qkv, o, gate_up, down) and M = 1, 8, 32, 64 it times cuBLASLt
// (the executor's CublasLtGemm) and this file's kernel at every split of K it allows, each as a
// CUDA graph of 20 calls over enough weight copies to miss the L2, and checks the kernel's output
// against cuBLASLt's. Not part of the engine.
// Usage (GPU host): skinny_gemm_probe   Prints one line per shape; exit 1 on a wrong result.
//
// The kernel: a block takes 128 rows of W (output columns) over one split of K, streams 64-wide
// k steps of W and x through a 4-stage cp.async pipeline into XOR-swizzled shared memory, and
// multiplies them with mma.sync m16n8k16 (bf16 in, fp32 accumulate): 4 warps of 32 columns each,
// x padded to whole 16-row tiles. Splits write fp32 partials that a second kernel sums in split
// order (deterministic); one split writes y directly.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "engine/ops/cuda/cublaslt_gemm.h"

namespace {

using bf16 = __nv_bfloat16;

constexpr int kNTile = 128;                 // W rows (output columns) a block
constexpr int kKStep = 64;                  // k a pipeline stage
constexpr int kStages = 4;
constexpr int kWarps = 4;                   // 32 of the tile's columns each
constexpr int kThreads = kWarps * 32;
constexpr int kRowBytes = kKStep * 2;       // a tile row: 8 chunks of 16 bytes
constexpr int kWStageBytes = kNTile * kRowBytes;

#define PROBE_CHECK(call)                                                                        \
  do {                                                                                           \
    const cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][64] bf16 tile: the chunk index is
// XORed with the row's low bits, so the 8 rows one ldmatrix matrix reads at one chunk fall in 8
// different bank groups.
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

// 16 bytes global -> shared, asynchronously; zeros when !valid.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(size) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ void Ldmatrix4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a·b for one m16n8k16 tile (a: 16 x rows x 16 k; b: 16 k x 8 W rows).
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// y = x·Wᵀ over k in [blockIdx.y·k_len, +k_len) for W rows [blockIdx.x·kNTile, +kNTile); x has M
// <= 16·MT rows. partial != null: writes partial[blockIdx.y][m][n] (F32); else y[m][n] (bf16).
// k_len is a multiple of kKStep; rows of x and W are 16-byte aligned.
template <int MT>
__global__ void __launch_bounds__(kThreads) SkinnyGemmKernel(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                             int M, int N, int K, int k_len,
                                                             float* __restrict__ partial, bf16* __restrict__ y) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int kXRows = 16 * MT;
  constexpr int kXStageBytes = kXRows * kRowBytes;
  unsigned char* w_s = smem;
  unsigned char* x_s = smem + kStages * kWStageBytes;
  const int n0 = blockIdx.x * kNTile;
  const int k0 = blockIdx.y * k_len;
  const int steps = k_len / kKStep;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  auto load = [&](int stage, int step) {
    const int k = k0 + step * kKStep;
    const uint32_t wb = SmemAddr(w_s + stage * kWStageBytes);
#pragma unroll
    for (int c = tid; c < kNTile * 8; c += kThreads) {
      const int row = c >> 3, chunk = c & 7;
      const bool ok = n0 + row < N;
      CpAsync16(wb + TileOffset(row, chunk), w + static_cast<int64_t>(ok ? n0 + row : 0) * K + k + chunk * 8, ok);
    }
    const uint32_t xb = SmemAddr(x_s + stage * kXStageBytes);
#pragma unroll
    for (int c = tid; c < kXRows * 8; c += kThreads) {
      const int row = c >> 3, chunk = c & 7;
      const bool ok = row < M;
      CpAsync16(xb + TileOffset(row, chunk), x + static_cast<int64_t>(ok ? row : 0) * K + k + chunk * 8, ok);
    }
  };

  float acc[MT][4][4] = {};
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
    for (int kk = 0; kk < kKStep / 16; ++kk) {
      // x: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Ldmatrix4(xb + TileOffset(mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1), kk * 2 + (lane >> 4)), a[mt]);
      }
      // W: two n8 tiles at a time, matrices (tile 0, k 0-7), (tile 0, k 8-15), (tile 1, ...).
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        const int q = lane >> 3;
        Ldmatrix4(wb + TileOffset(warp * 32 + np * 16 + (q >> 1) * 8 + (lane & 7), kk * 2 + (q & 1)), b);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma(acc[mt][np * 2], a[mt], b[0], b[1]);
          Mma(acc[mt][np * 2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
  CpAsyncWait<0>();
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

template <int MT>
int SmemBytes() {
  return kStages * (kWStageBytes + 16 * MT * kRowBytes);
}

template <int MT>
void LaunchOurs(const bf16* x, const bf16* w, int M, int N, int K, int splits, float* partial, bf16* y,
                cudaStream_t stream) {
  static const bool configured = [] {
    PROBE_CHECK(cudaFuncSetAttribute(SkinnyGemmKernel<MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, SmemBytes<MT>()));
    return true;
  }();
  (void)configured;
  const dim3 grid((N + kNTile - 1) / kNTile, splits);
  SkinnyGemmKernel<MT><<<grid, kThreads, SmemBytes<MT>(), stream>>>(x, w, M, N, K, K / splits,
                                                                   splits > 1 ? partial : nullptr, y);
  if (splits > 1) {
    const int64_t elems = static_cast<int64_t>(M) * N;
    ReduceSplitsKernel<<<static_cast<unsigned>((elems + 255) / 256), 256, 0, stream>>>(partial, splits, elems, y);
  }
}

void Ours(const bf16* x, const bf16* w, int M, int N, int K, int splits, float* partial, bf16* y, cudaStream_t s) {
  if (M <= 16) {
    LaunchOurs<1>(x, w, M, N, K, splits, partial, y, s);
  } else if (M <= 32) {
    LaunchOurs<2>(x, w, M, N, K, splits, partial, y, s);
  } else {
    LaunchOurs<4>(x, w, M, N, K, splits, partial, y, s);
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
  for (const Shape& sh : shapes) {
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
    PROBE_CHECK(cudaStreamSynchronize(stream));
    for (int M : {1, 8, 32, 64}) {
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
      double best_us = 1e30;
      int best_splits = 0;
      float worst = 0.0f;
      std::string all;
      for (int splits : {1, 2, 4, 7, 8, 14, 16, 32}) {
        if ((sh.k / kKStep) % splits != 0) continue;
        const double us =
            TimeGraph(stream, copies, [&](int c) { Ours(x, w[c], M, sh.n, sh.k, splits, partial, y, stream); });
        PROBE_CHECK(cudaGetLastError());
        Ours(x, w[0], M, sh.n, sh.k, splits, partial, y, stream);
        PROBE_CHECK(cudaStreamSynchronize(stream));
        const std::vector<float> got = Download(y, static_cast<size_t>(M) * sh.n);
        float diff = 0.0f;
        for (size_t i = 0; i < got.size(); ++i) diff = std::max(diff, std::fabs(got[i] - ref[i]));
        worst = std::max(worst, diff / std::max(ref_max, 1e-6f));
        char buf[32];
        std::snprintf(buf, sizeof(buf), " %d:%.1f", splits, us);
        all += buf;
        if (us < best_us) {
          best_us = us;
          best_splits = splits;
        }
      }
      // Outputs are rounded to bf16 (2^-8 relative) after sums in another order: a few ulps of
      // the largest output is the most an honest kernel differs by.
      const bool ok = worst <= 0.02f;
      if (!ok) ++failures;
      std::printf("%-8s %3d | %8.2f us (%6.0f)   | splits %2d %8.2f us (%6.0f, %.2fx) |%s; %.4f %s\n", sh.name, M,
                  lt_us, bytes / lt_us * 1e-3, best_splits, best_us, bytes / best_us * 1e-3, best_us / lt_us,
                  all.c_str(), worst, ok ? "ok" : "WRONG");
    }
    for (bf16* p : w) PROBE_CHECK(cudaFree(p));
    PROBE_CHECK(cudaFree(x));
    PROBE_CHECK(cudaFree(y_ref));
    PROBE_CHECK(cudaFree(y));
    PROBE_CHECK(cudaFree(partial));
  }
  PROBE_CHECK(cudaFree(workspace));
  PROBE_CHECK(cudaStreamDestroy(stream));
  std::printf("%s\n", failures == 0 ? "PASS" : "FAIL");
  return failures == 0 ? 0 : 1;
}
