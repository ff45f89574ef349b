#include "engine/kv/block_allocator.h"

#include "absl/strings/str_cat.h"

namespace loraplex::kv {

BlockAllocator::BlockAllocator(int32_t num_blocks)
    : refcounts_(num_blocks > 0 ? num_blocks : 0, 0) {
  free_.reserve(refcounts_.size());
  // Pushed in reverse so that a fresh allocator hands out 0, 1, 2, ... (easier to read in logs).
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

absl::StatusOr<int32_t> BlockAllocator::Allocate() {
  if (free_.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("kv cache: all ", num_blocks(), " blocks are in use"));
  }
  const int32_t block = free_.back();
  free_.pop_back();
  refcounts_[block] = 1;
  return block;
}

absl::Status BlockAllocator::CheckInUse(int32_t block, const char* op) const {
  if (block < 0 || block >= num_blocks()) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv cache ", op, ": block ", block, " out of range [0, ", num_blocks(), ")"));
  }
  if (refcounts_[block] == 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache ", op, ": block ", block, " is free"));
  }
  return absl::OkStatus();
}

absl::Status BlockAllocator::AddRef(int32_t block) {
  if (absl::Status s = CheckInUse(block, "AddRef"); !s.ok()) return s;
  ++refcounts_[block];
  return absl::OkStatus();
}

absl::Status BlockAllocator::Release(int32_t block) {
  if (absl::Status s = CheckInUse(block, "Release"); !s.ok()) return s;
  if (--refcounts_[block] == 0) free_.push_back(block);
  return absl::OkStatus();
}

int32_t BlockAllocator::refcount(int32_t block) const {
  if (block < 0 || block >= num_blocks()) return -1;
  return refcounts_[block];
}

}  // namespace loraplex::kv
