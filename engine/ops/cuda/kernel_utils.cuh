// Device helpers shared by the loraplex CUDA kernels: bf16 <-> float, warp and block reductions.
// Included only by .cu files of engine/ops/cuda (and bench/skinny_gemm_probe.cu). Stateless.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace loraplex::ops::cuda {

using bf16 = __nv_bfloat16;

inline constexpr int kWarpSize = 32;

__device__ __forceinline__ float ToFloat(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ bf16 ToBf16(float v) { return __float2bfloat16_rn(v); }

// Unpacks 8 bf16 held in a 16-byte vector. bf16 -> f32 is exact: the bf16 bits are the high half
// of the float. Reading the four 32-bit words (not bf16 pairs through a pointer) keeps a load of
// the vector one 16-byte load instead of four 4-byte ones.
__device__ __forceinline__ void Unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Rounds 8 floats to bf16 (round to nearest even) and packs them into a 16-byte vector.
__device__ __forceinline__ uint4 Pack8(const float (&f)[8]) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `scratch` holds 32 floats of shared memory; the call contains __syncthreads.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = WarpSum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < num_warps ? scratch[lane] : 0.0f;
  total = WarpSum(total);
  __syncthreads();  // scratch may be reused by the caller right away
  return total;
}

// The slice of output column `col`, given where slices 1..num_slices-1 start (offsets[0] is 0),
// by constant indices only: a dynamically indexed parameter array would go through local memory.
template <int kMaxSlices>
__device__ __forceinline__ int SliceOfColumn(const int32_t (&offsets)[kMaxSlices + 1], int num_slices, int64_t col) {
  int slice = 0;
#pragma unroll
  for (int s = 1; s < kMaxSlices; ++s) {
    if (s < num_slices && col >= offsets[s]) slice = s;
  }
  return slice;
}

__host__ __device__ __forceinline__ bool IsAligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Programmatic dependent launch (sm_90). A kernel started by LaunchDependent may be scheduled
// while the kernel before it on the stream is still finishing, which hides most of the launch
// gap between the many small kernels of a decode step. Such a kernel calls PdlEnter first, before
// it touches global memory: it lets the next dependent kernel be scheduled, then waits until the
// kernel before it has completed and its writes are visible. (The next kernel can only start once
// every block of this one has begun, so waiting blocks never crowd out unscheduled ones.) In a
// kernel launched the ordinary way both instructions do nothing.
// The two halves, for kernels that do independent work between them: WaitForPrecedingKernel
// returns once the kernel before this one has completed and its writes are visible;
// AllowDependentLaunch lets the next dependent kernel be scheduled now.
__device__ __forceinline__ void WaitForPrecedingKernel() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void AllowDependentLaunch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void PdlEnter() {
  AllowDependentLaunch();
  WaitForPrecedingKernel();
}

// Asks the L2 to fetch `bytes` (a multiple of 16) from `p` (16-byte aligned global memory) with
// one instruction (sm_90 bulk prefetch): no registers or shared memory, and nothing waits for it.
__device__ __forceinline__ void PrefetchL2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

// The shared-space address of a pointer into shared memory (what cp.async and ldmatrix take).
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared (cp.async, sm_80+), and its completion waits.
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(SmemAddr(smem)), "l"(gmem) : "memory");
}
// The same to a shared-space address, writing zeros (and reading nothing) when !valid.
__device__ __forceinline__ void CpAsync16OrZero(uint32_t dst, const void* src, bool valid) {
  const int size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(size) : "memory");
}
// One thread's share of a tile that a pipeline copies into shared memory every stage, the same
// rows and chunk each time: the 16-byte chunk at column `col` of rows first + i·pass (i <
// kCopies) of a row-major bf16 matrix of `ld` elements a row; rows at or past `limit` are
// zero-filled. Init computes the source addresses once; Issue starts one stage's copies `k`
// elements further along, row i to dst + i·dst_stride bytes.
template <int kCopies>
struct StageCopies {
  const bf16* src[kCopies];
  uint32_t valid = 0;

  __device__ __forceinline__ void Init(const bf16* base, int64_t ld, int first, int pass, int limit, int64_t col) {
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int row = first + i * pass;
      const bool ok = row < limit;
      valid |= static_cast<uint32_t>(ok) << i;
      src[i] = base + static_cast<int64_t>(ok ? row : 0) * ld + col;
    }
  }
  __device__ __forceinline__ void Issue(uint32_t dst, uint32_t dst_stride, int64_t k) const {
#pragma unroll
    for (int i = 0; i < kCopies; ++i) CpAsync16OrZero(dst + i * dst_stride, src[i] + k, (valid >> i) & 1u);
  }
};
// 4-byte asynchronous copy global -> shared (4-byte aligned both), through the L1.
__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(SmemAddr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Four 8x8 b16 matrices from shared memory (ldmatrix .x4): lanes 8i..8i+7 give matrix i's row
// addresses; r[i] receives this lane's part of matrix i, as mma.sync takes its operands.
__device__ __forceinline__ void Ldmatrix4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a·b for one m16n8k16 tile on the tensor cores (bf16 in, fp32 sums; a: 16 rows x 16 k, row
// major; b: 16 k x 8 columns, column major).
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// LaunchDependent, or an ordinary launch when `dependent` is false.
template <typename... KernelArgs, typename... Args>
cudaError_t LaunchMaybeDependent(bool dependent, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                                 size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                            cudaStream_t stream, Args&&... args) {
  return LaunchMaybeDependent(true, kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
}

}  // namespace loraplex::ops::cuda
