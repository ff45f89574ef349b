// Launchers of the row-gather (Embed, GatherRows) and SiLU·mul kernels. Raw device pointers;
// each returns the launch error. Thread-safe (stateless); work runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/ops/cuda/lora_delta.h"
#include "engine/ops/cuda/lora_rows.h"

namespace loraplex::ops::cuda {

// dst[i] = src[indices[i]] for i < num_out_rows, whole rows of `row_bytes` bytes (any dtype).
// An index outside [0, src_rows) gives a zero row. src [src_rows, row_bytes]; indices [num_out_rows]
// I32; dst [num_out_rows, row_bytes].
cudaError_t LaunchGatherRows(const void* src, int64_t src_rows, int64_t row_bytes,
                             const int32_t* indices, int64_t num_out_rows, void* dst,
                             cudaStream_t stream);

// out = silu(gate_up[:, :inter]) * gate_up[:, inter:], fp32 math, one bf16 rounding.
// gate_up [num_tokens, 2·inter] bf16; out [num_tokens, inter] bf16. `delta` (may be empty): a
// pending LoRA delta of gate_up ([num_tokens, 2·inter]), added first and written back to it.
cudaError_t LaunchSiluMul(void* gate_up, int64_t num_tokens, int64_t inter, void* out,
                          const LoraDeltaView& delta, cudaStream_t stream);
// The same with gate_up's values read from LoRA rows (lora_rows.h: `rows` holds gate_up's GEMM
// output and its rows' shrink values, slices gate and up), the LoRA added on the tensor cores, and
// every element of gate_up written. cudaErrorInvalidValue (nothing launched) unless `rows` is
// gate_up's (2 slices at 0 and inter, num_tokens rows or more), inter is a multiple of 8 and the
// view's rows, gate_up and out start 16-byte aligned.
cudaError_t LaunchSiluMulRows(const LoraRowsView& rows, void* gate_up, int64_t num_tokens, int64_t inter, void* out,
                              cudaStream_t stream);

}  // namespace loraplex::ops::cuda
