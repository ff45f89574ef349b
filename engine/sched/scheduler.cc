#include "engine/sched/scheduler.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"

namespace loraplex::sched {
namespace {

int32_t BlocksFor(int64_t tokens, int32_t block_size) {
  return tokens <= 0 ? 0 : static_cast<int32_t>((tokens + block_size - 1) / block_size);
}

}  // namespace

StepPlan Scheduler::Schedule(const SchedulerSnapshot& snapshot) const {
  StepPlan plan;
  int32_t budget = limits_.max_batch_tokens;
  int32_t free_blocks = snapshot.free_blocks;
  const std::vector<RunningSeq>& running = snapshot.running;
  std::vector<bool> scheduled(running.size(), false);
  std::vector<bool> preempted(running.size(), false);

  // Running sequences: decodes (one token left to compute) first so generation never stalls
  // behind a long prompt, then continued prefill chunks. Oldest first within each pass.
  for (const bool decode_pass : {true, false}) {
    for (size_t i = 0; i < running.size() && budget > 0; ++i) {
      const RunningSeq& seq = running[i];
      const int32_t remaining = seq.num_tokens - seq.num_computed;
      if (preempted[i] || remaining <= 0 || (remaining == 1) != decode_pass) continue;
      const int32_t n = std::min(remaining, budget);
      const int32_t reserve = seq.num_computed + n;
      const int32_t need = std::max(0, BlocksFor(reserve, limits_.block_size) - seq.num_blocks);
      // Out of KV: free the newest sequence not yet scheduled this step, or this one when it is
      // the newest left; it is recomputed later from its tokens.
      while (need > free_blocks) {
        size_t victim = i;
        for (size_t j = running.size(); j-- > i + 1;) {
          if (!preempted[j] && !scheduled[j]) {
            victim = j;
            break;
          }
        }
        preempted[victim] = true;
        free_blocks += running[victim].num_blocks;
        plan.preempted.push_back(running[victim].id);
        if (victim == i) break;
      }
      if (preempted[i]) continue;
      free_blocks -= need;
      budget -= n;
      scheduled[i] = true;
      plan.seqs.push_back({seq.id, seq.adapter, seq.num_computed, n, reserve,
                           /*samples=*/seq.num_computed + n == seq.num_tokens, /*admitted=*/false});
    }
  }

  absl::flat_hash_set<uint64_t> adapters_held(snapshot.pinned_resident.begin(),
                                              snapshot.pinned_resident.end());
  int32_t num_running = 0;
  for (size_t i = 0; i < running.size(); ++i) {
    if (preempted[i]) continue;
    ++num_running;
    // Every running sequence keeps its adapter claimed, scheduled this step or not, so the
    // running set never needs more adapters at once than there are slots.
    if (running[i].adapter != kNoAdapter) adapters_held.insert(running[i].adapter);
  }

  // Admissions, in queue order, only when nothing had to be preempted (KV is tight).
  const bool head_starving =
      !snapshot.waiting.empty() && snapshot.waiting.front().steps_waited > limits_.starvation_steps;
  for (size_t w = 0; w < snapshot.waiting.size() && plan.preempted.empty(); ++w) {
    const WaitingSeq& seq = snapshot.waiting[w];
    if (budget <= 0 || num_running >= limits_.max_running_seqs) break;
    const bool new_adapter = seq.adapter != kNoAdapter && !adapters_held.contains(seq.adapter);
    if (new_adapter && static_cast<int32_t>(adapters_held.size()) >= limits_.adapter_slots) {
      if (w == 0 && head_starving) break;
      continue;
    }
    // The whole prompt plus the first generated token, so chunks and the first decode never
    // have to preempt anyone.
    const int32_t need = BlocksFor(int64_t{seq.num_tokens} + 1, limits_.block_size);
    if (need > free_blocks) break;
    const int32_t n = std::min(seq.num_tokens, budget);
    free_blocks -= need;
    budget -= n;
    ++num_running;
    if (new_adapter) adapters_held.insert(seq.adapter);
    plan.seqs.push_back({seq.id, seq.adapter, 0, n, seq.num_tokens + 1,
                         /*samples=*/n == seq.num_tokens, /*admitted=*/true});
  }

  absl::flat_hash_set<uint64_t> seen;
  for (const ScheduledSeq& s : plan.seqs) {
    plan.num_tokens += s.num_tokens;
    if (s.adapter != kNoAdapter && seen.insert(s.adapter).second)
      plan.adapters.push_back(s.adapter);
  }
  return plan;
}

}  // namespace loraplex::sched
