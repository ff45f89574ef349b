#include "lora/lora_batch.h"

#include <catch2/catch.hpp>

namespace loraplex::lora {
namespace {

using V = std::vector<int32_t>;

TEST_CASE("BuildLoraBatch groups tokens into segments by slot") {
  struct Case {
    const char* what;
    V slots;
    int32_t max_segment_tokens;
    V token_rows;
    V seg_starts;
    V seg_slots;
  };
  const Case cases[] = {
      {"empty step", {}, 0, {}, {0}, {}},
      {"base model only", {-1, -1, -1}, 0, {}, {0}, {}},
      {"one adapter", {2, 2, 2}, 0, {0, 1, 2}, {0, 3}, {2}},
      {"interleaved slots, stable inside a slot", {1, -1, 0, 1, 0, 3}, 0, {2, 4, 0, 3, 5}, {0, 2, 4, 5}, {0, 1, 3}},
      {"long prefill split", {0, 0, 0, 0, 0, 1}, 2, {0, 1, 2, 3, 4, 5}, {0, 2, 4, 5, 6}, {0, 0, 0, 1}},
      {"split exactly at the limit", {4, 4, 5, 5}, 2, {0, 1, 2, 3}, {0, 2, 4}, {4, 5}},
      {"limit larger than any group", {1, 0, 1}, 8, {1, 0, 2}, {0, 1, 3}, {0, 1}},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    const LoraBatch b = BuildLoraBatch(c.slots, c.max_segment_tokens);
    CHECK(b.token_rows == c.token_rows);
    CHECK(b.seg_starts == c.seg_starts);
    CHECK(b.seg_slots == c.seg_slots);
    CHECK(b.num_segments() == static_cast<int32_t>(c.seg_slots.size()));
  }
}

}  // namespace
}  // namespace loraplex::lora
