// The emulated driver's kernel table: each kernel translation unit (loss_kernels.cpp,
// logits_kernels.cpp) compiles one cuda/*.cu file for the host and registers its `extern "C"`
// kernels by name; cuLaunchKernel unpacks the launch's parameter array by the kernel's own
// signature, as the real driver does from the PTX's parameter list.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

namespace emu_driver {

using Invoke = void (*)(void** params);
void register_kernel(const char* name, Invoke invoke);
Invoke find_kernel(const char* name);

template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}
template <class... A>
void call(void (*kernel)(A...), void** params) {
    call(kernel, params, std::index_sequence_for<A...>{});
}

struct Registration {
    Registration(const char* name, Invoke invoke) { register_kernel(name, invoke); }
};

}  // namespace emu_driver

#define EMU_KERNEL(k) \
    static emu_driver::Registration registration_##k(#k, [](void** params) { emu_driver::call(k, params); });
