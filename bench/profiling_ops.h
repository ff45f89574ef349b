// ProfilingOps: an ops::Ops that forwards every call to another Ops and, while enabled, times each
// forward primitive and copy (synchronising the inner ops before and after it) under a key of op
// name + shape, so a step's time can be split per op. Device-neutral (only Ops::Synchronize).
// Capture answers UNIMPLEMENTED so a model on these ops runs eagerly. Engine thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/ops/ops.h"

namespace loraplex::bench {

class ProfilingOps : public ops::Ops {
 public:
  // Accumulated time of one op key.
  struct OpStat {
    std::string key;
    int64_t calls = 0;
    double ms = 0.0;
  };
  // Everything recorded since the last Reset, per key sorted by time (largest first).
  struct Report {
    int64_t steps = 0;       // BeginStep/EndStep pairs
    double step_ms = 0.0;    // wall time of those steps, summed
    double ops_ms = 0.0;     // sum of every key's ms
    int64_t op_calls = 0;    // sum of every key's calls
    std::vector<OpStat> ops;
  };

  // `inner` must outlive this. `split_gemm_with_lora`: GemmWithLora runs as the Ops default (Gemm,
  // LoraShrink, LoraExpand, each timed on its own) instead of the inner's fused call, which may
  // overlap the shrink with the GEMM (so its parts are not separable).
  explicit ProfilingOps(ops::Ops* inner, bool split_gemm_with_lora = false)
      : inner_(inner), split_gemm_with_lora_(split_gemm_with_lora) {}

  // While disabled every call is forwarded untimed (no added synchronisation).
  void set_enabled(bool enabled) { enabled_ = enabled; }
  void Reset();
  // Brackets one step (e.g. one LlamaModel::Forward) whose wall time the report compares with
  // the sum of the ops inside it; the remainder is host work between ops.
  void BeginStep();
  void EndStep();
  Report GetReport() const;

  Device device() const override { return inner_->device(); }
  DType compute_dtype() const override { return inner_->compute_dtype(); }

  absl::StatusOr<ops::DeviceMemory> Allocate(size_t bytes) override;
  void Free(void* ptr) override { inner_->Free(ptr); }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override;
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status Memset(void* dst, int value, size_t bytes) override;
  absl::Status Synchronize() override { return inner_->Synchronize(); }
  absl::StatusOr<void*> AllocateHostStaging(size_t bytes) override { return inner_->AllocateHostStaging(bytes); }
  void FreeHostStaging(void* ptr) override { inner_->FreeHostStaging(ptr); }

  absl::Status Embed(const TensorView& ids, const TensorView& table, const TensorView& out) override;
  absl::Status RmsNorm(const TensorView& x, const TensorView& weight, float eps, const TensorView& out) override;
  absl::Status AddRmsNorm(const TensorView& x, const TensorView& residual, const TensorView& weight, float eps,
                          const TensorView& out) override;
  absl::Status Gemm(const TensorView& x, const TensorView& w, float beta, const TensorView& y) override;
  absl::Status PrepareGemm(const TensorView& x, const TensorView& w, const TensorView& y) override {
    return inner_->PrepareGemm(x, w, y);  // runs nothing on the device: not timed
  }
  absl::Status RopeAndCacheKv(const TensorView& qkv, const TensorView& inv_freq, int num_q_heads, int num_kv_heads,
                              int head_dim, const ops::AttentionMeta& meta, const ops::KvCacheView& cache) override;
  absl::Status Attention(const TensorView& qkv, int num_q_heads, int num_kv_heads, int head_dim, float softmax_scale,
                         const ops::AttentionMeta& meta, const ops::KvCacheView& cache,
                         const TensorView& out) override;
  absl::Status SiluMul(const TensorView& gate_up, const TensorView& out) override;
  absl::Status GatherRows(const TensorView& x, const TensorView& rows, const TensorView& out) override;
  absl::Status Sample(const TensorView& logits, const ops::SamplingRow* rows, ops::SampledToken* out) override;
  absl::Status LoraShrink(const TensorView& x, const ops::LoraSegments& segments, const ops::LoraModule& module,
                          const TensorView& y) override;
  absl::Status LoraExpand(const TensorView& y, const ops::LoraSegments& segments, const ops::LoraModule& module,
                          const TensorView& out) override;
  absl::Status GemmWithLora(const TensorView& x, const TensorView& w, const TensorView& y,
                            const ops::LoraSegments* segments, const ops::LoraModule* module,
                            const TensorView& lora_y) override;
  // UNIMPLEMENTED: a recorded graph would bypass the per-op timing.
  // The LoRA state the inner ops keep, forwarded untimed (the install kernel is timed as part of
  // nothing: it is one small launch a step).
  int64_t LoraWeightSpareRows(int num_slices) const override { return inner_->LoraWeightSpareRows(num_slices); }
  absl::Status RegisterLoraWeight(const TensorView& weight, const ops::LoraModule& module) override {
    return inner_->RegisterLoraWeight(weight, module);
  }
  absl::Status BeginLoraStep(const ops::LoraSegments& segments) override { return inner_->BeginLoraStep(segments); }
  absl::Status LoraSlotsChanged() override { return inner_->LoraSlotsChanged(); }
  absl::StatusOr<std::unique_ptr<ops::Graph>> Capture(const std::function<absl::Status()>& body) override;

 private:
  // Runs `call`; when enabled, synchronises before and after and adds the elapsed time under
  // key() (built only when enabled, so a disabled wrapper costs no string work per op).
  template <typename KeyFn, typename F>
  absl::Status Timed(KeyFn&& key, F&& call);

  ops::Ops* inner_;
  bool split_gemm_with_lora_;
  bool enabled_ = false;
  std::map<std::string, OpStat> stats_;
  int64_t steps_ = 0;
  double step_ms_ = 0.0;
  std::chrono::steady_clock::time_point step_start_;
};

}  // namespace loraplex::bench
