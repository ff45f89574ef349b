#include "engine/sampler.h"

#include <algorithm>

#include "engine/ops/cpu/sampling.h"

namespace loraplex::engine {

ops::SamplingRow SamplingRowOf(const SamplingParams& params, uint64_t seed, int64_t step,
                               int32_t top_n) {
  ops::SamplingRow row;
  row.seed = seed;
  row.step = step;
  row.temperature = params.temperature;
  row.top_p = params.top_p;
  row.top_k = params.top_k;
  row.top_n = std::clamp(top_n, 0, ops::kMaxSampleTopN);
  return row;
}

SampleResult ToSampleResult(const ops::SampledToken& sampled, int32_t top_n) {
  SampleResult result;
  result.token = sampled.token;
  result.logprob = sampled.logprob;
  for (int32_t i = 0; i < std::clamp(top_n, 0, ops::kMaxSampleTopN); ++i) {
    result.top_logprobs.emplace_back(sampled.top_ids[i], sampled.top_logprobs[i]);
  }
  return result;
}

SampleResult Sample(const float* logits, int64_t vocab, const SamplingParams& params, uint64_t seed,
                    int64_t step, int32_t top_n) {
  const ops::SamplingRow row = SamplingRowOf(params, seed, step, top_n);
  const int32_t n = static_cast<int32_t>(std::min<int64_t>(row.top_n, vocab));
  return ToSampleResult(ops::cpu::SampleRow(logits, vocab, row), n);
}

}  // namespace loraplex::engine
