// Host versions of the kernels' PTX-only instructions (the `#ifndef CALIBRL_HOST_EMULATION`
// blocks of cuda/dtype.cuh and cuda/logits.cu), with the PTX instructions' rounding: cvt.rn
// (round to nearest even) and ex2.approx.ftz (subnormal results flushed). The host takes
// dtype.cuh's pre-sm_80 f32_to_bf16 (plain C, the same rounding as cvt.rn.bf16.f32).
#pragma once

#include <cmath>
#include <cstring>

#define CALIBRL_HOST_EMULATION

inline float f16_to_f32(unsigned short h) {  // cvt.f32.f16
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
inline unsigned short f32_to_f16(float f) {  // cvt.rn.f16.f32
    const _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
// ex2.approx.ftz.f32 (cuda/logits.cu).
inline float ex2(float x) {
    const float y = std::exp2(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}
