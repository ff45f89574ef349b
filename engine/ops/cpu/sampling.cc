#include "engine/ops/cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace loraplex::ops::cpu {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The total order every path ranks candidates by: higher logit first, the lower id on a tie.
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

// Draws from the temperature-scaled distribution restricted by top-k, then top-p.
int32_t SampleFiltered(const float* logits, int64_t vocab, const SamplingRow& row) {
  std::vector<int32_t> ranked(static_cast<size_t>(vocab));
  std::iota(ranked.begin(), ranked.end(), 0);
  const ByLogitDesc order{logits};
  size_t keep = ranked.size();
  if (row.top_k > 0 && static_cast<size_t>(row.top_k) < ranked.size()) {
    keep = static_cast<size_t>(row.top_k);
    std::partial_sort(ranked.begin(), ranked.begin() + static_cast<std::ptrdiff_t>(keep),
                      ranked.end(), order);
  } else if (row.top_p < 1.0f) {
    std::sort(ranked.begin(), ranked.end(), order);
  }
  ranked.resize(keep);

  // Shifted by the largest logit so exp never overflows; the shift cancels in the ratios.
  const double max_logit = *std::max_element(logits, logits + vocab);
  std::vector<double> weight(static_cast<size_t>(vocab), 0.0);  // 0 for tokens not kept
  double total = 0.0;
  for (int32_t id : ranked) {
    weight[id] = std::exp((static_cast<double>(logits[id]) - max_logit) / row.temperature);
    total += weight[id];
  }
  if (row.top_p < 1.0f) {
    // The shortest prefix of the ranked candidates whose mass reaches top_p (at least one).
    double cumulative = 0.0;
    size_t n = 0;
    while (n < keep) {
      cumulative += weight[ranked[n]];
      ++n;
      if (cumulative >= row.top_p * total) break;
    }
    for (size_t i = n; i < keep; ++i) weight[ranked[i]] = 0.0;
    total = cumulative;
  }
  // The walk goes in id order, so it needs no sorted list and matches the GPU sampler's.
  double target = static_cast<double>(UniformBits53(row.seed, row.step)) * 0x1.0p-53 * total;
  int32_t last = ranked.front();
  for (int64_t id = 0; id < vocab; ++id) {
    if (weight[id] <= 0.0) continue;
    last = static_cast<int32_t>(id);
    target -= weight[id];
    if (target < 0.0) return last;
  }
  return last;  // u · total rounded up to total
}

}  // namespace

uint64_t UniformBits53(uint64_t seed, int64_t step) {
  return SplitMix64(SplitMix64(seed) ^ static_cast<uint64_t>(step)) >> 11;
}

SampledToken SampleRow(const float* logits, int64_t vocab, const SamplingRow& row) {
  SampledToken out;
  const bool greedy = row.temperature == 0.0f || row.top_k == 1;
  out.token = greedy ? ArgMax(logits, vocab) : SampleFiltered(logits, vocab, row);

  const double max_logit = *std::max_element(logits, logits + vocab);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  const double log_z = max_logit + std::log(sum);
  out.logprob = static_cast<float>(logits[out.token] - log_z);
  const int64_t n = std::min<int64_t>(std::clamp(row.top_n, 0, kMaxSampleTopN), vocab);
  if (n > 0) {
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), ByLogitDesc{logits});
    for (int64_t i = 0; i < n; ++i) {
      out.top_ids[i] = ids[i];
      out.top_logprobs[i] = static_cast<float>(logits[ids[i]] - log_z);
    }
  }
  return out;
}

}  // namespace loraplex::ops::cpu
