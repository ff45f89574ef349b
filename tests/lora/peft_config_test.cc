#include "lora/peft_config.h"

#include <catch2/catch.hpp>

#include "tests/lora/lora_test_util.h"

namespace loraplex::lora {
namespace {

using model::Proj;

PeftConfig MustParse(const std::string& json, const LoraLimits& limits = test::Limits()) {
  auto config = ParsePeftConfig(json, limits, test::Spec());
  INFO(config.status().ToString());
  REQUIRE(config.ok());
  return *config;
}

ModuleRankAlpha Resolve(const PeftConfig& c, int64_t layer, Proj p) {
  auto m = ResolveModule(c, ModuleName(layer, p));
  REQUIRE(m.ok());
  return *m;
}

// The set of (layer, projection) a config targets on the two-layer tiny model, as names.
std::vector<std::string> Targeted(const PeftConfig& c) {
  std::vector<std::string> out;
  for (int64_t l = 0; l < 2; ++l) {
    for (int p = 0; p < model::kNumProj; ++p) {
      auto hit = IsTargeted(c, l, static_cast<Proj>(p));
      REQUIRE(hit.ok());
      if (*hit) out.push_back(ModuleName(l, static_cast<Proj>(p)));
    }
  }
  return out;
}

TEST_CASE("ModuleName spells modules as PEFT sees them in a Llama model") {
  CHECK(ModuleName(3, Proj::kQ) == "model.layers.3.self_attn.q_proj");
  CHECK(ModuleName(0, Proj::kDown) == "model.layers.0.mlp.down_proj");
}

TEST_CASE("Scale is alpha over r, or alpha over sqrt(r) with rsLoRA") {
  // Scales are exact binary fractions here, so they compare exactly.
  const PeftConfig plain = MustParse(R"({"peft_type":"LORA","r":16,"lora_alpha":8,"target_modules":["q_proj"]})");
  CHECK(Resolve(plain, 0, Proj::kQ).scale == 0.5f);
  const PeftConfig rs =
      MustParse(R"({"peft_type":"LORA","r":16,"lora_alpha":8,"use_rslora":true,"target_modules":["q_proj"]})");
  CHECK(Resolve(rs, 0, Proj::kQ).scale == 2.0f);
  SECTION("lora_alpha defaults to 8") {
    const PeftConfig c = MustParse(R"({"peft_type":"LORA","r":4,"target_modules":["q_proj"]})");
    CHECK(Resolve(c, 1, Proj::kQ).scale == 2.0f);
  }
}

TEST_CASE("rank_pattern and alpha_pattern set rank, alpha and scale per module") {
  const PeftConfig c = MustParse(R"({"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":"all-linear",
      "rank_pattern":{"q_proj":4,"layers.1.mlp.down_proj":2,"proj":32},
      "alpha_pattern":{"down_proj":32}})");
  const ModuleRankAlpha q0 = Resolve(c, 0, Proj::kQ);
  CHECK(q0.rank == 4);
  CHECK(q0.alpha == 16.0f);
  CHECK(q0.scale == 4.0f);
  const ModuleRankAlpha down1 = Resolve(c, 1, Proj::kDown);
  CHECK(down1.rank == 2);
  CHECK(down1.alpha == 32.0f);
  CHECK(down1.scale == 16.0f);
  const ModuleRankAlpha down0 = Resolve(c, 0, Proj::kDown);
  CHECK(down0.rank == 8);
  CHECK(down0.scale == 4.0f);
  // "proj" matches only a whole dotted component, so it does not catch "k_proj".
  const ModuleRankAlpha k0 = Resolve(c, 0, Proj::kK);
  CHECK(k0.rank == 8);
  CHECK(k0.scale == 2.0f);
}

TEST_CASE("The first matching pattern key in file order wins") {
  const PeftConfig general_first = MustParse(
      R"({"peft_type":"LORA","r":8,"target_modules":["q_proj"],"rank_pattern":{"q_proj":6,"layers.0.self_attn.q_proj":2}})");
  CHECK(Resolve(general_first, 0, Proj::kQ).rank == 6);
  const PeftConfig specific_first = MustParse(
      R"({"peft_type":"LORA","r":8,"target_modules":["q_proj"],"rank_pattern":{"layers.0.self_attn.q_proj":2,"q_proj":6}})");
  CHECK(Resolve(specific_first, 0, Proj::kQ).rank == 2);
  CHECK(Resolve(specific_first, 1, Proj::kQ).rank == 6);
}

TEST_CASE("target_modules selects by list suffix, full-match regex or all-linear") {
  SECTION("a list entry matches the name or a dotted suffix of it") {
    const PeftConfig c = MustParse(R"({"peft_type":"LORA","r":4,"target_modules":["q_proj","self_attn.v_proj"]})");
    CHECK(Targeted(c) == std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                                  "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"});
  }
  SECTION("a string is a regex that must match the whole module name") {
    const PeftConfig c = MustParse(R"({"peft_type":"LORA","r":4,"target_modules":"model\\.layers\\.1\\..*(q|k)_proj"})");
    CHECK(Targeted(c) == std::vector<std::string>{"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"});
  }
  SECTION("all-linear selects the seven projections of every layer") {
    CHECK(Targeted(MustParse(R"({"peft_type":"LORA","r":4,"target_modules":"all-linear"})")).size() == 14);
  }
  SECTION("absent target_modules means PEFT's Llama default, q_proj and v_proj") {
    CHECK(Targeted(MustParse(R"({"peft_type":"LORA","r":4})")).size() == 4);
  }
  SECTION("exclude_modules removes modules by the same rules") {
    const PeftConfig list = MustParse(R"({"peft_type":"LORA","r":4,"target_modules":"all-linear","exclude_modules":["mlp.down_proj","o_proj"]})");
    CHECK(Targeted(list).size() == 10);
    const PeftConfig regex = MustParse(R"({"peft_type":"LORA","r":4,"target_modules":"all-linear","exclude_modules":".*\\.mlp\\..*"})");
    CHECK(Targeted(regex).size() == 8);
  }
}

TEST_CASE("A regex target must match the whole name, not a substring") {
  // "q_proj" alone full-matches no module name, so this config selects nothing and is refused.
  auto c = ParsePeftConfig(R"({"peft_type":"LORA","r":4,"target_modules":"q_proj"})", test::Limits(), test::Spec());
  REQUIRE(c.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(c.status().message()), Catch::Contains("select no module"));
}

TEST_CASE("layers_to_transform restricts the adapted layers") {
  const PeftConfig one = MustParse(R"({"peft_type":"LORA","r":4,"target_modules":["q_proj"],"layers_to_transform":1})");
  CHECK(Targeted(one) == std::vector<std::string>{"model.layers.1.self_attn.q_proj"});
  const PeftConfig list = MustParse(R"({"peft_type":"LORA","r":4,"target_modules":["q_proj"],"layers_to_transform":[0]})");
  CHECK(Targeted(list) == std::vector<std::string>{"model.layers.0.self_attn.q_proj"});
}

TEST_CASE("Unsupported PEFT features are refused with the reason") {
  struct Case {
    const char* json;
    const char* message;
  };
  const Case cases[] = {
      {R"({"peft_type":"PREFIX_TUNING","r":4})", "peft_type must be \"LORA\""},
      {R"({"r":4})", "peft_type must be \"LORA\""},
      {R"({"peft_type":"LORA","r":4,"use_dora":true})", "DoRA"},
      {R"({"peft_type":"LORA","r":4,"modules_to_save":["lm_head"]})", "modules_to_save"},
      {R"({"peft_type":"LORA","r":4,"bias":"all"})", "bias \"all\" is not supported"},
      {R"({"peft_type":"LORA","r":4,"lora_bias":true})", "lora_bias"},
      {R"({"peft_type":"LORA","r":4,"fan_in_fan_out":true})", "fan_in_fan_out"},
      {R"({"peft_type":"LORA","r":4,"target_modules":["q_proj","embed_tokens"]})", "'embed_tokens' is an embedding/lm_head target"},
      {R"({"peft_type":"LORA","r":4,"target_modules":["lm_head"]})", "'lm_head' is an embedding/lm_head target"},
      {R"j({"peft_type":"LORA","r":4,"target_modules":".*(q_proj|embed_tokens)"})j", "matches module 'model.embed_tokens'"},
      {R"({"peft_type":"LORA","r":4,"target_modules":["rotary_emb"]})", "'rotary_emb' is not supported"},
      {R"({"peft_type":"LORA","r":4,"target_modules":"("})", "does not compile"},
      {R"({"peft_type":"LORA","r":4,"rank_pattern":{"(":2}})", "does not compile"},
      {R"({"peft_type":"LORA","r":128})", "rank 128 exceeds lora.max_rank 64"},
      {R"({"peft_type":"LORA","r":4,"rank_pattern":{"q_proj":65}})", "rank_pattern 'q_proj': rank 65 exceeds lora.max_rank 64"},
      {R"({"peft_type":"LORA","r":0})", "rank 0 must be > 0"},
      {R"({"peft_type":"LORA","r":"eight"})", "rank: must be an integer"},
      {R"({"peft_type":"LORA","r":4,"layer_replication":[[0,1]]})", "layer_replication"},
      {R"({"peft_type":"LORA","r":4,"layers_to_transform":"all"})", "layers_to_transform"},
      {R"({"peft_type":"LORA","r":4,"target_modules":"all-linear","layers_to_transform":[0]})",
       "layers_to_transform cannot be used when target_modules is a string"},
      {R"({"peft_type":"LORA","r":4)", "malformed JSON"},
  };
  for (const Case& c : cases) {
    INFO(c.json);
    auto config = ParsePeftConfig(c.json, test::Limits(), test::Spec());
    REQUIRE(config.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(config.status().message()), Catch::Contains(c.message));
  }
}

TEST_CASE("A target the server does not enable is refused") {
  LoraLimits limits = test::Limits();
  limits.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  auto config = ParsePeftConfig(R"({"peft_type":"LORA","r":4,"target_modules":"all-linear"})", limits, test::Spec());
  REQUIRE(config.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(config.status().message()),
             Catch::Contains("target module 'gate_proj' is not enabled on this server"));
  // Excluding the MLP makes the same adapter acceptable.
  CHECK(ParsePeftConfig(R"({"peft_type":"LORA","r":4,"target_modules":"all-linear","exclude_modules":".*mlp.*"})",
                        limits, test::Spec())
            .ok());
}

TEST_CASE("Unknown keys that do not change the math are ignored") {
  const PeftConfig c = MustParse(R"({"peft_type":"LORA","r":4,"task_type":"CAUSAL_LM","lora_dropout":0.1,
      "inference_mode":true,"init_lora_weights":true,"revision":null,"megatron_config":null,"target_modules":["q_proj"]})");
  CHECK(c.r == 4);
}

}  // namespace
}  // namespace loraplex::lora
