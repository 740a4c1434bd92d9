// calibrl: scalar types and the 16-bit float conversions shared by cuda/loss.cu and
// cuda/logits.cu. NVRTC gets this file as a named header (src/cuda/compile.rs `HEADERS`); the
// host emulation (tests/emulate) finds it beside the .cu files. No CUDA header is included
// (no cuda_fp16.h / cuda_bf16.h): conversions are bit operations or PTX cvt, so a bare NVRTC
// compiles it.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// One 16-byte vector load or store.
struct __align__(16) Vec16 {
    u32 w[4];
};

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
#if __CUDA_ARCH__ >= 800
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (u16)(u >> 16);
#endif
}

// PTX-only conversions. The host emulation (tests/emulate) defines CALIBRL_HOST_EMULATION and
// supplies host versions with the same rounding (tests/emulate/driver/host_cvt.h).
#ifndef CALIBRL_HOST_EMULATION
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
#endif
