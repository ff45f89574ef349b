// Launcher of the GPU sampler: for each logits row it picks the token (greedy, or temperature
// with top-k / top-p and a per-row seed), its log-probability and the top-n log-probabilities,
// with Ops::Sample's semantics (a cluster of 1-8 blocks a row, after a first pass split over 16
// blocks a row).
// Thread-safe (stateless); work runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace loraplex::ops::cuda {

inline constexpr int kSampleMaxTopN = 20;

// Device layouts of ops::SamplingRow and ops::SampledToken (cuda_ops.cc static_asserts that they
// match).
struct SamplingRowDev {
  uint64_t seed;
  int64_t step;
  float temperature;
  float top_p;
  int32_t top_k;
  int32_t top_n;
};
struct SampledTokenDev {
  int32_t token;
  float logprob;
  int32_t top_ids[kSampleMaxTopN];
  float top_logprobs[kSampleMaxTopN];
};

// Device scratch (bytes) that lets LaunchSample split its first pass over several blocks a row.
size_t SampleScratchBytes(int64_t num_rows);

// How many rows the GPU runs at once with 1, 2, 4 and 8 blocks a row (a block takes an SM; a
// row's blocks are one cluster, so they must share a GPC). From the occupancy API, once.
struct SampleWave {
  int rows[4] = {0, 0, 0, 0};
};
cudaError_t QuerySampleWave(SampleWave* wave);

// For r < num_rows: out[r] from logits [num_rows, vocab] F32 and rows[r]. vocab in [1, 2^31).
// `scratch` (device, may be null): used when it holds SampleScratchBytes(num_rows); launches that
// share it must be stream-ordered.
// Each row takes the most blocks (up to 8) with which the launch's rows still run at once (`wave`);
// blocks_per_row 1, 2, 4 or 8 forces that many (tests), 0 chooses. The same results either way.
cudaError_t LaunchSample(const float* logits, int64_t num_rows, int64_t vocab, const SamplingRowDev* rows,
                         SampledTokenDev* out, void* scratch, size_t scratch_bytes, const SampleWave& wave,
                         int blocks_per_row, cudaStream_t stream);

}  // namespace loraplex::ops::cuda
