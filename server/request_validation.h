// Checks a GenerateRequest field by field and turns it into the engine's request. Every refusal
// is INVALID_ARGUMENT and names the field and the bad value ("sampling.top_p must be in (0, 1],
// got 1.5"). Stateless; thread-safe.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/request.h"
#include "engine/text/tokenizer.h"
#include "loraplex/v1/generation.pb.h"

namespace loraplex::server {

inline constexpr int32_t kDefaultMaxNewTokens = 16;  // when sampling.max_new_tokens is 0 (vLLM's)
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr int kMaxStopTokenIds = 64;
inline constexpr size_t kMaxRequestIdBytes = 128;
inline constexpr uint32_t kMaxTopLogprobs = 20;

struct RequestLimits {
  int64_t vocab_size = 0;              // the model's; token ids must be below it
  int64_t max_seq_len = 0;             // prompt + max_new_tokens must fit
  int64_t max_prompt_tokens = 0;       // 0: bounded by max_seq_len only
  int64_t max_new_tokens_limit = 4096; // server.max_new_tokens_limit
};

// Checks every field that does not need the prompt's tokens.
absl::Status ValidateGenerateRequest(const v1::GenerateRequest& request, const RequestLimits& limits);

// ValidateGenerateRequest, then tokenizes a text prompt (or checks given ids), checks the prompt's
// length against the limits, and fills the engine request with the defaults applied.
absl::StatusOr<engine::GenerateRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                        const text::Tokenizer& tokenizer,
                                                        const RequestLimits& limits);

}  // namespace loraplex::server
