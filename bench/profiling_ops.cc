#include "bench/profiling_ops.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"

namespace loraplex::bench {

using Clock = std::chrono::steady_clock;

template <typename KeyFn, typename F>
absl::Status ProfilingOps::Timed(KeyFn&& key, F&& call) {
  if (!enabled_) return call();
  // Drain what earlier ops (or host code between ops) queued, so the interval holds this op only.
  LORAPLEX_RETURN_IF_ERROR(inner_->Synchronize());
  const auto t0 = Clock::now();
  LORAPLEX_RETURN_IF_ERROR(call());
  LORAPLEX_RETURN_IF_ERROR(inner_->Synchronize());
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  std::string k = key();
  OpStat& s = stats_[k];
  if (s.key.empty()) s.key = std::move(k);
  ++s.calls;
  s.ms += ms;
  return absl::OkStatus();
}

void ProfilingOps::Reset() {
  stats_.clear();
  steps_ = 0;
  step_ms_ = 0.0;
}

void ProfilingOps::BeginStep() { step_start_ = Clock::now(); }

void ProfilingOps::EndStep() {
  ++steps_;
  step_ms_ += std::chrono::duration<double, std::milli>(Clock::now() - step_start_).count();
}

ProfilingOps::Report ProfilingOps::GetReport() const {
  Report r;
  r.steps = steps_;
  r.step_ms = step_ms_;
  for (const auto& [key, s] : stats_) {
    r.ops.push_back(s);
    r.ops_ms += s.ms;
    r.op_calls += s.calls;
  }
  std::sort(r.ops.begin(), r.ops.end(), [](const OpStat& a, const OpStat& b) { return a.ms > b.ms; });
  return r;
}

absl::StatusOr<ops::DeviceMemory> ProfilingOps::Allocate(size_t bytes) { return inner_->Allocate(bytes); }

absl::Status ProfilingOps::CopyToDevice(void* dst, const void* src, size_t bytes) {
  return Timed([] { return std::string("[copy] CopyToDevice"); },
               [&] { return inner_->CopyToDevice(dst, src, bytes); });
}

absl::Status ProfilingOps::CopyToHost(void* dst, const void* src, size_t bytes) {
  return Timed([] { return std::string("[copy] CopyToHost"); }, [&] { return inner_->CopyToHost(dst, src, bytes); });
}

absl::Status ProfilingOps::CopyOnDevice(void* dst, const void* src, size_t bytes) {
  return Timed([] { return std::string("[copy] CopyOnDevice"); },
               [&] { return inner_->CopyOnDevice(dst, src, bytes); });
}

absl::Status ProfilingOps::Memset(void* dst, int value, size_t bytes) {
  return Timed([] { return std::string("[copy] Memset"); }, [&] { return inner_->Memset(dst, value, bytes); });
}

absl::Status ProfilingOps::Embed(const TensorView& ids, const TensorView& table, const TensorView& out) {
  return Timed([] { return std::string("Embed"); }, [&] { return inner_->Embed(ids, table, out); });
}

absl::Status ProfilingOps::RmsNorm(const TensorView& x, const TensorView& weight, float eps, const TensorView& out) {
  return Timed([] { return std::string("RmsNorm"); }, [&] { return inner_->RmsNorm(x, weight, eps, out); });
}

absl::Status ProfilingOps::AddRmsNorm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                                      float eps, const TensorView& out) {
  return Timed([] { return std::string("AddRmsNorm"); },
               [&] { return inner_->AddRmsNorm(x, residual, weight, eps, out); });
}

absl::Status ProfilingOps::Gemm(const TensorView& x, const TensorView& w, float beta, const TensorView& y) {
  // N and K name the projection (qkv, o, gate_up, down, lm_head); M is the step's token count.
  return Timed([&] { return absl::StrCat("Gemm N=", w.shape[0], " K=", w.shape[1], beta != 0.0f ? " +=y" : ""); },
               [&] { return inner_->Gemm(x, w, beta, y); });
}

absl::Status ProfilingOps::RopeAndCacheKv(const TensorView& qkv, const TensorView& inv_freq, int num_q_heads,
                                          int num_kv_heads, int head_dim, const ops::AttentionMeta& meta,
                                          const ops::KvCacheView& cache) {
  return Timed([] { return std::string("RopeAndCacheKv"); }, [&] {
    return inner_->RopeAndCacheKv(qkv, inv_freq, num_q_heads, num_kv_heads, head_dim, meta, cache);
  });
}

absl::Status ProfilingOps::Attention(const TensorView& qkv, int num_q_heads, int num_kv_heads, int head_dim,
                                     float softmax_scale, const ops::AttentionMeta& meta,
                                     const ops::KvCacheView& cache, const TensorView& out) {
  return Timed([] { return std::string("Attention"); }, [&] {
    return inner_->Attention(qkv, num_q_heads, num_kv_heads, head_dim, softmax_scale, meta, cache, out);
  });
}

absl::Status ProfilingOps::SiluMul(const TensorView& gate_up, const TensorView& out) {
  return Timed([] { return std::string("SiluMul"); }, [&] { return inner_->SiluMul(gate_up, out); });
}

absl::Status ProfilingOps::GatherRows(const TensorView& x, const TensorView& rows, const TensorView& out) {
  return Timed([] { return std::string("GatherRows"); }, [&] { return inner_->GatherRows(x, rows, out); });
}

absl::Status ProfilingOps::Sample(const TensorView& logits, const ops::SamplingRow* rows,
                                  ops::SampledToken* out) {
  return Timed([] { return std::string("Sample"); }, [&] { return inner_->Sample(logits, rows, out); });
}

absl::Status ProfilingOps::LoraShrink(const TensorView& x, const ops::LoraSegments& segments,
                                      const ops::LoraModule& module, const TensorView& y) {
  return Timed([&] { return absl::StrCat("LoraShrink K=", module.in_features, " slices=", module.num_slices); },
               [&] { return inner_->LoraShrink(x, segments, module, y); });
}

absl::Status ProfilingOps::LoraExpand(const TensorView& y, const ops::LoraSegments& segments,
                                      const ops::LoraModule& module, const TensorView& out) {
  return Timed(
      [&] {
        // K (the module's input width) tells o_proj and down_proj apart: both expand to N=hidden.
        return absl::StrCat("LoraExpand N=", module.slice_offsets[module.num_slices], " K=", module.in_features,
                            " slices=", module.num_slices);
      },
      [&] { return inner_->LoraExpand(y, segments, module, out); });
}

absl::Status ProfilingOps::GemmWithLora(const TensorView& x, const TensorView& w, const TensorView& y,
                                        const ops::LoraSegments* segments, const ops::LoraModule* module,
                                        const TensorView& lora_y) {
  const bool lora = segments != nullptr && module != nullptr;
  // Without LoRA the call is the plain GEMM, so it shares Gemm's key (and row in the report).
  if (!lora) return Gemm(x, w, 0.0f, y);
  if (split_gemm_with_lora_) return Ops::GemmWithLora(x, w, y, segments, module, lora_y);
  return Timed([&] { return absl::StrCat("GemmWithLora N=", w.shape[0], " K=", w.shape[1]); },
               [&] { return inner_->GemmWithLora(x, w, y, segments, module, lora_y); });
}

absl::StatusOr<std::unique_ptr<ops::Graph>> ProfilingOps::Capture(const std::function<absl::Status()>& /*body*/) {
  return absl::UnimplementedError("ProfilingOps::Capture: profiling runs eagerly so each op can be timed");
}

}  // namespace loraplex::bench
