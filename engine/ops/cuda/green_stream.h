// A stream whose kernels run only on a partition of the GPU's SMs (a CUDA green context): side
// work launched into it cannot occupy the SMs outside the partition that a kernel running
// concurrently on another stream needs. The driver's green-context entry points are fetched
// through the runtime (cudaGetDriverEntryPointByVersion), so nothing links libcuda directly.
// Create and destroy on the thread that owns the CUDA executor.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "absl/status/statusor.h"

namespace loraplex::ops::cuda {

class GreenStream {
 public:
  // A partition of at least `min_sms` SMs of device `ordinal` (the driver rounds it up to its
  // partition granularity; sms() is what was granted). UNIMPLEMENTED where the driver has no
  // green contexts; INVALID_ARGUMENT for min_sms outside 1..the device's SM count.
  static absl::StatusOr<std::unique_ptr<GreenStream>> Create(int ordinal, int min_sms);
  ~GreenStream();
  GreenStream(const GreenStream&) = delete;
  GreenStream& operator=(const GreenStream&) = delete;

  cudaStream_t stream() const { return stream_; }
  int sms() const { return sms_; }

 private:
  GreenStream() = default;

  void* context_ = nullptr;  // CUgreenCtx
  cudaStream_t stream_ = nullptr;
  int sms_ = 0;
};

}  // namespace loraplex::ops::cuda
