#include "engine/kv/block_table.h"

#include <catch2/catch.hpp>

namespace loraplex::kv {
namespace {

TEST_CASE("BlocksForTokens rounds up to whole blocks") {
  CHECK(BlocksForTokens(0, 4) == 0);
  CHECK(BlocksForTokens(1, 4) == 1);
  CHECK(BlocksForTokens(4, 4) == 1);
  CHECK(BlocksForTokens(5, 4) == 2);
}

TEST_CASE("BlockTable allocates a block only when appended tokens cross a block boundary") {
  BlockAllocator alloc(8);
  BlockTable table(4);
  REQUIRE(table.AppendTokens(3, &alloc).ok());
  CHECK(table.blocks().size() == 1);
  REQUIRE(table.AppendTokens(1, &alloc).ok());
  CHECK(table.blocks().size() == 1);
  REQUIRE(table.AppendTokens(1, &alloc).ok());
  CHECK(table.blocks().size() == 2);
  CHECK(table.num_tokens() == 5);
  CHECK(table.capacity_tokens() == 8);
  CHECK(alloc.num_used() == 2);
}

TEST_CASE("BlockTable maps a position to block * block_size + offset") {
  BlockAllocator alloc(8);
  // Take blocks 0..2 for someone else so the table's blocks are not the identity.
  BlockTable other(4);
  REQUIRE(other.Reserve(12, &alloc).ok());
  BlockTable table(4);
  REQUIRE(table.AppendTokens(6, &alloc).ok());
  const int32_t b0 = table.blocks()[0];
  const int32_t b1 = table.blocks()[1];
  CHECK(b0 != b1);
  CHECK(*table.SlotOf(0) == b0 * 4);
  CHECK(*table.SlotOf(3) == b0 * 4 + 3);
  CHECK(*table.SlotOf(4) == b1 * 4);
  CHECK(*table.SlotOf(5) == b1 * 4 + 1);
  CHECK(table.SlotOf(8).status().code() == absl::StatusCode::kOutOfRange);
  CHECK(table.SlotOf(-1).status().code() == absl::StatusCode::kOutOfRange);
}

TEST_CASE("BlockTable takes no block when the allocator cannot cover the whole request") {
  BlockAllocator alloc(3);
  BlockTable table(4);
  REQUIRE(table.AppendTokens(4, &alloc).ok());
  const absl::Status s = table.AppendTokens(9, &alloc);  // needs 3 more blocks, 2 are free
  CHECK(s.code() == absl::StatusCode::kResourceExhausted);
  CHECK(table.blocks().size() == 1);
  CHECK(table.num_tokens() == 4);
  CHECK(alloc.num_free() == 2);
}

TEST_CASE("BlockTable FreeAll returns every block and forgets the tokens") {
  BlockAllocator alloc(4);
  BlockTable table(2);
  REQUIRE(table.AppendTokens(7, &alloc).ok());
  CHECK(alloc.num_used() == 4);
  table.FreeAll(&alloc);
  CHECK(alloc.num_used() == 0);
  CHECK(table.blocks().empty());
  CHECK(table.num_tokens() == 0);
  REQUIRE(table.AppendTokens(2, &alloc).ok());
  CHECK(alloc.num_used() == 1);
}

TEST_CASE("BlockTable FreeAll keeps blocks that another sequence still shares") {
  BlockAllocator alloc(4);
  BlockTable table(2);
  REQUIRE(table.AppendTokens(2, &alloc).ok());
  const int32_t shared = table.blocks()[0];
  REQUIRE(alloc.AddRef(shared).ok());
  table.FreeAll(&alloc);
  CHECK(alloc.refcount(shared) == 1);
  CHECK(alloc.num_used() == 1);
}

}  // namespace
}  // namespace loraplex::kv
