// An emulated CUDA driver (libcuda.so.1) for machines without a GPU: the subset of the driver
// API that the library (src/cuda) and the GPU tests (tests/gpu_*.rs, through cudarc) call, over
// host memory, with the kernels of cuda/*.cu compiled for the host (cuda_host.h: one fiber per
// CUDA thread). So the GPU tests run unchanged, and the real src/cuda code packs the arguments,
// sizes the grids and lays out the workspaces, against the CPU backend.
//
// - One device, compute capability 9.0, CALIBRL_EMULATE_SMS multiprocessors (default 2, so grids
//   are small and the kernels' grid-stride loops run several rounds).
// - "Device" memory is host memory, filled with 0xff bytes (NaN) when allocated, so a kernel or
//   a test that reads memory nothing wrote sees NaN. Copies are checked against the allocations.
// - Streams exist as handles; every operation completes before its call returns.
// - cuModuleLoadData keeps the PTX that NVRTC produced; cuModuleGetFunction requires the kernel
//   both as a `.entry` of that PTX and in the host kernel table (kernels.h).
// - cuLaunchKernel runs the grid (1-D only); cuLaunchKernelEx too, with a thread-block cluster
//   (CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, at most 8 CTAs, the grid a multiple of it: its CTAs
//   run concurrently, see cuda_host.h). Dynamic shared memory as on sm_90: up to 48 KB, more
//   after cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) up to the opt-in limit the device
//   reports (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: 227 KB, or
//   CALIBRL_EMULATE_SMEM bytes, so tests can reach multi-CTA clusters with small rows); an
//   emulation error
//   (divergent barrier, mismatched warp collective, deadlock) fails the launch with
//   CUDA_ERROR_LAUNCH_FAILED and a line on stderr.
// - Every other entry point cudarc loads exists as a weak stub (stubs.cpp, generated) that
//   prints its name and returns CUDA_ERROR_NOT_SUPPORTED.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../cuda_host.h"
#include "kernels.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUmodule;
typedef void* CUfunction;

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
    INVALID_CLUSTER_SIZE = 912,
};

namespace emu_driver {

static std::unordered_map<std::string, Invoke>& table() {
    static std::unordered_map<std::string, Invoke> t;
    return t;
}
void register_kernel(const char* name, Invoke invoke) { table()[name] = invoke; }
Invoke find_kernel(const char* name) {
    auto it = table().find(name);
    return it == table().end() ? nullptr : it->second;
}

struct Function {
    std::string name;
    Invoke invoke;
    int max_dynamic_smem = 48 << 10;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};
struct Module {
    std::string ptx;
    std::map<std::string, Function> functions;
};

static std::mutex g_mutex;                      // allocations, modules, launches
static std::map<uintptr_t, size_t> g_allocs;    // start → bytes
static char g_primary_ctx, g_stream_tag;        // handles
static thread_local std::vector<CUcontext> g_ctx_stack;

static void report(const std::string& what) { std::fprintf(stderr, "calibrl emulated CUDA: %s\n", what.c_str()); }

// Whether [p, p + n) lies in one allocation.
static bool in_allocation(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_allocs.upper_bound((uintptr_t)p);
    if (it == g_allocs.begin()) return false;
    --it;
    return (uintptr_t)p >= it->first && (uintptr_t)p + n <= it->first + it->second;
}

static CUresult copy(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* call) {
    if (n == 0) return SUCCESS;
    if ((dst_dev && !in_allocation((CUdeviceptr)(uintptr_t)dst, n)) ||
        (src_dev && !in_allocation((CUdeviceptr)(uintptr_t)src, n))) {
        report(std::string(call) + ": " + std::to_string(n) + " bytes outside any device allocation");
        return INVALID_VALUE;
    }
    std::memmove(dst, src, n);
    return SUCCESS;
}

// N elements of 2 and 4 bytes; the destination must be aligned to them (CUDA driver API docs).
template <typename T>
static CUresult memset_n(CUdeviceptr d, T v, size_t n, const char* call) {
    if (d % sizeof(T) != 0 || (n && !in_allocation(d, n * sizeof(T)))) {
        report(std::string(call) + ": misaligned or outside any device allocation");
        return INVALID_VALUE;
    }
    for (size_t i = 0; i < n; ++i) std::memcpy((char*)(uintptr_t)d + i * sizeof(T), &v, sizeof(T));
    return SUCCESS;
}

// sm_90's opt-in dynamic shared memory per block (227 KB), or CALIBRL_EMULATE_SMEM.
static int smem_optin() {
    const char* e = std::getenv("CALIBRL_EMULATE_SMEM");
    const int n = e ? std::atoi(e) : 227 << 10;
    return n > 0 ? n : 227 << 10;
}

static int sms() {
    const char* e = std::getenv("CALIBRL_EMULATE_SMS");
    const int n = e ? std::atoi(e) : 2;
    return n > 0 ? n : 2;
}

}  // namespace emu_driver

using namespace emu_driver;

extern "C" {

int emu_unsupported(const char* name) {
    report(std::string(name) + " is not emulated");
    return NOT_SUPPORTED;
}

CUresult cuInit(unsigned) { return SUCCESS; }
// Probed by another CUDA library in the process (it copes without): no private tables here.
CUresult cuGetExportTable(const void**, const void*) { return NOT_SUPPORTED; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case SUCCESS: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        case INVALID_CLUSTER_SIZE: *s = "CUDA_ERROR_INVALID_CLUSTER_SIZE"; break;
        default: *s = nullptr; return INVALID_VALUE;
    }
    return SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    const CUresult r = cuGetErrorName(e, s);
    if (r == SUCCESS && e != SUCCESS) *s = "error in the emulated CUDA driver (see its stderr line)";
    return r;
}

// ---- devices and contexts
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (d != 0) return INVALID_DEVICE;
    std::snprintf(name, (size_t)len, "calibrl host emulation");
    return SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (d != 0) return INVALID_DEVICE;
    *bytes = size_t(16) << 30;
    return SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    *free = *total = size_t(16) << 30;
    return SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice d) {
    if (d != 0) return INVALID_DEVICE;
    switch (attribute) {
        case 1: *v = 1024; break;   // MAX_THREADS_PER_BLOCK
        case 10: *v = 32; break;    // WARP_SIZE
        case 16: *v = sms(); break; // MULTIPROCESSOR_COUNT
        case 75: *v = 9; break;     // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;     // COMPUTE_CAPABILITY_MINOR
        case 97: *v = smem_optin(); break;  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 0; break;    // MEMORY_POOLS_SUPPORTED: cudarc then uses cuMemAlloc
        default: report("cuDeviceGetAttribute(" + std::to_string(attribute) + ") is not emulated"); return NOT_SUPPORTED;
    }
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (d != 0) return INVALID_DEVICE;
    *c = &g_primary_ctx;
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) {
    if (g_ctx_stack.empty()) g_ctx_stack.push_back(c);
    else g_ctx_stack.back() = c;
    return SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = g_ctx_stack.empty() ? nullptr : g_ctx_stack.back();
    return SUCCESS;
}
CUresult cuCtxPushCurrent_v2(CUcontext c) {
    g_ctx_stack.push_back(c);
    return SUCCESS;
}
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (g_ctx_stack.empty()) return INVALID_VALUE;
    if (c) *c = g_ctx_stack.back();
    g_ctx_stack.pop_back();
    return SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return SUCCESS;
}
CUresult cuCtxSynchronize() { return SUCCESS; }

// ---- streams: every operation has completed when its call returns
CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = &g_stream_tag;
    return SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
    *s = &g_stream_tag;
    return SUCCESS;
}
CUresult cuStreamDestroy_v2(CUstream) { return SUCCESS; }
CUresult cuStreamSynchronize(CUstream) { return SUCCESS; }
CUresult cuStreamQuery(CUstream) { return SUCCESS; }

// ---- memory
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    void* m = std::malloc(n ? n : 1);
    if (!m) return OUT_OF_MEMORY;
    std::memset(m, 0xff, n);
    std::lock_guard<std::mutex> lock(g_mutex);
    g_allocs[(uintptr_t)m] = n;
    *p = (CUdeviceptr)(uintptr_t)m;
    return SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream) { return cuMemAlloc_v2(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end()) {
        report("cuMemFree of a pointer that is not an allocation");
        return INVALID_VALUE;
    }
    g_allocs.erase(it);
    std::free((void*)(uintptr_t)p);
    return SUCCESS;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) { return copy((void*)(uintptr_t)d, h, n, true, false, "cuMemcpyHtoD"); }
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) { return copy(h, (void*)(uintptr_t)d, n, false, true, "cuMemcpyDtoH"); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    return copy((void*)(uintptr_t)d, (void*)(uintptr_t)s, n, true, true, "cuMemcpyDtoD");
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream) { return cuMemcpyHtoD_v2(d, h, n); }
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream) { return cuMemcpyDtoH_v2(h, d, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoD_v2(d, s, n); }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    if (n && !in_allocation(d, n)) {
        report("cuMemsetD8 outside any device allocation");
        return INVALID_VALUE;
    }
    std::memset((void*)(uintptr_t)d, v, n);
    return SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(d, v, n); }
CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUstream) { return memset_n(d, v, n, "cuMemsetD16Async"); }
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) { return memset_n(d, v, n, "cuMemsetD32Async"); }
// For the emulated cuBLAS (tests/emulate/cublas): whether [p, p + n) lies in one allocation.
int calibrl_emu_in_allocation(const void* p, size_t n) { return in_allocation((CUdeviceptr)(uintptr_t)p, n); }

// ---- modules and launches
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (!image) return INVALID_VALUE;
    const char* ptx = (const char*)image;
    if (!std::strstr(ptx, ".entry")) {
        report("cuModuleLoadData: the image is not PTX with kernels");
        return INVALID_IMAGE;
    }
    *m = new Module{ptx, {}};
    return SUCCESS;
}
CUresult cuModuleLoadDataEx(CUmodule* m, const void* image, unsigned, void*, void*) { return cuModuleLoadData(m, image); }
CUresult cuModuleUnload(CUmodule m) {
    delete (Module*)m;
    return SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    Module* mod = (Module*)m;
    if (!mod || !name) return INVALID_HANDLE;
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = mod->functions.find(name);
    if (it == mod->functions.end()) {
        if (mod->ptx.find(std::string(".entry ") + name + "(") == std::string::npos) {
            report(std::string("cuModuleGetFunction: no kernel ") + name + " in the PTX");
            return NOT_FOUND;
        }
        Invoke invoke = find_kernel(name);
        if (!invoke) {
            report(std::string("cuModuleGetFunction: ") + name +
                   " is in the PTX but not in the emulation's kernel table (tests/emulate/driver/*_kernels.cpp)");
            return NOT_FOUND;
        }
        it = mod->functions.emplace(name, Function{name, invoke}).first;
    }
    *f = &it->second;
    return SUCCESS;
}
static CUresult run(const Function* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                    unsigned shared_bytes, unsigned cluster, void** params, void** extra) {
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || extra) {
        report(fn->name + ": only 1-D launches with a parameter array are emulated");
        return NOT_SUPPORTED;
    }
    if (shared_bytes > (unsigned)fn->max_dynamic_smem) {
        report(fn->name + ": " + std::to_string(shared_bytes) + " bytes of dynamic shared memory, above the function's " +
               std::to_string(fn->max_dynamic_smem) + " (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES)");
        return INVALID_VALUE;
    }
    std::lock_guard<std::mutex> lock(g_mutex);  // `__shared__` is static: one launch at a time
    const std::string error = try_launch(gx, bx, [&] { fn->invoke(params); }, cluster, shared_bytes);
    if (!error.empty()) {
        report(fn->name + " <<<" + std::to_string(gx) + ", " + std::to_string(bx) + ", cluster " + std::to_string(cluster) +
               ">>>: " + error);
        return LAUNCH_FAILED;
    }
    return SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, CUstream, void** params, void** extra) {
    const Function* fn = (const Function*)f;
    if (!fn) return INVALID_HANDLE;
    return run(fn, gx, gy, gz, bx, by, bz, shared_bytes, 1, params, extra);
}

// CUlaunchConfig and CUlaunchAttribute as in cuda.h (12.0+).
struct LaunchAttribute {
    int id;
    char pad[4];
    union {
        char bytes[64];
        struct {
            unsigned x, y, z;
        } cluster;
    } value;
};
struct LaunchConfig {
    unsigned gx, gy, gz, bx, by, bz, shared_bytes;
    CUstream stream;
    LaunchAttribute* attrs;
    unsigned num_attrs;
};

CUresult cuLaunchKernelEx(const LaunchConfig* config, CUfunction f, void** params, void** extra) {
    const Function* fn = (const Function*)f;
    if (!fn) return INVALID_HANDLE;
    if (!config) return INVALID_VALUE;
    unsigned cluster = 1;
    for (unsigned i = 0; i < config->num_attrs; ++i) {
        const LaunchAttribute& a = config->attrs[i];
        if (a.id != 4) {  // CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            report(fn->name + ": cuLaunchKernelEx attribute " + std::to_string(a.id) + " is not emulated");
            return NOT_SUPPORTED;
        }
        const auto& c = a.value.cluster;
        if (c.y != 1 || c.z != 1 || c.x == 0 || c.x > 8 || config->gx % c.x) {
            report(fn->name + ": cluster " + std::to_string(c.x) + "x" + std::to_string(c.y) + "x" + std::to_string(c.z) +
                   " for a grid of " + std::to_string(config->gx) +
                   " (at most 8 CTAs, 1-D, dividing the grid; no non-portable sizes)");
            return INVALID_CLUSTER_SIZE;
        }
        cluster = c.x;
    }
    return run(fn, config->gx, config->gy, config->gz, config->bx, config->by, config->bz, config->shared_bytes, cluster,
               params, extra);
}

CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    Function* fn = (Function*)f;
    if (!fn) return INVALID_HANDLE;
    if (attribute != 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        report(fn->name + ": cuFuncSetAttribute(" + std::to_string(attribute) + ") is not emulated");
        return NOT_SUPPORTED;
    }
    if (value < 0 || value > smem_optin()) {
        report(fn->name + ": MAX_DYNAMIC_SHARED_SIZE_BYTES " + std::to_string(value) + " above the device's " +
               std::to_string(smem_optin()));
        return INVALID_VALUE;
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    fn->max_dynamic_smem = value;
    return SUCCESS;
}

}  // extern "C"
