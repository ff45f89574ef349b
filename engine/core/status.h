// Status helpers shared by every loraplex library: early-return macros over absl::Status.
// Header-only. Thread-safe (no state).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LORAPLEX_CONCAT_INNER_(a, b) a##b
#define LORAPLEX_CONCAT_(a, b) LORAPLEX_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define LORAPLEX_RETURN_IF_ERROR(expr)                 \
  do {                                                 \
    ::absl::Status loraplex_status_ = (expr);          \
    if (!loraplex_status_.ok()) return loraplex_status_; \
  } while (0)

// `LORAPLEX_ASSIGN_OR_RETURN(auto x, StatusOrExpr())`: declares/assigns `lhs` from the value,
// or returns the error.
#define LORAPLEX_ASSIGN_OR_RETURN(lhs, expr) \
  LORAPLEX_ASSIGN_OR_RETURN_IMPL_(LORAPLEX_CONCAT_(loraplex_statusor_, __LINE__), lhs, expr)
#define LORAPLEX_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                    \
  if (!tmp.ok()) return std::move(tmp).status();        \
  lhs = std::move(tmp).value()

// Prepends context to an error: `return Annotate(status, "adapter 'x'")` gives
// "adapter 'x': <original message>" with the original code.
namespace loraplex {
inline absl::Status Annotate(const absl::Status& status, std::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), std::string(context) + ": " + std::string(status.message()));
}
}  // namespace loraplex
