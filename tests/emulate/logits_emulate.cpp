// Host-side emulation of cuda/logits.cu for machines without a GPU (CUDA built-ins from
// cuda_host.h: threads are std::threads, blocks run one after another). It checks the kernels'
// indexing (unaligned heads, vector bodies, tails, strided shard views, in place / out of place),
// the online-softmax rescaling and the reductions against a double-precision reference. It does not replace the
// GPU tests (tests/gpu_logits.rs): no real memory model, no PTX, exp2 instead of ex2.approx.
//
// Run: scripts/emulate-kernels.sh   (g++ >= 12, C++20)

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_host.h"

// The PTX-only conversions (and ex2.approx.ftz) on the host, shared with the emulated driver.
#include "driver/host_cvt.h"

#include "../../cuda/logits.cu"

// ---------------------------------------------------------------------------------------------

// Same rule as src/cuda/logits/geometry.rs `row_geometry`.
static unsigned row_threads(long long v, int elem_size) {
    long long wanted = (v + (16 / elem_size) * 4 - 1) / ((16 / elem_size) * 4);
    long long p = 1;
    while (p < wanted) p <<= 1;
    return (unsigned)std::min(256LL, std::max(32LL, p));
}

enum class Dt { BF16, F16, F32 };
static int esize(Dt d) { return d == Dt::F32 ? 4 : 2; }
static const char* dname(Dt d) { return d == Dt::BF16 ? "bf16" : d == Dt::F16 ? "f16" : "f32"; }

static void put(Dt d, unsigned char* base, long long i, float v) {
    if (d == Dt::F32) std::memcpy(base + 4 * i, &v, 4);
    else {
        unsigned short h = d == Dt::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
        std::memcpy(base + 2 * i, &h, 2);
    }
}
static float get(Dt d, const unsigned char* base, long long i) {
    if (d == Dt::F32) {
        float v;
        std::memcpy(&v, base + 4 * i, 4);
        return v;
    }
    unsigned short h;
    std::memcpy(&h, base + 2 * i, 2);
    return d == Dt::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static int failures = 0;
static void check(const std::string& what, double got, double want, double tol) {
    const bool ok = std::isnan(want) ? std::isnan(got)
                    : std::isinf(want) ? got == want
                                       : std::isfinite(got) && std::fabs(got - want) <= tol;
    if (!ok && failures++ < 20) std::printf("FAIL %s: got %.9g want %.9g (tol %.3g)\n", what.c_str(), got, want, tol);
}

struct RowRef {
    double lse, ent, lp, m, s, c, target;
};

// Double-precision reference of one (shard) row of u = z / T.
static RowRef reference(const std::vector<float>& z, double t, long long label_local) {
    double m = -INFINITY;
    for (float x : z) m = std::max(m, x / t);
    double s = 0, c = 0;
    for (float x : z) {
        double d = x / t - m;
        double e = std::exp(d);
        s += e;
        if (e > 0) c += e * d;
    }
    RowRef r;
    r.m = m;
    r.s = s;
    r.c = c;
    r.lse = m + std::log(s);
    r.ent = std::log(s) - c / s;
    r.target = (label_local >= 0 && label_local < (long long)z.size()) ? z[label_local] / t : 0.0;
    r.lp = r.target - r.lse;
    return r;
}

int main() {
    std::mt19937_64 rng(12345);
    std::normal_distribution<float> normal(0.f, 3.f);
    std::uniform_real_distribution<float> unif(0.f, 1.f);
    int cases = 0;
    for (Dt dt : {Dt::BF16, Dt::F16, Dt::F32}) {
        for (long long v : {1LL, 5LL, 13LL, 100LL, 1029LL, 5000LL}) {
            for (long long offset : {0LL, 1LL, 3LL}) {
                const long long n = 5, pad = (v % 2) + 2 * offset, stride = v + pad;
                const double temperature = offset == 1 ? 0.7 : 1.0;
                const float inv_t = (float)(1.0 / temperature);
                const bool extreme = offset == 3;
                const int es = esize(dt);
                std::string tag = std::string(dname(dt)) + " V=" + std::to_string(v) + " offset=" + std::to_string(offset);
                ++cases;
                // Logits buffer: `offset` elements of slack before row 0.
                std::vector<unsigned char> buf((offset + n * stride + 8) * es + 16);
                unsigned char* base = buf.data() + 16 - ((uintptr_t)buf.data() & 15);  // 16-aligned
                std::vector<std::vector<float>> rows(n, std::vector<float>(v));
                for (long long k = 0; k < n; ++k)
                    for (long long j = 0; j < v; ++j) {
                        float z = normal(rng) + (k - 2) * 7.f;
                        if (extreme && j > 0) {
                            float r = unif(rng);
                            if (r < 0.05f) z = 1e4f;
                            else if (r < 0.1f) z = -1e4f;
                            else if (r < 0.2f) z = -INFINITY;
                        }
                        put(dt, base, offset + k * stride + j, z);
                        rows[k][j] = get(dt, base, offset + k * stride + j);
                    }
                std::vector<long long> labels(n);
                for (long long k = 0; k < n; ++k) labels[k] = k == 1 ? -1 : (long long)(rng() % v);
                const unsigned char* logits = base + offset * es;
                const unsigned threads = row_threads(v, es);
                const unsigned grid = 2;  // fewer blocks than rows: exercises the grid-stride loop

                // Forward.
                std::vector<float> lp(n, NAN), ent(n, NAN), lse(n, NAN);
                auto fwd = [&] {
                    if (dt == Dt::BF16)
                        calibrl_logits_forward_bf16((const u16*)logits, n, stride, v, labels.data(), 1, inv_t, lp.data(), 0,
                                                    ent.data(), 0, lse.data(), 0);
                    else if (dt == Dt::F16)
                        calibrl_logits_forward_f16((const u16*)logits, n, stride, v, labels.data(), 1, inv_t, lp.data(), 0,
                                                   ent.data(), 0, lse.data(), 0);
                    else
                        calibrl_logits_forward_f32((const float*)logits, n, stride, v, labels.data(), 1, inv_t, lp.data(), 0,
                                                   ent.data(), 0, lse.data(), 0);
                };
                launch(grid, threads, fwd);
                std::vector<RowRef> refs(n);
                for (long long k = 0; k < n; ++k) {
                    refs[k] = reference(rows[k], temperature, labels[k]);
                    const double tol = 2e-5 + 1e-6 * (std::fabs(refs[k].m) + std::fabs(refs[k].lp));
                    const std::string w = tag + " row " + std::to_string(k);
                    if (labels[k] < 0) {
                        check(w + " ignored lp", lp[k], 0, 0);
                        check(w + " ignored lse", lse[k], 0, 0);
                        continue;
                    }
                    check(w + " lse", lse[k], refs[k].lse, tol);
                    check(w + " entropy", ent[k], refs[k].ent, tol);
                    check(w + " logprob", lp[k], refs[k].lp, tol);
                }

                // Shards: two uneven shards (a strided, possibly unaligned view each), then finish.
                const long long cut = v / 3;
                std::vector<std::pair<long long, long long>> shards = {{0, cut}, {cut, v - cut}};
                if (cut == 0) shards = {{0, v}};
                const long long r_count = (long long)shards.size();
                std::vector<float> stats(r_count * n * 4, NAN);
                for (long long r = 0; r < r_count; ++r) {
                    const long long start = shards[r].first, len = shards[r].second;
                    const unsigned char* view = logits + start * es;
                    float* st = stats.data() + r * n * 4;
                    auto k1 = [&] {
                        if (dt == Dt::BF16)
                            calibrl_logits_shard_stats_bf16((const u16*)view, n, stride, len, labels.data(), 1, start, inv_t, st);
                        else if (dt == Dt::F16)
                            calibrl_logits_shard_stats_f16((const u16*)view, n, stride, len, labels.data(), 1, start, inv_t, st);
                        else
                            calibrl_logits_shard_stats_f32((const float*)view, n, stride, len, labels.data(), 1, start, inv_t, st);
                    };
                    launch(grid, row_threads(len, es), k1);
                    for (long long k = 0; k < n; ++k) {
                        std::vector<float> part(rows[k].begin() + start, rows[k].begin() + start + len);
                        RowRef pr = reference(part, temperature, labels[k] - start);
                        const std::string w = tag + " shard " + std::to_string(r) + " row " + std::to_string(k);
                        check(w + " m", st[k * 4], pr.m, 1e-6 * std::fabs(pr.m) + 1e-6);
                        if (std::isfinite(pr.m)) {
                            check(w + " s", st[k * 4 + 1], pr.s, 1e-5 * pr.s + 1e-6 * std::fabs(pr.m) * pr.s);
                            check(w + " c", st[k * 4 + 2], pr.c, 1e-5 * std::fabs(pr.c) + 1e-5 * pr.s + 1e-6 * std::fabs(pr.m) * pr.s);
                        }
                        check(w + " target", st[k * 4 + 3], pr.target, 1e-6 * std::fabs(pr.target));
                    }
                }
                std::vector<float> lp2(n, NAN), ent2(n, NAN), lse2(n, NAN);
                launch(1, 128, [&] {
                    calibrl_logits_shard_finish(stats.data(), r_count, n, labels.data(), 1, lp2.data(), 0, ent2.data(), 0,
                                                lse2.data(), 0);
                });
                for (long long k = 0; k < n; ++k) {
                    const std::string w = tag + " finish row " + std::to_string(k);
                    const double tol = 3e-5 + 1e-6 * (std::fabs(refs[k].m) + std::fabs(refs[k].lp));
                    check(w + " lse", lse2[k], labels[k] < 0 ? 0 : refs[k].lse, tol);
                    check(w + " entropy", ent2[k], labels[k] < 0 ? 0 : refs[k].ent, tol);
                    check(w + " logprob", lp2[k], labels[k] < 0 ? 0 : refs[k].lp, tol);
                }

                // Backward: out of place into a buffer with a different misalignment (scalar path),
                // out of place equally aligned, and in place.
                std::vector<float> g(n), h(n);
                for (long long k = 0; k < n; ++k) {
                    g[k] = normal(rng);
                    h[k] = normal(rng) * 0.2f;
                }
                for (int mode = 0; mode < 3; ++mode) {
                    std::vector<unsigned char> obuf((n * stride + 16) * es + 32, 0xff);  // NaN-ish poison
                    unsigned char* obase = obuf.data() + 16 - ((uintptr_t)obuf.data() & 15);
                    unsigned char* out = mode == 0 ? obase + (offset + 1) * es : mode == 1 ? obase + offset * es : (unsigned char*)logits;
                    std::vector<unsigned char> saved(buf);  // restore logits after in place
                    auto k2 = [&] {
                        if (dt == Dt::BF16)
                            calibrl_logits_backward_bf16((const u16*)logits, (u16*)out, n, stride, stride, v, labels.data(), 1, 0,
                                                         inv_t, lse.data(), 0, ent.data(), 0, g.data(), 0, h.data(), 0);
                        else if (dt == Dt::F16)
                            calibrl_logits_backward_f16((const u16*)logits, (u16*)out, n, stride, stride, v, labels.data(), 1, 0,
                                                        inv_t, lse.data(), 0, ent.data(), 0, g.data(), 0, h.data(), 0);
                        else
                            calibrl_logits_backward_f32((const float*)logits, (float*)out, n, stride, stride, v, labels.data(), 1, 0,
                                                        inv_t, lse.data(), 0, ent.data(), 0, g.data(), 0, h.data(), 0);
                    };
                    launch(grid, threads, k2);
                    const double rel = dt == Dt::F32 ? 1e-5 : dt == Dt::F16 ? 2e-3 : 1e-2;
                    for (long long k = 0; k < n; ++k) {
                        const double scale = (std::fabs(g[k]) + std::fabs(h[k]) * (std::fabs(ent[k]) + 30)) * inv_t;
                        for (long long j = 0; j < v; ++j) {
                            double want = 0;
                            if (labels[k] >= 0) {
                                const double u = rows[k][j] / temperature;
                                const double logp = u - lse[k];
                                const double p = std::exp(logp);
                                want = -g[k] * p;
                                if (p > 0) want -= h[k] * p * (logp + ent[k]);
                                if (j == labels[k]) want += g[k];
                                want /= temperature;
                            }
                            const double got = get(dt, out, k * stride + j);
                            const double tol = rel * std::fabs(want) + (1e-5 + 1e-6 * std::fabs(refs[k].m)) * scale + 1e-7;
                            check(tag + " mode " + std::to_string(mode) + " grad[" + std::to_string(k) + "," + std::to_string(j) + "]",
                                  got, want, tol);
                        }
                    }
                    std::memcpy(buf.data(), saved.data(), buf.size());
                }
            }
        }
    }
    {
        // Non-finite rows: NaN, +inf, entirely -inf -> NaN outputs (the kernels cannot report
        // errors); a finite row next to them is unaffected.
        const long long n = 4, v = 100;
        std::vector<float> z(n * v, 0.5f);
        z[v + 17] = NAN;
        z[2 * v + 3] = INFINITY;
        for (long long j = 0; j < v; ++j) z[3 * v + j] = -INFINITY;
        std::vector<long long> labels = {1, 2, 3, 4};
        std::vector<float> lp(n, 7), ent(n, 7), lse(n, 7);
        launch(2, row_threads(v, 4), [&] {
            calibrl_logits_forward_f32(z.data(), n, v, v, labels.data(), 1, 1.f, lp.data(), 0, ent.data(), 0, lse.data(), 0);
        });
        check("non-finite: finite row lse", lse[0], 0.5 + std::log(100.0), 1e-5);
        for (long long k = 1; k < n; ++k) check("non-finite: logprob row " + std::to_string(k), lp[k], NAN, 0);
        check("non-finite: NaN row lse", lse[1], NAN, 0);
        check("non-finite: +inf row lse", lse[2], NAN, 0);
        ++cases;
    }
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures ? 1 : 0;
}
