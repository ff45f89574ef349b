// Engine: owns the model, the KV cache, the scheduler and the device adapter slots, and runs the
// step loop on its own thread. Submit / Cancel / Stats / Drain are thread-safe and never block on
// a forward step; all serving state is touched only by the loop thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "config/config.h"
#include "engine/request.h"

namespace loraplex::lora { class AdapterRegistry; }
namespace loraplex::model { struct ModelSpec; }

namespace loraplex::engine {

struct EngineStats {
  int64_t running_seqs = 0;
  int64_t waiting_seqs = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_used = 0;
  int64_t steps = 0;
  int64_t prompt_tokens_total = 0;
  int64_t generated_tokens_total = 0;
  int64_t requests_finished = 0;
  int64_t requests_cancelled = 0;
  int64_t preemptions = 0;          // running sequences sent back to the queue for lack of KV
  int64_t adapter_slots_total = 0;
  int64_t adapter_slots_used = 0;
  std::vector<std::string> resident_adapters;  // in device slots now
  bool healthy = true;
};

class Engine {
 public:
  // Loads the model named in `config` onto the chosen executor and starts the loop thread.
  // `registry` holds the adapters (it must outlive the engine).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const config::Config& config,
                                                        lora::AdapterRegistry* registry);
  virtual ~Engine() = default;

  // Queues a request. Fails fast, before anything is queued: NOT_FOUND for an unknown adapter,
  // INVALID_ARGUMENT for an empty or too long prompt or bad sampling values, RESOURCE_EXHAUSTED
  // when the queue is full, UNAVAILABLE while draining or unhealthy. On success returns the
  // request's engine id; every later report goes to `sink`.
  virtual absl::StatusOr<uint64_t> Submit(GenerateRequest request, std::shared_ptr<TokenSink> sink) = 0;
  // Stops a request at the next step boundary and frees its KV blocks; its sink gets
  // OnFinish(kCancelled). Unknown or finished ids are ignored.
  virtual void Cancel(uint64_t id) = 0;
  // Frees the device slot of the adapter with this LoadedAdapter::uid at the next step boundary
  // (waking an idle loop). Called by the server after AdapterRegistry::Unload succeeded, so an
  // unloaded adapter leaves the device. Unknown or non-resident uids are ignored.
  virtual void EvictAdapter(uint64_t adapter_uid) = 0;
  virtual EngineStats Stats() const = 0;
  // Stops accepting requests and waits up to `timeout` for running ones; cancels the rest.
  virtual void Drain(absl::Duration timeout) = 0;

  virtual const model::ModelSpec& spec() const = 0;
  virtual std::string executor_name() const = 0;  // "cpu" or "cuda"
  virtual int64_t max_seq_len() const = 0;
};

}  // namespace loraplex::engine
