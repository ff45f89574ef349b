// UTF-8 helpers for the tokenizer: validation, code point iteration and lossy decoding that
// follows the Unicode "maximal subpart" rule (one U+FFFD per ill-formed subsequence, as Rust's
// String::from_utf8_lossy and therefore Hugging Face tokenizers do). Stateless; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace loraplex::text {

// OK, or INVALID_ARGUMENT naming the byte offset of the first ill-formed sequence in `what`.
absl::Status ValidateUtf8(std::string_view bytes, absl::string_view what);

// Length in bytes of the well-formed code point starting at bytes[pos], or 0 if the bytes there
// are not a complete, well-formed sequence.
size_t Utf8SequenceLength(std::string_view bytes, size_t pos);

// Appends the code point `cp` encoded as UTF-8.
void AppendUtf8(uint32_t cp, std::string* out);

// Appends `bytes` to `out` with every maximal ill-formed subsequence replaced by U+FFFD. With
// `keep_incomplete_tail`, a trailing sequence that is cut short (but could still become valid
// with more bytes) is not consumed. Returns the number of bytes consumed.
size_t AppendUtf8Lossy(std::string_view bytes, bool keep_incomplete_tail, std::string* out);

}  // namespace loraplex::text
