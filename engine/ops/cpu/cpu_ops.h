// The CPU reference executor: every op of ops::Ops as plain loops over F32 host memory with
// fp64 accumulation. Readable over fast; the oracle the CUDA ops are tested against.
// Not thread-safe (like every Ops: engine thread only); ops run synchronously.
#pragma once

#include <memory>

#include "engine/ops/ops.h"

namespace loraplex::ops {

// compute_dtype() is F32; "device" memory is aligned host memory.
std::unique_ptr<Ops> CreateCpuOps();

}  // namespace loraplex::ops
