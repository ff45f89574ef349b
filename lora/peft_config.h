// PeftConfig: a PEFT LoRA adapter_config.json parsed and checked against what loraplex supports,
// and the PEFT rules that decide which modules it targets and their per-module rank and alpha.
// Immutable after parsing; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model_spec.h"
#include "lora/adapter.h"

namespace loraplex::lora {

// PEFT's target_modules / exclude_modules: a list of names (a module matches when its full name
// equals an entry or ends with "." + entry), one regex (full match), or "all-linear".
struct ModuleSelector {
  enum class Kind { kNone, kList, kRegex, kAllLinear };
  Kind kind = Kind::kNone;
  std::vector<std::string> names;  // kList
  std::string regex;               // kRegex
};

struct PeftConfig {
  int32_t r = 0;
  float lora_alpha = 8.0f;
  bool use_rslora = false;
  // In file order: the first key whose pattern matches a module wins.
  std::vector<std::pair<std::string, int32_t>> rank_pattern;
  std::vector<std::pair<std::string, float>> alpha_pattern;
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  std::optional<std::vector<int64_t>> layers_to_transform;  // unset: every layer
};

// Parses adapter_config.json text. INVALID_ARGUMENT with the reason for malformed JSON, a field of
// the wrong type, peft_type other than LORA, r <= 0 or above limits.max_rank (also per
// rank_pattern entry), and the features loraplex refuses: use_dora, modules_to_save, bias other
// than "none", lora_bias, fan_in_fan_out, embed_tokens / lm_head targets, targets outside the
// seven projections or outside limits.target_modules. Messages carry no adapter name.
absl::StatusOr<PeftConfig> ParsePeftConfig(const std::string& json_text, const LoraLimits& limits,
                                           const model::ModelSpec& spec);

// "model.layers.3.self_attn.q_proj": the module name PEFT matches patterns against.
std::string ModuleName(int64_t layer, model::Proj p);

// Whether the adapter wraps projection `p` of `layer` (target_modules, exclude_modules and
// layers_to_transform applied). INVALID_ARGUMENT for a regex that does not compile.
absl::StatusOr<bool> IsTargeted(const PeftConfig& config, int64_t layer, model::Proj p);

// The module's rank and alpha after rank_pattern / alpha_pattern, and its scale
// (alpha / r, or alpha / sqrt(r) with use_rslora). INVALID_ARGUMENT for a bad pattern regex.
struct ModuleRankAlpha {
  int32_t rank = 0;
  float alpha = 0.0f;
  float scale = 0.0f;
};
absl::StatusOr<ModuleRankAlpha> ResolveModule(const PeftConfig& config, const std::string& module_name);

}  // namespace loraplex::lora
