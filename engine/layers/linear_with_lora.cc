#include "engine/layers/linear_with_lora.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace loraplex::layers {
namespace {

absl::Status CheckParallel(const ParallelConfig& pc, const char* layer) {
  if (pc.tp_size < 1 || pc.tp_rank < 0 || pc.tp_rank >= pc.tp_size) {
    return absl::InvalidArgumentError(absl::StrCat(layer, ": tp_rank ", pc.tp_rank, " of tp_size ",
                                                   pc.tp_size, " is not a valid shard"));
  }
  return absl::OkStatus();
}

absl::Status CheckDivides(int64_t value, int tp_size, const char* what, const char* layer) {
  if (value % tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        layer, ": ", what, " (", value, ") does not split evenly over tp_size ", tp_size));
  }
  return absl::OkStatus();
}

// The full row count of a column-parallel weight is not known to a shard (k/v may be
// replicated), so the columns and the row range this rank reads are checked.
absl::Status CheckRowRange(const HostTensor& w, int64_t begin, int64_t count, int64_t cols,
                           const char* what) {
  if (w.shape().rank != 2 || w.shape()[1] != cols || w.shape()[0] < begin + count) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has shape ", w.shape().ToString(),
                                                   ", too small for rows [", begin, ",",
                                                   begin + count, ") of ", cols, " columns"));
  }
  return absl::OkStatus();
}

}  // namespace

LinearWithLora::LinearWithLora(int64_t in_features, std::vector<int64_t> slice_widths,
                               std::vector<int64_t> slice_row_begins)
    : in_features_(in_features),
      slice_widths_(std::move(slice_widths)),
      slice_row_begins_(std::move(slice_row_begins)) {
  slice_offsets_.push_back(0);
  for (int64_t w : slice_widths_) slice_offsets_.push_back(slice_offsets_.back() + w);
}

absl::Status LinearWithLora::SetWeight(ops::Ops& ops, const HostTensor& local_weight, bool adapted) {
  if (local_weight.shape().rank != 2 || local_weight.shape()[0] != out_features() ||
      local_weight.shape()[1] != in_features_) {
    return absl::InvalidArgumentError(absl::StrCat("linear weight has shape ",
                                                   local_weight.shape().ToString(), ", expected [",
                                                   out_features(), ",", in_features_, "]"));
  }
  const DType dtype = ops.compute_dtype();
  const size_t count = static_cast<size_t>(local_weight.shape().NumElements());
  HostTensor converted;
  const void* src = local_weight.data();
  if (local_weight.dtype() != dtype) {
    std::vector<float> f32(count);
    LORAPLEX_RETURN_IF_ERROR(
        ConvertToFloat(local_weight.dtype(), local_weight.data(), count, f32.data()));
    converted = HostTensor(dtype, local_weight.shape());
    LORAPLEX_RETURN_IF_ERROR(ConvertFromFloat(f32.data(), count, dtype, converted.data()));
    src = converted.data();
  }
  const size_t bytes = count * DTypeSize(dtype);
  const int64_t spare_rows = adapted ? std::max<int64_t>(0, ops.LoraWeightSpareRows(num_slices())) : 0;
  const size_t spare_bytes = static_cast<size_t>(spare_rows * in_features_) * DTypeSize(dtype);
  LORAPLEX_ASSIGN_OR_RETURN(owned_weight_, ops.Allocate(bytes + spare_bytes));
  LORAPLEX_RETURN_IF_ERROR(ops.CopyToDevice(owned_weight_.data(), src, bytes));
  if (spare_bytes > 0) {
    LORAPLEX_RETURN_IF_ERROR(ops.Memset(static_cast<char*>(owned_weight_.data()) + bytes, 0, spare_bytes));
  }
  weight_ = owned_weight_.View(dtype, local_weight.shape());
  spare_ops_ = spare_bytes > 0 ? &ops : nullptr;
  if (spare_ops_ != nullptr && lora_ != nullptr) return spare_ops_->RegisterLoraWeight(weight_, *lora_);
  return absl::OkStatus();
}

absl::Status LinearWithLora::ShareWeight(const TensorView& device_weight) {
  if (device_weight.shape.rank != 2 || device_weight.shape[0] != out_features() ||
      device_weight.shape[1] != in_features_) {
    return absl::InvalidArgumentError(absl::StrCat("shared linear weight has shape ",
                                                   device_weight.shape.ToString(), ", expected [",
                                                   out_features(), ",", in_features_, "]"));
  }
  owned_weight_ = ops::DeviceMemory();
  weight_ = device_weight;
  spare_ops_ = nullptr;
  return absl::OkStatus();
}

absl::Status LinearWithLora::SetLora(const ops::LoraModule* module) {
  if (module != nullptr) {
    bool ok = module->num_slices == num_slices() && module->in_features == in_features_;
    for (int s = 0; ok && s <= num_slices(); ++s) {
      ok = module->slice_offsets[s] == slice_offsets_[static_cast<size_t>(s)];
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA table has ", module->num_slices, " slices ending at column ",
                       module->slice_offsets[module->num_slices], " over ", module->in_features,
                       " inputs; the layer has ", num_slices(), " slices of ", out_features(),
                       " columns over ", in_features_, " inputs"));
    }
  }
  lora_ = module;
  if (spare_ops_ != nullptr && lora_ != nullptr) return spare_ops_->RegisterLoraWeight(weight_, *lora_);
  return absl::OkStatus();
}

absl::Status LinearWithLora::Forward(ops::Ops& ops, const TensorView& x,
                                     const ops::LoraSegments* segments,
                                     const TensorView& lora_scratch, const TensorView& y) const {
  if (weight_.empty())
    return absl::FailedPreconditionError("linear layer used before its weight was set");
  if (segments == nullptr || lora_ == nullptr) return ops.Gemm(x, weight_, 0.0f, y);
  const int64_t t = x.shape[0];
  const int64_t width = static_cast<int64_t>(lora_->num_slices) * lora_->max_rank;
  if (lora_scratch.dtype != DType::kF32 || lora_scratch.NumElements() < t * width) {
    return absl::InvalidArgumentError(absl::StrCat("LoRA scratch ", lora_scratch.shape.ToString(),
                                                   " ", std::string(DTypeName(lora_scratch.dtype)),
                                                   " is smaller than [", t, ",", width, "] F32"));
  }
  TensorView shrunk = lora_scratch;  // [T, num_slices · max_rank] F32
  shrunk.shape = Shape{t, width};
  // One call, so an executor can run the shrink (which needs only x) beside the GEMM.
  return ops.GemmWithLora(x, weight_, y, segments, lora_, shrunk);
}

absl::StatusOr<QkvParallelLinearWithLora> QkvParallelLinearWithLora::Create(
    const model::ModelSpec& spec, ParallelConfig pc) {
  const char* kName = "QkvParallelLinearWithLora";
  LORAPLEX_RETURN_IF_ERROR(CheckParallel(pc, kName));
  LORAPLEX_RETURN_IF_ERROR(CheckDivides(spec.num_heads, pc.tp_size, "num_heads", kName));
  int64_t kv_local = 0, kv_begin = 0;
  if (pc.tp_size <= spec.num_kv_heads) {
    LORAPLEX_RETURN_IF_ERROR(CheckDivides(spec.num_kv_heads, pc.tp_size, "num_kv_heads", kName));
    kv_local = spec.num_kv_heads / pc.tp_size;
    kv_begin = pc.tp_rank * kv_local;
  } else {
    // More ranks than KV heads: each KV head is replicated on tp_size / num_kv_heads ranks.
    if (pc.tp_size % spec.num_kv_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(kName, ": tp_size ", pc.tp_size,
                                                     " is not a multiple of num_kv_heads ",
                                                     spec.num_kv_heads));
    }
    kv_local = 1;
    kv_begin = pc.tp_rank / (pc.tp_size / spec.num_kv_heads);
  }
  const int64_t q_local = spec.num_heads / pc.tp_size;
  const int64_t d = spec.head_dim;
  QkvParallelLinearWithLora layer(spec.hidden_size, {q_local * d, kv_local * d, kv_local * d},
                                  {pc.tp_rank * q_local * d, kv_begin * d, kv_begin * d});
  layer.num_q_heads_ = q_local;
  layer.num_kv_heads_ = kv_local;
  layer.head_dim_ = d;
  return layer;
}

absl::StatusOr<HostTensor> QkvParallelLinearWithLora::ShardWeight(const HostTensor& q,
                                                                  const HostTensor& k,
                                                                  const HostTensor& v) const {
  const HostTensor* full[3] = {&q, &k, &v};
  const char* names[3] = {"q_proj weight", "k_proj weight", "v_proj weight"};
  std::vector<HostTensor> parts;
  for (int s = 0; s < 3; ++s) {
    LORAPLEX_RETURN_IF_ERROR(
        CheckRowRange(*full[s], slice_row_begin(s), slice_width(s), in_features(), names[s]));
    LORAPLEX_ASSIGN_OR_RETURN(HostTensor part,
                              SliceRows(*full[s], slice_row_begin(s), slice_width(s)));
    parts.push_back(std::move(part));
  }
  return ConcatRows({&parts[0], &parts[1], &parts[2]});
}

absl::StatusOr<MergedColumnParallelLinearWithLora> MergedColumnParallelLinearWithLora::Create(
    const model::ModelSpec& spec, ParallelConfig pc) {
  const char* kName = "MergedColumnParallelLinearWithLora";
  LORAPLEX_RETURN_IF_ERROR(CheckParallel(pc, kName));
  LORAPLEX_RETURN_IF_ERROR(
      CheckDivides(spec.intermediate_size, pc.tp_size, "intermediate_size", kName));
  const int64_t local = spec.intermediate_size / pc.tp_size;
  return MergedColumnParallelLinearWithLora(spec.hidden_size, {local, local},
                                            {pc.tp_rank * local, pc.tp_rank * local});
}

absl::StatusOr<HostTensor> MergedColumnParallelLinearWithLora::ShardWeight(
    const HostTensor& gate, const HostTensor& up) const {
  const HostTensor* full[2] = {&gate, &up};
  const char* names[2] = {"gate_proj weight", "up_proj weight"};
  std::vector<HostTensor> parts;
  for (int s = 0; s < 2; ++s) {
    LORAPLEX_RETURN_IF_ERROR(
        CheckRowRange(*full[s], slice_row_begin(s), slice_width(s), in_features(), names[s]));
    LORAPLEX_ASSIGN_OR_RETURN(HostTensor part,
                              SliceRows(*full[s], slice_row_begin(s), slice_width(s)));
    parts.push_back(std::move(part));
  }
  return ConcatRows({&parts[0], &parts[1]});
}

absl::StatusOr<RowParallelLinearWithLora> RowParallelLinearWithLora::Create(
    int64_t in_features_full, int64_t out_features, ParallelConfig pc) {
  const char* kName = "RowParallelLinearWithLora";
  LORAPLEX_RETURN_IF_ERROR(CheckParallel(pc, kName));
  LORAPLEX_RETURN_IF_ERROR(CheckDivides(in_features_full, pc.tp_size, "in_features", kName));
  const int64_t local = in_features_full / pc.tp_size;
  RowParallelLinearWithLora layer(local, {out_features}, {0});
  layer.in_begin_ = pc.tp_rank * local;
  return layer;
}

absl::StatusOr<HostTensor> RowParallelLinearWithLora::ShardWeight(const HostTensor& w) const {
  if (w.shape().rank != 2 || w.shape()[0] != out_features() ||
      w.shape()[1] < in_begin_ + in_features()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "row-parallel weight has shape ", w.shape().ToString(), ", too small for columns [",
        in_begin_, ",", in_begin_ + in_features(), ") of ", out_features(), " rows"));
  }
  return SliceCols(w, in_begin_, in_features());
}

absl::StatusOr<ColumnParallelLinearWithLora> ColumnParallelLinearWithLora::Create(
    int64_t out_features_full, int64_t in_features, ParallelConfig pc) {
  const char* kName = "ColumnParallelLinearWithLora";
  LORAPLEX_RETURN_IF_ERROR(CheckParallel(pc, kName));
  LORAPLEX_RETURN_IF_ERROR(CheckDivides(out_features_full, pc.tp_size, "out_features", kName));
  const int64_t local = out_features_full / pc.tp_size;
  return ColumnParallelLinearWithLora(in_features, {local}, {pc.tp_rank * local});
}

absl::StatusOr<HostTensor> ColumnParallelLinearWithLora::ShardWeight(const HostTensor& w) const {
  LORAPLEX_RETURN_IF_ERROR(CheckRowRange(w, slice_row_begin(0), out_features(), in_features(),
                                         "column-parallel weight"));
  return SliceRows(w, slice_row_begin(0), out_features());
}

}  // namespace loraplex::layers
