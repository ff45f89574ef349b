// AdapterRegistry: the adapters the server knows by name, and the host tier of their weights.
// Loading parses and validates on the caller's thread; a request holds an AdapterRef while it
// runs, and an adapter with live refs cannot be unloaded. Under a host byte budget the parsed
// weights of the least recently used adapters that are neither pinned nor in use are dropped
// (the adapter stays registered) and parsed again from their path by the next Acquire.
// Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "lora/adapter.h"

namespace loraplex::lora {

struct AdapterInfo {
  std::string name;
  std::string path;
  int32_t rank = 0;
  float alpha = 0.0f;
  std::vector<std::string> target_modules;
  bool pinned = false;
  int64_t active_requests = 0;
  size_t weight_bytes = 0;
  bool host_resident = false;  // parsed weights in host memory (else parsed again on use)
};

// Keeps an adapter loaded while held. Copyable; releasing the last copy ends the use.
class AdapterRef {
 public:
  AdapterRef() = default;
  const LoadedAdapter* get() const { return adapter_.get(); }
  const LoadedAdapter* operator->() const { return adapter_.get(); }
  explicit operator bool() const { return adapter_ != nullptr; }
  bool pinned() const { return pinned_; }

 private:
  friend class AdapterRegistry;
  std::shared_ptr<const LoadedAdapter> adapter_;
  std::shared_ptr<void> use_;  // decrements the entry's use count when the last copy goes
  bool pinned_ = false;
};

class AdapterRegistry {
 public:
  // host_budget_bytes: the most parsed weight bytes kept for adapters that are neither pinned nor
  // in use (0: no limit). Pinned and in-use adapters always stay and may exceed it.
  AdapterRegistry(model::ModelSpec spec, LoraLimits limits, DType weights_dtype, int64_t max_adapters,
                  size_t host_budget_bytes = 0);

  // NOT_FOUND / INVALID_ARGUMENT / FAILED_PRECONDITION from LoadPeftAdapter; ALREADY_EXISTS if
  // the name is taken; INVALID_ARGUMENT for a bad name; RESOURCE_EXHAUSTED past max_adapters.
  // A failed load changes nothing.
  absl::Status Load(const std::string& name, const std::string& path, bool pinned = false);
  // NOT_FOUND if unknown; FAILED_PRECONDITION while requests use it.
  absl::Status Unload(const std::string& name);
  // NOT_FOUND if unknown. An adapter whose weights left the host tier is parsed again from its
  // path first (on this thread); FAILED_PRECONDITION naming the adapter if that fails (files
  // removed or changed into something invalid): the adapter stays registered.
  absl::StatusOr<AdapterRef> Acquire(const std::string& name);
  std::vector<AdapterInfo> List() const;
  size_t host_bytes() const;  // parsed weight bytes held now
  const model::ModelSpec& spec() const { return spec_; }
  const LoraLimits& limits() const { return limits_; }

 private:
  struct Entry {
    std::shared_ptr<const LoadedAdapter> adapter;  // null: dropped from the host tier
    AdapterInfo info;  // as of the last parse; info.pinned is the entry's flag
    std::shared_ptr<std::atomic<int64_t>> uses;
    int64_t last_use = 0;
  };
  // Drops the parsed weights of least recently used entries that are neither pinned nor in use
  // until the held bytes fit the budget.
  void TrimLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  AdapterRef RefLocked(Entry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const model::ModelSpec spec_;
  const LoraLimits limits_;
  const DType weights_dtype_;
  const int64_t max_adapters_;
  const size_t host_budget_bytes_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  size_t host_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tick_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace loraplex::lora
