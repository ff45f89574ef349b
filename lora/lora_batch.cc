#include "lora/lora_batch.h"

#include <algorithm>

namespace loraplex::lora {

LoraBatch BuildLoraBatch(const std::vector<int32_t>& token_slots, int32_t max_segment_tokens) {
  LoraBatch batch;
  std::vector<int32_t> rows;
  for (int32_t t = 0; t < static_cast<int32_t>(token_slots.size()); ++t) {
    if (token_slots[t] >= 0) rows.push_back(t);
  }
  // Stable, so tokens of one slot keep their order (a prefill stays in position order).
  std::stable_sort(rows.begin(), rows.end(),
                   [&](int32_t x, int32_t y) { return token_slots[x] < token_slots[y]; });
  batch.token_rows = rows;
  batch.seg_starts.push_back(0);
  for (int32_t i = 0; i < static_cast<int32_t>(rows.size()); ++i) {
    const int32_t slot = token_slots[rows[i]];
    const bool new_slot = batch.seg_slots.empty() || batch.seg_slots.back() != slot;
    const bool full = max_segment_tokens > 0 && i - batch.seg_starts.back() >= max_segment_tokens;
    if (i > 0 && (new_slot || full)) batch.seg_starts.push_back(i);
    if (new_slot || full) batch.seg_slots.push_back(slot);
  }
  if (!rows.empty()) batch.seg_starts.push_back(static_cast<int32_t>(rows.size()));
  return batch;
}

}  // namespace loraplex::lora
