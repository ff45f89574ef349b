// The decode GEMM with the LoRA side fused in: y[M,N] = x[M,K]·w[N,K]ᵀ for M <= 64 tokens, on
// tensor cores (mma.sync bf16, fp32 sums), in one launch that also runs the step's LoRA shrink and
// expand. Why: beside cuBLASLt's decode GEMMs, whose CTAs each need a whole SM, every block of a
// separate LoRA kernel holds an SM the GEMM needs, so a few microseconds of LoRA latency became
// several microseconds of GEMM time per module (bench/RESULTS.md, fourth session). Here the
// adapters' A and B are extra tiles of the same grid, streamed like W.
//
// Grid: [LoRA tiles | base tiles]. A base tile is 16·RG rows of w; its RG×KS warps each stream
// 16 rows over every KS-th 64-element step of K with 16-byte loads straight into mma fragments
// (K is permuted inside each step identically for w and x, so no shared-memory staging), and the
// block adds the KS partial sums in a fixed order. A LoRA tile is (segment, slice, column chunk):
// the same loop over the slot's A (rank <= 16·RG rows) gives x·Aᵀ for the segment's tokens, then the
// block applies B to its chunk of the slice's columns and writes scale·y·Bᵀ into the F32 delta
// buffer (lora_delta.h) that the kernel reading the GEMM output next folds in. Block 0 also writes
// the delta marks of every (row, slice) from the segments, so no clearing pass is needed.
// Results are deterministic (fixed summation order). Thread-safe (stateless).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/ops/cuda/lora_kernels.h"

namespace loraplex::ops::cuda {

inline constexpr int kSkinnyMaxTokens = 64;

// Tile shape (rows = 16·row_groups, K split over k_splits warps, `unroll` steps of loads in flight
// a warp). The executor uses SkinnyDefaultConfig(); tests and the microbenchmark try others.
struct SkinnyConfig {
  int row_groups = 4;
  int k_splits = 4;
  int unroll = 2;
};
SkinnyConfig SkinnyDefaultConfig();
// The configurations compiled in (for sweeps).
int SkinnyNumConfigs();
SkinnyConfig SkinnyConfigAt(int i);

struct SkinnyGemmArgs {
  const void* x = nullptr;  // [m, k] bf16, 16-byte aligned
  const void* w = nullptr;  // [n, k] bf16, 16-byte aligned
  void* y = nullptr;        // [m, n] bf16, 16-byte aligned
  int32_t m = 0;
  int32_t n = 0;
  int32_t k = 0;
};

// Optional LoRA part. `p` must be in delta mode (p.delta, p.delta_mask, p.delta_rows = m) with
// max_rank <= 16·row_groups and every slot's A and B 16-byte aligned; `shrink_y` [m, num_slices·
// max_rank] F32 receives x·Aᵀ of the segments' tokens like LaunchLoraShrink's y.
struct SkinnyLora {
  LoraParams p;
  float* shrink_y = nullptr;
  int32_t chunks = 1;  // column chunks a (segment, slice) expand is split into (SkinnyLoraChunks)
};

// Whether the kernel takes this shape under `c`: 1 <= m <= 64, k a multiple of 64·k_splits, n a
// multiple of 16·row_groups.
bool SkinnyGemmSupports(const SkinnyConfig& c, int64_t m, int64_t n, int64_t k);
// Chunks for a module: about as many bytes of B per LoRA tile as a base tile moves of w.
int SkinnyLoraChunks(const SkinnyConfig& c, const LoraParams& p, int64_t k);

cudaError_t LaunchSkinnyGemm(const SkinnyConfig& c, const SkinnyGemmArgs& a, const SkinnyLora* lora,
                             cudaStream_t stream);

}  // namespace loraplex::ops::cuda
