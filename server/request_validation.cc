#include "server/request_validation.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace loraplex::server {
namespace {

absl::Status CheckTokenId(uint32_t id, const std::string& field, const RequestLimits& limits) {
  if (static_cast<int64_t>(id) >= limits.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(field, " = ", id, " is outside the vocabulary [0, ",
                                                   limits.vocab_size, ")"));
  }
  return absl::OkStatus();
}

absl::Status ValidateSampling(const v1::SamplingParams& s, const RequestLimits& limits) {
  if (s.max_new_tokens() > limits.max_new_tokens_limit) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.max_new_tokens must be <= ",
                                                   limits.max_new_tokens_limit,
                                                   " (server.max_new_tokens_limit), got ",
                                                   s.max_new_tokens()));
  }
  if (s.has_temperature() && !(std::isfinite(s.temperature()) && s.temperature() >= 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.temperature must be a finite number >= 0, got ", s.temperature()));
  }
  if (s.has_top_p() && !(s.top_p() > 0.0f && s.top_p() <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p must be in (0, 1], got ", s.top_p()));
  }
  if (s.stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.stop has ", s.stop_size(),
                                                   " strings; at most ", kMaxStopStrings));
  }
  for (int i = 0; i < s.stop_size(); ++i) {
    const std::string& stop = s.stop(i);
    if (stop.empty() || stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.stop[", i, "] must be 1..",
                                                     kMaxStopStringBytes, " bytes, got ",
                                                     stop.size()));
    }
  }
  if (s.stop_token_ids_size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.stop_token_ids has ",
                                                   s.stop_token_ids_size(), " ids; at most ",
                                                   kMaxStopTokenIds));
  }
  for (int i = 0; i < s.stop_token_ids_size(); ++i) {
    LORAPLEX_RETURN_IF_ERROR(
        CheckTokenId(s.stop_token_ids(i), absl::StrCat("sampling.stop_token_ids[", i, "]"), limits));
  }
  return absl::OkStatus();
}

absl::Status ValidateOutput(const v1::OutputOptions& o) {
  if (o.top_logprobs() > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("output.top_logprobs must be <= ",
                                                   kMaxTopLogprobs, ", got ", o.top_logprobs()));
  }
  if (o.top_logprobs() > 0 && !o.logprobs()) {
    return absl::InvalidArgumentError(absl::StrCat("output.top_logprobs (", o.top_logprobs(),
                                                   ") needs output.logprobs = true"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateGenerateRequest(const v1::GenerateRequest& request,
                                     const RequestLimits& limits) {
  if (request.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id must be at most ", kMaxRequestIdBytes,
                                                   " bytes, got ", request.request_id().size()));
  }
  switch (request.prompt_case()) {
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return absl::InvalidArgumentError("prompt must be set (prompt.text or prompt.token_ids)");
    case v1::GenerateRequest::kText:
      if (request.text().empty()) {
        return absl::InvalidArgumentError("prompt.text must not be empty");
      }
      break;
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) {
        return absl::InvalidArgumentError("prompt.token_ids must not be empty");
      }
      for (int i = 0; i < ids.size(); ++i) {
        LORAPLEX_RETURN_IF_ERROR(CheckTokenId(ids[i], absl::StrCat("prompt.token_ids[", i, "]"), limits));
      }
      break;
    }
  }
  LORAPLEX_RETURN_IF_ERROR(ValidateSampling(request.sampling(), limits));
  return ValidateOutput(request.output());
}

absl::StatusOr<engine::GenerateRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                        const text::Tokenizer& tokenizer,
                                                        const RequestLimits& limits) {
  LORAPLEX_RETURN_IF_ERROR(ValidateGenerateRequest(request, limits));
  engine::GenerateRequest out;
  out.request_id = request.request_id();
  out.adapter = request.adapter();
  if (request.prompt_case() == v1::GenerateRequest::kText) {
    const bool add_special = !request.has_add_special_tokens() || request.add_special_tokens();
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(request.text(), add_special);
    if (!ids.ok()) return Annotate(ids.status(), "prompt.text");
    if (ids->empty()) {
      return absl::InvalidArgumentError("prompt.text produced no tokens");
    }
    out.prompt_ids = *std::move(ids);
  } else {
    const auto& ids = request.token_ids().ids();
    out.prompt_ids.assign(ids.begin(), ids.end());
  }

  const v1::SamplingParams& s = request.sampling();
  const int64_t prompt_tokens = static_cast<int64_t>(out.prompt_ids.size());
  const int32_t max_new = s.max_new_tokens() == 0 ? kDefaultMaxNewTokens
                                                  : static_cast<int32_t>(s.max_new_tokens());
  if (limits.max_prompt_tokens > 0 && prompt_tokens > limits.max_prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt has ", prompt_tokens,
                                                   " tokens; server.max_prompt_tokens is ",
                                                   limits.max_prompt_tokens));
  }
  if (prompt_tokens + max_new > limits.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", prompt_tokens, " tokens) + sampling.max_new_tokens (", max_new,
        ") exceeds the model's context of ", limits.max_seq_len, " tokens"));
  }

  engine::SamplingParams& p = out.sampling;
  p.max_new_tokens = max_new;
  p.temperature = s.has_temperature() ? s.temperature() : 1.0f;
  p.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  // A top_k beyond the vocabulary keeps everything, which is what "off" means.
  p.top_k = s.has_top_k() && s.top_k() < limits.vocab_size ? static_cast<int32_t>(s.top_k()) : 0;
  if (s.has_seed()) p.seed = s.seed();
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.ignore_eos = s.ignore_eos();
  p.logprobs = request.output().logprobs();
  p.top_logprobs = static_cast<int32_t>(request.output().top_logprobs());
  return out;
}

}  // namespace loraplex::server
