// SlotPool: the device tier. A fixed number of adapter slots preallocated on the Ops' device;
// each slot holds one adapter's A and B for every (layer, projection) at its real rank, and a
// device table of LoraSliceWeights per wrapped layer points into them. LRU eviction over
// adapters that are neither pinned nor used by the current step. Engine thread only.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_spec.h"
#include "engine/ops/ops.h"
#include "lora/adapter.h"

namespace loraplex::lora {

// The four LoRA-wrapped layers of a decoder layer, in the order their tables are kept.
enum class WrappedLayer : int { kQkv = 0, kO, kGateUp, kDown };
inline constexpr int kNumWrappedLayers = 4;

class SlotPool {
 public:
  // Allocates num_slots slots sized for max_rank on every projection of `spec`.
  static absl::StatusOr<std::unique_ptr<SlotPool>> Create(ops::Ops* ops, const model::ModelSpec& spec,
                                                          int32_t num_slots, int32_t max_rank);
  ~SlotPool();

  // Makes each adapter resident and returns its slot, in the order given. Adapters already in a
  // slot stay; others take a free slot or evict the least recently used adapter that is not
  // pinned and not in `adapters`. A reused slot's table entries are rewritten for every module
  // (rank 0 where the new adapter has none), so nothing of the previous adapter is ever read.
  // RESOURCE_EXHAUSTED when more distinct adapters are asked for than can be made resident.
  absl::StatusOr<std::vector<int32_t>> EnsureResident(const std::vector<const LoadedAdapter*>& adapters,
                                                      const std::vector<bool>& pinned);
  // Drops an adapter (by uid) from its slot if resident, e.g. after Unload.
  void Evict(uint64_t uid);

  // The slot table for one wrapped layer of one decoder layer; stable address for the pool's life.
  const ops::LoraModule& module(int64_t layer, WrappedLayer which) const;
  int32_t num_slots() const;
  int32_t max_rank() const;  // the rank every slot is sized for
  // A bound on the rank any table entry of `slot` holds (0 for a slot never written): the adapter
  // there's largest module rank. For LoraSegments::max_rank.
  int32_t slot_rank(int32_t slot) const;
  int32_t used_slots() const;
  std::vector<std::string> resident_names() const;
  int64_t uploads() const;  // adapters copied into slots so far (for tests and metrics)
  // An upload stages its bytes in the Ops' host staging memory with one thread per
  // `bytes_per_thread` (default 4 MiB; at most 8 threads, and no more than the machine has), in
  // chunks of at most `max_bytes` (default 256 MiB; 0: no staging, copies straight from the host
  // tensors). Tests lower both.
  void set_staging_for_test(size_t bytes_per_thread, size_t max_bytes);

 private:
  SlotPool() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loraplex::lora
