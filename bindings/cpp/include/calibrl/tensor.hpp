// calibrl/tensor.hpp — part of calibrl.hpp (include <calibrl.hpp>).
// Tensor views: devices, DLPack dtypes, Dims and calibrl::TensorView over caller buffers
// (and at::Tensor when PyTorch is reachable).

#ifndef CALIBRL_TENSOR_HPP
#define CALIBRL_TENSOR_HPP

#include "prelude.hpp"
#include "errors.hpp"

namespace calibrl {

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

}  // namespace calibrl

#endif  // CALIBRL_TENSOR_HPP
