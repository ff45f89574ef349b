// BlockAllocator: hands out ids of the paged KV cache's fixed blocks from a free list, with a
// reference count per block so sequences can later share prefix blocks. Ids only; the memory
// lives with the model. Engine thread only.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace loraplex::kv {

class BlockAllocator {
 public:
  // `num_blocks` blocks with ids 0..num_blocks-1, all free.
  explicit BlockAllocator(int32_t num_blocks);
  BlockAllocator(const BlockAllocator&) = delete;
  BlockAllocator& operator=(const BlockAllocator&) = delete;

  // Takes a free block with refcount 1. RESOURCE_EXHAUSTED when none is free.
  absl::StatusOr<int32_t> Allocate();
  // Adds a reference to a block in use (prefix sharing). INVALID_ARGUMENT for a bad or free id.
  absl::Status AddRef(int32_t block);
  // Drops one reference; the block returns to the free list at zero.
  // INVALID_ARGUMENT for a bad or already free id.
  absl::Status Release(int32_t block);

  int32_t num_blocks() const { return static_cast<int32_t>(refcounts_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }
  // 0 for a free block; -1 for an id out of range.
  int32_t refcount(int32_t block) const;

 private:
  absl::Status CheckInUse(int32_t block, const char* op) const;

  std::vector<int32_t> refcounts_;  // [num_blocks]
  std::vector<int32_t> free_;       // stack; the most recently freed block is reused first
};

}  // namespace loraplex::kv
