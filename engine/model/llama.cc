#include "engine/model/llama.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>

#include "absl/strings/str_cat.h"
#include "engine/core/safetensors.h"
#include "engine/core/status.h"
#include "engine/layers/linear_with_lora.h"
#include "nlohmann/json.hpp"

namespace loraplex::model {
namespace {

// Decode graphs are recorded per LoRA mode: no adapters, few adapter segments (at most
// ops::kFewLoraSegments, the bound the graph tells the ops), or any number; each of the last two
// for steps whose adapters' ranks are all at most ops::kNarrowLoraRank and for the others
// (LoraSegments::wide_ranks; a pool sized for narrow ranks only never has the latter).
constexpr int kLoraNone = 0, kLoraFew = 1, kLoraMany = 2, kLoraFewWide = 3, kLoraManyWide = 4;
int LoraModeOf(const lora::LoraBatch& lb, int32_t max_rank) {
  if (lb.seg_slots.empty()) return kLoraNone;
  const bool few = lb.num_segments() <= ops::kFewLoraSegments;
  if (max_rank > ops::kNarrowLoraRank) return few ? kLoraFewWide : kLoraManyWide;
  return few ? kLoraFew : kLoraMany;
}
bool IsFewMode(int mode) { return mode == kLoraFew || mode == kLoraFewWide; }
bool IsWideMode(int mode) { return mode == kLoraFewWide || mode == kLoraManyWide; }

using layers::ColumnParallelLinearWithLora;
using layers::MergedColumnParallelLinearWithLora;
using layers::ParallelConfig;
using layers::QkvParallelLinearWithLora;
using layers::RowParallelLinearWithLora;
using lora::WrappedLayer;

// The shard file that holds `name`, for error messages only (WeightSet already validated it).
std::string WeightFileOf(const std::string& dir, const std::string& name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return dir;
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(single, ec)) return single.string();
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::ifstream f(index);
  const nlohmann::json doc = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_discarded() && doc.contains("weight_map") && doc["weight_map"].is_object()) {
    auto it = doc["weight_map"].find(name);
    if (it != doc["weight_map"].end() && it->is_string())
      return (fs::path(dir) / it->get<std::string>()).string();
  }
  return index.string();
}

struct Layer {
  ops::DeviceMemory input_norm;  // [H]
  ops::DeviceMemory post_norm;   // [H]
  QkvParallelLinearWithLora qkv;
  RowParallelLinearWithLora o;
  MergedColumnParallelLinearWithLora gate_up;
  RowParallelLinearWithLora down;
  ops::DeviceMemory k_cache;  // [num_kv_blocks, block_size, Hkv, D]
  ops::DeviceMemory v_cache;  // [num_kv_blocks, block_size, Hkv, D]
};

}  // namespace

struct LlamaModel::Impl {
  ModelSpec spec;
  ModelCapacity cap;
  ops::Ops* ops = nullptr;
  const lora::SlotPool* slot_pool = nullptr;  // bounds the step's LoRA ranks (may be null)
  bool has_lora = false;
  DType dtype = DType::kF32;

  ops::DeviceMemory embed;       // [V, H]
  ops::DeviceMemory final_norm;  // [H]
  ops::DeviceMemory inv_freq;    // [D/2] F32
  std::optional<ColumnParallelLinearWithLora> lm_head;
  std::vector<Layer> layers;

  // Step inputs, sized at capacity: regions of one device arena mirrored in host memory, so a
  // step's inputs go to the device in one copy (each copy costs microseconds of host time, and
  // the device idles until the step's inputs are there).
  struct StepBuffer {
    const ops::DeviceMemory* arena = nullptr;
    uint8_t* host = nullptr;
    size_t offset = 0, bytes = 0;
    void* data() const { return static_cast<char*>(arena->data()) + offset; }
    TensorView View(DType dtype, Shape shape) const { return arena->View(dtype, shape, offset); }
  };
  ops::DeviceMemory step_arena;
  std::vector<uint8_t> step_host;          // the arena's host mirror
  size_t dirty_begin = 0, dirty_end = 0;   // bytes of the mirror written since the last flush
  StepBuffer ids, positions, slot_mapping, token_seq;  // [max_tokens] I32
  StepBuffer context_lens, logit_rows;                 // [max_seqs] I32
  StepBuffer block_tables;                             // [max_seqs * max_blocks_per_seq] I32
  StepBuffer token_rows, seg_starts, seg_slots;  // [max_tokens(+1)] I32
  // [2 + ops::kLoraRankClasses] I32: the segment count, the step's rank bound, the rank classes'
  // ends (ops::LoraSegments::class_ends).
  StepBuffer num_segments;
  StepBuffer sampling_rows;                            // [max_seqs] ops::SamplingRow
  // Activations (compute dtype unless noted), sized at capacity.
  ops::DeviceMemory residual, hidden, proj_out;  // [max_tokens, H]
  ops::DeviceMemory qkv;                         // [max_tokens, qkv_width]
  ops::DeviceMemory attn_out;                    // [max_tokens, q_width]
  ops::DeviceMemory gate_up, act;                // [max_tokens, 2I], [max_tokens, I]
  ops::DeviceMemory gathered;                    // [max_seqs, H]
  ops::DeviceMemory logits;                      // [max_seqs, V] F32
  ops::DeviceMemory sampled;                     // [max_seqs] ops::SampledToken
  ops::DeviceMemory lora_scratch;                // [max_tokens * max(num_slices * max_rank)] F32

  // Decode graphs by (bucket, LoRA mode) (bucket: tokens = sequences = logit rows of the step;
  // mode: LoraModeOf).
  std::map<std::pair<int32_t, int>, std::unique_ptr<ops::Graph>> graphs;
  bool graphs_unsupported = false;  // the ops answered UNIMPLEMENTED to Capture
  int64_t graph_steps = 0;

  // What the enqueued ops are sized for; a graph fixes these at capture.
  struct StepShape {
    int64_t tokens = 0;           // activation rows
    int64_t logit_rows = 0;       // rows of the logits GEMM; 0: no logits
    int32_t max_seqs = 0;         // sequence rows the attention may address
    int32_t max_context_len = 0;  // sizes the attention's context split
    bool lora = false;            // pass the segment arrays (their live count is read on the device)
    int32_t lora_segments_bound = 0;  // ops::LoraSegments::segments_bound
    bool lora_wide = false;           // ops::LoraSegments::wide_ranks
  };

  absl::Status ValidateStep(const StepInput& in) const;
  absl::Status CheckSampling(const StepInput& in) const;
  // Ops::PrepareGemm for every GEMM a step up to capacity runs (each layer's four projections at
  // up to max_tokens rows, the logits at up to max_seqs), on the buffers the steps use.
  absl::Status PrepareGemms();
  // Uploads the step and enqueues it (a graph replay or eager ops); the logits land in `logits`.
  absl::Status RunStep(const StepInput& in);
  // The bucket a decode step runs in, or 0 when the step must run eagerly (prefill, mixed,
  // graphs off or unsupported).
  int32_t DecodeBucket(const StepInput& in) const;
  // The batch-size bucket `tokens` decode tokens are padded to.
  int32_t BucketOf(int32_t tokens) const;
  // `max_rank`: StepMaxRank(in.lora), computed once a step.
  absl::Status UploadStep(const StepInput& in, int32_t max_rank);
  absl::Status UploadPaddedDecode(const StepInput& in, int32_t bucket, int32_t max_rank);
  // The segment arrays, their count and the step's rank bound `max_rank`.
  void UploadLora(const lora::LoraBatch& lb, int32_t max_rank);
  // The largest rank any slot of the step holds; INT32_MAX without a slot pool.
  int32_t StepMaxRank(const lora::LoraBatch& lb) const;
  // WarmUp: the LoRA mode whose graph its step records (-1: the step's own). Every mode's graph
  // is correct for any step; the mode only tunes it.
  int warmup_mode = -1;
  // slot_pool->uploads() when the ops were last told the slots changed (Ops::LoraSlotsChanged).
  int64_t seen_uploads = -1;
  // Enqueues embedding, every layer, the final norm and the logits GEMM into `logits`; reads
  // every per-step array from the step buffers, so a recording replays with their new contents.
  absl::Status Enqueue(const StepShape& shape);
  // Stages `bytes` for `dst` in the host mirror; FlushUploads sends everything staged.
  void Stage(const StepBuffer& dst, const void* src, size_t bytes) {
    if (bytes == 0) return;
    std::memcpy(dst.host, src, bytes);  // sizes were validated against the capacity
    MarkStaged(dst, bytes);
  }
  // The first `bytes` of `dst`'s mirror were written and go with the next flush.
  void MarkStaged(const StepBuffer& dst, size_t bytes) {
    if (bytes == 0) return;
    const size_t begin = dst.offset, end = dst.offset + bytes;
    if (dirty_begin == dirty_end) {
      dirty_begin = begin;
      dirty_end = end;
    } else {
      dirty_begin = std::min(dirty_begin, begin);
      dirty_end = std::max(dirty_end, end);
    }
  }
  void Upload(const StepBuffer& dst, const std::vector<int32_t>& src) {
    Stage(dst, src.data(), src.size() * sizeof(int32_t));
  }
  // Upload of `src` followed by `fill` up to `count` entries.
  void UploadPadded(const StepBuffer& dst, const std::vector<int32_t>& src, int32_t fill, int32_t count) {
    auto* host = reinterpret_cast<int32_t*>(dst.host);
    std::copy(src.begin(), src.end(), host);  // src.size() <= count (the step fits its bucket)
    std::fill(host + src.size(), host + count, fill);
    MarkStaged(dst, static_cast<size_t>(count) * sizeof(int32_t));
  }
  absl::Status FlushUploads() {
    if (dirty_begin == dirty_end) return absl::OkStatus();
    const absl::Status s = ops->CopyToDevice(static_cast<char*>(step_arena.data()) + dirty_begin,
                                             step_host.data() + dirty_begin, dirty_end - dirty_begin);
    dirty_begin = dirty_end = 0;
    return s;
  }
};

namespace {

absl::StatusOr<ops::DeviceMemory> UploadHost(ops::Ops* ops, const HostTensor& t) {
  LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory mem, ops->Allocate(t.NumBytes()));
  LORAPLEX_RETURN_IF_ERROR(ops->CopyToDevice(mem.data(), t.data(), t.NumBytes()));
  return mem;
}

absl::StatusOr<ops::DeviceMemory> AllocateElements(ops::Ops* ops, int64_t count, DType dtype) {
  return ops->Allocate(static_cast<size_t>(count) * DTypeSize(dtype));
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                             const ModelSpec& spec, ops::Ops* ops,
                                                             const lora::SlotPool* slots,
                                                             const ModelCapacity& capacity) {
  if (ops == nullptr) return absl::InvalidArgumentError("LlamaModel::Load: ops is null");
  if (spec.attention_bias)
    return absl::InvalidArgumentError(absl::StrCat(dir, ": attention_bias is not supported"));
  if (capacity.max_tokens <= 0 || capacity.max_seqs <= 0 || capacity.num_kv_blocks <= 0 ||
      capacity.kv_block_size <= 0 || capacity.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LlamaModel::Load: capacity must be positive: max_tokens ",
                     capacity.max_tokens, ", max_seqs ", capacity.max_seqs, ", num_kv_blocks ",
                     capacity.num_kv_blocks, ", kv_block_size ", capacity.kv_block_size,
                     ", max_blocks_per_seq ", capacity.max_blocks_per_seq));
  }
  LORAPLEX_ASSIGN_OR_RETURN(std::unique_ptr<WeightSet> weights, WeightSet::Open(dir));

  const int64_t h = spec.hidden_size, v = spec.vocab_size, inter = spec.intermediate_size;
  // Every expected tensor is checked before any byte is uploaded, so a bad checkpoint fails fast
  // with the first wrong tensor named.
  std::vector<std::pair<std::string, Shape>> expected;
  expected.push_back({"model.embed_tokens.weight", {v, h}});
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    expected.push_back({p + "input_layernorm.weight", {h}});
    expected.push_back({p + "post_attention_layernorm.weight", {h}});
    expected.push_back({p + "self_attn.q_proj.weight", {spec.q_width(), h}});
    expected.push_back({p + "self_attn.k_proj.weight", {spec.kv_width(), h}});
    expected.push_back({p + "self_attn.v_proj.weight", {spec.kv_width(), h}});
    expected.push_back({p + "self_attn.o_proj.weight", {h, spec.q_width()}});
    expected.push_back({p + "mlp.gate_proj.weight", {inter, h}});
    expected.push_back({p + "mlp.up_proj.weight", {inter, h}});
    expected.push_back({p + "mlp.down_proj.weight", {h, inter}});
  }
  expected.push_back({"model.norm.weight", {h}});
  if (!spec.tie_word_embeddings) expected.push_back({"lm_head.weight", {v, h}});
  for (const auto& [name, shape] : expected) {
    auto info = weights->Find(name);
    if (!info.ok()) {
      return absl::NotFoundError(absl::StrCat(dir, ": tensor ", name,
                                              " is missing (tie_word_embeddings is ",
                                              spec.tie_word_embeddings ? "true" : "false", ")"));
    }
    const DType dt = (*info)->dtype;
    if (dt != DType::kF32 && dt != DType::kBF16 && dt != DType::kF16) {
      return absl::InvalidArgumentError(absl::StrCat(WeightFileOf(dir, name), ": ", name,
                                                     " has dtype ", std::string(DTypeName(dt)),
                                                     ", expected F32, BF16 or F16"));
    }
    if (!((*info)->shape == shape)) {
      return absl::InvalidArgumentError(absl::StrCat(WeightFileOf(dir, name), ": ", name,
                                                     " has shape ", (*info)->shape.ToString(),
                                                     ", expected ", shape.ToString()));
    }
  }

  auto impl = std::make_unique<Impl>();
  impl->spec = spec;
  impl->cap = capacity;
  impl->ops = ops;
  impl->slot_pool = slots;
  impl->has_lora = slots != nullptr;
  impl->dtype = ops->compute_dtype();
  const DType dtype = impl->dtype;
  auto read = [&](const std::string& name) -> absl::StatusOr<HostTensor> {
    auto t = weights->ReadAs(name, dtype);
    if (!t.ok()) return Annotate(t.status(), WeightFileOf(dir, name));
    return t;
  };
  auto upload = [&](const std::string& name) -> absl::StatusOr<ops::DeviceMemory> {
    LORAPLEX_ASSIGN_OR_RETURN(HostTensor t, read(name));
    return UploadHost(ops, t);
  };

  const ParallelConfig pc;  // tp = 1 until the multi-GPU workers exist
  LORAPLEX_ASSIGN_OR_RETURN(impl->embed, upload("model.embed_tokens.weight"));
  LORAPLEX_ASSIGN_OR_RETURN(impl->final_norm, upload("model.norm.weight"));
  {
    const std::vector<float> inv_freq = RopeInvFreq(spec);
    LORAPLEX_ASSIGN_OR_RETURN(impl->inv_freq, ops->Allocate(inv_freq.size() * sizeof(float)));
    LORAPLEX_RETURN_IF_ERROR(
        ops->CopyToDevice(impl->inv_freq.data(), inv_freq.data(), inv_freq.size() * sizeof(float)));
  }
  LORAPLEX_ASSIGN_OR_RETURN(ColumnParallelLinearWithLora lm_head,
                            ColumnParallelLinearWithLora::Create(v, h, pc));
  if (spec.tie_word_embeddings) {
    LORAPLEX_RETURN_IF_ERROR(lm_head.ShareWeight(impl->embed.View(dtype, {v, h})));
  } else {
    LORAPLEX_ASSIGN_OR_RETURN(HostTensor w, read("lm_head.weight"));
    LORAPLEX_ASSIGN_OR_RETURN(HostTensor shard, lm_head.ShardWeight(w));
    LORAPLEX_RETURN_IF_ERROR(lm_head.SetWeight(*ops, shard, /*adapted=*/false));
  }
  impl->lm_head.emplace(std::move(lm_head));

  int64_t lora_width = 0;  // widest shrink output row over the wrapped layers
  const Shape cache_shape{capacity.num_kv_blocks, capacity.kv_block_size, spec.num_kv_heads,
                          spec.head_dim};
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LORAPLEX_ASSIGN_OR_RETURN(auto qkv, QkvParallelLinearWithLora::Create(spec, pc));
    LORAPLEX_ASSIGN_OR_RETURN(auto o, RowParallelLinearWithLora::Create(spec.q_width(), h, pc));
    LORAPLEX_ASSIGN_OR_RETURN(auto gate_up, MergedColumnParallelLinearWithLora::Create(spec, pc));
    LORAPLEX_ASSIGN_OR_RETURN(auto down, RowParallelLinearWithLora::Create(inter, h, pc));
    {
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor q, read(p + "self_attn.q_proj.weight"));
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor k, read(p + "self_attn.k_proj.weight"));
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor vv, read(p + "self_attn.v_proj.weight"));
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor fused, qkv.ShardWeight(q, k, vv));
      LORAPLEX_RETURN_IF_ERROR(qkv.SetWeight(*ops, fused, /*adapted=*/slots != nullptr));
    }
    {
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor w, read(p + "self_attn.o_proj.weight"));
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor shard, o.ShardWeight(w));
      LORAPLEX_RETURN_IF_ERROR(o.SetWeight(*ops, shard, /*adapted=*/slots != nullptr));
    }
    {
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor gate, read(p + "mlp.gate_proj.weight"));
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor up, read(p + "mlp.up_proj.weight"));
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor fused, gate_up.ShardWeight(gate, up));
      LORAPLEX_RETURN_IF_ERROR(gate_up.SetWeight(*ops, fused, /*adapted=*/slots != nullptr));
    }
    {
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor w, read(p + "mlp.down_proj.weight"));
      LORAPLEX_ASSIGN_OR_RETURN(HostTensor shard, down.ShardWeight(w));
      LORAPLEX_RETURN_IF_ERROR(down.SetWeight(*ops, shard, /*adapted=*/slots != nullptr));
    }
    if (slots != nullptr) {
      const std::pair<layers::LinearWithLora*, WrappedLayer> wrapped[] = {
          {&qkv, WrappedLayer::kQkv},
          {&o, WrappedLayer::kO},
          {&gate_up, WrappedLayer::kGateUp},
          {&down, WrappedLayer::kDown}};
      for (const auto& [layer, which] : wrapped) {
        const ops::LoraModule& module = slots->module(l, which);
        auto status = layer->SetLora(&module);
        if (!status.ok())
          return Annotate(status,
                          absl::StrCat("layer ", l, " wrapped layer ", static_cast<int>(which)));
        lora_width = std::max<int64_t>(lora_width,
                                       static_cast<int64_t>(module.num_slices) * module.max_rank);
      }
    }
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory input_norm, upload(p + "input_layernorm.weight"));
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory post_norm,
                              upload(p + "post_attention_layernorm.weight"));
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory k_cache,
                              AllocateElements(ops, cache_shape.NumElements(), dtype));
    LORAPLEX_ASSIGN_OR_RETURN(ops::DeviceMemory v_cache,
                              AllocateElements(ops, cache_shape.NumElements(), dtype));
    impl->layers.push_back(Layer{std::move(input_norm), std::move(post_norm), std::move(qkv),
                                 std::move(o), std::move(gate_up), std::move(down),
                                 std::move(k_cache), std::move(v_cache)});
  }

  const int64_t max_t = capacity.max_tokens, max_s = capacity.max_seqs;
  {
    // The step arena: the small per-step arrays first (a decode step's copy then spans little
    // more than what it writes), each region 16-byte aligned.
    const std::pair<Impl::StepBuffer*, size_t> regions[] = {
        {&impl->num_segments, (2 + ops::kLoraRankClasses) * sizeof(int32_t)},
        {&impl->context_lens, max_s * sizeof(int32_t)},
        {&impl->logit_rows, max_s * sizeof(int32_t)},
        {&impl->sampling_rows, max_s * sizeof(ops::SamplingRow)},
        {&impl->ids, max_t * sizeof(int32_t)},
        {&impl->positions, max_t * sizeof(int32_t)},
        {&impl->slot_mapping, max_t * sizeof(int32_t)},
        {&impl->token_seq, max_t * sizeof(int32_t)},
        {&impl->seg_slots, max_t * sizeof(int32_t)},
        {&impl->seg_starts, (max_t + 1) * sizeof(int32_t)},
        {&impl->token_rows, max_t * sizeof(int32_t)},
        {&impl->block_tables, max_s * capacity.max_blocks_per_seq * sizeof(int32_t)},
    };
    size_t total = 0;
    for (const auto& [buffer, bytes] : regions) {
      buffer->offset = total;
      buffer->bytes = bytes;
      total += (bytes + 15) / 16 * 16;
    }
    LORAPLEX_ASSIGN_OR_RETURN(impl->step_arena, ops->Allocate(total));
    impl->step_host.assign(total, 0);
    for (const auto& [buffer, bytes] : regions) {
      buffer->arena = &impl->step_arena;
      buffer->host = impl->step_host.data() + buffer->offset;
    }
  }
  for (auto* m : {&impl->residual, &impl->hidden, &impl->proj_out}) {
    LORAPLEX_ASSIGN_OR_RETURN(*m, AllocateElements(ops, max_t * h, dtype));
  }
  LORAPLEX_ASSIGN_OR_RETURN(impl->qkv, AllocateElements(ops, max_t * spec.qkv_width(), dtype));
  LORAPLEX_ASSIGN_OR_RETURN(impl->attn_out, AllocateElements(ops, max_t * spec.q_width(), dtype));
  LORAPLEX_ASSIGN_OR_RETURN(impl->gate_up, AllocateElements(ops, max_t * 2 * inter, dtype));
  LORAPLEX_ASSIGN_OR_RETURN(impl->act, AllocateElements(ops, max_t * inter, dtype));
  LORAPLEX_ASSIGN_OR_RETURN(impl->gathered, AllocateElements(ops, max_s * h, dtype));
  LORAPLEX_ASSIGN_OR_RETURN(impl->logits, AllocateElements(ops, max_s * v, DType::kF32));
  LORAPLEX_ASSIGN_OR_RETURN(impl->sampled,
                            ops->Allocate(static_cast<size_t>(max_s) * sizeof(ops::SampledToken)));
  if (lora_width > 0) {
    LORAPLEX_ASSIGN_OR_RETURN(impl->lora_scratch,
                              AllocateElements(ops, max_t * lora_width, DType::kF32));
  }
  LORAPLEX_RETURN_IF_ERROR(ops->Synchronize());

  auto model = std::unique_ptr<LlamaModel>(new LlamaModel());
  model->impl_ = std::move(impl);
  return model;
}

LlamaModel::~LlamaModel() = default;

const ModelSpec& LlamaModel::spec() const { return impl_->spec; }
const ModelCapacity& LlamaModel::capacity() const { return impl_->cap; }

absl::Status LlamaModel::Impl::ValidateStep(const StepInput& in) const {
  auto bad = [](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("LlamaModel::Forward: ", parts...));
  };
  const int64_t t_count = static_cast<int64_t>(in.token_ids.size());
  const int64_t s_count = static_cast<int64_t>(in.context_lens.size());
  if (t_count == 0 || t_count > cap.max_tokens)
    return bad(t_count, " tokens outside [1, ", cap.max_tokens, "]");
  if (s_count == 0 || s_count > cap.max_seqs)
    return bad(s_count, " sequences outside [1, ", cap.max_seqs, "]");
  if (static_cast<int64_t>(in.positions.size()) != t_count ||
      static_cast<int64_t>(in.slot_mapping.size()) != t_count ||
      static_cast<int64_t>(in.token_seq.size()) != t_count) {
    return bad("positions/slot_mapping/token_seq have ", in.positions.size(), "/",
               in.slot_mapping.size(), "/", in.token_seq.size(), " entries, expected ", t_count);
  }
  if (static_cast<int64_t>(in.block_tables.size()) != s_count * cap.max_blocks_per_seq) {
    return bad("block_tables has ", in.block_tables.size(), " entries, expected ", s_count, " x ",
               cap.max_blocks_per_seq);
  }
  if (static_cast<int64_t>(in.logit_rows.size()) > cap.max_seqs) {
    return bad(in.logit_rows.size(), " logit rows outside [0, ", cap.max_seqs, "]");
  }
  const int64_t num_slots = static_cast<int64_t>(cap.num_kv_blocks) * cap.kv_block_size;
  for (int64_t s = 0; s < s_count; ++s) {
    const int32_t len = in.context_lens[static_cast<size_t>(s)];
    if (len < 0 || len > static_cast<int64_t>(cap.max_blocks_per_seq) * cap.kv_block_size) {
      return bad("context_lens[", s, "] = ", len, " exceeds the block table");
    }
    for (int64_t b = 0; b < (len + cap.kv_block_size - 1) / cap.kv_block_size; ++b) {
      const int32_t block = in.block_tables[static_cast<size_t>(s * cap.max_blocks_per_seq + b)];
      if (block < 0 || block >= cap.num_kv_blocks) {
        return bad("block_tables[", s, "][", b, "] = ", block, " outside [0, ", cap.num_kv_blocks,
                   ")");
      }
    }
  }
  for (int64_t t = 0; t < t_count; ++t) {
    const size_t i = static_cast<size_t>(t);
    if (in.token_ids[i] < 0 || in.token_ids[i] >= spec.vocab_size) {
      return bad("token_ids[", t, "] = ", in.token_ids[i], " outside [0, ", spec.vocab_size, ")");
    }
    if (in.token_seq[i] < 0 || in.token_seq[i] >= s_count) {
      return bad("token_seq[", t, "] = ", in.token_seq[i], " outside [0, ", s_count, ")");
    }
    if (in.positions[i] < 0 ||
        in.positions[i] >= in.context_lens[static_cast<size_t>(in.token_seq[i])]) {
      return bad("positions[", t, "] = ", in.positions[i], " outside the context of sequence ",
                 in.token_seq[i]);
    }
    if (in.slot_mapping[i] >= num_slots)
      return bad("slot_mapping[", t, "] = ", in.slot_mapping[i], " >= ", num_slots);
  }
  for (size_t i = 0; i < in.logit_rows.size(); ++i) {
    if (in.logit_rows[i] < 0 || in.logit_rows[i] >= t_count) {
      return bad("logit_rows[", i, "] = ", in.logit_rows[i], " outside [0, ", t_count, ")");
    }
  }
  const lora::LoraBatch& lb = in.lora;
  if (lb.seg_slots.empty()) return absl::OkStatus();
  if (!has_lora) return bad("LoRA segments given but the model was loaded without a slot pool");
  if (lb.seg_starts.size() != lb.seg_slots.size() + 1 || lb.seg_starts.front() != 0 ||
      lb.seg_starts.back() != static_cast<int32_t>(lb.token_rows.size()) ||
      static_cast<int64_t>(lb.token_rows.size()) > t_count ||
      static_cast<int64_t>(lb.seg_slots.size()) > t_count) {  // the kernels size for <= T segments
    return bad("LoRA batch has ", lb.seg_slots.size(), " segments, ", lb.seg_starts.size(),
               " starts and ", lb.token_rows.size(), " token rows for ", t_count, " tokens");
  }
  const int32_t pool_slots = layers.empty() ? 0 : layers[0].qkv.lora()->num_slots;
  for (size_t s = 0; s < lb.seg_slots.size(); ++s) {
    if (lb.seg_starts[s + 1] < lb.seg_starts[s])
      return bad("LoRA seg_starts decrease at segment ", s);
    if (lb.seg_slots[s] < 0 || lb.seg_slots[s] >= pool_slots) {
      return bad("LoRA seg_slots[", s, "] = ", lb.seg_slots[s], " outside [0, ", pool_slots, ")");
    }
  }
  for (size_t i = 0; i < lb.token_rows.size(); ++i) {
    if (lb.token_rows[i] < 0 || lb.token_rows[i] >= t_count) {
      return bad("LoRA token_rows[", i, "] = ", lb.token_rows[i], " outside [0, ", t_count, ")");
    }
  }
  return absl::OkStatus();
}

int32_t LlamaModel::Impl::DecodeBucket(const StepInput& in) const {
  if (!cap.graphs || graphs_unsupported) return 0;
  const size_t t = in.token_ids.size();
  if (t != in.context_lens.size()) return 0;
  std::vector<bool> seen(t, false);
  for (int32_t seq : in.token_seq) {  // validated to lie in [0, S)
    if (seen[static_cast<size_t>(seq)]) return 0;
    seen[static_cast<size_t>(seq)] = true;
  }
  const int32_t bucket = BucketOf(static_cast<int32_t>(t));
  if (in.logit_rows.size() > static_cast<size_t>(bucket)) return 0;
  return bucket;
}

int32_t LlamaModel::Impl::BucketOf(int32_t tokens) const {
  // Few buckets keep capture time and graph memory small; past 128 the GEMMs grow with M anyway.
  static constexpr int32_t kBuckets[] = {1, 2, 4, 8, 16, 32, 48, 64, 96, 128};
  int32_t bucket = (tokens + 63) / 64 * 64;
  for (int32_t b : kBuckets) {
    if (b >= tokens) {
      bucket = b;
      break;
    }
  }
  // The step buffers hold max_tokens rows and the logits max_seqs rows; T <= both (validated).
  return std::min({bucket, cap.max_seqs, cap.max_tokens});
}

int32_t LlamaModel::Impl::StepMaxRank(const lora::LoraBatch& lb) const {
  if (slot_pool == nullptr) return std::numeric_limits<int32_t>::max();
  int32_t max_rank = 0;
  for (int32_t slot : lb.seg_slots) max_rank = std::max(max_rank, slot_pool->slot_rank(slot));
  return max_rank;
}

void LlamaModel::Impl::UploadLora(const lora::LoraBatch& lb, int32_t max_rank) {
  // The largest rank any slot of the step holds bounds the kernels' work (ops::LoraSegments).
  const int32_t n = lb.num_segments();
  std::vector<int32_t> count = {n, max_rank};
  // The segments go up ordered by rank class (ops::LoraSegments::class_ends; stable, so one class
  // keeps the batch's order); without a slot pool every segment is in the last class.
  std::array<int32_t, ops::kLoraRankClasses> ends{};
  std::vector<int> cls(static_cast<size_t>(n), ops::kLoraRankClasses - 1);
  if (slot_pool != nullptr) {
    for (int32_t i = 0; i < n; ++i) cls[i] = ops::LoraRankClass(slot_pool->slot_rank(lb.seg_slots[i]));
  }
  for (int c : cls) ++ends[c];
  for (int c = 1; c < ops::kLoraRankClasses; ++c) ends[c] += ends[c - 1];
  count.insert(count.end(), ends.begin(), ends.end());
  if (n > 0) {
    if (std::is_sorted(cls.begin(), cls.end())) {
      Upload(token_rows, lb.token_rows);
      Upload(seg_starts, lb.seg_starts);
      Upload(seg_slots, lb.seg_slots);
    } else {
      lora::LoraBatch sorted;
      sorted.seg_starts.push_back(0);
      for (int c = 0; c < ops::kLoraRankClasses; ++c) {
        for (int32_t i = 0; i < n; ++i) {
          if (cls[i] != c) continue;
          sorted.token_rows.insert(sorted.token_rows.end(), lb.token_rows.begin() + lb.seg_starts[i],
                                   lb.token_rows.begin() + lb.seg_starts[i + 1]);
          sorted.seg_starts.push_back(static_cast<int32_t>(sorted.token_rows.size()));
          sorted.seg_slots.push_back(lb.seg_slots[i]);
        }
      }
      Upload(token_rows, sorted.token_rows);
      Upload(seg_starts, sorted.seg_starts);
      Upload(seg_slots, sorted.seg_slots);
    }
  }
  Upload(num_segments, count);
}

absl::Status LlamaModel::Impl::UploadStep(const StepInput& in, int32_t max_rank) {
  for (auto [dst, src] : {std::pair{&ids, &in.token_ids},
                          {&positions, &in.positions},
                          {&slot_mapping, &in.slot_mapping},
                          {&token_seq, &in.token_seq},
                          {&context_lens, &in.context_lens},
                          {&block_tables, &in.block_tables},
                          {&logit_rows, &in.logit_rows}}) {
    Upload(*dst, *src);
  }
  if (!in.lora.seg_slots.empty()) UploadLora(in.lora, max_rank);
  return FlushUploads();
}

absl::Status LlamaModel::Impl::UploadPaddedDecode(const StepInput& in, int32_t bucket, int32_t max_rank) {
  // Padding tokens: id 0, position 0, no sequence (attention gives zeros, RoPE skips them), no
  // cache slot; no LoRA segment covers them. Padding logit rows read row 0 and are dropped.
  UploadPadded(ids, in.token_ids, 0, bucket);
  UploadPadded(positions, in.positions, 0, bucket);
  UploadPadded(slot_mapping, in.slot_mapping, -1, bucket);
  UploadPadded(token_seq, in.token_seq, -1, bucket);
  UploadPadded(logit_rows, in.logit_rows, 0, bucket);
  Upload(context_lens, in.context_lens);
  Upload(block_tables, in.block_tables);
  // A step without adapters replays the bucket's graph recorded without LoRA kernels.
  if (!in.lora.seg_slots.empty()) UploadLora(in.lora, max_rank);
  return FlushUploads();
}

absl::Status LlamaModel::Impl::Enqueue(const StepShape& shape) {
  const int64_t t = shape.tokens;
  const int64_t h = spec.hidden_size, inter = spec.intermediate_size;
  const float eps = static_cast<float>(spec.rms_norm_eps);

  ops::LoraSegments segments;
  const ops::LoraSegments* seg_ptr = nullptr;
  if (shape.lora) {
    segments.token_rows = static_cast<const int32_t*>(token_rows.data());
    segments.seg_starts = static_cast<const int32_t*>(seg_starts.data());
    segments.seg_slots = static_cast<const int32_t*>(seg_slots.data());
    segments.num_segments = static_cast<const int32_t*>(num_segments.data());
    segments.max_rank = static_cast<const int32_t*>(num_segments.data()) + 1;
    segments.class_ends = static_cast<const int32_t*>(num_segments.data()) + 2;
    segments.max_segments = static_cast<int32_t>(t);  // every segment holds at least one token
    segments.num_tokens = static_cast<int32_t>(t);
    segments.segments_bound = shape.lora_segments_bound;
    segments.wide_ranks = shape.lora_wide;
    // Narrow steps are those whose slots all hold ranks up to kNarrowLoraRank (StepMaxRank; a
    // step without a slot pool is wide).
    segments.narrow_ranks = !shape.lora_wide;
    seg_ptr = &segments;
    LORAPLEX_RETURN_IF_ERROR(ops->BeginLoraStep(segments));
  }

  ops::AttentionMeta meta;
  meta.positions = static_cast<const int32_t*>(positions.data());
  meta.slot_mapping = static_cast<const int32_t*>(slot_mapping.data());
  meta.token_seq = static_cast<const int32_t*>(token_seq.data());
  meta.context_lens = static_cast<const int32_t*>(context_lens.data());
  meta.block_tables = static_cast<const int32_t*>(block_tables.data());
  meta.num_tokens = static_cast<int32_t>(t);
  meta.max_seqs = shape.max_seqs;
  meta.max_blocks_per_seq = cap.max_blocks_per_seq;
  meta.block_size = cap.kv_block_size;
  meta.max_context_len = shape.max_context_len;

  const DType dt = dtype;
  const TensorView ids_view = ids.View(DType::kI32, {t});
  const TensorView res = residual.View(dt, {t, h});             // [T, H] the residual stream
  const TensorView hid = hidden.View(dt, {t, h});               // [T, H] normed input of a block
  const TensorView proj = proj_out.View(dt, {t, h});            // [T, H] o / down output
  const TensorView qkv_view = qkv.View(dt, {t, spec.qkv_width()});  // [T, (Hq + 2Hkv)·D]
  const TensorView attn = attn_out.View(dt, {t, spec.q_width()});
  const TensorView gu = gate_up.View(dt, {t, 2 * inter});
  const TensorView act_view = act.View(dt, {t, inter});
  const TensorView scratch =
      lora_scratch.data() != nullptr
          ? lora_scratch.View(DType::kF32, {static_cast<int64_t>(lora_scratch.size() / 4)})
          : TensorView{};
  const TensorView freq = inv_freq.View(DType::kF32, {spec.head_dim / 2});
  const Shape cache_shape{cap.num_kv_blocks, cap.kv_block_size, spec.num_kv_heads, spec.head_dim};
  const float softmax_scale =
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(spec.head_dim)));

  LORAPLEX_RETURN_IF_ERROR(ops->Embed(ids_view, embed.View(dt, {spec.vocab_size, h}), res));
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& layer = layers[l];
    const TensorView input_norm = layer.input_norm.View(dt, {h});
    if (l == 0) {
      LORAPLEX_RETURN_IF_ERROR(ops->RmsNorm(res, input_norm, eps, hid));
    } else {  // the previous layer's MLP output joins the residual here
      LORAPLEX_RETURN_IF_ERROR(ops->AddRmsNorm(proj, res, input_norm, eps, hid));
    }
    const ops::KvCacheView cache{layer.k_cache.View(dt, cache_shape),
                                 layer.v_cache.View(dt, cache_shape)};
    const int hq = static_cast<int>(layer.qkv.num_q_heads()),
              hkv = static_cast<int>(layer.qkv.num_kv_heads());
    const int d = static_cast<int>(spec.head_dim);
    LORAPLEX_RETURN_IF_ERROR(layer.qkv.Forward(*ops, hid, seg_ptr, scratch, qkv_view));
    LORAPLEX_RETURN_IF_ERROR(ops->RopeAndCacheKv(qkv_view, freq, hq, hkv, d, meta, cache));
    LORAPLEX_RETURN_IF_ERROR(ops->Attention(qkv_view, hq, hkv, d, softmax_scale, meta, cache, attn));
    LORAPLEX_RETURN_IF_ERROR(layer.o.Forward(*ops, attn, seg_ptr, scratch, proj));
    LORAPLEX_RETURN_IF_ERROR(
        ops->AddRmsNorm(proj, res, layer.post_norm.View(dt, {h}), eps, hid));
    LORAPLEX_RETURN_IF_ERROR(layer.gate_up.Forward(*ops, hid, seg_ptr, scratch, gu));
    LORAPLEX_RETURN_IF_ERROR(ops->SiluMul(gu, act_view));
    LORAPLEX_RETURN_IF_ERROR(layer.down.Forward(*ops, act_view, seg_ptr, scratch, proj));
  }
  LORAPLEX_RETURN_IF_ERROR(ops->AddRmsNorm(proj, res, final_norm.View(dt, {h}), eps, hid));

  const int64_t rows = shape.logit_rows;
  // A step of prefill chunks only wants no logits: the KV cache is all it had to fill.
  if (rows == 0) return absl::OkStatus();
  const TensorView gathered_view = gathered.View(dt, {rows, h});
  const TensorView logits_view = logits.View(DType::kF32, {rows, spec.vocab_size});  // [rows, V] F32
  LORAPLEX_RETURN_IF_ERROR(
      ops->GatherRows(hid, logit_rows.View(DType::kI32, {rows}), gathered_view));
  return ops->Gemm(gathered_view, lm_head->weight(), 0.0f, logits_view);
}

absl::Status LlamaModel::Impl::CheckSampling(const StepInput& in) const {
  if (in.sampling.size() != in.logit_rows.size()) {
    return absl::InvalidArgumentError(absl::StrCat("StepInput: sampling has ", in.sampling.size(),
                                                   " rows, logit_rows ", in.logit_rows.size()));
  }
  for (size_t i = 0; i < in.sampling.size(); ++i) {
    const ops::SamplingRow& r = in.sampling[i];
    if (!ops::IsValidSamplingRow(r)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "StepInput: sampling[", i, "] has temperature ", r.temperature, ", top_p ", r.top_p,
          ", top_k ", r.top_k, ", top_n ", r.top_n));
    }
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Impl::RunStep(const StepInput& in) {
  Impl& m = *this;
  const int32_t bucket = m.DecodeBucket(in);
  const int32_t max_rank = m.StepMaxRank(in.lora);
  if (m.slot_pool != nullptr && m.slot_pool->uploads() != m.seen_uploads) {
    // An adapter entered a slot: what the ops keep of the slots' weights is stale.
    LORAPLEX_RETURN_IF_ERROR(m.ops->LoraSlotsChanged());
    m.seen_uploads = m.slot_pool->uploads();
  }
  // Few or many segments, narrow or wide ranks: the graph a step replays, and what an eager step
  // tells the ops (LoraSegments::wide_ranks) — one decision for both.
  const int step_mode = LoraModeOf(in.lora, max_rank);
  bool replayed = false;
  if (bucket > 0) {
    // Copies land in the buffers the graph reads before it runs (same stream, in order).
    LORAPLEX_RETURN_IF_ERROR(m.UploadPaddedDecode(in, bucket, max_rank));
    // Steps with adapters and steps without replay separate graphs: the base model's step then
    // carries no LoRA launches at all. Steps with few adapter segments replay graphs of their
    // own too, recorded with that bound (the CUDA executor tunes their LoRA work differently).
    const bool lora = !in.lora.seg_slots.empty();
    const int mode = m.warmup_mode >= 0 ? m.warmup_mode : step_mode;
    const std::pair<int32_t, int> key{bucket, mode};
    auto it = m.graphs.find(key);
    if (it == m.graphs.end()) {
      Impl::StepShape shape;
      shape.tokens = bucket;
      shape.logit_rows = bucket;
      shape.max_seqs = bucket;
      // A capacity bound, not this step's: the graph must serve any later context length.
      shape.max_context_len = m.cap.max_blocks_per_seq * m.cap.kv_block_size;
      shape.lora = lora;
      shape.lora_segments_bound = IsFewMode(mode) ? ops::kFewLoraSegments : 0;
      shape.lora_wide = IsWideMode(mode);
      absl::StatusOr<std::unique_ptr<ops::Graph>> graph =
          m.ops->Capture([&] { return m.Enqueue(shape); });
      if (graph.ok()) {
        it = m.graphs.emplace(key, *std::move(graph)).first;
      } else if (absl::IsUnimplemented(graph.status())) {
        m.graphs_unsupported = true;  // this executor runs every step eagerly from now on
      } else {
        return Annotate(graph.status(),
                        absl::StrCat("LlamaModel::Forward: capture of decode bucket ", bucket));
      }
    }
    if (it != m.graphs.end()) {
      LORAPLEX_RETURN_IF_ERROR(it->second->Replay());
      ++m.graph_steps;
      replayed = true;
    }
  }
  if (!replayed) {
    // The padded upload (if any) is overwritten here: an eager step reads only its own rows.
    LORAPLEX_RETURN_IF_ERROR(m.UploadStep(in, max_rank));
    Impl::StepShape shape;
    shape.tokens = static_cast<int64_t>(in.token_ids.size());
    shape.logit_rows = static_cast<int64_t>(in.logit_rows.size());
    shape.max_seqs = static_cast<int32_t>(in.context_lens.size());
    shape.max_context_len = *std::max_element(in.context_lens.begin(), in.context_lens.end());
    shape.lora = !in.lora.seg_slots.empty();
    shape.lora_segments_bound = shape.lora ? in.lora.num_segments() : 0;
    shape.lora_wide = IsWideMode(step_mode);
    LORAPLEX_RETURN_IF_ERROR(m.Enqueue(shape));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> LlamaModel::Forward(const StepInput& in) {
  Impl& m = *impl_;
  LORAPLEX_RETURN_IF_ERROR(m.ValidateStep(in));
  LORAPLEX_RETURN_IF_ERROR(m.RunStep(in));
  const size_t rows = in.logit_rows.size();
  std::vector<float> out(rows * static_cast<size_t>(m.spec.vocab_size));
  if (rows > 0) {
    LORAPLEX_RETURN_IF_ERROR(
        m.ops->CopyToHost(out.data(), m.logits.data(), out.size() * sizeof(float)));
  }
  LORAPLEX_RETURN_IF_ERROR(m.ops->Synchronize());
  return out;
}

absl::StatusOr<std::vector<ops::SampledToken>> LlamaModel::ForwardSample(const StepInput& in) {
  Impl& m = *impl_;
  LORAPLEX_RETURN_IF_ERROR(m.ValidateStep(in));
  LORAPLEX_RETURN_IF_ERROR(m.CheckSampling(in));
  // Staged with the step's other inputs: they reach the device in the step's one copy.
  const size_t rows = in.logit_rows.size();
  m.Stage(m.sampling_rows, in.sampling.data(), rows * sizeof(ops::SamplingRow));
  LORAPLEX_RETURN_IF_ERROR(m.RunStep(in));
  std::vector<ops::SampledToken> out(rows);
  if (rows > 0) {
    const TensorView logits_view =
        m.logits.View(DType::kF32, {static_cast<int64_t>(rows), m.spec.vocab_size});
    auto* sampled = static_cast<ops::SampledToken*>(m.sampled.data());
    LORAPLEX_RETURN_IF_ERROR(m.ops->Sample(
        logits_view, static_cast<const ops::SamplingRow*>(m.sampling_rows.data()), sampled));
    LORAPLEX_RETURN_IF_ERROR(
        m.ops->CopyToHost(out.data(), sampled, rows * sizeof(ops::SampledToken)));
  }
  LORAPLEX_RETURN_IF_ERROR(m.ops->Synchronize());
  return out;
}

absl::Status LlamaModel::Impl::PrepareGemms() {
  const int64_t h = spec.hidden_size, inter = spec.intermediate_size;
  const int64_t t = cap.max_tokens, s = cap.max_seqs;
  for (const Layer& layer : layers) {
    LORAPLEX_RETURN_IF_ERROR(ops->PrepareGemm(hidden.View(dtype, {t, h}), layer.qkv.weight(),
                                              qkv.View(dtype, {t, spec.qkv_width()})));
    LORAPLEX_RETURN_IF_ERROR(ops->PrepareGemm(attn_out.View(dtype, {t, spec.q_width()}), layer.o.weight(),
                                              proj_out.View(dtype, {t, h})));
    LORAPLEX_RETURN_IF_ERROR(ops->PrepareGemm(hidden.View(dtype, {t, h}), layer.gate_up.weight(),
                                              gate_up.View(dtype, {t, 2 * inter})));
    LORAPLEX_RETURN_IF_ERROR(ops->PrepareGemm(act.View(dtype, {t, inter}), layer.down.weight(),
                                              proj_out.View(dtype, {t, h})));
  }
  return ops->PrepareGemm(gathered.View(dtype, {s, h}), lm_head->weight(),
                          logits.View(DType::kF32, {s, spec.vocab_size}));
}

absl::StatusOr<int> LlamaModel::WarmUp() {
  Impl& m = *impl_;
  // Prefill row counts vary every step: their GEMM algorithms are chosen here, not on first use.
  LORAPLEX_RETURN_IF_ERROR(Annotate(m.PrepareGemms(), "LlamaModel::WarmUp"));
  if (!m.cap.graphs || m.graphs_unsupported) return 0;
  const size_t before = m.graphs.size();
  const int32_t limit = std::min(m.cap.max_seqs, m.cap.max_tokens);
  for (int32_t b = 1; b <= limit; ++b) {
    if (m.BucketOf(b) != b) continue;  // only the smallest batch of each bucket
    StepInput in;
    for (int32_t s = 0; s < b; ++s) {
      in.token_ids.push_back(0);
      in.positions.push_back(0);
      in.slot_mapping.push_back(0);  // every row writes the same K/V into slot 0: same bits
      in.token_seq.push_back(s);
      in.context_lens.push_back(1);
      in.logit_rows.push_back(s);
    }
    in.block_tables.assign(static_cast<size_t>(b) * m.cap.max_blocks_per_seq, 0);
    in.sampling.resize(static_cast<size_t>(b));
    for (const int mode : {kLoraNone, kLoraFew, kLoraMany, kLoraFewWide, kLoraManyWide}) {
      if (mode != kLoraNone && !m.has_lora) break;
      // No step of this bucket has that many segments; no slot holds a wide rank.
      if ((mode == kLoraMany || mode == kLoraManyWide) && b <= ops::kFewLoraSegments) continue;
      if (IsWideMode(mode) && (m.slot_pool == nullptr || m.slot_pool->max_rank() <= ops::kNarrowLoraRank)) break;
      m.warmup_mode = mode;  // whatever rank slot 0 holds
      // Slot 0's table: rank 0 (nothing read) unless an adapter is already resident there. One
      // segment, or (many) one a token.
      in.lora = mode == kLoraNone ? lora::LoraBatch{}
                                  : lora::BuildLoraBatch(std::vector<int32_t>(static_cast<size_t>(b), 0),
                                                         IsFewMode(mode) ? 0 : 1);
      const absl::Status warmed = ForwardSample(in).status();
      m.warmup_mode = -1;
      LORAPLEX_RETURN_IF_ERROR(Annotate(warmed, absl::StrCat("LlamaModel::WarmUp: bucket ", b)));
      if (m.graphs_unsupported) return 0;
    }
  }
  return static_cast<int>(m.graphs.size() - before);
}

void LlamaModel::DropGraphs() { impl_->graphs.clear(); }
void LlamaModel::set_graphs(bool enabled) { impl_->cap.graphs = enabled; }
int64_t LlamaModel::graph_steps() const { return impl_->graph_steps; }
int LlamaModel::num_graphs() const { return static_cast<int>(impl_->graphs.size()); }

}  // namespace loraplex::model
