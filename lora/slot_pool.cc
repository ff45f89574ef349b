#include "lora/slot_pool.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <system_error>
#include <thread>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/core/status.h"
#include "spdlog/spdlog.h"

namespace loraplex::lora {
namespace {

// Region starts are aligned so device kernels can use vector loads on A and B.
constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// An upload stages its bytes in the Ops' host staging memory (page-locked on the GPU) with up to
// this many threads, then copies each tensor from there: a copy from page-locked memory runs at the
// bus's speed, where one from ordinary memory goes through the driver's own staging on the
// calling thread (an 8B rank-16 adapter, 84 MB in 576 copies: 12-16 ms; bench/RESULTS.md).
constexpr unsigned kMaxStagingThreads = 8;
// Staging memory allocated with the pool (up to one slot's bytes): page-locking it took ~50 ms for
// 84 MB on the GPU host, which the first cold adapter waited for when it was allocated on first use.
constexpr size_t kInitialStagingBytes = 128u << 20;
// Larger uploads grow it up to this, then go through it in chunks (a 70B rank-64 adapter is
// ~2.6 GB). Where page-locked memory cannot be had, uploads copy in smaller chunks or straight
// from the host tensors.
constexpr size_t kMaxStagingBytes = 256u << 20;
constexpr size_t kStagingBytesPerThread = 4u << 20;  // fewer threads for smaller adapters (SlotPool::set_staging_for_test)

// The projections each wrapped layer stacks, in slice order.
struct WrappedSlices {
  int count;
  model::Proj projs[3];
};
constexpr WrappedSlices kSlices[kNumWrappedLayers] = {
    {3, {model::Proj::kQ, model::Proj::kK, model::Proj::kV}},
    {1, {model::Proj::kO}},
    {2, {model::Proj::kGate, model::Proj::kUp}},
    {1, {model::Proj::kDown}},
};

}  // namespace

struct SlotPool::Impl {
  struct Slot {
    uint64_t uid = 0;  // 0: free
    std::string name;
    int64_t last_use = 0;
    bool pinned = false;
  };

  ops::Ops* ops = nullptr;
  model::ModelSpec spec;
  int32_t num_slots = 0;
  int32_t max_rank = 0;
  DType dtype = DType::kF32;
  size_t elem = 0;
  std::vector<size_t> region_offset;       // [num_layers * kNumProj] byte offset inside a slot
  std::vector<size_t> b_offset;            // [num_layers * kNumProj] byte offset of B in the region
  std::vector<ops::DeviceMemory> memory;   // [num_slots] each holds every module's A and B
  ops::DeviceMemory tables;                // every (layer, wrapped layer)'s [num_slots][num_slices]
  std::vector<size_t> table_start;         // [num_layers * kNumWrappedLayers] entry index
  std::vector<ops::LoraModule> modules;    // [num_layers * kNumWrappedLayers]
  std::vector<Slot> slots;
  // [num_slots] a bound on the ranks of each slot's table entries (kept across eviction: the
  // entries stay until the next upload rewrites them).
  std::vector<int32_t> table_ranks;
  int64_t tick = 0;
  int64_t uploads = 0;
  void* staging = nullptr;  // Ops::AllocateHostStaging, grown to the largest upload
  size_t staging_bytes = 0;
  size_t staging_bytes_per_thread = kStagingBytesPerThread;
  size_t max_staging_bytes = kMaxStagingBytes;  // 0: no staging (set_staging_for_test)

  ~Impl() {
    if (staging != nullptr) ops->FreeHostStaging(staging);
  }

  // One block of bytes on its way into device memory: a tensor (converted to the pool's dtype if
  // it has another) or raw bytes, staged at `offset`.
  struct Piece {
    const HostTensor* tensor = nullptr;  // null: `raw`
    const void* raw = nullptr;
    size_t bytes = 0;
    size_t offset = 0;
    void* dst = nullptr;
  };

  static size_t ModuleIndex(int64_t layer, model::Proj p) {
    return static_cast<size_t>(layer) * model::kNumProj + static_cast<size_t>(p);
  }

  absl::Status CheckFits(const LoadedAdapter& a) const {
    if (a.modules.size() != static_cast<size_t>(spec.num_layers) * model::kNumProj) {
      return absl::FailedPreconditionError(
          absl::StrCat("adapter '", a.name, "' has ", a.modules.size(), " modules; the base model has ",
                       spec.num_layers * model::kNumProj));
    }
    if (a.max_module_rank > max_rank) {
      return absl::FailedPreconditionError(absl::StrCat("adapter '", a.name, "' has rank ", a.max_module_rank,
                                                        ", above the slot pool's max rank ", max_rank));
    }
    return absl::OkStatus();
  }

  // Writes `t`'s elements in the pool's dtype to `to` (count · elem bytes).
  absl::Status WriteInPoolDtype(const HostTensor& t, void* to) const {
    if (t.dtype() == dtype) {
      std::memcpy(to, t.data(), t.NumBytes());
      return absl::OkStatus();
    }
    const size_t count = static_cast<size_t>(t.shape().NumElements());
    std::vector<float> f(count);
    LORAPLEX_RETURN_IF_ERROR(ConvertToFloat(t.dtype(), t.data(), count, f.data()));
    return ConvertFromFloat(f.data(), count, dtype, to);
  }

  // Writes piece `p` into the staging memory, whose first byte is the piece offset `base_offset`.
  absl::Status Stage(const Piece& p, size_t base_offset) const {
    std::byte* to = static_cast<std::byte*>(staging) + (p.offset - base_offset);
    if (p.tensor != nullptr) return WriteInPoolDtype(*p.tensor, to);
    std::memcpy(to, p.raw, p.bytes);
    return absl::OkStatus();
  }

  // Stages pieces [first, last), which span `total` bytes from the offset of `first`, split over
  // threads by bytes when there are many.
  absl::Status StageAll(const Piece* first, const Piece* last, size_t total) const {
    const size_t base_offset = first->offset;
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    const unsigned threads = static_cast<unsigned>(
        std::clamp<size_t>(total / std::max<size_t>(staging_bytes_per_thread, 1), 1, std::min(kMaxStagingThreads, hw)));
    std::vector<absl::Status> results(threads);
    // Thread i stages the pieces that start in its 1/threads of the bytes (pieces are in offset
    // order and at most a few MB, so the shares stay even).
    auto work = [&](unsigned i) {
      const size_t from = base_offset + total * i / threads, to = base_offset + total * (i + 1) / threads;
      for (const Piece* p = first; p != last; ++p) {
        if (p->offset < from || p->offset >= to) continue;
        absl::Status st = Stage(*p, base_offset);
        if (!st.ok()) {
          results[i] = std::move(st);
          return;
        }
      }
    };
    std::vector<std::thread> pool;
    for (unsigned i = 1; i < threads; ++i) {
      try {
        pool.emplace_back(work, i);
      } catch (const std::system_error&) {
        work(i);  // no thread to be had: this share on the calling thread
      }
    }
    work(0);
    for (std::thread& t : pool) t.join();
    for (absl::Status& st : results) LORAPLEX_RETURN_IF_ERROR(st);
    return absl::OkStatus();
  }

  // Staging memory for an upload of `total` bytes whose largest piece is `largest`: at least that
  // piece, and the whole upload when it fits under max_staging_bytes. False: copy without it.
  bool EnsureStaging(size_t total, size_t largest) {
    if (max_staging_bytes == 0) return false;
    const size_t want = std::max(std::min(total, max_staging_bytes), largest);
    if (staging_bytes >= want) return true;
    absl::StatusOr<void*> grown = ops->AllocateHostStaging(want);
    if (!grown.ok()) {
      spdlog::warn("adapter uploads: no {} bytes of staging memory ({}); {}", want, grown.status().ToString(),
                   staging_bytes >= largest ? "copying in smaller chunks" : "copying from ordinary memory");
      return staging_bytes >= largest;
    }
    if (staging != nullptr) ops->FreeHostStaging(staging);
    staging = *grown;
    staging_bytes = want;
    return true;
  }

  // Copies piece `p` straight from host memory (no staging memory to be had).
  absl::Status CopyDirect(const Piece& p) {
    if (p.tensor == nullptr) return ops->CopyToDevice(p.dst, p.raw, p.bytes);
    if (p.tensor->dtype() == dtype) return ops->CopyToDevice(p.dst, p.tensor->data(), p.bytes);
    std::vector<std::byte> converted(p.bytes);
    LORAPLEX_RETURN_IF_ERROR(WriteInPoolDtype(*p.tensor, converted.data()));
    return ops->CopyToDevice(p.dst, converted.data(), converted.size());
  }

  // Writes `slot`'s weights and rewrites its entry in every table (rank 0 where `a` has no
  // module), so nothing of the slot's previous adapter stays reachable. Returns the weight bytes
  // written. The bytes go through the staging memory, in chunks when they do not fit it whole;
  // the copies have ended when it returns.
  absl::StatusOr<int64_t> Upload(int32_t slot, const LoadedAdapter& a) {
    int64_t bytes = 0;
    auto* base = static_cast<std::byte*>(memory[slot].data());
    std::vector<Piece> pieces;
    size_t total = 0;
    auto add = [&](Piece p) {
      p.offset = total;
      total += (p.bytes + 63) / 64 * 64;
      pieces.push_back(p);
    };
    // The table entries, staged after the weights they point to (same stream: copied after them).
    std::vector<ops::LoraSliceWeights> entries(static_cast<size_t>(spec.num_layers) * kNumWrappedLayers * 3);
    auto entries_of = [&](int64_t l, int w) { return &entries[(static_cast<size_t>(l) * kNumWrappedLayers + w) * 3]; };
    for (int64_t l = 0; l < spec.num_layers; ++l) {
      for (int w = 0; w < kNumWrappedLayers; ++w) {
        ops::LoraSliceWeights* e = entries_of(l, w);
        for (int s = 0; s < kSlices[w].count; ++s) {
          const size_t idx = ModuleIndex(l, kSlices[w].projs[s]);
          const AdapterModule& m = a.modules[idx];
          if (m.rank == 0) continue;
          std::byte* region = base + region_offset[idx];
          const size_t a_bytes = static_cast<size_t>(m.a.shape().NumElements()) * elem;
          const size_t b_bytes = static_cast<size_t>(m.b.shape().NumElements()) * elem;
          add({&m.a, nullptr, a_bytes, 0, region});
          add({&m.b, nullptr, b_bytes, 0, region + b_offset[idx]});
          bytes += static_cast<int64_t>(a_bytes + b_bytes);
          e[s] = {region, region + b_offset[idx], m.rank, m.scale};
        }
      }
    }
    for (int64_t l = 0; l < spec.num_layers; ++l) {
      for (int w = 0; w < kNumWrappedLayers; ++w) {
        const size_t at = table_start[static_cast<size_t>(l) * kNumWrappedLayers + w] +
                          static_cast<size_t>(slot) * kSlices[w].count;
        add({nullptr, entries_of(l, w), sizeof(ops::LoraSliceWeights) * kSlices[w].count, 0,
             static_cast<ops::LoraSliceWeights*>(tables.data()) + at});
      }
    }
    size_t largest = 0;
    for (const Piece& p : pieces) largest = std::max(largest, p.bytes);
    if (!EnsureStaging(total, largest)) {
      for (const Piece& p : pieces) LORAPLEX_RETURN_IF_ERROR(CopyDirect(p));
    } else {
      const size_t chunk = std::min(staging_bytes, std::max(max_staging_bytes, largest));
      for (size_t begin = 0; begin < pieces.size();) {
        size_t end = begin;
        const size_t base_offset = pieces[begin].offset;
        while (end < pieces.size() && pieces[end].offset + pieces[end].bytes - base_offset <= chunk) ++end;
        const size_t span = pieces[end - 1].offset + pieces[end - 1].bytes - base_offset;
        LORAPLEX_RETURN_IF_ERROR(StageAll(pieces.data() + begin, pieces.data() + end, span));
        for (size_t i = begin; i < end; ++i) {
          const Piece& p = pieces[i];
          LORAPLEX_RETURN_IF_ERROR(
              ops->CopyToDevice(p.dst, static_cast<std::byte*>(staging) + (p.offset - base_offset), p.bytes));
        }
        begin = end;
        // The copies read the staging memory, which the next chunk rewrites.
        if (begin < pieces.size()) LORAPLEX_RETURN_IF_ERROR(ops->Synchronize());
      }
    }
    // The upload has landed (and the staging memory is free for the next) when this returns.
    LORAPLEX_RETURN_IF_ERROR(ops->Synchronize());
    ++uploads;
    return bytes;
  }
};

absl::StatusOr<std::unique_ptr<SlotPool>> SlotPool::Create(ops::Ops* ops, const model::ModelSpec& spec,
                                                           int32_t num_slots, int32_t max_rank) {
  if (num_slots <= 0) return absl::InvalidArgumentError(absl::StrCat("slot pool: num_slots ", num_slots, " must be > 0"));
  if (max_rank <= 0) return absl::InvalidArgumentError(absl::StrCat("slot pool: max_rank ", max_rank, " must be > 0"));
  auto impl = std::make_unique<Impl>();
  impl->ops = ops;
  impl->spec = spec;
  impl->num_slots = num_slots;
  impl->max_rank = max_rank;
  impl->dtype = ops->compute_dtype();
  impl->elem = DTypeSize(impl->dtype);

  size_t slot_bytes = 0;
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    for (int p = 0; p < model::kNumProj; ++p) {
      const auto proj = static_cast<model::Proj>(p);
      const size_t a_bytes = AlignUp(static_cast<size_t>(max_rank * model::ProjInFeatures(spec, proj)) * impl->elem);
      const size_t b_bytes = static_cast<size_t>(max_rank * model::ProjOutFeatures(spec, proj)) * impl->elem;
      impl->region_offset.push_back(slot_bytes);
      impl->b_offset.push_back(a_bytes);
      slot_bytes += AlignUp(a_bytes + b_bytes);
    }
  }
  for (int32_t s = 0; s < num_slots; ++s) {
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory mem, ops->Allocate(slot_bytes));
    // Zeroed so that no slot ever holds bytes the pool did not write.
    LORAPLEX_RETURN_IF_ERROR(ops->Memset(mem.data(), 0, slot_bytes));
    impl->memory.push_back(std::move(mem));
  }

  size_t entries = 0;
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    for (int w = 0; w < kNumWrappedLayers; ++w) {
      impl->table_start.push_back(entries);
      entries += static_cast<size_t>(num_slots) * kSlices[w].count;
    }
  }
  const size_t table_bytes = entries * sizeof(ops::LoraSliceWeights);
  LORAPLEX_ASSIGN_OR_RETURN(impl->tables, ops->Allocate(table_bytes));
  // All-zero entries are {nullptr, nullptr, rank 0, scale 0}: "not adapted" for every free slot.
  LORAPLEX_RETURN_IF_ERROR(ops->Memset(impl->tables.data(), 0, table_bytes));

  for (int64_t l = 0; l < spec.num_layers; ++l) {
    for (int w = 0; w < kNumWrappedLayers; ++w) {
      ops::LoraModule m;
      m.table = static_cast<const ops::LoraSliceWeights*>(impl->tables.data()) +
                impl->table_start[static_cast<size_t>(l) * kNumWrappedLayers + w];
      m.num_slots = num_slots;
      m.num_slices = kSlices[w].count;
      m.in_features = static_cast<int32_t>(model::ProjInFeatures(spec, kSlices[w].projs[0]));
      m.max_rank = max_rank;
      int64_t offset = 0;
      for (int s = 0; s < kSlices[w].count; ++s) {
        m.slice_offsets[s] = static_cast<int32_t>(offset);
        offset += model::ProjOutFeatures(spec, kSlices[w].projs[s]);
      }
      m.slice_offsets[kSlices[w].count] = static_cast<int32_t>(offset);
      impl->modules.push_back(m);
    }
  }
  impl->slots.resize(static_cast<size_t>(num_slots));
  impl->table_ranks.assign(static_cast<size_t>(num_slots), 0);
  // Not fatal: without it uploads copy in chunks or straight from the host tensors.
  if (absl::StatusOr<void*> staging = ops->AllocateHostStaging(std::min(slot_bytes, kInitialStagingBytes)); staging.ok()) {
    impl->staging = *staging;
    impl->staging_bytes = std::min(slot_bytes, kInitialStagingBytes);
  } else {
    spdlog::warn("adapter uploads: no staging memory at start ({})", staging.status().ToString());
  }
  std::unique_ptr<SlotPool> pool(new SlotPool());
  pool->impl_ = std::move(impl);
  return pool;
}

SlotPool::~SlotPool() = default;

absl::StatusOr<std::vector<int32_t>> SlotPool::EnsureResident(const std::vector<const LoadedAdapter*>& adapters,
                                                              const std::vector<bool>& pinned) {
  Impl& p = *impl_;
  if (pinned.size() != adapters.size()) {
    return absl::InvalidArgumentError(absl::StrCat("EnsureResident: ", adapters.size(), " adapters but ",
                                                   pinned.size(), " pinned flags"));
  }
  ++p.tick;
  auto find_slot = [&](uint64_t uid) -> int32_t {
    for (int32_t s = 0; s < p.num_slots; ++s) {
      if (p.slots[s].uid == uid) return s;
    }
    return -1;
  };

  // Check that everything fits before evicting anything, so a refused step changes nothing.
  absl::flat_hash_set<uint64_t> wanted;
  absl::flat_hash_set<uint64_t> missing;
  for (const LoadedAdapter* a : adapters) {
    if (a == nullptr) return absl::InvalidArgumentError("EnsureResident: null adapter");
    LORAPLEX_RETURN_IF_ERROR(p.CheckFits(*a));
    wanted.insert(a->uid);
    if (find_slot(a->uid) < 0) missing.insert(a->uid);
  }
  int64_t available = 0;
  for (const Impl::Slot& s : p.slots) {
    if (s.uid == 0 || (!s.pinned && !wanted.contains(s.uid))) ++available;
  }
  if (static_cast<int64_t>(missing.size()) > available) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "adapter slots exhausted: ", missing.size(), " adapters must be loaded but only ", available, " of ",
        p.num_slots, " slots are free or hold an unpinned adapter outside this step"));
  }

  std::vector<int32_t> result;
  result.reserve(adapters.size());
  for (size_t i = 0; i < adapters.size(); ++i) {
    const LoadedAdapter& a = *adapters[i];
    int32_t slot = find_slot(a.uid);
    if (slot < 0) {
      for (int32_t s = 0; s < p.num_slots; ++s) {
        const Impl::Slot& cand = p.slots[s];
        if (cand.uid == 0) {
          slot = s;
          break;
        }
        if (cand.pinned || wanted.contains(cand.uid)) continue;
        if (slot < 0 || cand.last_use < p.slots[slot].last_use) slot = s;
      }
      // The slot is marked free until the upload completes, so a failed upload leaves no
      // half-written adapter registered as resident.
      if (p.slots[slot].uid != 0) {
        spdlog::info("adapter '{}' evicted from slot {} for '{}'", p.slots[slot].name, slot, a.name);
      }
      p.slots[slot] = Impl::Slot{};
      // While the upload runs (or after it failed) the entries mix both adapters' ranks.
      p.table_ranks[slot] = std::max(p.table_ranks[slot], a.max_module_rank);
      const absl::Time start = absl::Now();
      LORAPLEX_ASSIGN_OR_RETURN(const int64_t bytes, p.Upload(slot, a));
      p.table_ranks[slot] = a.max_module_rank;
      // The engine thread waits this long before the step runs (cold adapters' first-token time).
      spdlog::info("adapter '{}' copied into slot {}: {:.1f} MB in {:.2f} ms", a.name, slot,
                   static_cast<double>(bytes) / 1e6, absl::ToDoubleMilliseconds(absl::Now() - start));
      p.slots[slot].uid = a.uid;
      p.slots[slot].name = a.name;
    }
    p.slots[slot].last_use = p.tick;
    p.slots[slot].pinned = pinned[i];
    result.push_back(slot);
  }
  return result;
}

void SlotPool::Evict(uint64_t uid) {
  // Only the bookkeeping changes: a free slot is in no segment, and the next upload rewrites all
  // of the slot's table entries.
  for (Impl::Slot& s : impl_->slots) {
    if (s.uid == uid && uid != 0) s = Impl::Slot{};
  }
}

const ops::LoraModule& SlotPool::module(int64_t layer, WrappedLayer which) const {
  return impl_->modules[static_cast<size_t>(layer) * kNumWrappedLayers + static_cast<size_t>(which)];
}

int32_t SlotPool::num_slots() const { return impl_->num_slots; }
int32_t SlotPool::max_rank() const { return impl_->max_rank; }

int32_t SlotPool::slot_rank(int32_t slot) const {
  if (slot < 0 || slot >= impl_->num_slots) return 0;
  return impl_->table_ranks[static_cast<size_t>(slot)];
}

int32_t SlotPool::used_slots() const {
  return static_cast<int32_t>(
      std::count_if(impl_->slots.begin(), impl_->slots.end(), [](const Impl::Slot& s) { return s.uid != 0; }));
}

std::vector<std::string> SlotPool::resident_names() const {
  std::vector<std::string> names;
  for (const Impl::Slot& s : impl_->slots) {
    if (s.uid != 0) names.push_back(s.name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

int64_t SlotPool::uploads() const { return impl_->uploads; }

void SlotPool::set_staging_for_test(size_t bytes_per_thread, size_t max_bytes) {
  impl_->staging_bytes_per_thread = bytes_per_thread;
  impl_->max_staging_bytes = max_bytes;
}

}  // namespace loraplex::lora
