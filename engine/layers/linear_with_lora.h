// The base model's projections as Megatron-style parallel linear layers wrapped with LoRA
// (DESIGN §4): y = x·Wᵀ + scale_a·(x·A_aᵀ)·B_aᵀ, a = each token's adapter slot. Each layer
// computes its own partition sizes from the ParallelConfig; weight sharding and the LoRA tables
// follow them. Immutable after setup (SetWeight/SetLora); Forward is engine thread only.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/tensor.h"
#include "engine/layers/sharding.h"
#include "engine/model/model_spec.h"
#include "engine/ops/ops.h"

namespace loraplex::layers {

// Shared by every wrapped layer: this rank's partition sizes, its weight and its LoRA table.
class LinearWithLora {
 public:
  LinearWithLora(LinearWithLora&&) = default;
  LinearWithLora& operator=(LinearWithLora&&) = default;

  int64_t in_features() const { return in_features_; }  // of this rank
  int64_t out_features() const { return slice_offsets_.back(); }
  int num_slices() const { return static_cast<int>(slice_widths_.size()); }
  int64_t slice_width(int s) const { return slice_widths_[static_cast<size_t>(s)]; }
  // Row of the full (unsharded) projection where this rank's part of slice `s` starts.
  int64_t slice_row_begin(int s) const { return slice_row_begins_[static_cast<size_t>(s)]; }

  // Uploads this rank's weight [out_features, in_features] (F32/F16/BF16 host), converted to
  // ops.compute_dtype(). `adapted`: the layer will get a LoRA table (SetLora), so the weight is
  // followed in the same allocation by the zeroed spare rows the ops ask for
  // (Ops::LoraWeightSpareRows; registered with the ops once SetLora gives the table).
  // INVALID_ARGUMENT on a shape mismatch.
  absl::Status SetWeight(ops::Ops& ops, const HostTensor& local_weight, bool adapted = true);
  // Uses a device weight owned elsewhere (tied embeddings); it must outlive this layer.
  absl::Status ShareWeight(const TensorView& device_weight);
  const TensorView& weight() const { return weight_; }  // [out_features, in_features] device

  // The LoRA slot table (SlotPool::module); null: never adapted. INVALID_ARGUMENT when its
  // slices, widths or in_features differ from this layer's partition sizes.
  absl::Status SetLora(const ops::LoraModule* module);
  const ops::LoraModule* lora() const { return lora_; }

  // y = x·Wᵀ, then for the tokens in `segments` (null: none) y += scale·(x·Aᵀ)·Bᵀ per slice.
  // x [T, in_features] compute dtype; y [T, out_features] compute dtype;
  // lora_scratch F32 with at least T · num_slices · max_rank elements (unused without LoRA).
  absl::Status Forward(ops::Ops& ops, const TensorView& x, const ops::LoraSegments* segments,
                       const TensorView& lora_scratch, const TensorView& y) const;

 protected:
  LinearWithLora(int64_t in_features, std::vector<int64_t> slice_widths,
                 std::vector<int64_t> slice_row_begins);

 private:
  int64_t in_features_ = 0;
  std::vector<int64_t> slice_widths_;
  std::vector<int64_t> slice_offsets_;  // [num_slices + 1] output column of each slice
  std::vector<int64_t> slice_row_begins_;
  ops::DeviceMemory owned_weight_;
  TensorView weight_;
  ops::Ops* spare_ops_ = nullptr;  // the ops SetWeight allocated spare rows for (null: none)
  const ops::LoraModule* lora_ = nullptr;
};

// q, k, v fused; column-parallel. q heads are split evenly; k/v by KV-head shard, replicated
// when tp_size > num_kv_heads.
class QkvParallelLinearWithLora : public LinearWithLora {
 public:
  // INVALID_ARGUMENT when the heads do not split evenly over tp_size.
  static absl::StatusOr<QkvParallelLinearWithLora> Create(const model::ModelSpec& spec,
                                                          ParallelConfig pc);
  int64_t num_q_heads() const { return num_q_heads_; }    // of this rank
  int64_t num_kv_heads() const { return num_kv_heads_; }  // of this rank
  // Full HF weights q [Hq·D, H], k and v [Hkv·D, H] -> this rank's fused [out_features, H]; each of
  // q, k, v is sliced separately.
  absl::StatusOr<HostTensor> ShardWeight(const HostTensor& q, const HostTensor& k,
                                         const HostTensor& v) const;

 private:
  using LinearWithLora::LinearWithLora;
  int64_t num_q_heads_ = 0;
  int64_t num_kv_heads_ = 0;
  int64_t head_dim_ = 0;
};

// gate and up fused; column-parallel, each sliced separately.
class MergedColumnParallelLinearWithLora : public LinearWithLora {
 public:
  // INVALID_ARGUMENT when intermediate_size does not split evenly over tp_size.
  static absl::StatusOr<MergedColumnParallelLinearWithLora> Create(const model::ModelSpec& spec,
                                                                   ParallelConfig pc);
  // gate, up [I, H] -> [2·I/tp, H] (this rank's gate rows, then its up rows).
  absl::StatusOr<HostTensor> ShardWeight(const HostTensor& gate, const HostTensor& up) const;

 private:
  using LinearWithLora::LinearWithLora;
};

// Row-parallel (o, down): the input features are split; the output is a partial sum that the
// caller all-reduces after the LoRA delta joined it (no-op at tp = 1).
class RowParallelLinearWithLora : public LinearWithLora {
 public:
  static absl::StatusOr<RowParallelLinearWithLora> Create(int64_t in_features_full,
                                                          int64_t out_features, ParallelConfig pc);
  int64_t in_begin() const { return in_begin_; }  // first input column of this rank
  // w [out, in_full] -> [out, in_full/tp], this rank's columns.
  absl::StatusOr<HostTensor> ShardWeight(const HostTensor& w) const;

 private:
  using LinearWithLora::LinearWithLora;
  int64_t in_begin_ = 0;
};

// Column-parallel single projection (lm_head, split over the vocabulary); no LoRA yet.
class ColumnParallelLinearWithLora : public LinearWithLora {
 public:
  static absl::StatusOr<ColumnParallelLinearWithLora> Create(int64_t out_features_full,
                                                             int64_t in_features,
                                                             ParallelConfig pc);
  // w [out_full, in] -> [out_full/tp, in], this rank's rows.
  absl::StatusOr<HostTensor> ShardWeight(const HostTensor& w) const;

 private:
  using LinearWithLora::LinearWithLora;
};

}  // namespace loraplex::layers
