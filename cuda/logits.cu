// calibrl: the fused logits path on CUDA (SPEC §6).
//
// Compiled at first use with NVRTC (see src/cuda/compile.rs); the file includes no header, so it
// builds with a bare NVRTC (no CUDA toolkit headers on the machine). Kernels are `extern "C"` and
// dtype-suffixed: `_bf16`, `_f16`, `_f32` name the logits dtype.
//
// Layout: logits `[N, V]`, unit stride along V, row stride `row_stride` elements (so vocabulary
// shards can be strided views of a full-vocabulary buffer). One thread block per row (grid-stride
// over rows), 16-byte vector loads over the part of each row that is 16-byte aligned, scalar
// loads for the unaligned head and the tail. All indexing is 64-bit.
//
// Numerics: u = z / T. Everything is accumulated in f32 in base 2: for a running max `mz` of the
// raw logits and k = log2(e) / T, each element adds e = 2^d with d = (z - mz)·k to
// s = Σ e and e·d to c = Σ e·d (so Σ e^(u−m)·(u−m) = ln2 · c). When the max grows, (s, c) are
// rescaled: s' = α·s, c' = α·c + s'·δ with δ = (m_old − m_new)·k, α = 2^δ.
//
// Determinism: the block size depends only on V (chosen by the host), each thread visits a fixed
// set of elements in a fixed order and the block reduction is a fixed tree: the same call gives
// the same bits. No atomics.
//
// Non-finite logits: the kernels cannot report errors without a host synchronisation, so a NaN
// or +inf logit, or a row that is entirely -inf, makes that row's outputs NaN (the CPU backend
// returns CALIBRL_STATUS_NON_FINITE instead). -inf entries in an otherwise finite row are exact
// zeros of the softmax.

#include "dtype.cuh"

#define CALIBRL_INF (__int_as_float(0x7f800000))
#define CALIBRL_NAN (__int_as_float(0x7fffffff))
#define CALIBRL_LN2 0.693147180559945309f
#define CALIBRL_LOG2E 1.442695040888963407f
// Exponents below this (base 2) underflow to zero in ex2.approx.ftz; clamping d to it keeps
// 0·d finite for -inf logits without changing any non-zero term.
#define CALIBRL_MIN_EXP2 (-256.0f)

// Output / scalar dtype codes (match src/cuda/logits/args.rs `scalar_code`).
#define CODE_F32 0
#define CODE_F64 1
#define CODE_BF16 2
#define CODE_F16 3

// ---------------------------------------------------------------------------------------------
// Scalar helpers (no cuda_fp16.h / cuda_bf16.h: conversions are bit operations or PTX cvt).

// PTX-only primitive. `tests/emulate` (a host-side emulation of the kernels for machines
// without a GPU) defines CALIBRL_HOST_EMULATION and supplies a host version.
#ifndef CALIBRL_HOST_EMULATION
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

// max that propagates NaN (fmaxf would drop it and hide a NaN logit).
__device__ __forceinline__ float max_nan(float a, float b) {
#if __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return (a != a || b != b) ? CALIBRL_NAN : fmaxf(a, b);
#endif
}

// Logits element types: storage type, elements per 16-byte vector, conversions.
struct BF16 {
    typedef u16 S;
    static constexpr int kVec = 8;
    __device__ static float load(S x) { return bf16_to_f32(x); }
    __device__ static S store(float x) { return f32_to_bf16(x); }
};
struct F16 {
    typedef u16 S;
    static constexpr int kVec = 8;
    __device__ static float load(S x) { return f16_to_f32(x); }
    __device__ static S store(float x) { return f32_to_f16(x); }
};
struct F32 {
    typedef float S;
    static constexpr int kVec = 4;
    __device__ static float load(S x) { return x; }
    __device__ static S store(float x) { return x; }
};

template <class T>
__device__ __forceinline__ void unpack(const Vec16& v, float (&x)[T::kVec]) {
    const typename T::S* e = reinterpret_cast<const typename T::S*>(&v);
#pragma unroll
    for (int j = 0; j < T::kVec; ++j) x[j] = T::load(e[j]);
}

template <class T>
__device__ __forceinline__ Vec16 pack(const float (&x)[T::kVec]) {
    Vec16 v;
    typename T::S* e = reinterpret_cast<typename T::S*>(&v);
#pragma unroll
    for (int j = 0; j < T::kVec; ++j) e[j] = T::store(x[j]);
    return v;
}

// Per-row scalars ([N] tensors) of any float dtype, and labels (int32 / int64).
__device__ __forceinline__ float load_scalar(const void* p, int code, i64 i) {
    switch (code) {
        case CODE_F64: return (float)((const double*)p)[i];
        case CODE_BF16: return bf16_to_f32(((const u16*)p)[i]);
        case CODE_F16: return f16_to_f32(((const u16*)p)[i]);
        default: return ((const float*)p)[i];
    }
}

__device__ __forceinline__ void store_scalar(void* p, int code, i64 i, float v) {
    switch (code) {
        case CODE_F64: ((double*)p)[i] = (double)v; break;
        case CODE_BF16: ((u16*)p)[i] = f32_to_bf16(v); break;
        case CODE_F16: ((u16*)p)[i] = f32_to_f16(v); break;
        default: ((float*)p)[i] = v; break;
    }
}

__device__ __forceinline__ i64 load_label(const void* labels, int labels_are_i64, i64 row) {
    return labels_are_i64 ? ((const i64*)labels)[row] : (i64)((const int*)labels)[row];
}

// Number of leading elements of `p` before the first 16-byte boundary (at most `len`).
template <class S>
__device__ __forceinline__ i64 unaligned_head(const S* p, i64 len) {
    i64 head = (i64)(((16u - ((u64)p & 15u)) & 15u) / sizeof(S));
    return head < len ? head : len;
}

// ---------------------------------------------------------------------------------------------
// Online softmax statistics of one row (raw-logit max, base-2 sums).

struct SoftmaxAcc {
    float m;  // running max of the raw logits z (NaN once a NaN/+inf forced it)
    float s;  // Σ 2^d
    float c;  // Σ 2^d · d            with d = (z − m)·k

    __device__ __forceinline__ void init() {
        m = -CALIBRL_INF;
        s = 0.f;
        c = 0.f;
    }

    // Moves the reference max to `new_m` (>= m, or NaN).
    __device__ __forceinline__ void rescale(float new_m, float k) {
        if (new_m != m) {
            float delta = fmaxf((m - new_m) * k, CALIBRL_MIN_EXP2);
            if (new_m != new_m) delta = CALIBRL_NAN;
            float alpha = ex2(delta);
            s *= alpha;
            c = fmaf(alpha, c, s * delta);
            m = new_m;
        }
    }

    template <int W>
    __device__ __forceinline__ void add(const float (&x)[W], float k) {
        float vm = x[0];
#pragma unroll
        for (int j = 1; j < W; ++j) vm = max_nan(vm, x[j]);
        rescale(max_nan(m, vm), k);
        if (m == -CALIBRL_INF) return;  // everything so far is -inf: nothing to add
#pragma unroll
        for (int j = 0; j < W; ++j) {
            float d = (x[j] - m) * k;
            float e = ex2(d);
            s += e;
            c = fmaf(e, fmaxf(d, CALIBRL_MIN_EXP2), c);
        }
    }

    // Merges another accumulator (commutative bit for bit, so a butterfly is deterministic).
    __device__ __forceinline__ void merge(float om, float os, float oc, float k) {
        float nm = max_nan(m, om);
        float d1 = (m == nm) ? 0.f : fmaxf((m - nm) * k, CALIBRL_MIN_EXP2);
        float d2 = (om == nm) ? 0.f : fmaxf((om - nm) * k, CALIBRL_MIN_EXP2);
        if (nm != nm) d1 = d2 = CALIBRL_NAN;
        float a1 = ex2(d1), a2 = ex2(d2);
        float s1 = a1 * s, s2 = a2 * os;
        float c1 = fmaf(a1, c, s1 * d1), c2 = fmaf(a2, oc, s2 * d2);
        m = nm;
        s = s1 + s2;
        c = c1 + c2;
    }
};

// Accumulates the `len` elements of `row` into the calling thread's accumulator (each thread
// takes a strided subset), unrolled four vectors deep for memory-level parallelism. With COPY,
// also copies them to `copy` (an address equal to `row` mod 16: the single pass's shared memory).
template <class T, bool COPY = false>
__device__ __forceinline__ void accumulate_row(const typename T::S* row, i64 len, float k, SoftmaxAcc& acc,
                                               typename T::S* copy = nullptr) {
    constexpr int W = T::kVec;
    const i64 tid = threadIdx.x, nt = blockDim.x;
    const i64 head = unaligned_head(row, len);
    const i64 nvec = (len - head) / W;
    const i64 tail = head + nvec * W;
    Vec16* vcopy = COPY ? reinterpret_cast<Vec16*>(copy + head) : nullptr;
    for (i64 i = tid; i < head; i += nt) {
        if (COPY) copy[i] = row[i];
        float x[1] = {T::load(row[i])};
        acc.add<1>(x, k);
    }
    const Vec16* vrow = reinterpret_cast<const Vec16*>(row + head);
    i64 i = tid;
    for (; i + 3 * nt < nvec; i += 4 * nt) {
        Vec16 v0 = vrow[i], v1 = vrow[i + nt], v2 = vrow[i + 2 * nt], v3 = vrow[i + 3 * nt];
        if (COPY) {
            vcopy[i] = v0;
            vcopy[i + nt] = v1;
            vcopy[i + 2 * nt] = v2;
            vcopy[i + 3 * nt] = v3;
        }
        float x0[W], x1[W], x2[W], x3[W];
        unpack<T>(v0, x0);
        unpack<T>(v1, x1);
        unpack<T>(v2, x2);
        unpack<T>(v3, x3);
        acc.add<W>(x0, k);
        acc.add<W>(x1, k);
        acc.add<W>(x2, k);
        acc.add<W>(x3, k);
    }
    for (; i < nvec; i += nt) {
        const Vec16 v = vrow[i];
        if (COPY) vcopy[i] = v;
        float x[W];
        unpack<T>(v, x);
        acc.add<W>(x, k);
    }
    for (i64 j = tail + tid; j < len; j += nt) {
        if (COPY) copy[j] = row[j];
        float x[1] = {T::load(row[j])};
        acc.add<1>(x, k);
    }
}

// Block-wide reduction through `sm` (shared memory); every thread returns with the row's
// totals. `blockDim.x` is a multiple of 32 and at most 1024.
__device__ __forceinline__ void reduce_through(SoftmaxAcc& acc, float k, float (*sm)[32]) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float om = __shfl_xor_sync(0xffffffffu, acc.m, off);
        float os = __shfl_xor_sync(0xffffffffu, acc.s, off);
        float oc = __shfl_xor_sync(0xffffffffu, acc.c, off);
        acc.merge(om, os, oc, k);
    }
    const int warps = blockDim.x >> 5;
    if (warps == 1) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // the previous row's readers are done with `sm`
    if (lane == 0) {
        sm[0][warp] = acc.m;
        sm[1][warp] = acc.s;
        sm[2][warp] = acc.c;
    }
    __syncthreads();
    if (lane < warps) {
        acc.m = sm[0][lane];
        acc.s = sm[1][lane];
        acc.c = sm[2][lane];
    } else {
        acc.init();
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float om = __shfl_xor_sync(0xffffffffu, acc.m, off);
        float os = __shfl_xor_sync(0xffffffffu, acc.s, off);
        float oc = __shfl_xor_sync(0xffffffffu, acc.c, off);
        acc.merge(om, os, oc, k);
    }
}

__device__ __forceinline__ void block_reduce(SoftmaxAcc& acc, float k) {
    __shared__ float sm[3][32];
    reduce_through(acc, k, sm);
}

// ---------------------------------------------------------------------------------------------
// Forward: logprobs, entropy (optional), lse over full-vocabulary rows.

template <class T>
__device__ __forceinline__ void logits_forward(const typename T::S* __restrict__ logits, i64 n_rows, i64 row_stride,
                                               i64 vocab, const void* __restrict__ labels, int labels_are_i64,
                                               float inv_t, void* logprobs, int logprobs_code, void* entropy,
                                               int entropy_code, void* lse, int lse_code) {
    const float k = inv_t * CALIBRL_LOG2E;
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const i64 label = load_label(labels, labels_are_i64, row);
        if (label < 0) {  // ignored row: zeros, the logits are not read
            if (threadIdx.x == 0) {
                store_scalar(logprobs, logprobs_code, row, 0.f);
                if (entropy) store_scalar(entropy, entropy_code, row, 0.f);
                store_scalar(lse, lse_code, row, 0.f);
            }
            continue;
        }
        const typename T::S* r = logits + row * row_stride;
        SoftmaxAcc acc;
        acc.init();
        accumulate_row<T>(r, vocab, k, acc);
        block_reduce(acc, k);
        if (threadIdx.x == 0) {
            const float log_s = logf(acc.s);
            const float lse_v = fmaf(acc.m, inv_t, log_s);
            // A label past the vocabulary cannot be reported without a host sync: NaN marks it.
            const float lp = label < vocab ? fmaf(T::load(r[label]) - acc.m, inv_t, -log_s) : CALIBRL_NAN;
            store_scalar(logprobs, logprobs_code, row, lp);
            if (entropy) store_scalar(entropy, entropy_code, row, log_s - CALIBRL_LN2 * acc.c / acc.s);
            store_scalar(lse, lse_code, row, lse_v);
        }
    }
}

// Phase 1 of the vocabulary-parallel forward: stats[row] = (m, Σe^(u−m), Σe^(u−m)(u−m), u_y or 0).
template <class T>
__device__ __forceinline__ void logits_shard_stats(const typename T::S* __restrict__ logits, i64 n_rows,
                                                   i64 row_stride, i64 vocab, const void* __restrict__ labels,
                                                   int labels_are_i64, i64 vocab_start, float inv_t,
                                                   float* __restrict__ stats) {
    const float k = inv_t * CALIBRL_LOG2E;
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const typename T::S* r = logits + row * row_stride;
        SoftmaxAcc acc;
        acc.init();
        accumulate_row<T>(r, vocab, k, acc);
        block_reduce(acc, k);
        if (threadIdx.x == 0) {
            const i64 local = load_label(labels, labels_are_i64, row) - vocab_start;
            const bool here = local >= 0 && local < vocab;
            float* out = stats + row * 4;
            out[0] = acc.m * inv_t;
            out[1] = acc.s;
            out[2] = CALIBRL_LN2 * acc.c;
            out[3] = here ? T::load(r[here ? local : 0]) * inv_t : 0.f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward: grad = (1/T)·[g·(δ_y − p) − h·p·(log p + H)], p = exp(u − lse), written over the
// logits (in place) or into a separate buffer.
//
// In base 2: a = z·k − lse·log2(e), p = 2^a, log p = a·ln2, so
// grad = −p·(A + B·a) + [v == y]·g/T with A = (g + h·H)/T, B = h·ln2/T.

struct GradRow {
    float k, lse2, A, B, g_t;
    i64 label;  // local index of the label in this row, or -1
};

template <class T>
__device__ __forceinline__ float grad_elem(float z, const GradRow& gr) {
    const float a = fmaf(z, gr.k, -gr.lse2);
    const float p = ex2(a);
    // _rn: never contracted with the label term, so every code path (vector, scalar, shard
    // views) gives the same bits for the same element.
    return __fmul_rn(-p, fmaf(gr.B, fmaxf(a, CALIBRL_MIN_EXP2), gr.A));
}

template <class T>
__device__ __forceinline__ void grad_vec(const Vec16& in, Vec16& out, i64 first, const GradRow& gr) {
    constexpr int W = T::kVec;
    float x[W];
    unpack<T>(in, x);
#pragma unroll
    for (int j = 0; j < W; ++j) x[j] = grad_elem<T>(x[j], gr);
    if ((u64)(gr.label - first) < (u64)W) {
#pragma unroll
        for (int j = 0; j < W; ++j)
            if (first + j == gr.label) x[j] = __fadd_rn(x[j], gr.g_t);
    }
    out = pack<T>(x);
}

template <class T>
__device__ __forceinline__ void logits_backward(const typename T::S* logits, typename T::S* grad, i64 n_rows,
                                                i64 row_stride, i64 grad_row_stride, i64 vocab,
                                                const void* __restrict__ labels, int labels_are_i64,
                                                i64 vocab_start, float inv_t, const void* __restrict__ lse,
                                                int lse_code, const void* __restrict__ entropy, int entropy_code,
                                                const void* __restrict__ grad_logprobs, int grad_logprobs_code,
                                                const void* __restrict__ grad_entropy, int grad_entropy_code) {
    typedef typename T::S S;
    constexpr int W = T::kVec;
    const i64 tid = threadIdx.x, nt = blockDim.x;
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const S* src = logits + row * row_stride;
        S* dst = grad + row * grad_row_stride;
        const i64 label = load_label(labels, labels_are_i64, row);
        const i64 head = unaligned_head(dst, vocab);
        const i64 nvec = (vocab - head) / W;
        const i64 tail = head + nvec * W;
        // The vector path needs src and dst equally aligned (always true in place).
        const bool vec_ok = (((u64)src ^ (u64)dst) & 15u) == 0;
        if (label < 0) {  // ignored row: zero gradient
            const S zero = T::store(0.f);
            if (vec_ok) {
                for (i64 i = tid; i < head; i += nt) dst[i] = zero;
                Vec16 z;
                z.w[0] = z.w[1] = z.w[2] = z.w[3] = 0u;
                Vec16* vdst = reinterpret_cast<Vec16*>(dst + head);
                for (i64 i = tid; i < nvec; i += nt) vdst[i] = z;
                for (i64 i = tail + tid; i < vocab; i += nt) dst[i] = zero;
            } else {
                for (i64 i = tid; i < vocab; i += nt) dst[i] = zero;
            }
            continue;
        }
        const float g = load_scalar(grad_logprobs, grad_logprobs_code, row);
        const float h = grad_entropy ? load_scalar(grad_entropy, grad_entropy_code, row) : 0.f;
        const float H = (grad_entropy && entropy) ? load_scalar(entropy, entropy_code, row) : 0.f;
        GradRow gr;
        gr.k = inv_t * CALIBRL_LOG2E;
        gr.lse2 = load_scalar(lse, lse_code, row) * CALIBRL_LOG2E;
        gr.A = fmaf(h, H, g) * inv_t;
        gr.B = h * CALIBRL_LN2 * inv_t;
        gr.g_t = g * inv_t;
        const i64 local = label - vocab_start;
        gr.label = (local >= 0 && local < vocab) ? local : -1;
        if (!vec_ok) {
            for (i64 i = tid; i < vocab; i += nt) {
                float d = grad_elem<T>(T::load(src[i]), gr);
                if (i == gr.label) d = __fadd_rn(d, gr.g_t);
                dst[i] = T::store(d);
            }
            continue;
        }
        for (i64 i = tid; i < head; i += nt) {
            float d = grad_elem<T>(T::load(src[i]), gr);
            if (i == gr.label) d = __fadd_rn(d, gr.g_t);
            dst[i] = T::store(d);
        }
        const Vec16* vsrc = reinterpret_cast<const Vec16*>(src + head);
        Vec16* vdst = reinterpret_cast<Vec16*>(dst + head);
        i64 i = tid;
        for (; i + 3 * nt < nvec; i += 4 * nt) {
            Vec16 v0 = vsrc[i], v1 = vsrc[i + nt], v2 = vsrc[i + 2 * nt], v3 = vsrc[i + 3 * nt];
            Vec16 o0, o1, o2, o3;
            grad_vec<T>(v0, o0, head + i * W, gr);
            grad_vec<T>(v1, o1, head + (i + nt) * W, gr);
            grad_vec<T>(v2, o2, head + (i + 2 * nt) * W, gr);
            grad_vec<T>(v3, o3, head + (i + 3 * nt) * W, gr);
            vdst[i] = o0;
            vdst[i + nt] = o1;
            vdst[i + 2 * nt] = o2;
            vdst[i + 3 * nt] = o3;
        }
        for (; i < nvec; i += nt) {
            const Vec16 v = vsrc[i];
            Vec16 o;
            grad_vec<T>(v, o, head + i * W, gr);
            vdst[i] = o;
        }
        for (i64 j = tail + tid; j < vocab; j += nt) {
            float d = grad_elem<T>(T::load(src[j]), gr);
            if (j == gr.label) d = __fadd_rn(d, gr.g_t);
            dst[j] = T::store(d);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points. Launch: grid = min(N, 2^31 − 1) blocks (rows are grid-strided), block = a
// multiple of 32 up to 256 threads (the launch bounds keep registers at <= 64 so that four
// blocks of 256 threads fit on an SM), no dynamic shared memory.

#define CALIBRL_LOGITS_KERNELS(SUFFIX, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 4) calibrl_logits_forward_##SUFFIX(                                                  \
        const T::S* __restrict__ logits, i64 n_rows, i64 row_stride, i64 vocab, const void* __restrict__ labels, \
        int labels_are_i64, float inv_t, void* logprobs, int logprobs_code, void* entropy, int entropy_code,    \
        void* lse, int lse_code) {                                                                               \
        logits_forward<T>(logits, n_rows, row_stride, vocab, labels, labels_are_i64, inv_t, logprobs,           \
                          logprobs_code, entropy, entropy_code, lse, lse_code);                                  \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4) calibrl_logits_shard_stats_##SUFFIX(                                              \
        const T::S* __restrict__ logits, i64 n_rows, i64 row_stride, i64 vocab, const void* __restrict__ labels, \
        int labels_are_i64, i64 vocab_start, float inv_t, float* __restrict__ stats) {                           \
        logits_shard_stats<T>(logits, n_rows, row_stride, vocab, labels, labels_are_i64, vocab_start, inv_t,    \
                              stats);                                                                            \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 4) calibrl_logits_backward_##SUFFIX(                                                 \
        const T::S* logits, T::S* grad, i64 n_rows, i64 row_stride, i64 grad_row_stride, i64 vocab,             \
        const void* __restrict__ labels, int labels_are_i64, i64 vocab_start, float inv_t,                       \
        const void* __restrict__ lse, int lse_code, const void* __restrict__ entropy, int entropy_code,         \
        const void* __restrict__ grad_logprobs, int grad_logprobs_code, const void* __restrict__ grad_entropy,  \
        int grad_entropy_code) {                                                                                 \
        logits_backward<T>(logits, grad, n_rows, row_stride, grad_row_stride, vocab, labels, labels_are_i64,    \
                           vocab_start, inv_t, lse, lse_code, entropy, entropy_code, grad_logprobs,              \
                           grad_logprobs_code, grad_entropy, grad_entropy_code);                                 \
    }

CALIBRL_LOGITS_KERNELS(bf16, BF16)
CALIBRL_LOGITS_KERNELS(f16, F16)
CALIBRL_LOGITS_KERNELS(f32, F32)

// ---------------------------------------------------------------------------------------------
// Single pass (sm_90): forward and backward of full-vocabulary rows for token-local losses, whose
// ∂L/∂ℓ and ∂L/∂H are known per token before the call. Each row is read from global memory once,
// kept in the dynamic shared memory of a thread-block cluster (rank r of C holds elements
// [r·chunk, (r+1)·chunk)), and its d-logits written once: 2·N·V elements moved instead of 3.
//
// Per row: every CTA streams its chunk into shared memory while accumulating the online softmax,
// reduces it over the CTA and publishes (m, s, c) in its shared memory; cluster_sync; every
// thread merges the C partials read through DSMEM in rank order 0 … C−1 (the same bits in every
// CTA: deterministic), then each CTA writes the gradient of its chunk from shared memory. The
// partials are double-buffered by the parity of the row count, so one cluster barrier per row
// suffices; a last cluster_sync keeps every CTA's shared memory alive until the others have read
// it. The label's logit is read before the first barrier, i.e. before any CTA writes d-logits
// (in place, the label's element may belong to another CTA).
//
// Dynamic shared memory (bytes, `CALIBRL_SP_HEADER` mirrored by src/cuda/logits/geometry.rs):
//   [0, 32)    float partial[2][4]   (m, s, c, −) per row parity
//   [32, 416)  float red[3][32]      the CTA reduction's per-warp values
//   [416, …)   the chunk, element j at slot shift + j, where shift = (row address mod 16) / size,
//              so the chunk's 16-byte-aligned vectors are 16-byte-aligned here too:
//              (chunk + kVec) elements.
// Launched with cuLaunchKernelEx (cluster dimension C ∈ {1, 2, 4, 8}, grid a multiple of C);
// selected by the host only on sm_90+ when the chunk fits the device's dynamic shared memory.

#define CALIBRL_SP_HEADER 416

#if __CUDA_ARCH__ >= 900 || defined(CALIBRL_HOST_EMULATION)
#define CALIBRL_HAS_CLUSTERS 1
#ifndef CALIBRL_HOST_EMULATION
__device__ __forceinline__ unsigned cluster_ctarank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_nctarank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_id() {
    unsigned r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_count() {
    unsigned r;
    asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
    return r;
}
// Every thread of every CTA of the cluster; release/acquire orders shared-memory writes before it
// against DSMEM reads after it.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}
// The generic address of the same shared-memory location in CTA `rank` of the cluster.
template <class X>
__device__ __forceinline__ X* cluster_map(X* p, unsigned rank) {
    u64 out;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"((u64)p), "r"(rank));
    return (X*)out;
}
__device__ __forceinline__ unsigned char* dynamic_smem() {
    extern __shared__ __align__(16) unsigned char calibrl_smem[];
    return calibrl_smem;
}
#endif

// Writes the d-logits of `len` elements from the chunk in shared memory (`src`, same address mod
// 16 as the logits) to `dst`; `gr.label` is local to the chunk.
template <class T>
__device__ __forceinline__ void write_chunk_grad(const typename T::S* src, typename T::S* dst, i64 len,
                                                 bool vec_ok, const GradRow& gr) {
    constexpr int W = T::kVec;
    const i64 tid = threadIdx.x, nt = blockDim.x;
    if (!vec_ok) {
        for (i64 i = tid; i < len; i += nt) {
            float d = grad_elem<T>(T::load(src[i]), gr);
            if (i == gr.label) d = __fadd_rn(d, gr.g_t);
            dst[i] = T::store(d);
        }
        return;
    }
    const i64 head = unaligned_head(dst, len);
    const i64 nvec = (len - head) / W;
    const i64 tail = head + nvec * W;
    for (i64 i = tid; i < head; i += nt) {
        float d = grad_elem<T>(T::load(src[i]), gr);
        if (i == gr.label) d = __fadd_rn(d, gr.g_t);
        dst[i] = T::store(d);
    }
    const Vec16* vsrc = reinterpret_cast<const Vec16*>(src + head);
    Vec16* vdst = reinterpret_cast<Vec16*>(dst + head);
    for (i64 i = tid; i < nvec; i += nt) {
        Vec16 o;
        grad_vec<T>(vsrc[i], o, head + i * W, gr);
        vdst[i] = o;
    }
    for (i64 j = tail + tid; j < len; j += nt) {
        float d = grad_elem<T>(T::load(src[j]), gr);
        if (j == gr.label) d = __fadd_rn(d, gr.g_t);
        dst[j] = T::store(d);
    }
}

template <class T>
__device__ __forceinline__ void logits_single_pass(
    const typename T::S* logits, typename T::S* grad, i64 n_rows, i64 row_stride, i64 grad_row_stride, i64 vocab,
    i64 chunk, const void* __restrict__ labels, int labels_are_i64, float inv_t,
    const void* __restrict__ grad_logprobs, int grad_logprobs_code, const void* __restrict__ grad_entropy,
    int grad_entropy_code, void* logprobs, int logprobs_code, void* entropy, int entropy_code, void* lse,
    int lse_code) {
    typedef typename T::S S;
    unsigned char* smem = dynamic_smem();
    float(*partial)[4] = reinterpret_cast<float(*)[4]>(smem);
    float(*red)[32] = reinterpret_cast<float(*)[32]>(smem + 32);
    S* buf = reinterpret_cast<S*>(smem + CALIBRL_SP_HEADER);
    const unsigned rank = cluster_ctarank(), ctas = cluster_nctarank();
    const float k = inv_t * CALIBRL_LOG2E;
    const i64 c0 = (i64)rank * chunk;
    const i64 len = vocab - c0 < 0 ? 0 : (vocab - c0 < chunk ? vocab - c0 : chunk);
    const bool writer = rank == 0 && threadIdx.x == 0;
    unsigned parity = 0;
    for (i64 row = cluster_id(); row < n_rows; row += cluster_count()) {
        const S* src = logits + row * row_stride + c0;
        S* dst = grad + row * grad_row_stride + c0;
        const i64 label = load_label(labels, labels_are_i64, row);
        if (label < 0) {  // ignored row (every CTA takes this branch): zeros, the logits are not read
            const S zero = T::store(0.f);
            for (i64 i = threadIdx.x; i < len; i += blockDim.x) dst[i] = zero;
            if (writer) {
                store_scalar(logprobs, logprobs_code, row, 0.f);
                if (entropy) store_scalar(entropy, entropy_code, row, 0.f);
                store_scalar(lse, lse_code, row, 0.f);
            }
            continue;
        }
        // Before the barrier below: after it, another CTA may overwrite the label's element.
        const float zy = (writer && label < vocab) ? T::load(logits[row * row_stride + label]) : 0.f;
        S* chunk_buf = buf + (((u64)src & 15u) / sizeof(S));
        __syncthreads();  // this CTA's threads are done with the previous row's chunk
        SoftmaxAcc acc;
        acc.init();
        accumulate_row<T, true>(src, len, k, acc, chunk_buf);
        // Not block_reduce: static shared memory is not per CTA in the host emulation of a cluster.
        reduce_through(acc, k, red);
        if (threadIdx.x == 0) {
            partial[parity][0] = acc.m;
            partial[parity][1] = acc.s;
            partial[parity][2] = acc.c;
        }
        cluster_sync();  // every CTA's partials and chunk are in place
        SoftmaxAcc tot;
        tot.init();
        for (unsigned q = 0; q < ctas; ++q) {
            const float* o = cluster_map(&partial[parity][0], q);
            tot.merge(o[0], o[1], o[2], k);
        }
        parity ^= 1u;
        const float log_s = logf(tot.s);
        const float lse_v = fmaf(tot.m, inv_t, log_s);
        const float ent = log_s - CALIBRL_LN2 * tot.c / tot.s;
        if (writer) {
            const float lp = label < vocab ? fmaf(zy - tot.m, inv_t, -log_s) : CALIBRL_NAN;
            store_scalar(logprobs, logprobs_code, row, lp);
            if (entropy) store_scalar(entropy, entropy_code, row, ent);
            store_scalar(lse, lse_code, row, lse_v);
        }
        const float g = load_scalar(grad_logprobs, grad_logprobs_code, row);
        const float h = grad_entropy ? load_scalar(grad_entropy, grad_entropy_code, row) : 0.f;
        GradRow gr;
        gr.k = k;
        gr.lse2 = lse_v * CALIBRL_LOG2E;
        gr.A = fmaf(h, grad_entropy ? ent : 0.f, g) * inv_t;
        gr.B = h * CALIBRL_LN2 * inv_t;
        gr.g_t = g * inv_t;
        const i64 local = label - c0;
        gr.label = (local >= 0 && local < len) ? local : -1;
        write_chunk_grad<T>(chunk_buf, dst, len, (((u64)src ^ (u64)dst) & 15u) == 0, gr);
    }
    cluster_sync();  // no CTA leaves while another may still read its partials
}
#endif

// The kernels exist for every architecture (the module's kernel list is the same everywhere);
// below sm_90 the body is empty and the host never launches them.
#ifdef CALIBRL_HAS_CLUSTERS
#define CALIBRL_SINGLE_PASS_BODY(T)                                                                            \
    logits_single_pass<T>(logits, grad, n_rows, row_stride, grad_row_stride, vocab, chunk, labels,           \
                          labels_are_i64, inv_t, grad_logprobs, grad_logprobs_code, grad_entropy,              \
                          grad_entropy_code, logprobs, logprobs_code, entropy, entropy_code, lse, lse_code);
#else
#define CALIBRL_SINGLE_PASS_BODY(T)
#endif

#define CALIBRL_SINGLE_PASS_KERNEL(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(1024, 1) calibrl_logits_single_pass_##SUFFIX(               \
        const T::S* logits, T::S* grad, i64 n_rows, i64 row_stride, i64 grad_row_stride, i64 vocab, i64 chunk, \
        const void* __restrict__ labels, int labels_are_i64, float inv_t, const void* __restrict__ grad_logprobs, \
        int grad_logprobs_code, const void* __restrict__ grad_entropy, int grad_entropy_code, void* logprobs,   \
        int logprobs_code, void* entropy, int entropy_code, void* lse, int lse_code) {                         \
        CALIBRL_SINGLE_PASS_BODY(T)                                                                            \
    }

CALIBRL_SINGLE_PASS_KERNEL(bf16, BF16)
CALIBRL_SINGLE_PASS_KERNEL(f16, F16)
CALIBRL_SINGLE_PASS_KERNEL(f32, F32)

// Phase 2: combines all-gathered shard statistics `[R, N, 4]` (one thread per row, shards in
// order, in f64 like the CPU backend) into logprobs, entropy (optional) and lse.
extern "C" __global__ void calibrl_logits_shard_finish(const float* __restrict__ stats, i64 n_shards, i64 n_rows,
                                                       const void* __restrict__ labels, int labels_are_i64,
                                                       void* logprobs, int logprobs_code, void* entropy,
                                                       int entropy_code, void* lse, int lse_code) {
    for (i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x; row < n_rows; row += (i64)gridDim.x * blockDim.x) {
        if (load_label(labels, labels_are_i64, row) < 0) {
            store_scalar(logprobs, logprobs_code, row, 0.f);
            if (entropy) store_scalar(entropy, entropy_code, row, 0.f);
            store_scalar(lse, lse_code, row, 0.f);
            continue;
        }
        double m = -(double)CALIBRL_INF;
        bool nan = false;
        for (i64 r = 0; r < n_shards; ++r) {
            const float sm = stats[(r * n_rows + row) * 4];
            nan |= sm != sm;
            m = fmax(m, (double)sm);
        }
        double s = 0.0, sc = 0.0, t = 0.0;
        for (i64 r = 0; r < n_shards; ++r) {
            const float* st = stats + (r * n_rows + row) * 4;
            const double rm = st[0], rs = st[1], rc = st[2], rt = st[3];
            nan |= rs != rs || rc != rc || rt != rt;
            if (rs > 0.0) {
                const double scale = exp(rm - m);
                s += rs * scale;
                sc += (rc + rs * (rm - m)) * scale;
            }
            t += rt;
        }
        double lse_v = m + log(s), ent = log(s) - sc / s, lp = t - lse_v;
        if (nan || !(s > 0.0) || !(m > -(double)CALIBRL_INF)) lse_v = ent = lp = (double)CALIBRL_NAN;
        store_scalar(logprobs, logprobs_code, row, (float)lp);
        if (entropy) store_scalar(entropy, entropy_code, row, (float)ent);
        store_scalar(lse, lse_code, row, (float)lse_v);
    }
}
