#include "engine/text/utf8.h"

#include <catch2/catch.hpp>

#include "engine/text/byte_level.h"

namespace loraplex::text {
namespace {

const std::string kFffd = "\xEF\xBF\xBD";

std::string Lossy(const std::string& bytes) {
  std::string out;
  AppendUtf8Lossy(bytes, /*keep_incomplete_tail=*/false, &out);
  return out;
}

TEST_CASE("Lossy decoding replaces each maximal ill-formed subpart with one U+FFFD") {
  // Expected values are Python's bytes.decode("utf-8", "replace"), which follows the same
  // Unicode recommendation as Rust's from_utf8_lossy used by Hugging Face tokenizers.
  CHECK(Lossy("plain ascii") == "plain ascii");
  CHECK(Lossy("\xF0\x9F\x99") == kFffd);                              // truncated emoji
  CHECK(Lossy("\xE0\x80\x80") == kFffd + kFffd + kFffd);              // overlong
  CHECK(Lossy("\xED\xA0\x80") == kFffd + kFffd + kFffd);              // surrogate
  CHECK(Lossy("\xF4\x90\x80\x80") == kFffd + kFffd + kFffd + kFffd);  // above U+10FFFF
  CHECK(Lossy("\xC3\x28") == kFffd + "(");
  CHECK(Lossy("\xE4\xE4") == kFffd + kFffd);
  CHECK(Lossy("\xF0\x9F\x99\x82\xF0") == "\xF0\x9F\x99\x82" + kFffd);
  CHECK(Lossy("\xC0\xAF") == kFffd + kFffd);
  CHECK(Lossy("\xFE\xFF") == kFffd + kFffd);
}

TEST_CASE("Lossy decoding can leave an incomplete tail unconsumed") {
  std::string out;
  CHECK(AppendUtf8Lossy("a\xE2\x82", /*keep_incomplete_tail=*/true, &out) == 1);
  CHECK(out == "a");
  out.clear();
  // A tail that is already ill-formed cannot be completed, so it is consumed.
  CHECK(AppendUtf8Lossy("a\xE2(", /*keep_incomplete_tail=*/true, &out) == 3);
  CHECK(out == "a" + kFffd + "(");
}

TEST_CASE("ValidateUtf8 names the offset of the first bad byte") {
  CHECK(ValidateUtf8("h\xC3\xA9llo", "text").ok());
  absl::Status status = ValidateUtf8("ab\xFF", "text");
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(status.message() == "text is not valid UTF-8 at byte 2");
}

TEST_CASE("The byte-level alphabet maps all 256 bytes one to one and back") {
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::string mapped = BytesToByteLevel(all);
  CHECK(BytesToByteLevel(" ") == "\xC4\xA0");   // "Ġ", as in every GPT-2 style vocabulary
  CHECK(BytesToByteLevel("\n") == "\xC4\x8A");  // "Ċ"
  CHECK(BytesToByteLevel("A") == "A");
  CHECK(ByteLevelToBytes(mapped) == all);
  CHECK_FALSE(ByteLevelToBytes("\xE4\xBD\xA0").has_value());  // not in the alphabet
  CHECK_FALSE(ByteLevelToBytes(" ").has_value());             // raw space is never used
}

}  // namespace
}  // namespace loraplex::text
