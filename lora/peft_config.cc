#include "lora/peft_config.h"

#include <algorithm>
#include <cmath>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace loraplex::lora {
namespace {

// ordered_json keeps the file's key order, which decides pattern precedence.
using Json = nlohmann::ordered_json;

// PEFT's default targets for Llama-family models when target_modules is absent.
const std::vector<std::string>& DefaultTargets() {
  static const std::vector<std::string> kTargets = {"q_proj", "v_proj"};
  return kTargets;
}

absl::StatusOr<std::regex> CompileRegex(const std::string& pattern, const std::string& where) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": regex '", pattern, "' does not compile: ", e.what()));
  }
}

// PEFT's pattern-key rule: KEY matches a module when "(.*\.)?(KEY)$" matches its whole name.
absl::StatusOr<bool> PatternKeyMatches(const std::string& key, const std::string& module_name,
                                       const std::string& where) {
  LORAPLEX_ASSIGN_OR_RETURN(std::regex re, CompileRegex(absl::StrCat("(.*\\.)?(", key, ")$"), where));
  return std::regex_match(module_name, re);
}

bool EndsWithComponent(const std::string& name, const std::string& entry) {
  if (name == entry) return true;
  return name.size() > entry.size() && name.ends_with(entry) &&
         name[name.size() - entry.size() - 1] == '.';
}

absl::StatusOr<bool> SelectorMatches(const ModuleSelector& selector, const std::string& module_name,
                                     const std::string& field) {
  switch (selector.kind) {
    case ModuleSelector::Kind::kNone:
      return false;
    case ModuleSelector::Kind::kAllLinear:
      return true;  // every candidate we ask about is one of the seven projections
    case ModuleSelector::Kind::kList:
      return std::any_of(selector.names.begin(), selector.names.end(),
                         [&](const std::string& e) { return EndsWithComponent(module_name, e); });
    case ModuleSelector::Kind::kRegex: {
      LORAPLEX_ASSIGN_OR_RETURN(std::regex re, CompileRegex(selector.regex, field));
      return std::regex_match(module_name, re);
    }
  }
  return false;
}

absl::StatusOr<ModuleSelector> ParseSelector(const Json& j, const std::string& field) {
  ModuleSelector s;
  if (j.is_null()) return s;
  if (j.is_string()) {
    const std::string v = j.get<std::string>();
    if (v == "all-linear") {
      s.kind = ModuleSelector::Kind::kAllLinear;
    } else {
      s.kind = ModuleSelector::Kind::kRegex;
      s.regex = v;
      LORAPLEX_RETURN_IF_ERROR(CompileRegex(v, field).status());
    }
    return s;
  }
  if (j.is_array()) {
    s.kind = ModuleSelector::Kind::kList;
    for (const Json& e : j) {
      if (!e.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(field, ": entries must be strings, got ", e.dump()));
      }
      s.names.push_back(e.get<std::string>());
    }
    return s;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": must be a list of names or a regex string, got ", j.dump()));
}

absl::StatusOr<bool> GetBool(const Json& root, const char* key, bool def) {
  auto it = root.find(key);
  if (it == root.end() || it->is_null()) return def;
  if (!it->is_boolean()) return absl::InvalidArgumentError(absl::StrCat(key, ": must be a boolean, got ", it->dump()));
  return it->get<bool>();
}

absl::StatusOr<int32_t> CheckRank(const Json& v, const std::string& what, int64_t max_rank) {
  if (!v.is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": must be an integer, got ", v.dump()));
  }
  const int64_t r = v.get<int64_t>();
  if (r <= 0) return absl::InvalidArgumentError(absl::StrCat(what, " ", r, " must be > 0"));
  if (r > max_rank) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", r, " exceeds lora.max_rank ", max_rank));
  }
  return static_cast<int32_t>(r);
}

std::string SupportedList() {
  std::vector<std::string> names;
  for (int p = 0; p < model::kNumProj; ++p) names.push_back(model::ProjName(static_cast<model::Proj>(p)));
  return absl::StrJoin(names, ", ");
}

bool IsProjName(const std::string& n) {
  for (int p = 0; p < model::kNumProj; ++p) {
    if (n == model::ProjName(static_cast<model::Proj>(p))) return true;
  }
  return false;
}

// Refuses list entries that name embeddings, lm_head or anything but the seven projections.
absl::Status CheckListEntries(const ModuleSelector& targets) {
  for (const std::string& entry : targets.names) {
    const size_t dot = entry.rfind('.');
    const std::string last = dot == std::string::npos ? entry : entry.substr(dot + 1);
    if (last == "embed_tokens" || last == "lm_head") {
      return absl::InvalidArgumentError(absl::StrCat(
          "target_modules: '", entry, "' is an embedding/lm_head target; only the projections (",
          SupportedList(), ") are supported"));
    }
    if (!IsProjName(last)) {
      return absl::InvalidArgumentError(absl::StrCat("target_modules: '", entry,
                                                     "' is not supported; supported: ", SupportedList()));
    }
  }
  return absl::OkStatus();
}

// A regex target must not reach modules other than the projections (PEFT would wrap them).
absl::Status CheckRegexReach(const ModuleSelector& targets, const model::ModelSpec& spec) {
  std::vector<std::string> others = {"model.embed_tokens", "lm_head", "model.norm"};
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    const std::string base = absl::StrCat("model.layers.", l, ".");
    for (const char* sub : {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                            "self_attn.rotary_emb", "mlp.act_fn"}) {
      others.push_back(base + sub);
    }
  }
  for (const std::string& name : others) {
    LORAPLEX_ASSIGN_OR_RETURN(bool hit, SelectorMatches(targets, name, "target_modules"));
    if (hit) {
      return absl::InvalidArgumentError(absl::StrCat("target_modules: regex '", targets.regex,
                                                     "' matches module '", name,
                                                     "'; only the projections (", SupportedList(),
                                                     ") are supported"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseInto(const Json& root, const LoraLimits& limits, const model::ModelSpec& spec,
                       PeftConfig& c) {
  if (!root.is_object()) return absl::InvalidArgumentError("adapter_config.json: not a JSON object");

  auto peft_type = root.find("peft_type");
  if (peft_type == root.end() || !peft_type->is_string() || peft_type->get<std::string>() != "LORA") {
    return absl::InvalidArgumentError(absl::StrCat(
        "peft_type must be \"LORA\", got ", peft_type == root.end() ? "nothing" : peft_type->dump()));
  }

  // Features that change the math; serving them as plain LoRA would give wrong outputs.
  LORAPLEX_ASSIGN_OR_RETURN(bool use_dora, GetBool(root, "use_dora", false));
  if (use_dora) return absl::InvalidArgumentError("DoRA (use_dora: true) is not supported");
  LORAPLEX_ASSIGN_OR_RETURN(bool lora_bias, GetBool(root, "lora_bias", false));
  if (lora_bias) return absl::InvalidArgumentError("LoRA bias (lora_bias: true) is not supported");
  LORAPLEX_ASSIGN_OR_RETURN(bool fan_in_fan_out, GetBool(root, "fan_in_fan_out", false));
  if (fan_in_fan_out) return absl::InvalidArgumentError("fan_in_fan_out: true is not supported");
  LORAPLEX_ASSIGN_OR_RETURN(bool use_qalora, GetBool(root, "use_qalora", false));
  if (use_qalora) return absl::InvalidArgumentError("QALoRA (use_qalora: true) is not supported");
  if (auto it = root.find("bias"); it != root.end() && !it->is_null() && *it != "none") {
    return absl::InvalidArgumentError(absl::StrCat("bias ", it->dump(), " is not supported; only \"none\""));
  }
  if (auto it = root.find("modules_to_save"); it != root.end() && !it->is_null() && !it->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("modules_to_save ", it->dump(), " is not supported (full-weight modules)"));
  }
  for (const char* key : {"layer_replication", "target_parameters", "alora_invocation_tokens"}) {
    if (auto it = root.find(key); it != root.end() && !it->is_null() && !it->empty()) {
      return absl::InvalidArgumentError(absl::StrCat(key, " is not supported, got ", it->dump()));
    }
  }

  if (auto it = root.find("r"); it != root.end()) {
    LORAPLEX_ASSIGN_OR_RETURN(c.r, CheckRank(*it, "rank", limits.max_rank));
  } else {
    LORAPLEX_ASSIGN_OR_RETURN(c.r, CheckRank(Json(8), "rank", limits.max_rank));  // PEFT's default r
  }
  if (auto it = root.find("lora_alpha"); it != root.end() && !it->is_null()) {
    if (!it->is_number()) return absl::InvalidArgumentError(absl::StrCat("lora_alpha: must be a number, got ", it->dump()));
    c.lora_alpha = it->get<float>();
  }
  LORAPLEX_ASSIGN_OR_RETURN(c.use_rslora, GetBool(root, "use_rslora", false));

  if (auto it = root.find("rank_pattern"); it != root.end() && !it->is_null()) {
    if (!it->is_object()) return absl::InvalidArgumentError(absl::StrCat("rank_pattern: must be an object, got ", it->dump()));
    for (const auto& [key, value] : it->items()) {
      LORAPLEX_RETURN_IF_ERROR(CompileRegex(key, "rank_pattern").status());
      LORAPLEX_ASSIGN_OR_RETURN(int32_t r, CheckRank(value, absl::StrCat("rank_pattern '", key, "': rank"),
                                                     limits.max_rank));
      c.rank_pattern.emplace_back(key, r);
    }
  }
  if (auto it = root.find("alpha_pattern"); it != root.end() && !it->is_null()) {
    if (!it->is_object()) return absl::InvalidArgumentError(absl::StrCat("alpha_pattern: must be an object, got ", it->dump()));
    for (const auto& [key, value] : it->items()) {
      LORAPLEX_RETURN_IF_ERROR(CompileRegex(key, "alpha_pattern").status());
      if (!value.is_number()) {
        return absl::InvalidArgumentError(absl::StrCat("alpha_pattern '", key, "': must be a number, got ", value.dump()));
      }
      c.alpha_pattern.emplace_back(key, value.get<float>());
    }
  }

  auto targets = root.find("target_modules");
  if (targets == root.end() || targets->is_null()) {
    c.target_modules.kind = ModuleSelector::Kind::kList;
    c.target_modules.names = DefaultTargets();
  } else {
    LORAPLEX_ASSIGN_OR_RETURN(c.target_modules, ParseSelector(*targets, "target_modules"));
  }
  if (auto it = root.find("exclude_modules"); it != root.end()) {
    LORAPLEX_ASSIGN_OR_RETURN(c.exclude_modules, ParseSelector(*it, "exclude_modules"));
  }
  if (auto it = root.find("layers_to_transform"); it != root.end() && !it->is_null()) {
    std::vector<int64_t> layers;
    if (it->is_number_integer()) {
      layers.push_back(it->get<int64_t>());
    } else if (it->is_array() && std::all_of(it->begin(), it->end(), [](const Json& e) { return e.is_number_integer(); })) {
      for (const Json& e : *it) layers.push_back(e.get<int64_t>());
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("layers_to_transform: must be an integer or a list of integers, got ", it->dump()));
    }
    c.layers_to_transform = std::move(layers);
  }

  // PEFT refuses this combination too (LoraConfig.__post_init__), so no reference semantics exist.
  if (c.layers_to_transform && (c.target_modules.kind == ModuleSelector::Kind::kRegex ||
                                c.target_modules.kind == ModuleSelector::Kind::kAllLinear)) {
    return absl::InvalidArgumentError("layers_to_transform cannot be used when target_modules is a string");
  }
  if (c.target_modules.kind == ModuleSelector::Kind::kList) {
    LORAPLEX_RETURN_IF_ERROR(CheckListEntries(c.target_modules));
  } else if (c.target_modules.kind == ModuleSelector::Kind::kRegex) {
    LORAPLEX_RETURN_IF_ERROR(CheckRegexReach(c.target_modules, spec));
  }

  bool any = false;
  for (int p = 0; p < model::kNumProj; ++p) {
    const auto proj = static_cast<model::Proj>(p);
    for (int64_t l = 0; l < spec.num_layers; ++l) {
      LORAPLEX_ASSIGN_OR_RETURN(bool hit, IsTargeted(c, l, proj));
      if (!hit) continue;
      any = true;
      const std::string name = model::ProjName(proj);
      if (std::find(limits.target_modules.begin(), limits.target_modules.end(), name) ==
          limits.target_modules.end()) {
        return absl::InvalidArgumentError(absl::StrCat("target module '", name,
                                                       "' is not enabled on this server (lora.target_modules: ",
                                                       absl::StrJoin(limits.target_modules, ", "), ")"));
      }
      break;
    }
  }
  if (!any) return absl::InvalidArgumentError("target_modules select no module of the base model");
  return absl::OkStatus();
}

}  // namespace

std::string ModuleName(int64_t layer, model::Proj p) {
  const bool attn = p == model::Proj::kQ || p == model::Proj::kK || p == model::Proj::kV || p == model::Proj::kO;
  return absl::StrCat("model.layers.", layer, attn ? ".self_attn." : ".mlp.", model::ProjName(p));
}

absl::StatusOr<bool> IsTargeted(const PeftConfig& config, int64_t layer, model::Proj p) {
  if (config.layers_to_transform &&
      std::find(config.layers_to_transform->begin(), config.layers_to_transform->end(), layer) ==
          config.layers_to_transform->end()) {
    return false;
  }
  const std::string name = ModuleName(layer, p);
  LORAPLEX_ASSIGN_OR_RETURN(bool targeted, SelectorMatches(config.target_modules, name, "target_modules"));
  if (!targeted) return false;
  LORAPLEX_ASSIGN_OR_RETURN(bool excluded, SelectorMatches(config.exclude_modules, name, "exclude_modules"));
  return !excluded;
}

absl::StatusOr<ModuleRankAlpha> ResolveModule(const PeftConfig& config, const std::string& module_name) {
  ModuleRankAlpha m{config.r, config.lora_alpha, 0.0f};
  for (const auto& [key, r] : config.rank_pattern) {
    LORAPLEX_ASSIGN_OR_RETURN(bool hit, PatternKeyMatches(key, module_name, "rank_pattern"));
    if (hit) {
      m.rank = r;
      break;
    }
  }
  for (const auto& [key, alpha] : config.alpha_pattern) {
    LORAPLEX_ASSIGN_OR_RETURN(bool hit, PatternKeyMatches(key, module_name, "alpha_pattern"));
    if (hit) {
      m.alpha = alpha;
      break;
    }
  }
  const double denom = config.use_rslora ? std::sqrt(static_cast<double>(m.rank)) : static_cast<double>(m.rank);
  m.scale = static_cast<float>(static_cast<double>(m.alpha) / denom);
  return m;
}

absl::StatusOr<PeftConfig> ParsePeftConfig(const std::string& json_text, const LoraLimits& limits,
                                           const model::ModelSpec& spec) {
  Json root = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError("adapter_config.json: malformed JSON");
  PeftConfig config;
  // get<>() on a mistyped value throws; every access is type-checked first, this is the backstop.
  try {
    LORAPLEX_RETURN_IF_ERROR(ParseInto(root, limits, spec, config));
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("adapter_config.json: ", e.what()));
  }
  return config;
}

}  // namespace loraplex::lora
