// The BPE model of a byte-level tokenizer.json: vocabulary, ranked merges ("a b" strings or
// ["a","b"] pairs) and the merge loop that turns one byte-level pre-token into ids.
// Immutable after construction; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace loraplex::text {

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" object; `added_contents` are the added tokens, which may
  // sit in the vocabulary without merges. INVALID_ARGUMENT naming the field for an unsupported
  // type or option, malformed vocab/merges, merges that name unknown tokens, or an empty merge
  // list beside a vocabulary of multi-character tokens.
  static absl::StatusOr<BpeModel> FromJson(const nlohmann::json& model,
                                           const absl::flat_hash_set<std::string>& added_contents);

  // Appends the ids of one byte-level pre-token.
  void Tokenize(std::string_view piece, std::vector<int32_t>* ids) const;

  // token (byte-level string) -> id.
  const absl::flat_hash_map<std::string, int32_t>& vocab() const { return vocab_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  absl::flat_hash_map<std::string, int32_t> vocab_;
  absl::flat_hash_map<uint64_t, Merge> merges_;  // PairKey(left id, right id) -> merge
  bool ignore_merges_ = false;  // a pre-token found whole in the vocabulary skips merging
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
};

}  // namespace loraplex::text
