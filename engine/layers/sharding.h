// Tensor-parallel slicing of host weights: the rows or columns one rank holds, and the
// concatenation that fuses projections. Dtype-agnostic byte copies. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/tensor.h"

namespace loraplex::layers {

// How the layers of one model are split: this process holds shard tp_rank of tp_size.
struct ParallelConfig {
  int tp_size = 1;
  int tp_rank = 0;
};

// Rows [begin, begin + count) of a 2-D tensor. INVALID_ARGUMENT when out of range.
absl::StatusOr<HostTensor> SliceRows(const HostTensor& w, int64_t begin, int64_t count);
// Columns [begin, begin + count) of a 2-D tensor. INVALID_ARGUMENT when out of range.
absl::StatusOr<HostTensor> SliceCols(const HostTensor& w, int64_t begin, int64_t count);
// Stacks 2-D tensors of one dtype and column count along rows.
absl::StatusOr<HostTensor> ConcatRows(const std::vector<const HostTensor*>& parts);

}  // namespace loraplex::layers
