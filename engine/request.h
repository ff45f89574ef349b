// What a generation request asks of the engine and what the engine reports back.
// Plain values; thread-compatible.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace loraplex::engine {

struct SamplingParams {
  int32_t max_new_tokens = 16;
  float temperature = 1.0f;               // 0: greedy
  float top_p = 1.0f;                     // (0, 1]
  int32_t top_k = 0;                      // 0: off
  std::optional<uint64_t> seed;           // same seed + same inputs -> same tokens
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool logprobs = false;                  // chosen-token logprob on each event
  int32_t top_logprobs = 0;               // top-N alternatives on each event (0..20)
};

struct GenerateRequest {
  std::string request_id;                 // for logs; the engine assigns its own numeric id
  std::string adapter;                    // empty: the base model
  std::vector<int32_t> prompt_ids;
  SamplingParams sampling;
};

struct TokenEvent {
  int32_t token_id = 0;
  float logprob = 0.0f;                                  // when requested
  std::vector<std::pair<int32_t, float>> top_logprobs;   // when requested, best first
};

enum class FinishReason { kLength, kStop, kEos, kCancelled, kError };
const char* FinishReasonName(FinishReason reason);

struct Usage {
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  double queue_time_s = 0;                // submit -> first scheduled
  double time_to_first_token_s = 0;       // submit -> first token
  double total_time_s = 0;
};

// Receives a request's output. Called on the engine thread; must not block (hand the events to
// another thread). After OnFinish nothing more is called.
class TokenSink {
 public:
  virtual ~TokenSink() = default;
  virtual void OnTokens(const std::vector<TokenEvent>& events) = 0;
  // `status` is OK unless reason is kError.
  virtual void OnFinish(FinishReason reason, const absl::Status& status, const Usage& usage) = 0;
};

}  // namespace loraplex::engine
