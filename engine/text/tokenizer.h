// Tokenizer: Hugging Face tokenizer.json (byte-level BPE as in Llama 3 / GPT-2 / Qwen; merges as
// "a b" strings or ["a","b"] pairs; added/special tokens) and IncrementalDetokenizer for
// streaming text that never splits a UTF-8 sequence. Tokenizer is immutable after loading and
// thread-safe; an IncrementalDetokenizer belongs to one stream.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::text {

class Tokenizer {
 public:
  // INVALID_ARGUMENT naming the JSON field for malformed or unsupported files (unknown model
  // type, empty merges, ...); NOT_FOUND if the file is missing.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json_text);
  virtual ~Tokenizer() = default;

  // Text -> ids; with add_special_tokens the post-processor's BOS (if any) is prepended.
  // Special tokens written in the text are recognised. INVALID_ARGUMENT for invalid UTF-8.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special_tokens = true) const = 0;
  // Ids -> text. INVALID_ARGUMENT for an id outside the vocabulary. Bytes that do not form valid
  // UTF-8 become U+FFFD.
  virtual absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                             bool skip_special_tokens = true) const = 0;
  // The raw bytes of one token (byte-level decoded), "" for special tokens when skipping.
  virtual std::string TokenBytes(int32_t id, bool skip_special_tokens = true) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
};

// Turns a stream of ids into text deltas. Each Add returns the text that became complete
// (possibly empty while a multi-byte character is still partial).
class IncrementalDetokenizer {
 public:
  explicit IncrementalDetokenizer(const Tokenizer* tokenizer, bool skip_special_tokens = true);
  std::string Add(int32_t id);
  // Whatever is still pending at the end of the stream (invalid leftovers become U+FFFD).
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;  // bytes of an incomplete UTF-8 sequence
};

}  // namespace loraplex::text
