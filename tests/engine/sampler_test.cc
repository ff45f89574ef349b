#include "engine/sampler.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

namespace loraplex::engine {
namespace {

SamplingParams Params(float temperature, int32_t top_k = 0, float top_p = 1.0f) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  return p;
}

// Logits whose softmax is exactly `probs` (up to float rounding).
std::vector<float> LogitsOf(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(static_cast<float>(std::log(p)));
  return logits;
}

// Frequencies of each token over `draws` steps of one seed.
std::vector<double> Frequencies(const std::vector<float>& logits, const SamplingParams& params,
                                int draws) {
  std::vector<double> freq(logits.size(), 0.0);
  for (int step = 0; step < draws; ++step) {
    freq[Sample(logits.data(), static_cast<int64_t>(logits.size()), params, 42, step, 0).token] +=
        1.0;
  }
  for (double& f : freq) f /= draws;
  return freq;
}

// 20000 draws: the standard error of a frequency is at most sqrt(0.25 / 20000) = 0.0035, so
// 0.02 is over five standard errors; a wrong distribution misses by far more.
constexpr int kDraws = 20000;
constexpr double kFreqTolerance = 0.02;

const std::vector<float> kLogits = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f, 0.0f};

TEST_CASE("Greedy sampling picks the argmax, the lowest id on a tie") {
  for (int step = 0; step < 5; ++step) {
    CHECK(Sample(kLogits.data(), 6, Params(0.0f), 7, step, 0).token == 1);
  }
}

TEST_CASE("top_k of 1 samples the same token as greedy at any temperature") {
  for (int step = 0; step < 50; ++step) {
    CHECK(Sample(kLogits.data(), 6, Params(5.0f, 1), 7, step, 0).token == 1);
  }
}

TEST_CASE("A tiny top_p keeps only the most likely token") {
  for (int step = 0; step < 50; ++step) {
    CHECK(Sample(kLogits.data(), 6, Params(1.0f, 0, 1e-6f), 7, step, 0).token == 1);
  }
}

TEST_CASE("The same seed and step give the same token and other seeds vary") {
  const std::vector<float> flat(32, 0.0f);
  const SamplingParams p = Params(1.0f);
  int differ = 0;
  for (int step = 0; step < 40; ++step) {
    const int32_t a = Sample(flat.data(), 32, p, 123, step, 0).token;
    CHECK(a == Sample(flat.data(), 32, p, 123, step, 0).token);
    if (a != Sample(flat.data(), 32, p, 124, step, 0).token) ++differ;
  }
  // Uniform over 32 tokens: two seeds agree on a step with probability 1/32.
  CHECK(differ > 30);
}

TEST_CASE("Temperature-1 sampling follows the softmax distribution") {
  const std::vector<double> probs = {0.5, 0.3, 0.2};
  const std::vector<double> freq = Frequencies(LogitsOf(probs), Params(1.0f), kDraws);
  for (size_t i = 0; i < probs.size(); ++i) CHECK(std::abs(freq[i] - probs[i]) < kFreqTolerance);
}

TEST_CASE("Temperature divides the logits before the softmax") {
  // At temperature 2 the probabilities become proportional to sqrt(p).
  const std::vector<double> probs = {0.64, 0.32, 0.04};
  const double z = 0.8 + std::sqrt(0.32) + 0.2;
  const std::vector<double> expected = {0.8 / z, std::sqrt(0.32) / z, 0.2 / z};
  const std::vector<double> freq = Frequencies(LogitsOf(probs), Params(2.0f), kDraws);
  for (size_t i = 0; i < probs.size(); ++i) CHECK(std::abs(freq[i] - expected[i]) < kFreqTolerance);
}

TEST_CASE("top_k renormalises over the k most likely tokens") {
  const std::vector<double> freq = Frequencies(LogitsOf({0.5, 0.3, 0.2}), Params(1.0f, 2), kDraws);
  CHECK(std::abs(freq[0] - 0.625) < kFreqTolerance);
  CHECK(std::abs(freq[1] - 0.375) < kFreqTolerance);
  CHECK(freq[2] == 0.0);
}

TEST_CASE("top_p keeps the smallest set of most likely tokens reaching p") {
  // 0.5 + 0.3 = 0.8 >= 0.7: the 0.2 token is cut.
  const std::vector<double> freq =
      Frequencies(LogitsOf({0.2, 0.5, 0.3}), Params(1.0f, 0, 0.7f), kDraws);
  CHECK(freq[0] == 0.0);
  CHECK(std::abs(freq[1] - 0.625) < kFreqTolerance);
  CHECK(std::abs(freq[2] - 0.375) < kFreqTolerance);
}

TEST_CASE("top_k breaks ties by the lower id, so exactly k tokens are kept") {
  const std::vector<float> tied = {1.0f, 3.0f, 3.0f, 3.0f};
  const std::vector<double> freq = Frequencies(tied, Params(1.0f, 2), kDraws);
  CHECK(freq[0] == 0.0);
  CHECK(std::abs(freq[1] - 0.5) < kFreqTolerance);
  CHECK(std::abs(freq[2] - 0.5) < kFreqTolerance);
  CHECK(freq[3] == 0.0);
}

TEST_CASE("top_k and top_p together: top_p applies to the mass renormalised over the top k") {
  // Top 3 of {0.4, 0.3, 0.2, 0.1}: {0.4, 0.3, 0.2} renormalised to {4/9, 3/9, 2/9}; top_p 0.7
  // keeps 4/9 + 3/9 = 0.78 >= 0.7, so two tokens in the ratio 4:3.
  const std::vector<double> freq =
      Frequencies(LogitsOf({0.1, 0.4, 0.2, 0.3}), Params(1.0f, 3, 0.7f), kDraws);
  CHECK(freq[0] == 0.0);
  CHECK(freq[2] == 0.0);
  CHECK(std::abs(freq[1] - 4.0 / 7.0) < kFreqTolerance);
  CHECK(std::abs(freq[3] - 3.0 / 7.0) < kFreqTolerance);
}

TEST_CASE("Logprobs are the log-softmax of the raw logits whatever the temperature") {
  double z = 0.0;
  for (float l : kLogits) z += std::exp(static_cast<double>(l));
  for (const float temperature : {0.0f, 0.7f, 3.0f}) {
    const SampleResult r = Sample(kLogits.data(), 6, Params(temperature), 9, 3, 3);
    // Float log-softmax of values near 1: a few ulps.
    CHECK(r.logprob == Approx(kLogits[r.token] - std::log(z)).margin(1e-5));
    REQUIRE(r.top_logprobs.size() == 3);
    CHECK(r.top_logprobs[0].first == 1);
    CHECK(r.top_logprobs[1].first == 3);
    CHECK(r.top_logprobs[2].first == 4);
    for (const auto& [id, lp] : r.top_logprobs)
      CHECK(lp == Approx(kLogits[id] - std::log(z)).margin(1e-5));
  }
  CHECK(Sample(kLogits.data(), 6, Params(1.0f), 9, 3, 0).top_logprobs.empty());
}

}  // namespace
}  // namespace loraplex::engine
