// Sampler: a request's sampling settings as the ops' per-row SamplingRow, and a host-side
// Sample() over one row of logits (the reference sampler, engine/ops/cpu/sampling.h). The engine
// samples through Ops::Sample inside the model step (on the GPU there); this entry point serves
// tests and tools. Randomness comes from a counter-based hash of (seed, step), so a request's
// tokens do not depend on which other requests share its batch or on recomputation.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "engine/ops/ops.h"
#include "engine/request.h"

namespace loraplex::engine {

struct SampleResult {
  int32_t token = 0;
  float logprob = 0.0f;                                 // log-softmax of the raw logits
  std::vector<std::pair<int32_t, float>> top_logprobs;  // best first; `top_n` entries
};

// The row a request samples its token number `step` (0 for the first generated) with.
ops::SamplingRow SamplingRowOf(const SamplingParams& params, uint64_t seed, int64_t step,
                               int32_t top_n);

// The ops' SampledToken as a SampleResult with `top_n` top log-probabilities.
SampleResult ToSampleResult(const ops::SampledToken& sampled, int32_t top_n);

// `logits` [vocab] F32 (raw, before temperature). Temperature 0 or top_k 1 is greedy (argmax,
// lowest id on a tie). Log-probabilities are of the raw logits, independent of temperature and
// filters (as vLLM reports them by default); the top `top_n` are filled when top_n > 0. Parameters
// are assumed validated (Engine::Submit does it).
SampleResult Sample(const float* logits, int64_t vocab, const SamplingParams& params, uint64_t seed,
                    int64_t step, int32_t top_n);

}  // namespace loraplex::engine
