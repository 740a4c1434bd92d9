// Checks cuda_host.h's CUDA built-ins against the semantics the CUDA C++ Programming Guide
// documents ("Warp Shuffle Functions", "Warp Vote Functions", "Synchronization Functions",
// "Atomic Functions"), and that the emulator reports the misuses a GPU leaves undefined or hangs
// on. The kernels' emulations rely on these behaving as on a GPU.
//
// Run: scripts/emulate-kernels.sh   (g++ >= 12, C++20)

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda_host.h"

static int failures = 0;
static void expect(bool ok, const std::string& what) {
    if (!ok && failures++ < 30) std::printf("FAIL %s\n", what.c_str());
}
static void expect_error(const std::string& error, const std::string& contains, const std::string& what) {
    expect(error.find(contains) != std::string::npos, what + ": error \"" + error + "\" should contain \"" + contains + "\"");
}

int main() {
    const unsigned T = 64;  // two warps
    std::vector<int> out(T);

    // Shuffles, full warp: a lane out of range keeps its own value; width splits the warp.
    struct Case {
        const char* name;
        int (*f)(int v);
        int (*want)(unsigned lane);
    };
    const Case cases[] = {
        {"__shfl_down_sync(5)", [](int v) { return __shfl_down_sync(0xffffffffu, v, 5); },
         [](unsigned l) { return (int)(l + 5 < 32 ? l + 5 : l); }},
        {"__shfl_up_sync(3)", [](int v) { return __shfl_up_sync(0xffffffffu, v, 3); },
         [](unsigned l) { return (int)(l >= 3 ? l - 3 : l); }},
        {"__shfl_xor_sync(9)", [](int v) { return __shfl_xor_sync(0xffffffffu, v, 9); },
         [](unsigned l) { return (int)(l ^ 9); }},
        {"__shfl_sync(src 37)", [](int v) { return __shfl_sync(0xffffffffu, v, 37); },  // src modulo width
         [](unsigned) { return 5; }},
        {"__shfl_down_sync(2, width 8)", [](int v) { return __shfl_down_sync(0xffffffffu, v, 2, 8); },
         [](unsigned l) { return (int)((l & 7) + 2 < 8 ? l + 2 : l); }},
        {"__shfl_up_sync(1, width 4)", [](int v) { return __shfl_up_sync(0xffffffffu, v, 1, 4); },
         [](unsigned l) { return (int)((l & 3) >= 1 ? l - 1 : l); }},
        {"__shfl_sync(src 1, width 16)", [](int v) { return __shfl_sync(0xffffffffu, v, 1, 16); },
         [](unsigned l) { return (int)((l & ~15u) + 1); }},
        // xor reaching a later segment returns the own value, an earlier one is read
        {"__shfl_xor_sync(8, width 8)", [](int v) { return __shfl_xor_sync(0xffffffffu, v, 8, 8); },
         [](unsigned l) { return (int)((l & 8) ? l ^ 8 : l); }},
    };
    for (const Case& c : cases) {
        launch(1, T, [&] { out[threadIdx.x] = c.f((int)(threadIdx.x & 31)); });
        for (unsigned t = 0; t < T; ++t)
            expect(out[t] == c.want(t & 31), std::string(c.name) + " lane " + std::to_string(t) + ": " + std::to_string(out[t]));
    }

    // Partial masks: only the even lanes call. Reading an odd (non-participating) lane is
    // undefined (poison: NaN), lane 31 included; reading an even lane works.
    std::vector<double> got(T, 0.0);
    launch(1, 32, [&] {
        const unsigned lane = threadIdx.x;
        if (lane % 2 == 0) {
            got[lane] = __shfl_down_sync(0x55555555u, (double)lane, 1);      // reads odd lanes
            out[lane] = (int)__shfl_down_sync(0x55555555u, (double)lane, 2);  // reads even lanes
        }
    });
    for (unsigned l = 0; l < 32; l += 2) {
        expect(std::isnan(got[l]), "shuffle from a lane outside the mask gives poison, lane " + std::to_string(l));
        expect(out[l] == (int)(l + 2 < 32 ? l + 2 : l), "shuffle within a partial mask, lane " + std::to_string(l));
    }

    // Votes: lanes outside the mask add nothing.
    std::vector<unsigned> votes(T);
    launch(1, T, [&] {
        const unsigned lane = threadIdx.x & 31;
        votes[threadIdx.x] = __ballot_sync(0xffffffffu, lane % 3 == 0);
    });
    for (unsigned t = 0; t < T; ++t) expect(votes[t] == 0x49249249u, "ballot lane " + std::to_string(t));
    launch(1, 32, [&] {
        const unsigned lane = threadIdx.x;
        if (lane < 16) {
            votes[lane] = __ballot_sync(0x0000ffffu, 1);
            out[lane] = __any_sync(0x0000ffffu, lane == 7) + 2 * __all_sync(0x0000ffffu, lane < 16) +
                        4 * __all_sync(0x0000ffffu, lane != 3);
        }
    });
    for (unsigned l = 0; l < 16; ++l) {
        expect(votes[l] == 0xffffu, "ballot with a half mask, lane " + std::to_string(l));
        expect(out[l] == 3, "any/all with a half mask, lane " + std::to_string(l));
    }

    // Atomics return the old value; the tickets are a permutation.
    unsigned counter = 0;
    std::vector<unsigned> tickets(T);
    launch(1, T, [&] { tickets[threadIdx.x] = atomicAdd(&counter, 1u); });
    std::vector<int> seen(T, 0);
    for (unsigned t = 0; t < T; ++t) seen[tickets[t] < T ? tickets[t] : 0]++;
    bool perm = counter == T;
    for (unsigned t = 0; t < T; ++t) perm = perm && seen[t] == 1;
    expect(perm, "atomicAdd tickets are 0 … T-1 once each");

    // Blocks run in a shuffled order: the last ticket is not always the last block.
    bool last_varies = false;
    for (int run = 0; run < 8 && !last_varies; ++run) {
        unsigned ticket = 0, last = 0;
        launch(8, 32, [&] {
            if (threadIdx.x == 0 && atomicAdd(&ticket, 1u) == 7u) last = blockIdx.x;
        });
        last_varies = last != 7;
    }
    expect(last_varies, "block order is shuffled");

    // Misuses are errors, never silently "working".
    expect_error(try_launch(1, 32, [&] { __shfl_down_sync(0xfffffffeu, 1, 1); }), "excludes the calling lane",
                 "a mask without the caller");
    expect_error(try_launch(1, 64, [&] {
                     if (threadIdx.x < 16) __shfl_down_sync(0xffffffffu, 1, 1);
                     else __syncthreads();
                 }),
                 "deadlock", "lanes of the mask that wait elsewhere");
    // Lanes of the mask that have exited do not take part (CUDA: "all non-exited threads named
    // in mask"): the others complete, and reading an exited lane is undefined (poison).
    launch(1, 32, [&] {
        if (threadIdx.x >= 16) return;
        got[threadIdx.x] = __shfl_down_sync(0xffffffffu, (double)threadIdx.x, 8);
        votes[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
    });
    for (unsigned l = 0; l < 16; ++l) {
        expect(l < 8 ? got[l] == l + 8.0 : std::isnan(got[l]), "shuffle with exited lanes, lane " + std::to_string(l));
        expect(votes[l] == 0xffffu, "ballot with exited lanes, lane " + std::to_string(l));
    }
    expect_error(try_launch(1, 32, [&] {
                     if (threadIdx.x & 1) __shfl_xor_sync(0xffffffffu, 1, 1);
                     else __ballot_sync(0xffffffffu, 1);
                 }),
                 "while other lanes wait", "different collectives in one warp");
    expect_error(try_launch(1, 64, [&] {
                     if (threadIdx.x == 5) return;
                     __syncthreads();
                 }),
                 "have exited", "__syncthreads after a thread exited");
    expect_error(try_launch(1, 64, [&] {
                     if (threadIdx.x < 48) __syncthreads();
                     else __shfl_down_sync(0xffffffffu, 1, 1);
                 }),
                 "deadlock", "__syncthreads in half a warp, a collective in the other half");
    expect_error(try_launch(1, 48, [&] { __ballot_sync(0xffffffffu, 1); }), "does not have",
                 "a full mask in a partial warp");

    // A missing barrier shows: thread 0 sums what the others wrote, without __syncthreads.
    int wrong = 0;
    for (int run = 0; run < 20; ++run) {
        static int slots[T];
        int total = -1;
        launch(1, T, [&] {
            slots[threadIdx.x] = 0;
            __syncthreads();
            slots[threadIdx.x] = 1;
            if (threadIdx.x == 0) {
                int s = 0;
                for (unsigned t = 0; t < T; ++t) s += slots[t];
                total = s;
            }
        });
        wrong += total != (int)T;
    }
    expect(wrong > 0, "a read without __syncthreads sees unwritten values in some schedule");


    // Clusters: each CTA writes its rank into its own dynamic shared memory; after cluster_sync
    // every thread reads every CTA's value through cluster_map (DSMEM).
    {
        const unsigned C = 4, B = 64;
        std::vector<float> seen(8 * B * C, -1.f);
        launch(8 * C, B, [&] {
            float* mine = (float*)dynamic_smem();
            if (threadIdx.x == 0) mine[1] = (float)(cluster_ctarank() + 10 * cluster_id());
            expect(blockIdx.x == cluster_id() * C + cluster_ctarank() && cluster_count() == 8 && cluster_nctarank() == C,
                   "cluster indices");
            cluster_sync();
            float s = 0.f;
            for (unsigned r = 0; r < C; ++r) s += *cluster_map(&mine[1], r);
            seen[blockIdx.x * B + threadIdx.x] = s;
            cluster_sync();  // no CTA exits while another may still read its shared memory
        }, C, 64);
        bool right = true;
        for (unsigned blk = 0; blk < 8 * C; ++blk)
            for (unsigned t = 0; t < B; ++t) right = right && seen[blk * B + t] == 6.f + 40.f * (float)(blk / C);
        expect(right, "cluster_map reads every CTA's shared memory after cluster_sync");
    }
    // Without the first cluster_sync, or without the last one (a CTA exits while the others
    // still read its shared memory), some schedule reads NaN (unwritten or released memory).
    for (int missing = 0; missing < 2; ++missing) {
        int nan_reads = 0;
        for (int run = 0; run < 20; ++run)
            launch(2, 32, [&] {
                float* mine = (float*)dynamic_smem();
                if (threadIdx.x == 0) mine[0] = 1.f;
                if (missing == 1) cluster_sync();
                __syncthreads();
                const float other = *cluster_map(&mine[0], cluster_ctarank() ^ 1u);
                if (other != other) __atomic_fetch_add(&nan_reads, 1, __ATOMIC_RELAXED);
            }, 2, 16);
        expect(nan_reads > 0, missing == 0 ? "a DSMEM read without cluster_sync sees unwritten memory"
                                           : "a DSMEM read of an exited CTA sees released memory");
    }
    expect_error(try_launch(2, 32, [&] {
                     if (cluster_ctarank() == 0 || threadIdx.x < 16) cluster_sync();
                     else __syncthreads();
                 }, 2, 16),
                 "deadlock", "cluster_sync in one CTA, half of the other in __syncthreads");
    expect_error(try_launch(2, 32, [&] {
                     if (threadIdx.x == 3) return;
                     cluster_sync();
                 }, 2, 16),
                 "have exited", "cluster_sync after a thread exited");
    expect_error(try_launch(2, 32, [&] { float x = 0; cluster_map(&x, 1); }, 2, 16), "outside the CTA's dynamic shared memory",
                 "cluster_map of a non-shared address");
    expect_error(try_launch(3, 32, [&] {}, 2, 16), "not a multiple of the cluster size", "a grid not made of whole clusters");

    std::printf("primitives_emulate: %d failures\n", failures);
    return failures == 0 ? 0 : 1;
}
