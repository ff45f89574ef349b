// Launcher of the bandwidth probe that runs beside a GEMM (beside_probe.cu). Measurement only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace loraplex::ops::cuda {

// Reads `bytes` (a multiple of 16) from `src` (16-byte aligned) with `blocks` blocks of one
// warp (at most 32 registers a thread, no shared memory, shared-memory carveout at its maximum).
// `sink` ([blocks] words) is written only on a hash collision: it keeps the loads.
cudaError_t LaunchBesideProbe(const void* src, int64_t bytes, int blocks, uint32_t* sink, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
