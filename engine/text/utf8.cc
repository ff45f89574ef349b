#include "engine/text/utf8.h"

#include "absl/strings/str_cat.h"

namespace loraplex::text {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

enum class Scan { kValid, kInvalid, kTruncated };

// Scans one sequence at bytes[pos]. `length` is set to the bytes of a valid sequence, or to the
// maximal subpart of an ill-formed/truncated one (always >= 1).
Scan ScanSequence(std::string_view bytes, size_t pos, size_t* length) {
  const auto b0 = static_cast<uint8_t>(bytes[pos]);
  size_t need = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte (excludes overlongs etc.)
  if (b0 < 0x80) {
    *length = 1;
    return Scan::kValid;
  } else if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    *length = 1;
    return Scan::kInvalid;
  }
  size_t k = 1;
  for (; k < need; ++k) {
    if (pos + k >= bytes.size()) {
      *length = k;
      return Scan::kTruncated;
    }
    const auto b = static_cast<uint8_t>(bytes[pos + k]);
    const uint8_t k_lo = k == 1 ? lo : 0x80;
    const uint8_t k_hi = k == 1 ? hi : 0xBF;
    if (b < k_lo || b > k_hi) {
      *length = k;
      return Scan::kInvalid;
    }
  }
  *length = need;
  return Scan::kValid;
}

}  // namespace

absl::Status ValidateUtf8(std::string_view bytes, absl::string_view what) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t length = 0;
    if (ScanSequence(bytes, pos, &length) != Scan::kValid) {
      return absl::InvalidArgumentError(absl::StrCat(what, " is not valid UTF-8 at byte ", pos));
    }
    pos += length;
  }
  return absl::OkStatus();
}

size_t Utf8SequenceLength(std::string_view bytes, size_t pos) {
  size_t length = 0;
  return ScanSequence(bytes, pos, &length) == Scan::kValid ? length : 0;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t AppendUtf8Lossy(std::string_view bytes, bool keep_incomplete_tail, std::string* out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t length = 0;
    switch (ScanSequence(bytes, pos, &length)) {
      case Scan::kValid:
        out->append(bytes.substr(pos, length));
        break;
      case Scan::kTruncated:
        if (keep_incomplete_tail) return pos;
        out->append(kReplacement);
        break;
      case Scan::kInvalid:
        out->append(kReplacement);
        break;
    }
    pos += length;
  }
  return pos;
}

}  // namespace loraplex::text
