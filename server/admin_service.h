// AdminService: loraplex.v1.Admin over the callback API — the adapter registry (load, unload,
// list), the model's shape and the server's counters. Thread-safe; must outlive the grpc::Server
// it is registered with.
#pragma once

#include <string>

#include "absl/time/clock.h"
#include "config/config.h"
#include "engine/engine.h"
#include "lora/registry.h"
#include "loraplex/v1/admin.grpc.pb.h"
#include "server/generation_service.h"

namespace loraplex::server {

class AdminService final : public v1::Admin::CallbackService {
 public:
  // Every pointer must outlive the service.
  AdminService(const config::Config* config, engine::Engine* engine,
               lora::AdapterRegistry* registry, const GenerationService* generation);
  AdminService(const AdminService&) = delete;
  AdminService& operator=(const AdminService&) = delete;

  grpc::ServerUnaryReactor* ListAdapters(grpc::CallbackServerContext* context,
                                         const v1::ListAdaptersRequest* request,
                                         v1::ListAdaptersResponse* response) override;
  // Reads the adapter on the calling gRPC thread (a small PEFT directory: milliseconds).
  grpc::ServerUnaryReactor* LoadAdapter(grpc::CallbackServerContext* context,
                                        const v1::LoadAdapterRequest* request,
                                        v1::LoadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* UnloadAdapter(grpc::CallbackServerContext* context,
                                          const v1::UnloadAdapterRequest* request,
                                          v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::GetModelInfoResponse* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::GetServerInfoResponse* response) override;

 private:
  absl::Status DoLoad(const v1::LoadAdapterRequest& request, v1::LoadAdapterResponse* response);
  absl::Status DoUnload(const v1::UnloadAdapterRequest& request);

  const config::Config* const config_;
  engine::Engine* const engine_;
  lora::AdapterRegistry* const registry_;
  const GenerationService* const generation_;
  const absl::Time start_time_ = absl::Now();
};

}  // namespace loraplex::server
