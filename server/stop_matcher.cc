#include "server/stop_matcher.h"

#include <algorithm>
#include <utility>

namespace loraplex::server {

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}

std::string StopMatcher::Add(std::string_view text) {
  if (matched_) return "";
  if (stops_.empty()) return std::string(text);
  held_.append(text);

  // Every earlier position was emitted only because no stop string could start there, so a
  // match can only begin inside held_.
  size_t best_pos = std::string::npos;
  const std::string* best = nullptr;
  for (const std::string& stop : stops_) {
    const size_t pos = held_.find(stop);
    if (pos == std::string::npos) continue;
    if (pos < best_pos || (pos == best_pos && stop.size() > best->size())) {
      best_pos = pos;
      best = &stop;
    }
  }
  if (best != nullptr) {
    matched_ = true;
    matched_stop_ = *best;
    std::string out = held_.substr(0, best_pos);
    held_.clear();
    return out;
  }

  // Keep the longest suffix that is a proper prefix of a stop string. Stop strings are valid
  // UTF-8 and start on a character boundary, so the split never cuts a character in two.
  size_t keep = 0;
  for (const std::string& stop : stops_) {
    const size_t max_len = std::min(stop.size() - 1, held_.size());
    for (size_t len = max_len; len > keep; --len) {
      if (std::string_view(held_).substr(held_.size() - len) == std::string_view(stop).substr(0, len)) {
        keep = len;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::Flush() {
  if (matched_) return "";
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

}  // namespace loraplex::server
