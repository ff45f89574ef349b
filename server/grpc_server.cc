#include "server/grpc_server.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "engine/model/model_spec.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/admin_service.h"
#include "server/generation_service.h"

namespace loraplex::server {
namespace {

constexpr const char* kServiceNames[] = {"loraplex.v1.Generation", "loraplex.v1.Admin"};

}  // namespace

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(const config::Config* config,
                                                              engine::Engine* engine,
                                                              lora::AdapterRegistry* registry,
                                                              const text::Tokenizer* tokenizer) {
  RequestLimits limits;
  limits.vocab_size = engine->spec().vocab_size;
  limits.max_seq_len = engine->max_seq_len();
  limits.max_prompt_tokens = config->server.max_prompt_tokens;
  limits.max_new_tokens_limit = config->server.max_new_tokens_limit;

  std::unique_ptr<GrpcServer> server(new GrpcServer());
  server->generation_ = std::make_unique<GenerationService>(engine, tokenizer, limits);
  server->admin_ = std::make_unique<AdminService>(config, engine, registry, server->generation_.get());

  // Both are process-wide switches read when the builder is created.
  grpc::EnableDefaultHealthCheckService(true);
  if (config->server.enable_reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  grpc::ServerBuilder builder;
  builder.AddListeningPort(config->server.address, grpc::InsecureServerCredentials(), &server->port_);
  const int max_bytes = static_cast<int>(
      std::min<int64_t>(config->server.max_message_bytes, std::numeric_limits<int>::max()));
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  // gRPC sets SO_REUSEPORT by default; a second daemon on the same port must fail, not share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(server->generation_.get());
  builder.RegisterService(server->admin_.get());
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError("server.address: cannot listen on '" + config->server.address + "'");
  }
  server->SetServing(true);
  return server;
}

GrpcServer::~GrpcServer() {
  if (server_ != nullptr && !shut_down_) Shutdown(absl::ZeroDuration());
}

void GrpcServer::SetServing(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  for (const char* name : kServiceNames) health->SetServingStatus(name, serving);
}

void GrpcServer::Shutdown(absl::Duration grace) {
  shut_down_ = true;
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  server_->Wait();
}

}  // namespace loraplex::server
