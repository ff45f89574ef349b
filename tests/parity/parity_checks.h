// The parity checks shared by the CPU and CUDA parity tests: each runs the trained fixture model
// on one device and CHECKs (Catch2) it against the transformers + PEFT references within `tol`,
// printing the measured numbers. Call from a TEST_CASE; single-threaded.
#pragma once

#include "engine/core/tensor.h"

namespace loraplex::parity {

// How the 40 records are fed: one step per record, or all of them in one mixed-adapter step.
enum class Batching { kSolo, kMixed };

// Bounds on |our logprob - reference logprob| (natural log) and on what counts as a decided choice.
struct Tolerances {
  double max_abs = 0;          // every compared logprob (next token, and the reference's top-5)
  double mean_abs = 0;         // mean over each model's positions of the next token's
  double decision_margin = 0;  // top-5 order and greedy tokens must agree where the reference's
                               // competing logprobs are farther apart than this
};

// Teacher-forced prompt + continuation of every record: the next token's logprob at every
// position and the reference's top-5 logprobs within the bounds, and the top-5 ids in the same
// order wherever neighbouring logprobs are more than the decision margin apart.
void CheckTeacherForcedParity(Device device, Batching batching, const Tolerances& tol);

// Greedy decoding of every record's prompt equals the reference's continuation, step by step,
// up to the first step whose reference top-2 margin is within the decision margin.
void CheckGreedyParity(Device device, Batching batching, const Tolerances& tol);

}  // namespace loraplex::parity
