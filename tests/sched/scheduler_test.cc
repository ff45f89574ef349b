#include "engine/sched/scheduler.h"

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace loraplex::sched {
namespace {

// Compact plan text: "<id>:<start>+<n>" per scheduled sequence in plan order, "s" when it
// samples, "a" when admitted; then "pre=<ids>" and "ad=<adapters>" when not empty.
std::string Describe(const StepPlan& plan) {
  std::vector<std::string> parts;
  for (const ScheduledSeq& s : plan.seqs) {
    parts.push_back(absl::StrCat(s.id, ":", s.start, "+", s.num_tokens, s.samples ? "s" : "",
                                 s.admitted ? "a" : ""));
  }
  if (!plan.preempted.empty())
    parts.push_back(absl::StrCat("pre=", absl::StrJoin(plan.preempted, ",")));
  if (!plan.adapters.empty())
    parts.push_back(absl::StrCat("ad=", absl::StrJoin(plan.adapters, ",")));
  return absl::StrJoin(parts, " ");
}

struct Row {
  const char* name;
  SchedulerLimits limits;
  SchedulerSnapshot snapshot;
  std::string expected;
};

void RunTable(const std::vector<Row>& rows) {
  for (const Row& row : rows) {
    SECTION(row.name) {
      const StepPlan plan = Scheduler(row.limits).Schedule(row.snapshot);
      CHECK(Describe(plan) == row.expected);
      int32_t total = 0;
      for (const ScheduledSeq& s : plan.seqs) total += s.num_tokens;
      CHECK(plan.num_tokens == total);
      CHECK(plan.num_tokens <= row.limits.max_batch_tokens);
    }
  }
}

SchedulerLimits Limits(int32_t batch_tokens, int32_t running_seqs, int32_t slots,
                       int32_t block_size) {
  SchedulerLimits l;
  l.max_batch_tokens = batch_tokens;
  l.max_running_seqs = running_seqs;
  l.adapter_slots = slots;
  l.block_size = block_size;
  l.starvation_steps = 3;
  return l;
}

constexpr uint64_t A = 100, B = 200, C = 300;
constexpr uint64_t kBase = kNoAdapter;

TEST_CASE("Scheduler gives every running decode sequence exactly one token") {
  RunTable({
      {"two decodes",
       Limits(64, 8, 4, 4),
       {{{1, kBase, 5, 6, 2}, {2, A, 9, 10, 3}}, {}, 10, {}},
       "1:5+1s 2:9+1s ad=100"},
      {"decode needing a new block takes one",
       Limits(64, 8, 4, 4),
       {{{1, kBase, 8, 9, 2}}, {}, 1, {}},
       "1:8+1s"},
      {"nothing to do", Limits(64, 8, 4, 4), {{}, {}, 10, {}}, ""},
  });
}

TEST_CASE(
    "Scheduler admits waiting requests in arrival order while their prompt and one more token fit "
    "in KV") {
  RunTable({
      {"both fit",
       Limits(64, 8, 4, 4),
       {{}, {{1, kBase, 7, 0}, {2, kBase, 3, 0}}, 3, {}},
       "1:0+7sa 2:0+3sa"},
      {"prompt of exactly a block needs one more block",
       Limits(64, 8, 4, 4),
       {{}, {{1, kBase, 4, 0}}, 1, {}},
       ""},
      {"the first that does not fit stops later smaller ones",
       Limits(64, 8, 4, 4),
       {{}, {{1, kBase, 3, 0}, {2, kBase, 20, 0}, {3, kBase, 2, 0}}, 3, {}},
       "1:0+3sa"},
  });
}

TEST_CASE(
    "Scheduler chunks a prompt longer than the remaining token budget and continues it next step") {
  RunTable({
      {"first chunk",
       Limits(8, 8, 4, 4),
       {{{1, kBase, 3, 4, 1}}, {{2, kBase, 20, 0}}, 20, {}},
       "1:3+1s 2:0+7a"},
      {"continued chunk runs after decodes and before admissions",
       Limits(8, 8, 4, 4),
       {{{2, kBase, 7, 20, 6}, {1, kBase, 4, 5, 2}}, {{3, kBase, 2, 0}}, 20, {}},
       "1:4+1s 2:7+7"},
      {"last chunk samples",
       Limits(16, 8, 4, 4),
       {{{2, kBase, 14, 20, 6}}, {{3, kBase, 2, 0}}, 20, {}},
       "2:14+6s 3:0+2sa"},
      {"no budget left admits nobody",
       Limits(2, 8, 4, 4),
       {{{1, kBase, 3, 4, 1}, {2, kBase, 3, 4, 1}}, {{3, kBase, 2, 0}}, 20, {}},
       "1:3+1s 2:3+1s"},
  });
}

TEST_CASE("Scheduler admits no more sequences than max_running_seqs") {
  RunTable({
      {"one slot left",
       Limits(64, 2, 4, 4),
       {{{1, kBase, 3, 4, 1}}, {{2, kBase, 2, 0}, {3, kBase, 2, 0}}, 20, {}},
       "1:3+1s 2:0+2sa"},
      {"full", Limits(64, 1, 4, 4), {{{1, kBase, 3, 4, 1}}, {{2, kBase, 2, 0}}, 20, {}}, "1:3+1s"},
  });
}

TEST_CASE(
    "Scheduler lets requests of adapters already in the step pass one whose adapter would exceed "
    "the slots") {
  RunTable({
      {"C waits, later A and base pass",
       Limits(64, 8, 2, 4),
       {{{1, A, 3, 4, 1}, {2, B, 3, 4, 1}}, {{3, C, 2, 0}, {4, A, 2, 0}, {5, kBase, 2, 0}}, 20, {}},
       "1:3+1s 2:3+1s 4:0+2sa 5:0+2sa ad=100,200"},
      {"distinct adapters admitted up to the slots",
       Limits(64, 8, 2, 4),
       {{}, {{1, A, 2, 0}, {2, B, 2, 0}, {3, C, 2, 0}, {4, B, 2, 0}}, 20, {}},
       "1:0+2sa 2:0+2sa 4:0+2sa ad=100,200"},
      {"pinned resident adapters keep their slots",
       Limits(64, 8, 2, 4),
       {{}, {{1, A, 2, 0}, {2, B, 2, 0}, {3, C, 2, 0}}, 20, {C}},
       "1:0+2sa 3:0+2sa ad=100,300"},
      {"a running sequence not scheduled still holds its adapter",
       Limits(1, 8, 2, 4),
       {{{1, A, 3, 4, 1}, {2, B, 3, 4, 1}}, {{3, C, 2, 0}}, 20, {}},
       "1:3+1s ad=100"},
  });
}

TEST_CASE(
    "Scheduler stops admitting newer requests once the oldest has waited too long for an adapter "
    "slot") {
  RunTable({
      {"not yet starving",
       Limits(64, 8, 1, 4),
       {{{1, A, 3, 4, 1}}, {{2, B, 2, 3}, {3, A, 2, 0}}, 20, {}},
       "1:3+1s 3:0+2sa ad=100"},
      {"starving",
       Limits(64, 8, 1, 4),
       {{{1, A, 3, 4, 1}}, {{2, B, 2, 4}, {3, A, 2, 0}}, 20, {}},
       "1:3+1s ad=100"},
      {"admitted once the slot frees",
       Limits(64, 8, 1, 4),
       {{}, {{2, B, 2, 9}, {3, A, 2, 0}}, 20, {}},
       "2:0+2sa ad=200"},
  });
}

TEST_CASE("Scheduler preempts the newest running sequence when decodes run out of KV blocks") {
  RunTable({
      {"newest preempted, its blocks serve the oldest, nobody admitted",
       Limits(64, 8, 4, 4),
       {{{1, kBase, 8, 9, 2}, {2, kBase, 4, 5, 2}, {3, kBase, 2, 3, 1}}, {{4, kBase, 1, 0}}, 0, {}},
       "1:8+1s 2:4+1s pre=3"},
      {"two preempted when one is not enough",
       Limits(64, 8, 4, 4),
       {{{1, kBase, 8, 9, 2}, {2, kBase, 8, 9, 2}, {3, kBase, 4, 5, 1}, {4, kBase, 4, 5, 1}},
        {},
        0,
        {}},
       "1:8+1s 2:8+1s pre=4,3"},
      {"the newest preempts itself",
       Limits(64, 8, 4, 4),
       {{{1, kBase, 8, 9, 2}, {2, kBase, 8, 9, 2}}, {}, 0, {}},
       "1:8+1s pre=2"},
  });
}

TEST_CASE("Scheduler reserves a recomputed sequence's known tokens plus one at admission") {
  const StepPlan plan = Scheduler(Limits(64, 8, 4, 4)).Schedule({{}, {{7, A, 9, 0}}, 3, {}});
  REQUIRE(plan.seqs.size() == 1);
  CHECK(plan.seqs[0].reserve_tokens == 10);
  CHECK(plan.seqs[0].adapter == A);
  CHECK(Describe(plan) == "7:0+9sa ad=100");
}

}  // namespace
}  // namespace loraplex::sched
