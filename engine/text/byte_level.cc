#include "engine/text/byte_level.h"

#include <array>

#include "engine/text/utf8.h"

namespace loraplex::text {
namespace {

// bytes_to_unicode() from GPT-2's encoder.py: printable Latin-1 bytes map to themselves, the
// other 68 bytes to U+0100.. in byte order. Code points stay below 324.
constexpr int kMaxCodePoint = 324;

struct Tables {
  std::array<std::string, 256> byte_to_utf8;
  std::array<int, kMaxCodePoint> code_point_to_byte;
};

const Tables& GetTables() {
  static const Tables* tables = [] {
    auto* t = new Tables();
    t->code_point_to_byte.fill(-1);
    int next_extra = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const int cp = printable ? b : next_extra++;
      AppendUtf8(static_cast<uint32_t>(cp), &t->byte_to_utf8[b]);
      t->code_point_to_byte[cp] = b;
    }
    return t;
  }();
  return *tables;
}

}  // namespace

std::string BytesToByteLevel(std::string_view bytes) {
  const Tables& t = GetTables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += t.byte_to_utf8[static_cast<uint8_t>(c)];
  return out;
}

std::optional<std::string> ByteLevelToBytes(std::string_view s) {
  const Tables& t = GetTables();
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t length = Utf8SequenceLength(s, pos);
    if (length == 0 || length > 2) return std::nullopt;  // the alphabet is below U+0800
    uint32_t cp = static_cast<uint8_t>(s[pos]);
    if (length == 2) cp = ((cp & 0x1F) << 6) | (static_cast<uint8_t>(s[pos + 1]) & 0x3F);
    if (cp >= kMaxCodePoint || t.code_point_to_byte[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(t.code_point_to_byte[cp]));
    pos += length;
  }
  return out;
}

}  // namespace loraplex::text
