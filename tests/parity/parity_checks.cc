#include "tests/parity/parity_checks.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "tests/parity/parity_harness.h"

namespace loraplex::parity {
namespace {

const char* DeviceName(Device d) { return d == Device::kCpu ? "cpu" : "cuda"; }
const char* BatchingName(Batching b) { return b == Batching::kSolo ? "solo" : "mixed"; }

struct Loaded {
  References refs;
  std::unique_ptr<Runner> runner;
};

Loaded Load(Device device) {
  Loaded l;
  auto refs = LoadReferences();
  INFO(refs.status().message());
  REQUIRE(refs.ok());
  l.refs = std::move(*refs);
  REQUIRE(l.refs.records.size() == 8 * (l.refs.adapters.size() + 1));
  auto runner = Runner::Create(device, l.refs.adapters);
  INFO(runner.status().message());
  REQUIRE(runner.ok());
  l.runner = std::move(*runner);
  return l;
}

}  // namespace

void CheckTeacherForcedParity(Device device, Batching batching, const Tolerances& tol) {
  Loaded l = Load(device);
  const std::vector<Record>& records = l.refs.records;
  std::vector<std::vector<std::vector<double>>> ours;  // [record][position][vocab]
  if (batching == Batching::kMixed) {
    std::vector<SeqSpec> seqs;
    for (const Record& r : records) seqs.push_back({r.Sequence(), r.model});
    auto lp = l.runner->TeacherForce(seqs);
    INFO(lp.status().message());
    REQUIRE(lp.ok());
    ours = std::move(*lp);
  } else {
    for (const Record& r : records) {
      auto lp = l.runner->TeacherForce({{r.Sequence(), r.model}});
      INFO(lp.status().message());
      REQUIRE(lp.ok());
      ours.push_back(std::move((*lp)[0]));
    }
  }

  std::map<std::string, LogprobStats> by_model;
  LogprobStats all;
  for (size_t i = 0; i < records.size(); ++i) {
    REQUIRE(ours[i].size() == records[i].target_ids.size() + 1);
    const LogprobStats s = CompareLogprobs(records[i], ours[i], tol.decision_margin);
    for (LogprobStats* agg : {&by_model[records[i].model], &all}) {
      agg->max_target_diff = std::max(agg->max_target_diff, s.max_target_diff);
      agg->sum_target_diff += s.sum_target_diff;
      agg->max_top5_diff = std::max(agg->max_top5_diff, s.max_top5_diff);
      agg->positions += s.positions;
      agg->top5_checked += s.top5_checked;
      agg->top5_mismatches += s.top5_mismatches;
      if (agg->first_mismatch.empty()) agg->first_mismatch = s.first_mismatch;
    }
  }
  for (const auto& [model, s] : by_model) {
    // Per model: an error confined to one adapter (a wrong scale, a missing module) would be
    // diluted by the 4 other models in an overall mean.
    INFO("model " << model);
    CHECK(s.sum_target_diff / static_cast<double>(s.positions) < tol.mean_abs);
    std::printf("parity %s %s teacher-forced %-8s positions=%lld |dlogprob| target max=%.3e mean=%.3e "
                "top5 max=%.3e; top5 ranks checked=%lld mismatched=%lld\n",
                DeviceName(device), BatchingName(batching), model.c_str(), static_cast<long long>(s.positions),
                s.max_target_diff, s.sum_target_diff / static_cast<double>(s.positions), s.max_top5_diff,
                static_cast<long long>(s.top5_checked), static_cast<long long>(s.top5_mismatches));
  }
  const double mean = all.sum_target_diff / static_cast<double>(all.positions);
  std::printf("parity %s %s teacher-forced ALL      positions=%lld |dlogprob| target max=%.3e mean=%.3e "
              "top5 max=%.3e (bounds: max %.1e, mean %.1e, decision margin %.1e)\n",
              DeviceName(device), BatchingName(batching), static_cast<long long>(all.positions),
              all.max_target_diff, mean, all.max_top5_diff, tol.max_abs, tol.mean_abs, tol.decision_margin);
  INFO(all.first_mismatch);
  CHECK(all.max_target_diff < tol.max_abs);
  CHECK(all.max_top5_diff < tol.max_abs);
  // Most ranks are clearly separated; a check that skipped nearly all of them would prove little.
  CHECK(all.top5_checked > all.positions);
  CHECK(all.top5_mismatches == 0);
}

void CheckGreedyParity(Device device, Batching batching, const Tolerances& tol) {
  Loaded l = Load(device);
  const std::vector<Record>& records = l.refs.records;
  std::vector<std::vector<int32_t>> ours;
  if (batching == Batching::kMixed) {
    std::vector<SeqSpec> prompts;
    for (const Record& r : records) prompts.push_back({r.prompt_ids, r.model});
    auto g = l.runner->Greedy(prompts, l.refs.eos_id, l.refs.max_new_tokens);
    INFO(g.status().message());
    REQUIRE(g.ok());
    ours = std::move(*g);
  } else {
    for (const Record& r : records) {
      auto g = l.runner->Greedy({{r.prompt_ids, r.model}}, l.refs.eos_id, l.refs.max_new_tokens);
      INFO(g.status().message());
      REQUIRE(g.ok());
      ours.push_back(std::move((*g)[0]));
    }
  }

  int64_t compared = 0, agreed = 0, full = 0, stopped = 0;
  for (size_t i = 0; i < records.size(); ++i) {
    const GreedyStats s = CompareGreedy(records[i], ours[i], tol.decision_margin);
    compared += s.compared;
    agreed += s.agreed;
    full += s.full_match ? 1 : 0;
    stopped += s.stopped_early ? 1 : 0;
    INFO("record (" << records[i].model << ", '" << records[i].prompt << "') step " << s.agreed);
    CHECK(s.agreed == s.compared);
  }
  std::printf("parity %s %s greedy: %lld/%lld steps agree where the reference margin > %.1e; "
              "%lld/%zu continuations identical; %lld records stopped at a low-margin step\n",
              DeviceName(device), BatchingName(batching), static_cast<long long>(agreed),
              static_cast<long long>(compared), tol.decision_margin, static_cast<long long>(full), records.size(),
              static_cast<long long>(stopped));
  // Guards against a comparison that silently compared nothing.
  CHECK(compared > 0);
}

}  // namespace loraplex::parity
