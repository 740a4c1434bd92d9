// calibrl.hpp — header-only C++17 wrapper over the calibrl C ABI (include/calibrl.h).
//
// Link only libcalibrl.so (or libcalibrl.a); this header adds no symbols of its own.
//
//   calibrl::Config cfg = calibrl::Config::preset("paper");
//   calibrl_metrics m = calibrl::loss(cfg, calibrl::LossArgs{}
//       .logprobs(lp, offsets).old_logprobs(old).advantages(adv).weights(w).signs(sign)
//       .expert(expert_lp, expert_offsets, expert_index).grad_logprobs(grad));
//
// Conventions:
//  - every failing C call throws calibrl::Error, carrying the status and the library's message
//    (which names the offending argument);
//  - calibrl::TensorView describes a caller buffer as a DLPack DLTensor without copying it; the
//    buffer must outlive every call that uses the view;
//  - handles (calibrl::Config, calibrl::Plan) are RAII and move-only; capi() exposes the raw C
//    pointer;
//  - the scheduler (calibrl::Plan, SPEC §7) returns its data as std::vectors: the wrapper does
//    the ABI's size query + read for you.
//
// PyTorch: when <ATen/ATen.h> is reachable (or CALIBRL_WITH_TORCH is defined) TensorView also
// wraps an at::Tensor (CPU or CUDA, any strides) in place. Define CALIBRL_NO_TORCH to opt out.

#ifndef CALIBRL_HPP
#define CALIBRL_HPP

#if !defined(CALIBRL_NO_TORCH) && !defined(CALIBRL_WITH_TORCH) && defined(__has_include)
#if __has_include(<ATen/ATen.h>)
#define CALIBRL_WITH_TORCH 1
#endif
#endif

#if defined(CALIBRL_WITH_TORCH) && !defined(CALIBRL_NO_TORCH)
// ATen ships dlpack.h; it must come before calibrl.h so that both agree on one DLTensor.
#include <ATen/ATen.h>
#include <ATen/dlpack.h>
#define CALIBRL_HPP_TORCH 1
#endif

#include <calibrl.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace calibrl {

// ---------------------------------------------------------------------------------------------
// Errors

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

// ---------------------------------------------------------------------------------------------
// Configuration

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

// ---------------------------------------------------------------------------------------------
// Tensor views

/// A DLPack device.
struct Device {
  std::int32_t type = 1;  // kDLCPU
  std::int32_t id = 0;

  [[nodiscard]] static constexpr Device cpu() noexcept { return {1, 0}; }
  [[nodiscard]] static constexpr Device cuda(std::int32_t id = 0) noexcept { return {2, id}; }
  [[nodiscard]] static constexpr Device cuda_host() noexcept { return {3, 0}; }
  [[nodiscard]] static constexpr Device cuda_managed(std::int32_t id = 0) noexcept {
    return {13, id};
  }

  [[nodiscard]] DLDevice dl() const noexcept {
    DLDevice d{};
    d.device_type = static_cast<decltype(d.device_type)>(type);  // int32_t or DLDeviceType
    d.device_id = id;
    return d;
  }
};

/// DLPack data types (codes: 0 int, 1 uint, 2 float, 4 bfloat, 6 bool).
namespace dtype {
[[nodiscard]] constexpr DLDataType make(std::uint8_t code, std::uint8_t bits) noexcept {
  return DLDataType{code, bits, 1};
}
[[nodiscard]] constexpr DLDataType float16() noexcept { return make(2, 16); }
[[nodiscard]] constexpr DLDataType bfloat16() noexcept { return make(4, 16); }
[[nodiscard]] constexpr DLDataType float32() noexcept { return make(2, 32); }
[[nodiscard]] constexpr DLDataType float64() noexcept { return make(2, 64); }
[[nodiscard]] constexpr DLDataType int32() noexcept { return make(0, 32); }
[[nodiscard]] constexpr DLDataType int64() noexcept { return make(0, 64); }
[[nodiscard]] constexpr DLDataType uint8() noexcept { return make(1, 8); }
[[nodiscard]] constexpr DLDataType boolean() noexcept { return make(6, 8); }
}  // namespace dtype

namespace detail {
template <class T, class = void>
struct dtype_of {};  // no DLPack type for T
template <> struct dtype_of<float> { static constexpr DLDataType value = dtype::float32(); };
template <> struct dtype_of<double> { static constexpr DLDataType value = dtype::float64(); };
template <> struct dtype_of<std::int32_t> { static constexpr DLDataType value = dtype::int32(); };
template <> struct dtype_of<std::int64_t> { static constexpr DLDataType value = dtype::int64(); };
template <> struct dtype_of<std::uint8_t> { static constexpr DLDataType value = dtype::uint8(); };
template <> struct dtype_of<bool> { static constexpr DLDataType value = dtype::boolean(); };

template <class T, class = void>
struct has_dtype : std::false_type {};
template <class T>
struct has_dtype<T, std::void_t<decltype(dtype_of<T>::value)>> : std::true_type {};

// A contiguous container of a DLPack-typed element: std::vector, std::array, std::span, ...
template <class C, class = void>
struct contiguous_elem {
  static constexpr bool ok = false;
};
template <class C>
struct contiguous_elem<C, std::void_t<decltype(std::declval<C&>().data()),
                                      decltype(std::declval<C&>().size())>> {
  using ptr = decltype(std::declval<C&>().data());
  using elem = std::remove_pointer_t<ptr>;
  static constexpr bool ok =
      std::is_pointer_v<ptr> && has_dtype<std::remove_cv_t<elem>>::value;
};
}  // namespace detail

/// The DLPack data type of a C++ element type (float, double, int32_t, int64_t, uint8_t, bool).
template <class T>
[[nodiscard]] constexpr DLDataType dtype_of() noexcept {
  return detail::dtype_of<std::remove_cv_t<T>>::value;
}

/// A tensor shape (or strides, in elements): up to TensorView::kMaxDims extents.
class Dims {
 public:
  static constexpr std::size_t kMax = 8;
  Dims() = default;
  Dims(std::initializer_list<std::int64_t> d) { assign(d.begin(), d.size()); }
  Dims(const std::vector<std::int64_t>& d) { assign(d.data(), d.size()); }  // NOLINT(implicit)
  Dims(const std::int64_t* d, std::size_t n) { assign(d, n); }

  [[nodiscard]] std::size_t size() const noexcept { return n_; }
  [[nodiscard]] bool empty() const noexcept { return n_ == 0; }
  [[nodiscard]] const std::int64_t* data() const noexcept { return v_.data(); }
  [[nodiscard]] std::int64_t operator[](std::size_t i) const noexcept { return v_[i]; }
  [[nodiscard]] std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (std::size_t i = 0; i < n_; ++i) n *= v_[i];
    return n;
  }

 private:
  void assign(const std::int64_t* d, std::size_t n) {
    if (n > kMax) {
      throw Error(CALIBRL_STATUS_SHAPE_MISMATCH,
                  std::to_string(n) + " dimensions; calibrl::TensorView holds at most " +
                      std::to_string(kMax));
    }
    for (std::size_t i = 0; i < n; ++i) v_[i] = d[i];
    n_ = n;
  }
  std::array<std::int64_t, kMax> v_{};
  std::size_t n_ = 0;
};

/// A borrowed caller buffer described as a DLPack DLTensor. Never copies or owns the data; the
/// buffer must outlive every call the view is passed to. Copying a view copies the descriptor
/// (shape and strides are stored inline), not the data.
class TensorView {
 public:
  static constexpr std::size_t kMaxDims = Dims::kMax;

  /// Raw buffer: pointer, dtype, shape, device; strides in elements (empty = row-major).
  TensorView(void* data, DLDataType dtype, Dims shape, Device device = Device::cpu(),
             Dims strides = {}, std::uint64_t byte_offset = 0)
      : shape_(shape), strides_(strides) {
    if (!strides_.empty() && strides_.size() != shape_.size()) {
      throw Error(CALIBRL_STATUS_SHAPE_MISMATCH,
                  "TensorView: " + std::to_string(strides_.size()) + " strides for " +
                      std::to_string(shape_.size()) + " dimensions");
    }
    dl_.data = data;
    dl_.device = device.dl();
    dl_.ndim = static_cast<std::int32_t>(shape_.size());
    dl_.dtype = dtype;
    dl_.byte_offset = byte_offset;
    repoint();
  }
  /// Read-only raw buffer (the view refuses to be used as an output).
  TensorView(const void* data, DLDataType dtype, Dims shape, Device device = Device::cpu(),
             Dims strides = {}, std::uint64_t byte_offset = 0)
      : TensorView(const_cast<void*>(data), dtype, shape, device, strides, byte_offset) {
    read_only_ = true;
  }

  /// Typed pointer: the dtype follows T (float, double, int32_t, int64_t, uint8_t, bool).
  template <class T, std::enable_if_t<detail::has_dtype<std::remove_cv_t<T>>::value, int> = 0>
  TensorView(T* data, Dims shape, Device device = Device::cpu(), Dims strides = {})
      : TensorView(const_cast<std::remove_cv_t<T>*>(data), dtype_of<T>(), shape, device,
                   strides) {
    read_only_ = std::is_const_v<T>;
  }

  /// A contiguous host container (std::vector, std::array, std::span...) as a 1-D tensor, or
  /// reshaped to `shape` (its element count must equal the container's size).
  template <class C, std::enable_if_t<detail::contiguous_elem<C>::ok &&
                                          !std::is_same_v<std::remove_cv_t<C>, TensorView>,
                                      int> = 0>
  TensorView(C& c)  // NOLINT(google-explicit-constructor): views convert implicitly
      : TensorView(c.data(), Dims{static_cast<std::int64_t>(c.size())}) {}
  template <class C, std::enable_if_t<detail::contiguous_elem<C>::ok &&
                                          !std::is_same_v<std::remove_cv_t<C>, TensorView>,
                                      int> = 0>
  TensorView(C& c, Dims shape) : TensorView(c.data(), shape) {
    if (shape.numel() != static_cast<std::int64_t>(c.size())) {
      throw Error(CALIBRL_STATUS_SHAPE_MISMATCH,
                  "TensorView: shape holds " + std::to_string(shape.numel()) +
                      " elements but the container has " + std::to_string(c.size()));
    }
  }
  // A temporary container would dangle: refuse it at compile time.
  template <class C, std::enable_if_t<detail::contiguous_elem<C>::ok &&
                                          !std::is_lvalue_reference_v<C> &&
                                          !std::is_same_v<std::remove_cv_t<C>, TensorView>,
                                      int> = 0>
  TensorView(C&& c) = delete;

#if defined(CALIBRL_HPP_TORCH)
  /// An at::Tensor in place (CPU or CUDA, its own strides and dtype). The tensor's storage must
  /// outlive the calls; a const tensor still allows writes through the view (as ATen does).
  TensorView(const at::Tensor& t)  // NOLINT(google-explicit-constructor)
      : TensorView(t.data_ptr(), torch_dtype(t.scalar_type()),
                   Dims(t.sizes().data(), t.sizes().size()), torch_device(t.device()),
                   Dims(t.strides().data(), t.strides().size())) {}
#endif

  TensorView(const TensorView& o) noexcept { *this = o; }
  TensorView& operator=(const TensorView& o) noexcept {
    if (this != &o) {
      shape_ = o.shape_;
      strides_ = o.strides_;
      dl_ = o.dl_;
      read_only_ = o.read_only_;
      repoint();
    }
    return *this;
  }
  ~TensorView() = default;

  /// The descriptor, valid while this view lives. The library never modifies a descriptor,
  /// only the memory of output tensors, hence the non-const pointer from a const view.
  [[nodiscard]] DLTensor* dl() const noexcept { return &dl_; }
  [[nodiscard]] const Dims& shape() const noexcept { return shape_; }
  [[nodiscard]] std::int64_t numel() const noexcept { return shape_.numel(); }
  [[nodiscard]] bool read_only() const noexcept { return read_only_; }

 private:
  void repoint() noexcept {
    dl_.shape = const_cast<std::int64_t*>(shape_.data());
    dl_.strides = strides_.empty() ? nullptr : const_cast<std::int64_t*>(strides_.data());
  }
#if defined(CALIBRL_HPP_TORCH)
  static DLDataType torch_dtype(at::ScalarType s) {
    switch (s) {
      case at::kFloat: return dtype::float32();
      case at::kDouble: return dtype::float64();
      case at::kHalf: return dtype::float16();
      case at::kBFloat16: return dtype::bfloat16();
      case at::kInt: return dtype::int32();
      case at::kLong: return dtype::int64();
      case at::kByte: return dtype::uint8();
      case at::kBool: return dtype::boolean();
      default:
        throw Error(CALIBRL_STATUS_DTYPE_MISMATCH,
                    std::string("TensorView: at::Tensor of dtype ") + c10::toString(s) +
                        " has no calibrl equivalent");
    }
  }
  static Device torch_device(const c10::Device& d) {
    if (d.is_cpu()) return Device::cpu();
    if (d.is_cuda()) return Device::cuda(d.has_index() ? d.index() : 0);
    throw Error(CALIBRL_STATUS_DEVICE_MISMATCH,
                "TensorView: at::Tensor on device " + d.str() + " (calibrl takes CPU or CUDA)");
  }
#endif

  Dims shape_;
  Dims strides_;
  mutable DLTensor dl_{};
  bool read_only_ = false;
};

/// An optional tensor argument (std::nullopt = absent).
using OptionalView = std::optional<TensorView>;

namespace detail {
inline const DLTensor* in(const OptionalView& v) noexcept { return v ? v->dl() : nullptr; }
inline DLTensor* out(const TensorView& v, const char* name) {
  if (v.read_only()) {
    throw Error(CALIBRL_STATUS_INVALID_ARGUMENT,
                std::string("`") + name + "`: output view wraps read-only (const) memory");
  }
  return v.dl();
}
inline DLTensor* out(const OptionalView& v, const char* name) {
  return v ? out(*v, name) : nullptr;
}
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Group advantages (SPEC §3)

/// Arguments of calibrl::group_advantages, set by name (a builder).
class AdvantageArgs {
 public:
  /// Inputs: `[B]` float rewards, `[B]` int32/int64 group ids in [0, num_groups).
  AdvantageArgs& rewards(TensorView v) { rewards_ = v; return *this; }
  AdvantageArgs& group_ids(TensorView v, std::int64_t num_groups) {
    group_ids_ = v;
    num_groups_ = num_groups;
    return *this;
  }
  /// Optional `[B]` correctness (non-zero = correct); otherwise correct iff reward > τ.
  AdvantageArgs& correct(TensorView v) { correct_ = v; return *this; }
  /// Optional `[B]` expert rows (excluded from the group statistics).
  AdvantageArgs& is_expert(TensorView v) { is_expert_ = v; return *this; }
  /// Outputs, each `[B]` float.
  AdvantageArgs& advantages(TensorView v) { advantages_ = v; return *this; }
  AdvantageArgs& weights(TensorView v) { weights_ = v; return *this; }
  AdvantageArgs& signs(TensorView v) { signs_ = v; return *this; }

  /// The C struct, pointing into this object: valid while it lives, unchanged.
  [[nodiscard]] calibrl_advantage_args capi() const {
    calibrl_advantage_args a{};
    a.rewards = detail::in(rewards_);
    a.group_ids = detail::in(group_ids_);
    a.num_groups = num_groups_;
    a.correct = detail::in(correct_);
    a.is_expert = detail::in(is_expert_);
    a.advantages = detail::out(advantages_, "advantages");
    a.weights = detail::out(weights_, "weights");
    a.signs = detail::out(signs_, "signs");
    return a;
  }

 private:
  OptionalView rewards_, group_ids_, correct_, is_expert_, advantages_, weights_, signs_;
  std::int64_t num_groups_ = 0;
};

/// Group-normalised advantages, rarity weights |A| and signs into the caller's buffers.
inline void group_advantages(const Config& cfg, const AdvantageArgs& args,
                             calibrl_stream stream = nullptr) {
  const calibrl_advantage_args a = args.capi();
  check(calibrl_group_advantages(cfg.capi(), &a, stream));
}

/// Host-side results of the convenience overload.
struct Advantages {
  std::vector<float> advantages;
  std::vector<float> weights;
  std::vector<float> signs;
};

/// Convenience for host data: allocates and returns the three `[B]` outputs.
[[nodiscard]] inline Advantages group_advantages(const Config& cfg,
                                                 const std::vector<float>& rewards,
                                                 const std::vector<std::int64_t>& group_ids,
                                                 std::int64_t num_groups) {
  Advantages r;
  r.advantages.resize(rewards.size());
  r.weights.resize(rewards.size());
  r.signs.resize(rewards.size());
  group_advantages(cfg, AdvantageArgs{}
                            .rewards(rewards)
                            .group_ids(group_ids, num_groups)
                            .advantages(r.advantages)
                            .weights(r.weights)
                            .signs(r.signs));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Loss (SPEC §4)

/// Arguments of calibrl::loss, set by name (a builder); unset optional fields are absent.
/// Stores copies of the views (descriptors only), so temporaries of TensorView are fine.
class LossArgs {
 public:
  /// Policy log-probs ℓ: packed `[T]` with `[B+1]` row offsets ...
  LossArgs& logprobs(TensorView v, TensorView seq_offsets) {
    logprobs_ = v;
    seq_offsets_ = seq_offsets;
    return *this;
  }
  /// ... or padded `[B, S]` (then usually with a mask).
  LossArgs& logprobs(TensorView v) { logprobs_ = v; seq_offsets_.reset(); return *this; }
  LossArgs& mask(TensorView v) { mask_ = v; return *this; }
  LossArgs& old_logprobs(TensorView v) { old_logprobs_ = v; return *this; }
  LossArgs& ref_logprobs(TensorView v) { ref_logprobs_ = v; return *this; }
  LossArgs& entropy(TensorView v) { entropy_ = v; return *this; }
  /// Per-token importance weights ρ ≥ 0 (layout of logprobs) on the policy-gradient term,
  /// like verl's rollout_is_weights (CPU and CUDA backends).
  LossArgs& token_weights(TensorView v) { token_weights_ = v; return *this; }
  /// `[B]` advantages, rarity weights and signs (as from calibrl::group_advantages).
  LossArgs& advantages(TensorView v) { advantages_ = v; return *this; }
  LossArgs& weights(TensorView v) { weights_ = v; return *this; }
  LossArgs& signs(TensorView v) { signs_ = v; return *this; }
  LossArgs& is_expert(TensorView v) { is_expert_ = v; return *this; }
  /// Expert baseline, packed: `[T*]` log-probs, `[P+1]` offsets, `[B]` slot per row (−1: none).
  LossArgs& expert(TensorView logprobs, TensorView offsets, TensorView index) {
    expert_logprobs_ = logprobs;
    expert_offsets_ = offsets;
    expert_index_ = index;
    return *this;
  }
  /// Expert baseline, padded: `[P, S*]` log-probs (optional mask via expert_mask), `[B]` slots.
  LossArgs& expert(TensorView logprobs, TensorView index) {
    expert_logprobs_ = logprobs;
    expert_offsets_.reset();
    expert_index_ = index;
    return *this;
  }
  LossArgs& expert_mask(TensorView v) { expert_mask_ = v; return *this; }
  /// Global token and sequence counts of the mini-batch's trained rows (all ranks, all
  /// micro-batches); optionally every row's counts, expert rows included (the entropy and KL
  /// denominators of the `authors` preset, SPEC §4.7; 0 = the same as the trained rows').
  LossArgs& normalizers(double token_count, double seq_count, double all_token_count = 0.0,
                        double all_seq_count = 0.0) {
    normalizers_ = calibrl_normalizers{token_count, seq_count, all_token_count, all_seq_count};
    return *this;
  }
  /// The same from a calibrl::Plan (Plan::normalizers(b)).
  LossArgs& normalizers(const calibrl_normalizers& n) { normalizers_ = n; return *this; }
  /// Outputs: ∂L/∂ℓ and ∂L/∂H (shape of logprobs), `[CALIBRL_METRICS_LEN]` device metrics.
  LossArgs& grad_logprobs(TensorView v) { grad_logprobs_ = v; return *this; }
  LossArgs& grad_entropy(TensorView v) { grad_entropy_ = v; return *this; }
  LossArgs& metrics(TensorView v) { metrics_ = v; return *this; }

  /// The C struct, pointing into this object: valid while it lives, unchanged.
  [[nodiscard]] calibrl_loss_args capi() const {
    calibrl_loss_args a{};
    a.logprobs = detail::in(logprobs_);
    a.seq_offsets = detail::in(seq_offsets_);
    a.mask = detail::in(mask_);
    a.old_logprobs = detail::in(old_logprobs_);
    a.ref_logprobs = detail::in(ref_logprobs_);
    a.entropy = detail::in(entropy_);
    a.advantages = detail::in(advantages_);
    a.weights = detail::in(weights_);
    a.signs = detail::in(signs_);
    a.is_expert = detail::in(is_expert_);
    a.expert_logprobs = detail::in(expert_logprobs_);
    a.expert_offsets = detail::in(expert_offsets_);
    a.expert_mask = detail::in(expert_mask_);
    a.expert_index = detail::in(expert_index_);
    a.normalizers = normalizers_ ? &*normalizers_ : nullptr;
    a.grad_logprobs = detail::out(grad_logprobs_, "grad_logprobs");
    a.grad_entropy = detail::out(grad_entropy_, "grad_entropy");
    a.metrics = detail::out(metrics_, "metrics");
    a.token_weights = detail::in(token_weights_);
    return a;
  }

 private:
  OptionalView logprobs_, seq_offsets_, mask_, old_logprobs_, ref_logprobs_, entropy_,
      advantages_, weights_, signs_, is_expert_, expert_logprobs_, expert_offsets_,
      expert_mask_, expert_index_, grad_logprobs_, grad_entropy_, metrics_, token_weights_;
  std::optional<calibrl_normalizers> normalizers_;
};

/// The loss: writes the requested gradients into the caller's buffers and returns the metrics
/// (on CUDA this synchronises `stream` to read them; set LossArgs::metrics and call
/// loss_async to keep them on the device).
[[nodiscard]] inline calibrl_metrics loss(const Config& cfg, const LossArgs& args,
                                          calibrl_stream stream = nullptr) {
  const calibrl_loss_args a = args.capi();
  calibrl_metrics m{};
  check(calibrl_loss(cfg.capi(), &a, &m, stream));
  return m;
}

/// The loss without host metrics: no stream synchronisation on CUDA.
inline void loss_async(const Config& cfg, const LossArgs& args, calibrl_stream stream = nullptr) {
  const calibrl_loss_args a = args.capi();
  check(calibrl_loss(cfg.capi(), &a, nullptr, stream));
}

// ---------------------------------------------------------------------------------------------
// Fused logits path (SPEC §6)

/// Forward over full-vocabulary logits `[N, V]`: writes logprobs `[N]`, entropy `[N]`
/// (optional) and lse `[N]` (keep it for the backward). Negative labels mark ignored rows.
inline void logits_forward(const TensorView& logits, const TensorView& labels,
                           double temperature, const TensorView& logprobs,
                           const OptionalView& entropy, const TensorView& lse,
                           calibrl_stream stream = nullptr) {
  check(calibrl_logits_forward(logits.dl(), labels.dl(), temperature,
                               detail::out(logprobs, "logprobs"), detail::out(entropy, "entropy"),
                               detail::out(lse, "lse"), stream));
}

/// Backward: grad_logits = ∂L/∂z from grad_logprobs (and grad_entropy, which needs entropy).
/// grad_logits may view the logits buffer itself (in place). vocab_start: 0, or a shard's
/// first vocabulary id.
inline void logits_backward(const TensorView& logits, const TensorView& labels,
                            double temperature, std::int64_t vocab_start, const TensorView& lse,
                            const OptionalView& entropy, const TensorView& grad_logprobs,
                            const OptionalView& grad_entropy, const TensorView& grad_logits,
                            calibrl_stream stream = nullptr) {
  check(calibrl_logits_backward(logits.dl(), labels.dl(), temperature, vocab_start, lse.dl(),
                                detail::in(entropy), grad_logprobs.dl(), detail::in(grad_entropy),
                                detail::out(grad_logits, "grad_logits"), stream));
}

/// Vocabulary-parallel phase 1: stats `[N, 4]` f32 of this rank's shard of the logits.
inline void logits_shard_stats(const TensorView& logits, const TensorView& labels,
                               double temperature, std::int64_t vocab_start,
                               const TensorView& stats, calibrl_stream stream = nullptr) {
  check(calibrl_logits_shard_stats(logits.dl(), labels.dl(), temperature, vocab_start,
                                   detail::out(stats, "stats"), stream));
}

/// Vocabulary-parallel phase 2: all-gathered stats `[R, N, 4]` → logprobs, entropy
/// (optional), lse, each `[N]`.
inline void logits_shard_finish(const TensorView& stats, const TensorView& labels,
                                const TensorView& logprobs, const OptionalView& entropy,
                                const TensorView& lse, calibrl_stream stream = nullptr) {
  check(calibrl_logits_shard_finish(stats.dl(), labels.dl(), detail::out(logprobs, "logprobs"),
                                    detail::out(entropy, "entropy"), detail::out(lse, "lse"),
                                    stream));
}


// ---------------------------------------------------------------------------------------------
// The expert-baseline scheduler (SPEC §7, docs/scheduler.md)

/// calibrl_scheduler_config, starting from the library's defaults
/// (calibrl_scheduler_config_default: 1 rank, 16384-token budgets, one mini-batch, CalibRL, all
/// experts). Setters return *this; capi() gives the C struct.
class SchedulerConfig {
 public:
  SchedulerConfig() { check(calibrl_scheduler_config_default(&c_)); }
  /// Wraps a filled C struct.
  explicit SchedulerConfig(const calibrl_scheduler_config& c) noexcept : c_(c) {}

  SchedulerConfig& dp_ranks(std::uint32_t v) noexcept { c_.dp_ranks = v; return *this; }
  SchedulerConfig& minibatch_prompts(std::uint32_t v) noexcept { c_.minibatch_prompts = v; return *this; }
  SchedulerConfig& nograd_token_budget(std::uint64_t v) noexcept { c_.nograd_token_budget = v; return *this; }
  SchedulerConfig& train_token_budget(std::uint64_t v) noexcept { c_.train_token_budget = v; return *this; }
  /// CALIBRL_LOSS_CALIBRL, _GRPO, _LUFFY or _RLPLUS.
  SchedulerConfig& loss_kind(std::uint32_t v) noexcept { c_.loss_kind = v; return *this; }
  /// Every prompt with an expert (the default).
  SchedulerConfig& select_all() noexcept { c_.expert_selection = CALIBRL_SELECT_ALL; return *this; }
  /// round(fraction · E) of the E prompts with an expert, drawn with `seed`.
  SchedulerConfig& select_random_fraction(double fraction, std::uint64_t seed) noexcept {
    c_.expert_selection = CALIBRL_SELECT_RANDOM_FRACTION;
    c_.fraction = fraction;
    c_.seed = seed;
    return *this;
  }
  /// Prompts whose pass rate (share of rollouts with reward > threshold) is in [low, high];
  /// the plan then needs rewards.
  SchedulerConfig& select_pass_rate(double low, double high, double reward_threshold = 0.1) noexcept {
    c_.expert_selection = CALIBRL_SELECT_PASS_RATE;
    c_.pass_rate_low = low;
    c_.pass_rate_high = high;
    c_.reward_threshold = reward_threshold;
    return *this;
  }
  /// `c` of the workload model tokens + c·tokens².
  SchedulerConfig& quadratic_coef(double v) noexcept { c_.quadratic_coef = v; return *this; }
  /// DAPO dynamic sampling (SPEC §7.6): groups whose rewards are all equal leave both passes,
  /// the normalisers and expert selection (the plan then needs rewards); see
  /// Plan::dropped_prompts.
  SchedulerConfig& dynamic_sampling(bool on) noexcept { c_.dynamic_sampling = on ? 1u : 0u; return *this; }

  [[nodiscard]] const calibrl_scheduler_config& capi() const noexcept { return c_; }
  [[nodiscard]] calibrl_scheduler_config& capi() noexcept { return c_; }

 private:
  calibrl_scheduler_config c_{};
};

/// One prompt of a step, for calibrl::Plan.
struct Prompt {
  std::uint32_t prompt_len = 0;
  std::vector<std::uint32_t> rollout_lens;  // response lengths of its rollouts (>= 1 rollout)
  std::optional<std::uint32_t> expert_len;  // its expert response's length, if it has one
  std::vector<double> rewards;              // empty, or one per rollout (pass-rate selection)
};

/// One micro-batch: its sequences' ids and kinds (CALIBRL_SEQ_ROLLOUT / CALIBRL_SEQ_EXPERT).
/// Rollout i has id i; expert slot s has id R + s.
struct Microbatch {
  std::vector<std::int64_t> ids;
  std::vector<std::uint8_t> kinds;
  [[nodiscard]] std::size_t size() const noexcept { return ids.size(); }
  [[nodiscard]] bool empty() const noexcept { return ids.empty(); }
};

/// An owned plan of one training step (move-only): the no-grad pass, the training pass's
/// mini-batches, the gather map, expert slots and normalisers. Accessors copy the plan's data
/// into std::vectors (the ABI's two-call convention: size query, then read).
class Plan {
 public:
  /// Plans `prompts` under `config`. Rewards are given for every prompt or for none.
  Plan(const SchedulerConfig& config, const std::vector<Prompt>& prompts)
      : ptr_(create(config, prompts)) {}

  /// Plans from the C arrays of calibrl_plan_new (`rewards` may be NULL).
  Plan(const SchedulerConfig& config, const calibrl_prompt_desc* prompts, std::size_t n_prompts,
       const std::uint32_t* rollout_lens, std::size_t n_rollouts, const double* rewards = nullptr)
      : ptr_(create(config.capi(), prompts, n_prompts, rollout_lens, n_rollouts, rewards)) {}

  /// Takes ownership of a handle from calibrl_plan_new.
  explicit Plan(calibrl_plan* raw) noexcept : ptr_(raw) {}

  /// Counts: prompts, rollouts R, expert slots P*, expert tokens T*, ranks, micro-batches...
  [[nodiscard]] calibrl_plan_info summary() const {
    calibrl_plan_info info{};
    check(calibrl_plan_summary(capi(), &info));
    return info;
  }
  /// Mini-batch `b`: prompt range, micro-batches per rank, normalisers.
  [[nodiscard]] calibrl_minibatch_info minibatch(std::size_t b) const {
    calibrl_minibatch_info info{};
    check(calibrl_plan_minibatch(capi(), b, &info));
    return info;
  }
  /// The global normalisers of mini-batch `b`: pass them to every loss call of it
  /// (LossArgs::normalizers(n)).
  [[nodiscard]] calibrl_normalizers normalizers(std::size_t b) const {
    calibrl_normalizers n{};
    check(calibrl_plan_normalizers(capi(), b, &n));
    return n;
  }
  /// Micro-batch `mb` of rank `rank` in the no-grad pass.
  [[nodiscard]] Microbatch nograd_microbatch(std::size_t rank, std::size_t mb) const {
    return read_microbatch([&](std::int64_t* ids, std::uint8_t* kinds, std::size_t cap, std::size_t* len) {
      return calibrl_plan_nograd_microbatch(capi(), rank, mb, ids, kinds, cap, len);
    });
  }
  /// Micro-batch `mb` of rank `rank` in mini-batch `b` of the training pass.
  [[nodiscard]] Microbatch train_microbatch(std::size_t b, std::size_t rank, std::size_t mb) const {
    return read_microbatch([&](std::int64_t* ids, std::uint8_t* kinds, std::size_t cap, std::size_t* len) {
      return calibrl_plan_train_microbatch(capi(), b, rank, mb, ids, kinds, cap, len);
    });
  }
  /// The whole no-grad pass: [rank][micro-batch].
  [[nodiscard]] std::vector<std::vector<Microbatch>> nograd() const {
    const calibrl_plan_info info = summary();
    std::vector<std::vector<Microbatch>> out(info.dp_ranks);
    for (std::size_t r = 0; r < out.size(); ++r) {
      for (std::size_t m = 0; m < info.nograd_microbatches; ++m) out[r].push_back(nograd_microbatch(r, m));
    }
    return out;
  }
  /// Mini-batch `b` of the training pass: [rank][micro-batch].
  [[nodiscard]] std::vector<std::vector<Microbatch>> train(std::size_t b) const {
    const calibrl_minibatch_info mbi = minibatch(b);
    std::vector<std::vector<Microbatch>> out(summary().dp_ranks);
    for (std::size_t r = 0; r < out.size(); ++r) {
      for (std::size_t m = 0; m < mbi.microbatches; ++m) out[r].push_back(train_microbatch(b, r, m));
    }
    return out;
  }
  /// `[R]`: each rollout's expert slot, -1 for none (expert_index of the loss).
  [[nodiscard]] std::vector<std::int64_t> gather_map() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_gather_map(capi(), out, cap, len);
    });
  }
  /// `[P*]`: the prompt of each expert slot.
  [[nodiscard]] std::vector<std::int64_t> expert_prompts() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_expert_prompts(capi(), out, cap, len);
    });
  }
  /// The prompts left out by dynamic sampling (all-equal rewards): sample this many more.
  [[nodiscard]] std::vector<std::int64_t> dropped_prompts() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_dropped_prompts(capi(), out, cap, len);
    });
  }
  /// `[P* + 1]`: offsets of the packed expert tensor (expert_offsets of the loss).
  [[nodiscard]] std::vector<std::int64_t> expert_offsets() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_expert_offsets(capi(), out, cap, len);
    });
  }
  /// Ids of the sequences over a pass's budget (CALIBRL_PASS_NOGRAD or CALIBRL_PASS_TRAIN).
  [[nodiscard]] std::vector<std::int64_t> oversize(std::uint32_t pass) const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_oversize(capi(), pass, out, cap, len);
    });
  }
  /// Sequence `id`: kind, prompt, rollout index or expert slot, tokens, response length.
  [[nodiscard]] calibrl_seq_info seq(std::int64_t id) const {
    calibrl_seq_info info{};
    check(calibrl_plan_seq(capi(), id, &info));
    return info;
  }

  /// The expert baseline from the no-grad pass's output: `nograd_logprobs` holds the response
  /// log-probs of rank `rank`'s no-grad sequences (or all ranks' in rank order, rank = -1),
  /// packed in plan order. Writes the packed expert tensor `[T*]` and/or E_g per slot `[P*]`
  /// (host tensors for now). With one rank's part, other ranks' slots are 0: all-reduce (sum).
  void collect_experts(std::int64_t rank, const TensorView& nograd_logprobs,
                       const OptionalView& expert_logprobs, const OptionalView& expert_sums,
                       bool length_normalize = false, calibrl_stream stream = nullptr) const {
    check(calibrl_plan_collect_experts(capi(), rank, nograd_logprobs.dl(),
                                       detail::out(expert_logprobs, "expert_logprobs"),
                                       detail::out(expert_sums, "expert_sums"), length_normalize,
                                       stream));
  }

  [[nodiscard]] const calibrl_plan* capi() const noexcept { return ptr_.get(); }
  [[nodiscard]] calibrl_plan* capi() noexcept { return ptr_.get(); }
  /// Gives up ownership; the caller frees it with calibrl_plan_free.
  [[nodiscard]] calibrl_plan* release() noexcept { return ptr_.release(); }

 private:
  static calibrl_plan* create(const calibrl_scheduler_config& config,
                              const calibrl_prompt_desc* prompts, std::size_t n_prompts,
                              const std::uint32_t* rollout_lens, std::size_t n_rollouts,
                              const double* rewards) {
    calibrl_plan* raw = nullptr;
    check(calibrl_plan_new(&config, prompts, n_prompts, rollout_lens, n_rollouts, rewards, &raw));
    return raw;
  }
  static calibrl_plan* create(const SchedulerConfig& config, const std::vector<Prompt>& prompts) {
    std::vector<calibrl_prompt_desc> descs;
    std::vector<std::uint32_t> lens;
    std::vector<double> rewards;
    const bool with_rewards = !prompts.empty() && !prompts.front().rewards.empty();
    for (std::size_t g = 0; g < prompts.size(); ++g) {
      const Prompt& p = prompts[g];
      if (p.rewards.empty() == with_rewards ||
          (with_rewards && p.rewards.size() != p.rollout_lens.size())) {
        throw Error(CALIBRL_STATUS_INVALID_ARGUMENT,
                    "`prompts[" + std::to_string(g) + "].rewards`: has " +
                        std::to_string(p.rewards.size()) + " rewards for " +
                        std::to_string(p.rollout_lens.size()) +
                        " rollouts (give one per rollout for every prompt, or none)");
      }
      if (p.rollout_lens.size() > UINT32_MAX) {
        throw Error(CALIBRL_STATUS_INVALID_ARGUMENT,
                    "`prompts[" + std::to_string(g) + "].rollout_lens`: more than 2^32 - 1 rollouts");
      }
      calibrl_prompt_desc d{};
      d.prompt_len = p.prompt_len;
      d.num_rollouts = static_cast<std::uint32_t>(p.rollout_lens.size());
      d.expert_len = p.expert_len ? static_cast<std::int64_t>(*p.expert_len) : -1;
      descs.push_back(d);
      lens.insert(lens.end(), p.rollout_lens.begin(), p.rollout_lens.end());
      rewards.insert(rewards.end(), p.rewards.begin(), p.rewards.end());
    }
    return create(config.capi(), descs.data(), descs.size(), lens.data(), lens.size(),
                  with_rewards ? rewards.data() : nullptr);
  }

  // The two-call convention: a size query (NULL arrays), then the read.
  template <class F>
  static std::vector<std::int64_t> read_ids(F&& f) {
    std::size_t len = 0;
    calibrl_status s = f(nullptr, 0, &len);
    if (s != CALIBRL_STATUS_BUFFER_TOO_SMALL) check(s);
    std::vector<std::int64_t> out(len);
    check(f(out.data(), out.size(), &len));
    out.resize(len);
    return out;
  }
  template <class F>
  static Microbatch read_microbatch(F&& f) {
    std::size_t len = 0;
    calibrl_status s = f(nullptr, nullptr, 0, &len);
    if (s != CALIBRL_STATUS_BUFFER_TOO_SMALL) check(s);
    Microbatch m;
    m.ids.resize(len);
    m.kinds.resize(len);
    check(f(m.ids.data(), m.kinds.data(), len, &len));
    m.ids.resize(len);
    m.kinds.resize(len);
    return m;
  }

  struct Deleter {
    void operator()(calibrl_plan* p) const noexcept { calibrl_plan_free(p); }
  };
  std::unique_ptr<calibrl_plan, Deleter> ptr_;
};

}  // namespace calibrl

#endif  // CALIBRL_HPP
