// Host versions of the kernels' PTX-only conversions (the `#ifndef CALIBRL_HOST_EMULATION`
// blocks of cuda/loss.cu and cuda/logits.cu), with the PTX instructions' rounding: cvt.rn (round
// to nearest even, NaN to the canonical NaN) and ex2.approx.ftz (subnormal results flushed).
#pragma once

#include <cmath>
#include <cstring>

#define CALIBRL_HOST_EMULATION

inline unsigned short f32_to_bf16_bits(float f) {  // cvt.rn.bf16.f32
    unsigned u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float f16_bits_to_f32(unsigned short h) {  // cvt.f32.f16
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
inline unsigned short f32_to_f16_bits(float f) {  // cvt.rn.f16.f32
    const _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
// cuda/logits.cu's names for the same conversions, and ex2.approx.ftz.f32.
inline float f16_to_f32(unsigned short h) { return f16_bits_to_f32(h); }
inline unsigned short f32_to_f16(float f) { return f32_to_f16_bits(f); }
inline float ex2(float x) {
    const float y = std::exp2(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}
