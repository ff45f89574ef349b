#include "engine/core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/core/status.h"
#include "nlohmann/json.hpp"

namespace loraplex {
namespace {

using Json = nlohmann::json;

absl::Status Invalid(const std::string& path, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", problem));
}

// Parses JSON text, rejecting duplicate keys in any object: nlohmann would silently keep the
// last one, so a file could show one tensor entry to us and another to other readers.
absl::StatusOr<Json> ParseJsonNoDuplicates(std::string_view text, const std::string& path) {
  std::vector<std::set<std::string>> keys_per_object;
  std::string duplicate;
  auto callback = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        keys_per_object.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!keys_per_object.empty()) keys_per_object.pop_back();
        break;
      case Json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!keys_per_object.empty() && !keys_per_object.back().insert(key).second &&
            duplicate.empty()) {
          duplicate = key;
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  Json json;
  try {
    json = Json::parse(text.begin(), text.end(), callback);
  } catch (const Json::exception& e) {
    return Invalid(path, absl::StrCat("JSON parse error: ", e.what()));
  }
  if (!duplicate.empty()) return Invalid(path, absl::StrCat("duplicate key '", duplicate, "'"));
  return json;
}

// A JSON non-negative integer that fits in int64 (dimensions and offsets); fractional, negative,
// and out-of-range numbers are rejected.
bool AsNonNegativeInt(const Json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
  } else if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = static_cast<uint64_t>(v);
  } else {
    return false;
  }
  return *out <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
}

bool CheckedMul(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}

// Reads exactly `size` bytes at `offset`; DATA_LOSS if the file ends early.
absl::Status PreadFully(int fd, const std::string& path, uint64_t offset, void* dst, size_t size) {
  auto* p = static_cast<char*>(dst);
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pread(fd, p + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::DataLossError(absl::StrCat(path, ": read of ", size, " bytes at offset ", offset,
                                              " failed: ", std::strerror(errno)));
    }
    if (n == 0) {
      return absl::DataLossError(absl::StrCat(path, ": file ended after ", offset + done,
                                              " bytes, expected ", offset + size));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<TensorInfo> ParseTensorEntry(const std::string& path, const std::string& name,
                                            const Json& entry, uint64_t data_start) {
  const std::string where = absl::StrCat("tensor '", name, "'");
  if (!entry.is_object()) return Invalid(path, absl::StrCat(where, ": entry is not an object"));
  TensorInfo info;
  info.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return Invalid(path, absl::StrCat(where, ": missing string 'dtype'"));
  }
  auto dtype = ParseSafetensorsDType(dtype_it->get_ref<const std::string&>());
  if (!dtype.ok()) return Invalid(path, absl::StrCat(where, ": ", dtype.status().message()));
  info.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return Invalid(path, absl::StrCat(where, ": missing array 'shape'"));
  }
  if (shape_it->size() > static_cast<size_t>(kMaxTensorDims)) {
    return Invalid(path, absl::StrCat(where, ": shape ", shape_it->dump(), " has more than ",
                                      kMaxTensorDims, " dimensions"));
  }
  uint64_t elements = 1;
  for (const Json& dim_json : *shape_it) {
    uint64_t dim = 0;
    if (!AsNonNegativeInt(dim_json, &dim)) {
      return Invalid(path, absl::StrCat(where, ": shape ", shape_it->dump(),
                                        " must hold non-negative integers"));
    }
    if (!CheckedMul(elements, dim, &elements)) {
      return Invalid(path, absl::StrCat(where, ": shape ", shape_it->dump(), " overflows"));
    }
    info.shape[info.shape.rank++] = static_cast<int64_t>(dim);
  }
  uint64_t nbytes = 0;
  if (!CheckedMul(elements, DTypeSize(info.dtype), &nbytes) ||
      elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return Invalid(path, absl::StrCat(where, ": shape ", shape_it->dump(), " overflows"));
  }

  auto offsets_it = entry.find("data_offsets");
  uint64_t begin = 0, end = 0;
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !AsNonNegativeInt((*offsets_it)[0], &begin) || !AsNonNegativeInt((*offsets_it)[1], &end)) {
    return Invalid(path, absl::StrCat(where,
                                      ": 'data_offsets' must be [begin, end] of "
                                      "non-negative integers"));
  }
  if (end < begin) {
    return Invalid(path,
                   absl::StrCat(where, ": data_offsets [", begin, ",", end, "] end before begin"));
  }
  if (end - begin != nbytes) {
    return Invalid(
        path, absl::StrCat(where, ": data_offsets [", begin, ",", end, "] hold ", end - begin,
                           " bytes but ", std::string(DTypeName(info.dtype)), " ", shape_it->dump(),
                           " needs ", nbytes));
  }
  // data_start <= 8 + kMaxHeaderBytes and begin <= INT64_MAX, so this cannot overflow.
  info.offset = data_start + begin;
  info.nbytes = nbytes;
  return info;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file->fd_ < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  struct stat st;
  if (::fstat(file->fd_, &st) != 0) {
    return Invalid(path, absl::StrCat("cannot stat: ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) return Invalid(path, "not a regular file");
  file->file_size_ = static_cast<uint64_t>(st.st_size);
  const uint64_t file_size = file->file_size_;
  if (file_size < 8) {
    return Invalid(
        path, absl::StrCat("file size ", file_size, " is smaller than the 8-byte header length"));
  }

  unsigned char len_bytes[8];
  LORAPLEX_RETURN_IF_ERROR(PreadFully(file->fd_, path, 0, len_bytes, 8));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeaderBytes) {
    return Invalid(path, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                      kMaxHeaderBytes));
  }
  if (header_len > file_size - 8) {
    return Invalid(path,
                   absl::StrCat("header length ", header_len, " exceeds file size ", file_size));
  }
  std::string header(header_len, '\0');
  LORAPLEX_RETURN_IF_ERROR(PreadFully(file->fd_, path, 8, header.data(), header.size()));
  if (header.empty() || header[0] != '{') return Invalid(path, "header does not start with '{'");

  LORAPLEX_ASSIGN_OR_RETURN(Json json, ParseJsonNoDuplicates(header, path));
  if (!json.is_object()) return Invalid(path, "header is not a JSON object");

  const uint64_t data_start = 8 + header_len;
  std::vector<const TensorInfo*> by_offset;
  for (auto it = json.begin(); it != json.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return Invalid(path, "__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) {
          return Invalid(path, absl::StrCat("__metadata__ value of '", m.key(),
                                            "' is not a string: ", m.value().dump()));
        }
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    LORAPLEX_ASSIGN_OR_RETURN(TensorInfo info,
                              ParseTensorEntry(path, it.key(), it.value(), data_start));
    auto [pos, inserted] = file->tensors_.emplace(it.key(), std::move(info));
    by_offset.push_back(&pos->second);
  }

  // Tensors must tile the data section exactly: a hole or overlap means a corrupt or hostile
  // file, and trailing bytes mean the header does not describe the whole file.
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::pair(a->offset, a->nbytes) < std::pair(b->offset, b->nbytes);
  });
  uint64_t expected = data_start;
  for (const TensorInfo* info : by_offset) {
    const uint64_t begin = info->offset - data_start;
    const uint64_t end = begin + info->nbytes;
    if (info->offset < expected) {
      return Invalid(path, absl::StrCat("tensor '", info->name, "': data_offsets [", begin, ",",
                                        end, "] overlap previous tensor"));
    }
    if (info->offset > expected) {
      return Invalid(path,
                     absl::StrCat("tensor '", info->name, "': data_offsets [", begin, ",", end,
                                  "] leave a hole after offset ", expected - data_start));
    }
    expected = info->offset + info->nbytes;
  }
  if (expected != file_size) {
    return Invalid(
        path, absl::StrCat("tensor data ends at byte ", expected, " but file size is ", file_size));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<const TensorInfo*> SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  }
  return &it->second;
}

absl::Status SafetensorsFile::Read(const TensorInfo& info, void* dst, size_t dst_bytes) const {
  if (dst_bytes != info.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", info.name, "' has ",
                                                   info.nbytes, " bytes, destination has ",
                                                   dst_bytes));
  }
  return PreadFully(fd_, path_, info.offset, dst, dst_bytes);
}

absl::StatusOr<HostTensor> SafetensorsFile::ReadAs(const std::string& name, DType dtype) const {
  LORAPLEX_ASSIGN_OR_RETURN(const TensorInfo* info, Find(name));
  HostTensor out(dtype, info->shape);
  if (info->dtype == dtype) {
    LORAPLEX_RETURN_IF_ERROR(Read(*info, out.data(), out.NumBytes()));
    return out;
  }
  auto is_float = [](DType d) { return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16; };
  if (!is_float(info->dtype) || !is_float(dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor '", name, "' is ", std::string(DTypeName(info->dtype)),
                     ", cannot convert to ", std::string(DTypeName(dtype))));
  }
  const size_t count = static_cast<size_t>(info->shape.NumElements());
  HostTensor raw(info->dtype, info->shape);
  LORAPLEX_RETURN_IF_ERROR(Read(*info, raw.data(), raw.NumBytes()));
  if (info->dtype == DType::kF32) {
    LORAPLEX_RETURN_IF_ERROR(ConvertFromFloat(raw.As<float>(), count, dtype, out.data()));
    return out;
  }
  std::vector<float> floats(count);
  LORAPLEX_RETURN_IF_ERROR(ConvertToFloat(info->dtype, raw.data(), count, floats.data()));
  LORAPLEX_RETURN_IF_ERROR(ConvertFromFloat(floats.data(), count, dtype, out.data()));
  return out;
}

namespace {

constexpr char kSingleFileName[] = "model.safetensors";
constexpr char kIndexFileName[] = "model.safetensors.index.json";

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  std::string text;
  char buf[1 << 16];
  absl::Status status;
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = absl::DataLossError(absl::StrCat(path, ": read failed: ", std::strerror(errno)));
      break;
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > SafetensorsFile::kMaxHeaderBytes) {
      status =
          Invalid(path, absl::StrCat("larger than ", SafetensorsFile::kMaxHeaderBytes, " bytes"));
      break;
    }
  }
  ::close(fd);
  if (!status.ok()) return status;
  return text;
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightSet>> WeightSet::Open(const std::string& dir_or_file) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path root(dir_or_file);
  const fs::file_status st = fs::status(root, ec);
  if (ec || !fs::exists(st)) {
    return absl::NotFoundError(absl::StrCat(dir_or_file, ": no such file or directory"));
  }
  std::unique_ptr<WeightSet> set(new WeightSet());
  auto add_whole_file = [&](const std::string& path) -> absl::Status {
    LORAPLEX_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
    for (const auto& [name, info] : file->tensors()) set->where_[name] = file.get();
    set->files_.push_back(std::move(file));
    return absl::OkStatus();
  };
  if (!fs::is_directory(st)) {
    LORAPLEX_RETURN_IF_ERROR(add_whole_file(dir_or_file));
    return set;
  }
  // Same precedence as Hugging Face transformers: the single file first, then the index.
  const fs::path single = root / kSingleFileName;
  if (fs::exists(single, ec)) {
    LORAPLEX_RETURN_IF_ERROR(add_whole_file(single.string()));
    return set;
  }
  const fs::path index_path = root / kIndexFileName;
  if (!fs::exists(index_path, ec)) {
    return absl::NotFoundError(absl::StrCat(dir_or_file, ": neither ", kSingleFileName, " nor ",
                                            kIndexFileName, " found"));
  }
  const std::string index_name = index_path.string();
  LORAPLEX_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(index_name));
  LORAPLEX_ASSIGN_OR_RETURN(Json index, ParseJsonNoDuplicates(text, index_name));
  if (!index.is_object()) return Invalid(index_name, "not a JSON object");
  auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object()) {
    return Invalid(index_name, "missing object 'weight_map'");
  }
  std::map<std::string, const SafetensorsFile*> shards;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    const std::string& tensor = it.key();
    if (!it.value().is_string()) {
      return Invalid(index_name, absl::StrCat("weight_map['", tensor, "'] is not a string"));
    }
    const std::string& shard = it.value().get_ref<const std::string&>();
    // Shards must sit beside the index: a name with a separator or '..' could read any file.
    if (shard.empty() || shard.find('/') != std::string::npos ||
        shard.find('\\') != std::string::npos || shard.find("..") != std::string::npos) {
      return Invalid(index_name, absl::StrCat("weight_map['", tensor, "'] names file '", shard,
                                              "' outside the model directory"));
    }
    auto shard_it = shards.find(shard);
    if (shard_it == shards.end()) {
      LORAPLEX_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((root / shard).string()));
      shard_it = shards.emplace(shard, file.get()).first;
      set->files_.push_back(std::move(file));
    }
    if (!shard_it->second->tensors().contains(tensor)) {
      return Invalid(index_name, absl::StrCat("tensor '", tensor, "' mapped to '", shard,
                                              "' is not in that file"));
    }
    set->where_[tensor] = shard_it->second;
  }
  return set;
}

absl::StatusOr<const TensorInfo*> WeightSet::Find(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end())
    return absl::NotFoundError(absl::StrCat("no tensor '", name, "' in weights"));
  return it->second->Find(name);
}

absl::StatusOr<HostTensor> WeightSet::ReadAs(const std::string& name, DType dtype) const {
  auto it = where_.find(name);
  if (it == where_.end())
    return absl::NotFoundError(absl::StrCat("no tensor '", name, "' in weights"));
  return it->second->ReadAs(name, dtype);
}

std::vector<std::string> WeightSet::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<const NamedTensor*> sorted;
  sorted.reserve(tensors.size());
  for (const NamedTensor& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const NamedTensor* a, const NamedTensor* b) { return a->name < b->name; });

  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    const NamedTensor& t = *sorted[i];
    if (i > 0 && sorted[i - 1]->name == t.name) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": duplicate tensor name '", t.name, "'"));
    }
    if (t.name == "__metadata__") {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor name '__metadata__' is reserved"));
    }
    if (t.tensor.device != Device::kCpu) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", t.name, "' is not on the host"));
    }
    Json shape = Json::array();
    for (int d = 0; d < t.tensor.shape.rank; ++d) {
      if (t.tensor.shape[d] < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor '", t.name, "' has shape ", t.tensor.shape.ToString()));
      }
      shape.push_back(t.tensor.shape[d]);
    }
    const uint64_t nbytes = t.tensor.NumBytes();
    if (nbytes > 0 && t.tensor.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name, "' has no data"));
    }
    header[t.name] = {{"dtype", std::string(DTypeName(t.tensor.dtype))},
                      {"shape", std::move(shape)},
                      {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const Json::exception& e) {  // names or metadata that are not valid UTF-8
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot encode header: ", e.what()));
  }
  // Pad so that the data section starts 8-byte aligned (8-byte length prefix + header).
  text.append((8 - text.size() % 8) % 8, ' ');

  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);

  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat(path, ": cannot create: ", std::strerror(errno)));
  }
  auto write_all = [&](const void* data, size_t size) -> absl::Status {
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
      const ssize_t n = ::write(fd, p, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        return absl::InternalError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
      }
      p += n;
      size -= static_cast<size_t>(n);
    }
    return absl::OkStatus();
  };
  absl::Status status = write_all(prefix.data(), prefix.size());
  if (status.ok()) status = write_all(text.data(), text.size());
  for (const NamedTensor* t : sorted) {
    if (!status.ok()) break;
    status = write_all(t->tensor.data, t->tensor.NumBytes());
  }
  if (::close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat(path, ": close failed: ", std::strerror(errno)));
  }
  return status;
}

}  // namespace loraplex
