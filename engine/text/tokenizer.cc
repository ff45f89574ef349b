// Loads a Hugging Face tokenizer.json (byte-level BPE) and implements Tokenizer over BpeModel and
// PreTokenizer: added-token splitting, the post-processor template and byte-level decoding.
#include "engine/text/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/text/bpe_model.h"
#include "engine/text/byte_level.h"
#include "engine/text/pre_tokenizer.h"
#include "engine/text/utf8.h"
#include "nlohmann/json.hpp"

namespace loraplex::text {
namespace {

using Json = nlohmann::json;

// Vocabularies beyond this are not real tokenizers; the bound keeps a corrupt id from turning
// into a huge allocation.
constexpr int64_t kMaxVocab = int64_t{1} << 24;

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;  // absorbs whitespace before the token
  bool rstrip = false;  // absorbs whitespace after the token
};

// A run of input text: either plain text for the pre-tokenizer or one added token.
struct Segment {
  std::string_view text;
  int32_t added_id = -1;
};

// Rust's char::is_whitespace (Unicode White_Space), which HF uses for lstrip/rstrip.
bool IsWhitespace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

uint32_t DecodeCodePoint(std::string_view s, size_t pos, size_t length) {
  const auto b0 = static_cast<uint8_t>(s[pos]);
  if (length == 1) return b0;
  uint32_t cp = b0 & (0x7F >> length);
  for (size_t i = 1; i < length; ++i) cp = (cp << 6) | (static_cast<uint8_t>(s[pos + i]) & 0x3F);
  return cp;
}

// Bytes of whitespace ending at `end` (for lstrip).
size_t WhitespaceBefore(std::string_view s, size_t begin, size_t end) {
  size_t pos = end;
  while (pos > begin) {
    size_t start = pos - 1;
    while (start > begin && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) --start;
    if (!IsWhitespace(DecodeCodePoint(s, start, pos - start))) break;
    pos = start;
  }
  return end - pos;
}

// Bytes of whitespace starting at `pos` (for rstrip).
size_t WhitespaceAfter(std::string_view s, size_t pos) {
  size_t end = pos;
  while (end < s.size()) {
    const size_t length = Utf8SequenceLength(s, end);
    if (length == 0 || !IsWhitespace(DecodeCodePoint(s, end, length))) break;
    end += length;
  }
  return end - pos;
}

absl::StatusOr<bool> OptionalBool(const Json& object, const char* key, absl::string_view field) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return false;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".", key, ": expected a boolean, got ", it->dump()));
  }
  return it->get<bool>();
}

class BpeTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(const Json& root);
  // added_by_first_byte_ points into added_.
  BpeTokenizer(const BpeTokenizer&) = delete;
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override;
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                     bool skip_special_tokens) const override;
  std::string TokenBytes(int32_t id, bool skip_special_tokens) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(token_bytes_.size()); }
  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < vocab_size() && is_special_[id];
  }
  std::optional<int32_t> TokenToId(std::string_view token) const override;
  std::optional<int32_t> bos_id() const override {
    return prefix_.empty() ? std::nullopt : std::optional<int32_t>(prefix_.front());
  }

 private:
  BpeTokenizer(BpeModel model, PreTokenizer pre_tokenizer, std::vector<AddedToken> added)
      : model_(std::move(model)),
        pre_tokenizer_(std::move(pre_tokenizer)),
        added_(std::move(added)) {}

  absl::Status ParsePostProcessor(const Json& config, const std::string& field,
                                  bool* have_template);
  void BuildTables();
  std::vector<Segment> SplitOnAddedTokens(std::string_view text) const;

  BpeModel model_;
  PreTokenizer pre_tokenizer_;
  std::vector<AddedToken> added_;
  absl::flat_hash_map<std::string, int32_t> added_ids_;  // content -> id
  // Added tokens by first byte, longest first, for leftmost-longest matching.
  std::vector<std::vector<const AddedToken*>> added_by_first_byte_;
  std::vector<int32_t> prefix_;           // post-processor ids before the text (BOS)
  std::vector<int32_t> suffix_;           // post-processor ids after the text
  std::vector<std::string> token_bytes_;  // id -> raw bytes; empty for ids with no token
  std::vector<bool> is_special_;
  std::vector<bool> has_token_;
};

absl::StatusOr<std::vector<AddedToken>> ParseAddedTokens(const Json& root) {
  std::vector<AddedToken> added;
  auto list = root.find("added_tokens");
  if (list == root.end() || list->is_null()) return added;
  if (!list->is_array()) return absl::InvalidArgumentError("added_tokens: not an array");
  for (size_t i = 0; i < list->size(); ++i) {
    const Json& entry = (*list)[i];
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    if (!entry.is_object() || !entry.contains("id") || !entry["id"].is_number_integer() ||
        entry["id"].get<int64_t>() < 0 || entry["id"].get<int64_t>() >= kMaxVocab) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".id: missing or not a valid id"));
    }
    if (!entry.contains("content") || !entry["content"].is_string() ||
        entry["content"].get<std::string>().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".content: missing, empty or not a string"));
    }
    AddedToken token;
    token.id = static_cast<int32_t>(entry["id"].get<int64_t>());
    token.content = entry["content"].get<std::string>();
    LORAPLEX_RETURN_IF_ERROR(ValidateUtf8(token.content, field + ".content"));
    LORAPLEX_ASSIGN_OR_RETURN(token.special, OptionalBool(entry, "special", field));
    LORAPLEX_ASSIGN_OR_RETURN(token.lstrip, OptionalBool(entry, "lstrip", field));
    LORAPLEX_ASSIGN_OR_RETURN(token.rstrip, OptionalBool(entry, "rstrip", field));
    LORAPLEX_ASSIGN_OR_RETURN(const bool single_word, OptionalBool(entry, "single_word", field));
    if (single_word) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".single_word: true is not supported"));
    }
    added.push_back(std::move(token));
  }
  return added;
}

absl::Status BpeTokenizer::ParsePostProcessor(const Json& config, const std::string& field,
                                              bool* have_template) {
  if (config.is_null()) return absl::OkStatus();
  if (!config.is_object() || !config.contains("type") || !config["type"].is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".type: missing or not a string"));
  }
  const std::string type = config["type"].get<std::string>();
  if (type == "ByteLevel") return absl::OkStatus();  // it only adjusts offsets
  if (type == "Sequence") {
    const auto processors = config.find("processors");
    if (processors == config.end() || !processors->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".processors: missing or not an array"));
    }
    for (size_t i = 0; i < processors->size(); ++i) {
      LORAPLEX_RETURN_IF_ERROR(ParsePostProcessor(
          (*processors)[i], absl::StrCat(field, ".processors[", i, "]"), have_template));
    }
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") {
    return absl::InvalidArgumentError(absl::StrCat(field, ".type: '", type, "' is not supported"));
  }
  if (*have_template) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": more than one TemplateProcessing is not supported"));
  }
  *have_template = true;
  const auto single = config.find("single");
  if (single == config.end() || !single->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".single: missing or not an array"));
  }
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const Json& piece = (*single)[i];
    const std::string piece_field = absl::StrCat(field, ".single[", i, "]");
    if (piece.contains("Sequence")) {
      if (seen_sequence) {
        return absl::InvalidArgumentError(absl::StrCat(piece_field, ": a second Sequence"));
      }
      seen_sequence = true;
      continue;
    }
    if (!piece.contains("SpecialToken") || !piece["SpecialToken"].contains("id") ||
        !piece["SpecialToken"]["id"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(piece_field, ": expected {\"SpecialToken\": {\"id\": ...}} or Sequence"));
    }
    const std::string name = piece["SpecialToken"]["id"].get<std::string>();
    const Json* ids = nullptr;
    if (auto specials = config.find("special_tokens");
        specials != config.end() && specials->is_object() && specials->contains(name)) {
      ids = &(*specials)[name]["ids"];
    }
    if (ids == nullptr || !ids->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".special_tokens['", name, "'].ids: missing or not an array"));
    }
    for (const Json& id : *ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= kMaxVocab) {
        return absl::InvalidArgumentError(absl::StrCat(
            field, ".special_tokens['", name, "'].ids: ", id.dump(), " is not a valid id"));
      }
      (seen_sequence ? suffix_ : prefix_).push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  }
  if (!seen_sequence) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".single: no Sequence A"));
  }
  return absl::OkStatus();
}

void BpeTokenizer::BuildTables() {
  int64_t size = 0;
  for (const auto& [token, id] : model_.vocab()) size = std::max<int64_t>(size, int64_t{id} + 1);
  for (const AddedToken& token : added_) size = std::max<int64_t>(size, int64_t{token.id} + 1);
  token_bytes_.assign(size, "");
  is_special_.assign(size, false);
  has_token_.assign(size, false);
  // Hugging Face's ByteLevel decoder maps a token back through the byte alphabet and keeps its
  // text unchanged when some character is outside the alphabet (added tokens such as "<s> x").
  auto bytes_of = [](const std::string& token) {
    std::optional<std::string> bytes = ByteLevelToBytes(token);
    return bytes.has_value() ? *bytes : token;
  };
  for (const auto& [token, id] : model_.vocab()) {
    token_bytes_[id] = bytes_of(token);
    has_token_[id] = true;
  }
  added_by_first_byte_.assign(256, {});
  for (const AddedToken& token : added_) {
    token_bytes_[token.id] = bytes_of(token.content);
    has_token_[token.id] = true;
    is_special_[token.id] = token.special;
    added_ids_[token.content] = token.id;
    added_by_first_byte_[static_cast<uint8_t>(token.content[0])].push_back(&token);
  }
  for (auto& list : added_by_first_byte_) {
    std::stable_sort(list.begin(), list.end(), [](const AddedToken* a, const AddedToken* b) {
      return a->content.size() > b->content.size();
    });
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> BpeTokenizer::Build(const Json& root) {
  if (!root.is_object()) return absl::InvalidArgumentError("tokenizer.json: not a JSON object");
  if (auto normalizer = root.find("normalizer");
      normalizer != root.end() && !normalizer->is_null()) {
    const bool typed = normalizer->is_object() && normalizer->contains("type") &&
                       (*normalizer)["type"].is_string();
    return absl::InvalidArgumentError(absl::StrCat(
        "normalizer.type: ",
        typed ? "'" + (*normalizer)["type"].get<std::string>() + "'" : normalizer->dump(),
        " is not supported (only a null normalizer)"));
  }
  auto decoder = root.find("decoder");
  if (decoder == root.end() || !decoder->is_object() || !decoder->contains("type") ||
      (*decoder)["type"] != "ByteLevel") {
    return absl::InvalidArgumentError(
        absl::StrCat("decoder: ", decoder == root.end() ? "missing" : decoder->dump(),
                     " is not supported (only ByteLevel)"));
  }

  auto model = root.find("model");
  if (model == root.end()) return absl::InvalidArgumentError("model: missing");
  auto pre = root.find("pre_tokenizer");
  LORAPLEX_ASSIGN_OR_RETURN(PreTokenizer pre_tokenizer,
                            PreTokenizer::FromJson(pre == root.end() ? Json() : *pre));

  LORAPLEX_ASSIGN_OR_RETURN(std::vector<AddedToken> added, ParseAddedTokens(root));
  absl::flat_hash_set<std::string> added_contents;
  for (const AddedToken& token : added) added_contents.insert(token.content);
  LORAPLEX_ASSIGN_OR_RETURN(BpeModel bpe, BpeModel::FromJson(*model, added_contents));

  std::unique_ptr<BpeTokenizer> tokenizer(
      new BpeTokenizer(std::move(bpe), std::move(pre_tokenizer), std::move(added)));
  bool have_template = false;
  if (auto post = root.find("post_processor"); post != root.end()) {
    LORAPLEX_RETURN_IF_ERROR(
        tokenizer->ParsePostProcessor(*post, "post_processor", &have_template));
  }
  tokenizer->BuildTables();
  std::vector<int32_t> template_ids = tokenizer->prefix_;
  template_ids.insert(template_ids.end(), tokenizer->suffix_.begin(), tokenizer->suffix_.end());
  for (int32_t id : template_ids) {
    if (id >= tokenizer->vocab_size() || !tokenizer->has_token_[id]) {
      return absl::InvalidArgumentError(
          absl::StrCat("post_processor: id ", id, " is not in the vocabulary"));
    }
  }
  return std::unique_ptr<Tokenizer>(std::move(tokenizer));
}

std::vector<Segment> BpeTokenizer::SplitOnAddedTokens(std::string_view text) const {
  std::vector<Segment> segments;
  size_t plain_start = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* match = nullptr;
    for (const AddedToken* token : added_by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      if (text.substr(pos).starts_with(token->content)) {
        match = token;
        break;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    size_t begin = pos;
    size_t end = pos + match->content.size();
    if (match->lstrip) begin -= WhitespaceBefore(text, plain_start, begin);
    if (match->rstrip) end += WhitespaceAfter(text, end);
    if (begin > plain_start) segments.push_back({text.substr(plain_start, begin - plain_start)});
    segments.push_back({text.substr(begin, end - begin), match->id});
    pos = plain_start = end;
  }
  if (plain_start < text.size()) segments.push_back({text.substr(plain_start)});
  return segments;
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text,
                                                          bool add_special_tokens) const {
  LORAPLEX_RETURN_IF_ERROR(ValidateUtf8(text, "text"));
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = prefix_;
  std::vector<std::string> pieces;
  for (const Segment& segment : SplitOnAddedTokens(text)) {
    if (segment.added_id >= 0) {
      ids.push_back(segment.added_id);
      continue;
    }
    pieces.clear();
    LORAPLEX_RETURN_IF_ERROR(pre_tokenizer_.Run(segment.text, &pieces));
    for (const std::string& piece : pieces) model_.Tokenize(piece, &ids);
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
  return ids;
}

absl::StatusOr<std::string> BpeTokenizer::Decode(const std::vector<int32_t>& ids,
                                                 bool skip_special_tokens) const {
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= vocab_size() || !has_token_[id]) {
      return absl::InvalidArgumentError(
          absl::StrCat("ids[", i, "]: ", id, " is not in the vocabulary of size ", vocab_size()));
    }
    if (skip_special_tokens && is_special_[id]) continue;
    bytes += token_bytes_[id];
  }
  std::string text;
  AppendUtf8Lossy(bytes, /*keep_incomplete_tail=*/false, &text);
  return text;
}

std::string BpeTokenizer::TokenBytes(int32_t id, bool skip_special_tokens) const {
  if (id < 0 || id >= vocab_size()) return "";
  if (skip_special_tokens && is_special_[id]) return "";
  return token_bytes_[id];
}

std::optional<int32_t> BpeTokenizer::TokenToId(std::string_view token_view) const {
  // Debian's abseil has its own string_view type, which the maps' heterogeneous lookup needs.
  const absl::string_view token(token_view.data(), token_view.size());
  if (auto it = added_ids_.find(token); it != added_ids_.end()) return it->second;
  if (auto it = model_.vocab().find(token); it != model_.vocab().end()) return it->second;
  return std::nullopt;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json_text) {
  // nlohmann reports malformed input and type mismatches by exceptions; none may leave here.
  try {
    const Json root = Json::parse(json_text);
    return BpeTokenizer::Build(root);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("tokenizer file '", path, "' not found"));
  std::stringstream contents;
  contents << file.rdbuf();
  if (!file.good() && !file.eof()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer file '", path, "': read failed"));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = FromJson(contents.str());
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), absl::StrCat("'", path, "'"));
  return tokenizer;
}

}  // namespace loraplex::text
