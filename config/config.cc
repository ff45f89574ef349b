#include "config/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status.h"
#include "yaml-cpp/yaml.h"

namespace loraplex::config {
namespace {

constexpr char kDocument[] = "config";

// Where a value sits in the document: its YAML path and 1-based line (0 when unknown).
struct Where {
  std::string path;
  int line = 0;

  std::string Str() const {
    const std::string name = path.empty() ? std::string(kDocument) : path;
    return line > 0 ? absl::StrCat(name, " (line ", line, ")") : name;
  }
  Where Child(const std::string& key, int child_line) const {
    return {path.empty() ? key : absl::StrCat(path, ".", key), child_line > 0 ? child_line : line};
  }
  Where Index(size_t i, int child_line) const {
    return {absl::StrCat(path, "[", i, "]"), child_line > 0 ? child_line : line};
  }
};

int LineOf(const YAML::Node& node) {
  const YAML::Mark mark = node.Mark();
  return mark.is_null() ? 0 : mark.line + 1;
}

absl::Status Error(const Where& where, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(where.Str(), ": ", problem));
}

// How a node looks, for "expected X, got Y" messages.
std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar:
      return absl::StrCat("'", node.Scalar(), "'");
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a mapping";
    default:
      return "nothing";
  }
}

absl::Status ParseInt(const YAML::Node& node, const Where& where, int64_t* out) {
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), out)) {
    return Error(where, absl::StrCat("expected an integer, got ", Describe(node)));
  }
  return absl::OkStatus();
}

absl::Status ParseUint(const YAML::Node& node, const Where& where, uint64_t* out) {
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), out)) {
    return Error(where, absl::StrCat("expected a non-negative integer, got ", Describe(node)));
  }
  return absl::OkStatus();
}

absl::Status ParseDouble(const YAML::Node& node, const Where& where, double* out) {
  if (!node.IsScalar() || !absl::SimpleAtod(node.Scalar(), out) || !std::isfinite(*out)) {
    return Error(where, absl::StrCat("expected a number, got ", Describe(node)));
  }
  return absl::OkStatus();
}

absl::Status ParseBool(const YAML::Node& node, const Where& where, bool* out) {
  // The YAML 1.1 spellings that yaml-cpp itself accepts.
  if (node.IsScalar()) {
    const std::string v = absl::AsciiStrToLower(node.Scalar());
    if (v == "true" || v == "yes" || v == "on" || v == "y") {
      *out = true;
      return absl::OkStatus();
    }
    if (v == "false" || v == "no" || v == "off" || v == "n") {
      *out = false;
      return absl::OkStatus();
    }
  }
  return Error(where, absl::StrCat("expected true or false, got ", Describe(node)));
}

// `key:` with no value reads as the empty string.
absl::Status ParseString(const YAML::Node& node, const Where& where, std::string* out) {
  if (node.IsNull()) {
    out->clear();
    return absl::OkStatus();
  }
  if (!node.IsScalar())
    return Error(where, absl::StrCat("expected a string, got ", Describe(node)));
  *out = node.Scalar();
  return absl::OkStatus();
}

absl::Status ParseStringList(const YAML::Node& node, const Where& where,
                             std::vector<std::string>* out, std::vector<Where>* wheres) {
  out->clear();
  if (node.IsNull()) return absl::OkStatus();
  if (!node.IsSequence()) {
    return Error(where, absl::StrCat("expected a list of strings, got ", Describe(node)));
  }
  for (size_t i = 0; i < node.size(); ++i) {
    const Where item = where.Index(i, LineOf(node[i]));
    if (!node[i].IsScalar()) {
      return Error(item, absl::StrCat("expected a string, got ", Describe(node[i])));
    }
    out->push_back(node[i].Scalar());
    wheres->push_back(item);
  }
  return absl::OkStatus();
}

using FieldParser = std::function<absl::Status(const YAML::Node& value, const Where& where)>;
struct Field {
  const char* name;
  FieldParser parse;
};

// Parses a mapping whose keys must all be among `fields`; a missing or null mapping keeps the
// defaults. Unknown and repeated keys are errors: a typo must not silently fall back to a default.
absl::Status ParseMap(const YAML::Node& node, const Where& where,
                      std::initializer_list<Field> fields) {
  if (node.IsNull()) return absl::OkStatus();
  if (!node.IsMap()) {
    const Where at{where.path, where.line > 0 ? where.line : LineOf(node)};
    return Error(at, absl::StrCat("expected a mapping, got ", Describe(node)));
  }
  std::set<std::string> seen;
  for (auto it = node.begin(); it != node.end(); ++it) {
    const int key_line = LineOf(it->first);
    if (!it->first.IsScalar()) {
      return Error(where.Child("?", key_line), "keys must be strings");
    }
    const std::string key = it->first.Scalar();
    const Where child = where.Child(key, key_line);
    auto field =
        std::find_if(fields.begin(), fields.end(), [&](const Field& f) { return key == f.name; });
    if (field == fields.end()) return Error(child, "unknown key");
    if (!seen.insert(key).second) return Error(child, "duplicate key");
    // A value's own mark is where its text starts; null values have none, so keep the key's.
    const int value_line = LineOf(it->second);
    LORAPLEX_RETURN_IF_ERROR(
        field->parse(it->second, where.Child(key, value_line > 0 ? value_line : key_line)));
  }
  return absl::OkStatus();
}

// Field parsers that also check a range.
FieldParser Int(int64_t* out, int64_t min) {
  return [out, min](const YAML::Node& n, const Where& w) -> absl::Status {
    LORAPLEX_RETURN_IF_ERROR(ParseInt(n, w, out));
    if (*out < min) {
      return Error(w, absl::StrCat(min == 1 ? "must be > 0" : absl::StrCat("must be >= ", min),
                                   ", got ", *out));
    }
    return absl::OkStatus();
  };
}

FieldParser Enum(std::string* out, std::vector<std::string> allowed) {
  return [out, allowed = std::move(allowed)](const YAML::Node& n, const Where& w) -> absl::Status {
    LORAPLEX_RETURN_IF_ERROR(ParseString(n, w, out));
    if (std::find(allowed.begin(), allowed.end(), *out) == allowed.end()) {
      return Error(
          w, absl::StrCat("must be one of ", absl::StrJoin(allowed, ", "), "; got '", *out, "'"));
    }
    return absl::OkStatus();
  };
}

FieldParser String(std::string* out) {
  return [out](const YAML::Node& n, const Where& w) { return ParseString(n, w, out); };
}

FieldParser Bool(bool* out) {
  return [out](const YAML::Node& n, const Where& w) { return ParseBool(n, w, out); };
}

// "host:port" with a non-empty host and a port in [0, 65535] (0 asks for any free port).
bool IsHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) return false;
  const std::string port = address.substr(colon + 1);
  if (!std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return false;
  }
  int value = 0;
  return port.size() <= 5 && absl::SimpleAtoi(port, &value) && value <= 65535;
}

FieldParser Address(std::string* out, bool may_be_empty) {
  return [out, may_be_empty](const YAML::Node& n, const Where& w) -> absl::Status {
    LORAPLEX_RETURN_IF_ERROR(ParseString(n, w, out));
    if (out->empty() && may_be_empty) return absl::OkStatus();
    if (!IsHostPort(*out)) return Error(w, absl::StrCat("must be host:port, got '", *out, "'"));
    return absl::OkStatus();
  };
}

bool IsValidAdapterName(const std::string& name) {
  if (name.empty() || name.size() > 128) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
  });
}

std::string Resolve(const std::string& path, const std::string& base_dir) {
  namespace fs = std::filesystem;
  if (path.empty() || base_dir.empty() || fs::path(path).is_absolute()) return path;
  return (fs::path(base_dir) / path).lexically_normal().string();
}

absl::Status ParseAdapters(const YAML::Node& node, const Where& where, const LoraConfig& lora,
                           std::vector<AdapterEntry>* out) {
  out->clear();
  if (node.IsNull()) return absl::OkStatus();
  if (!node.IsSequence())
    return Error(where, absl::StrCat("expected a list, got ", Describe(node)));
  std::map<std::string, size_t> index_by_name;
  int64_t pinned = 0;
  for (size_t i = 0; i < node.size(); ++i) {
    const YAML::Node item = node[i];
    const Where item_where = where.Index(i, LineOf(item));
    AdapterEntry entry;
    Where name_where = item_where, path_where = item_where, pinned_where = item_where;
    bool has_name = false, has_path = false;
    LORAPLEX_RETURN_IF_ERROR(ParseMap(item, item_where,
                                      {{"name",
                                        [&](const YAML::Node& n, const Where& w) {
                                          has_name = true;
                                          name_where = w;
                                          return ParseString(n, w, &entry.name);
                                        }},
                                       {"path",
                                        [&](const YAML::Node& n, const Where& w) {
                                          has_path = true;
                                          path_where = w;
                                          return ParseString(n, w, &entry.path);
                                        }},
                                       {"pinned", [&](const YAML::Node& n, const Where& w) {
                                          pinned_where = w;
                                          return ParseBool(n, w, &entry.pinned);
                                        }}}));
    if (!item.IsMap()) return Error(item_where, "expected a mapping with name and path");
    if (!has_name) return Error(item_where, "missing 'name'");
    if (!has_path) return Error(item_where, "missing 'path'");
    if (!IsValidAdapterName(entry.name)) {
      return Error(name_where, absl::StrCat("adapter name must match [A-Za-z0-9._-]{1,128}, got '",
                                            entry.name, "'"));
    }
    if (!index_by_name.emplace(entry.name, i).second) {
      return Error(name_where, absl::StrCat("duplicate adapter name '", entry.name, "'"));
    }
    if (entry.path.empty()) return Error(path_where, "must not be empty");
    if (entry.pinned && ++pinned >= lora.adapter_slots) {
      // Pinned adapters never leave their slot; at least one slot must stay free for the rest.
      return Error(pinned_where, absl::StrCat(pinned, " pinned adapters leave no free slot of ",
                                              "lora.adapter_slots ", lora.adapter_slots));
    }
    out->push_back(std::move(entry));
  }
  if (static_cast<int64_t>(out->size()) > lora.max_adapters) {
    return Error(
        where, absl::StrCat(out->size(), " adapters exceed lora.max_adapters ", lora.max_adapters));
  }
  return absl::OkStatus();
}

absl::Status ParseLora(const YAML::Node& node, const Where& where, LoraConfig* lora) {
  static const std::vector<std::string> kModules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};
  return ParseMap(
      node, where,
      {{"max_rank",
        [lora](const YAML::Node& n, const Where& w) -> absl::Status {
          LORAPLEX_RETURN_IF_ERROR(ParseInt(n, w, &lora->max_rank));
          if (lora->max_rank < 1 || lora->max_rank > 1024) {
            return Error(w, absl::StrCat("must be in [1, 1024], got ", lora->max_rank));
          }
          return absl::OkStatus();
        }},
       {"target_modules",
        [lora](const YAML::Node& n, const Where& w) -> absl::Status {
          std::vector<Where> wheres;
          LORAPLEX_RETURN_IF_ERROR(ParseStringList(n, w, &lora->target_modules, &wheres));
          if (lora->target_modules.empty()) return Error(w, "must name at least one module");
          std::set<std::string> seen;
          for (size_t i = 0; i < lora->target_modules.size(); ++i) {
            const std::string& m = lora->target_modules[i];
            if (std::find(kModules.begin(), kModules.end(), m) == kModules.end()) {
              return Error(wheres[i], absl::StrCat("unsupported module '", m, "'; supported: ",
                                                   absl::StrJoin(kModules, ", ")));
            }
            if (!seen.insert(m).second) {
              return Error(wheres[i], absl::StrCat("duplicate module '", m, "'"));
            }
          }
          return absl::OkStatus();
        }},
       {"adapter_slots", Int(&lora->adapter_slots, 1)},
       {"max_adapters", Int(&lora->max_adapters, 1)},
       {"host_cache_mib",
        [lora](const YAML::Node& n, const Where& w) -> absl::Status {
          LORAPLEX_RETURN_IF_ERROR(ParseInt(n, w, &lora->host_cache_mib));
          if (lora->host_cache_mib < 0 || lora->host_cache_mib > (int64_t{1} << 30)) {
            return Error(w, absl::StrCat("must be in [0, 1073741824] (MiB; 0: no limit), got ",
                                         lora->host_cache_mib));
          }
          return absl::OkStatus();
        }},
       {"allowed_roots", [lora](const YAML::Node& n, const Where& w) -> absl::Status {
          std::vector<Where> wheres;
          LORAPLEX_RETURN_IF_ERROR(ParseStringList(n, w, &lora->allowed_roots, &wheres));
          for (size_t i = 0; i < wheres.size(); ++i) {
            if (lora->allowed_roots[i].empty()) return Error(wheres[i], "must not be empty");
          }
          return absl::OkStatus();
        }}});
}

absl::StatusOr<Config> ParseRoot(const YAML::Node& root, const std::string& base_dir) {
  Config config;
  const Where top;
  YAML::Node adapters_node;
  Where adapters_where{"adapters", 0};
  int model_line = 0;
  LORAPLEX_RETURN_IF_ERROR(ParseMap(
      root, top,
      {{"server",
        [&](const YAML::Node& n, const Where& w) {
          ServerConfig& s = config.server;
          return ParseMap(
              n, w,
              {{"address", Address(&s.address, false)},
               {"max_message_bytes", Int(&s.max_message_bytes, 1)},
               {"max_queued_requests", Int(&s.max_queued_requests, 1)},
               {"max_prompt_tokens", Int(&s.max_prompt_tokens, 0)},
               {"max_new_tokens_limit", Int(&s.max_new_tokens_limit, 1)},
               {"enable_reflection", Bool(&s.enable_reflection)},
               {"metrics_address", Address(&s.metrics_address, true)},
               {"drain_timeout_s", [&s](const YAML::Node& v, const Where& vw) -> absl::Status {
                  LORAPLEX_RETURN_IF_ERROR(ParseDouble(v, vw, &s.drain_timeout_s));
                  if (s.drain_timeout_s < 0) {
                    return Error(vw, absl::StrCat("must be >= 0, got ", s.drain_timeout_s));
                  }
                  return absl::OkStatus();
                }}});
        }},
       {"model",
        [&](const YAML::Node& n, const Where& w) {
          ModelConfig& m = config.model;
          model_line = w.line;
          return ParseMap(n, w,
                          {{"path", String(&m.path)},
                           {"tokenizer_path", String(&m.tokenizer_path)},
                           {"dtype", Enum(&m.dtype, {"auto", "float32", "bfloat16", "float16"})},
                           {"max_seq_len", Int(&m.max_seq_len, 0)}});
        }},
       {"engine",
        [&](const YAML::Node& n, const Where& w) {
          EngineConfig& e = config.engine;
          return ParseMap(
              n, w,
              {{"executor", Enum(&e.executor, {"cpu", "cuda", "auto"})},
               {"kv_cache_tokens", Int(&e.kv_cache_tokens, 0)},
               {"kv_block_size",
                [&e](const YAML::Node& v, const Where& vw) -> absl::Status {
                  LORAPLEX_RETURN_IF_ERROR(ParseInt(v, vw, &e.kv_block_size));
                  const int64_t b = e.kv_block_size;
                  if (b < 1 || b > 256 || (b & (b - 1)) != 0) {
                    return Error(vw, absl::StrCat("must be a power of two in [1, 256], got ", b));
                  }
                  return absl::OkStatus();
                }},
               {"max_batch_tokens", Int(&e.max_batch_tokens, 1)},
               {"max_running_seqs", Int(&e.max_running_seqs, 1)},
               {"default_seed", [&e](const YAML::Node& v, const Where& vw) {
                  return ParseUint(v, vw, &e.default_seed);
                }},
               {"cuda_graphs", Bool(&e.cuda_graphs)}});
        }},
       {"lora", [&](const YAML::Node& n, const Where& w) { return ParseLora(n, w, &config.lora); }},
       // Adapters are checked after the whole document: their limits live in `lora`, which may
       // come later in the file.
       {"adapters",
        [&](const YAML::Node& n, const Where& w) {
          adapters_node = n;
          adapters_where = w;
          return absl::OkStatus();
        }},
       {"logging", [&](const YAML::Node& n, const Where& w) {
          LoggingConfig& l = config.logging;
          return ParseMap(n, w,
                          {{"level", Enum(&l.level, {"trace", "debug", "info", "warn", "error"})},
                           {"format", Enum(&l.format, {"text", "json"})}});
        }}}));
  LORAPLEX_RETURN_IF_ERROR(
      ParseAdapters(adapters_node, adapters_where, config.lora, &config.adapters));
  if (config.model.path.empty()) return Error({"model.path", model_line}, "is required");

  config.model.path = Resolve(config.model.path, base_dir);
  config.model.tokenizer_path = Resolve(config.model.tokenizer_path, base_dir);
  for (AdapterEntry& a : config.adapters) a.path = Resolve(a.path, base_dir);
  for (std::string& root_dir : config.lora.allowed_roots) root_dir = Resolve(root_dir, base_dir);
  return config;
}

}  // namespace

absl::StatusOr<Config> ParseConfig(const std::string& yaml_text, const std::string& base_dir) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return Error({kDocument, e.mark.is_null() ? 0 : e.mark.line + 1}, e.msg);
  }
  // yaml-cpp throws from node accessors on malformed trees; keep that inside this file.
  try {
    return ParseRoot(root, base_dir);
  } catch (const YAML::Exception& e) {
    return Error({kDocument, e.mark.is_null() ? 0 : e.mark.line + 1}, e.msg);
  }
}

absl::StatusOr<Config> LoadConfigFile(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec))
    return absl::NotFoundError(absl::StrCat("config file ", path, " not found"));
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("config file ", path, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad())
    return absl::InvalidArgumentError(absl::StrCat("config file ", path, ": read failed"));
  const fs::path dir = fs::absolute(path, ec).parent_path();
  auto config = ParseConfig(text.str(), dir.string());
  if (!config.ok()) return Annotate(config.status(), path);
  return config;
}

}  // namespace loraplex::config
