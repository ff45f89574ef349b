// Test fixtures: writes small Llama models (config.json + safetensors in Hugging Face layout) and
// PEFT LoRA adapters with seeded random weights, so tests need no downloads.
// Stateless functions; thread-safe as long as callers write to different directories.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/core/dtype.h"
#include "engine/model/model_spec.h"

namespace loraplex::testing {

struct TinyModelOptions {
  int64_t vocab = 64;
  int64_t hidden = 32;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t kv_heads = 2;
  int64_t head_dim = 8;  // written to config.json explicitly; 0: omitted (hidden / heads)
  int64_t intermediate = 64;
  int64_t max_position_embeddings = 256;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  DType dtype = DType::kF32;  // F32, BF16 or F16
  bool tie_word_embeddings = false;
  // rope_scaling {"rope_type": "llama3", ...}. The small original_max_position_embeddings puts
  // the tiny head_dim's frequencies in all three regimes (kept, smoothed, divided by factor).
  bool llama3_rope = false;
  double llama3_factor = 8.0;
  double llama3_low_freq_factor = 1.0;
  double llama3_high_freq_factor = 4.0;
  int64_t llama3_original_max_position = 64;
  // Two shards (model-0000{1,2}-of-00002.safetensors) plus model.safetensors.index.json.
  bool sharded = false;
  uint64_t seed = 1;
  // JSON object merged over config.json (RFC 7386 merge patch: null deletes a key), e.g.
  // R"({"attention_bias": true})". Applied last.
  std::string config_overrides_json;
  // Tensors (HF names) left out of the files, and tensors written with a different shape.
  std::vector<std::string> omit_tensors;
  std::map<std::string, std::vector<int64_t>> override_shapes;
};

// Writes `dir`/config.json and the weights; creates `dir` if needed. Weights are uniform in
// ±1/sqrt(in_features) (norm weights 1 ± 0.1, embeddings ±1) from a generator seeded with `seed`.
absl::Status WriteTinyModel(const std::string& dir, const TinyModelOptions& options);

// The ModelSpec a default-configured tiny model parses to (for tests that need one without files).
model::ModelSpec TinyModelSpec(const TinyModelOptions& options);

struct TinyAdapterOptions {
  int64_t r = 4;
  double alpha = 8.0;
  bool use_rslora = false;
  std::vector<std::string> target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  // PEFT semantics: a key matches a module whose name (e.g. "model.layers.1.mlp.down_proj") ends
  // with "." + key (keys are regexes as in PEFT).
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  std::vector<int64_t> layers_to_transform;  // empty: every layer
  DType dtype = DType::kF32;
  uint64_t seed = 7;
  // JSON object merged over adapter_config.json (RFC 7386 merge patch), to inject bad fields.
  std::string config_overrides_json;
  // Extra tensors written verbatim beside the LoRA ones (F32 zeros of the given shape), e.g. a
  // "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" with a wrong shape replaces
  // the generated one.
  std::map<std::string, std::vector<int64_t>> extra_tensors;
};

// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors (PEFT layout: A [r, in],
// B [out, r], both non-zero) for the projections of `spec`; creates `dir` if needed.
absl::Status WriteTinyAdapter(const std::string& dir, const model::ModelSpec& spec,
                              const TinyAdapterOptions& options);

// A fresh, empty directory under the system temp directory, named after `prefix`.
std::string MakeTempDir(const std::string& prefix);

}  // namespace loraplex::testing
