// ParseModelSpec over config.json variants, RopeInvFreq against Hugging Face's llama3 rule, and
// the tiny-model fixture round trip.
#include "engine/model/model_spec.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <fstream>
#include <string>

#include "engine/core/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/testing/tiny_model.h"

namespace loraplex::model {
namespace {

using nlohmann::json;

json BaseConfig() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
    "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"})");
}

absl::StatusOr<ModelSpec> Parse(const json& j) { return ParseModelSpec(j.dump()); }

// Refused with INVALID_ARGUMENT and a message naming `field`.
void ExpectRefused(const json& j, const std::string& field) {
  const auto spec = Parse(j);
  REQUIRE_FALSE(spec.ok());
  CHECK(spec.status().code() == absl::StatusCode::kInvalidArgument);
  INFO(spec.status().message());
  CHECK(std::string(spec.status().message()).find(field) != std::string::npos);
}

TEST_CASE("ParseModelSpec reads a Llama config and derives head_dim from hidden and heads") {
  const auto spec = Parse(BaseConfig());
  REQUIRE(spec.ok());
  CHECK(spec->vocab_size == 128);
  CHECK(spec->hidden_size == 64);
  CHECK(spec->intermediate_size == 160);
  CHECK(spec->num_layers == 3);
  CHECK(spec->num_heads == 8);
  CHECK(spec->num_kv_heads == 2);
  CHECK(spec->head_dim == 8);
  CHECK(spec->qkv_width() == 64 + 2 * 16);
  CHECK(spec->rope.theta == 500000.0);
  CHECK(spec->rope.rope_type == "default");
  CHECK(spec->rms_norm_eps == 1e-5);
  CHECK(spec->eos_token_ids == std::vector<int64_t>{2});
  CHECK(spec->bos_token_id == 1);
  CHECK(spec->torch_dtype == "bfloat16");
  CHECK_FALSE(spec->tie_word_embeddings);
}

TEST_CASE(
    "ParseModelSpec defaults num_key_value_heads to num_attention_heads and honours head_dim") {
  json j = BaseConfig();
  j.erase("num_key_value_heads");
  j["head_dim"] = 16;
  const auto spec = Parse(j);
  REQUIRE(spec.ok());
  CHECK(spec->num_kv_heads == 8);
  CHECK(spec->head_dim == 16);
  CHECK(spec->q_width() == 128);
}

TEST_CASE("ParseModelSpec accepts eos_token_id as a list and Mistral architectures") {
  json j = BaseConfig();
  j["eos_token_id"] = {128001, 128008, 128009};
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = nullptr;
  const auto spec = Parse(j);
  REQUIRE(spec.ok());
  CHECK(spec->eos_token_ids == std::vector<int64_t>{128001, 128008, 128009});
  CHECK(spec->architecture == "MistralForCausalLM");
}

TEST_CASE("ParseModelSpec reads llama3 rope_scaling with either type key") {
  for (const char* key : {"rope_type", "type"}) {
    json j = BaseConfig();
    j["rope_scaling"] = {{key, "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8192}};
    const auto spec = Parse(j);
    REQUIRE(spec.ok());
    CHECK(spec->rope.rope_type == "llama3");
    CHECK(spec->rope.factor == 8.0);
    CHECK(spec->rope.original_max_position_embeddings == 8192);
    CHECK(spec->rope.theta == 500000.0);
  }
}

TEST_CASE("ParseModelSpec reads the newer rope_parameters object including its rope_theta") {
  json j = BaseConfig();
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "llama3"},   {"rope_theta", 250000.0},
                          {"factor", 32.0},          {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  const auto spec = Parse(j);
  REQUIRE(spec.ok());
  CHECK(spec->rope.theta == 250000.0);
  CHECK(spec->rope.rope_type == "llama3");
  CHECK(spec->rope.factor == 32.0);

  json plain = BaseConfig();
  plain["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000.0}};
  const auto spec2 = Parse(plain);
  REQUIRE(spec2.ok());
  CHECK(spec2->rope.theta == 1000.0);
  CHECK(spec2->rope.rope_type == "default");
}

TEST_CASE("ParseModelSpec refuses unsupported or malformed fields naming the field") {
  SECTION("attention_bias") {
    json j = BaseConfig();
    j["attention_bias"] = true;
    ExpectRefused(j, "attention_bias");
  }
  SECTION("mlp_bias") {
    json j = BaseConfig();
    j["mlp_bias"] = true;
    ExpectRefused(j, "mlp_bias");
  }
  SECTION("other rope types") {
    json j = BaseConfig();
    j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
    ExpectRefused(j, "rope_scaling.rope_type 'yarn'");
  }
  SECTION("llama3 without its factors") {
    json j = BaseConfig();
    j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
    ExpectRefused(j, "rope_scaling.low_freq_factor");
  }
  SECTION("heads not a multiple of kv heads") {
    json j = BaseConfig();
    j["num_key_value_heads"] = 3;
    ExpectRefused(j, "num_key_value_heads");
  }
  SECTION("non-positive sizes") {
    json j = BaseConfig();
    j["hidden_size"] = 0;
    ExpectRefused(j, "hidden_size");
    j = BaseConfig();
    j["intermediate_size"] = -4;
    ExpectRefused(j, "intermediate_size");
  }
  SECTION("a size of the wrong type") {
    json j = BaseConfig();
    j["num_hidden_layers"] = "three";
    ExpectRefused(j, "num_hidden_layers");
  }
  SECTION("a missing size") {
    json j = BaseConfig();
    j.erase("vocab_size");
    ExpectRefused(j, "vocab_size");
  }
  SECTION("a non-Llama architecture") {
    json j = BaseConfig();
    j["architectures"] = {"GPT2LMHeadModel"};
    ExpectRefused(j, "GPT2LMHeadModel");
  }
  SECTION("a bad eos_token_id") {
    json j = BaseConfig();
    j["eos_token_id"] = "</s>";
    ExpectRefused(j, "eos_token_id");
  }
  SECTION("a sliding window shorter than the context") {
    json j = BaseConfig();
    j["sliding_window"] = 1024;
    ExpectRefused(j, "sliding_window");
  }
  SECTION("not JSON") {
    CHECK(ParseModelSpec("{nope").status().code() == absl::StatusCode::kInvalidArgument);
  }
}

// Hugging Face's _compute_llama3_parameters, written the way it is there: where() over masks.
std::vector<double> HfLlama3InvFreq(double base, int dim, double factor, double low, double high,
                                    double old_ctx) {
  std::vector<double> out;
  for (int i = 0; i < dim; i += 2) {
    const double inv = 1.0 / std::pow(base, static_cast<double>(i) / dim);
    const double low_freq_wavelen = old_ctx / low, high_freq_wavelen = old_ctx / high;
    const double wavelen = 2 * M_PI / inv;
    double inv_llama = wavelen > low_freq_wavelen ? inv / factor : inv;
    const double smooth = (old_ctx / wavelen - low) / (high - low);
    const double smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama;
    const bool is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    if (is_medium) inv_llama = smoothed;
    out.push_back(inv_llama);
  }
  return out;
}

TEST_CASE("RopeInvFreq applies Hugging Face's llama3 rule in all three frequency bands") {
  ModelSpec spec;
  spec.head_dim = 16;
  spec.rope.theta = 10000.0;
  SECTION("default rope is theta^(-2i/d)") {
    const auto f = RopeInvFreq(spec);
    REQUIRE(f.size() == 8);
    for (int i = 0; i < 8; ++i)
      CHECK(f[i] == Approx(1.0 / std::pow(10000.0, 2.0 * i / 16)).epsilon(1e-6));
  }
  SECTION("llama3") {
    spec.rope.rope_type = "llama3";
    spec.rope.factor = 8.0;
    spec.rope.low_freq_factor = 1.0;
    spec.rope.high_freq_factor = 4.0;
    // Wavelengths 6.3 .. 20000 against bands at 16 and 64: kept, smoothed and divided entries.
    spec.rope.original_max_position_embeddings = 64;
    const auto f = RopeInvFreq(spec);
    const auto want = HfLlama3InvFreq(10000.0, 16, 8.0, 1.0, 4.0, 64);
    REQUIRE(f.size() == want.size());
    // f is fp32: 1e-6 relative is its rounding.
    for (size_t i = 0; i < f.size(); ++i) CHECK(f[i] == Approx(want[i]).epsilon(1e-6));
    CHECK(f[0] == Approx(1.0).epsilon(1e-7));  // high frequency: kept
    CHECK(f[7] == Approx(1.0 / std::pow(10000.0, 14.0 / 16) / 8.0).epsilon(1e-6));  // low: divided
    const double plain2 = 1.0 / std::pow(10000.0, 4.0 / 16);  // wavelen ~ 63: smoothed
    CHECK(f[2] < plain2);
    CHECK(f[2] > plain2 / 8.0);
  }
}

TEST_CASE("WriteTinyModel writes a config.json that LoadModelSpec reads back") {
  testing::TinyModelOptions options;
  options.llama3_rope = true;
  options.tie_word_embeddings = true;
  const std::string dir = testing::MakeTempDir("spec");
  REQUIRE(testing::WriteTinyModel(dir, options).ok());
  const auto spec = LoadModelSpec(dir);
  REQUIRE(spec.ok());
  const ModelSpec want = testing::TinyModelSpec(options);
  CHECK(spec->vocab_size == want.vocab_size);
  CHECK(spec->hidden_size == want.hidden_size);
  CHECK(spec->num_layers == want.num_layers);
  CHECK(spec->num_kv_heads == want.num_kv_heads);
  CHECK(spec->head_dim == want.head_dim);
  CHECK(spec->tie_word_embeddings);
  CHECK(spec->rope.rope_type == "llama3");
  CHECK(spec->rope.original_max_position_embeddings == want.rope.original_max_position_embeddings);
  CHECK(LoadModelSpec(dir + "/nope").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("WriteTinyModel config overrides reach config.json") {
  testing::TinyModelOptions options;
  options.config_overrides_json = R"({"attention_bias": true})";
  const std::string dir = testing::MakeTempDir("spec-bad");
  REQUIRE(testing::WriteTinyModel(dir, options).ok());
  const auto spec = LoadModelSpec(dir);
  REQUIRE_FALSE(spec.ok());
  CHECK(std::string(spec.status().message()).find("attention_bias") != std::string::npos);
}

TEST_CASE(
    "WriteTinyAdapter writes PEFT keys and shapes with rank_pattern and layers_to_transform "
    "applied") {
  testing::TinyModelOptions model_options;
  model_options.layers = 3;
  const ModelSpec spec = testing::TinyModelSpec(model_options);
  testing::TinyAdapterOptions options;
  options.r = 4;
  options.target_modules = {"q_proj", "down_proj"};
  options.rank_pattern = {{"layers.2.self_attn.q_proj", 8}};
  options.layers_to_transform = {0, 2};
  options.config_overrides_json = R"({"lora_alpha": 16, "use_dora": true})";
  const std::string dir = testing::MakeTempDir("adapter");
  REQUIRE(testing::WriteTinyAdapter(dir, spec, options).ok());

  auto file = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  REQUIRE(file.ok());
  CHECK((*file)->tensors().size() == 2 * 2 * 2);  // 2 layers x 2 modules x {A, B}
  const std::string l0 = "base_model.model.model.layers.0.";
  const std::string l2 = "base_model.model.model.layers.2.";
  auto shape = [&](const std::string& name) {
    auto info = (*file)->Find(name);
    REQUIRE(info.ok());
    return (*info)->shape;
  };
  CHECK(shape(l0 + "self_attn.q_proj.lora_A.weight") == Shape{4, spec.hidden_size});
  CHECK(shape(l0 + "self_attn.q_proj.lora_B.weight") == Shape{spec.q_width(), 4});
  CHECK(shape(l2 + "self_attn.q_proj.lora_A.weight") == Shape{8, spec.hidden_size});
  CHECK(shape(l2 + "mlp.down_proj.lora_A.weight") == Shape{4, spec.intermediate_size});
  CHECK(shape(l2 + "mlp.down_proj.lora_B.weight") == Shape{spec.hidden_size, 4});
  CHECK_FALSE((*file)->Find("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight").ok());
  // B is random, not PEFT's zero init, so the adapter changes outputs.
  auto b = (*file)->ReadAs(l0 + "self_attn.q_proj.lora_B.weight", DType::kF32);
  REQUIRE(b.ok());
  double norm = 0;
  for (int64_t i = 0; i < b->shape().NumElements(); ++i) norm += std::abs(b->As<float>()[i]);
  CHECK(norm > 0);

  std::ifstream f(dir + "/adapter_config.json");
  const json config = json::parse(f);
  CHECK(config["r"] == 4);
  CHECK(config["lora_alpha"] == 16);
  CHECK(config["use_dora"] == true);
  CHECK(config["rank_pattern"]["layers.2.self_attn.q_proj"] == 8);
  CHECK(config["layers_to_transform"] == json::array({0, 2}));
  CHECK(config["peft_type"] == "LORA");
}

}  // namespace
}  // namespace loraplex::model
