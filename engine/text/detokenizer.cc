#include "engine/text/tokenizer.h"
#include "engine/text/utf8.h"

namespace loraplex::text {

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer* tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}

std::string IncrementalDetokenizer::Add(int32_t id) {
  pending_ += tokenizer_->TokenBytes(id, skip_special_);
  // Lossy decoding only looks forward, so decoding up to an incomplete tail and resuming there
  // once more bytes arrive gives exactly what decoding the whole stream at once gives.
  std::string text;
  const size_t consumed = AppendUtf8Lossy(pending_, /*keep_incomplete_tail=*/true, &text);
  pending_.erase(0, consumed);
  return text;
}

std::string IncrementalDetokenizer::Flush() {
  std::string text;
  AppendUtf8Lossy(pending_, /*keep_incomplete_tail=*/false, &text);
  pending_.clear();
  return text;
}

}  // namespace loraplex::text
