#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace loraplex::engine {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A uniform double in [0, 1) from (seed, step): a counter-based draw, so it depends on nothing
// else (not on the batch, not on earlier draws).
double UniformFromSeed(uint64_t seed, int64_t step) {
  const uint64_t x = SplitMix64(SplitMix64(seed) ^ static_cast<uint64_t>(step));
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

// Higher logit first; the lower id wins a tie so every path agrees with greedy argmax.
struct ByLogitDesc {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

int32_t ArgMax(const float* logits, int64_t vocab) {
  int32_t best = 0;
  for (int64_t i = 1; i < vocab; ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

// Draws from the temperature-scaled distribution restricted by top-k and top-p.
int32_t SampleFiltered(const float* logits, int64_t vocab, const SamplingParams& params, double u) {
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  const ByLogitDesc order{logits};
  size_t keep = ids.size();
  if (params.top_k > 0 && static_cast<size_t>(params.top_k) < ids.size()) {
    keep = static_cast<size_t>(params.top_k);
    std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(keep), ids.end(),
                      order);
  } else if (params.top_p < 1.0f) {
    std::sort(ids.begin(), ids.end(), order);
  }
  ids.resize(keep);

  // Shifted by the largest logit so exp never overflows; the shift cancels in the ratios.
  const double max_logit = *std::max_element(logits, logits + vocab);
  std::vector<double> weights(keep);
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    weights[i] = std::exp((static_cast<double>(logits[ids[i]]) - max_logit) / params.temperature);
    total += weights[i];
  }
  if (params.top_p < 1.0f) {
    // Smallest prefix of the sorted candidates whose probability reaches top_p; at least one.
    double cumulative = 0.0;
    size_t n = 0;
    while (n < keep) {
      cumulative += weights[n] / total;
      ++n;
      if (cumulative >= params.top_p) break;
    }
    keep = n;
    total =
        std::accumulate(weights.begin(), weights.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
  }
  double target = u * total;
  for (size_t i = 0; i < keep; ++i) {
    target -= weights[i];
    if (target < 0.0) return ids[i];
  }
  return ids[keep - 1];  // u * total rounded up to total
}

}  // namespace

SampleResult Sample(const float* logits, int64_t vocab, const SamplingParams& params, uint64_t seed,
                    int64_t step, int32_t top_n) {
  SampleResult result;
  const bool greedy = params.temperature == 0.0f || params.top_k == 1;
  result.token = greedy ? ArgMax(logits, vocab)
                        : SampleFiltered(logits, vocab, params, UniformFromSeed(seed, step));

  const double max_logit = *std::max_element(logits, logits + vocab);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  const double log_z = max_logit + std::log(sum);
  result.logprob = static_cast<float>(logits[result.token] - log_z);
  if (top_n > 0) {
    const size_t n = std::min(static_cast<size_t>(top_n), static_cast<size_t>(vocab));
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n), ids.end(),
                      ByLogitDesc{logits});
    for (size_t i = 0; i < n; ++i) {
      result.top_logprobs.emplace_back(ids[i], static_cast<float>(logits[ids[i]] - log_z));
    }
  }
  return result;
}

}  // namespace loraplex::engine
