// ModelSpec: the shape and hyper-parameters of a Llama-family model, read from a Hugging Face
// config.json. Immutable after construction; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::model {

// Rotary embedding parameters; `rope_type` "default" or "llama3".
struct RopeSpec {
  double theta = 10000.0;
  std::string rope_type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelSpec {
  std::string architecture = "LlamaForCausalLM";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // qkv bias (Qwen2-style); refused by the loader for now
  RopeSpec rope;
  std::vector<int64_t> eos_token_ids;
  int64_t bos_token_id = -1;
  std::string torch_dtype;  // as written in config.json, informational

  int64_t q_width() const { return num_heads * head_dim; }
  int64_t kv_width() const { return num_kv_heads * head_dim; }
  int64_t qkv_width() const { return q_width() + 2 * kv_width(); }
};

// The seven projections a LoRA adapter may wrap, in a fixed order.
enum class Proj : int { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumProj = 7;
// "q_proj", "k_proj", ...
const char* ProjName(Proj p);
// in/out features of projection `p` of `spec`.
int64_t ProjInFeatures(const ModelSpec& spec, Proj p);
int64_t ProjOutFeatures(const ModelSpec& spec, Proj p);

// Parses and validates config.json text. Errors name the field: INVALID_ARGUMENT.
absl::StatusOr<ModelSpec> ParseModelSpec(const std::string& config_json_text);
// Reads `<dir>/config.json`.
absl::StatusOr<ModelSpec> LoadModelSpec(const std::string& model_dir);

// RoPE inverse frequencies [head_dim/2] with llama3 scaling applied when configured.
std::vector<float> RopeInvFreq(const ModelSpec& spec);

}  // namespace loraplex::model
