// GrpcServer: the daemon's gRPC endpoint — Generation and Admin services, grpc.health.v1 and
// (when configured) server reflection — listening on config.server.address.
// Thread-safe. Destroy it before the engine, registry and tokenizer it serves.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "config/config.h"
#include "engine/engine.h"
#include "engine/text/tokenizer.h"
#include "lora/registry.h"

namespace grpc { class Server; }

namespace loraplex::server {

class AdminService;
class GenerationService;

class GrpcServer {
 public:
  // Starts listening, health SERVING. UNAVAILABLE if the address cannot be bound. Every pointer
  // must outlive the server.
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(const config::Config* config,
                                                           engine::Engine* engine,
                                                           lora::AdapterRegistry* registry,
                                                           const text::Tokenizer* tokenizer);
  ~GrpcServer();
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  // The port bound (the chosen one when the address asked for port 0).
  int port() const { return port_; }
  // grpc.health.v1 status of the server and every service.
  void SetServing(bool serving);
  // Stops accepting calls; calls still open after `grace` are cancelled. Blocks until all ended.
  // Call once, from one thread.
  void Shutdown(absl::Duration grace);

 private:
  GrpcServer() = default;
  std::unique_ptr<GenerationService> generation_;
  std::unique_ptr<AdminService> admin_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool shut_down_ = false;  // Shutdown ran; the destructor must not wait again
};

}  // namespace loraplex::server
