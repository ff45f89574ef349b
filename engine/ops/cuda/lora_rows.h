// LoRA rows: the LoRA of a few-adapter step computed by the GEMM itself and by the op that reads
// its output, so GemmWithLora runs one full-GPU cuBLASLt GEMM and nothing beside it.
//
// A registered projection's weight [N, K] is followed in memory by kLoraRowsPositions x slices x
// kLoraRowsRank spare rows. At the start of a step (CudaOps::BeginLoraStep) the install kernel
// copies the A rows of the adapter at each position p into spare rows (p·slices + s)·kLoraRowsRank
// + j, unless they are already there (zeros past the adapter's rank), notes each row's position,
// and writes each projection's adapter weights at each position, so the GEMM over N + spare rows
// writes [x·Wᵀ | x·A_pᵀ ...] into a [T, N + spare] buffer and its readers find B in one load. The
// positions are the step's segments that hold tokens, in order: a step of P adapters uses
// positions 0..P-1, so a GEMM over N + P·slices·kLoraRowsRank rows (the skinny GEMM of steps of
// up to 16 tokens) gives every reader its values. The op that reads y
// next (RoPE and the KV-cache write for qkv, SiLU·up for gate_up, or the flush kernel for any
// other reader) adds each row's scale·u·Bᵀ, u being that row's shrink values, as it copies the
// GEMM's part to y: out = bf16(y + bf16(scale·Σ_j u_j·B[n, j])), the delta path's rounding with u
// in bf16 (as the GEMM writes it). Plain C++ (no CUDA headers); device helpers in lora_rows.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/ops/cuda/lora_kernels.h"

namespace loraplex::ops::cuda {

inline constexpr int kLoraRowsPositions = 4;  // ops::kFewLoraSegments
inline constexpr int kLoraRowsRank = 16;      // ops::kNarrowLoraRank: spare rows a (position, slice)

// One registered projection (device array element).
struct LoraRowsEntry {
  void* spare = nullptr;                          // [positions · num_slices · kLoraRowsRank, K] bf16; null: unused
  const LoraSliceWeightsDev* table = nullptr;     // [num_slots][num_slices]
  int32_t num_slots = 0;
  int32_t num_slices = 0;
  int32_t in_features = 0;                        // K, a multiple of 8
};

// The step's segments as the install kernel reads them, and what it keeps between steps.
struct LoraRowsInstall {
  const LoraRowsEntry* entries = nullptr;  // [*num_entries] device
  const int32_t* num_entries = nullptr;    // [1] device
  const int32_t* token_rows = nullptr;     // LoraSegments
  const int32_t* seg_starts = nullptr;
  const int32_t* seg_slots = nullptr;
  const int32_t* num_segments = nullptr;
  int32_t num_tokens = 0;                  // rows of the step
  int32_t* installed = nullptr;            // [kLoraRowsPositions] slot whose A rows each position holds; -1: none
  int32_t* row_pos = nullptr;              // [num_tokens] out: each row's position; -1: no adapter
  // [entries][kLoraRowsPositions][kLoraMaxSlices] out: each entry's adapter weights at each
  // position (rank 0 where the step has no segment), so readers skip the slot lookups.
  LoraSliceWeightsDev* info = nullptr;
  unsigned* done = nullptr;                // [1] zero between launches (blocks finished)
  int num_blocks = 0;
};

// A GEMM output with its rows' shrink values, pending for the op that reads y.
struct LoraRowsView {
  const void* src = nullptr;               // [rows, stride] bf16: y's columns, then the shrink values
  int64_t stride = 0;                      // N + spare rows
  int32_t u_col = 0;                       // N
  int32_t rows = 0;
  const int32_t* row_pos = nullptr;        // [rows] (LoraRowsInstall::row_pos)
  const LoraSliceWeightsDev* info = nullptr;  // [kLoraRowsPositions][kLoraMaxSlices] (LoraRowsInstall::info)
  int32_t num_slices = 0;
  int32_t slice_offsets[kLoraMaxSlices + 1] = {};  // [num_slices] = N

  __host__ __device__ bool empty() const { return src == nullptr; }
};

// Copies A rows where the step's segments need them, sets row_pos and, once every block is done,
// `installed`. Graph-capturable (everything it reads is device memory).
cudaError_t LaunchLoraRowsInstall(const LoraRowsInstall& p, cudaStream_t stream);
// y[r, n] = the view's value at (r, n) with its LoRA added, for every row and column.
cudaError_t LaunchLoraRowsFlush(const LoraRowsView& v, void* y, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
