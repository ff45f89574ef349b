// Launchers of the RMSNorm kernels (plain, and fused with the residual add). Raw device pointers;
// each returns the launch error. Thread-safe (stateless); work runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/ops/cuda/lora_delta.h"
#include "engine/ops/cuda/lora_rows.h"

namespace loraplex::ops::cuda {

// out = x / sqrt(mean(x²) + eps) * weight, per row, fp32 math. x, out [rows, hidden] bf16 (may
// alias); weight [hidden] bf16.
cudaError_t LaunchRmsNorm(const void* x, const void* weight, int64_t rows, int64_t hidden,
                          float eps, void* out, cudaStream_t stream);

// residual = bf16(residual + x); out = rmsnorm(residual) * weight, the norm taken over the rounded
// residual that the next layer will read. x, residual, out [rows, hidden] bf16. `delta` (may be
// empty): a pending LoRA delta of x ([rows, hidden]), added to x first and written back to it
// (so x is written only when delta is not empty).
cudaError_t LaunchAddRmsNorm(void* x, void* residual, const void* weight, int64_t rows,
                             int64_t hidden, float eps, void* out, const LoraDeltaView& delta,
                             cudaStream_t stream);

// The same with x's values read from LoRA rows (lora_rows.h: `rows` holds the GEMM output of a
// one-slice module and its rows' shrink values), the LoRA added on the tensor cores and x written
// whole; a row is spread over a cluster of 8 blocks. cudaErrorInvalidValue (nothing launched)
// unless `rows` is x's (one slice, num_tokens rows or more), hidden is a multiple of 512 up to
// 8192 and the view's rows and every buffer are 16-byte aligned.
cudaError_t LaunchAddRmsNormRows(const LoraRowsView& rows, void* x, void* residual, const void* weight,
                                 int64_t num_tokens, int64_t hidden, float eps, void* out, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
