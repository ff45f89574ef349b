// StopMatcher: finds stop strings in streamed text. It holds back the tail of the text that could
// still grow into a stop string, so text after a match is never emitted. One per stream;
// thread-compatible.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace loraplex::server {

class StopMatcher {
 public:
  // `stops` are non-empty strings; with none, Add returns its input unchanged.
  explicit StopMatcher(std::vector<std::string> stops);

  // Appends `text` and returns the part that is now safe to emit. On a match (the earliest in the
  // text; the longest stop string on a tie) returns the text before it; matched() turns true and
  // every later call returns "".
  std::string Add(std::string_view text);
  // End of the stream: the held-back text (no stop string can complete any more).
  std::string Flush();

  bool matched() const { return matched_; }
  // The stop string that matched; empty before a match.
  const std::string& matched_stop() const { return matched_stop_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;  // not emitted yet: a suffix that is a proper prefix of some stop string
  bool matched_ = false;
  std::string matched_stop_;
};

}  // namespace loraplex::server
