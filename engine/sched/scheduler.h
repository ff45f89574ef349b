// Scheduler: the continuous-batching policy. A snapshot of the engine's sequences and free KV
// blocks goes in, the plan of one forward step comes out: which sequences run, how many tokens
// each computes, who is admitted from the queue and who is preempted. No threads, no device, no
// state between calls (everything it needs is in the snapshot). Thread-compatible.
#pragma once

#include <cstdint>
#include <vector>

namespace loraplex::sched {

// Adapter key of a sequence that uses the base model only (needs no adapter slot).
inline constexpr uint64_t kNoAdapter = ~uint64_t{0};

struct SchedulerLimits {
  int32_t max_batch_tokens = 2048;  // tokens computed in one step
  int32_t max_running_seqs = 64;    // sequences holding KV at once
  int32_t adapter_slots = 8;        // distinct adapters that may be resident at once
  int32_t block_size = 16;          // tokens per KV block
  // A waiting request kept out only by the adapter limit lets newer requests pass; once it is
  // the oldest waiting request and has waited more than this many steps, nothing newer is
  // admitted until it is.
  int32_t starvation_steps = 8;
};

// A sequence that holds KV blocks. Tokens [0, num_computed) are in the cache; tokens
// [num_computed, num_tokens) are known (prompt, or sampled) but not yet computed.
struct RunningSeq {
  uint64_t id = 0;
  uint64_t adapter = kNoAdapter;
  int32_t num_computed = 0;
  int32_t num_tokens = 0;
  int32_t num_blocks = 0;  // blocks held now
};

// A sequence in the queue; holds no KV blocks. num_tokens counts the prompt plus, for a
// preempted sequence, the tokens it had generated (all recomputed on admission).
struct WaitingSeq {
  uint64_t id = 0;
  uint64_t adapter = kNoAdapter;
  int32_t num_tokens = 0;
  int32_t steps_waited = 0;  // steps this request has been in the queue without being admitted
};

struct SchedulerSnapshot {
  std::vector<RunningSeq> running;  // oldest first (arrival order)
  std::vector<WaitingSeq> waiting;  // queue order: front first
  int32_t free_blocks = 0;
  // Adapters pinned in device slots: they keep their slot, so fewer slots remain for others.
  std::vector<uint64_t> pinned_resident;
};

struct ScheduledSeq {
  uint64_t id = 0;
  uint64_t adapter = kNoAdapter;
  int32_t start = 0;           // first position computed this step (= num_computed)
  int32_t num_tokens = 0;      // tokens computed this step, positions [start, start + num_tokens)
  int32_t reserve_tokens = 0;  // the sequence's block table must hold this many tokens first
  bool samples = false;        // this step reaches the last known token: sample the next one
  bool admitted = false;       // moved from the queue to running by this step
};

struct StepPlan {
  // In the order the model step sees them: decodes, then continued prefills, then admissions.
  std::vector<ScheduledSeq> seqs;
  // Running sequences to stop and send back to the front of the queue (their blocks freed and
  // recomputed later), newest first.
  std::vector<uint64_t> preempted;
  // Distinct adapters of the scheduled sequences (kNoAdapter excluded), in plan order.
  std::vector<uint64_t> adapters;
  int32_t num_tokens = 0;  // sum over seqs
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerLimits& limits) : limits_(limits) {}
  StepPlan Schedule(const SchedulerSnapshot& snapshot) const;
  const SchedulerLimits& limits() const { return limits_; }

 private:
  SchedulerLimits limits_;
};

}  // namespace loraplex::sched
