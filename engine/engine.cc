#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <optional>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "engine/core/status.h"
#include "engine/kv/block_allocator.h"
#include "engine/kv/block_table.h"
#include "engine/model/llama.h"
#include "engine/model/model_spec.h"
#include "engine/ops/ops.h"
#include "engine/sampler.h"
#include "engine/sched/scheduler.h"
#include "lora/lora_batch.h"
#include "lora/registry.h"
#include "lora/slot_pool.h"
#include "spdlog/spdlog.h"

namespace loraplex::engine {
namespace {

constexpr int32_t kMaxTopLogprobs = 20;
// KV capacity when the config leaves it at 0: room for every running sequence at full length,
// capped so a model with a huge context does not reserve tens of GB by default.
constexpr int64_t kDefaultKvTokensCap = 32768;

// One request from Submit to its finish. Owned by the inbox, then by the loop thread.
struct Sequence {
  explicit Sequence(int32_t block_size) : table(block_size) {}

  uint64_t id = 0;
  GenerateRequest request;
  std::shared_ptr<TokenSink> sink;
  lora::AdapterRef adapter;  // empty for the base model; released when the sequence goes
  uint64_t adapter_key = sched::kNoAdapter;
  uint64_t seed = 0;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int32_t prompt_len = 0;
  int32_t generated = 0;
  int32_t num_computed = 0;  // tokens whose K/V are in the cache
  int32_t steps_waited = 0;
  kv::BlockTable table;
  absl::Time submitted;
  std::optional<absl::Time> first_scheduled;
  std::optional<absl::Time> first_token;
};

absl::Status ValidateSampling(const SamplingParams& s) {
  if (s.max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 1, got ", s.max_new_tokens));
  }
  if (!(s.temperature >= 0.0f) || std::isinf(s.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0, got ", s.temperature));
  }
  if (!(s.top_p > 0.0f && s.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", s.top_p));
  }
  if (s.top_k < 0)
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", s.top_k));
  if (s.top_logprobs < 0 || s.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", s.top_logprobs));
  }
  return absl::OkStatus();
}

class EngineImpl final : public Engine {
 public:
  EngineImpl(const config::Config& config, lora::AdapterRegistry* registry, model::ModelSpec spec,
             std::string executor_name, int64_t max_seq_len, int32_t num_kv_blocks,
             std::unique_ptr<ops::Ops> ops, std::unique_ptr<lora::SlotPool> slots,
             std::unique_ptr<model::LlamaModel> model)
      : config_(config),
        registry_(registry),
        spec_(std::move(spec)),
        executor_name_(std::move(executor_name)),
        max_seq_len_(max_seq_len),
        block_size_(static_cast<int32_t>(config.engine.kv_block_size)),
        ops_(std::move(ops)),
        slots_(std::move(slots)),
        model_(std::move(model)),
        scheduler_(MakeLimits(config, slots_.get())),
        blocks_(num_kv_blocks) {
    loop_stats_.kv_blocks_total = blocks_.num_blocks();
    loop_stats_.adapter_slots_total = slots_ ? slots_->num_slots() : 0;
    stats_ = loop_stats_;
    thread_ = std::thread([this] { Loop(); });
  }

  ~EngineImpl() override {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
      draining_ = true;
      wake_.Signal();
    }
    thread_.join();
  }

  absl::StatusOr<uint64_t> Submit(GenerateRequest request,
                                  std::shared_ptr<TokenSink> sink) override;
  void Cancel(uint64_t id) override {
    absl::MutexLock lock(&mu_);
    cancels_.push_back(id);
    wake_.Signal();
  }
  void EvictAdapter(uint64_t adapter_uid) override {
    absl::MutexLock lock(&mu_);
    evictions_.push_back(adapter_uid);
    wake_.Signal();
  }
  EngineStats Stats() const override {
    absl::MutexLock lock(&mu_);
    EngineStats s = stats_;
    s.healthy = healthy_;
    return s;
  }
  void Drain(absl::Duration timeout) override;

  const model::ModelSpec& spec() const override { return spec_; }
  std::string executor_name() const override { return executor_name_; }
  int64_t max_seq_len() const override { return max_seq_len_; }

 private:
  static sched::SchedulerLimits MakeLimits(const config::Config& config,
                                           const lora::SlotPool* slots) {
    sched::SchedulerLimits limits;
    limits.max_batch_tokens = static_cast<int32_t>(config.engine.max_batch_tokens);
    limits.max_running_seqs = static_cast<int32_t>(config.engine.max_running_seqs);
    limits.adapter_slots = slots ? slots->num_slots() : 0;
    limits.block_size = static_cast<int32_t>(config.engine.kv_block_size);
    return limits;
  }

  // Loop thread only, below.
  void Loop();
  // Runs one scheduled step; false when the plan was empty (nothing can move until something
  // arrives).
  bool Step();
  void Finish(std::unique_ptr<Sequence> seq, FinishReason reason, const absl::Status& status);
  void FinishAll(FinishReason reason, const absl::Status& status);
  void Fail(const absl::Status& status);
  void CancelById(uint64_t id);
  std::unique_ptr<Sequence> TakeRunning(uint64_t id);
  std::unique_ptr<Sequence> TakeWaiting(uint64_t id);
  void PublishStats();

  const config::Config config_;
  lora::AdapterRegistry* const registry_;
  const model::ModelSpec spec_;
  const std::string executor_name_;
  const int64_t max_seq_len_;
  const int32_t block_size_;
  // Declared in dependency order: the model reads the slot tables, both use the ops.
  std::unique_ptr<ops::Ops> ops_;
  std::unique_ptr<lora::SlotPool> slots_;
  std::unique_ptr<model::LlamaModel> model_;
  const sched::Scheduler scheduler_;

  // Loop thread state.
  kv::BlockAllocator blocks_;
  std::vector<std::unique_ptr<Sequence>> running_;  // arrival order (ids ascending)
  std::deque<std::unique_ptr<Sequence>> waiting_;   // queue order
  absl::flat_hash_set<uint64_t> pinned_resident_;   // uids of pinned adapters made resident
  absl::Status failure_;                            // the forward error that made us unhealthy
  EngineStats loop_stats_;

  mutable absl::Mutex mu_;
  absl::CondVar wake_;
  std::vector<std::unique_ptr<Sequence>> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> cancels_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> evictions_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;  // submitted and not finished
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool cancel_all_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool healthy_ ABSL_GUARDED_BY(mu_) = true;
  EngineStats stats_ ABSL_GUARDED_BY(mu_);

  std::thread thread_;
};

absl::StatusOr<uint64_t> EngineImpl::Submit(GenerateRequest request,
                                            std::shared_ptr<TokenSink> sink) {
  if (sink == nullptr) return absl::InvalidArgumentError("Submit: sink is null");
  const std::vector<int32_t>& prompt = request.prompt_ids;
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  LORAPLEX_RETURN_IF_ERROR(ValidateSampling(request.sampling));
  const int64_t total = static_cast<int64_t>(prompt.size()) + request.sampling.max_new_tokens;
  if (total > max_seq_len_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt.size(), " tokens + max_new_tokens ", request.sampling.max_new_tokens,
        " = ", total, " exceeds max_seq_len ", max_seq_len_));
  }
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= spec_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt_ids[", i, "] = ", prompt[i],
                                                     " is outside the vocabulary [0, ",
                                                     spec_.vocab_size, ")"));
    }
  }
  auto seq = std::make_unique<Sequence>(block_size_);
  if (!request.adapter.empty()) {
    if (slots_ == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter '", request.adapter, "' asked for, but lora.adapter_slots is 0"));
    }
    LORAPLEX_ASSIGN_OR_RETURN(seq->adapter, registry_->Acquire(request.adapter));
    seq->adapter_key = seq->adapter->uid;
  }
  seq->tokens = prompt;
  seq->prompt_len = static_cast<int32_t>(prompt.size());
  seq->sink = std::move(sink);
  seq->submitted = absl::Now();

  absl::MutexLock lock(&mu_);
  if (!healthy_) return absl::UnavailableError("engine is unhealthy after a device error");
  if (draining_) return absl::UnavailableError("engine is draining");
  const int64_t queued = static_cast<int64_t>(inbox_.size()) + stats_.waiting_seqs;
  if (queued >= config_.server.max_queued_requests) {
    return absl::ResourceExhaustedError(
        absl::StrCat(queued, " requests are queued (server.max_queued_requests = ",
                     config_.server.max_queued_requests, ")"));
  }
  seq->id = next_id_++;
  seq->seed = request.sampling.seed.has_value()
                  ? *request.sampling.seed
                  : config_.engine.default_seed ^ (seq->id * 0x9e3779b97f4a7c15ull);
  seq->request = std::move(request);
  const uint64_t id = seq->id;
  inbox_.push_back(std::move(seq));
  ++in_flight_;
  wake_.Signal();
  return id;
}

void EngineImpl::Drain(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  draining_ = true;
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return in_flight_ == 0; };
  if (mu_.AwaitWithTimeout(absl::Condition(&idle), timeout)) return;
  cancel_all_ = true;
  wake_.Signal();
  mu_.Await(absl::Condition(&idle));
}

void EngineImpl::Loop() {
  bool stalled = false;
  while (true) {
    std::vector<std::unique_ptr<Sequence>> arrivals;
    std::vector<uint64_t> cancels;
    std::vector<uint64_t> evictions;
    bool stop = false;
    bool cancel_all = false;
    {
      absl::MutexLock lock(&mu_);
      const bool idle = stalled || (running_.empty() && waiting_.empty());
      while (idle && !stop_ && !cancel_all_ && inbox_.empty() && cancels_.empty() &&
             evictions_.empty()) {
        wake_.Wait(&mu_);
      }
      arrivals.swap(inbox_);
      cancels.swap(cancels_);
      evictions.swap(evictions_);
      stop = stop_;
      cancel_all = cancel_all_;
      cancel_all_ = false;
    }
    for (auto& seq : arrivals) {
      if (!failure_.ok()) {
        Finish(std::move(seq), FinishReason::kError, failure_);
      } else {
        waiting_.push_back(std::move(seq));
      }
    }
    for (uint64_t id : cancels) CancelById(id);
    for (uint64_t uid : evictions) {
      if (slots_) slots_->Evict(uid);
      pinned_resident_.erase(uid);
    }
    if (stop || cancel_all) FinishAll(FinishReason::kCancelled, absl::OkStatus());
    if (stop) {
      PublishStats();
      return;
    }
    stalled = !Step();
    PublishStats();
  }
}

bool EngineImpl::Step() {
  if (running_.empty() && waiting_.empty()) return false;
  sched::SchedulerSnapshot snapshot;
  for (const auto& seq : running_) {
    snapshot.running.push_back({seq->id, seq->adapter_key, seq->num_computed,
                                static_cast<int32_t>(seq->tokens.size()),
                                static_cast<int32_t>(seq->table.blocks().size())});
  }
  for (const auto& seq : waiting_) {
    snapshot.waiting.push_back(
        {seq->id, seq->adapter_key, static_cast<int32_t>(seq->tokens.size()), seq->steps_waited});
  }
  snapshot.free_blocks = blocks_.num_free();
  snapshot.pinned_resident.assign(pinned_resident_.begin(), pinned_resident_.end());
  const sched::StepPlan plan = scheduler_.Schedule(snapshot);

  // Preempted sequences go back to the front of the queue, oldest first, to be recomputed.
  std::vector<std::unique_ptr<Sequence>> preempted;
  for (uint64_t id : plan.preempted) {
    std::unique_ptr<Sequence> seq = TakeRunning(id);
    seq->table.FreeAll(&blocks_);
    seq->num_computed = 0;
    ++loop_stats_.preemptions;
    preempted.push_back(std::move(seq));
  }
  std::sort(preempted.begin(), preempted.end(),
            [](const auto& a, const auto& b) { return a->id > b->id; });
  for (auto& seq : preempted) {
    spdlog::debug("engine: preempted request {} ({} tokens) for lack of KV blocks", seq->id,
                  seq->tokens.size());
    waiting_.push_front(std::move(seq));
  }
  if (plan.seqs.empty()) return !plan.preempted.empty();

  const absl::Time now = absl::Now();
  for (const sched::ScheduledSeq& s : plan.seqs) {
    if (!s.admitted) continue;
    std::unique_ptr<Sequence> seq = TakeWaiting(s.id);
    if (!seq->first_scheduled) {  // a preempted sequence's prompt counts once
      seq->first_scheduled = now;
      loop_stats_.prompt_tokens_total += seq->prompt_len;
    }
    running_.push_back(std::move(seq));
  }
  std::sort(running_.begin(), running_.end(),
            [](const auto& a, const auto& b) { return a->id < b->id; });
  for (auto& seq : waiting_) ++seq->steps_waited;
  absl::flat_hash_map<uint64_t, Sequence*> by_id;
  for (auto& seq : running_) by_id[seq->id] = seq.get();

  // Adapter slots for this step, in plan order.
  absl::flat_hash_map<uint64_t, int32_t> slot_of;
  if (!plan.adapters.empty()) {
    absl::flat_hash_map<uint64_t, const lora::AdapterRef*> ref_of;
    for (const sched::ScheduledSeq& s : plan.seqs) ref_of.emplace(s.adapter, &by_id[s.id]->adapter);
    std::vector<const lora::LoadedAdapter*> adapters;
    std::vector<bool> pinned;
    for (uint64_t key : plan.adapters) {
      adapters.push_back(ref_of[key]->get());
      pinned.push_back(ref_of[key]->pinned());
    }
    absl::StatusOr<std::vector<int32_t>> slots = slots_->EnsureResident(adapters, pinned);
    if (!slots.ok()) {
      Fail(Annotate(slots.status(), "making the step's adapters resident"));
      return true;
    }
    for (size_t i = 0; i < adapters.size(); ++i) {
      slot_of[plan.adapters[i]] = (*slots)[i];
      if (pinned[i]) pinned_resident_.insert(plan.adapters[i]);
    }
  }

  // The step's inputs, sequences in plan order, each one's tokens contiguous.
  const int32_t max_blocks = model_->capacity().max_blocks_per_seq;
  model::StepInput input;
  std::vector<int32_t> token_slots;
  std::vector<Sequence*> sampled;
  for (size_t row = 0; row < plan.seqs.size(); ++row) {
    const sched::ScheduledSeq& s = plan.seqs[row];
    Sequence* seq = by_id[s.id];
    if (absl::Status st = seq->table.Reserve(s.reserve_tokens, &blocks_); !st.ok()) {
      Fail(absl::InternalError(
          absl::StrCat("scheduler planned more KV blocks than are free: ", st.message())));
      return true;
    }
    const int32_t slot = s.adapter == sched::kNoAdapter ? -1 : slot_of[s.adapter];
    for (int32_t p = s.start; p < s.start + s.num_tokens; ++p) {
      input.token_ids.push_back(seq->tokens[p]);
      input.positions.push_back(p);
      input.slot_mapping.push_back(*seq->table.SlotOf(p));  // reserved just above
      input.token_seq.push_back(static_cast<int32_t>(row));
      token_slots.push_back(slot);
    }
    input.context_lens.push_back(s.start + s.num_tokens);
    const std::vector<int32_t>& blocks = seq->table.blocks();
    input.block_tables.resize(input.block_tables.size() + max_blocks, 0);
    std::copy(blocks.begin(), blocks.end(), input.block_tables.end() - max_blocks);
    if (s.samples) {
      input.logit_rows.push_back(static_cast<int32_t>(input.token_ids.size()) - 1);
      input.sampling.push_back(SamplingRowOf(seq->request.sampling, seq->seed, seq->generated,
                                             seq->request.sampling.top_logprobs));
      sampled.push_back(seq);
    }
  }
  if (!plan.adapters.empty()) input.lora = lora::BuildLoraBatch(token_slots);
  spdlog::debug("engine: step {}: {} seqs, {} tokens, {} adapters, {} sampled", loop_stats_.steps,
                plan.seqs.size(), plan.num_tokens, plan.adapters.size(), sampled.size());

  // The tokens are picked where the logits are (on the GPU with the CUDA executor): only the
  // picks and the requested log-probabilities come back.
  absl::StatusOr<std::vector<ops::SampledToken>> picks = model_->ForwardSample(input);
  if (!picks.ok()) {
    Fail(picks.status());
    return true;
  }
  ++loop_stats_.steps;
  for (const sched::ScheduledSeq& s : plan.seqs) by_id[s.id]->num_computed = s.start + s.num_tokens;

  const absl::Time sampled_at = absl::Now();
  std::vector<std::pair<uint64_t, FinishReason>> finished;
  for (size_t i = 0; i < sampled.size(); ++i) {
    Sequence* seq = sampled[i];
    const SamplingParams& params = seq->request.sampling;
    const SampleResult r = ToSampleResult((*picks)[i], params.top_logprobs);
    TokenEvent event;
    event.token_id = r.token;
    if (params.logprobs || params.top_logprobs > 0) event.logprob = r.logprob;
    event.top_logprobs = r.top_logprobs;
    seq->tokens.push_back(r.token);
    ++seq->generated;
    ++loop_stats_.generated_tokens_total;
    if (!seq->first_token) seq->first_token = sampled_at;
    seq->sink->OnTokens({event});

    const bool eos =
        !params.ignore_eos && std::find(spec_.eos_token_ids.begin(), spec_.eos_token_ids.end(),
                                        int64_t{r.token}) != spec_.eos_token_ids.end();
    const bool stop = std::find(params.stop_token_ids.begin(), params.stop_token_ids.end(),
                                r.token) != params.stop_token_ids.end();
    if (eos) {
      finished.emplace_back(seq->id, FinishReason::kEos);
    } else if (stop) {
      finished.emplace_back(seq->id, FinishReason::kStop);
    } else if (seq->generated >= params.max_new_tokens) {
      finished.emplace_back(seq->id, FinishReason::kLength);
    }
  }
  for (const auto& [id, reason] : finished) Finish(TakeRunning(id), reason, absl::OkStatus());
  return true;
}

void EngineImpl::Finish(std::unique_ptr<Sequence> seq, FinishReason reason,
                        const absl::Status& status) {
  seq->table.FreeAll(&blocks_);
  const absl::Time now = absl::Now();
  Usage usage;
  usage.prompt_tokens = seq->prompt_len;
  usage.completion_tokens = seq->generated;
  usage.queue_time_s = absl::ToDoubleSeconds(seq->first_scheduled.value_or(now) - seq->submitted);
  usage.time_to_first_token_s =
      seq->first_token ? absl::ToDoubleSeconds(*seq->first_token - seq->submitted) : 0.0;
  usage.total_time_s = absl::ToDoubleSeconds(now - seq->submitted);
  ++loop_stats_.requests_finished;
  if (reason == FinishReason::kCancelled) ++loop_stats_.requests_cancelled;
  spdlog::info(
      "request {} id='{}' adapter='{}' prompt={} completion={} ttft={:.3f}s total={:.3f}s "
      "reason={}{}{}",
      seq->id, seq->request.request_id, seq->request.adapter, usage.prompt_tokens,
      usage.completion_tokens, usage.time_to_first_token_s, usage.total_time_s,
      FinishReasonName(reason), status.ok() ? "" : ": ", std::string(status.message()));
  // The adapter is released before the sink hears of the end, so a client that unloads the
  // adapter right after its stream finishes never finds it still in use.
  seq->adapter = lora::AdapterRef();
  seq->sink->OnFinish(reason, status, usage);
  seq.reset();
  absl::MutexLock lock(&mu_);
  --in_flight_;
}

void EngineImpl::FinishAll(FinishReason reason, const absl::Status& status) {
  std::vector<std::unique_ptr<Sequence>> all;
  for (auto& seq : running_) all.push_back(std::move(seq));
  for (auto& seq : waiting_) all.push_back(std::move(seq));
  running_.clear();
  waiting_.clear();
  for (auto& seq : all) Finish(std::move(seq), reason, status);
}

void EngineImpl::Fail(const absl::Status& status) {
  spdlog::error("engine: step failed, the executor is unhealthy: {}", status.ToString());
  failure_ = status;
  {
    absl::MutexLock lock(&mu_);
    healthy_ = false;
  }
  FinishAll(FinishReason::kError, status);
}

void EngineImpl::CancelById(uint64_t id) {
  std::unique_ptr<Sequence> seq = TakeRunning(id);
  if (!seq) seq = TakeWaiting(id);
  if (seq) Finish(std::move(seq), FinishReason::kCancelled, absl::OkStatus());
}

std::unique_ptr<Sequence> EngineImpl::TakeRunning(uint64_t id) {
  auto it =
      std::find_if(running_.begin(), running_.end(), [id](const auto& s) { return s->id == id; });
  if (it == running_.end()) return nullptr;
  std::unique_ptr<Sequence> seq = std::move(*it);
  running_.erase(it);
  return seq;
}

std::unique_ptr<Sequence> EngineImpl::TakeWaiting(uint64_t id) {
  auto it =
      std::find_if(waiting_.begin(), waiting_.end(), [id](const auto& s) { return s->id == id; });
  if (it == waiting_.end()) return nullptr;
  std::unique_ptr<Sequence> seq = std::move(*it);
  waiting_.erase(it);
  return seq;
}

void EngineImpl::PublishStats() {
  loop_stats_.running_seqs = static_cast<int64_t>(running_.size());
  loop_stats_.waiting_seqs = static_cast<int64_t>(waiting_.size());
  loop_stats_.kv_blocks_used = blocks_.num_used();
  if (slots_) {
    loop_stats_.adapter_slots_used = slots_->used_slots();
    loop_stats_.resident_adapters = slots_->resident_names();
  }
  absl::MutexLock lock(&mu_);
  stats_ = loop_stats_;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const config::Config& config,
                                                       lora::AdapterRegistry* registry) {
  if (registry == nullptr) return absl::InvalidArgumentError("Engine::Create: registry is null");
  LORAPLEX_ASSIGN_OR_RETURN(model::ModelSpec spec, model::LoadModelSpec(config.model.path));
  const config::EngineConfig& ec = config.engine;
  if (ec.kv_block_size <= 0 || ec.max_batch_tokens <= 0 || ec.max_running_seqs <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: kv_block_size (", ec.kv_block_size, "), max_batch_tokens (", ec.max_batch_tokens,
        ") and max_running_seqs (", ec.max_running_seqs, ") must be > 0"));
  }
  const int64_t max_seq_len =
      config.model.max_seq_len > 0 ? config.model.max_seq_len : spec.max_position_embeddings;
  if (max_seq_len <= 0 || max_seq_len > spec.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.max_seq_len ", max_seq_len,
        " must be in [1, max_position_embeddings = ", spec.max_position_embeddings, "]"));
  }
  int64_t kv_tokens = ec.kv_cache_tokens;
  if (kv_tokens == 0)
    kv_tokens =
        std::max(max_seq_len, std::min(ec.max_running_seqs * max_seq_len, kDefaultKvTokensCap));
  if (kv_tokens < max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("engine.kv_cache_tokens ", kv_tokens,
                                                   " cannot hold one sequence of max_seq_len ",
                                                   max_seq_len));
  }
  const int64_t num_blocks = kv::BlocksForTokens(kv_tokens, static_cast<int32_t>(ec.kv_block_size));

  LORAPLEX_ASSIGN_OR_RETURN(const Device device, ops::ResolveExecutor(ec.executor));
  const std::string executor_name = device == Device::kCuda ? "cuda" : "cpu";
  absl::StatusOr<std::unique_ptr<ops::Ops>> ops = ops::CreateOps(device);
  if (!ops.ok()) return Annotate(ops.status(), absl::StrCat("engine.executor '", ec.executor, "'"));

  std::unique_ptr<lora::SlotPool> slots;
  if (config.lora.adapter_slots > 0) {
    LORAPLEX_ASSIGN_OR_RETURN(
        slots,
        lora::SlotPool::Create(ops->get(), spec, static_cast<int32_t>(config.lora.adapter_slots),
                               static_cast<int32_t>(config.lora.max_rank)));
  }
  model::ModelCapacity capacity;
  capacity.max_tokens = static_cast<int32_t>(ec.max_batch_tokens);
  capacity.max_seqs = static_cast<int32_t>(ec.max_running_seqs);
  capacity.num_kv_blocks = static_cast<int32_t>(num_blocks);
  capacity.kv_block_size = static_cast<int32_t>(ec.kv_block_size);
  capacity.graphs = ec.cuda_graphs;
  capacity.max_blocks_per_seq =
      static_cast<int32_t>(kv::BlocksForTokens(max_seq_len, capacity.kv_block_size));
  LORAPLEX_ASSIGN_OR_RETURN(
      std::unique_ptr<model::LlamaModel> model,
      model::LlamaModel::Load(config.model.path, spec, ops->get(), slots.get(), capacity));
  if (device == Device::kCuda) {
    // Every decode bucket's graph is recorded now, so no request waits for a capture.
    const absl::Time warm_start = absl::Now();
    LORAPLEX_ASSIGN_OR_RETURN(const int graphs, model->WarmUp());
    spdlog::info("engine: recorded {} decode graphs in {:.0f} ms", graphs,
                 absl::ToDoubleMilliseconds(absl::Now() - warm_start));
  }
  spdlog::info(
      "engine: {} executor, {} layers, vocab {}, max_seq_len {}, kv {} blocks x {} tokens, "
      "batch {} tokens / {} seqs, {} adapter slots (max rank {})",
      executor_name, spec.num_layers, spec.vocab_size, max_seq_len, num_blocks, ec.kv_block_size,
      ec.max_batch_tokens, ec.max_running_seqs, config.lora.adapter_slots, config.lora.max_rank);
  return std::unique_ptr<Engine>(new EngineImpl(
      config, registry, std::move(spec), executor_name, max_seq_len,
      static_cast<int32_t>(num_blocks), *std::move(ops), std::move(slots), std::move(model)));
}

}  // namespace loraplex::engine
