// Host stand-ins for the CUDA built-ins the kernels use, shared by the kernel emulations in this
// folder: every CUDA thread of a block is a std::thread, __syncthreads is a block barrier, warp
// shuffles and votes exchange values through a per-warp barrier (so a warp's lanes must call
// them together, as on the GPU), atomics are host atomics, and blocks run one after another.
// Include it before the kernel source; the file then defines CALIBRL_HOST_EMULATION and its
// source's PTX-only helpers.
#pragma once

#include <atomic>
#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct Dim {
    unsigned x;
};
thread_local Dim threadIdx, blockIdx;
Dim blockDim, gridDim;
static std::barrier<>* g_block;
static std::vector<std::unique_ptr<std::barrier<>>> g_warps;
static unsigned long long g_lanes[1024];

#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __shared__ static

inline void __syncthreads() { g_block->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Every lane of the warp publishes a value; each gets lane `src`'s.
template <class T>
static T warp_exchange(T v, unsigned src) {
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_lanes[threadIdx.x] = bits;
    g_warps[threadIdx.x >> 5]->arrive_and_wait();
    bits = g_lanes[(threadIdx.x & ~31u) + src];
    g_warps[threadIdx.x >> 5]->arrive_and_wait();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
template <class T>
T __shfl_down_sync(unsigned, T v, int o) {
    const unsigned lane = threadIdx.x & 31;
    return warp_exchange(v, lane + o < 32 ? lane + o : lane);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return warp_exchange(v, (threadIdx.x & 31) ^ (unsigned)lane_mask);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l) r |= (warp_exchange(pred != 0, l) ? 1u : 0u) << l;
    return r;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

template <class To, class From>
inline To bits_as(From f) {
    static_assert(sizeof(To) == sizeof(From));
    To t;
    std::memcpy(&t, &f, sizeof(To));
    return t;
}
inline float __int_as_float(int i) { return bits_as<float>(i); }
inline float __uint_as_float(unsigned i) { return bits_as<float>(i); }
inline unsigned __float_as_uint(float f) { return bits_as<unsigned>(f); }
inline long long __double_as_longlong(double d) { return bits_as<long long>(d); }
inline double __longlong_as_double(long long i) { return bits_as<double>(i); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// Runs `kernel` as a grid of `grid` blocks of `block` threads (a multiple of 32), block by block.
static void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        g_block = &bar;
        g_warps.clear();
        for (unsigned w = 0; w < block / 32; ++w) g_warps.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([&, t] {
                threadIdx.x = t;
                blockIdx.x = b;
                kernel();
            });
        for (auto& t : threads) t.join();
    }
}
