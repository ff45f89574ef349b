// Reading and writing safetensors files. The reader validates the whole header (bounds, offsets,
// dtypes, shapes, no holes or overlaps, duplicate names) before trusting any size, and reads
// tensor bytes with pread (no mmap: a file truncated later cannot fault the process).
// SafetensorsFile and WeightSet are immutable after Open and thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/tensor.h"

namespace loraplex {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  uint64_t offset = 0;  // absolute file offset of the first byte
  uint64_t nbytes = 0;
};

class SafetensorsFile {
 public:
  // Largest header accepted (bytes of JSON).
  static constexpr uint64_t kMaxHeaderBytes = 64ull << 20;

  // NOT_FOUND if the file does not exist; INVALID_ARGUMENT naming the file and the problem for
  // any malformed header ("header length 9999999 exceeds file size 100", "tensor 'x': data_offsets
  // [0,8] overlap previous tensor", "tensor 'x': dtype 'Q4' unknown", ...).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // NOT_FOUND if absent.
  absl::StatusOr<const TensorInfo*> Find(const std::string& name) const;
  // Copies the tensor's bytes into `dst` (exactly info.nbytes). INVALID_ARGUMENT if dst_bytes
  // differs; DATA_LOSS if the file is shorter than when opened.
  absl::Status Read(const TensorInfo& info, void* dst, size_t dst_bytes) const;
  // Reads a tensor and converts it to `dtype` (F32/F16/BF16 <-> each other, or same dtype).
  absl::StatusOr<HostTensor> ReadAs(const std::string& name, DType dtype) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The weights of a model directory: `model.safetensors`, or the shards named by
// `model.safetensors.index.json` (each shard validated; every tensor found in the file the index
// names). Also accepts a single file path.
class WeightSet {
 public:
  static absl::StatusOr<std::unique_ptr<WeightSet>> Open(const std::string& dir_or_file);
  // NOT_FOUND naming the tensor if absent.
  absl::StatusOr<const TensorInfo*> Find(const std::string& name) const;
  absl::StatusOr<HostTensor> ReadAs(const std::string& name, DType dtype) const;
  std::vector<std::string> names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

// Writes tensors (host views) in safetensors format: header padded to 8 bytes, tensors sorted by
// name. INVALID_ARGUMENT for duplicate names; INTERNAL for I/O errors.
struct NamedTensor {
  std::string name;
  TensorView tensor;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace loraplex
