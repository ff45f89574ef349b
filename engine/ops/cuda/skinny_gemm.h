// A decode GEMM of our own for steps of few tokens: y[M, N] = x[M, K]·W[N, K]ᵀ in bf16 with fp32
// sums, M <= kSkinnyGemmMaxRows. cuBLASLt's kernels for such shapes leave bandwidth unused on the
// smaller projections (qkv and o of an 8B model: 2.7-3.2 TB/s of the H200's ~4.3), and they cannot
// start before the kernel ahead of them ends. This one reads W at up to 3.3 TB/s in isolation
// (bench/skinny_gemm_probe) and is launched as a programmatic dependent: it streams its first
// stages of W while the kernel before it (the norm, attention, SiLU·mul) is still finishing, and
// waits for it only before it reads x. Raw device pointers; thread-safe (stateless); work runs on
// `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace loraplex::ops::cuda {

inline constexpr int kSkinnyGemmMaxRows = 16;  // one 16-row tensor-core tile of x

// How many splits of K the skinny GEMM takes for this shape on `num_sms` SMs, or 0 where it does
// not apply or would be slower than cuBLASLt: M above kSkinnyGemmMaxRows, K not a multiple of 64,
// or a shape whose blocks cannot be dealt evenly over the SMs (the measured losses: gate_up of an
// 8B model, 224 column tiles on 132 SMs). even = false drops that last rule (tests).
int SkinnyGemmSplits(int64_t m, int64_t n, int64_t k, int num_sms, bool even = true);

// Bytes of the fp32 partial sums that `splits` > 1 splits of an [m, n] output need.
size_t SkinnyGemmPartialBytes(int64_t m, int64_t n, int splits);

// The most partial bytes SkinnyGemmSplits's choice can need on `num_sms` SMs (its blocks all run at
// once, each with a 16 x 128 tile of fp32 sums).
size_t SkinnyGemmMaxPartialBytes(int num_sms);

// The most column tiles (split counters) SkinnyGemmSplits's choice can need on `num_sms` SMs.
int SkinnyGemmMaxTiles(int num_sms);

// Device scratch of split launches: the fp32 partials, and one counter a column tile, all zero
// before the first launch (each launch leaves them zero). Launches on one stream may share it.
struct SkinnyGemmScratch {
  float* partial = nullptr;
  size_t partial_bytes = 0;
  unsigned* counters = nullptr;
  int num_counters = 0;
};

// Sets the kernel's shared-memory limit; call once before the first launch (not while a stream
// is being captured).
cudaError_t InitSkinnyGemm();

// y = x·Wᵀ (bf16 [m, n], written whole) with `splits` from SkinnyGemmSplits, in one kernel;
// `scratch` (unused for one split) holds SkinnyGemmPartialBytes and a counter a column tile. x [m, k]
// and W [n, k] bf16 with 16-byte aligned rows; y 16-byte aligned. Launched as a programmatic
// dependent of the kernel before it on `stream`. cudaErrorInvalidValue for arguments outside these
// bounds.
// hoisted: the build whose copy addresses are computed once before the pipeline (the same bits;
// faster alone, slower beside the LoRA kernels: SetSkinnyGemmHoistForTest).
// prefetch_rows: W's rows from this one on may be written by the kernels before this one (the
// LoRA rows' spare rows, written by the step's install kernel), so they are read only after the
// wait for the kernel before; negative: none (every row is prefetched).
cudaError_t LaunchSkinnyGemm(const void* x, const void* w, int m, int n, int k, int splits,
                             const SkinnyGemmScratch& scratch, void* y, cudaStream_t stream, bool hoisted = false,
                             int prefetch_rows = -1);

}  // namespace loraplex::ops::cuda
