// A PEFT LoRA adapter parsed, validated against the base model and held in host memory.
// Immutable after loading; thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/tensor.h"
#include "engine/model/model_spec.h"

namespace loraplex::lora {

// What the server accepts; adapters outside it are refused at load.
struct LoraLimits {
  int64_t max_rank = 64;
  std::vector<std::string> target_modules;  // subset of q_proj .. down_proj
  std::vector<std::string> allowed_roots;   // empty: any path
  // Pinned adapters the registry accepts at once (< 0: no limit). At least one device slot must
  // stay unpinned, or requests for every other adapter could never run.
  int64_t max_pinned = -1;
};

// One wrapped projection of one layer. rank 0: not adapted (a and b empty).
struct AdapterModule {
  int32_t rank = 0;
  float scale = 0.0f;  // alpha / r, or alpha / sqrt(r) with use_rslora; per module with patterns
  HostTensor a;        // [rank, in_features]  weights dtype
  HostTensor b;        // [out_features, rank] weights dtype
};

struct LoadedAdapter {
  std::string name;
  std::string path;                     // resolved directory
  uint64_t uid = 0;                     // unique per load (a reloaded name gets a new uid)
  int32_t rank = 0;                     // adapter_config r (modules may differ via rank_pattern)
  int32_t max_module_rank = 0;
  float alpha = 0.0f;
  bool use_rslora = false;
  std::vector<std::string> target_modules;  // the projections it adapts, e.g. {"q_proj","v_proj"}
  std::vector<AdapterModule> modules;       // [num_layers * kNumProj], index layer*7 + proj
  size_t weight_bytes = 0;

  const AdapterModule& module(int64_t layer, model::Proj p) const {
    return modules[static_cast<size_t>(layer) * model::kNumProj + static_cast<size_t>(p)];
  }
};

// Loads `<dir>/adapter_config.json` + `<dir>/adapter_model.safetensors` and checks every tensor
// against `spec`. Weights are converted to `weights_dtype` (F32, BF16 or F16).
// Errors (message starts with "adapter '<name>': "):
//   NOT_FOUND          directory or files missing;
//   INVALID_ARGUMENT   malformed JSON/safetensors, unsupported features (DoRA, modules_to_save,
//                      LoRA bias, embedding/lm_head targets, pickle .bin only), rank <= 0 or above
//                      limits.max_rank, a target module the server does not support, a path
//                      outside limits.allowed_roots;
//   FAILED_PRECONDITION a tensor shape that does not fit the base model (names tensor and shapes).
absl::StatusOr<std::shared_ptr<const LoadedAdapter>> LoadPeftAdapter(
    const std::string& name, const std::string& dir, const model::ModelSpec& spec,
    const LoraLimits& limits, DType weights_dtype);

}  // namespace loraplex::lora
