// calibrl/errors.hpp — part of calibrl.hpp (include <calibrl.hpp>).
// Errors (calibrl::Error, check) and the library and ABI versions.

#ifndef CALIBRL_ERRORS_HPP
#define CALIBRL_ERRORS_HPP

#include "prelude.hpp"

namespace calibrl {

/// A failed calibrl call: the status and the library's message (names the argument at fault).
class Error : public std::runtime_error {
 public:
  Error(calibrl_status status, const std::string& message)
      : std::runtime_error(message + " [" + status_name_of(status) + "]"),
        status_(status),
        message_(message) {}

  /// The status the C function returned.
  [[nodiscard]] calibrl_status status() const noexcept { return status_; }
  /// The library's message alone (what() appends the status name).
  [[nodiscard]] const std::string& message() const noexcept { return message_; }
  /// E.g. "CALIBRL_STATUS_SHAPE_MISMATCH".
  [[nodiscard]] std::string status_name() const { return status_name_of(status_); }

 private:
  static std::string status_name_of(calibrl_status s) {
    const char* name = calibrl_status_name(s);
    return name != nullptr ? name : "CALIBRL_STATUS_?";
  }
  calibrl_status status_;
  std::string message_;
};

/// The name of a status, e.g. "CALIBRL_STATUS_SHAPE_MISMATCH".
[[nodiscard]] inline std::string_view status_name(calibrl_status status) {
  const char* name = calibrl_status_name(status);
  return name != nullptr ? name : "CALIBRL_STATUS_?";
}

/// Throws calibrl::Error when `status` is not CALIBRL_STATUS_OK. The message is copied at once:
/// the library's pointer is only valid until the next calibrl call on this thread.
inline void check(calibrl_status status) {
  if (status != CALIBRL_STATUS_OK) {
    const char* msg = calibrl_last_error_message();
    throw Error(status, msg != nullptr ? std::string(msg) : std::string());
  }
}

// ---------------------------------------------------------------------------------------------
// Versions

/// The library's version string, e.g. "0.1.0".
[[nodiscard]] inline std::string_view version() { return calibrl_version(); }

/// The ABI version of the loaded library.
[[nodiscard]] inline std::uint32_t abi_version() { return calibrl_abi_version(); }

/// True when the loaded library implements the ABI this header was generated for.
[[nodiscard]] inline bool abi_compatible() { return calibrl_abi_version() == CALIBRL_ABI_VERSION; }

/// Throws calibrl::Error (CALIBRL_STATUS_INVALID_ARGUMENT) when the loaded library's ABI
/// differs from the header's. Call it once before anything else.
inline void check_abi() {
  if (!abi_compatible()) {
    throw Error(CALIBRL_STATUS_INVALID_ARGUMENT,
                "ABI mismatch: calibrl.h describes ABI " + std::to_string(CALIBRL_ABI_VERSION) +
                    " but the loaded libcalibrl implements ABI " +
                    std::to_string(calibrl_abi_version()) + " (version " +
                    std::string(calibrl_version()) + ")");
  }
}

}  // namespace calibrl

#endif  // CALIBRL_ERRORS_HPP
