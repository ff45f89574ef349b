// Sampler: picks the next token from one row of logits (greedy, temperature, top-k, top-p) and
// reports log-probabilities. Randomness comes from a counter-based hash of (seed, step), so a
// request's tokens do not depend on which other requests share its batch or on recomputation.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "engine/request.h"

namespace loraplex::engine {

struct SampleResult {
  int32_t token = 0;
  float logprob = 0.0f;                                 // log-softmax of the raw logits
  std::vector<std::pair<int32_t, float>> top_logprobs;  // best first; `top_n` entries
};

// `logits` [vocab] F32 (raw, before temperature). `step` numbers the tokens of one request
// (0 for the first generated token). Temperature 0 or top_k 1 is greedy (argmax, lowest id on a
// tie). Log-probabilities are of the raw logits, independent of temperature and filters (as
// vLLM reports them by default); the top `top_n` are filled when top_n > 0. Parameters are
// assumed validated (Engine::Submit does it).
SampleResult Sample(const float* logits, int64_t vocab, const SamplingParams& params, uint64_t seed,
                    int64_t step, int32_t top_n);

}  // namespace loraplex::engine
