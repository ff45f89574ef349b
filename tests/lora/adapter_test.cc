#include "lora/adapter.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <catch2/catch.hpp>

#include "tests/lora/lora_test_util.h"

namespace loraplex::lora {
namespace {

namespace fs = std::filesystem;
using model::Proj;
using testing::TinyAdapterOptions;

std::string Message(const absl::Status& s) { return std::string(s.message()); }

absl::Status LoadStatus(const std::string& name, const std::string& dir, const LoraLimits& limits = test::Limits()) {
  return LoadPeftAdapter(name, dir, test::Spec(), limits, DType::kF32).status();
}

std::vector<float> FileTensor(const std::string& dir, const std::string& name) {
  auto file = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  REQUIRE(file.ok());
  auto t = (*file)->ReadAs(name, DType::kF32);
  REQUIRE(t.ok());
  return std::vector<float>(t->As<float>(), t->As<float>() + t->shape().NumElements());
}

std::vector<float> AsFloats(const HostTensor& t) {
  std::vector<float> out(static_cast<size_t>(t.shape().NumElements()));
  REQUIRE(ConvertToFloat(t.dtype(), t.data(), out.size(), out.data()).ok());
  return out;
}

TEST_CASE("LoadPeftAdapter reads every targeted module with its rank, scale and weights") {
  TinyAdapterOptions o;
  o.r = 4;
  o.alpha = 8.0;
  const std::string dir = test::WriteAdapter(o);
  auto a = test::MustLoad("sql", dir);
  CHECK(a->name == "sql");
  CHECK(a->path == fs::canonical(dir).string());
  CHECK(a->uid > 0);
  CHECK(a->rank == 4);
  CHECK(a->max_module_rank == 4);
  CHECK(a->alpha == 8.0f);
  CHECK(a->target_modules ==
        std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"});
  REQUIRE(a->modules.size() == 2 * model::kNumProj);
  size_t bytes = 0;
  for (int64_t l = 0; l < 2; ++l) {
    for (int p = 0; p < model::kNumProj; ++p) {
      const auto proj = static_cast<Proj>(p);
      const AdapterModule& m = a->module(l, proj);
      CHECK(m.rank == 4);
      CHECK(m.scale == 2.0f);  // 8 / 4, exact
      CHECK(m.a.shape() == Shape{4, model::ProjInFeatures(test::Spec(), proj)});
      CHECK(m.b.shape() == Shape{model::ProjOutFeatures(test::Spec(), proj), 4});
      bytes += m.a.NumBytes() + m.b.NumBytes();
    }
  }
  CHECK(a->weight_bytes == bytes);
  const std::string prefix = "base_model.model.model.layers.1.mlp.down_proj.";
  CHECK(AsFloats(a->module(1, Proj::kDown).a) == FileTensor(dir, prefix + "lora_A.weight"));
  CHECK(AsFloats(a->module(1, Proj::kDown).b) == FileTensor(dir, prefix + "lora_B.weight"));
}

TEST_CASE("Each load gets a new uid") {
  const std::string dir = test::WriteAdapter({});
  CHECK(test::MustLoad("x", dir)->uid != test::MustLoad("x", dir)->uid);
}

TEST_CASE("rank_pattern, alpha_pattern and rsLoRA reach the loaded modules") {
  TinyAdapterOptions o;
  o.r = 4;
  o.alpha = 8.0;
  o.use_rslora = true;
  o.rank_pattern = {{"down_proj", 16}};
  o.alpha_pattern = {{"q_proj", 2.0}};
  auto a = test::MustLoad("pat", test::WriteAdapter(o));
  // rsLoRA: alpha / sqrt(r); all exact in float.
  CHECK(a->module(0, Proj::kK).scale == 4.0f);           // 8 / sqrt(4)
  CHECK(a->module(0, Proj::kQ).scale == 1.0f);           // 2 / sqrt(4)
  CHECK(a->module(1, Proj::kDown).rank == 16);
  CHECK(a->module(1, Proj::kDown).scale == 2.0f);        // 8 / sqrt(16)
  CHECK(a->module(1, Proj::kDown).a.shape() == Shape{16, 64});
  CHECK(a->max_module_rank == 16);
}

TEST_CASE("layers_to_transform leaves the other layers unadapted") {
  TinyAdapterOptions o;
  o.layers_to_transform = {1};
  o.target_modules = {"q_proj", "v_proj"};
  auto a = test::MustLoad("l1", test::WriteAdapter(o));
  CHECK(a->module(0, Proj::kQ).rank == 0);
  CHECK(a->module(0, Proj::kQ).a.NumBytes() == 0);
  CHECK(a->module(1, Proj::kQ).rank == 4);
  CHECK(a->module(1, Proj::kK).rank == 0);
  CHECK(a->target_modules == std::vector<std::string>{"q_proj", "v_proj"});
}

TEST_CASE("Regex and all-linear targets load their tensors") {
  TinyAdapterOptions o;
  o.target_modules = {"q_proj", "v_proj"};
  o.config_overrides_json = R"({"target_modules": ".*\\.self_attn\\.(q|v)_proj"})";
  auto a = test::MustLoad("re", test::WriteAdapter(o));
  CHECK(a->module(1, Proj::kV).rank == 4);
  CHECK(a->module(1, Proj::kK).rank == 0);

  TinyAdapterOptions all;
  all.config_overrides_json = R"({"target_modules": "all-linear"})";
  CHECK(test::MustLoad("all", test::WriteAdapter(all))->target_modules.size() == 7);
}

TEST_CASE("Weights are converted to the requested dtype") {
  TinyAdapterOptions o;
  o.dtype = DType::kF16;
  const std::string dir = test::WriteAdapter(o);
  auto a = test::MustLoad("bf", dir, DType::kBF16);
  const HostTensor& t = a->module(0, Proj::kO).b;
  REQUIRE(t.dtype() == DType::kBF16);
  const std::vector<float> file = FileTensor(dir, "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight");
  for (size_t i = 0; i < file.size(); ++i) {
    // F16 -> BF16 goes through float; BF16 rounding of the same float is the expected value.
    CHECK(t.As<uint16_t>()[i] == FloatToBf16(file[i]));
  }
}

TEST_CASE("A tensor shape that does not fit the base model is FAILED_PRECONDITION naming both shapes") {
  TinyAdapterOptions o;
  o.extra_tensors = {{"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", {32, 8}}};
  const absl::Status st = LoadStatus("sql-v2", test::WriteAdapter(o));
  CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Message(st) == "adapter 'sql-v2': lora_B of layers.1.mlp.down_proj has shape [32,8], expected [32,4]");

  TinyAdapterOptions wrong_in;
  wrong_in.extra_tensors = {{"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", {4, 16}}};
  const absl::Status in_st = LoadStatus("x", test::WriteAdapter(wrong_in));
  CHECK(in_st.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Message(in_st) == "adapter 'x': lora_A of layers.0.self_attn.k_proj has shape [4,16], expected [4,32]");
}

TEST_CASE("Tensors other than LoRA A and B of targeted projections are refused by name") {
  const std::string p = "base_model.model.model.layers.0.self_attn.q_proj.";
  struct Case {
    std::string tensor;
    absl::StatusCode code;
    const char* message;
  };
  const Case cases[] = {
      {p + "lora_magnitude_vector", absl::StatusCode::kInvalidArgument, "DoRA magnitude"},
      {"base_model.model.model.embed_tokens.lora_embedding_A", absl::StatusCode::kInvalidArgument, "embedding"},
      {p + "lora_B.bias", absl::StatusCode::kInvalidArgument, "is a bias"},
      {"base_model.model.lm_head.weight", absl::StatusCode::kInvalidArgument, "is not a LoRA weight"},
      {p + "lora_C.weight", absl::StatusCode::kInvalidArgument, "is not a LoRA weight"},
      {"base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", absl::StatusCode::kInvalidArgument, "wrong block"},
      {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", absl::StatusCode::kFailedPrecondition,
       "is for layer 7 but the base model has 2 layers"},
  };
  for (const Case& c : cases) {
    INFO(c.tensor);
    TinyAdapterOptions o;
    o.extra_tensors = {{c.tensor, {4, 32}}};
    const absl::Status st = LoadStatus("bad", test::WriteAdapter(o));
    CHECK(st.code() == c.code);
    CHECK_THAT(Message(st), Catch::Contains("adapter 'bad': tensor '" + c.tensor + "'") && Catch::Contains(c.message));
  }
}

TEST_CASE("A tensor for a module the config does not target is refused") {
  TinyAdapterOptions o;
  o.target_modules = {"q_proj"};
  o.extra_tensors = {{"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", {4, 32}}};
  const absl::Status st = LoadStatus("x", test::WriteAdapter(o));
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(st), Catch::Contains("is for layers.0.self_attn.k_proj, which adapter_config.json does not target"));
}

TEST_CASE("A targeted module without both A and B is refused") {
  const std::string dir = test::WriteAdapter({});
  test::RewriteTensors(dir, [](std::string& name, std::vector<float>&) {
    if (name == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight") name.clear();
  });
  const absl::Status st = LoadStatus("x", dir);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(Message(st) == "adapter 'x': lora_B of layers.1.self_attn.v_proj is missing from adapter_model.safetensors");
}

TEST_CASE("Keys carrying a PEFT adapter name are accepted") {
  const std::string dir = test::WriteAdapter({});
  test::RewriteTensors(dir, [](std::string& name, std::vector<float>&) {
    const size_t at = name.rfind(".weight");
    name = name.substr(0, at) + ".default.weight";
  });
  CHECK(test::MustLoad("named", dir)->module(1, Proj::kUp).rank == 4);
}

TEST_CASE("Non-finite weights are refused") {
  const std::string dir = test::WriteAdapter({});
  test::RewriteTensors(dir, [](std::string& name, std::vector<float>& v) {
    if (name.find("layers.0.mlp.up_proj.lora_A") != std::string::npos) v[3] = std::numeric_limits<float>::quiet_NaN();
  });
  const absl::Status st = LoadStatus("x", dir);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(st), Catch::Contains("layers.0.mlp.up_proj.lora_A.weight' contains NaN or Inf"));
}

TEST_CASE("A rank above lora.max_rank is refused") {
  TinyAdapterOptions o;
  o.r = 8;
  LoraLimits limits = test::Limits();
  limits.max_rank = 4;
  const absl::Status st = LoadStatus("big", test::WriteAdapter(o), limits);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(Message(st) == "adapter 'big': rank 8 exceeds lora.max_rank 4");
}

TEST_CASE("A pickle-only adapter is refused and missing files are NOT_FOUND") {
  const std::string dir = test::WriteAdapter({});
  fs::rename(dir + "/adapter_model.safetensors", dir + "/adapter_model.bin");
  const absl::Status pickle = LoadStatus("p", dir);
  CHECK(pickle.code() == absl::StatusCode::kInvalidArgument);
  CHECK(Message(pickle) == "adapter 'p': pickle .bin adapters are refused; convert to safetensors");

  fs::remove(dir + "/adapter_model.bin");
  CHECK(LoadStatus("p", dir).code() == absl::StatusCode::kNotFound);
  fs::remove(dir + "/adapter_config.json");
  CHECK(LoadStatus("p", dir).code() == absl::StatusCode::kNotFound);
  CHECK(LoadStatus("p", dir + "/nope").code() == absl::StatusCode::kNotFound);
  const absl::Status file = LoadStatus("p", test::WriteAdapter({}) + "/adapter_config.json");
  CHECK(file.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(file), Catch::Contains("is not a directory"));
}

TEST_CASE("Adapter paths must resolve under an allowed root") {
  const fs::path base = test::TempDir();
  const fs::path root = base / "root";
  fs::create_directories(root);
  REQUIRE(testing::WriteTinyAdapter((root / "good").string(), test::Spec(), {}).ok());
  REQUIRE(testing::WriteTinyAdapter((base / "outside").string(), test::Spec(), {}).ok());
  fs::create_directory_symlink(base / "outside", root / "escape");
  fs::create_directory_symlink(root / "good", root / "alias");
  LoraLimits limits = test::Limits();
  limits.allowed_roots = {root.string() + "/"};

  CHECK(LoadStatus("a", (root / "good").string(), limits).ok());
  CHECK(LoadStatus("a", (root / "alias").string(), limits).ok());
  for (const fs::path& bad : {base / "outside", root / ".." / "outside", root / "escape", base / "root-sibling"}) {
    INFO(bad.string());
    const absl::Status st = LoadStatus("a", bad.string(), limits);
    CHECK(st.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(Message(st), Catch::Contains("is outside the allowed adapter roots"));
  }
  // Inside the root, a missing directory is reported as missing.
  CHECK(LoadStatus("a", (root / "missing").string(), limits).code() == absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace loraplex::lora
