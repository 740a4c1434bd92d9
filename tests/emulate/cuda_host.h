// Host stand-ins for the CUDA built-ins the kernels use, shared by the kernel emulations in this
// folder (tests/emulate/*_emulate.cpp) and the emulated driver (tests/emulate/driver/).
//
// Each CUDA thread of a block is a fiber (ucontext) on the launching host thread; blocks run one
// after another, in a shuffled order. A thread-block cluster (sm_90; `try_launch` with
// cluster > 1) runs as one group: the fibers of all its CTAs are scheduled together, so its CTAs
// run concurrently, each with its own dynamic shared memory; the scheduler mostly runs one
// leading CTA (picked at random at the start and after each cluster barrier) so that CTAs drift
// apart. A fiber runs until it reaches a synchronising built-in, then the scheduler resumes a ready fiber picked at random (seeded, so a run is repeatable), so
// a missing __syncthreads shows up as a read of a value not yet written.
//   __syncthreads     waits for every thread of the block; reaching it while another thread of
//                     the block has exited, or while lanes wait in a warp collective, is an error.
//   __shfl_*_sync, __ballot_sync, __any_sync, __all_sync
//                     CUDA's semantics (Programming Guide, "Warp Shuffle Functions", "Warp Vote
//                     Functions"): the calling lane must be in `mask`; every non-exited lane of
//                     `mask` must call the same collective with the same mask (else an error, or
//                     a deadlock, reported); `width` segments; a lane reading from a lane that
//                     does not take part (outside `mask`, or exited) gets an undefined value,
//                     here a NaN-patterned poison; only taking part lanes count in a vote.
//   atomics           return the old value; with __threadfence they are also switch points.
//   cluster_sync      barrier.cluster.arrive + wait: every thread of every CTA of the cluster.
//   cluster_map       mapa: the address in CTA `rank`'s dynamic shared memory at the same offset
//                     (an address outside the caller's dynamic shared memory is an error).
//   dynamic_smem      the calling CTA's dynamic shared memory (`extern __shared__`), filled with
//                     0xff bytes (NaN) at the start of each cluster and again when all of a
//                     CTA's threads have exited, so a read before a write, or a DSMEM read of a
//                     CTA that has already exited, sees NaN.
// An error (mismatched collective, divergent barrier, deadlock) stops the launch and is reported
// by `try_launch`; `launch` prints it and exits. Static shared memory (`__shared__` is `static`)
// keeps its bits from block to block, where a GPU leaves it undefined, and is one object for all
// CTAs of a cluster: a kernel launched with clusters must use only dynamic shared memory.
//
// Include it before the kernel source; the file then defines CALIBRL_HOST_EMULATION and its
// source's PTX-only helpers.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

struct Dim {
    unsigned x;
};
inline thread_local Dim threadIdx, blockIdx, blockDim, gridDim;

#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __shared__ static

namespace cuda_emu {

enum class State { Ready, Barrier, ClusterBarrier, Warp, Done };
enum Collective { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL };
inline const char* collective_name(int c) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__any_sync", "__all_sync"};
    return c >= 0 && c <= ALL ? names[c] : "none";
}
// What a lane reads from a lane outside the mask (undefined in CUDA): NaN as a float or double.
constexpr uint64_t POISON = 0xfff8dead7ff8deadull;
constexpr size_t STACK_BYTES = 256 << 10;

struct Fiber {
    ucontext_t ctx;
    State state = State::Ready;
    unsigned tid = 0;  // threadIdx.x
    unsigned cta = 0;  // rank of its CTA in the cluster
    uint64_t result = 0;  // of the last warp collective
};

// The collective a warp's lanes are gathering for.
struct WarpOp {
    int kind = -1;
    unsigned mask = 0, arrived = 0;
    unsigned exited = 0;  // lanes of the warp that have returned from the kernel
    uint64_t value[32];
    int src[32];  // shuffles: the lane read (−1: own value); votes: the predicate
};

// The CTAs of one cluster (one CTA without clusters): fiber cta·threads + tid, warp
// cta·warps_per_cta + tid/32.
struct Block {
    std::vector<Fiber> fibers;
    std::vector<WarpOp> warps;
    std::vector<unsigned> ready;
    unsigned threads = 0, ctas = 1, warps_per_cta = 0, first_block = 0;
    std::vector<unsigned> at_barrier, done;  // per CTA
    unsigned at_cluster = 0, done_all = 0;
    unsigned lead = 0;  // the CTA a cluster's scheduler favours (changes at each cluster barrier)
    size_t smem_bytes = 0;
    std::vector<std::vector<uint64_t>> smem;  // per CTA, dynamic shared memory (8-byte aligned words)
    Fiber* current = nullptr;
    ucontext_t scheduler;
    std::string error;
    std::mt19937_64 rng;
    const std::function<void()>* kernel = nullptr;
};
inline thread_local Block* g_block = nullptr;

// Fiber stacks of a host thread, reused across its launches and unmapped when it ends (a guard
// page below each catches an overflow).
struct Stacks {
    static constexpr size_t PAGE = 4096;
    std::vector<char*> v;
    ~Stacks() {
        for (char* s : v) munmap(s - PAGE, STACK_BYTES + PAGE);
    }
};
inline char* stack(unsigned i) {
    static thread_local Stacks stacks;
    while (stacks.v.size() <= i) {
        void* m = mmap(nullptr, STACK_BYTES + Stacks::PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            std::perror("cuda_host.h: mmap");
            std::abort();
        }
        mprotect(m, Stacks::PAGE, PROT_NONE);
        stacks.v.push_back((char*)m + Stacks::PAGE);
    }
    return stacks.v[i];
}

// The running fiber gives control back to the scheduler (it stays in its current state).
inline void switch_out() {
    Block& b = *g_block;
    swapcontext(&b.current->ctx, &b.scheduler);
}

// Records the first error of the launch and leaves the fiber suspended for good.
inline void fail(const std::string& what) {
    Block& b = *g_block;
    if (b.error.empty()) b.error = "thread " + std::to_string(b.current->tid) + " of block " +
                                   std::to_string(blockIdx.x) + ": " + what;
    b.current->state = State::Barrier;  // never resumed
    switch_out();
    std::abort();  // unreachable
}

// A switch point: the scheduler may run other fibers first.
inline void yield() {
    if (!g_block || !g_block->current) return;
    g_block->ready.push_back((unsigned)(g_block->current - g_block->fibers.data()));
    switch_out();
}

inline void complete(unsigned w);
inline void release(Block& b, unsigned from, unsigned to, State s);

inline void poison_smem(Block& b, unsigned cta) {
    std::memset(b.smem[cta].data(), 0xff, b.smem[cta].size() * sizeof(uint64_t));
}

inline void entry() {
    Block& b = *g_block;
    (*b.kernel)();
    b.current->state = State::Done;
    const unsigned cta = b.current->cta;
    ++b.done[cta];
    ++b.done_all;
    // An exited CTA's shared memory is gone: a later DSMEM read of it sees NaN.
    if (b.done[cta] == b.threads) poison_smem(b, cta);
    // A collective waiting only for lanes that have now exited completes without them.
    const unsigned w = cta * b.warps_per_cta + (b.current->tid >> 5);
    WarpOp& op = b.warps[w];
    op.exited |= 1u << (b.current->tid & 31);
    if (op.arrived && op.arrived == (op.mask & ~op.exited)) complete(w);
    // returning resumes uc_link, the scheduler
}

inline std::string hex(unsigned m) {
    char s[16];
    std::snprintf(s, sizeof s, "0x%08x", m);
    return s;
}

// Runs one cluster (`b.ctas` CTAs of `n` threads, blocks first_block ...) to completion; returns
// false (and b.error) on an error.
inline bool run_block(Block& b, unsigned n) {
    const unsigned total = n * b.ctas;
    b.threads = n;
    b.warps_per_cta = (n + 31) / 32;
    b.fibers.assign(total, Fiber{});
    b.warps.assign(b.warps_per_cta * b.ctas, WarpOp{});
    b.ready.clear();
    b.at_barrier.assign(b.ctas, 0);
    b.done.assign(b.ctas, 0);
    b.at_cluster = b.done_all = 0;
    b.lead = b.ctas > 1 ? (unsigned)(b.rng() % b.ctas) : 0;  // single CTAs: the schedule as before
    b.smem.resize(b.ctas);
    for (unsigned c = 0; c < b.ctas; ++c) {
        b.smem[c].assign((b.smem_bytes + 7) / 8, 0);
        poison_smem(b, c);
    }
    for (unsigned i = 0; i < total; ++i) {
        Fiber& f = b.fibers[i];
        f.tid = i % n;
        f.cta = i / n;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stack(i);
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, entry, 0);
        b.ready.push_back(i);
    }
    while (b.error.empty()) {
        if (b.ready.empty()) {
            if (b.done_all == total) return true;
            bool released = false;
            for (unsigned c = 0; c < b.ctas && b.error.empty(); ++c) {
                if (b.at_barrier[c] == 0 || b.at_barrier[c] != n - b.done[c]) continue;
                if (b.done[c] > 0) {
                    b.error = "block " + std::to_string(b.first_block + c) + ": __syncthreads reached by " +
                              std::to_string(b.at_barrier[c]) + " threads while " + std::to_string(b.done[c]) +
                              " have exited";
                    break;
                }
                release(b, c * n, (c + 1) * n, State::Barrier);
                b.at_barrier[c] = 0;
                released = true;
            }
            if (!b.error.empty()) break;
            if (!released && b.at_cluster > 0 && b.at_cluster == total - b.done_all) {
                if (b.done_all > 0) {
                    b.error = "cluster of blocks " + std::to_string(b.first_block) + "+" + std::to_string(b.ctas) +
                              ": cluster_sync reached by " + std::to_string(b.at_cluster) + " threads while " +
                              std::to_string(b.done_all) + " have exited";
                    break;
                }
                release(b, 0, total, State::ClusterBarrier);
                b.at_cluster = 0;
                released = true;
            }
            if (released) continue;
            std::string why = "block " + std::to_string(b.first_block) + (b.ctas > 1 ? " (cluster)" : "") + ": deadlock:";
            for (size_t w = 0; w < b.warps.size(); ++w)
                if (b.warps[w].arrived)
                    why += " warp " + std::to_string(w) + " waits in " + collective_name(b.warps[w].kind) +
                           " (mask " + hex(b.warps[w].mask) + ", arrived " + hex(b.warps[w].arrived) + ");";
            unsigned at_barrier = 0;
            for (unsigned c = 0; c < b.ctas; ++c) at_barrier += b.at_barrier[c];
            why += " " + std::to_string(at_barrier) + " threads wait in __syncthreads, ";
            if (b.ctas > 1) why += std::to_string(b.at_cluster) + " in cluster_sync, ";
            why += std::to_string(b.done_all) + " have exited";
            unsigned in_warp = 0;
            for (const Fiber& f : b.fibers) in_warp += f.state == State::Warp;
            if (in_warp) why += ", " + std::to_string(in_warp) + " wait in warp collectives";
            b.error = why;
            break;
        }
        size_t j = b.rng() % b.ready.size();
        // In a cluster, mostly run the leading CTA's threads, so that one CTA runs far ahead of
        // the others (a missing cluster barrier then reads what they have not written yet).
        if (b.ctas > 1 && b.rng() % 4 != 0)
            for (int tries = 0; tries < 16 && b.fibers[b.ready[j]].cta != b.lead; ++tries) j = b.rng() % b.ready.size();
        const unsigned t = b.ready[j];
        b.ready[j] = b.ready.back();
        b.ready.pop_back();
        b.current = &b.fibers[t];
        threadIdx.x = b.current->tid;
        blockIdx.x = b.first_block + b.current->cta;
        swapcontext(&b.scheduler, &b.current->ctx);
        b.current = nullptr;
    }
    return false;
}

// The lane a shuffle reads (−1: its own value), after CUDA's rules for `width`.
inline int shfl_source(int kind, unsigned lane, int arg, int width) {
    const unsigned seg = lane & ~(unsigned)(width - 1), in_seg = lane & (unsigned)(width - 1);
    switch (kind) {
        case SHFL_IDX: return (int)(seg + ((unsigned)arg & (unsigned)(width - 1)));
        case SHFL_UP: return in_seg < (unsigned)arg ? -1 : (int)(lane - (unsigned)arg);
        case SHFL_DOWN: return in_seg + (unsigned)arg >= (unsigned)width ? -1 : (int)(lane + (unsigned)arg);
        default: {  // xor: later segments give the own value, earlier ones may be read
            const unsigned src = lane ^ (unsigned)arg;
            return src >= seg + (unsigned)width ? -1 : (int)src;
        }
    }
}

// One lane's part of a warp collective; returns its result once every lane of `mask` has come.
inline uint64_t collective(int kind, unsigned mask, uint64_t value, int arg) {
    Block& b = *g_block;
    Fiber& f = *b.current;
    const unsigned lane = f.tid & 31, lw = f.tid >> 5, w = f.cta * b.warps_per_cta + lw;
    const unsigned lanes = blockDim.x - 32 * lw < 32 ? blockDim.x - 32 * lw : 32;
    const unsigned exist = lanes == 32 ? ~0u : (1u << lanes) - 1u;
    if (!((mask >> lane) & 1u)) fail(std::string(collective_name(kind)) + " with mask " + hex(mask) + " that excludes the calling lane");
    if (mask & ~exist) fail(std::string(collective_name(kind)) + " with mask " + hex(mask) + " naming lanes the block does not have");
    WarpOp& op = b.warps[w];
    if (op.arrived == 0) {
        op.kind = kind;
        op.mask = mask;
    } else if (op.kind != kind || op.mask != mask) {
        fail(std::string("warp ") + std::to_string(lw) + ": " + collective_name(kind) + " (mask " + hex(mask) +
             ") while other lanes wait in " + collective_name(op.kind) + " (mask " + hex(op.mask) + ")");
    }
    op.value[lane] = value;
    op.src[lane] = arg;
    op.arrived |= 1u << lane;
    f.state = State::Warp;
    if (op.arrived == (mask & ~op.exited)) complete(w);
    switch_out();
    return f.result;
}

// Every non-exited lane of the mask has arrived: the results, and the lanes are ready again.
inline void complete(unsigned w) {
    Block& b = *g_block;
    WarpOp& op = b.warps[w];
    const unsigned in = op.arrived;  // the lanes taking part
    unsigned votes = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((in >> l) & 1u) && op.src[l]) votes |= 1u << l;
    for (unsigned l = 0; l < 32; ++l) {
        if (!((in >> l) & 1u)) continue;
        Fiber& g = b.fibers[(w / b.warps_per_cta) * b.threads + 32 * (w % b.warps_per_cta) + l];
        switch (op.kind) {
            case BALLOT: g.result = votes; break;
            case ANY: g.result = votes != 0; break;
            case ALL: g.result = votes == in; break;
            default: {
                const int src = op.src[l];
                g.result = src < 0 ? op.value[l] : ((in >> src) & 1u) ? op.value[src] : POISON;
            }
        }
        g.state = State::Ready;
        b.ready.push_back((unsigned)(&g - b.fibers.data()));
    }
    op.arrived = 0;
    op.kind = -1;
}

template <class T>
T shuffle(int kind, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8);
    if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width " + std::to_string(width) + " is not a power of two <= 32");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    const int src = shfl_source(kind, threadIdx.x & 31, arg, width);
    bits = collective(kind, mask, bits, src);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

}  // namespace cuda_emu

namespace cuda_emu {
// Makes the fibers [from, to) that wait in state `s` ready again.
inline void release(Block& b, unsigned from, unsigned to, State s) {
    for (unsigned i = from; i < to; ++i)
        if (b.fibers[i].state == s) {
            b.fibers[i].state = State::Ready;
            b.ready.push_back(i);
        }
}
}  // namespace cuda_emu

// A barrier opens as soon as its last thread arrives (the other CTAs of a cluster may be
// anywhere, so a CTA runs ahead of the others as on a GPU); a barrier that some exited thread
// can never reach is reported by the scheduler.
inline void __syncthreads() {
    cuda_emu::Block& b = *cuda_emu::g_block;
    const unsigned c = b.current->cta;
    b.current->state = cuda_emu::State::Barrier;
    if (++b.at_barrier[c] == b.threads && b.done[c] == 0) {
        cuda_emu::release(b, c * b.threads, (c + 1) * b.threads, cuda_emu::State::Barrier);
        b.at_barrier[c] = 0;
    }
    cuda_emu::switch_out();
}

// Thread-block clusters (sm_90; the PTX in cuda/logits.cu): %cluster_ctarank, %cluster_nctarank,
// %clusterid.x, %nclusterid.x, barrier.cluster.arrive + wait, mapa, extern __shared__.
inline unsigned cluster_ctarank() { return cuda_emu::g_block->current->cta; }
inline unsigned cluster_nctarank() { return cuda_emu::g_block->ctas; }
inline unsigned cluster_id() { return blockIdx.x / cuda_emu::g_block->ctas; }
inline unsigned cluster_count() { return gridDim.x / cuda_emu::g_block->ctas; }
inline void cluster_sync() {
    cuda_emu::Block& b = *cuda_emu::g_block;
    b.current->state = cuda_emu::State::ClusterBarrier;
    if (++b.at_cluster == b.threads * b.ctas && b.done_all == 0) {
        cuda_emu::release(b, 0, b.threads * b.ctas, cuda_emu::State::ClusterBarrier);
        b.at_cluster = 0;
        b.lead = (unsigned)(b.rng() % b.ctas);
    }
    cuda_emu::switch_out();
}
inline unsigned char* dynamic_smem() {
    cuda_emu::Block& b = *cuda_emu::g_block;
    return (unsigned char*)b.smem[b.current->cta].data();
}
template <class T>
T* cluster_map(T* p, unsigned rank) {
    cuda_emu::Block& b = *cuda_emu::g_block;
    const unsigned char* own = dynamic_smem();
    const size_t off = (size_t)((const unsigned char*)p - own);
    if ((const unsigned char*)p < own || off >= b.smem_bytes)
        cuda_emu::fail("cluster_map of an address outside the CTA's dynamic shared memory");
    if (rank >= b.ctas)
        cuda_emu::fail("cluster_map to rank " + std::to_string(rank) + " of a cluster of " + std::to_string(b.ctas));
    return (T*)((unsigned char*)b.smem[rank].data() + off);
}
inline void __threadfence() {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    cuda_emu::yield();
}

template <class T>
T __shfl_sync(unsigned m, T v, int src, int width = 32) { return cuda_emu::shuffle(cuda_emu::SHFL_IDX, m, v, src, width); }
template <class T>
T __shfl_up_sync(unsigned m, T v, unsigned d, int width = 32) { return cuda_emu::shuffle(cuda_emu::SHFL_UP, m, v, (int)d, width); }
template <class T>
T __shfl_down_sync(unsigned m, T v, unsigned d, int width = 32) { return cuda_emu::shuffle(cuda_emu::SHFL_DOWN, m, v, (int)d, width); }
template <class T>
T __shfl_xor_sync(unsigned m, T v, int lane_mask, int width = 32) { return cuda_emu::shuffle(cuda_emu::SHFL_XOR, m, v, lane_mask, width); }
inline unsigned __ballot_sync(unsigned m, int pred) { return (unsigned)cuda_emu::collective(cuda_emu::BALLOT, m, 0, pred != 0); }
inline int __any_sync(unsigned m, int pred) { return (int)cuda_emu::collective(cuda_emu::ANY, m, 0, pred != 0); }
inline int __all_sync(unsigned m, int pred) { return (int)cuda_emu::collective(cuda_emu::ALL, m, 0, pred != 0); }

// Atomics return the old value (fibers of a block share one host thread; the host atomic also
// orders them against other host threads).
template <class T>
T emu_atomic_add(T* p, T v) {
    const T old = __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    cuda_emu::yield();
    return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return emu_atomic_add(p, v); }

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

namespace cuda_emu {
// Launches counted per host thread, so each gets its own block order and schedule.
inline thread_local uint64_t g_launches = 0;
inline uint64_t seed() {
    static const uint64_t s = [] {
        const char* e = std::getenv("CALIBRL_EMULATE_SEED");
        return e ? std::strtoull(e, nullptr, 10) : 1ull;
    }();
    return s;
}
}  // namespace cuda_emu

// Runs `kernel` as a grid of `grid` blocks of `block` threads, block by block (or cluster by
// cluster of `cluster` blocks) in a shuffled order, with `smem_bytes` of dynamic shared memory
// per block; returns "" or the first error.
inline std::string try_launch(unsigned grid, unsigned block, const std::function<void()>& kernel,
                              unsigned cluster = 1, size_t smem_bytes = 0) {
    using namespace cuda_emu;
    if (grid == 0 || block == 0 || block > 1024) return "invalid launch geometry " + std::to_string(grid) + " x " + std::to_string(block);
    if (cluster == 0 || grid % cluster) return "grid " + std::to_string(grid) + " is not a multiple of the cluster size " + std::to_string(cluster);
    gridDim.x = grid;
    blockDim.x = block;
    Block b;
    b.kernel = &kernel;
    b.ctas = cluster;
    b.smem_bytes = smem_bytes;
    const uint64_t launch_seed = seed() * 0x9e3779b97f4a7c15ull + ++g_launches;
    b.rng.seed(launch_seed);
    const unsigned clusters = grid / cluster;
    std::vector<unsigned> order(clusters);
    for (unsigned i = 0; i < clusters; ++i) order[i] = i;
    for (unsigned i = clusters; i > 1; --i) std::swap(order[i - 1], order[b.rng() % i]);
    Block* outer = g_block;
    g_block = &b;
    std::string error;
    for (unsigned i = 0; i < clusters && error.empty(); ++i) {
        b.first_block = order[i] * cluster;
        blockIdx.x = b.first_block;
        if (!run_block(b, block)) error = b.error + " (CALIBRL_EMULATE_SEED=" + std::to_string(seed()) + ")";
    }
    g_block = outer;
    return error;
}

// try_launch for the standalone emulations: an error ends the program.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel, unsigned cluster = 1,
                   size_t smem_bytes = 0) {
    const std::string e = try_launch(grid, block, kernel, cluster, smem_bytes);
    if (!e.empty()) {
        std::printf("FAIL emulated launch: %s\n", e.c_str());
        std::exit(2);
    }
}
