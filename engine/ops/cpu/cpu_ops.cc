#include "engine/ops/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "engine/ops/cpu/sampling.h"

namespace loraplex::ops {
namespace {

// Every op validates its inputs: the CPU executor is the oracle, so a malformed call must fail
// loudly here rather than produce plausible numbers.
template <typename... Args>
absl::Status Invalid(const char* op, const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", args...));
}

absl::Status CheckF32(const char* op, const char* name, const TensorView& t, int rank) {
  if (t.data == nullptr) return Invalid(op, name, " is null");
  if (t.dtype != DType::kF32)
    return Invalid(op, name, " has dtype ", std::string(DTypeName(t.dtype)), ", expected F32");
  if (t.shape.rank != rank)
    return Invalid(op, name, " has shape ", t.shape.ToString(), ", expected rank ", rank);
  return absl::OkStatus();
}

absl::Status CheckI32(const char* op, const char* name, const TensorView& t) {
  if (t.data == nullptr) return Invalid(op, name, " is null");
  if (t.dtype != DType::kI32)
    return Invalid(op, name, " has dtype ", std::string(DTypeName(t.dtype)), ", expected I32");
  if (t.shape.rank != 1)
    return Invalid(op, name, " has shape ", t.shape.ToString(), ", expected rank 1");
  return absl::OkStatus();
}

absl::Status CheckSamplingRow(const SamplingRow& row, int64_t r) {
  if (!IsValidSamplingRow(row)) {
    return Invalid("Sample", "rows[", r, "] has temperature ", row.temperature, ", top_p ",
                   row.top_p, ", top_k ", row.top_k, ", top_n ", row.top_n);
  }
  return absl::OkStatus();
}

double Dot(const float* a, const float* b, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return acc;
}

// out = x * rsqrt(mean(x²) + eps) * weight, one row of h elements.
void RmsNormRow(const float* x, const float* weight, float eps, int64_t h, float* out) {
  const double mean_sq = Dot(x, x, h) / static_cast<double>(h);
  const double inv = 1.0 / std::sqrt(mean_sq + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = static_cast<float>(x[i] * inv) * weight[i];
}

absl::Status CheckLoraMeta(const char* op, const LoraSegments& seg, const LoraModule& module) {
  if (seg.num_segments == nullptr || seg.seg_starts == nullptr || seg.seg_slots == nullptr ||
      seg.token_rows == nullptr) {
    return Invalid(op, "segment arrays must not be null");
  }
  if (module.table == nullptr) return Invalid(op, "module table is null");
  if (module.num_slices < 1 || module.num_slices > 3) {
    return Invalid(op, "module num_slices ", module.num_slices, " outside [1,3]");
  }
  const int32_t n = *seg.num_segments;
  if (n < 0 || n > seg.max_segments) {
    return Invalid(op, "num_segments ", n, " outside [0,", seg.max_segments, "]");
  }
  for (int32_t s = 0; s < n; ++s) {
    const int32_t begin = seg.seg_starts[s], end = seg.seg_starts[s + 1];
    if (begin < 0 || end < begin || end > seg.num_tokens) {
      return Invalid(op, "segment ", s, " spans [", begin, ",", end, ") outside [0,",
                     seg.num_tokens, ")");
    }
    if (seg.seg_slots[s] < 0 || seg.seg_slots[s] >= module.num_slots) {
      return Invalid(op, "segment ", s, " slot ", seg.seg_slots[s], " outside [0,",
                     module.num_slots, ")");
    }
    for (int32_t i = begin; i < end; ++i) {
      if (seg.token_rows[i] < 0 || seg.token_rows[i] >= seg.num_tokens) {
        return Invalid(op, "token_rows[", i, "] = ", seg.token_rows[i], " outside [0,",
                       seg.num_tokens, ")");
      }
    }
    for (int32_t sl = 0; sl < module.num_slices; ++sl) {
      const LoraSliceWeights& w = module.table[seg.seg_slots[s] * module.num_slices + sl];
      if (w.rank < 0 || w.rank > module.max_rank) {
        return Invalid(op, "slot ", seg.seg_slots[s], " slice ", sl, " rank ", w.rank,
                       " outside [0,", module.max_rank, "]");
      }
      if (w.rank > 0 && (w.a == nullptr || w.b == nullptr)) {
        return Invalid(op, "slot ", seg.seg_slots[s], " slice ", sl, " has rank ", w.rank,
                       " but null weights");
      }
    }
  }
  return absl::OkStatus();
}

class CpuOps final : public Ops {
 public:
  Device device() const override { return Device::kCpu; }
  DType compute_dtype() const override { return DType::kF32; }

  absl::StatusOr<DeviceMemory> Allocate(size_t bytes) override {
    // 64-byte alignment and size rounding (aligned_alloc requires a multiple); never null.
    const size_t rounded = (bytes + 63) / 64 * 64 + (bytes == 0 ? 64 : 0);
    void* p = std::aligned_alloc(64, rounded);
    if (p == nullptr)
      return absl::ResourceExhaustedError(
          absl::StrCat("Allocate: ", bytes, " bytes of host memory"));
    return DeviceMemory(this, p, bytes);
  }
  void Free(void* ptr) override { std::free(ptr); }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Memset(void* dst, int value, size_t bytes) override {
    if (bytes > 0) std::memset(dst, value, bytes);
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status Embed(const TensorView& ids, const TensorView& table,
                     const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckI32("Embed", "ids", ids));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("Embed", "table", table, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("Embed", "out", out, 2));
    const int64_t t_count = ids.shape[0], vocab = table.shape[0], h = table.shape[1];
    if (out.shape[0] < t_count || out.shape[1] != h) {
      return Invalid("Embed", "out has shape ", out.shape.ToString(), ", expected [", t_count, ",",
                     h, "]");
    }
    const int32_t* id = ids.As<int32_t>();
    for (int64_t t = 0; t < t_count; ++t) {
      if (id[t] < 0 || id[t] >= vocab)
        return Invalid("Embed", "token id ", id[t], " at row ", t, " outside [0,", vocab, ")");
      std::memcpy(out.As<float>() + t * h, table.As<float>() + id[t] * h,
                  static_cast<size_t>(h) * sizeof(float));
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const TensorView& x, const TensorView& weight, float eps,
                       const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckNorm("RmsNorm", x, weight, out));
    const int64_t h = x.shape[1];
    for (int64_t t = 0; t < x.shape[0]; ++t) {
      RmsNormRow(x.As<float>() + t * h, weight.As<float>(), eps, h, out.As<float>() + t * h);
    }
    return absl::OkStatus();
  }

  absl::Status AddRmsNorm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                          float eps, const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckNorm("AddRmsNorm", x, weight, out));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("AddRmsNorm", "residual", residual, 2));
    if (!(residual.shape == x.shape)) {
      return Invalid("AddRmsNorm", "residual has shape ", residual.shape.ToString(), ", x ",
                     x.shape.ToString());
    }
    const int64_t h = x.shape[1];
    for (int64_t t = 0; t < x.shape[0]; ++t) {
      float* r = residual.As<float>() + t * h;
      const float* xr = x.As<float>() + t * h;
      for (int64_t i = 0; i < h; ++i) r[i] += xr[i];
      // `out` may alias `x`: the row of x is consumed above before out is written.
      RmsNormRow(r, weight.As<float>(), eps, h, out.As<float>() + t * h);
    }
    return absl::OkStatus();
  }

  absl::Status Gemm(const TensorView& x, const TensorView& w, float beta,
                    const TensorView& y) override {
    LORAPLEX_RETURN_IF_ERROR(CheckF32("Gemm", "x", x, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("Gemm", "w", w, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("Gemm", "y", y, 2));
    const int64_t m = x.shape[0], k = x.shape[1], n = w.shape[0];
    if (w.shape[1] != k)
      return Invalid("Gemm", "w has shape ", w.shape.ToString(), ", x ", x.shape.ToString());
    if (y.shape[0] != m || y.shape[1] != n) {
      return Invalid("Gemm", "y has shape ", y.shape.ToString(), ", expected [", m, ",", n, "]");
    }
    // Row of x times row of w: both contiguous, so the inner loop streams memory.
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = x.As<float>() + i * k;
      float* yr = y.As<float>() + i * n;
      for (int64_t j = 0; j < n; ++j) {
        double acc = Dot(xr, w.As<float>() + j * k, k);
        // beta == 0 must not read y: it may hold garbage (NaN) from a previous use.
        if (beta != 0.0f) acc += static_cast<double>(beta) * yr[j];
        yr[j] = static_cast<float>(acc);
      }
    }
    return absl::OkStatus();
  }

  absl::Status RopeAndCacheKv(const TensorView& qkv, const TensorView& inv_freq, int num_q_heads,
                              int num_kv_heads, int head_dim, const AttentionMeta& meta,
                              const KvCacheView& cache) override {
    LORAPLEX_RETURN_IF_ERROR(
        CheckQkv("RopeAndCacheKv", qkv, num_q_heads, num_kv_heads, head_dim, meta));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("RopeAndCacheKv", "inv_freq", inv_freq, 1));
    if (inv_freq.shape[0] != head_dim / 2) {
      return Invalid("RopeAndCacheKv", "inv_freq has shape ", inv_freq.shape.ToString(),
                     ", expected [", head_dim / 2, "]");
    }
    LORAPLEX_RETURN_IF_ERROR(CheckCache("RopeAndCacheKv", cache, num_kv_heads, head_dim));
    if (meta.positions == nullptr || meta.slot_mapping == nullptr) {
      return Invalid("RopeAndCacheKv", "positions and slot_mapping must not be null");
    }
    const int64_t width = qkv.shape[1], half = head_dim / 2;
    const int64_t kv_row = static_cast<int64_t>(num_kv_heads) * head_dim;
    const int64_t num_slots = cache.k.shape[0] * cache.k.shape[1];
    const float* freq = inv_freq.As<float>();
    std::vector<float> cos_v(static_cast<size_t>(half)), sin_v(static_cast<size_t>(half));
    for (int64_t t = 0; t < meta.num_tokens; ++t) {
      if (meta.token_seq != nullptr && meta.token_seq[t] < 0) continue;  // padding row
      const int32_t pos = meta.positions[t];
      if (pos < 0) return Invalid("RopeAndCacheKv", "positions[", t, "] = ", pos);
      for (int64_t i = 0; i < half; ++i) {
        // The angle is rounded to fp32 as Hugging Face does (inv_freq @ positions in fp32).
        const float angle = static_cast<float>(pos) * freq[i];
        cos_v[static_cast<size_t>(i)] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin_v[static_cast<size_t>(i)] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      float* row = qkv.As<float>() + t * width;
      for (int head = 0; head < num_q_heads + num_kv_heads; ++head) {
        // Rotate-half: pairs are (i, i + D/2), not adjacent elements.
        float* v = row + static_cast<int64_t>(head) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          const float c = cos_v[static_cast<size_t>(i)], s = sin_v[static_cast<size_t>(i)];
          v[i] = x1 * c - x2 * s;
          v[i + half] = x2 * c + x1 * s;
        }
      }
      const int32_t slot = meta.slot_mapping[t];
      if (slot < 0) continue;
      if (slot >= num_slots)
        return Invalid("RopeAndCacheKv", "slot_mapping[", t, "] = ", slot, " outside [0,",
                       num_slots, ")");
      const float* k = row + static_cast<int64_t>(num_q_heads) * head_dim;
      std::memcpy(cache.k.As<float>() + slot * kv_row, k,
                  static_cast<size_t>(kv_row) * sizeof(float));
      std::memcpy(cache.v.As<float>() + slot * kv_row, k + kv_row,
                  static_cast<size_t>(kv_row) * sizeof(float));
    }
    return absl::OkStatus();
  }

  absl::Status Attention(const TensorView& qkv, int num_q_heads, int num_kv_heads, int head_dim,
                         float softmax_scale, const AttentionMeta& meta, const KvCacheView& cache,
                         const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckQkv("Attention", qkv, num_q_heads, num_kv_heads, head_dim, meta));
    LORAPLEX_RETURN_IF_ERROR(CheckCache("Attention", cache, num_kv_heads, head_dim));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("Attention", "out", out, 2));
    const int64_t q_width = static_cast<int64_t>(num_q_heads) * head_dim;
    if (out.shape[0] < meta.num_tokens || out.shape[1] != q_width) {
      return Invalid("Attention", "out has shape ", out.shape.ToString(), ", expected [",
                     meta.num_tokens, ",", q_width, "]");
    }
    if (meta.positions == nullptr || meta.token_seq == nullptr || meta.block_tables == nullptr ||
        meta.context_lens == nullptr) {
      return Invalid("Attention",
                     "positions, token_seq, context_lens and block_tables must not be null");
    }
    if (cache.k.shape[1] != meta.block_size) {
      return Invalid("Attention", "cache blocks hold ", cache.k.shape[1],
                     " tokens, meta.block_size is ", meta.block_size);
    }
    const int64_t width = qkv.shape[1];
    const int64_t kv_row = static_cast<int64_t>(num_kv_heads) * head_dim;
    const int64_t num_blocks = cache.k.shape[0];
    const int group = num_q_heads / num_kv_heads;
    std::vector<double> scores;
    std::vector<double> acc(static_cast<size_t>(head_dim));
    for (int64_t t = 0; t < meta.num_tokens; ++t) {
      float* o = out.As<float>() + t * q_width;
      const int32_t seq = meta.token_seq[t];
      if (seq < 0) {  // padding rows get zeros, so nothing downstream reads garbage
        std::memset(o, 0, static_cast<size_t>(q_width) * sizeof(float));
        continue;
      }
      if (seq >= meta.max_seqs)
        return Invalid("Attention", "token_seq[", t, "] = ", seq, " outside [0,", meta.max_seqs,
                       ")");
      const int32_t pos = meta.positions[t];
      if (pos < 0 || pos >= meta.context_lens[seq]) {
        return Invalid("Attention", "positions[", t, "] = ", pos,
                       " outside the context of sequence ", seq, " (", meta.context_lens[seq],
                       " tokens)");
      }
      const int64_t ctx = pos + 1;
      if ((ctx + meta.block_size - 1) / meta.block_size > meta.max_blocks_per_seq) {
        return Invalid("Attention", "position ", pos, " needs more than max_blocks_per_seq ",
                       meta.max_blocks_per_seq, " blocks");
      }
      const int32_t* table =
          meta.block_tables + static_cast<int64_t>(seq) * meta.max_blocks_per_seq;
      scores.resize(static_cast<size_t>(ctx));
      for (int h = 0; h < num_q_heads; ++h) {
        const float* q = qkv.As<float>() + t * width + static_cast<int64_t>(h) * head_dim;
        const int64_t kv_off = static_cast<int64_t>(h / group) * head_dim;  // GQA: shared kv head
        double max_score = -INFINITY;
        for (int64_t p = 0; p < ctx; ++p) {
          const int32_t block = table[p / meta.block_size];
          if (block < 0 || block >= num_blocks) {
            return Invalid("Attention", "block table of sequence ", seq, " entry ",
                           p / meta.block_size, " = ", block, " outside [0,", num_blocks, ")");
          }
          const int64_t slot = static_cast<int64_t>(block) * meta.block_size + p % meta.block_size;
          const double s =
              Dot(q, cache.k.As<float>() + slot * kv_row + kv_off, head_dim) * softmax_scale;
          scores[static_cast<size_t>(p)] = s;
          max_score = std::max(max_score, s);
        }
        double denom = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t p = 0; p < ctx; ++p) {
          const double e = std::exp(scores[static_cast<size_t>(p)] - max_score);
          denom += e;
          const int64_t slot = static_cast<int64_t>(table[p / meta.block_size]) * meta.block_size +
                               p % meta.block_size;
          const float* v = cache.v.As<float>() + slot * kv_row + kv_off;
          for (int d = 0; d < head_dim; ++d) acc[static_cast<size_t>(d)] += e * v[d];
        }
        for (int d = 0; d < head_dim; ++d) {
          o[static_cast<int64_t>(h) * head_dim + d] =
              static_cast<float>(acc[static_cast<size_t>(d)] / denom);
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status SiluMul(const TensorView& gate_up, const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckF32("SiluMul", "gate_up", gate_up, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("SiluMul", "out", out, 2));
    const int64_t inter = out.shape[1];
    if (gate_up.shape[1] != 2 * inter || out.shape[0] != gate_up.shape[0]) {
      return Invalid("SiluMul", "gate_up has shape ", gate_up.shape.ToString(), ", out ",
                     out.shape.ToString());
    }
    for (int64_t t = 0; t < out.shape[0]; ++t) {
      const float* g = gate_up.As<float>() + t * 2 * inter;
      float* o = out.As<float>() + t * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const double gv = g[i];
        o[i] = static_cast<float>(gv / (1.0 + std::exp(-gv)) * g[inter + i]);
      }
    }
    return absl::OkStatus();
  }

  absl::Status GatherRows(const TensorView& x, const TensorView& rows,
                          const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckF32("GatherRows", "x", x, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckI32("GatherRows", "rows", rows));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("GatherRows", "out", out, 2));
    const int64_t h = x.shape[1];
    if (out.shape[0] != rows.shape[0] || out.shape[1] != h) {
      return Invalid("GatherRows", "out has shape ", out.shape.ToString(), ", expected [",
                     rows.shape[0], ",", h, "]");
    }
    for (int64_t i = 0; i < rows.shape[0]; ++i) {
      const int32_t r = rows.As<int32_t>()[i];
      if (r < 0 || r >= x.shape[0])
        return Invalid("GatherRows", "rows[", i, "] = ", r, " outside [0,", x.shape[0], ")");
      std::memcpy(out.As<float>() + i * h, x.As<float>() + r * h,
                  static_cast<size_t>(h) * sizeof(float));
    }
    return absl::OkStatus();
  }

  absl::Status Sample(const TensorView& logits, const SamplingRow* rows, SampledToken* out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckF32("Sample", "logits", logits, 2));
    if (rows == nullptr || out == nullptr) return Invalid("Sample", "rows and out must not be null");
    const int64_t vocab = logits.shape[1];
    if (vocab < 1) return Invalid("Sample", "logits has shape ", logits.shape.ToString());
    for (int64_t r = 0; r < logits.shape[0]; ++r) {
      LORAPLEX_RETURN_IF_ERROR(CheckSamplingRow(rows[r], r));
      out[r] = cpu::SampleRow(logits.As<float>() + r * vocab, vocab, rows[r]);
    }
    return absl::OkStatus();
  }

  absl::Status LoraShrink(const TensorView& x, const LoraSegments& segments,
                          const LoraModule& module, const TensorView& y) override {
    LORAPLEX_RETURN_IF_ERROR(CheckF32("LoraShrink", "x", x, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("LoraShrink", "y", y, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraMeta("LoraShrink", segments, module));
    const int64_t in = module.in_features;
    if (x.shape[1] != in || x.shape[0] < segments.num_tokens) {
      return Invalid("LoraShrink", "x has shape ", x.shape.ToString(), ", expected [",
                     segments.num_tokens, ",", in, "]");
    }
    const int64_t y_width = static_cast<int64_t>(module.num_slices) * module.max_rank;
    if (y.shape[1] != y_width || y.shape[0] < segments.num_tokens) {
      return Invalid("LoraShrink", "y has shape ", y.shape.ToString(), ", expected [",
                     segments.num_tokens, ",", y_width, "]");
    }
    for (int32_t s = 0; s < *segments.num_segments; ++s) {
      const LoraSliceWeights* slot = module.table + segments.seg_slots[s] * module.num_slices;
      for (int32_t i = segments.seg_starts[s]; i < segments.seg_starts[s + 1]; ++i) {
        const int64_t row = segments.token_rows[i];
        const float* xr = x.As<float>() + row * in;
        for (int32_t sl = 0; sl < module.num_slices; ++sl) {
          const float* a = static_cast<const float*>(slot[sl].a);
          float* yr = y.As<float>() + row * y_width + static_cast<int64_t>(sl) * module.max_rank;
          for (int32_t j = 0; j < slot[sl].rank; ++j)
            yr[j] = static_cast<float>(Dot(xr, a + j * in, in));
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status LoraExpand(const TensorView& y, const LoraSegments& segments,
                          const LoraModule& module, const TensorView& out) override {
    LORAPLEX_RETURN_IF_ERROR(CheckF32("LoraExpand", "y", y, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckF32("LoraExpand", "out", out, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckLoraMeta("LoraExpand", segments, module));
    const int64_t y_width = static_cast<int64_t>(module.num_slices) * module.max_rank;
    if (y.shape[1] != y_width || y.shape[0] < segments.num_tokens) {
      return Invalid("LoraExpand", "y has shape ", y.shape.ToString(), ", expected [",
                     segments.num_tokens, ",", y_width, "]");
    }
    const int64_t out_width = module.slice_offsets[module.num_slices];
    if (out.shape[1] != out_width || out.shape[0] < segments.num_tokens) {
      return Invalid("LoraExpand", "out has shape ", out.shape.ToString(), ", expected [",
                     segments.num_tokens, ",", out_width, "]");
    }
    for (int32_t s = 0; s < *segments.num_segments; ++s) {
      const LoraSliceWeights* slot = module.table + segments.seg_slots[s] * module.num_slices;
      for (int32_t i = segments.seg_starts[s]; i < segments.seg_starts[s + 1]; ++i) {
        const int64_t row = segments.token_rows[i];
        for (int32_t sl = 0; sl < module.num_slices; ++sl) {
          const int32_t rank = slot[sl].rank;
          if (rank == 0) continue;
          const float* yr =
              y.As<float>() + row * y_width + static_cast<int64_t>(sl) * module.max_rank;
          const float* b = static_cast<const float*>(slot[sl].b);
          const int64_t begin = module.slice_offsets[sl];
          const int64_t width = module.slice_offsets[sl + 1] - begin;
          float* o = out.As<float>() + row * out_width + begin;
          for (int64_t n = 0; n < width; ++n) {
            o[n] = static_cast<float>(o[n] + static_cast<double>(slot[sl].scale) *
                                                 Dot(yr, b + n * rank, rank));
          }
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  static absl::Status CheckNorm(const char* op, const TensorView& x, const TensorView& weight,
                                const TensorView& out) {
    LORAPLEX_RETURN_IF_ERROR(CheckF32(op, "x", x, 2));
    LORAPLEX_RETURN_IF_ERROR(CheckF32(op, "weight", weight, 1));
    LORAPLEX_RETURN_IF_ERROR(CheckF32(op, "out", out, 2));
    if (weight.shape[0] != x.shape[1] || !(out.shape == x.shape)) {
      return Invalid(op, "x ", x.shape.ToString(), ", weight ", weight.shape.ToString(), ", out ",
                     out.shape.ToString(), " do not match");
    }
    return absl::OkStatus();
  }

  static absl::Status CheckQkv(const char* op, const TensorView& qkv, int num_q_heads,
                               int num_kv_heads, int head_dim, const AttentionMeta& meta) {
    LORAPLEX_RETURN_IF_ERROR(CheckF32(op, "qkv", qkv, 2));
    if (num_q_heads <= 0 || num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || head_dim <= 0 ||
        head_dim % 2 != 0) {
      return Invalid(op, "heads ", num_q_heads, "/", num_kv_heads, " with head_dim ", head_dim,
                     " are not a valid GQA layout");
    }
    const int64_t width = static_cast<int64_t>(num_q_heads + 2 * num_kv_heads) * head_dim;
    if (qkv.shape[1] != width || qkv.shape[0] < meta.num_tokens) {
      return Invalid(op, "qkv has shape ", qkv.shape.ToString(), ", expected [", meta.num_tokens,
                     ",", width, "]");
    }
    if (meta.block_size <= 0) return Invalid(op, "block_size ", meta.block_size, " must be > 0");
    return absl::OkStatus();
  }

  static absl::Status CheckCache(const char* op, const KvCacheView& cache, int num_kv_heads,
                                 int head_dim) {
    LORAPLEX_RETURN_IF_ERROR(CheckF32(op, "cache.k", cache.k, 4));
    LORAPLEX_RETURN_IF_ERROR(CheckF32(op, "cache.v", cache.v, 4));
    if (!(cache.k.shape == cache.v.shape) || cache.k.shape[2] != num_kv_heads ||
        cache.k.shape[3] != head_dim) {
      return Invalid(op, "cache k ", cache.k.shape.ToString(), " / v ", cache.v.shape.ToString(),
                     " do not fit ", num_kv_heads, " kv heads of ", head_dim);
    }
    return absl::OkStatus();
  }
};

}  // namespace

std::unique_ptr<Ops> CreateCpuOps() { return std::make_unique<CpuOps>(); }

}  // namespace loraplex::ops
