#include "engine/text/pre_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/text/byte_level.h"
#include "engine/text/utf8.h"

namespace loraplex::text {

// GPT-2's pre-tokenization pattern, used by ByteLevel when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Unicode White_Space, the set Oniguruma (and so Hugging Face tokenizers) uses for \s. PCRE2's
// \s with UCP also counts U+180E, which Unicode stopped calling whitespace in 6.3.
constexpr absl::string_view kWhiteSpace = R"(\t\n\x0B\f\r\x20\x{85}\x{A0}\x{1680}\x{2000}-\x{200A})"
                                          R"(\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// Replaces \s and \S (outside character classes) and \s (inside them) with explicit White_Space
// classes, leaving every other escape and construct as written.
std::string RewriteWhitespaceEscapes(std::string_view pattern) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char next = pattern[++i];
      if (next == 's') {
        out += in_class ? std::string(kWhiteSpace) : absl::StrCat("[", kWhiteSpace, "]");
      } else if (next == 'S' && !in_class) {
        out += absl::StrCat("[^", kWhiteSpace, "]");
      } else {
        out += c;
        out += next;
      }
      continue;
    }
    out += c;
    if (!in_class && c == '[') {
      in_class = true;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
    } else if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const size_t end = pattern.find(":]", i + 2);  // POSIX class such as [:alpha:]
      if (end != std::string_view::npos) {
        out.append(pattern.substr(i + 1, end + 1 - i));
        i = end + 1;
      }
    } else if (in_class && c == ']') {
      in_class = false;
    }
  }
  return out;
}

class Regex {
 public:
  // `literal`: the pattern is a plain string (tokenizer.json {"String": ...}).
  static absl::StatusOr<std::shared_ptr<const Regex>> Compile(std::string_view pattern,
                                                              bool literal,
                                                              absl::string_view field) {
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    const std::string source = literal ? std::string(pattern) : RewriteWhitespaceEscapes(pattern);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(),
                                     options, &error, &error_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat(field, ": pattern does not compile at offset ",
                                                     error_offset, ": ",
                                                     reinterpret_cast<const char*>(message)));
    }
    // JIT is an optimisation only: when unavailable the interpreter gives the same matches.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    return std::shared_ptr<const Regex>(new Regex(code));
  }

  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the matches of the pattern in `text` and the non-empty gaps between them, in order
  // (HF Split behavior "Isolated"). Empty matches are skipped.
  absl::Status SplitIsolated(std::string_view text, std::vector<std::string>* out) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match(
        pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t start = 0;
    size_t gap_start = 0;
    while (start < text.size()) {
      const int rc =
          pcre2_match(code_, subject, text.size(), start, PCRE2_NO_UTF_CHECK, match.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        return absl::InvalidArgumentError(absl::StrCat("pre-tokenizer regex failed at byte ", start,
                                                       ": ",
                                                       reinterpret_cast<const char*>(message)));
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.get());
      const size_t begin = ovector[0], end = ovector[1];
      if (end == begin) {
        // Step over one whole code point so the next search starts on a character boundary.
        const size_t length = Utf8SequenceLength(text, begin);
        start = begin + (length == 0 ? 1 : length);
        continue;
      }
      if (begin > gap_start) out->emplace_back(text.substr(gap_start, begin - gap_start));
      out->emplace_back(text.substr(begin, end - begin));
      start = gap_start = end;
    }
    if (gap_start < text.size()) out->emplace_back(text.substr(gap_start));
    return absl::OkStatus();
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

namespace {

absl::StatusOr<bool> OptionalBool(const nlohmann::json& object, const char* key, bool fallback,
                                  absl::string_view field) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".", key, ": expected a boolean, got ", it->dump()));
  }
  return it->get<bool>();
}

absl::StatusOr<std::string> TypeOf(const nlohmann::json& step, absl::string_view field) {
  if (!step.is_object() || !step.contains("type") || !step["type"].is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".type: missing or not a string"));
  }
  return step["type"].get<std::string>();
}

}  // namespace

PreTokenizer::PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;
PreTokenizer::~PreTokenizer() = default;

absl::StatusOr<PreTokenizer> PreTokenizer::FromJson(const nlohmann::json& config) {
  if (config.is_null()) {
    return absl::InvalidArgumentError(
        "pre_tokenizer: null is not supported (byte-level BPE needs a ByteLevel pre-tokenizer)");
  }
  std::vector<std::pair<const nlohmann::json*, std::string>> steps;
  LORAPLEX_ASSIGN_OR_RETURN(const std::string type, TypeOf(config, "pre_tokenizer"));
  if (type == "Sequence") {
    const auto it = config.find("pretokenizers");
    if (it == config.end() || !it->is_array()) {
      return absl::InvalidArgumentError("pre_tokenizer.pretokenizers: missing or not an array");
    }
    for (size_t i = 0; i < it->size(); ++i) {
      steps.emplace_back(&(*it)[i], absl::StrCat("pre_tokenizer.pretokenizers[", i, "]"));
    }
  } else {
    steps.emplace_back(&config, "pre_tokenizer");
  }

  PreTokenizer result;
  bool have_byte_level = false;
  for (const auto& [step, field] : steps) {
    LORAPLEX_ASSIGN_OR_RETURN(const std::string step_type, TypeOf(*step, field));
    if (have_byte_level) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".type: '", step_type,
                       "' after ByteLevel is not supported (ByteLevel must be last)"));
    }
    if (step_type == "ByteLevel") {
      have_byte_level = true;
      LORAPLEX_ASSIGN_OR_RETURN(result.add_prefix_space_,
                                OptionalBool(*step, "add_prefix_space", true, field));
      LORAPLEX_ASSIGN_OR_RETURN(const bool use_regex,
                                OptionalBool(*step, "use_regex", true, field));
      if (use_regex) {
        LORAPLEX_ASSIGN_OR_RETURN(result.byte_level_regex_,
                                  Regex::Compile(kGpt2Pattern, false, field));
      }
    } else if (step_type == "Split") {
      const auto behavior = step->find("behavior");
      if (behavior == step->end() || *behavior != "Isolated") {
        return absl::InvalidArgumentError(absl::StrCat(
            field, ".behavior: ", behavior == step->end() ? "missing" : behavior->dump(),
            " is not supported (only \"Isolated\")"));
      }
      LORAPLEX_ASSIGN_OR_RETURN(const bool invert, OptionalBool(*step, "invert", false, field));
      if (invert) {
        return absl::InvalidArgumentError(absl::StrCat(field, ".invert: true is not supported"));
      }
      const auto pattern = step->find("pattern");
      const bool is_regex = pattern != step->end() && pattern->is_object() &&
                            pattern->contains("Regex") && (*pattern)["Regex"].is_string();
      const bool is_string = pattern != step->end() && pattern->is_object() &&
                             pattern->contains("String") && (*pattern)["String"].is_string();
      if (!is_regex && !is_string) {
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".pattern: expected {\"Regex\": ...} or {\"String\": ...}"));
      }
      const std::string text = (*pattern)[is_regex ? "Regex" : "String"].get<std::string>();
      LORAPLEX_ASSIGN_OR_RETURN(auto regex,
                                Regex::Compile(text, !is_regex, absl::StrCat(field, ".pattern")));
      result.splits_.push_back(std::move(regex));
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".type: '", step_type, "' is not supported"));
    }
  }
  if (!have_byte_level) {
    return absl::InvalidArgumentError(
        "pre_tokenizer: no ByteLevel step (only byte-level BPE is supported)");
  }
  return result;
}

absl::Status PreTokenizer::Run(std::string_view text, std::vector<std::string>* pieces) const {
  std::vector<std::string> current{std::string(text)};
  std::vector<std::string> next;
  for (const auto& regex : splits_) {
    next.clear();
    for (const std::string& piece : current) {
      LORAPLEX_RETURN_IF_ERROR(regex->SplitIsolated(piece, &next));
    }
    current.swap(next);
  }
  // ByteLevel works on each split separately, so a prefix space goes before every split, as in
  // Hugging Face tokenizers.
  next.clear();
  for (std::string& piece : current) {
    // Built anew rather than insert(0, " "), which trips GCC 12's -Wrestrict false positive.
    if (add_prefix_space_ && (piece.empty() || piece[0] != ' ')) piece = std::string(" ") + piece;
    if (byte_level_regex_ != nullptr) {
      LORAPLEX_RETURN_IF_ERROR(byte_level_regex_->SplitIsolated(piece, &next));
    } else {
      next.push_back(std::move(piece));
    }
  }
  for (const std::string& piece : next) pieces->push_back(BytesToByteLevel(piece));
  return absl::OkStatus();
}

}  // namespace loraplex::text
