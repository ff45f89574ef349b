#include "engine/kv/block_table.h"

#include "absl/strings/str_cat.h"

namespace loraplex::kv {

absl::Status BlockTable::Reserve(int64_t num_tokens, BlockAllocator* allocator) {
  const int64_t needed =
      BlocksForTokens(num_tokens, block_size_) - static_cast<int64_t>(blocks_.size());
  if (needed <= 0) return absl::OkStatus();
  if (needed > allocator->num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("kv cache: ", num_tokens, " tokens need ",
                                                     needed, " more blocks, only ",
                                                     allocator->num_free(), " free"));
  }
  for (int64_t i = 0; i < needed; ++i) {
    // Cannot fail: enough blocks were checked to be free above.
    absl::StatusOr<int32_t> block = allocator->Allocate();
    if (!block.ok()) return block.status();
    blocks_.push_back(*block);
  }
  return absl::OkStatus();
}

absl::Status BlockTable::AppendTokens(int64_t count, BlockAllocator* allocator) {
  if (count < 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: cannot append ", count, " tokens"));
  }
  if (absl::Status s = Reserve(num_tokens_ + count, allocator); !s.ok()) return s;
  num_tokens_ += count;
  return absl::OkStatus();
}

absl::StatusOr<int32_t> BlockTable::SlotOf(int64_t pos) const {
  if (pos < 0 || pos >= capacity_tokens()) {
    return absl::OutOfRangeError(absl::StrCat("kv cache: position ", pos, " outside the ",
                                              capacity_tokens(), " reserved tokens"));
  }
  return blocks_[pos / block_size_] * block_size_ + static_cast<int32_t>(pos % block_size_);
}

void BlockTable::FreeAll(BlockAllocator* allocator) {
  for (int32_t block : blocks_) {
    // Every block here was allocated for this table and is released once, so Release cannot
    // fail; a failure would be a broken invariant that the allocator counts already expose.
    allocator->Release(block).IgnoreError();
  }
  blocks_.clear();
  num_tokens_ = 0;
}

}  // namespace loraplex::kv
