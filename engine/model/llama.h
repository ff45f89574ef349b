// LlamaModel: the base model's weights and KV cache on one Ops device, and one forward step
// written once against ops::Ops. Engine thread only.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_spec.h"
#include "engine/ops/ops.h"
#include "lora/lora_batch.h"
#include "lora/slot_pool.h"

namespace loraplex::model {

// Sizes every per-step buffer is allocated for once, at load.
struct ModelCapacity {
  int32_t max_tokens = 2048;         // tokens in one step
  int32_t max_seqs = 64;             // sequences in one step
  int32_t num_kv_blocks = 256;
  int32_t kv_block_size = 16;
  int32_t max_blocks_per_seq = 128;  // ceil(max_seq_len / block_size)
  // Decode steps (one token per sequence) replay a graph captured once per batch-size bucket
  // (and per steps with / without adapters),
  // where the ops record graphs (CUDA); false, or ops without graphs (CPU): every step eager.
  bool graphs = true;
};

// One step's inputs, host side. T tokens from S sequences; the tokens of a sequence are
// contiguous and in position order.
struct StepInput {
  std::vector<int32_t> token_ids;     // [T]
  std::vector<int32_t> positions;     // [T]
  std::vector<int32_t> slot_mapping;  // [T] KV cache slot each token's K/V is written to
  std::vector<int32_t> token_seq;     // [T] sequence row (0..S-1)
  std::vector<int32_t> context_lens;  // [S] tokens in the cache after this step
  std::vector<int32_t> block_tables;  // [S * max_blocks_per_seq], unused entries 0
  std::vector<int32_t> logit_rows;    // [S'] token rows whose next-token logits are wanted
  lora::LoraBatch lora;               // adapter segments (empty: base model only)
  // [S'] how each logit row picks its token (ForwardSample only; Forward ignores it).
  std::vector<ops::SamplingRow> sampling;
};

class LlamaModel {
 public:
  // Loads `<dir>` (config.json already parsed into `spec`; model.safetensors or a sharded
  // index) onto `ops`, converting weights to ops->compute_dtype(). `slots` may be null (no LoRA);
  // otherwise its tables are read by the wrapped layers. Checks every tensor's name, dtype and
  // shape before use: INVALID_ARGUMENT / NOT_FOUND naming the tensor and file.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir, const ModelSpec& spec,
                                                          ops::Ops* ops, const lora::SlotPool* slots,
                                                          const ModelCapacity& capacity);
  ~LlamaModel();

  // Runs one step; returns F32 logits [logit_rows.size(), vocab] on the host.
  // A decode step (every sequence contributes exactly one token) is padded to the smallest
  // bucket of {1, 2, 4, 8, 16, 32, 48, 64, 96, 128, then multiples of 64} that holds it (capped
  // at min(max_seqs, max_tokens)) and replays that bucket's graph, captured on its first use;
  // prefill and mixed steps run eagerly. Errors: INVALID_ARGUMENT naming the bad input field;
  // the ops' errors (a failed capture included) otherwise.
  absl::StatusOr<std::vector<float>> Forward(const StepInput& input);
  // Runs one step like Forward and samples each logit row's next token on the device
  // (Ops::Sample with input.sampling[i]); only the SampledTokens [logit_rows.size()] come back to
  // the host, not the logits. INVALID_ARGUMENT when input.sampling does not hold one valid row per
  // logit row (temperature >= 0 and finite, top_p in (0, 1], top_k >= 0, top_n in [0, 20]).
  absl::StatusOr<std::vector<ops::SampledToken>> ForwardSample(const StepInput& input);

  // Chooses the GEMM algorithm of every row count a step can have (Ops::PrepareGemm; prefill
  // chunks included) and records the decode graph of every bucket up to capacity, without and
  // (when loaded with a slot pool) with adapters, so no request pays for a capture or a first GEMM
  // plan. The warm-up
  // steps write only KV slot 0 (free at start-up: a sequence writes every slot before reading it)
  // and their outputs are dropped. Returns the graphs captured; 0 where graphs are off or the ops
  // record none. Call before serving.
  absl::StatusOr<int> WarmUp();

  // Drops every recorded decode graph: the next decode step of each bucket records a new one. For
  // executor settings that change what a capture records (benchmark variants).
  void DropGraphs();

  // Turns decode graphs on or off from the next step (ModelCapacity::graphs at load); graphs
  // already captured are kept for when they are turned back on.
  void set_graphs(bool enabled);
  // Steps that ran by replaying a graph, and the graphs captured so far (one per bucket used
  // with adapters, one per bucket used without).
  int64_t graph_steps() const;
  int num_graphs() const;

  const ModelSpec& spec() const;
  const ModelCapacity& capacity() const;

 private:
  LlamaModel() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loraplex::model
