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

}  // namespace

AdapterRegistry::AdapterRegistry(model::ModelSpec spec, LoraLimits limits, DType weights_dtype,
                                 int64_t max_adapters)
    : spec_(std::move(spec)),
      limits_(std::move(limits)),
      weights_dtype_(weights_dtype),
      max_adapters_(max_adapters) {}

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
      for (const auto& [unused, entry] : entries_) pinned_now += entry.pinned ? 1 : 0;
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
    entries_.emplace(name, Entry{adapter, std::make_shared<std::atomic<int64_t>>(0), pinned});
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
  entries_.erase(it);
  spdlog::info("adapter '{}' unloaded", name);
  return absl::OkStatus();
}

absl::StatusOr<AdapterRef> AdapterRegistry::Acquire(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat("adapter '", name, "' not found"));
  const Entry& entry = it->second;
  entry.uses->fetch_add(1);
  AdapterRef ref;
  ref.adapter_ = entry.adapter;
  // The deleter owns the counter, so a ref outliving an unloaded entry is still safe.
  ref.use_ = std::shared_ptr<void>(entry.uses.get(), [uses = entry.uses](void*) { uses->fetch_sub(1); });
  ref.pinned_ = entry.pinned;
  return ref;
}

std::vector<AdapterInfo> AdapterRegistry::List() const {
  std::vector<AdapterInfo> out;
  {
    absl::MutexLock lock(&mu_);
    out.reserve(entries_.size());
    for (const auto& [name, entry] : entries_) {
      const LoadedAdapter& a = *entry.adapter;
      out.push_back(AdapterInfo{a.name, a.path, a.rank, a.alpha, a.target_modules, entry.pinned,
                                entry.uses->load(), a.weight_bytes});
    }
  }
  std::sort(out.begin(), out.end(), [](const AdapterInfo& x, const AdapterInfo& y) { return x.name < y.name; });
  return out;
}

}  // namespace loraplex::lora
