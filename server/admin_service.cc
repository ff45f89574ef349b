#include "server/admin_service.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "engine/core/status.h"
#include "engine/model/model_spec.h"
#include "server/status_mapping.h"

#ifndef LORAPLEX_VERSION
#error "LORAPLEX_VERSION must be defined by the build"
#endif

namespace loraplex::server {
namespace {

void FillAdapterInfo(const lora::AdapterInfo& info, const absl::flat_hash_set<std::string>& resident,
                     v1::AdapterInfo* out) {
  out->set_name(info.name);
  out->set_path(info.path);
  out->set_rank(static_cast<uint32_t>(info.rank));
  out->set_alpha(info.alpha);
  for (const std::string& module : info.target_modules) out->add_target_modules(module);
  // A device slot of an adapter whose host weights were dropped is stale: its next use parses it
  // again (a new load) and uploads that.
  out->set_state(!info.host_resident            ? v1::ADAPTER_STATE_ON_DISK
                 : resident.contains(info.name) ? v1::ADAPTER_STATE_RESIDENT
                                                : v1::ADAPTER_STATE_LOADED);
  out->set_pinned(info.pinned);
  out->set_active_requests(static_cast<uint64_t>(std::max<int64_t>(info.active_requests, 0)));
  out->set_weight_bytes(info.weight_bytes);
}

absl::flat_hash_set<std::string> ResidentAdapters(const engine::Engine& engine) {
  const std::vector<std::string> names = engine.Stats().resident_adapters;
  return absl::flat_hash_set<std::string>(names.begin(), names.end());
}

uint64_t NonNegative(int64_t v) { return static_cast<uint64_t>(std::max<int64_t>(v, 0)); }

}  // namespace

AdminService::AdminService(const config::Config* config, engine::Engine* engine,
                           lora::AdapterRegistry* registry, const GenerationService* generation)
    : config_(config), engine_(engine), registry_(registry), generation_(generation) {}

grpc::ServerUnaryReactor* AdminService::ListAdapters(grpc::CallbackServerContext* context,
                                                     const v1::ListAdaptersRequest* /*request*/,
                                                     v1::ListAdaptersResponse* response) {
  std::vector<lora::AdapterInfo> infos = registry_->List();
  std::sort(infos.begin(), infos.end(),
            [](const lora::AdapterInfo& a, const lora::AdapterInfo& b) { return a.name < b.name; });
  const absl::flat_hash_set<std::string> resident = ResidentAdapters(*engine_);
  for (const lora::AdapterInfo& info : infos) FillAdapterInfo(info, resident, response->add_adapters());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

absl::Status AdminService::DoLoad(const v1::LoadAdapterRequest& request,
                                  v1::LoadAdapterResponse* response) {
  if (request.name().empty()) return absl::InvalidArgumentError("name must not be empty");
  if (request.path().empty()) return absl::InvalidArgumentError("path must not be empty");
  LORAPLEX_RETURN_IF_ERROR(registry_->Load(request.name(), request.path(), request.pinned()));
  for (const lora::AdapterInfo& info : registry_->List()) {
    if (info.name == request.name()) {
      FillAdapterInfo(info, ResidentAdapters(*engine_), response->mutable_adapter());
      return absl::OkStatus();
    }
  }
  // Unloaded again by a concurrent call between Load and List.
  return absl::NotFoundError("adapter '" + request.name() + "' was unloaded while loading");
}

grpc::ServerUnaryReactor* AdminService::LoadAdapter(grpc::CallbackServerContext* context,
                                                    const v1::LoadAdapterRequest* request,
                                                    v1::LoadAdapterResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(DoLoad(*request, response)));
  return reactor;
}

absl::Status AdminService::DoUnload(const v1::UnloadAdapterRequest& request) {
  if (request.name().empty()) return absl::InvalidArgumentError("name must not be empty");
  uint64_t uid = 0;
  {
    // The uid names this load of the adapter for the engine; the ref is dropped before Unload,
    // which refuses adapters with live refs.
    LORAPLEX_ASSIGN_OR_RETURN(lora::AdapterRef ref, registry_->Acquire(request.name()));
    uid = ref->uid;
  }
  LORAPLEX_RETURN_IF_ERROR(registry_->Unload(request.name()));
  engine_->EvictAdapter(uid);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AdminService::UnloadAdapter(grpc::CallbackServerContext* context,
                                                      const v1::UnloadAdapterRequest* request,
                                                      v1::UnloadAdapterResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(DoUnload(*request)));
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::GetModelInfo(grpc::CallbackServerContext* context,
                                                     const v1::GetModelInfoRequest* /*request*/,
                                                     v1::GetModelInfoResponse* response) {
  const model::ModelSpec& spec = engine_->spec();
  response->set_model_path(config_->model.path);
  response->set_architecture(spec.architecture);
  response->set_vocab_size(NonNegative(spec.vocab_size));
  response->set_hidden_size(NonNegative(spec.hidden_size));
  response->set_num_layers(NonNegative(spec.num_layers));
  response->set_num_heads(NonNegative(spec.num_heads));
  response->set_num_kv_heads(NonNegative(spec.num_kv_heads));
  response->set_max_seq_len(NonNegative(engine_->max_seq_len()));
  response->set_dtype(config_->model.dtype == "auto" ? spec.torch_dtype : config_->model.dtype);
  response->set_executor(engine_->executor_name());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::GetServerInfo(grpc::CallbackServerContext* context,
                                                      const v1::GetServerInfoRequest* /*request*/,
                                                      v1::GetServerInfoResponse* response) {
  const engine::EngineStats stats = engine_->Stats();
  response->set_version(LORAPLEX_VERSION);
  response->set_uptime_s(absl::ToDoubleSeconds(absl::Now() - start_time_));
  response->set_running_requests(NonNegative(stats.running_seqs));
  response->set_waiting_requests(NonNegative(stats.waiting_seqs));
  response->set_kv_blocks_total(NonNegative(stats.kv_blocks_total));
  response->set_kv_blocks_used(NonNegative(stats.kv_blocks_used));
  response->set_adapter_slots_total(NonNegative(stats.adapter_slots_total));
  response->set_adapter_slots_used(NonNegative(stats.adapter_slots_used));
  for (const std::string& name : stats.resident_adapters) response->add_resident_adapters(name);
  response->set_requests_finished(NonNegative(stats.requests_finished));
  response->set_requests_cancelled(NonNegative(stats.requests_cancelled));
  response->set_healthy(stats.healthy);
  response->set_open_streams(NonNegative(generation_->open_streams()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace loraplex::server
