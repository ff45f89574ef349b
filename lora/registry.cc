#include "lora/registry.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "spdlog/spdlog.h"

namespace loraplex::lora {
namespace {

constexpr size_t kMaxNameLength = 128;

absl::Status CheckName(const std::string& name) {
  const bool ok_chars = std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
  });
  if (name.empty() || name.size() > kMaxNameLength || !ok_chars) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter name '", name, "' is invalid: use 1-128 characters from [A-Za-z0-9._-]"));
  }
  return absl::OkStatus();
}

AdapterInfo InfoOf(const LoadedAdapter& a, bool pinned) {
  AdapterInfo info;
  info.name = a.name;
  info.path = a.path;
  info.rank = a.rank;
  info.alpha = a.alpha;
  info.target_modules = a.target_modules;
  info.pinned = pinned;
  info.weight_bytes = a.weight_bytes;
  return info;
}

}  // namespace

AdapterRegistry::AdapterRegistry(model::ModelSpec spec, LoraLimits limits, DType weights_dtype,
                                 int64_t max_adapters, size_t host_budget_bytes)
    : spec_(std::move(spec)),
      limits_(std::move(limits)),
      weights_dtype_(weights_dtype),
      max_adapters_(max_adapters),
      host_budget_bytes_(host_budget_bytes) {}

void AdapterRegistry::TrimLocked() {
  if (host_budget_bytes_ == 0 || host_bytes_ <= host_budget_bytes_) return;
  std::vector<Entry*> candidates;
  for (auto& [name, entry] : entries_) {
    if (entry.adapter != nullptr && !entry.info.pinned && entry.uses->load() == 0) candidates.push_back(&entry);
  }
  std::sort(candidates.begin(), candidates.end(), [](const Entry* a, const Entry* b) { return a->last_use < b->last_use; });
  for (Entry* entry : candidates) {
    if (host_bytes_ <= host_budget_bytes_) break;
    host_bytes_ -= entry->info.weight_bytes;
    entry->adapter.reset();
    spdlog::debug("adapter '{}': weights dropped from host memory (lora.host_cache_mib)", entry->info.name);
  }
}

AdapterRef AdapterRegistry::RefLocked(Entry& entry) {
  entry.last_use = ++tick_;
  entry.uses->fetch_add(1);
  AdapterRef ref;
  ref.adapter_ = entry.adapter;
  // The deleter owns the counter, so a ref outliving an unloaded entry is still safe.
  ref.use_ = std::shared_ptr<void>(entry.uses.get(), [uses = entry.uses](void*) { uses->fetch_sub(1); });
  ref.pinned_ = entry.info.pinned;
  return ref;
}

absl::Status AdapterRegistry::Load(const std::string& name, const std::string& path, bool pinned) {
  LORAPLEX_RETURN_IF_ERROR(CheckName(name));
  auto check_room = [&]() -> absl::Status {  // caller holds mu_
    if (entries_.contains(name)) return absl::AlreadyExistsError(absl::StrCat("adapter '", name, "' already exists"));
    if (static_cast<int64_t>(entries_.size()) >= max_adapters_) {
      return absl::ResourceExhaustedError(absl::StrCat("adapter '", name, "': the registry is full (",
                                                       max_adapters_, " adapters, lora.max_adapters)"));
    }
    if (pinned && limits_.max_pinned >= 0) {
      int64_t pinned_now = 0;
      for (const auto& [unused, entry] : entries_) pinned_now += entry.info.pinned ? 1 : 0;
      if (pinned_now >= limits_.max_pinned) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "adapter '", name, "': ", pinned_now, " adapters are pinned already, the most the ",
            "device slots allow (lora.adapter_slots - 1); load it unpinned or unload a pinned one"));
      }
    }
    return absl::OkStatus();
  };
  {
    absl::MutexLock lock(&mu_);
    LORAPLEX_RETURN_IF_ERROR(check_room());
  }
  // Parsing reads and converts every weight; doing it unlocked keeps List/Acquire responsive.
  const auto start = std::chrono::steady_clock::now();
  LORAPLEX_ASSIGN_OR_RETURN(std::shared_ptr<const LoadedAdapter> adapter,
                            LoadPeftAdapter(name, path, spec_, limits_, weights_dtype_));
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  const LoadedAdapter& a = *adapter;
  {
    absl::MutexLock lock(&mu_);
    // Another thread may have taken the name or the last place while this one was parsing.
    LORAPLEX_RETURN_IF_ERROR(check_room());
    entries_.emplace(name, Entry{adapter, InfoOf(a, pinned), std::make_shared<std::atomic<int64_t>>(0), ++tick_});
    host_bytes_ += a.weight_bytes;
    TrimLocked();
  }
  spdlog::info("adapter '{}' loaded from {} in {:.1f} ms: rank {}, alpha {}, {} projections, {} bytes{}", name,
               a.path, ms, a.rank, a.alpha, a.target_modules.size(), a.weight_bytes, pinned ? ", pinned" : "");
  return absl::OkStatus();
}

absl::Status AdapterRegistry::Unload(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("adapter '", name, "' not found"));
  const int64_t uses = it->second.uses->load();
  if (uses > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter '", name, "' is in use by ", uses, uses == 1 ? " request" : " requests"));
  }
  if (it->second.adapter != nullptr) host_bytes_ -= it->second.info.weight_bytes;
  entries_.erase(it);
  spdlog::info("adapter '{}' unloaded", name);
  return absl::OkStatus();
}

absl::StatusOr<AdapterRef> AdapterRegistry::Acquire(const std::string& name) {
  std::string path;
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(name);
    if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("adapter '", name, "' not found"));
    if (it->second.adapter != nullptr) return RefLocked(it->second);
    path = it->second.info.path;
  }
  // Dropped from the host tier: parse it again, unlocked like Load (validated the same way: the
  // files may have changed since).
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::shared_ptr<const LoadedAdapter>> parsed =
      LoadPeftAdapter(name, path, spec_, limits_, weights_dtype_);
  if (!parsed.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("adapter '", name, "': reloading its weights from ", path,
                                                      " failed: ", parsed.status().message()));
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(name);
  // Unloaded meanwhile, or unloaded and loaded again from another path: the name's current entry
  // decides.
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("adapter '", name, "' not found"));
  Entry& entry = it->second;
  if (entry.adapter == nullptr && entry.info.path == path) {
    entry.adapter = *std::move(parsed);
    entry.info = InfoOf(*entry.adapter, entry.info.pinned);
    host_bytes_ += entry.info.weight_bytes;
    spdlog::info("adapter '{}' reloaded into host memory from {} in {:.1f} ms", name, path, ms);
  }
  if (entry.adapter == nullptr) {
    return absl::UnavailableError(absl::StrCat("adapter '", name, "' changed while it was reloaded; try again"));
  }
  AdapterRef ref = RefLocked(entry);  // in use now: the trim below keeps it
  TrimLocked();
  return ref;
}

size_t AdapterRegistry::host_bytes() const {
  absl::MutexLock lock(&mu_);
  return host_bytes_;
}

std::vector<AdapterInfo> AdapterRegistry::List() const {
  std::vector<AdapterInfo> out;
  {
    absl::MutexLock lock(&mu_);
    out.reserve(entries_.size());
    for (const auto& [name, entry] : entries_) {
      AdapterInfo info = entry.info;
      info.active_requests = entry.uses->load();
      info.host_resident = entry.adapter != nullptr;
      out.push_back(std::move(info));
    }
  }
  std::sort(out.begin(), out.end(), [](const AdapterInfo& x, const AdapterInfo& y) { return x.name < y.name; });
  return out;
}

}  // namespace loraplex::lora
