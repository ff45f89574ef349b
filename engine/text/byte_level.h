// The GPT-2 byte-level alphabet: every byte maps to one printable code point so that byte-level
// BPE vocabularies are plain strings ("Ġ" is the space byte). Immutable tables; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace loraplex::text {

// Raw bytes -> their byte-level string (UTF-8 of the mapped code points).
std::string BytesToByteLevel(std::string_view bytes);

// Byte-level string -> raw bytes; nullopt if a character is outside the byte-level alphabet or
// `s` is not valid UTF-8.
std::optional<std::string> ByteLevelToBytes(std::string_view s);

}  // namespace loraplex::text
