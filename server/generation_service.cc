#include "server/generation_service.h"

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "engine/core/status.h"
#include "server/status_mapping.h"
#include "server/stop_matcher.h"
#include "spdlog/spdlog.h"

namespace loraplex::server {
namespace {

using Reactor = grpc::ServerWriteReactor<v1::GenerateResponse>;

// The state of one Generate stream, shared by its reactor (gRPC threads) and its TokenSink (the
// engine thread). It outlives the reactor: the engine may still report after the call is gone,
// which Detach() turns into no-ops. Every reactor call (StartWrite / Finish) is made outside mu_;
// write_in_flight_ and finish_called_ make sure there is at most one write and one Finish, and
// that Finish never overlaps a write, so the reactor cannot be deleted under a StartWrite.
class StreamCore {
 public:
  StreamCore(Reactor* reactor, engine::Engine* engine, const text::Tokenizer* tokenizer,
             const v1::GenerateRequest& request)
      : reactor_(reactor),
        engine_(engine),
        request_id_(request.request_id()),
        adapter_(request.adapter()),
        logprobs_(request.output().logprobs()),
        detokenizer_(tokenizer, !request.output().has_skip_special_tokens() ||
                                    request.output().skip_special_tokens()),
        stop_matcher_({request.sampling().stop().begin(), request.sampling().stop().end()}) {}

  // The request was refused before reaching the engine.
  void Refuse(const grpc::Status& status) {
    Reactor* reactor;
    {
      absl::MutexLock lock(&mu_);
      finish_called_ = true;
      reactor = reactor_;
    }
    reactor->Finish(status);
  }

  // The engine accepted the request as `engine_id`.
  void Start(uint64_t engine_id, int64_t prompt_tokens) {
    {
      absl::MutexLock lock(&mu_);
      engine_id_ = engine_id;
      prompt_tokens_ = prompt_tokens;
      started_ = true;
    }
    Pump();
  }

  // Engine thread.
  void OnTokens(const std::vector<engine::TokenEvent>& events) {
    {
      absl::MutexLock lock(&mu_);
      if (call_gone_ || stop_matcher_.matched()) return;
      for (const engine::TokenEvent& event : events) {
        chunk_.add_token_ids(static_cast<uint32_t>(event.token_id));
        if (logprobs_) {
          v1::TokenLogprob* lp = chunk_.add_logprobs();
          lp->set_token_id(static_cast<uint32_t>(event.token_id));
          lp->set_logprob(event.logprob);
          for (const auto& [id, logprob] : event.top_logprobs) {
            v1::TopLogprob* top = lp->add_top();
            top->set_token_id(static_cast<uint32_t>(id));
            top->set_logprob(logprob);
          }
        }
        ++completion_tokens_;
        chunk_.mutable_text()->append(stop_matcher_.Add(detokenizer_.Add(event.token_id)));
        if (stop_matcher_.matched()) {
          // The engine stops at its next step boundary; the call completes when it reports.
          engine_cancel_wanted_ = true;
          break;
        }
      }
    }
    Pump();
  }

  // Engine thread.
  void OnFinish(engine::FinishReason reason, const absl::Status& status, const engine::Usage& usage) {
    {
      absl::MutexLock lock(&mu_);
      if (!stop_matcher_.matched()) {
        chunk_.mutable_text()->append(stop_matcher_.Add(detokenizer_.Flush()));
        chunk_.mutable_text()->append(stop_matcher_.Flush());
      }
      finish_ = Finish{reason, status, usage};
      // Cancelling now would be a no-op: the engine is done with the request.
      engine_cancel_wanted_ = false;
    }
    Pump();
  }

  void OnWriteDone(bool ok) {
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      if (!ok) MarkCallGone();
    }
    CancelEngineIfWanted();
    Pump();
  }

  // The client cancelled or its deadline passed.
  void OnCancel() {
    {
      absl::MutexLock lock(&mu_);
      MarkCallGone();
    }
    CancelEngineIfWanted();
    Pump();
  }

  // The reactor is done and about to be deleted; the engine may still hold the sink.
  void Detach() {
    absl::MutexLock lock(&mu_);
    reactor_ = nullptr;
  }

  void LogDone() {
    absl::MutexLock lock(&mu_);
    spdlog::debug("generate stream done: request_id='{}' engine_id={} adapter='{}' tokens={} {}",
                  request_id_, engine_id_, adapter_, completion_tokens_,
                  finish_ ? engine::FinishReasonName(finish_->reason) : "call ended early");
  }

 private:
  struct Finish {
    engine::FinishReason reason;
    absl::Status status;
    engine::Usage usage;
  };

  void MarkCallGone() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    call_gone_ = true;
    if (started_ && !finish_) engine_cancel_wanted_ = true;
  }

  // Engine::Cancel is called from gRPC threads only, never from inside a sink callback, so the
  // engine never re-enters itself.
  void CancelEngineIfWanted() {
    uint64_t id = 0;
    {
      absl::MutexLock lock(&mu_);
      if (!engine_cancel_wanted_ || engine_cancel_sent_ || !started_) return;
      engine_cancel_sent_ = true;
      id = engine_id_;
    }
    engine_->Cancel(id);
  }

  // Starts the next write or the Finish, if one is due and nothing is in flight.
  void Pump() {
    enum class Action { kNone, kWrite, kFinish } action = Action::kNone;
    grpc::Status final_status;
    Reactor* reactor = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (reactor_ == nullptr || finish_called_ || write_in_flight_ || !started_) return;
      reactor = reactor_;
      if (call_gone_) {
        action = Action::kFinish;
        final_status = grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
      } else if (!started_sent_) {
        out_.Clear();
        v1::Started* started = out_.mutable_started();
        started->set_request_id(request_id_);
        started->set_engine_request_id(engine_id_);
        started->set_adapter(adapter_);
        started->set_prompt_tokens(static_cast<uint32_t>(prompt_tokens_));
        started_sent_ = true;
        action = Action::kWrite;
      } else if (chunk_.token_ids_size() > 0 || !chunk_.text().empty()) {
        out_.Clear();
        out_.mutable_chunk()->Swap(&chunk_);
        action = Action::kWrite;
      } else if (finish_ && !complete_sent_) {
        if (finish_->reason == engine::FinishReason::kError && !stop_matcher_.matched()) {
          action = Action::kFinish;
          final_status = finish_->status.ok()
                             ? grpc::Status(grpc::StatusCode::INTERNAL, "the engine failed")
                             : ToGrpcStatus(finish_->status);
        } else {
          out_.Clear();
          v1::Complete* complete = out_.mutable_complete();
          complete->set_finish_reason(stop_matcher_.matched() ? v1::FINISH_REASON_STOP
                                                              : ToProtoFinishReason(finish_->reason));
          complete->set_stop_reason(stop_matcher_.matched_stop());
          v1::Usage* usage = complete->mutable_usage();
          usage->set_prompt_tokens(static_cast<uint32_t>(prompt_tokens_));
          usage->set_completion_tokens(static_cast<uint32_t>(completion_tokens_));
          usage->set_time_to_first_token_s(finish_->usage.time_to_first_token_s);
          usage->set_queue_time_s(finish_->usage.queue_time_s);
          usage->set_total_time_s(finish_->usage.total_time_s);
          complete_sent_ = true;
          action = Action::kWrite;
        }
      } else if (complete_sent_) {
        action = Action::kFinish;
        final_status = grpc::Status::OK;
      }
      if (action == Action::kWrite) write_in_flight_ = true;
      if (action == Action::kFinish) finish_called_ = true;
    }
    if (action == Action::kWrite) {
      reactor->StartWrite(&out_);
    } else if (action == Action::kFinish) {
      reactor->Finish(final_status);
    }
  }

  absl::Mutex mu_;
  Reactor* reactor_ ABSL_GUARDED_BY(mu_);
  engine::Engine* const engine_;
  const std::string request_id_;
  const std::string adapter_;
  const bool logprobs_;

  text::IncrementalDetokenizer detokenizer_ ABSL_GUARDED_BY(mu_);
  StopMatcher stop_matcher_ ABSL_GUARDED_BY(mu_);
  v1::Chunk chunk_ ABSL_GUARDED_BY(mu_);  // tokens not written yet
  std::optional<Finish> finish_ ABSL_GUARDED_BY(mu_);
  uint64_t engine_id_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t prompt_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t completion_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool started_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool complete_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  bool call_gone_ ABSL_GUARDED_BY(mu_) = false;  // cancelled, deadline passed or a write failed
  bool engine_cancel_wanted_ ABSL_GUARDED_BY(mu_) = false;
  bool engine_cancel_sent_ ABSL_GUARDED_BY(mu_) = false;
  // The message being written; only the holder of write_in_flight_ touches it.
  v1::GenerateResponse out_;
};

class StreamSink final : public engine::TokenSink {
 public:
  explicit StreamSink(std::shared_ptr<StreamCore> core) : core_(std::move(core)) {}
  void OnTokens(const std::vector<engine::TokenEvent>& events) override { core_->OnTokens(events); }
  void OnFinish(engine::FinishReason reason, const absl::Status& status,
                const engine::Usage& usage) override {
    core_->OnFinish(reason, status, usage);
  }

 private:
  std::shared_ptr<StreamCore> core_;
};

class GenerateStream final : public Reactor {
 public:
  GenerateStream(engine::Engine* engine, const text::Tokenizer* tokenizer,
                 const RequestLimits& limits, const v1::GenerateRequest& request,
                 std::atomic<int64_t>* open_streams)
      : core_(std::make_shared<StreamCore>(this, engine, tokenizer, request)),
        open_streams_(open_streams) {
    open_streams_->fetch_add(1, std::memory_order_relaxed);
    absl::StatusOr<engine::GenerateRequest> engine_request =
        ToEngineRequest(request, *tokenizer, limits);
    if (!engine_request.ok()) {
      core_->Refuse(ToGrpcStatus(engine_request.status()));
      return;
    }
    const int64_t prompt_tokens = static_cast<int64_t>(engine_request->prompt_ids.size());
    absl::StatusOr<uint64_t> id =
        engine->Submit(*std::move(engine_request), std::make_shared<StreamSink>(core_));
    if (!id.ok()) {
      core_->Refuse(ToGrpcStatus(id.status()));
      return;
    }
    core_->Start(*id, prompt_tokens);
  }

  void OnWriteDone(bool ok) override { core_->OnWriteDone(ok); }
  void OnCancel() override { core_->OnCancel(); }
  void OnDone() override {
    core_->LogDone();
    core_->Detach();
    open_streams_->fetch_sub(1, std::memory_order_relaxed);
    delete this;
  }

 private:
  std::shared_ptr<StreamCore> core_;
  std::atomic<int64_t>* open_streams_;
};

}  // namespace

GenerationService::GenerationService(engine::Engine* engine, const text::Tokenizer* tokenizer,
                                     RequestLimits limits)
    : engine_(engine), tokenizer_(tokenizer), limits_(limits) {}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* /*context*/, const v1::GenerateRequest* request) {
  return new GenerateStream(engine_, tokenizer_, limits_, *request, &open_streams_);
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const v1::TokenizeRequest* request,
                                                      v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const bool add_special = !request->has_add_special_tokens() || request->add_special_tokens();
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer_->Encode(request->text(), add_special);
  if (!ids.ok()) {
    reactor->Finish(ToGrpcStatus(Annotate(ids.status(), "text")));
    return reactor;
  }
  for (int32_t id : *ids) response->add_token_ids(static_cast<uint32_t>(id));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Detokenize(grpc::CallbackServerContext* context,
                                                        const v1::DetokenizeRequest* request,
                                                        v1::DetokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const bool skip_special = !request->has_skip_special_tokens() || request->skip_special_tokens();
  std::vector<int32_t> ids;
  ids.reserve(request->token_ids_size());
  for (uint32_t id : request->token_ids()) {
    if (static_cast<int64_t>(id) >= tokenizer_->vocab_size()) {
      reactor->Finish(ToGrpcStatus(absl::InvalidArgumentError(
          "token_ids: " + std::to_string(id) + " is outside the tokenizer's vocabulary [0, " +
          std::to_string(tokenizer_->vocab_size()) + ")")));
      return reactor;
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  absl::StatusOr<std::string> text = tokenizer_->Decode(ids, skip_special);
  if (!text.ok()) {
    reactor->Finish(ToGrpcStatus(Annotate(text.status(), "token_ids")));
    return reactor;
  }
  response->set_text(*std::move(text));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace loraplex::server
