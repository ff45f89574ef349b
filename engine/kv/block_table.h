// BlockTable: the KV blocks of one sequence, in position order. Position p lives in slot
// blocks[p / block_size] * block_size + p % block_size. Engine thread only.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/kv/block_allocator.h"

namespace loraplex::kv {

// Blocks needed to hold `num_tokens` tokens.
inline int64_t BlocksForTokens(int64_t num_tokens, int32_t block_size) {
  return num_tokens <= 0 ? 0 : (num_tokens + block_size - 1) / block_size;
}

class BlockTable {
 public:
  explicit BlockTable(int32_t block_size) : block_size_(block_size) {}
  BlockTable(BlockTable&&) = default;
  BlockTable& operator=(BlockTable&&) = default;
  BlockTable(const BlockTable&) = delete;
  BlockTable& operator=(const BlockTable&) = delete;

  // Grows the table until it holds at least `num_tokens` tokens. All or nothing: on
  // RESOURCE_EXHAUSTED no block was taken.
  absl::Status Reserve(int64_t num_tokens, BlockAllocator* allocator);
  // Reserves room for `count` more tokens after the ones appended so far and counts them.
  absl::Status AppendTokens(int64_t count, BlockAllocator* allocator);
  // The cache slot of position `pos`; OUT_OF_RANGE when no block holds it yet.
  absl::StatusOr<int32_t> SlotOf(int64_t pos) const;
  // Releases every block (each once) and forgets the tokens.
  void FreeAll(BlockAllocator* allocator);

  const std::vector<int32_t>& blocks() const { return blocks_; }
  int32_t block_size() const { return block_size_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t capacity_tokens() const { return static_cast<int64_t>(blocks_.size()) * block_size_; }

 private:
  int32_t block_size_;
  int64_t num_tokens_ = 0;
  std::vector<int32_t> blocks_;
};

}  // namespace loraplex::kv
