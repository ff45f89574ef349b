// Tensor-core LoRA kernels for steps whose adapter segments hold many tokens (prefill chunks):
// each work item multiplies a tile of up to 64 of a segment's tokens by one slice's A (shrink) or
// B (expand) with bf16 mma (fp32 accumulation), so the weights are read once per 64 tokens rather
// than once per token or two. Same contracts as LaunchLoraShrink / LaunchLoraExpand except that the
// expand rounds y to bf16 before the product (as PEFT's bf16 lora_A output is). Segment counts,
// slots and ranks are read on the device; a fixed grid of persistent blocks walks the items.
// Thread-safe (stateless); work runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/ops/cuda/lora_kernels.h"

namespace loraplex::ops::cuda {

// `p` as for the kernels of lora_kernels.h (their `num_blocks` and delta fields are not used);
// `num_blocks` persistent blocks walk the items.

// y[row, s·max_rank + j] = Σ_k x[row, k]·A_s[j, k] (j < rank), fp32 accumulation in a fixed
// order; other columns untouched. x [num_tokens, in_features] bf16, 16-byte aligned rows; y F32.
// With p.partials ([splits, num_tokens, num_slices·max_rank] F32 in `partial_bytes`) the K range is
// split over more work items, then summed in split order by a second launch.
cudaError_t LaunchLoraShrinkTc(const LoraParams& p, int num_blocks, size_t partial_bytes, const void* x, float* y,
                               cudaStream_t stream);

// out[row, off_s + n] += scale·Σ_j bf16(y[row, s·max_rank + j])·B_s[n, j], fp32 accumulation, one
// bf16 rounding of the sum into out. out [num_tokens, slice_offsets[num_slices]] bf16.
cudaError_t LaunchLoraExpandTc(const LoraParams& p, int num_blocks, const float* y, void* out, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
