// calibrl/config.hpp — part of calibrl.hpp (include <calibrl.hpp>).
// calibrl::Config: an owned configuration handle.

#ifndef CALIBRL_CONFIG_HPP
#define CALIBRL_CONFIG_HPP

#include "prelude.hpp"
#include "errors.hpp"

namespace calibrl {

/// An owned configuration handle (move-only).
class Config {
 public:
  /// The `paper` preset.
  Config() : Config(from_json_ptr(nullptr)) {}

  /// A configuration from JSON: `{"preset": "reference", "lambda": 0.2, ...}`.
  [[nodiscard]] static Config from_json(const std::string& json) {
    return Config(from_json_ptr(json.c_str()));
  }

  /// A named preset of SPEC §5: "paper", "reference" or "grpo".
  [[nodiscard]] static Config preset(std::string_view name) {
    std::string json = "{\"preset\":\"";
    for (char c : name) {
      if (c == '"' || c == '\\') json += '\\';
      json += c;
    }
    json += "\"}";
    return from_json(json);
  }

  /// Takes ownership of a handle from calibrl_config_new.
  explicit Config(calibrl_config* raw) noexcept : ptr_(raw) {}

  /// The full configuration as JSON (every key, presets expanded).
  [[nodiscard]] std::string to_json() const {
    std::size_t len = 0;
    calibrl_status s = calibrl_config_to_json(capi(), nullptr, 0, &len);
    if (s != CALIBRL_STATUS_BUFFER_TOO_SMALL) check(s);
    std::string out(len + 1, '\0');
    check(calibrl_config_to_json(capi(), out.data(), out.size(), &len));
    out.resize(len);
    return out;
  }

  /// The raw handle, still owned by this object.
  [[nodiscard]] const calibrl_config* capi() const noexcept { return ptr_.get(); }
  [[nodiscard]] calibrl_config* capi() noexcept { return ptr_.get(); }
  /// Gives up ownership; the caller frees it with calibrl_config_free.
  [[nodiscard]] calibrl_config* release() noexcept { return ptr_.release(); }

 private:
  static calibrl_config* from_json_ptr(const char* json) {
    calibrl_config* raw = nullptr;
    check(calibrl_config_new(json, &raw));
    return raw;
  }
  struct Deleter {
    void operator()(calibrl_config* p) const noexcept { calibrl_config_free(p); }
  };
  std::unique_ptr<calibrl_config, Deleter> ptr_;
};

}  // namespace calibrl

#endif  // CALIBRL_CONFIG_HPP
