#include "config/config.h"

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace loraplex::config {
namespace {

namespace fs = std::filesystem;

// Parses `yaml` and requires an INVALID_ARGUMENT whose message contains `fragment`.
void RequireError(const std::string& yaml, const std::string& fragment) {
  auto config = ParseConfig(yaml);
  INFO(yaml);
  INFO(config.status().ToString());
  REQUIRE(config.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(config.status().message()).find(fragment) != std::string::npos);
}

constexpr char kModel[] = "model:\n  path: /models/llama\n";

TEST_CASE("A full config fills every field") {
  const std::string yaml = R"(
server:
  address: 0.0.0.0:9000
  max_message_bytes: 1048576
  max_queued_requests: 10
  max_prompt_tokens: 512
  max_new_tokens_limit: 256
  enable_reflection: false
  metrics_address: "127.0.0.1:9100"
  drain_timeout_s: 2.5
model:
  path: /models/llama
  tokenizer_path: /models/llama/tokenizer.json
  dtype: bfloat16
  max_seq_len: 4096
engine:
  executor: cpu
  kv_cache_tokens: 8192
  kv_block_size: 32
  max_batch_tokens: 1024
  max_running_seqs: 16
  default_seed: 18446744073709551615
  cuda_graphs: false
lora:
  max_rank: 16
  target_modules: [q_proj, v_proj]
  adapter_slots: 4
  max_adapters: 100
  host_cache_mib: 2048
  allowed_roots: [/adapters]
adapters:
  - name: sql
    path: /adapters/sql
    pinned: true
  - {name: chat.v2, path: /adapters/chat}
logging:
  level: debug
  format: json
)";
  auto config = ParseConfig(yaml, "/ignored/for/absolute");
  INFO(config.status().ToString());
  REQUIRE(config.ok());
  const Config& c = *config;
  CHECK(c.server.address == "0.0.0.0:9000");
  CHECK(c.server.max_message_bytes == 1048576);
  CHECK(c.server.max_queued_requests == 10);
  CHECK(c.server.max_prompt_tokens == 512);
  CHECK(c.server.max_new_tokens_limit == 256);
  CHECK_FALSE(c.server.enable_reflection);
  CHECK(c.server.metrics_address == "127.0.0.1:9100");
  CHECK(c.server.drain_timeout_s == 2.5);
  CHECK(c.model.path == "/models/llama");
  CHECK(c.model.tokenizer_path == "/models/llama/tokenizer.json");
  CHECK(c.model.dtype == "bfloat16");
  CHECK(c.model.max_seq_len == 4096);
  CHECK(c.engine.executor == "cpu");
  CHECK(c.engine.kv_cache_tokens == 8192);
  CHECK(c.engine.kv_block_size == 32);
  CHECK(c.engine.max_batch_tokens == 1024);
  CHECK(c.engine.max_running_seqs == 16);
  CHECK(c.engine.default_seed == 18446744073709551615ull);
  CHECK_FALSE(c.engine.cuda_graphs);
  CHECK(c.lora.max_rank == 16);
  CHECK(c.lora.target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK(c.lora.adapter_slots == 4);
  CHECK(c.lora.max_adapters == 100);
  CHECK(c.lora.host_cache_mib == 2048);
  CHECK(c.lora.allowed_roots == std::vector<std::string>{"/adapters"});
  REQUIRE(c.adapters.size() == 2);
  CHECK(c.adapters[0].name == "sql");
  CHECK(c.adapters[0].path == "/adapters/sql");
  CHECK(c.adapters[0].pinned);
  CHECK(c.adapters[1].name == "chat.v2");
  CHECK_FALSE(c.adapters[1].pinned);
  CHECK(c.logging.level == "debug");
  CHECK(c.logging.format == "json");
}

TEST_CASE("Omitted sections and fields keep their defaults") {
  auto config = ParseConfig(std::string(kModel) + "server:\nengine: {}\n");
  REQUIRE(config.ok());
  const Config defaults;
  CHECK(config->server.address == defaults.server.address);
  CHECK(config->server.max_message_bytes == 4 << 20);
  CHECK(config->server.enable_reflection);
  CHECK(config->server.metrics_address.empty());
  CHECK(config->model.dtype == "auto");
  CHECK(config->model.tokenizer_path.empty());
  CHECK(config->engine.executor == "auto");
  CHECK(config->engine.kv_block_size == 16);
  CHECK(config->engine.max_batch_tokens == 2048);
  CHECK(config->lora.max_rank == 64);
  CHECK(config->lora.target_modules.size() == 7);
  CHECK(config->lora.adapter_slots == 8);
  CHECK(config->adapters.empty());
  CHECK(config->logging.level == "info");
  CHECK(config->logging.format == "text");
}

TEST_CASE("model.path is required") {
  RequireError("", "model.path");
  RequireError("server:\n  address: a:1\n", "model.path: is required");
  RequireError("model:\n  dtype: auto\n", "model.path (line 2): is required");
}

TEST_CASE("Out-of-range numbers name the YAML path, line and value") {
  RequireError(std::string(kModel) + "engine:\n  executor: cpu\n  max_batch_tokens: -4\n",
               "engine.max_batch_tokens (line 5): must be > 0, got -4");
  RequireError(std::string(kModel) + "server:\n  max_message_bytes: 0\n",
               "server.max_message_bytes (line 4): must be > 0, got 0");
  RequireError(std::string(kModel) + "server:\n  max_queued_requests: 0\n",
               "server.max_queued_requests (line 4)");
  RequireError(std::string(kModel) + "server:\n  max_new_tokens_limit: -1\n",
               "server.max_new_tokens_limit (line 4)");
  RequireError(std::string(kModel) + "server:\n  max_prompt_tokens: -1\n",
               "server.max_prompt_tokens (line 4): must be >= 0, got -1");
  RequireError(std::string(kModel) + "server:\n  drain_timeout_s: -1\n",
               "server.drain_timeout_s (line 4): must be >= 0");
  RequireError(std::string(kModel) + "engine:\n  max_running_seqs: 0\n",
               "engine.max_running_seqs (line 4)");
  RequireError(std::string(kModel) + "engine:\n  kv_cache_tokens: -1\n",
               "engine.kv_cache_tokens (line 4)");
  RequireError("model:\n  path: m\n  max_seq_len: -2\n", "model.max_seq_len (line 3)");
  RequireError(std::string(kModel) + "lora:\n  adapter_slots: 0\n", "lora.adapter_slots (line 4)");
  RequireError(std::string(kModel) + "lora:\n  max_adapters: 0\n", "lora.max_adapters (line 4)");
  RequireError(std::string(kModel) + "lora:\n  host_cache_mib: -1\n",
               "lora.host_cache_mib (line 4): must be in [0, 1073741824] (MiB; 0: no limit), got -1");
  RequireError(std::string(kModel) + "lora:\n  host_cache_mib: 1073741825\n", "lora.host_cache_mib (line 4)");
}

TEST_CASE("kv_block_size must be a power of two in [1, 256]") {
  for (int ok : {1, 2, 16, 256}) {
    INFO(ok);
    CHECK(
        ParseConfig(std::string(kModel) + "engine:\n  kv_block_size: " + std::to_string(ok)).ok());
  }
  for (int bad : {0, 3, 24, 512, -16}) {
    RequireError(std::string(kModel) + "engine:\n  kv_block_size: " + std::to_string(bad),
                 "engine.kv_block_size (line 4): must be a power of two in [1, 256], got " +
                     std::to_string(bad));
  }
}

TEST_CASE("max_rank must be in [1, 1024]") {
  CHECK(ParseConfig(std::string(kModel) + "lora:\n  max_rank: 1024\n").ok());
  RequireError(std::string(kModel) + "lora:\n  max_rank: 1025\n",
               "lora.max_rank (line 4): must be in [1, 1024], got 1025");
  RequireError(std::string(kModel) + "lora:\n  max_rank: 0\n", "lora.max_rank (line 4)");
}

TEST_CASE("Enumerated strings accept only their values") {
  RequireError("model:\n  path: m\n  dtype: int8\n",
               "model.dtype (line 3): must be one of auto, "
               "float32, bfloat16, float16; got 'int8'");
  RequireError(std::string(kModel) + "engine:\n  executor: tpu\n", "engine.executor (line 4)");
  RequireError(std::string(kModel) + "logging:\n  level: verbose\n", "logging.level (line 4)");
  RequireError(std::string(kModel) + "logging:\n  format: xml\n", "logging.format (line 4)");
}

TEST_CASE("Addresses must be host:port") {
  for (const char* bad : {"localhost", ":50051", "'host:'", "host:port", "host:70000", "''"}) {
    RequireError(std::string(kModel) + "server:\n  address: " + bad + "\n",
                 "server.address (line 4): must be host:port");
  }
  CHECK(ParseConfig(std::string(kModel) + "server:\n  address: '[::1]:0'\n").ok());
  RequireError(std::string(kModel) + "server:\n  metrics_address: nope\n",
               "server.metrics_address (line 4)");
}

TEST_CASE("target_modules must be a non-repeating subset of the seven projections") {
  RequireError(std::string(kModel) + "lora:\n  target_modules:\n    - q_proj\n    - lm_head\n",
               "lora.target_modules[1] (line 6): unsupported module 'lm_head'");
  RequireError(std::string(kModel) + "lora:\n  target_modules: [q_proj, q_proj]\n",
               "lora.target_modules[1] (line 4): duplicate module 'q_proj'");
  RequireError(std::string(kModel) + "lora:\n  target_modules: []\n",
               "lora.target_modules (line 4)");
  RequireError(std::string(kModel) + "lora:\n  target_modules: q_proj\n",
               "lora.target_modules (line 4): expected a list of strings");
}

TEST_CASE("Adapter entries are validated with their list index") {
  const std::string head = std::string(kModel) + "adapters:\n";
  RequireError(head + "  - name: sql\n    path: /a\n  - name: sql\n    path: /b\n",
               "adapters[1].name (line 6): duplicate adapter name 'sql'");
  RequireError(head + "  - name: 'bad name'\n    path: /a\n",
               "adapters[0].name (line 4): adapter name must match");
  RequireError(head + "  - name: " + std::string(129, 'a') + "\n    path: /a\n",
               "adapters[0].name (line 4)");
  RequireError(head + "  - name: x\n    path: ''\n",
               "adapters[0].path (line 5): must not be empty");
  RequireError(head + "  - name: x\n", "adapters[0] (line 4): missing 'path'");
  RequireError(head + "  - path: /a\n", "adapters[0] (line 4): missing 'name'");
  RequireError(head + "  - name: x\n    path: /a\n    pinned: maybe\n",
               "adapters[0].pinned (line 6): expected true or false, got 'maybe'");
  RequireError(head + "  - name: x\n    path: /a\n    weight: 2\n",
               "adapters[0].weight (line 6): unknown key");
  RequireError(head + "  - just-a-string\n", "adapters[0] (line 4): expected a mapping");
  RequireError(std::string(kModel) + "adapters: {}\n", "adapters (line 3): expected a list");
  CHECK(ParseConfig(head + "  - name: A-z_0.9\n    path: /a\n").ok());
}

TEST_CASE("Pinned adapters must leave at least one free slot") {
  const std::string yaml = std::string(kModel) +
                           "lora:\n  adapter_slots: 2\n"
                           "adapters:\n"
                           "  - {name: a, path: /a, pinned: true}\n"
                           "  - {name: b, path: /b, pinned: true}\n";
  RequireError(yaml, "adapters[1].pinned (line 7): 2 pinned adapters leave no free slot");
  // The limit is read from `lora` even when `adapters` comes first in the file.
  const std::string reordered = std::string(kModel) +
                                "adapters:\n"
                                "  - {name: a, path: /a, pinned: true}\n"
                                "lora:\n  adapter_slots: 2\n";
  CHECK(ParseConfig(reordered).ok());
  RequireError(std::string(kModel) +
                   "lora:\n  max_adapters: 1\nadapters:\n"
                   "  - {name: a, path: /a}\n  - {name: b, path: /b}\n",
               "adapters (line 6): 2 adapters exceed lora.max_adapters 1");
}

TEST_CASE("Unknown keys are rejected at every level") {
  RequireError("model:\n  path: m\nserver:\n  adress: x:1\n",
               "server.adress (line 4): unknown key");
  RequireError("model:\n  path: m\nmodle: {}\n", "modle (line 3): unknown key");
  RequireError("model:\n  path: m\n  paht: n\n", "model.paht (line 3): unknown key");
}

TEST_CASE("Repeated keys are rejected") {
  RequireError("model:\n  path: m\n  path: n\n", "model.path (line 3): duplicate key");
}

TEST_CASE("Wrong types name the path, line and the bad value") {
  RequireError(std::string(kModel) + "engine:\n  max_batch_tokens: abc\n",
               "engine.max_batch_tokens (line 4): expected an integer, got 'abc'");
  RequireError(std::string(kModel) + "engine:\n  max_batch_tokens: 1.5\n",
               "expected an integer, got '1.5'");
  RequireError(std::string(kModel) + "engine:\n  max_batch_tokens: [1]\n",
               "engine.max_batch_tokens (line 4): expected an integer, got a list");
  RequireError(std::string(kModel) + "engine:\n  default_seed: -1\n",
               "engine.default_seed (line 4): expected a non-negative integer");
  RequireError(std::string(kModel) + "server:\n  enable_reflection: 2\n",
               "server.enable_reflection (line 4): expected true or false, got '2'");
  RequireError(std::string(kModel) + "server:\n  drain_timeout_s: soon\n",
               "server.drain_timeout_s (line 4): expected a number");
  RequireError("model:\n  path: {a: 1}\n", "model.path (line 2): expected a string, got a mapping");
  RequireError(std::string(kModel) + "server: 5\n", "server (line 3): expected a mapping, got '5'");
  RequireError("- a\n- b\n", "config (line 1): expected a mapping");
}

TEST_CASE("Malformed YAML is INVALID_ARGUMENT with a line") {
  RequireError("model:\n  path: m\nserver: [unclosed\n", "config (line");
  RequireError("model: {path: m\n", "config (line");
  RequireError("model:\n  path: m\n  x: y: z\n", "config (line 3)");
}

TEST_CASE("Relative paths resolve against the base directory") {
  const std::string yaml =
      "model:\n  path: models/llama\n  tokenizer_path: ../tok/tokenizer.json\n"
      "lora:\n  allowed_roots: [adapters, /abs/root]\n"
      "adapters:\n  - {name: a, path: adapters/a}\n  - {name: b, path: /abs/b}\n";
  auto config = ParseConfig(yaml, "/etc/loraplex");
  REQUIRE(config.ok());
  CHECK(config->model.path == "/etc/loraplex/models/llama");
  CHECK(config->model.tokenizer_path == "/etc/tok/tokenizer.json");
  CHECK(config->lora.allowed_roots ==
        std::vector<std::string>{"/etc/loraplex/adapters", "/abs/root"});
  CHECK(config->adapters[0].path == "/etc/loraplex/adapters/a");
  CHECK(config->adapters[1].path == "/abs/b");

  auto unresolved = ParseConfig(yaml);
  REQUIRE(unresolved.ok());
  CHECK(unresolved->model.path == "models/llama");
}

TEST_CASE("LoadConfigFile resolves paths against the file's directory") {
  std::random_device rd;
  const fs::path dir = fs::temp_directory_path() / ("loraplex_config_test_" + std::to_string(rd()));
  fs::create_directories(dir / "conf");
  const fs::path file = dir / "conf" / "loraplex.yaml";
  {
    std::ofstream out(file);
    out << "model:\n  path: ../models/tiny\nengine:\n  max_batch_tokens: x\n";
  }
  auto bad = LoadConfigFile(file.string());
  REQUIRE(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.status().message()).find(file.string()) != std::string::npos);
  CHECK(std::string(bad.status().message()).find("engine.max_batch_tokens (line 4)") !=
        std::string::npos);
  {
    std::ofstream out(file);
    out << "model:\n  path: ../models/tiny\n";
  }
  auto config = LoadConfigFile(file.string());
  REQUIRE(config.ok());
  CHECK(config->model.path == (dir / "models" / "tiny").string());
  fs::remove_all(dir);
}

TEST_CASE("LoadConfigFile of a missing file is NOT_FOUND") {
  const fs::path missing = fs::temp_directory_path() / "loraplex_no_such_dir" / "config.yaml";
  CHECK(LoadConfigFile(missing.string()).status().code() == absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace loraplex::config
