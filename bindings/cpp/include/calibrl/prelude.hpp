// calibrl/prelude.hpp — part of calibrl.hpp (include <calibrl.hpp>): the optional PyTorch
// detection, the C header and the standard headers every part uses.

#ifndef CALIBRL_PRELUDE_HPP
#define CALIBRL_PRELUDE_HPP

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

#endif  // CALIBRL_PRELUDE_HPP
