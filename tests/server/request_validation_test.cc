#include "server/request_validation.h"

#include <string>
#include <vector>

#include <catch2/catch.hpp>

namespace loraplex::server {
namespace {

// One token per byte (id = byte + 1) and BOS = 0: enough to see what the validator tokenizes.
class ByteTokenizer final : public text::Tokenizer {
 public:
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    if (add_special_tokens) ids.push_back(0);
    for (unsigned char c : text) ids.push_back(static_cast<int32_t>(c) + 1);
    return ids;
  }
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>&, bool) const override { return ""; }
  std::string TokenBytes(int32_t, bool) const override { return ""; }
  int64_t vocab_size() const override { return 257; }
  bool IsSpecial(int32_t id) const override { return id == 0; }
  std::optional<int32_t> TokenToId(std::string_view) const override { return std::nullopt; }
  std::optional<int32_t> bos_id() const override { return 0; }
};

RequestLimits Limits() {
  RequestLimits limits;
  limits.vocab_size = 257;
  limits.max_seq_len = 64;
  limits.max_new_tokens_limit = 32;
  return limits;
}

v1::GenerateRequest ValidRequest() {
  v1::GenerateRequest request;
  request.set_text("hi");
  return request;
}

// Expects INVALID_ARGUMENT whose message starts with `field`.
void ExpectRejected(const v1::GenerateRequest& request, const std::string& field,
                    const RequestLimits& limits = Limits()) {
  ByteTokenizer tokenizer;
  const absl::StatusOr<engine::GenerateRequest> result = ToEngineRequest(request, tokenizer, limits);
  INFO("expected a refusal naming " << field);
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(result.status().message()).find(field) != std::string::npos);
}

TEST_CASE("A valid text request becomes an engine request with vLLM's defaults") {
  ByteTokenizer tokenizer;
  v1::GenerateRequest request = ValidRequest();
  request.set_request_id("client-7");
  request.set_adapter("upper");
  const absl::StatusOr<engine::GenerateRequest> out = ToEngineRequest(request, tokenizer, Limits());
  REQUIRE(out.ok());
  CHECK(out->request_id == "client-7");
  CHECK(out->adapter == "upper");
  CHECK(out->prompt_ids == std::vector<int32_t>{0, 'h' + 1, 'i' + 1});
  CHECK(out->sampling.max_new_tokens == kDefaultMaxNewTokens);
  CHECK(out->sampling.temperature == 1.0f);
  CHECK(out->sampling.top_p == 1.0f);
  CHECK(out->sampling.top_k == 0);
  CHECK_FALSE(out->sampling.seed.has_value());
  CHECK_FALSE(out->sampling.logprobs);
}

TEST_CASE("Sampling and output fields are carried over to the engine request") {
  ByteTokenizer tokenizer;
  v1::GenerateRequest request = ValidRequest();
  request.set_add_special_tokens(false);
  v1::SamplingParams* s = request.mutable_sampling();
  s->set_max_new_tokens(5);
  s->set_temperature(0.0f);
  s->set_top_p(0.5f);
  s->set_top_k(3);
  s->set_seed(99);
  s->add_stop_token_ids(7);
  s->set_ignore_eos(true);
  request.mutable_output()->set_logprobs(true);
  request.mutable_output()->set_top_logprobs(2);
  const absl::StatusOr<engine::GenerateRequest> out = ToEngineRequest(request, tokenizer, Limits());
  REQUIRE(out.ok());
  CHECK(out->prompt_ids == std::vector<int32_t>{'h' + 1, 'i' + 1});
  CHECK(out->sampling.max_new_tokens == 5);
  CHECK(out->sampling.temperature == 0.0f);
  CHECK(out->sampling.top_p == 0.5f);
  CHECK(out->sampling.top_k == 3);
  CHECK(out->sampling.seed == 99u);
  CHECK(out->sampling.stop_token_ids == std::vector<int32_t>{7});
  CHECK(out->sampling.ignore_eos);
  CHECK(out->sampling.logprobs);
  CHECK(out->sampling.top_logprobs == 2);
}

TEST_CASE("A top_k beyond the vocabulary means no top-k filtering") {
  ByteTokenizer tokenizer;
  v1::GenerateRequest request = ValidRequest();
  request.mutable_sampling()->set_top_k(100000);
  const absl::StatusOr<engine::GenerateRequest> out = ToEngineRequest(request, tokenizer, Limits());
  REQUIRE(out.ok());
  CHECK(out->sampling.top_k == 0);
}

TEST_CASE("Token id prompts are used as given") {
  ByteTokenizer tokenizer;
  v1::GenerateRequest request;
  request.mutable_token_ids()->add_ids(5);
  request.mutable_token_ids()->add_ids(256);
  const absl::StatusOr<engine::GenerateRequest> out = ToEngineRequest(request, tokenizer, Limits());
  REQUIRE(out.ok());
  CHECK(out->prompt_ids == std::vector<int32_t>{5, 256});
}

TEST_CASE("Each bad field is INVALID_ARGUMENT naming the field") {
  v1::GenerateRequest request = ValidRequest();
  SECTION("missing prompt") {
    request.clear_text();
    ExpectRejected(request, "prompt");
  }
  SECTION("empty text") {
    request.set_text("");
    ExpectRejected(request, "prompt.text");
  }
  SECTION("empty token ids") {
    request.mutable_token_ids();
    ExpectRejected(request, "prompt.token_ids");
  }
  SECTION("token id outside the vocabulary") {
    request.mutable_token_ids()->add_ids(3);
    request.mutable_token_ids()->add_ids(257);
    ExpectRejected(request, "prompt.token_ids[1] = 257");
  }
  SECTION("request_id too long") {
    request.set_request_id(std::string(kMaxRequestIdBytes + 1, 'r'));
    ExpectRejected(request, "request_id");
  }
  SECTION("max_new_tokens over the server limit") {
    request.mutable_sampling()->set_max_new_tokens(33);
    ExpectRejected(request, "sampling.max_new_tokens");
  }
  SECTION("negative temperature") {
    request.mutable_sampling()->set_temperature(-0.5f);
    ExpectRejected(request, "sampling.temperature");
  }
  SECTION("NaN temperature") {
    request.mutable_sampling()->set_temperature(std::nanf(""));
    ExpectRejected(request, "sampling.temperature");
  }
  SECTION("top_p above 1") {
    request.mutable_sampling()->set_top_p(1.5f);
    ExpectRejected(request, "sampling.top_p must be in (0, 1], got 1.5");
  }
  SECTION("top_p of 0") {
    request.mutable_sampling()->set_top_p(0.0f);
    ExpectRejected(request, "sampling.top_p");
  }
  SECTION("too many stop strings") {
    for (int i = 0; i <= kMaxStopStrings; ++i) request.mutable_sampling()->add_stop("s");
    ExpectRejected(request, "sampling.stop");
  }
  SECTION("stop string too long") {
    request.mutable_sampling()->add_stop("ok");
    request.mutable_sampling()->add_stop(std::string(kMaxStopStringBytes + 1, 's'));
    ExpectRejected(request, "sampling.stop[1]");
  }
  SECTION("empty stop string") {
    request.mutable_sampling()->add_stop("");
    ExpectRejected(request, "sampling.stop[0]");
  }
  SECTION("stop token id outside the vocabulary") {
    request.mutable_sampling()->add_stop_token_ids(1000);
    ExpectRejected(request, "sampling.stop_token_ids[0]");
  }
  SECTION("top_logprobs above 20") {
    request.mutable_output()->set_logprobs(true);
    request.mutable_output()->set_top_logprobs(21);
    ExpectRejected(request, "output.top_logprobs");
  }
  SECTION("top_logprobs without logprobs") {
    request.mutable_output()->set_top_logprobs(2);
    ExpectRejected(request, "output.top_logprobs");
  }
}

TEST_CASE("A prompt that leaves no room for max_new_tokens in the context is refused") {
  v1::GenerateRequest request;
  request.set_text(std::string(60, 'a'));  // 61 tokens with BOS
  request.mutable_sampling()->set_max_new_tokens(4);
  ExpectRejected(request, "exceeds the model's context of 64");
  request.mutable_sampling()->set_max_new_tokens(3);
  ByteTokenizer tokenizer;
  CHECK(ToEngineRequest(request, tokenizer, Limits()).ok());
}

TEST_CASE("A prompt longer than server.max_prompt_tokens is refused") {
  RequestLimits limits = Limits();
  limits.max_prompt_tokens = 4;
  v1::GenerateRequest request;
  request.set_text("abcd");  // 5 tokens with BOS
  ExpectRejected(request, "server.max_prompt_tokens", limits);
}

}  // namespace
}  // namespace loraplex::server
