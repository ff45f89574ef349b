// The reference sampler: Ops::Sample's semantics for one row of logits, written plainly in double
// precision (sorting, then a walk in id order). The CPU executor runs it; the CUDA sampler is
// tested against it. Pure functions; thread-safe.
#pragma once

#include <cstdint>

#include "engine/ops/ops.h"

namespace loraplex::ops::cpu {

// The uniform draw of (seed, step) as a 53-bit integer u (the draw is u · 2^-53 in [0, 1)):
// a counter-based hash, so it depends on nothing else (not on the batch, not on earlier draws).
uint64_t UniformBits53(uint64_t seed, int64_t step);

// Samples one row: `logits` [vocab] F32 raw (before temperature). `row` is assumed validated
// (temperature >= 0, top_p in (0, 1], top_k >= 0, top_n in [0, kMaxSampleTopN]).
SampledToken SampleRow(const float* logits, int64_t vocab, const SamplingRow& row);

}  // namespace loraplex::ops::cpu
