// GPU test of the CUDA sampler (Ops::Sample) against the reference sampler (ops::cpu::SampleRow)
// on the same logits: greedy, temperature, top-k, top-p and their combinations, ties, flat rows,
// top-n log-probabilities, vocabularies from 7 to 128256 entries; then batch invariance and a
// short timing section. Own main (not Catch2): one line per case, exit 77 without a GPU, 1 on any
// failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/ops/cpu/sampling.h"
#include "engine/ops/cuda/cuda_ops.h"
#include "engine/ops/ops.h"

namespace loraplex::ops {
namespace {

// Log-probabilities: the GPU sums exp in float over up to 128K terms, the reference in double;
// values are O(10), so a few float ulps of the log-sum-exp: 1e-4 absolute is ample.
constexpr double kLogprobTol = 1e-4;

Ops* g_gpu = nullptr;
int g_failures = 0;
std::mt19937 g_rng(1129);

void Report(const std::string& name, bool pass, const std::string& detail) {
  std::printf("%-72s %s  %s\n", name.c_str(), detail.c_str(), pass ? "PASS" : "FAIL");
  if (!pass) ++g_failures;
}

// Logits of one row: normal with spread `sigma`; `kind` 1 plants ties at the top (the maximum
// repeated at higher ids), 2 is a flat row (every logit equal), 3 a row of few distinct values.
std::vector<float> RandomRow(int64_t vocab, float sigma, int kind) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> row(static_cast<size_t>(vocab));
  for (float& v : row) v = dist(g_rng);
  if (kind == 1 && vocab > 10) {
    float best = row[0];
    for (float v : row) best = std::max(best, v);
    for (int i = 0; i < 5; ++i) row[std::uniform_int_distribution<int64_t>(0, vocab - 1)(g_rng)] = best;
  } else if (kind == 2) {
    std::fill(row.begin(), row.end(), 1.5f);
  } else if (kind == 3) {
    for (float& v : row) v = std::round(v);
  }
  return row;
}

struct Case {
  float temperature;
  int32_t top_k;
  float top_p;
  int32_t top_n;
};

absl::StatusOr<std::vector<SampledToken>> SampleOnGpu(const std::vector<float>& logits, int64_t vocab,
                                                      const std::vector<SamplingRow>& rows) {
  const int64_t r = static_cast<int64_t>(rows.size());
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_logits, g_gpu->Allocate(logits.size() * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_rows, g_gpu->Allocate(rows.size() * sizeof(SamplingRow)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, g_gpu->Allocate(rows.size() * sizeof(SampledToken)));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(d_logits.data(), logits.data(), logits.size() * 4));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(d_rows.data(), rows.data(), rows.size() * sizeof(SamplingRow)));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Memset(d_out.data(), 0xFF, rows.size() * sizeof(SampledToken)));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Sample(d_logits.View(DType::kF32, {r, vocab}),
                                         static_cast<const SamplingRow*>(d_rows.data()),
                                         static_cast<SampledToken*>(d_out.data())));
  std::vector<SampledToken> out(rows.size());
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToHost(out.data(), d_out.data(), out.size() * sizeof(SampledToken)));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->Synchronize());
  return out;
}

// Every case on `rows_per_case` rows (fresh logits, seeds and steps), all in one launch.
absl::Status TestAgainstReference(int64_t vocab, int rows_per_case, int blocks) {
  const std::vector<Case> cases = {
      {0.0f, 0, 1.0f, 0},  {0.0f, 0, 1.0f, 20},  {1.0f, 0, 1.0f, 0},   {0.7f, 0, 0.9f, 5},
      {1.0f, 50, 1.0f, 0}, {1.3f, 40, 0.8f, 3},  {2.0f, 1, 1.0f, 2},   {1.0f, 0, 1e-6f, 0},
      {1.0f, 0, 0.5f, 0},  {0.5f, 5000, 0.95f, 0}, {1.0f, 1 << 30, 1.0f, 1}, {3.0f, 0, 0.99f, 20},
  };
  std::vector<float> logits;
  std::vector<SamplingRow> rows;
  std::uniform_int_distribution<uint64_t> seed_dist;
  for (const Case& c : cases) {
    for (int i = 0; i < rows_per_case; ++i) {
      const int kind = i % 4;
      const std::vector<float> row = RandomRow(vocab, i % 2 == 0 ? 2.0f : 6.0f, kind);
      logits.insert(logits.end(), row.begin(), row.end());
      SamplingRow s;
      s.seed = seed_dist(g_rng);
      s.step = i;
      s.temperature = c.temperature;
      s.top_k = c.top_k;
      s.top_p = c.top_p;
      s.top_n = c.top_n;
      rows.push_back(s);
    }
  }
  LORAPLEX_ASSIGN_OR_RETURN(const std::vector<SampledToken> got, SampleOnGpu(logits, vocab, rows));
  size_t at = 0;
  for (const Case& c : cases) {
    int token_mismatch = 0, top_mismatch = 0;
    double worst_lp = 0.0;
    for (int i = 0; i < rows_per_case; ++i, ++at) {
      const float* row = logits.data() + at * static_cast<size_t>(vocab);
      const SampledToken want = cpu::SampleRow(row, vocab, rows[at]);
      if (got[at].token != want.token) ++token_mismatch;
      worst_lp = std::max(worst_lp, std::abs(static_cast<double>(got[at].logprob) - want.logprob));
      const int n = static_cast<int>(std::min<int64_t>(c.top_n, vocab));
      for (int j = 0; j < n; ++j) {
        if (got[at].top_ids[j] != want.top_ids[j]) ++top_mismatch;
        worst_lp = std::max(worst_lp, std::abs(static_cast<double>(got[at].top_logprobs[j]) - want.top_logprobs[j]));
      }
    }
    // The same draw u picks the same token unless u·total lands within rounding (2^-40 fixed point
    // vs double) of a boundary between two tokens: never at these row counts; greedy must match always.
    const bool pass = token_mismatch == 0 && top_mismatch == 0 && worst_lp <= kLogprobTol;
    Report(absl::StrCat("Sample V=", vocab, " blocks=", blocks, " T=", c.temperature, " top_k=", c.top_k, " top_p=", c.top_p,
                        " top_n=", c.top_n),
           pass,
           absl::StrCat("rows=", rows_per_case, " token_mismatch=", token_mismatch, " top_mismatch=", top_mismatch,
                        " max|dlogprob|=", worst_lp));
  }
  return absl::OkStatus();
}

// A row's result must not depend on the rows beside it or on its position in the batch.
absl::Status TestBatchInvariance(int64_t vocab) {
  const std::vector<float> row = RandomRow(vocab, 3.0f, 0);
  SamplingRow s;
  s.seed = 77;
  s.step = 5;
  s.temperature = 0.8f;
  s.top_k = 100;
  s.top_p = 0.9f;
  s.top_n = 4;
  LORAPLEX_ASSIGN_OR_RETURN(const std::vector<SampledToken> alone, SampleOnGpu(row, vocab, {s}));
  // The same row on 1, 2, 4 and 8 blocks (alone it takes 8): the same bits.
  for (int blocks : {1, 2, 4}) {
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSampleBlocksForTest(g_gpu, blocks));
    LORAPLEX_ASSIGN_OR_RETURN(const std::vector<SampledToken> got, SampleOnGpu(row, vocab, {s}));
    LORAPLEX_RETURN_IF_ERROR(cuda::SetSampleBlocksForTest(g_gpu, 0));
    Report(absl::StrCat("Sample on ", blocks, " blocks a row = on 8, V=", vocab),
           std::memcmp(&alone[0], &got[0], sizeof(SampledToken)) == 0,
           absl::StrCat("8 blocks token=", alone[0].token, " ", blocks, " blocks token=", got[0].token));
  }
  std::vector<float> batch;
  std::vector<SamplingRow> rows;
  for (int i = 0; i < 9; ++i) {
    const std::vector<float> other = i == 6 ? row : RandomRow(vocab, 3.0f, 0);
    batch.insert(batch.end(), other.begin(), other.end());
    SamplingRow o = s;
    if (i != 6) o.seed = 1000 + i;
    rows.push_back(o);
  }
  LORAPLEX_ASSIGN_OR_RETURN(const std::vector<SampledToken> together, SampleOnGpu(batch, vocab, rows));
  const bool same = std::memcmp(&alone[0], &together[6], sizeof(SampledToken)) == 0;
  Report(absl::StrCat("Sample batch invariance V=", vocab), same,
         absl::StrCat("alone token=", alone[0].token, " in batch token=", together[6].token));
  return absl::OkStatus();
}

// blocks: SetSampleBlocksForTest's blocks a row for the timed launches (0: the executor's choice).
absl::Status TimeSample(int64_t vocab, int rows, const Case& c, int blocks) {
  std::vector<float> logits;
  std::vector<SamplingRow> srows;
  for (int i = 0; i < rows; ++i) {
    const std::vector<float> row = RandomRow(vocab, 3.0f, 0);
    logits.insert(logits.end(), row.begin(), row.end());
    SamplingRow s;
    s.seed = static_cast<uint64_t>(i);
    s.temperature = c.temperature;
    s.top_k = c.top_k;
    s.top_p = c.top_p;
    s.top_n = c.top_n;
    srows.push_back(s);
  }
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_logits, g_gpu->Allocate(logits.size() * 4));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_rows, g_gpu->Allocate(srows.size() * sizeof(SamplingRow)));
  LORAPLEX_ASSIGN_OR_RETURN(DeviceMemory d_out, g_gpu->Allocate(srows.size() * sizeof(SampledToken)));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(d_logits.data(), logits.data(), logits.size() * 4));
  LORAPLEX_RETURN_IF_ERROR(g_gpu->CopyToDevice(d_rows.data(), srows.data(), srows.size() * sizeof(SamplingRow)));
  const TensorView view = d_logits.View(DType::kF32, {rows, vocab});
  LORAPLEX_RETURN_IF_ERROR(cuda::SetSampleBlocksForTest(g_gpu, blocks));
  auto us = cuda::TimeOnStream(g_gpu, 3, 11, 5, [&](int) {
    return g_gpu->Sample(view, static_cast<const SamplingRow*>(d_rows.data()), static_cast<SampledToken*>(d_out.data()));
  });
  LORAPLEX_RETURN_IF_ERROR(cuda::SetSampleBlocksForTest(g_gpu, 0));
  if (!us.ok()) return us.status();
  std::sort(us->begin(), us->end());
  std::printf("TIME Sample V=%lld rows=%-4d T=%.1f top_k=%d top_p=%.2f top_n=%d blocks=%s  %8.2f us\n",
              static_cast<long long>(vocab), rows, c.temperature, c.top_k, c.top_p, c.top_n,
              blocks == 0 ? "auto" : absl::StrCat(blocks).c_str(), (*us)[us->size() / 2]);
  return absl::OkStatus();
}

void Run(const std::string& name, const absl::Status& s) {
  if (!s.ok()) {
    std::printf("%-72s ERROR %s  FAIL\n", name.c_str(), s.ToString().c_str());
    ++g_failures;
  }
}

int Main() {
  if (!cuda::CudaDevicePresent()) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  auto gpu = cuda::CreateCudaOps();
  if (!gpu.ok()) {
    std::printf("setup failed: %s\n", gpu.status().ToString().c_str());
    return 1;
  }
  g_gpu = gpu->get();
  // Every row's passes dealt over 1, 2, 4 or 8 blocks (a cluster): the same picks as the reference
  // each time (0: as many as the launch's rows leave SMs for, 1 at these row counts).
  for (int blocks : {0, 2, 4, 8}) {
    Run("SetSampleBlocksForTest", cuda::SetSampleBlocksForTest(g_gpu, blocks));
    for (auto [vocab, rows] : std::vector<std::pair<int64_t, int>>{{7, 64}, {1000, 64}, {32000, 16}, {128256, 8}}) {
      Run(absl::StrCat("Sample V=", vocab, " blocks=", blocks), TestAgainstReference(vocab, rows, blocks));
    }
  }
  Run("SetSampleBlocksForTest", cuda::SetSampleBlocksForTest(g_gpu, 0));
  Run("Sample batch invariance", TestBatchInvariance(128256));
  // The executor's choice of blocks a row, then forced counts beside it (same process).
  for (int rows : {1, 8, 32, 64, 128}) {
    for (int blocks : {0, 1, 2, 4, 8}) {
      if (blocks != 0 && rows * blocks > 512) continue;  // many waves: not worth the time
      Run("TIME Sample", TimeSample(128256, rows, {0.0f, 0, 1.0f, 0}, blocks));
      Run("TIME Sample", TimeSample(128256, rows, {0.7f, 0, 0.9f, 0}, blocks));
      Run("TIME Sample", TimeSample(128256, rows, {1.0f, 50, 0.95f, 5}, blocks));
    }
  }
  Run("Synchronize", g_gpu->Synchronize());
  std::printf("%s: %d failure(s)\n", g_failures == 0 ? "PASS" : "FAIL", g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace loraplex::ops

int main() { return loraplex::ops::Main(); }
