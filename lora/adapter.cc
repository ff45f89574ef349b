#include "lora/adapter.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/core/safetensors.h"
#include "engine/core/status.h"
#include "lora/peft_config.h"

namespace loraplex::lora {
namespace {

namespace fs = std::filesystem;

// adapter_config.json is a few hundred bytes; anything this large is not one.
constexpr std::uintmax_t kMaxConfigBytes = 1 << 20;
constexpr std::string_view kKeyPrefix = "base_model.model.";

std::atomic<uint64_t> next_uid{1};

bool IsUnder(const fs::path& path, const fs::path& root) {
  auto [root_end, path_it] = std::mismatch(root.begin(), root.end(), path.begin(), path.end());
  return root_end == root.end();
}

// Resolves `dir` (symlinks and "..") and confines it to limits.allowed_roots. The root check
// comes first so that a path outside the roots reveals nothing about what exists there.
absl::StatusOr<std::string> ResolveDir(const std::string& dir, const LoraLimits& limits) {
  if (dir.empty()) return absl::InvalidArgumentError("empty adapter path");
  std::error_code ec;
  const fs::path resolved = fs::weakly_canonical(fs::absolute(dir, ec), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("path '", dir, "' cannot be resolved: ", ec.message()));
  if (!limits.allowed_roots.empty()) {
    bool allowed = false;
    for (const std::string& root : limits.allowed_roots) {
      std::error_code root_ec;
      fs::path canonical_root = fs::weakly_canonical(fs::absolute(root, root_ec), root_ec);
      if (!canonical_root.has_filename()) canonical_root = canonical_root.parent_path();  // "root/"
      if (!root_ec && IsUnder(resolved, canonical_root)) allowed = true;
    }
    if (!allowed) {
      return absl::InvalidArgumentError(absl::StrCat("path '", dir, "' (resolved '", resolved.string(),
                                                     "') is outside the allowed adapter roots"));
    }
  }
  const fs::file_status st = fs::status(resolved, ec);
  if (ec || !fs::exists(st)) return absl::NotFoundError(absl::StrCat("directory '", dir, "' does not exist"));
  if (!fs::is_directory(st)) return absl::InvalidArgumentError(absl::StrCat("path '", dir, "' is not a directory"));
  return resolved.string();
}

absl::StatusOr<std::string> ReadConfigText(const fs::path& path) {
  std::error_code ec;
  const std::uintmax_t size = fs::file_size(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("'", path.string(), "' not found"));
  if (size > kMaxConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat("'", path.string(), "' is ", size, " bytes, too large"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("'", path.string(), "' cannot be opened"));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// "layers.3.mlp.down_proj": how messages name a module.
std::string ShortName(int64_t layer, model::Proj p) {
  return ModuleName(layer, p).substr(std::string_view("model.").size());
}

struct TensorKey {
  int64_t layer = 0;
  model::Proj proj = model::Proj::kQ;
  bool is_a = false;
};

absl::Status UnsupportedTensor(const std::string& name, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(
      "tensor '", name, "' ", why,
      "; expected base_model.model.model.layers.N.{self_attn|mlp}.X_proj.lora_{A|B}.weight"));
}

// Parses base_model.model.model.layers.{i}.{self_attn|mlp}.{x}_proj.lora_{A|B}[.<adapter>].weight.
absl::StatusOr<TensorKey> ParseTensorKey(const std::string& name) {
  if (name.find("lora_embedding") != std::string::npos) return UnsupportedTensor(name, "is an embedding LoRA weight (not supported)");
  if (name.find("lora_magnitude_vector") != std::string::npos) return UnsupportedTensor(name, "is a DoRA magnitude vector (not supported)");
  if (name.ends_with(".bias")) return UnsupportedTensor(name, "is a bias (not supported)");
  if (!name.starts_with(kKeyPrefix)) return UnsupportedTensor(name, "is not a LoRA weight");
  const std::vector<std::string> parts = absl::StrSplit(name.substr(kKeyPrefix.size()), '.');
  if ((parts.size() != 7 && parts.size() != 8) || parts[0] != "model" || parts[1] != "layers" ||
      parts.back() != "weight") {
    return UnsupportedTensor(name, "is not a LoRA weight");
  }
  TensorKey key;
  if (parts[2].empty() || parts[2].size() > 9 || !absl::SimpleAtoi(parts[2], &key.layer) || key.layer < 0) {
    return UnsupportedTensor(name, "has a bad layer index");
  }
  bool found = false;
  for (int p = 0; p < model::kNumProj; ++p) {
    if (parts[4] == model::ProjName(static_cast<model::Proj>(p))) {
      key.proj = static_cast<model::Proj>(p);
      found = true;
    }
  }
  if (!found) return UnsupportedTensor(name, "is for an unsupported module");
  if (ModuleName(key.layer, key.proj) != absl::StrCat("model.layers.", parts[2], ".", parts[3], ".", parts[4])) {
    return UnsupportedTensor(name, "names its projection under the wrong block");
  }
  if (parts[5] == "lora_A") {
    key.is_a = true;
  } else if (parts[5] != "lora_B") {
    return UnsupportedTensor(name, "is not a LoRA weight");
  }
  return key;
}

absl::Status CheckFinite(const HostTensor& t, const std::string& tensor_name) {
  std::vector<float> values(static_cast<size_t>(t.shape().NumElements()));
  LORAPLEX_RETURN_IF_ERROR(ConvertToFloat(t.dtype(), t.data(), values.size(), values.data()));
  for (float v : values) {
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor_name, "' contains NaN or Inf"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const LoadedAdapter>> Load(const std::string& name, const std::string& dir,
                                                          const model::ModelSpec& spec,
                                                          const LoraLimits& limits, DType weights_dtype) {
  if (weights_dtype != DType::kF32 && weights_dtype != DType::kF16 && weights_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("weights dtype ", std::string(DTypeName(weights_dtype)), " is not F32/F16/BF16"));
  }
  LORAPLEX_ASSIGN_OR_RETURN(std::string resolved, ResolveDir(dir, limits));
  const fs::path root(resolved);
  LORAPLEX_ASSIGN_OR_RETURN(std::string config_text, ReadConfigText(root / "adapter_config.json"));
  const fs::path weights_path = root / "adapter_model.safetensors";
  std::error_code ec;
  if (!fs::exists(weights_path, ec)) {
    if (fs::exists(root / "adapter_model.bin", ec)) {
      return absl::InvalidArgumentError("pickle .bin adapters are refused; convert to safetensors");
    }
    return absl::NotFoundError(absl::StrCat("'", weights_path.string(), "' not found"));
  }
  LORAPLEX_ASSIGN_OR_RETURN(PeftConfig config, ParsePeftConfig(config_text, limits, spec));
  LORAPLEX_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(weights_path.string()));

  auto adapter = std::make_shared<LoadedAdapter>();
  adapter->name = name;
  adapter->path = resolved;
  adapter->rank = config.r;
  adapter->alpha = config.lora_alpha;
  adapter->use_rslora = config.use_rslora;
  adapter->modules.resize(static_cast<size_t>(spec.num_layers) * model::kNumProj);

  std::vector<bool> targeted(adapter->modules.size(), false);
  std::vector<bool> proj_used(model::kNumProj, false);
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    for (int p = 0; p < model::kNumProj; ++p) {
      const auto proj = static_cast<model::Proj>(p);
      LORAPLEX_ASSIGN_OR_RETURN(bool hit, IsTargeted(config, l, proj));
      if (!hit) continue;
      LORAPLEX_ASSIGN_OR_RETURN(ModuleRankAlpha ra, ResolveModule(config, ModuleName(l, proj)));
      const size_t idx = static_cast<size_t>(l) * model::kNumProj + p;
      targeted[idx] = true;
      proj_used[p] = true;
      adapter->modules[idx].rank = ra.rank;
      adapter->modules[idx].scale = ra.scale;
      adapter->max_module_rank = std::max(adapter->max_module_rank, ra.rank);
    }
  }
  for (int p = 0; p < model::kNumProj; ++p) {
    if (proj_used[p]) adapter->target_modules.push_back(model::ProjName(static_cast<model::Proj>(p)));
  }

  // Map every tensor in the file to its module before reading any weight bytes.
  std::vector<const TensorInfo*> a_info(adapter->modules.size(), nullptr);
  std::vector<const TensorInfo*> b_info(adapter->modules.size(), nullptr);
  for (const auto& [tensor_name, info] : file->tensors()) {
    LORAPLEX_ASSIGN_OR_RETURN(TensorKey key, ParseTensorKey(tensor_name));
    if (key.layer >= spec.num_layers) {
      return absl::FailedPreconditionError(absl::StrCat("tensor '", tensor_name, "' is for layer ", key.layer,
                                                        " but the base model has ", spec.num_layers, " layers"));
    }
    const size_t idx = static_cast<size_t>(key.layer) * model::kNumProj + static_cast<size_t>(key.proj);
    if (!targeted[idx]) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor_name, "' is for ",
                                                     ShortName(key.layer, key.proj),
                                                     ", which adapter_config.json does not target"));
    }
    const TensorInfo*& slot = key.is_a ? a_info[idx] : b_info[idx];
    if (slot != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensors '", slot->name, "' and '", tensor_name, "' are the same weight"));
    }
    if (info.dtype != DType::kF32 && info.dtype != DType::kF16 && info.dtype != DType::kBF16) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", tensor_name, "' has dtype ", std::string(DTypeName(info.dtype)), "; expected F32, F16 or BF16"));
    }
    slot = &info;
  }

  for (int64_t l = 0; l < spec.num_layers; ++l) {
    for (int p = 0; p < model::kNumProj; ++p) {
      const size_t idx = static_cast<size_t>(l) * model::kNumProj + p;
      if (!targeted[idx]) continue;
      const auto proj = static_cast<model::Proj>(p);
      AdapterModule& m = adapter->modules[idx];
      const Shape expect_a{m.rank, model::ProjInFeatures(spec, proj)};
      const Shape expect_b{model::ProjOutFeatures(spec, proj), m.rank};
      for (const auto& [info, expect, which] :
           {std::tuple{a_info[idx], expect_a, "lora_A"}, std::tuple{b_info[idx], expect_b, "lora_B"}}) {
        if (info == nullptr) {
          return absl::InvalidArgumentError(
              absl::StrCat(which, " of ", ShortName(l, proj), " is missing from adapter_model.safetensors"));
        }
        if (!(info->shape == expect)) {
          return absl::FailedPreconditionError(absl::StrCat(which, " of ", ShortName(l, proj), " has shape ",
                                                            info->shape.ToString(), ", expected ", expect.ToString()));
        }
      }
      LORAPLEX_ASSIGN_OR_RETURN(m.a, file->ReadAs(a_info[idx]->name, weights_dtype));
      LORAPLEX_ASSIGN_OR_RETURN(m.b, file->ReadAs(b_info[idx]->name, weights_dtype));
      LORAPLEX_RETURN_IF_ERROR(CheckFinite(m.a, a_info[idx]->name));
      LORAPLEX_RETURN_IF_ERROR(CheckFinite(m.b, b_info[idx]->name));
      adapter->weight_bytes += m.a.NumBytes() + m.b.NumBytes();
    }
  }
  adapter->uid = next_uid.fetch_add(1);
  return std::shared_ptr<const LoadedAdapter>(std::move(adapter));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const LoadedAdapter>> LoadPeftAdapter(const std::string& name, const std::string& dir,
                                                                     const model::ModelSpec& spec,
                                                                     const LoraLimits& limits, DType weights_dtype) {
  auto adapter = Load(name, dir, spec, limits, weights_dtype);
  if (!adapter.ok()) return Annotate(adapter.status(), absl::StrCat("adapter '", name, "'"));
  return adapter;
}

}  // namespace loraplex::lora
