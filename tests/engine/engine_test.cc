#include "engine/engine.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "engine/model/model_spec.h"
#include "lora/registry.h"
#include "tests/testing/tiny_model.h"

namespace loraplex::engine {
namespace {

using testing::TinyAdapterOptions;
using testing::TinyModelOptions;

constexpr absl::Duration kWait = absl::Seconds(60);

// Collects one request's output; optionally cancels it after `cancel_after` tokens.
class Collector : public TokenSink {
 public:
  void OnTokens(const std::vector<TokenEvent>& events) override {
    absl::MutexLock lock(&mu_);
    for (const TokenEvent& e : events) events_.push_back(e);
    if (cancel_after_ > 0 && static_cast<int>(events_.size()) == cancel_after_) {
      // The id is set right after Submit returns; the engine may get here first.
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](uint64_t* id) { return *id != 0; }, &id_),
                           kWait);
      engine_->Cancel(id_);
    }
  }
  void OnFinish(FinishReason reason, const absl::Status& status, const Usage& usage) override {
    absl::MutexLock lock(&mu_);
    reason_ = reason;
    status_ = status;
    usage_ = usage;
    ++finishes_;
    done_.Notify();
  }

  void CancelAfter(int tokens, Engine* engine) {
    absl::MutexLock lock(&mu_);
    cancel_after_ = tokens;
    engine_ = engine;
  }
  void SetId(uint64_t id) {
    absl::MutexLock lock(&mu_);
    id_ = id;
  }
  bool Wait() { return done_.WaitForNotificationWithTimeout(kWait); }
  std::vector<int32_t> tokens() const {
    absl::MutexLock lock(&mu_);
    std::vector<int32_t> out;
    for (const TokenEvent& e : events_) out.push_back(e.token_id);
    return out;
  }
  std::vector<TokenEvent> events() const {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  FinishReason reason() const {
    absl::MutexLock lock(&mu_);
    return *reason_;
  }
  absl::Status status() const {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  Usage usage() const {
    absl::MutexLock lock(&mu_);
    return usage_;
  }
  int finishes() const {
    absl::MutexLock lock(&mu_);
    return finishes_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<TokenEvent> events_ ABSL_GUARDED_BY(mu_);
  std::optional<FinishReason> reason_ ABSL_GUARDED_BY(mu_);
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  Usage usage_ ABSL_GUARDED_BY(mu_);
  int finishes_ ABSL_GUARDED_BY(mu_) = 0;
  int cancel_after_ ABSL_GUARDED_BY(mu_) = 0;
  Engine* engine_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t id_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Notification done_;
};

// A tiny F32 model and three adapters (different seeds and ranks) written once per process.
struct Fixture {
  std::string model_dir;
  std::vector<std::string> adapter_dirs;
  model::ModelSpec spec;

  static const Fixture& Get() {
    static const Fixture* fixture = [] {
      auto* f = new Fixture;
      const std::string root = testing::MakeTempDir("engine-test");
      f->model_dir = root + "/model";
      TinyModelOptions model;
      REQUIRE(testing::WriteTinyModel(f->model_dir, model).ok());
      f->spec = testing::TinyModelSpec(model);
      for (int i = 0; i < 3; ++i) {
        TinyAdapterOptions adapter;
        adapter.seed = 100 + i;
        adapter.r = 2 + 2 * i;
        adapter.alpha = 16.0;
        f->adapter_dirs.push_back(root + "/adapter" + std::to_string(i));
        REQUIRE(testing::WriteTinyAdapter(f->adapter_dirs.back(), f->spec, adapter).ok());
      }
      return f;
    }();
    return *fixture;
  }
};

const std::vector<std::string> kAdapters = {"a0", "a1", "a2"};

config::Config BaseConfig() {
  config::Config config;
  config.model.path = Fixture::Get().model_dir;
  config.engine.executor = "cpu";
  config.engine.kv_block_size = 4;
  config.engine.max_batch_tokens = 32;
  config.engine.max_running_seqs = 16;
  config.lora.adapter_slots = 4;
  config.lora.max_rank = 8;
  return config;
}

// An engine with its registry (which must outlive it).
struct Harness {
  std::unique_ptr<lora::AdapterRegistry> registry;
  std::unique_ptr<Engine> engine;

  explicit Harness(const config::Config& config) {
    const Fixture& f = Fixture::Get();
    lora::LoraLimits limits;
    limits.max_rank = config.lora.max_rank;
    limits.target_modules = config.lora.target_modules;
    registry = std::make_unique<lora::AdapterRegistry>(f.spec, limits, DType::kF32, 16);
    for (size_t i = 0; i < kAdapters.size(); ++i)
      REQUIRE(registry->Load(kAdapters[i], f.adapter_dirs[i]).ok());
    absl::StatusOr<std::unique_ptr<Engine>> created = Engine::Create(config, registry.get());
    REQUIRE(created.ok());
    engine = *std::move(created);
  }
  ~Harness() { engine.reset(); }

  std::shared_ptr<Collector> Start(const GenerateRequest& request) {
    auto sink = std::make_shared<Collector>();
    absl::StatusOr<uint64_t> id = engine->Submit(request, sink);
    REQUIRE(id.ok());
    sink->SetId(*id);
    return sink;
  }
  std::vector<int32_t> RunAlone(const GenerateRequest& request) {
    std::shared_ptr<Collector> sink = Start(request);
    REQUIRE(sink->Wait());
    return sink->tokens();
  }
  // Stats are published after each loop iteration, a moment after a sink hears OnFinish.
  EngineStats IdleStats() {
    const absl::Time deadline = absl::Now() + kWait;
    EngineStats stats = engine->Stats();
    while ((stats.running_seqs > 0 || stats.waiting_seqs > 0) && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(1));
      stats = engine->Stats();
    }
    return stats;
  }
};

GenerateRequest Request(const std::string& adapter, std::vector<int32_t> prompt, int32_t max_new,
                        float temperature = 0.0f) {
  GenerateRequest r;
  r.adapter = adapter;
  r.prompt_ids = std::move(prompt);
  r.sampling.max_new_tokens = max_new;
  r.sampling.temperature = temperature;
  r.sampling.ignore_eos = true;
  return r;
}

std::vector<int32_t> Prompt(int length, int salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < length; ++i) p.push_back(3 + (i * 7 + salt * 13) % 60);
  return p;
}

// Requests over the base model and every adapter, prompts from 3 to 40 tokens (longer than the
// 32-token step budget, so some prefills are chunked).
std::vector<GenerateRequest> MixedRequests(int count, int32_t max_new) {
  std::vector<GenerateRequest> requests;
  const std::vector<std::string> adapters = {"", "a0", "a1", "a2"};
  for (int i = 0; i < count; ++i) {
    requests.push_back(Request(adapters[i % 4], Prompt(3 + (i * 11) % 38, i / 4), max_new));
  }
  return requests;
}

// Runs every request alone on `solo`, then all at once on `batched`, and checks the tokens agree.
void ExpectBatchedMatchesSolo(Harness& solo, Harness& batched,
                              const std::vector<GenerateRequest>& requests) {
  std::vector<std::vector<int32_t>> expected;
  for (const GenerateRequest& r : requests) expected.push_back(solo.RunAlone(r));
  std::vector<std::shared_ptr<Collector>> sinks;
  for (const GenerateRequest& r : requests) sinks.push_back(batched.Start(r));
  for (size_t i = 0; i < requests.size(); ++i) {
    REQUIRE(sinks[i]->Wait());
    INFO("request " << i << " adapter '" << requests[i].adapter << "'");
    CHECK(sinks[i]->reason() == FinishReason::kLength);
    CHECK(sinks[i]->tokens() == expected[i]);
  }
}

TEST_CASE("Adapters change the greedy output of the same prompt") {
  Harness h(BaseConfig());
  const std::vector<int32_t> base = h.RunAlone(Request("", Prompt(9, 1), 8));
  REQUIRE(base.size() == 8);
  for (const std::string& a : kAdapters) CHECK(h.RunAlone(Request(a, Prompt(9, 1), 8)) != base);
}

TEST_CASE("Concurrent requests of different adapters give exactly the tokens each gives alone") {
  Harness solo(BaseConfig());
  Harness batched(BaseConfig());
  ExpectBatchedMatchesSolo(solo, batched, MixedRequests(12, 10));
  const EngineStats stats = batched.IdleStats();
  CHECK(stats.requests_finished == 12);
  CHECK(stats.kv_blocks_used == 0);
}

TEST_CASE("More distinct adapters than device slots still all complete with their solo tokens") {
  config::Config one_slot = BaseConfig();
  one_slot.lora.adapter_slots = 1;
  Harness solo(BaseConfig());
  Harness batched(one_slot);
  ExpectBatchedMatchesSolo(solo, batched, MixedRequests(10, 6));
  CHECK(batched.IdleStats().adapter_slots_used == 1);
}

TEST_CASE("KV pressure preempts sequences and the results still match solo runs") {
  config::Config tight = BaseConfig();
  tight.model.max_seq_len = 64;
  tight.engine.kv_cache_tokens = 64;  // 16 blocks of 4: one full-length sequence
  Harness solo(BaseConfig());
  Harness batched(tight);
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 6; ++i) requests.push_back(Request(i % 2 ? "a1" : "", Prompt(6 + i, i), 24));
  ExpectBatchedMatchesSolo(solo, batched, requests);
  const EngineStats stats = batched.IdleStats();
  CHECK(stats.preemptions > 0);
  CHECK(stats.kv_blocks_used == 0);
  CHECK(stats.kv_blocks_total == 16);
  // Recomputation after preemption counts neither prompt nor generated tokens twice.
  int64_t prompt_tokens = 0;
  for (const GenerateRequest& r : requests)
    prompt_tokens += static_cast<int64_t>(r.prompt_ids.size());
  CHECK(stats.prompt_tokens_total == prompt_tokens);
  CHECK(stats.generated_tokens_total == 24 * static_cast<int64_t>(requests.size()));
}

TEST_CASE("EvictAdapter frees the device slot of an unloaded adapter") {
  Harness h(BaseConfig());
  h.RunAlone(Request("a1", Prompt(5, 2), 2));
  auto resident = [&h] {
    const std::vector<std::string> names = h.engine->Stats().resident_adapters;
    return std::find(names.begin(), names.end(), "a1") != names.end();
  };
  const absl::Time deadline = absl::Now() + kWait;
  while (!resident() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  REQUIRE(resident());
  uint64_t uid = 0;
  {
    absl::StatusOr<lora::AdapterRef> ref = h.registry->Acquire("a1");
    REQUIRE(ref.ok());
    uid = (*ref)->uid;
  }
  REQUIRE(h.registry->Unload("a1").ok());
  h.engine->EvictAdapter(uid);
  while (resident() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  CHECK(!resident());
  CHECK(h.engine->Stats().adapter_slots_used == 0);
}

TEST_CASE("Seeded sampling gives the same tokens alone and in a batch") {
  Harness solo(BaseConfig());
  Harness batched(BaseConfig());
  GenerateRequest r = Request("a1", Prompt(7, 3), 12, /*temperature=*/1.0f);
  r.sampling.seed = 1234;
  const std::vector<int32_t> alone = solo.RunAlone(r);
  std::vector<std::shared_ptr<Collector>> others;
  for (const GenerateRequest& o : MixedRequests(6, 8)) others.push_back(batched.Start(o));
  std::shared_ptr<Collector> sink = batched.Start(r);
  REQUIRE(sink->Wait());
  CHECK(sink->tokens() == alone);
  GenerateRequest other_seed = r;
  other_seed.sampling.seed = 99;
  // 12 draws at temperature 1 from a 64-token vocabulary: two seeds agreeing on all is negligible.
  CHECK(solo.RunAlone(other_seed) != alone);
  for (auto& o : others) REQUIRE(o->Wait());
}

TEST_CASE("Cancelling mid-generation reports kCancelled and frees every KV block") {
  Harness h(BaseConfig());
  auto sink = std::make_shared<Collector>();
  sink->CancelAfter(3, h.engine.get());
  absl::StatusOr<uint64_t> id = h.engine->Submit(Request("a0", Prompt(10, 2), 200), sink);
  REQUIRE(id.ok());
  sink->SetId(*id);
  REQUIRE(sink->Wait());
  CHECK(sink->reason() == FinishReason::kCancelled);
  CHECK(sink->tokens().size() == 3);
  CHECK(sink->usage().completion_tokens == 3);
  const EngineStats stats = h.IdleStats();
  CHECK(stats.kv_blocks_used == 0);
  CHECK(stats.requests_cancelled == 1);
  h.engine->Cancel(*id);  // already finished: ignored
  absl::SleepFor(absl::Milliseconds(20));
  CHECK(sink->finishes() == 1);
}

TEST_CASE("Submit refuses an unknown adapter with NOT_FOUND") {
  Harness h(BaseConfig());
  absl::StatusOr<uint64_t> id =
      h.engine->Submit(Request("nope", {5, 6}, 4), std::make_shared<Collector>());
  CHECK(id.status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("Submit refuses bad prompts and sampling values with INVALID_ARGUMENT") {
  Harness h(BaseConfig());
  struct Bad {
    const char* name;
    void (*mutate)(GenerateRequest&);
  };
  const std::vector<Bad> cases = {
      {"empty prompt", [](GenerateRequest& r) { r.prompt_ids.clear(); }},
      {"token outside the vocabulary", [](GenerateRequest& r) { r.prompt_ids[1] = 64; }},
      {"negative token", [](GenerateRequest& r) { r.prompt_ids[0] = -1; }},
      {"prompt + max_new_tokens over max_seq_len",
       [](GenerateRequest& r) { r.sampling.max_new_tokens = 255; }},
      {"negative temperature", [](GenerateRequest& r) { r.sampling.temperature = -0.5f; }},
      {"top_p 0", [](GenerateRequest& r) { r.sampling.top_p = 0.0f; }},
      {"top_p above 1", [](GenerateRequest& r) { r.sampling.top_p = 1.5f; }},
      {"negative top_k", [](GenerateRequest& r) { r.sampling.top_k = -1; }},
      {"max_new_tokens 0", [](GenerateRequest& r) { r.sampling.max_new_tokens = 0; }},
      {"top_logprobs 21", [](GenerateRequest& r) { r.sampling.top_logprobs = 21; }},
  };
  for (const Bad& bad : cases) {
    SECTION(bad.name) {
      GenerateRequest r = Request("a0", {5, 6}, 4);
      bad.mutate(r);
      CHECK(h.engine->Submit(r, std::make_shared<Collector>()).status().code() ==
            absl::StatusCode::kInvalidArgument);
    }
  }
  SECTION("the limits themselves are accepted") {
    GenerateRequest longest = Request("a0", {5, 6}, 254);  // 2 + 254 = max_seq_len 256
    longest.sampling.top_p = 1.0f;
    longest.sampling.temperature = 0.0f;
    auto sink = std::make_shared<Collector>();
    absl::StatusOr<uint64_t> id = h.engine->Submit(longest, sink);
    REQUIRE(id.ok());
    h.engine->Cancel(*id);
    REQUIRE(sink->Wait());

    GenerateRequest most_logprobs = Request("a0", {5, 6}, 2);
    most_logprobs.sampling.top_logprobs = 20;
    auto logprob_sink = h.Start(most_logprobs);
    REQUIRE(logprob_sink->Wait());
    CHECK(logprob_sink->events()[0].top_logprobs.size() == 20);
  }
}

TEST_CASE("A request stops at max_new_tokens with kLength and reports usage") {
  Harness h(BaseConfig());
  auto sink = h.Start(Request("", Prompt(5, 0), 7));
  REQUIRE(sink->Wait());
  CHECK(sink->reason() == FinishReason::kLength);
  CHECK(sink->status().ok());
  CHECK(sink->tokens().size() == 7);
  CHECK(sink->usage().prompt_tokens == 5);
  CHECK(sink->usage().completion_tokens == 7);
  CHECK(sink->usage().total_time_s >= sink->usage().time_to_first_token_s);
}

TEST_CASE("A request stops at a stop token with kStop, the stop token included") {
  Harness h(BaseConfig());
  const std::vector<int32_t> full = h.RunAlone(Request("a2", Prompt(8, 5), 10));
  GenerateRequest r = Request("a2", Prompt(8, 5), 10);
  r.sampling.stop_token_ids = {full[3]};
  auto sink = h.Start(r);
  REQUIRE(sink->Wait());
  CHECK(sink->reason() == FinishReason::kStop);
  const std::vector<int32_t> got = sink->tokens();
  REQUIRE(!got.empty());
  CHECK(got.back() == full[3]);
  CHECK(got.size() <= 4);
  CHECK(std::vector<int32_t>(full.begin(), full.begin() + got.size()) == got);
}

TEST_CASE("A request stops at the model's eos token with kEos unless ignore_eos") {
  // Same weights, with eos set to a token greedy decoding is known to produce.
  Harness h(BaseConfig());
  const std::vector<int32_t> full = h.RunAlone(Request("", Prompt(6, 4), 6));
  const std::string eos_dir = testing::MakeTempDir("engine-eos");
  TinyModelOptions options;
  options.config_overrides_json = "{\"eos_token_id\": " + std::to_string(full[2]) + "}";
  REQUIRE(testing::WriteTinyModel(eos_dir, options).ok());
  config::Config config = BaseConfig();
  config.model.path = eos_dir;
  Harness eos(config);
  REQUIRE(eos.engine->spec().eos_token_ids == std::vector<int64_t>{full[2]});

  GenerateRequest r = Request("", Prompt(6, 4), 6);
  r.sampling.ignore_eos = false;
  auto sink = eos.Start(r);
  REQUIRE(sink->Wait());
  CHECK(sink->reason() == FinishReason::kEos);
  CHECK(sink->tokens().back() == full[2]);
  CHECK(sink->tokens().size() <= 3);
  CHECK(eos.RunAlone(Request("", Prompt(6, 4), 6)) == full);  // ignore_eos
}

TEST_CASE("Drain lets running requests finish and then refuses new ones with UNAVAILABLE") {
  Harness h(BaseConfig());
  std::vector<std::shared_ptr<Collector>> sinks;
  for (const GenerateRequest& r : MixedRequests(4, 5)) sinks.push_back(h.Start(r));
  h.engine->Drain(kWait);
  for (auto& s : sinks) {
    REQUIRE(s->Wait());
    CHECK(s->reason() == FinishReason::kLength);
  }
  CHECK(h.engine->Submit(Request("", {5}, 2), std::make_shared<Collector>()).status().code() ==
        absl::StatusCode::kUnavailable);
}

TEST_CASE("Destroying the engine cancels the requests it still holds") {
  auto h = std::make_unique<Harness>(BaseConfig());
  auto sink = h->Start(Request("a0", Prompt(4, 1), 250));
  h.reset();
  REQUIRE(sink->Wait());
  CHECK((sink->reason() == FinishReason::kCancelled || sink->reason() == FinishReason::kLength));
  CHECK(sink->finishes() == 1);
}

TEST_CASE("Engine::Create refuses configs it cannot serve with INVALID_ARGUMENT") {
  const model::ModelSpec& spec = Fixture::Get().spec;
  lora::AdapterRegistry registry(spec, lora::LoraLimits{}, DType::kF32, 4);
  struct Bad {
    const char* name;
    void (*mutate)(config::Config&);
  };
  const std::vector<Bad> cases = {
      {"unknown executor", [](config::Config& c) { c.engine.executor = "tpu"; }},
      {"max_seq_len above max_position_embeddings",
       [](config::Config& c) { c.model.max_seq_len = 257; }},
      {"kv cache smaller than one sequence",
       [](config::Config& c) { c.engine.kv_cache_tokens = 100; }},
      {"zero block size", [](config::Config& c) { c.engine.kv_block_size = 0; }},
  };
  for (const Bad& bad : cases) {
    SECTION(bad.name) {
      config::Config config = BaseConfig();
      bad.mutate(config);
      CHECK(Engine::Create(config, &registry).status().code() ==
            absl::StatusCode::kInvalidArgument);
    }
  }
  SECTION("a missing model directory is NOT_FOUND") {
    config::Config config = BaseConfig();
    config.model.path = Fixture::Get().model_dir + "/missing";
    CHECK(Engine::Create(config, &registry).status().code() == absl::StatusCode::kNotFound);
  }
}

}  // namespace
}  // namespace loraplex::engine
