// Helpers shared by the lora/ tests: the tiny model's spec, default limits, adapter fixtures in
// fresh temp directories, and rewriting an adapter's safetensors file. Test threads only.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "engine/core/safetensors.h"
#include "lora/adapter.h"
#include "tests/testing/tiny_model.h"

namespace loraplex::lora::test {

// hidden 32, 2 layers, 4 heads / 2 KV heads of 8, intermediate 64: q 32 wide, k and v 16.
inline model::ModelSpec Spec() { return testing::TinyModelSpec(testing::TinyModelOptions{}); }

inline LoraLimits Limits() {
  LoraLimits limits;
  limits.max_rank = 64;
  limits.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return limits;
}

// A fresh temp directory, removed when the test binary exits.
inline std::string TempDir() {
  struct Created {
    std::vector<std::string> dirs;
    ~Created() {
      for (const std::string& d : dirs) {
        std::error_code ec;  // best effort: a leftover temp dir fails nothing
        std::filesystem::remove_all(d, ec);
      }
    }
  };
  static Created created;
  created.dirs.push_back(testing::MakeTempDir("lora-test"));
  return created.dirs.back();
}

inline std::string WriteAdapter(const testing::TinyAdapterOptions& options) {
  const std::string dir = TempDir();
  const absl::Status st = testing::WriteTinyAdapter(dir, Spec(), options);
  REQUIRE(st.ok());
  return dir;
}

inline std::shared_ptr<const LoadedAdapter> MustLoad(const std::string& name, const std::string& dir,
                                                     DType dtype = DType::kF32) {
  auto adapter = LoadPeftAdapter(name, dir, Spec(), Limits(), dtype);
  INFO(adapter.status().ToString());
  REQUIRE(adapter.ok());
  return *adapter;
}

// Rewrites `<dir>/adapter_model.safetensors` in F32: `edit` may rename a tensor (empty name
// drops it) and change its values.
inline void RewriteTensors(const std::string& dir,
                           const std::function<void(std::string& name, std::vector<float>& values)>& edit) {
  const std::string path = dir + "/adapter_model.safetensors";
  std::vector<HostTensor> tensors;
  std::vector<NamedTensor> named;
  {
    auto file = SafetensorsFile::Open(path);
    REQUIRE(file.ok());
    tensors.reserve((*file)->tensors().size());
    for (const auto& [name, info] : (*file)->tensors()) {
      auto t = (*file)->ReadAs(name, DType::kF32);
      REQUIRE(t.ok());
      std::string new_name = name;
      std::vector<float> values(t->As<float>(), t->As<float>() + t->shape().NumElements());
      edit(new_name, values);
      if (new_name.empty()) continue;
      std::copy(values.begin(), values.end(), t->As<float>());
      tensors.push_back(std::move(*t));
      named.push_back({new_name, tensors.back().view()});
    }
  }
  REQUIRE(WriteSafetensors(path, named).ok());
}

}  // namespace loraplex::lora::test
