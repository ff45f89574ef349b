#include "server/status_mapping.h"

#include <catch2/catch.hpp>

namespace loraplex::server {
namespace {

TEST_CASE("Every absl status code maps to the gRPC code of the same name, keeping the message") {
  const std::pair<absl::StatusCode, grpc::StatusCode> pairs[] = {
      {absl::StatusCode::kCancelled, grpc::StatusCode::CANCELLED},
      {absl::StatusCode::kUnknown, grpc::StatusCode::UNKNOWN},
      {absl::StatusCode::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT},
      {absl::StatusCode::kDeadlineExceeded, grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::StatusCode::kNotFound, grpc::StatusCode::NOT_FOUND},
      {absl::StatusCode::kAlreadyExists, grpc::StatusCode::ALREADY_EXISTS},
      {absl::StatusCode::kPermissionDenied, grpc::StatusCode::PERMISSION_DENIED},
      {absl::StatusCode::kResourceExhausted, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::StatusCode::kFailedPrecondition, grpc::StatusCode::FAILED_PRECONDITION},
      {absl::StatusCode::kAborted, grpc::StatusCode::ABORTED},
      {absl::StatusCode::kOutOfRange, grpc::StatusCode::OUT_OF_RANGE},
      {absl::StatusCode::kUnimplemented, grpc::StatusCode::UNIMPLEMENTED},
      {absl::StatusCode::kInternal, grpc::StatusCode::INTERNAL},
      {absl::StatusCode::kUnavailable, grpc::StatusCode::UNAVAILABLE},
      {absl::StatusCode::kDataLoss, grpc::StatusCode::DATA_LOSS},
      {absl::StatusCode::kUnauthenticated, grpc::StatusCode::UNAUTHENTICATED},
  };
  for (const auto& [absl_code, grpc_code] : pairs) {
    const grpc::Status status = ToGrpcStatus(absl::Status(absl_code, "adapter 'x': boom"));
    CHECK(status.error_code() == grpc_code);
    CHECK(status.error_message() == "adapter 'x': boom");
  }
}

TEST_CASE("An OK status maps to gRPC OK") {
  CHECK(ToGrpcStatus(absl::OkStatus()).ok());
}

TEST_CASE("A code absl may add later maps to UNKNOWN, never to OK") {
  const grpc::Status status = ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(42), "new"));
  CHECK(status.error_code() == grpc::StatusCode::UNKNOWN);
}

TEST_CASE("Engine finish reasons map to the proto enum") {
  CHECK(ToProtoFinishReason(engine::FinishReason::kLength) == v1::FINISH_REASON_LENGTH);
  CHECK(ToProtoFinishReason(engine::FinishReason::kStop) == v1::FINISH_REASON_STOP);
  CHECK(ToProtoFinishReason(engine::FinishReason::kEos) == v1::FINISH_REASON_EOS);
  CHECK(ToProtoFinishReason(engine::FinishReason::kCancelled) == v1::FINISH_REASON_CANCELLED);
  CHECK(ToProtoFinishReason(engine::FinishReason::kError) == v1::FINISH_REASON_ERROR);
}

}  // namespace
}  // namespace loraplex::server
