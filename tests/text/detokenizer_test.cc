#include <catch2/catch.hpp>
#include <fstream>
#include <random>
#include <sstream>

#include "engine/text/byte_level.h"
#include "engine/text/tokenizer.h"
#include "engine/text/utf8.h"
#include "nlohmann/json.hpp"

namespace loraplex::text {
namespace {

const std::string kFixtureDir = std::string(LORAPLEX_SOURCE_DIR) + "/tests/fixtures/tokenizer/";
const std::string kFffd = "\xEF\xBF\xBD";

std::unique_ptr<Tokenizer> LoadFixture() {
  auto tokenizer = Tokenizer::FromFile(kFixtureDir + "tokenizer.json");
  INFO(tokenizer.status().ToString());
  REQUIRE(tokenizer.ok());
  return std::move(tokenizer).value();
}

int32_t ByteId(const Tokenizer& tokenizer, char byte) {
  auto id = tokenizer.TokenToId(BytesToByteLevel(std::string(1, byte)));
  REQUIRE(id.has_value());
  return *id;
}

// Streams `ids` through a detokenizer, checking every delta is valid UTF-8; returns the text
// and counts the Adds that returned nothing although the token carried bytes.
std::string Stream(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip_special,
                   int* held_back) {
  IncrementalDetokenizer detokenizer(&tokenizer, skip_special);
  std::string text;
  for (int32_t id : ids) {
    const std::string delta = detokenizer.Add(id);
    INFO("delta after id " << id);
    CHECK(ValidateUtf8(delta, "delta").ok());
    if (delta.empty() && !tokenizer.TokenBytes(id, skip_special).empty()) ++*held_back;
    text += delta;
  }
  const std::string tail = detokenizer.Flush();
  CHECK(ValidateUtf8(tail, "tail").ok());
  return text + tail;
}

TEST_CASE("IncrementalDetokenizer output is valid UTF-8 and concatenates to Decode") {
  auto tokenizer = LoadFixture();
  std::ifstream file(kFixtureDir + "golden.json");
  std::stringstream contents;
  contents << file.rdbuf();
  const auto golden = nlohmann::json::parse(contents.str());
  int held_back = 0;
  for (const auto& entry : golden["texts"]) {
    const std::string text = entry.get<std::string>();
    INFO("text: " << text);
    const std::vector<int32_t> ids = tokenizer->Encode(text, true).value();
    for (bool skip : {true, false}) {
      CHECK(Stream(*tokenizer, ids, skip, &held_back) == tokenizer->Decode(ids, skip).value());
    }
  }
  // Emoji and CJK in the golden texts are split across byte tokens, so some Adds must have had
  // to wait for the rest of a character; otherwise this test would not exercise that path.
  CHECK(held_back > 10);
}

TEST_CASE("IncrementalDetokenizer holds a partial character until it completes") {
  auto tokenizer = LoadFixture();
  IncrementalDetokenizer detokenizer(tokenizer.get());
  CHECK(detokenizer.Add(ByteId(*tokenizer, 'a')) == "a");
  CHECK(detokenizer.Add(ByteId(*tokenizer, '\xF0')).empty());
  CHECK(detokenizer.Add(ByteId(*tokenizer, '\x9F')).empty());
  CHECK(detokenizer.Add(ByteId(*tokenizer, '\x99')).empty());
  CHECK(detokenizer.Add(ByteId(*tokenizer, '\x82')) == "\xF0\x9F\x99\x82");  // U+1F642
  CHECK(detokenizer.Flush().empty());
}

TEST_CASE("IncrementalDetokenizer replaces bytes that can never become valid") {
  auto tokenizer = LoadFixture();
  SECTION("a lead byte followed by ASCII") {
    IncrementalDetokenizer detokenizer(tokenizer.get());
    CHECK(detokenizer.Add(ByteId(*tokenizer, '\xF0')).empty());
    CHECK(detokenizer.Add(ByteId(*tokenizer, 'a')) == kFffd + "a");
  }
  SECTION("a lone continuation byte is replaced at once") {
    IncrementalDetokenizer detokenizer(tokenizer.get());
    CHECK(detokenizer.Add(ByteId(*tokenizer, '\x99')) == kFffd);
  }
  SECTION("a second lead byte ends the first sequence") {
    IncrementalDetokenizer detokenizer(tokenizer.get());
    CHECK(detokenizer.Add(ByteId(*tokenizer, '\xE4')).empty());
    CHECK(detokenizer.Add(ByteId(*tokenizer, '\xE4')) == kFffd);
    CHECK(detokenizer.Flush() == kFffd);
  }
  SECTION("an incomplete tail at the end of the stream") {
    IncrementalDetokenizer detokenizer(tokenizer.get());
    CHECK(detokenizer.Add(ByteId(*tokenizer, '\xE4')).empty());
    CHECK(detokenizer.Add(ByteId(*tokenizer, '\xBD')).empty());
    CHECK(detokenizer.Flush() == kFffd);
  }
}

TEST_CASE("IncrementalDetokenizer matches Decode on random id streams") {
  auto tokenizer = LoadFixture();
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> any_id(0,
                                                static_cast<int32_t>(tokenizer->vocab_size()) - 1);
  int held_back = 0;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> ids(1 + trial % 40);
    for (int32_t& id : ids) id = any_id(rng);
    for (bool skip : {true, false}) {
      CHECK(Stream(*tokenizer, ids, skip, &held_back) == tokenizer->Decode(ids, skip).value());
    }
  }
}

}  // namespace
}  // namespace loraplex::text
