#include "tests/testing/tiny_model.h"

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include "absl/strings/str_cat.h"
#include "engine/core/safetensors.h"
#include "engine/core/status.h"
#include "engine/core/tensor.h"
#include "nlohmann/json.hpp"

namespace loraplex::testing {
namespace {

using nlohmann::json;

// Uniform doubles in [lo, hi) from the raw 64-bit engine output, so fixtures are identical
// across standard libraries (std::uniform_real_distribution is implementation-defined).
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  double Uniform(double lo, double hi) {
    const double unit = static_cast<double>(engine_() >> 11) * 0x1.0p-53;
    return lo + (hi - lo) * unit;
  }

 private:
  std::mt19937_64 engine_;
};

HostTensor RandomTensor(Rng& rng, Shape shape, double center, double radius) {
  HostTensor t(DType::kF32, shape);
  float* p = t.As<float>();
  for (int64_t i = 0; i < shape.NumElements(); ++i) {
    p[i] = static_cast<float>(center + rng.Uniform(-radius, radius));
  }
  return t;
}

Shape ToShape(const std::vector<int64_t>& dims) {
  Shape s;
  for (int64_t d : dims) s.dims[s.rank++] = d;
  return s;
}

absl::StatusOr<HostTensor> ConvertTensor(const HostTensor& f32, DType dtype) {
  if (dtype == DType::kF32) {
    HostTensor copy(DType::kF32, f32.shape());
    std::memcpy(copy.data(), f32.data(), f32.NumBytes());
    return copy;
  }
  HostTensor out(dtype, f32.shape());
  LORAPLEX_RETURN_IF_ERROR(ConvertFromFloat(
      f32.As<float>(), static_cast<size_t>(f32.shape().NumElements()), dtype, out.data()));
  return out;
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  f.close();
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

absl::StatusOr<json> ApplyOverrides(json doc, const std::string& overrides, const char* what) {
  if (overrides.empty()) return doc;
  json patch = json::parse(overrides, nullptr, /*allow_exceptions=*/false);
  if (patch.is_discarded() || !patch.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": overrides are not a JSON object: ", overrides));
  }
  doc.merge_patch(patch);
  return doc;
}

const char* TorchDtypeName(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
    default:
      return "float32";
  }
}

absl::Status CreateDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

model::ModelSpec TinyModelSpec(const TinyModelOptions& o) {
  model::ModelSpec spec;
  spec.vocab_size = o.vocab;
  spec.hidden_size = o.hidden;
  spec.intermediate_size = o.intermediate;
  spec.num_layers = o.layers;
  spec.num_heads = o.heads;
  spec.num_kv_heads = o.kv_heads;
  spec.head_dim = o.head_dim > 0 ? o.head_dim : o.hidden / o.heads;
  spec.max_position_embeddings = o.max_position_embeddings;
  spec.rms_norm_eps = o.rms_norm_eps;
  spec.tie_word_embeddings = o.tie_word_embeddings;
  spec.rope.theta = o.rope_theta;
  if (o.llama3_rope) {
    spec.rope.rope_type = "llama3";
    spec.rope.factor = o.llama3_factor;
    spec.rope.low_freq_factor = o.llama3_low_freq_factor;
    spec.rope.high_freq_factor = o.llama3_high_freq_factor;
    spec.rope.original_max_position_embeddings = o.llama3_original_max_position;
  }
  spec.eos_token_ids = {2};
  spec.bos_token_id = 1;
  spec.torch_dtype = TorchDtypeName(o.dtype);
  return spec;
}

absl::Status WriteTinyModel(const std::string& dir, const TinyModelOptions& o) {
  LORAPLEX_RETURN_IF_ERROR(CreateDir(dir));
  const model::ModelSpec spec = TinyModelSpec(o);

  json config = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"vocab_size", o.vocab},
      {"hidden_size", o.hidden},
      {"intermediate_size", o.intermediate},
      {"num_hidden_layers", o.layers},
      {"num_attention_heads", o.heads},
      {"num_key_value_heads", o.kv_heads},
      {"max_position_embeddings", o.max_position_embeddings},
      {"rms_norm_eps", o.rms_norm_eps},
      {"rope_theta", o.rope_theta},
      {"rope_scaling", nullptr},
      {"tie_word_embeddings", o.tie_word_embeddings},
      {"torch_dtype", TorchDtypeName(o.dtype)},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"hidden_act", "silu"},
  };
  if (o.head_dim > 0) config["head_dim"] = o.head_dim;
  if (o.llama3_rope) {
    config["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", o.llama3_factor},
        {"low_freq_factor", o.llama3_low_freq_factor},
        {"high_freq_factor", o.llama3_high_freq_factor},
        {"original_max_position_embeddings", o.llama3_original_max_position},
    };
  }
  LORAPLEX_ASSIGN_OR_RETURN(
      config, ApplyOverrides(std::move(config), o.config_overrides_json, "WriteTinyModel config"));
  LORAPLEX_RETURN_IF_ERROR(WriteText(dir + "/config.json", config.dump(2)));

  // Generated in a fixed order so a seed always gives the same weights.
  Rng rng(o.seed);
  const int64_t h = spec.hidden_size;
  const int64_t inter = spec.intermediate_size;
  const double r_h = 1.0 / std::sqrt(static_cast<double>(h));
  const double r_i = 1.0 / std::sqrt(static_cast<double>(inter));
  std::vector<std::pair<std::string, HostTensor>> weights;
  weights.emplace_back("model.embed_tokens.weight", RandomTensor(rng, {spec.vocab_size, h}, 0, 1));
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    weights.emplace_back(p + "input_layernorm.weight", RandomTensor(rng, {h}, 1, 0.1));
    weights.emplace_back(p + "self_attn.q_proj.weight",
                         RandomTensor(rng, {spec.q_width(), h}, 0, r_h));
    weights.emplace_back(p + "self_attn.k_proj.weight",
                         RandomTensor(rng, {spec.kv_width(), h}, 0, r_h));
    weights.emplace_back(p + "self_attn.v_proj.weight",
                         RandomTensor(rng, {spec.kv_width(), h}, 0, r_h));
    weights.emplace_back(p + "self_attn.o_proj.weight",
                         RandomTensor(rng, {h, spec.q_width()}, 0,
                                      1.0 / std::sqrt(static_cast<double>(spec.q_width()))));
    weights.emplace_back(p + "post_attention_layernorm.weight", RandomTensor(rng, {h}, 1, 0.1));
    weights.emplace_back(p + "mlp.gate_proj.weight", RandomTensor(rng, {inter, h}, 0, r_h));
    weights.emplace_back(p + "mlp.up_proj.weight", RandomTensor(rng, {inter, h}, 0, r_h));
    weights.emplace_back(p + "mlp.down_proj.weight", RandomTensor(rng, {h, inter}, 0, r_i));
  }
  weights.emplace_back("model.norm.weight", RandomTensor(rng, {h}, 1, 0.1));
  if (!o.tie_word_embeddings) {
    weights.emplace_back("lm_head.weight", RandomTensor(rng, {spec.vocab_size, h}, 0, r_h));
  }

  std::vector<HostTensor> converted;
  std::vector<NamedTensor> named;
  converted.reserve(weights.size());
  for (auto& [name, tensor] : weights) {
    if (std::find(o.omit_tensors.begin(), o.omit_tensors.end(), name) != o.omit_tensors.end())
      continue;
    if (auto it = o.override_shapes.find(name); it != o.override_shapes.end()) {
      tensor = RandomTensor(rng, ToShape(it->second), 0, r_h);
    }
    LORAPLEX_ASSIGN_OR_RETURN(HostTensor t, ConvertTensor(tensor, o.dtype));
    converted.push_back(std::move(t));
    named.push_back({name, converted.back().view()});
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (!o.sharded) {
    return WriteSafetensors(dir + "/model.safetensors", named, metadata);
  }
  // First half of the tensors (in generation order) in shard 1, the rest in shard 2.
  const size_t half = named.size() / 2;
  const std::string shard_names[2] = {"model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors"};
  std::vector<NamedTensor> shards[2];
  json weight_map = json::object();
  size_t total_size = 0;
  for (size_t i = 0; i < named.size(); ++i) {
    const int s = i < half ? 0 : 1;
    shards[s].push_back(named[i]);
    weight_map[named[i].name] = shard_names[s];
    total_size += named[i].tensor.NumBytes();
  }
  for (int s = 0; s < 2; ++s) {
    LORAPLEX_RETURN_IF_ERROR(WriteSafetensors(dir + "/" + shard_names[s], shards[s], metadata));
  }
  json index = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
  return WriteText(dir + "/model.safetensors.index.json", index.dump(2));
}

absl::Status WriteTinyAdapter(const std::string& dir, const model::ModelSpec& spec,
                              const TinyAdapterOptions& o) {
  LORAPLEX_RETURN_IF_ERROR(CreateDir(dir));
  json rank_pattern = json::object();
  for (const auto& [k, v] : o.rank_pattern) rank_pattern[k] = v;
  json alpha_pattern = json::object();
  for (const auto& [k, v] : o.alpha_pattern) alpha_pattern[k] = v;
  json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", "tiny-llama"},
      {"r", o.r},
      {"lora_alpha", o.alpha},
      {"use_rslora", o.use_rslora},
      {"use_dora", false},
      {"target_modules", o.target_modules},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"layers_to_transform", nullptr},
      {"lora_dropout", 0.0},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"modules_to_save", nullptr},
      {"inference_mode", true},
  };
  if (!o.layers_to_transform.empty()) config["layers_to_transform"] = o.layers_to_transform;
  LORAPLEX_ASSIGN_OR_RETURN(config, ApplyOverrides(std::move(config), o.config_overrides_json,
                                                   "WriteTinyAdapter config"));
  LORAPLEX_RETURN_IF_ERROR(WriteText(dir + "/adapter_config.json", config.dump(2)));

  // PEFT matches pattern keys against the module path with `(.*\.)?<key>$`.
  auto pattern_rank = [&](const std::string& module) -> absl::StatusOr<int64_t> {
    for (const auto& [key, rank] : o.rank_pattern) {
      try {
        if (std::regex_match(module, std::regex("(.*\\.)?" + key))) return rank;
      } catch (const std::regex_error& e) {
        return absl::InvalidArgumentError(
            absl::StrCat("WriteTinyAdapter: rank_pattern key '", key, "': ", e.what()));
      }
    }
    return o.r;
  };

  Rng rng(o.seed);
  std::vector<HostTensor> converted;
  std::vector<NamedTensor> named;
  converted.reserve(2 * static_cast<size_t>(spec.num_layers) * model::kNumProj +
                    o.extra_tensors.size());
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    if (!o.layers_to_transform.empty() &&
        std::find(o.layers_to_transform.begin(), o.layers_to_transform.end(), l) ==
            o.layers_to_transform.end()) {
      continue;
    }
    for (int p = 0; p < model::kNumProj; ++p) {
      const auto proj = static_cast<model::Proj>(p);
      const std::string proj_name = model::ProjName(proj);
      if (std::find(o.target_modules.begin(), o.target_modules.end(), proj_name) ==
          o.target_modules.end()) {
        continue;
      }
      const bool attn = proj <= model::Proj::kO;
      const std::string module =
          absl::StrCat("model.layers.", l, attn ? ".self_attn." : ".mlp.", proj_name);
      LORAPLEX_ASSIGN_OR_RETURN(const int64_t r, pattern_rank(module));
      const int64_t in = model::ProjInFeatures(spec, proj);
      const int64_t out = model::ProjOutFeatures(spec, proj);
      const std::string prefix = "base_model.model." + module;
      // B is non-zero (unlike PEFT's init) so every adapter really changes the output.
      HostTensor a = RandomTensor(rng, {r, in}, 0, 1.0 / std::sqrt(static_cast<double>(in)));
      HostTensor b = RandomTensor(rng, {out, r}, 0, 0.5 / std::sqrt(static_cast<double>(r)));
      for (auto* entry : {&a, &b}) {
        const std::string name = prefix + (entry == &a ? ".lora_A.weight" : ".lora_B.weight");
        if (o.extra_tensors.count(name) > 0) continue;
        LORAPLEX_ASSIGN_OR_RETURN(HostTensor t, ConvertTensor(*entry, o.dtype));
        converted.push_back(std::move(t));
        named.push_back({name, converted.back().view()});
      }
    }
  }
  for (const auto& [name, dims] : o.extra_tensors) {
    HostTensor t(DType::kF32, ToShape(dims));
    std::memset(t.data(), 0, t.NumBytes());
    converted.push_back(std::move(t));
    named.push_back({name, converted.back().view()});
  }
  return WriteSafetensors(dir + "/adapter_model.safetensors", named, {{"format", "pt"}});
}

std::string MakeTempDir(const std::string& prefix) {
  std::string path =
      (std::filesystem::temp_directory_path() / ("loraplex-" + prefix + "-XXXXXX")).string();
  if (mkdtemp(path.data()) == nullptr) {
    // No usable temp directory: every fixture test would fail obscurely later.
    std::perror(path.c_str());
    std::abort();
  }
  return path;
}

}  // namespace loraplex::testing
