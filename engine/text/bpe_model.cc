#include "engine/text/bpe_model.h"

#include <queue>

#include "absl/strings/str_cat.h"
#include "engine/text/utf8.h"

namespace loraplex::text {
namespace {

// Number of code points in valid UTF-8 `s`.
size_t CountCodePoints(std::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
  return n;
}

// An option that must be absent, null or equal to its neutral value.
absl::Status CheckNeutral(const nlohmann::json& model, const char* key,
                          const nlohmann::json& neutral) {
  auto it = model.find(key);
  if (it == model.end() || it->is_null() || *it == neutral) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("model.", key, ": ", it->dump(), " is not supported"));
}

}  // namespace

absl::StatusOr<BpeModel> BpeModel::FromJson(
    const nlohmann::json& model, const absl::flat_hash_set<std::string>& added_contents) {
  if (!model.is_object()) return absl::InvalidArgumentError("model: missing or not an object");
  if (auto type = model.find("type"); type != model.end() && *type != "BPE") {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.type: ", type->is_string() ? "'" + type->get<std::string>() + "'" : type->dump(),
        " is not supported (only BPE)"));
  }
  for (const auto& [key, neutral] :
       std::vector<std::pair<const char*, nlohmann::json>>{{"dropout", 0.0},
                                                           {"continuing_subword_prefix", ""},
                                                           {"end_of_word_suffix", ""},
                                                           {"byte_fallback", false}}) {
    if (absl::Status s = CheckNeutral(model, key, neutral); !s.ok()) return s;
  }

  BpeModel result;
  const auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError("model.vocab: missing or not an object");
  }
  size_t multi_char_tokens = 0;
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.vocab['", token, "']: id ", id.dump(), " is not a valid id"));
    }
    if (absl::Status s = ValidateUtf8(token, absl::StrCat("model.vocab key at id ", id.dump()));
        !s.ok()) {
      return s;
    }
    result.vocab_[token] = static_cast<int32_t>(id.get<int64_t>());
    if (CountCodePoints(token) > 1 && !added_contents.contains(token)) ++multi_char_tokens;
  }

  const auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return absl::InvalidArgumentError("model.merges: missing or not an array");
  }
  if (merges->empty() && multi_char_tokens > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.merges: empty, but model.vocab has ", multi_char_tokens,
                     " multi-character tokens that could never be produced"));
  }
  for (size_t rank = 0; rank < merges->size(); ++rank) {
    const nlohmann::json& entry = (*merges)[rank];
    std::string left, right;
    if (entry.is_string()) {
      // "a b": byte-level tokens never contain a space (it is written "Ġ").
      const std::string line = entry.get<std::string>();
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(
            "model.merges[", rank, "]: '", line, "' is not two tokens separated by one space"));
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (entry.is_array() && entry.size() == 2 && entry[0].is_string() &&
               entry[1].is_string()) {
      left = entry[0].get<std::string>();
      right = entry[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "model.merges[", rank, "]: expected \"a b\" or [\"a\", \"b\"], got ", entry.dump()));
    }
    const std::string merged = left + right;
    for (const std::string* token :
         std::initializer_list<const std::string*>{&left, &right, &merged}) {
      if (!result.vocab_.contains(*token)) {
        return absl::InvalidArgumentError(
            absl::StrCat("model.merges[", rank, "]: token '", *token, "' is not in model.vocab"));
      }
    }
    // A repeated pair keeps its first (best) rank, as in Hugging Face tokenizers.
    result.merges_.try_emplace(PairKey(result.vocab_[left], result.vocab_[right]),
                               Merge{static_cast<int32_t>(rank), result.vocab_[merged]});
  }

  if (auto it = model.find("ignore_merges"); it != model.end() && !it->is_null()) {
    if (!it->is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.ignore_merges: expected a boolean, got ", it->dump()));
    }
    result.ignore_merges_ = it->get<bool>();
  }
  if (auto it = model.find("fuse_unk"); it != model.end() && it->is_boolean()) {
    result.fuse_unk_ = it->get<bool>();
  }
  if (auto it = model.find("unk_token"); it != model.end() && !it->is_null()) {
    if (!it->is_string() || !result.vocab_.contains(it->get<std::string>())) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.unk_token: ", it->dump(), " is not in model.vocab"));
    }
    result.unk_id_ = result.vocab_[it->get<std::string>()];
  }
  return result;
}

void BpeModel::Tokenize(std::string_view piece, std::vector<int32_t>* ids) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(absl::string_view(piece.data(), piece.size())); it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }

  // Symbols form a linked list over the characters; a merge grows the left symbol and unlinks
  // the right one, so positions stay valid and stale heap entries can be recognised.
  struct Symbol {
    int32_t id;
    int prev;
    int next;
  };
  std::vector<Symbol> symbols;
  bool last_was_unk = false;
  for (size_t pos = 0; pos < piece.size();) {
    size_t length = Utf8SequenceLength(piece, pos);
    if (length == 0) length = 1;  // pieces are valid UTF-8; this only guards the loop
    auto it = vocab_.find(absl::string_view(piece.data() + pos, length));
    pos += length;
    int32_t id;
    if (it != vocab_.end()) {
      id = it->second;
      last_was_unk = false;
    } else if (unk_id_.has_value()) {
      if (fuse_unk_ && last_was_unk) continue;
      id = *unk_id_;
      last_was_unk = true;
    } else {
      continue;  // Hugging Face drops characters it cannot represent when there is no unk
    }
    const int index = static_cast<int>(symbols.size());
    symbols.push_back(Symbol{id, index - 1, -1});
    if (index > 0) symbols[index - 1].next = index;
  }

  struct Candidate {
    int32_t rank;
    int pos;
    int32_t left;
    int32_t right;
    int32_t merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push_pair = [&](int pos) {
    if (pos < 0 || symbols[pos].next < 0) return;
    const int32_t left = symbols[pos].id, right = symbols[symbols[pos].next].id;
    if (auto it = merges_.find(PairKey(left, right)); it != merges_.end()) {
      queue.push(Candidate{it->second.rank, pos, left, right, it->second.merged_id});
    }
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push_pair(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.id != top.left || left.next < 0) continue;  // stale: the left symbol was merged
    Symbol& right = symbols[left.next];
    if (right.id != top.right) continue;  // stale: the right symbol was merged
    left.id = top.merged;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    right.id = -1;
    push_pair(left.prev);
    push_pair(top.pos);
  }
  for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    ids->push_back(symbols[i].id);
  }
}

}  // namespace loraplex::text
