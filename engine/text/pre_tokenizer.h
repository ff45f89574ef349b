// Pre-tokenization of byte-level BPE tokenizers: regex Split steps (PCRE2, UTF + Unicode
// properties) followed by ByteLevel (optional prefix space, optional GPT-2 regex, byte->unicode
// mapping). Built from tokenizer.json's "pre_tokenizer". Immutable after construction; thread-safe.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace loraplex::text {

// A compiled PCRE2 pattern that splits text into matches and the gaps between them.
class Regex;

class PreTokenizer {
 public:
  // `config` is the "pre_tokenizer" object; errors are INVALID_ARGUMENT naming the field.
  static absl::StatusOr<PreTokenizer> FromJson(const nlohmann::json& config);

  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;
  ~PreTokenizer();

  // Splits valid UTF-8 `text` (a run between added tokens) into byte-level pieces, appended to
  // `pieces`. Fails only if PCRE2 reports a matching error (e.g. its match limit).
  absl::Status Run(std::string_view text, std::vector<std::string>* pieces) const;

 private:
  PreTokenizer();

  std::vector<std::shared_ptr<const Regex>> splits_;  // applied in order, behavior Isolated
  bool add_prefix_space_ = false;
  std::shared_ptr<const Regex> byte_level_regex_;  // GPT-2 pattern when use_regex, else null
};

}  // namespace loraplex::text
