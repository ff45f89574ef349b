// The daemon's configuration: plain structs with their defaults, and the YAML loader that fills
// them. This library is the only user of yaml-cpp. Immutable after loading; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::config {

struct ServerConfig {
  std::string address = "127.0.0.1:50051";
  int64_t max_message_bytes = 4 << 20;   // gRPC receive/send limit
  int64_t max_queued_requests = 1024;     // waiting requests before RESOURCE_EXHAUSTED
  int64_t max_prompt_tokens = 0;          // 0: bounded only by model.max_seq_len
  int64_t max_new_tokens_limit = 4096;    // largest max_new_tokens a request may ask for
  bool enable_reflection = true;
  std::string metrics_address;            // "host:port" for /metrics; empty: off
  double drain_timeout_s = 30.0;          // SIGTERM: how long in-flight streams may finish
};

struct ModelConfig {
  std::string path;                       // Hugging Face model directory (config.json, *.safetensors)
  std::string tokenizer_path;             // tokenizer.json; empty: <path>/tokenizer.json
  std::string dtype = "auto";             // auto | float32 | bfloat16 | float16 (compute dtype)
  int64_t max_seq_len = 0;                // 0: the model's max_position_embeddings
};

struct EngineConfig {
  std::string executor = "auto";          // cpu | cuda | auto
  int64_t kv_cache_tokens = 0;            // KV capacity in tokens; 0: derived (cpu: 64 * max_seq_len ...)
  int64_t kv_block_size = 16;             // tokens per KV block
  int64_t max_batch_tokens = 2048;        // tokens in one forward step (prefill chunks included)
  int64_t max_running_seqs = 64;          // sequences decoding at once
  uint64_t default_seed = 0;              // seed for requests that give none (mixed with their id)
  bool cuda_graphs = true;                // replay decode steps as CUDA graphs (per batch bucket)
};

struct LoraConfig {
  int64_t max_rank = 64;
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  int64_t adapter_slots = 8;              // adapters resident on the device at once
  int64_t max_adapters = 1024;            // adapters registered at once
  // Parsed adapter weights kept in host memory beyond pinned and in-use adapters, in MiB (0: no
  // limit); the least recently used others are parsed again from disk when next used.
  int64_t host_cache_mib = 0;
  std::vector<std::string> allowed_roots; // adapter paths must resolve under one of these; empty: any
};

struct AdapterEntry {
  std::string name;
  std::string path;
  bool pinned = false;                    // never evicted from its device slot
};

struct LoggingConfig {
  std::string level = "info";             // trace | debug | info | warn | error
  std::string format = "text";            // text | json
};

struct Config {
  ServerConfig server;
  ModelConfig model;
  EngineConfig engine;
  LoraConfig lora;
  std::vector<AdapterEntry> adapters;
  LoggingConfig logging;
};

// Parses YAML text. Every error is INVALID_ARGUMENT and names the YAML path and line, e.g.
// "engine.max_batch_tokens (line 12): must be > 0, got -4" or "server.adress (line 3): unknown key".
// Relative paths are resolved against `base_dir` when it is not empty.
absl::StatusOr<Config> ParseConfig(const std::string& yaml_text, const std::string& base_dir = "");
// Reads and parses a file; relative paths resolve against the file's directory.
absl::StatusOr<Config> LoadConfigFile(const std::string& path);

}  // namespace loraplex::config
