// loraplexd: serves one base model with many LoRA adapters over gRPC.
//   loraplexd --config FILE [--check-config] [--log-level LEVEL]
// SIGTERM / SIGINT: health turns NOT_SERVING, running requests get drain_timeout_s to finish,
// then the server stops and the process exits 0. Fatal start errors exit 1; an engine that turns
// unhealthy (device failure) makes the process exit 1 for its supervisor to restart it.
#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "config/config.h"
#include "engine/core/dtype.h"
#include "engine/core/status.h"
#include "engine/engine.h"
#include "engine/model/model_spec.h"
#include "engine/ops/ops.h"
#include "engine/text/tokenizer.h"
#include "lora/registry.h"
#include "nlohmann/json.hpp"
#include "server/grpc_server.h"
#include "spdlog/pattern_formatter.h"
#include "spdlog/spdlog.h"

namespace loraplex::server {
namespace {

constexpr const char* kUsage =
    "usage: loraplexd --config FILE [--check-config] [--log-level trace|debug|info|warn|error]\n";
// How long streams still open after the engine drained may take to write their last messages.
constexpr absl::Duration kShutdownGrace = absl::Seconds(2);
// How often the main thread checks engine health while waiting for a signal.
constexpr int kHealthPollSeconds = 1;

struct Flags {
  std::string config_path;
  bool check_config = false;
  std::string log_level;  // empty: config.logging.level
};

// Accepts "--name value" and "--name=value".
absl::StatusOr<Flags> ParseFlags(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::optional<std::string> inline_value;
    if (const size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = arg.substr(eq + 1);
      arg.resize(eq);
    }
    auto value = [&]() -> absl::StatusOr<std::string> {
      if (inline_value) return *inline_value;
      if (i + 1 >= argc) return absl::InvalidArgumentError(arg + " needs a value");
      return std::string(argv[++i]);
    };
    if (arg == "--config") {
      LORAPLEX_ASSIGN_OR_RETURN(flags.config_path, value());
    } else if (arg == "--log-level") {
      LORAPLEX_ASSIGN_OR_RETURN(flags.log_level, value());
    } else if (arg == "--check-config" && !inline_value) {
      flags.check_config = true;
    } else {
      return absl::InvalidArgumentError("unknown argument '" + std::string(argv[i]) + "'");
    }
  }
  if (flags.config_path.empty()) return absl::InvalidArgumentError("--config is required");
  return flags;
}

// `%j` in a log pattern: the message as a JSON string, quotes included and every character that
// JSON requires escaped, so `format: json` lines stay valid whatever a message contains.
class JsonMessageFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    const std::string quoted =
        nlohmann::json(std::string(msg.payload.data(), msg.payload.size()))
            .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    dest.append(quoted.data(), quoted.data() + quoted.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

absl::Status SetUpLogging(const config::LoggingConfig& logging, const std::string& level_flag) {
  const std::string level_name = level_flag.empty() ? logging.level : level_flag;
  const spdlog::level::level_enum level = spdlog::level::from_str(level_name);
  // from_str answers "off" for names it does not know.
  if (level == spdlog::level::off && level_name != "off") {
    return absl::InvalidArgumentError("log level '" + level_name +
                                      "' is not one of trace, debug, info, warn, error");
  }
  spdlog::set_level(level);
  if (logging.format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<JsonMessageFlag>('j').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%f%z","level":"%l","thread":%t,"msg":%j})");
    spdlog::set_formatter(std::move(formatter));
  } else {
    spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%L%$ %t %v");
  }
  return absl::OkStatus();
}

std::string TokenizerPath(const config::Config& config) {
  return config.model.tokenizer_path.empty() ? config.model.path + "/tokenizer.json"
                                             : config.model.tokenizer_path;
}

// Adapter weights live in the compute dtype of the executor the engine will pick.
DType AdapterWeightsDType(const config::Config& config) {
  absl::StatusOr<Device> device = ops::ResolveExecutor(config.engine.executor);
  // A bad executor name fails Engine::Create with its own message; any dtype will do until then.
  return ops::ComputeDTypeOf(device.value_or(Device::kCpu));
}

std::unique_ptr<lora::AdapterRegistry> MakeRegistry(const config::Config& config,
                                                    const model::ModelSpec& spec) {
  lora::LoraLimits limits;
  limits.max_rank = config.lora.max_rank;
  limits.target_modules = config.lora.target_modules;
  limits.allowed_roots = config.lora.allowed_roots;
  limits.max_pinned = config.lora.adapter_slots - 1;
  return std::make_unique<lora::AdapterRegistry>(spec, limits, AdapterWeightsDType(config),
                                                 config.lora.max_adapters,
                                                 static_cast<size_t>(config.lora.host_cache_mib) << 20);
}

// Loads every adapter of the YAML registry; returns the errors (one per failed adapter).
std::vector<absl::Status> LoadConfiguredAdapters(const config::Config& config,
                                                 lora::AdapterRegistry* registry) {
  std::vector<absl::Status> errors;
  for (size_t i = 0; i < config.adapters.size(); ++i) {
    const config::AdapterEntry& entry = config.adapters[i];
    // The registry logs each successful load with its timing.
    absl::Status status = registry->Load(entry.name, entry.path, entry.pinned);
    if (!status.ok()) errors.push_back(Annotate(status, absl::StrCat("adapters[", i, "]")));
  }
  return errors;
}

// --check-config: everything the daemon reads before serving, without starting the engine.
int CheckConfig(const config::Config& config) {
  absl::StatusOr<model::ModelSpec> spec = model::LoadModelSpec(config.model.path);
  if (!spec.ok()) {
    std::fprintf(stderr, "loraplexd: model.path: %s\n", std::string(spec.status().message()).c_str());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tokenizer =
      text::Tokenizer::FromFile(TokenizerPath(config));
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "loraplexd: tokenizer: %s\n",
                 std::string(tokenizer.status().message()).c_str());
    return 1;
  }
  std::unique_ptr<lora::AdapterRegistry> registry = MakeRegistry(config, *spec);
  const std::vector<absl::Status> errors = LoadConfiguredAdapters(config, registry.get());
  for (const absl::Status& error : errors) {
    std::fprintf(stderr, "loraplexd: %s\n", std::string(error.message()).c_str());
  }
  if (!errors.empty()) return 1;
  std::printf("loraplexd: config OK: %s, %lld layers, vocab %lld; %zu adapters\n",
              spec->architecture.c_str(), static_cast<long long>(spec->num_layers),
              static_cast<long long>(spec->vocab_size), config.adapters.size());
  return 0;
}

// Waits for SIGTERM / SIGINT (blocked in every thread, see main) or for the engine to turn
// unhealthy. Returns true on a signal, false when the engine is unhealthy.
bool WaitForSignalOrFailure(const sigset_t& signals, const engine::Engine& engine) {
  const timespec poll = {kHealthPollSeconds, 0};
  while (true) {
    siginfo_t info;
    const int sig = sigtimedwait(&signals, &info, &poll);
    if (sig > 0) {
      spdlog::info("received {}, draining", strsignal(sig));
      return true;
    }
    if (sig < 0 && errno != EAGAIN && errno != EINTR) {
      spdlog::error("sigtimedwait failed: {}", std::strerror(errno));
      return true;
    }
    if (!engine.Stats().healthy) return false;
  }
}

int Serve(const config::Config& config, const sigset_t& signals) {
  absl::StatusOr<model::ModelSpec> spec = model::LoadModelSpec(config.model.path);
  if (!spec.ok()) {
    spdlog::critical("model.path: {}", std::string(spec.status().message()));
    return 1;
  }
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> tokenizer =
      text::Tokenizer::FromFile(TokenizerPath(config));
  if (!tokenizer.ok()) {
    spdlog::critical("tokenizer: {}", std::string(tokenizer.status().message()));
    return 1;
  }
  std::unique_ptr<lora::AdapterRegistry> registry = MakeRegistry(config, *spec);
  // A bad adapter costs only itself: the daemon serves the others.
  for (const absl::Status& error : LoadConfiguredAdapters(config, registry.get())) {
    spdlog::error("{} (serving without it)", std::string(error.message()));
  }
  absl::StatusOr<std::unique_ptr<engine::Engine>> engine =
      engine::Engine::Create(config, registry.get());
  if (!engine.ok()) {
    spdlog::critical("engine: {}", std::string(engine.status().message()));
    return 1;
  }
  absl::StatusOr<std::unique_ptr<GrpcServer>> server =
      GrpcServer::Start(&config, engine->get(), registry.get(), tokenizer->get());
  if (!server.ok()) {
    spdlog::critical("{}", std::string(server.status().message()));
    return 1;
  }
  const std::string host = config.server.address.substr(0, config.server.address.rfind(':'));
  spdlog::info("listening on {}:{} (executor {}, max_seq_len {}, reflection {})", host,
               (*server)->port(), (*engine)->executor_name(), (*engine)->max_seq_len(),
               config.server.enable_reflection ? "on" : "off");

  const bool signalled = WaitForSignalOrFailure(signals, **engine);
  (*server)->SetServing(false);
  if (!signalled) {
    spdlog::critical("the engine is unhealthy; exiting for a restart");
    (*server)->Shutdown(kShutdownGrace);
    return 1;
  }
  (*engine)->Drain(absl::Seconds(config.server.drain_timeout_s));
  (*server)->Shutdown(kShutdownGrace);
  server->reset();
  engine->reset();
  spdlog::info("stopped");
  return 0;
}

int Main(int argc, char** argv) {
  // Blocked before any thread starts, so every thread inherits the mask and only sigtimedwait
  // in the main thread sees these signals; no work happens inside a signal handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::StatusOr<Flags> flags = ParseFlags(argc, argv);
  if (!flags.ok()) {
    std::fprintf(stderr, "loraplexd: %s\n%s", std::string(flags.status().message()).c_str(), kUsage);
    return 2;
  }
  absl::StatusOr<config::Config> config = config::LoadConfigFile(flags->config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "loraplexd: %s: %s\n", flags->config_path.c_str(),
                 std::string(config.status().message()).c_str());
    return 1;
  }
  if (absl::Status status = SetUpLogging(config->logging, flags->log_level); !status.ok()) {
    std::fprintf(stderr, "loraplexd: %s\n", std::string(status.message()).c_str());
    return 2;
  }
  if (flags->check_config) return CheckConfig(*config);

  spdlog::info(
      "loraplexd {} starting: model {} (dtype {}), executor {}, address {}, {} adapters "
      "configured, {} adapter slots, max_running_seqs {}, max_batch_tokens {}, kv_cache_tokens {}",
      LORAPLEX_VERSION, config->model.path, config->model.dtype, config->engine.executor,
      config->server.address, config->adapters.size(), config->lora.adapter_slots,
      config->engine.max_running_seqs, config->engine.max_batch_tokens,
      config->engine.kv_cache_tokens);
  return Serve(*config, signals);
}

}  // namespace
}  // namespace loraplex::server

int main(int argc, char** argv) { return loraplex::server::Main(argc, argv); }
