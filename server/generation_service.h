// GenerationService: loraplex.v1.Generation over the callback API. Generate validates and
// tokenizes on the gRPC thread, submits to the engine, and streams the engine's tokens back
// through a ServerWriteReactor (one write in flight; text from an IncrementalDetokenizer; stop
// strings matched here). Thread-safe; must outlive the grpc::Server it is registered with.
#pragma once

#include <atomic>
#include <cstdint>

#include "engine/engine.h"
#include "engine/text/tokenizer.h"
#include "loraplex/v1/generation.grpc.pb.h"
#include "server/request_validation.h"

namespace loraplex::server {

class GenerationService final : public v1::Generation::CallbackService {
 public:
  // `engine` and `tokenizer` must outlive the service.
  GenerationService(engine::Engine* engine, const text::Tokenizer* tokenizer, RequestLimits limits);
  GenerationService(const GenerationService&) = delete;
  GenerationService& operator=(const GenerationService&) = delete;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;

  // Generate calls being served now.
  int64_t open_streams() const { return open_streams_.load(std::memory_order_relaxed); }

 private:
  engine::Engine* const engine_;
  const text::Tokenizer* const tokenizer_;
  const RequestLimits limits_;
  std::atomic<int64_t> open_streams_{0};
};

}  // namespace loraplex::server
