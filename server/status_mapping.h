// Conversions between our absl::Status / engine values and their gRPC / protobuf forms.
// Stateless; thread-safe.
#pragma once

#include "absl/status/status.h"
#include "engine/request.h"
#include "grpcpp/support/status.h"
#include "loraplex/v1/generation.pb.h"

namespace loraplex::server {

// One-to-one: every absl code becomes the gRPC code of the same name (DESIGN §7); the message is
// kept. An OK status maps to grpc::Status::OK.
grpc::Status ToGrpcStatus(const absl::Status& status);

v1::FinishReason ToProtoFinishReason(engine::FinishReason reason);

}  // namespace loraplex::server
