// Groups a step's tokens by adapter slot into segments, as the LoRA ops read them.
// Pure function; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

namespace loraplex::lora {

// Host arrays of ops::LoraSegments. Tokens of the base model (slot < 0) are in no segment.
struct LoraBatch {
  std::vector<int32_t> token_rows;  // sorted order -> token row, adapter tokens only
  std::vector<int32_t> seg_starts;  // [num_segments + 1]
  std::vector<int32_t> seg_slots;   // [num_segments]
  int32_t num_segments() const { return static_cast<int32_t>(seg_slots.size()); }
};

// token_slots[t]: adapter slot of token row t, or -1 for the base model. Segments are ordered by
// slot; tokens keep their relative order inside a segment. A segment holds at most
// `max_segment_tokens` tokens (0: unlimited), so long prefills split into several.
LoraBatch BuildLoraBatch(const std::vector<int32_t>& token_slots, int32_t max_segment_tokens = 0);

}  // namespace loraplex::lora
