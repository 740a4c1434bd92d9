// An emulated cuBLAS (libcublas.so.13) for machines without a GPU: exactly the entry points
// src/cuda/cublas.rs resolves, over the emulated driver's host memory, with the semantics of
// NVIDIA's cuBLAS documentation (cuBLAS API, "cublasGemmEx", "cublasSetStream",
// "cublasSetWorkspace", "cublasCreate"):
//
// - column-major matrices; op(X) = X for CUBLAS_OP_N, Xᵀ for CUBLAS_OP_T (and CUBLAS_OP_C, the
//   same for real types); C = alpha·op(A)·op(B) + beta·C with op(A) m×k, op(B) k×n, C m×n;
//   A is stored lda × (k if N else m) with lda >= max(1, m if N else k), B ldb × (n if N else
//   k) with ldb >= max(1, k if N else n), C ldc × n with ldc >= max(1, m); when beta == 0, C
//   need not hold valid values (it is not read);
// - the type combinations of CUBLAS_COMPUTE_32F (scale type float, host pointer mode, the
//   default): A/B CUDA_R_16BF with C CUDA_R_16BF or CUDA_R_32F, A/B CUDA_R_16F with C
//   CUDA_R_16F or CUDA_R_32F, A/B/C CUDA_R_32F; anything else is CUBLAS_STATUS_NOT_SUPPORTED;
// - float accumulation of the exact products (as the tensor cores' f32 accumulation), then
//   round to nearest even into C's type;
// - cublasSetStream resets the workspace to cuBLAS's own pool; cublasSetWorkspace needs a
//   256-byte aligned pointer.
//
// Stricter than cuBLAS, to catch misuse in the emulation (each failure prints a line starting
// "calibrl emulated cuBLAS:" and returns an error status):
// - every matrix a call reads or writes must lie inside one allocation of the emulated driver
//   (a wrong leading dimension or extent reaches outside it), be aligned to its element type,
//   and C must not overlap A or B;
// - a GEMM needs a workspace set with cublasSetWorkspace after the last cublasSetStream
//   (calibrl's rule: cuBLAS must never fall back to its own pool, which may allocate);
// - cublasCreate needs a current context, and the handle must be one cublasCreate returned.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <string>

#include "../driver/host_cvt.h"

extern "C" int calibrl_emu_in_allocation(const void* p, size_t n);  // the emulated driver
extern "C" int cuCtxGetCurrent(void** ctx);

typedef int cublasStatus_t;
enum : cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum { OP_N = 0, OP_T = 1, OP_C = 2 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68 };
enum { GEMM_DEFAULT = -1 };

namespace {

struct Handle {
    void* stream = nullptr;
    void* workspace = nullptr;  // nullptr: cuBLAS's own pool
    size_t workspace_bytes = 0;
};

std::mutex g_mutex;
std::set<Handle*> g_handles;

cublasStatus_t fail(cublasStatus_t status, const std::string& what) {
    std::fprintf(stderr, "calibrl emulated cuBLAS: %s\n", what.c_str());
    return status;
}

bool valid(Handle* h) {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_handles.count(h) != 0;
}

size_t type_size(int t) { return t == R_32F ? 4 : (t == R_16F || t == R_16BF) ? 2 : 0; }

float load(const void* base, int type, size_t i) {
    if (type == R_32F) return ((const float*)base)[i];
    unsigned short b;
    std::memcpy(&b, (const char*)base + 2 * i, 2);
    if (type == R_16F) return f16_to_f32(b);
    const unsigned u = (unsigned)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// cuBLAS rounds its bf16 results to nearest even (written here, not taken from the kernels'
// cuda/dtype.cuh, so that the emulated library stays independent of the code it checks).
unsigned short f32_to_bf16_rne(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

void store(void* base, int type, size_t i, float v) {
    if (type == R_32F) {
        ((float*)base)[i] = v;
        return;
    }
    const unsigned short b = type == R_16F ? f32_to_f16(v) : f32_to_bf16_rne(v);
    std::memcpy((char*)base + 2 * i, &b, 2);
}

// A column-major rows × cols matrix with leading dimension ld: its byte span.
struct Span {
    const char* begin;
    size_t bytes;
};
Span span(const void* p, int type, long rows, long cols, long ld) {
    if (rows == 0 || cols == 0) return {(const char*)p, 0};
    return {(const char*)p, ((size_t)(cols - 1) * ld + rows) * type_size(type)};
}

bool overlaps(Span a, Span b) {
    return a.bytes && b.bytes && a.begin < b.begin + b.bytes && b.begin < a.begin + a.bytes;
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(Handle** out) {
    void* ctx = nullptr;
    if (!out) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasCreate: handle pointer is NULL");
    if (cuCtxGetCurrent(&ctx) != 0 || !ctx) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasCreate: no current CUDA context");
    Handle* h = new Handle();
    std::lock_guard<std::mutex> lock(g_mutex);
    g_handles.insert(h);
    *out = h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(Handle* h) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_handles.erase(h)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasDestroy: not a handle");
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(Handle* h, void* stream) {
    if (!valid(h)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasSetStream: not a handle");
    h->stream = stream;
    h->workspace = nullptr;  // "unconditionally resets the cuBLAS library workspace"
    h->workspace_bytes = 0;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(Handle* h, void* workspace, size_t bytes) {
    if (!valid(h)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasSetWorkspace: not a handle");
    if ((uintptr_t)workspace % 256 != 0) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetWorkspace: pointer not 256-byte aligned");
    if (bytes && !calibrl_emu_in_allocation(workspace, bytes))
        return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetWorkspace: " + std::to_string(bytes) + " bytes outside any device allocation");
    h->workspace = workspace;
    h->workspace_bytes = bytes;
    return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
        case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
        default: return "unknown error";
    }
}

cublasStatus_t cublasGemmEx(Handle* h, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                            int Atype, int lda, const void* B, int Btype, int ldb, const void* beta, void* C, int Ctype,
                            int ldc, int computeType, int algo) {
    if (!valid(h)) return fail(CUBLAS_STATUS_NOT_INITIALIZED, "cublasGemmEx: not a handle");
    const auto op_ok = [](int t) { return t == OP_N || t == OP_T || t == OP_C; };
    if (!op_ok(transa) || !op_ok(transb)) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasGemmEx: invalid transa/transb");
    if (m < 0 || n < 0 || k < 0) return fail(CUBLAS_STATUS_INVALID_VALUE, "cublasGemmEx: negative m, n or k");
    const bool ta = transa != OP_N, tb = transb != OP_N;
    const long a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
    char dims[200];
    std::snprintf(dims, sizeof dims, "cublasGemmEx(%c%c, m=%d n=%d k=%d, lda=%d ldb=%d ldc=%d)", ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k,
                  lda, ldb, ldc);
    if (lda < std::max(1L, a_rows)) return fail(CUBLAS_STATUS_INVALID_VALUE, std::string(dims) + ": lda < max(1, rows of A)");
    if (ldb < std::max(1L, b_rows)) return fail(CUBLAS_STATUS_INVALID_VALUE, std::string(dims) + ": ldb < max(1, rows of B)");
    if (ldc < std::max(1, m)) return fail(CUBLAS_STATUS_INVALID_VALUE, std::string(dims) + ": ldc < max(1, m)");
    if (!alpha || !beta) return fail(CUBLAS_STATUS_INVALID_VALUE, std::string(dims) + ": alpha or beta is NULL");
    if (computeType != COMPUTE_32F) return fail(CUBLAS_STATUS_NOT_SUPPORTED, std::string(dims) + ": only CUBLAS_COMPUTE_32F is emulated");
    if (algo != GEMM_DEFAULT) return fail(CUBLAS_STATUS_NOT_SUPPORTED, std::string(dims) + ": only CUBLAS_GEMM_DEFAULT is emulated");
    const bool types_ok = Atype == Btype && ((Atype == R_32F && Ctype == R_32F) ||
                                             ((Atype == R_16BF || Atype == R_16F) && (Ctype == Atype || Ctype == R_32F)));
    if (!types_ok) return fail(CUBLAS_STATUS_NOT_SUPPORTED, std::string(dims) + ": type combination not supported with CUBLAS_COMPUTE_32F");
    if (!h->workspace) return fail(CUBLAS_STATUS_NOT_SUPPORTED, std::string(dims) + ": no workspace set since cublasSetStream (calibrl's rule)");
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const float a = *(const float*)alpha, b = *(const float*)beta;
    const bool reads_ab = a != 0.f && k > 0, reads_c = b != 0.f;
    const Span sa = span(A, Atype, a_rows, a_cols, lda), sb = span(B, Btype, b_rows, b_cols, ldb), sc = span(C, Ctype, m, n, ldc);
    struct Check {
        const char* name;
        Span s;
        int type;
        bool used;
    };
    for (const Check& c : {Check{"A", sa, Atype, reads_ab}, Check{"B", sb, Btype, reads_ab}, Check{"C", sc, Ctype, true}}) {
        if (!c.used) continue;
        if ((uintptr_t)c.s.begin % type_size(c.type) != 0) return fail(CUBLAS_STATUS_INVALID_VALUE, std::string(dims) + ": " + c.name + " misaligned");
        if (!calibrl_emu_in_allocation(c.s.begin, c.s.bytes))
            return fail(CUBLAS_STATUS_INVALID_VALUE, std::string(dims) + ": " + c.name + " (" + std::to_string(c.s.bytes) +
                                                         " bytes) outside any device allocation");
    }
    if (reads_ab && (overlaps(sc, sa) || overlaps(sc, sb))) return fail(CUBLAS_STATUS_INVALID_VALUE, std::string(dims) + ": C overlaps A or B");
    for (long j = 0; j < n; ++j) {
        for (long i = 0; i < m; ++i) {
            float acc = 0.f;
            if (reads_ab) {
                for (long l = 0; l < k; ++l) {
                    const float x = load(A, Atype, ta ? (size_t)(i * lda + l) : (size_t)(l * lda + i));
                    const float y = load(B, Btype, tb ? (size_t)(l * ldb + j) : (size_t)(j * ldb + l));
                    acc += x * y;
                }
            }
            const size_t ci = (size_t)(j * ldc + i);
            float out = a * acc;
            if (reads_c) out += b * load(C, Ctype, ci);
            store(C, Ctype, ci, out);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
