#include "engine/kv/block_allocator.h"

#include <catch2/catch.hpp>
#include <set>

namespace loraplex::kv {
namespace {

TEST_CASE("BlockAllocator hands out every block once and then runs out") {
  BlockAllocator alloc(4);
  std::set<int32_t> seen;
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<int32_t> b = alloc.Allocate();
    REQUIRE(b.ok());
    REQUIRE(*b >= 0);
    REQUIRE(*b < 4);
    seen.insert(*b);
  }
  CHECK(seen.size() == 4);
  CHECK(alloc.num_free() == 0);
  CHECK(alloc.num_used() == 4);
  absl::StatusOr<int32_t> none = alloc.Allocate();
  CHECK(none.status().code() == absl::StatusCode::kResourceExhausted);
}

TEST_CASE("BlockAllocator returns a block to the free list when its last reference goes") {
  BlockAllocator alloc(2);
  const int32_t b = *alloc.Allocate();
  REQUIRE(alloc.AddRef(b).ok());
  CHECK(alloc.refcount(b) == 2);
  REQUIRE(alloc.Release(b).ok());
  CHECK(alloc.refcount(b) == 1);
  CHECK(alloc.num_free() == 1);
  REQUIRE(alloc.Release(b).ok());
  CHECK(alloc.refcount(b) == 0);
  CHECK(alloc.num_free() == 2);
}

TEST_CASE("BlockAllocator refuses to release or share a free or unknown block") {
  BlockAllocator alloc(2);
  CHECK(alloc.Release(0).code() == absl::StatusCode::kInvalidArgument);
  CHECK(alloc.AddRef(1).code() == absl::StatusCode::kInvalidArgument);
  CHECK(alloc.Release(7).code() == absl::StatusCode::kInvalidArgument);
  CHECK(alloc.Release(-1).code() == absl::StatusCode::kInvalidArgument);
  CHECK(alloc.refcount(9) == -1);
  CHECK(alloc.num_free() == 2);
}

}  // namespace
}  // namespace loraplex::kv
