// Runs the real bench/step_bench binary (--cpu 1) over a toy checkpoint laid out as
// bench/make_bench_checkpoint.py lays out the benchmark one (model/ plus adapters r16_0..r16_31 of
// rank 16, mix_0..mix_7 of ranks 8, 16, 32, 64 and r64_0..r64_7), and checks the JSON it writes.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tests/testing/tiny_model.h"

namespace loraplex {
namespace {

TEST_CASE("step_bench runs every decode and prefill scenario on the CPU executor and writes them") {
  const std::string dir = testing::MakeTempDir("step-bench");
  testing::TinyModelOptions model;
  model.max_position_embeddings = 4096;  // the benchmark prefills 2048 tokens
  REQUIRE(testing::WriteTinyModel(dir + "/model", model).ok());
  const model::ModelSpec spec = testing::TinyModelSpec(model);
  for (int i = 0; i < 48; ++i) {
    testing::TinyAdapterOptions adapter;
    adapter.r = i < 32 ? 16 : i < 40 ? 8 << ((i - 32) % 4) : 64;
    adapter.alpha = 2.0 * static_cast<double>(adapter.r);
    adapter.seed = static_cast<uint64_t>(100 + i);
    const std::string name = i < 32   ? absl::StrCat("r16_", i)
                             : i < 40 ? absl::StrCat("mix_", i - 32)
                                      : absl::StrCat("r64_", i - 40);
    REQUIRE(testing::WriteTinyAdapter(dir + "/adapters/" + name, spec, adapter).ok());
  }
  const std::string json_path = dir + "/out.json";
  const std::string command = absl::StrCat(LORAPLEX_BINARY_DIR, "/bench/step_bench ", dir, "/model ", dir,
                                           "/adapters ", json_path, " --cpu 1 --batches 1,8 --steps 1 > ", dir,
                                           "/log.txt 2>&1");
  INFO(command);
  REQUIRE(std::system(command.c_str()) == 0);

  std::ifstream f(json_path);
  const nlohmann::json rows = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  REQUIRE(rows.is_array());
  std::set<std::string> seen;
  for (const nlohmann::json& r : rows) {
    const std::string key = absl::StrCat(r["phase"].get<std::string>(), "/", r["scenario"].get<std::string>(), "/",
                                         r["batch"].get<int>());
    seen.insert(key);
    INFO(key);
    CHECK(r["graphs"].get<bool>() == false);  // the CPU ops record no graphs
    if (r["phase"] == "ranks") {
      // The mixed batch's added time over the in-proportion estimate: both measured, so only a
      // finite ratio is certain on a toy model.
      CHECK(std::isfinite(r["ratio_to_base"].get<double>()));
      CHECK(r["adapters"].get<int>() == 8);
      continue;
    }
    CHECK(r["ms"].get<double>() > 0.0);
    CHECK(r["tokens_per_s"].get<double>() > 0.0);
    if (key.find("paired") != std::string::npos) CHECK(r["ratio_to_base"].get<double>() > 0.0);
  }
  for (const char* want : {"decode/base, eager/1", "decode/one adapter r16, eager/1", "decode/1 distinct r16, eager/1",
                           "decode/1 mixed ranks, eager/1", "decode/base, eager/8", "decode/4 adapters r16, eager/8",
                           "decode/8 distinct r16, eager/8", "decode/8 mixed ranks, eager/8",
                           "decode/one adapter r16, eager, paired/1", "decode/one adapter r16, eager, paired/8",
                           "decode/8 distinct r16, eager, paired/8", "prefill/base/1", "prefill/one adapter r16/1",
                           "decode/8 adapters r16, eager/8", "decode/8 adapters r64, eager/8",
                           "ranks/mixed added / in proportion, eager/8"}) {
    INFO(want);
    CHECK(seen.count(want) == 1);
  }
}

}  // namespace
}  // namespace loraplex
