#include "engine/model/model_spec.h"

#include <cmath>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace loraplex::model {
namespace {

using nlohmann::json;

absl::Status FieldError(const std::string& field, const std::string& problem, const json& value) {
  return absl::InvalidArgumentError(
      absl::StrCat("config.json: ", field, " ", problem, ", got ", value.dump()));
}

// A required (or defaulted, when `fallback` is given) strictly positive integer.
// `prefix` names the enclosing object in errors ("rope_scaling.").
absl::StatusOr<int64_t> PositiveInt(const json& obj, const char* field,
                                    std::optional<int64_t> fallback = std::nullopt,
                                    const std::string& prefix = "") {
  const std::string name = prefix + field;
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) {
    if (fallback.has_value()) return *fallback;
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", name, " is missing"));
  }
  if (!it->is_number_integer()) return FieldError(name, "must be an integer", *it);
  const int64_t v = it->get<int64_t>();
  if (v <= 0) return FieldError(name, "must be > 0", *it);
  return v;
}

absl::StatusOr<double> PositiveNumber(const json& obj, const char* field,
                                      std::optional<double> fallback,
                                      const std::string& prefix = "") {
  const std::string name = prefix + field;
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) {
    if (fallback.has_value()) return *fallback;
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", name, " is missing"));
  }
  if (!it->is_number()) return FieldError(name, "must be a number", *it);
  const double v = it->get<double>();
  if (!(v > 0) || !std::isfinite(v)) return FieldError(name, "must be a finite number > 0", *it);
  return v;
}

absl::StatusOr<bool> Bool(const json& obj, const char* field, bool fallback) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return FieldError(field, "must be true or false", *it);
  return it->get<bool>();
}

// Reads a rope_scaling / rope_parameters object into `rope`; `where` names it in errors.
absl::Status ParseRopeObject(const json& obj, const std::string& where, RopeSpec& rope) {
  if (!obj.is_object()) return FieldError(where, "must be an object or null", obj);
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) continue;
    if (!it->is_string()) return FieldError(where + "." + key, "must be a string", *it);
    type = it->get<std::string>();
    break;
  }
  const std::string prefix = where + ".";
  LORAPLEX_ASSIGN_OR_RETURN(rope.theta, PositiveNumber(obj, "rope_theta", rope.theta, prefix));
  if (type == "default") {
    rope.rope_type = "default";
    return absl::OkStatus();
  }
  if (type != "llama3") {
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", where, ".rope_type '", type,
                                                   "' is not supported (default or llama3)"));
  }
  rope.rope_type = "llama3";
  LORAPLEX_ASSIGN_OR_RETURN(rope.factor, PositiveNumber(obj, "factor", std::nullopt, prefix));
  LORAPLEX_ASSIGN_OR_RETURN(rope.low_freq_factor,
                            PositiveNumber(obj, "low_freq_factor", std::nullopt, prefix));
  LORAPLEX_ASSIGN_OR_RETURN(rope.high_freq_factor,
                            PositiveNumber(obj, "high_freq_factor", std::nullopt, prefix));
  LORAPLEX_ASSIGN_OR_RETURN(
      rope.original_max_position_embeddings,
      PositiveInt(obj, "original_max_position_embeddings", std::nullopt, prefix));
  // The smoothing interpolates between the two factors; equal ones would divide by zero.
  if (!(rope.high_freq_factor > rope.low_freq_factor)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: ", where, ".high_freq_factor (", rope.high_freq_factor,
                     ") must be greater than low_freq_factor (", rope.low_freq_factor, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> TokenIds(const json& obj, const char* field) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return std::vector<int64_t>{};
  std::vector<int64_t> ids;
  if (it->is_number_integer()) {
    ids.push_back(it->get<int64_t>());
  } else if (it->is_array()) {
    for (const json& v : *it) {
      if (!v.is_number_integer())
        return FieldError(field, "must be an integer or a list of integers", *it);
      ids.push_back(v.get<int64_t>());
    }
  } else {
    return FieldError(field, "must be an integer or a list of integers", *it);
  }
  for (int64_t id : ids) {
    if (id < 0) return FieldError(field, "must not be negative", *it);
  }
  return ids;
}

}  // namespace

const char* ProjName(Proj p) {
  switch (p) {
    case Proj::kQ:
      return "q_proj";
    case Proj::kK:
      return "k_proj";
    case Proj::kV:
      return "v_proj";
    case Proj::kO:
      return "o_proj";
    case Proj::kGate:
      return "gate_proj";
    case Proj::kUp:
      return "up_proj";
    case Proj::kDown:
      return "down_proj";
  }
  return "?";
}

int64_t ProjInFeatures(const ModelSpec& spec, Proj p) {
  switch (p) {
    case Proj::kO:
      return spec.q_width();
    case Proj::kDown:
      return spec.intermediate_size;
    default:
      return spec.hidden_size;
  }
}

int64_t ProjOutFeatures(const ModelSpec& spec, Proj p) {
  switch (p) {
    case Proj::kQ:
      return spec.q_width();
    case Proj::kK:
    case Proj::kV:
      return spec.kv_width();
    case Proj::kGate:
    case Proj::kUp:
      return spec.intermediate_size;
    default:
      return spec.hidden_size;
  }
}

absl::StatusOr<ModelSpec> ParseModelSpec(const std::string& config_json_text) {
  const json doc = json::parse(config_json_text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError("config.json: not valid JSON");
  if (!doc.is_object())
    return absl::InvalidArgumentError("config.json: top level must be an object");
  ModelSpec spec;

  static constexpr const char* kArchitectures[] = {"LlamaForCausalLM", "MistralForCausalLM"};
  if (auto it = doc.find("architectures"); it != doc.end() && !it->is_null()) {
    if (!it->is_array() || it->size() != 1 || !(*it)[0].is_string()) {
      return FieldError("architectures", "must be a list of one class name", *it);
    }
    spec.architecture = (*it)[0].get<std::string>();
    if (spec.architecture != kArchitectures[0] && spec.architecture != kArchitectures[1]) {
      return absl::InvalidArgumentError(absl::StrCat("config.json: architectures '",
                                                     spec.architecture, "' is not supported (",
                                                     absl::StrJoin(kArchitectures, ", "), ")"));
    }
  } else {
    auto mt = doc.find("model_type");
    if (mt == doc.end() || !mt->is_string() ||
        (mt->get<std::string>() != "llama" && mt->get<std::string>() != "mistral")) {
      return absl::InvalidArgumentError(
          "config.json: architectures is missing and model_type is not 'llama' or 'mistral'");
    }
    spec.architecture = mt->get<std::string>() == "llama" ? kArchitectures[0] : kArchitectures[1];
  }

  LORAPLEX_ASSIGN_OR_RETURN(spec.vocab_size, PositiveInt(doc, "vocab_size"));
  LORAPLEX_ASSIGN_OR_RETURN(spec.hidden_size, PositiveInt(doc, "hidden_size"));
  LORAPLEX_ASSIGN_OR_RETURN(spec.intermediate_size, PositiveInt(doc, "intermediate_size"));
  LORAPLEX_ASSIGN_OR_RETURN(spec.num_layers, PositiveInt(doc, "num_hidden_layers"));
  LORAPLEX_ASSIGN_OR_RETURN(spec.num_heads, PositiveInt(doc, "num_attention_heads"));
  LORAPLEX_ASSIGN_OR_RETURN(spec.num_kv_heads,
                            PositiveInt(doc, "num_key_value_heads", spec.num_heads));
  if (spec.num_heads % spec.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: num_attention_heads (", spec.num_heads,
                     ") must be a multiple of num_key_value_heads (", spec.num_kv_heads, ")"));
  }
  if (doc.contains("head_dim") && !doc["head_dim"].is_null()) {
    LORAPLEX_ASSIGN_OR_RETURN(spec.head_dim, PositiveInt(doc, "head_dim"));
  } else {
    if (spec.hidden_size % spec.num_heads != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.json: head_dim is missing and hidden_size (", spec.hidden_size,
                       ") is not a multiple of num_attention_heads (", spec.num_heads, ")"));
    }
    spec.head_dim = spec.hidden_size / spec.num_heads;
  }
  if (spec.head_dim % 2 != 0) {
    return FieldError("head_dim", "must be even (rotary embedding rotates pairs)", spec.head_dim);
  }
  // Transformers' LlamaConfig default.
  LORAPLEX_ASSIGN_OR_RETURN(spec.max_position_embeddings,
                            PositiveInt(doc, "max_position_embeddings", int64_t{2048}));
  LORAPLEX_ASSIGN_OR_RETURN(spec.rms_norm_eps, PositiveNumber(doc, "rms_norm_eps", 1e-6));
  LORAPLEX_ASSIGN_OR_RETURN(spec.tie_word_embeddings, Bool(doc, "tie_word_embeddings", false));

  LORAPLEX_ASSIGN_OR_RETURN(spec.attention_bias, Bool(doc, "attention_bias", false));
  if (spec.attention_bias) {
    return absl::InvalidArgumentError("config.json: attention_bias true is not supported");
  }
  LORAPLEX_ASSIGN_OR_RETURN(const bool mlp_bias, Bool(doc, "mlp_bias", false));
  if (mlp_bias) return absl::InvalidArgumentError("config.json: mlp_bias true is not supported");
  if (auto it = doc.find("hidden_act"); it != doc.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != "silu") {
      return FieldError("hidden_act", "must be \"silu\"", *it);
    }
  }
  // Mistral's sliding window changes attention once a sequence outgrows it; the paged kernels
  // attend over the whole context, so such a model would silently compute something else.
  if (auto it = doc.find("sliding_window"); it != doc.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < spec.max_position_embeddings) {
      return FieldError("sliding_window",
                        "is not supported (must be null or >= max_position_embeddings)", *it);
    }
  }

  LORAPLEX_ASSIGN_OR_RETURN(spec.rope.theta, PositiveNumber(doc, "rope_theta", 10000.0));
  if (auto it = doc.find("rope_parameters"); it != doc.end() && !it->is_null()) {
    LORAPLEX_RETURN_IF_ERROR(ParseRopeObject(*it, "rope_parameters", spec.rope));
  } else if (auto it = doc.find("rope_scaling"); it != doc.end() && !it->is_null()) {
    LORAPLEX_RETURN_IF_ERROR(ParseRopeObject(*it, "rope_scaling", spec.rope));
  }

  LORAPLEX_ASSIGN_OR_RETURN(spec.eos_token_ids, TokenIds(doc, "eos_token_id"));
  LORAPLEX_ASSIGN_OR_RETURN(const std::vector<int64_t> bos, TokenIds(doc, "bos_token_id"));
  if (bos.size() > 1) return FieldError("bos_token_id", "must be one integer", doc["bos_token_id"]);
  spec.bos_token_id = bos.empty() ? -1 : bos[0];
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (auto it = doc.find(key); it != doc.end() && it->is_string()) {
      spec.torch_dtype = it->get<std::string>();
      break;
    }
  }
  return spec;
}

absl::StatusOr<ModelSpec> LoadModelSpec(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << f.rdbuf();
  if (f.bad()) return absl::InternalError(absl::StrCat("cannot read ", path));
  auto spec = ParseModelSpec(text.str());
  if (!spec.ok()) return Annotate(spec.status(), model_dir);
  return spec;
}

std::vector<float> RopeInvFreq(const ModelSpec& spec) {
  const int64_t half = spec.head_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  const RopeSpec& r = spec.rope;
  const double old_context = static_cast<double>(r.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / r.low_freq_factor;
  const double high_freq_wavelen = old_context / r.high_freq_factor;
  for (int64_t i = 0; i < half; ++i) {
    double f =
        1.0 / std::pow(r.theta, static_cast<double>(2 * i) / static_cast<double>(spec.head_dim));
    if (r.rope_type == "llama3") {
      // Hugging Face's _compute_llama3_parameters: long wavelengths are slowed by `factor`,
      // short ones kept, and the band between interpolated smoothly.
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_freq_wavelen) {
        f = f / r.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth =
            (old_context / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        f = (1.0 - smooth) * f / r.factor + smooth * f;
      }
    }
    inv_freq[static_cast<size_t>(i)] = static_cast<float>(f);
  }
  return inv_freq;
}

}  // namespace loraplex::model
