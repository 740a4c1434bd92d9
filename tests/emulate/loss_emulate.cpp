// Host-side emulation of the entropy-control kernels of cuda/loss.cu (Clip-Cov / KL-Cov, SPEC
// §4.6) for machines without a GPU (CUDA built-ins from cuda_host.h: threads are std::threads,
// blocks run one after another, so the "last block" of a ticket is the final one). It runs
// calibrl_cov_prepare, the calibrl_cov_histogram passes and calibrl_loss_any as src/cuda/cov.rs
// and src/cuda/loss/ launch them, and checks against a plain reference written here after
// src/cpu/cov.rs (sort the candidates' (key, flat index), take n):
//   - the same selected tokens (many tied advantages and log-probs, so KL-Cov ties are common;
//     n = 1, n = candidates − 1, = candidates, > candidates; caller-given means and count),
//   - the means to the bit (the fixed summation order of src/cpu/cov.rs `fixed_order_sum`),
//   - the same selection, means and gradients whatever the grid size,
//   - the loss kernel's gradients and the cov_selected_frac metric,
//   - special values: equal advantages (A − mean A exactly 0, ties by position) and covariances
//     that overflow to ±inf or NaN (never selected, SPEC §4.6),
//   - the `authors` preset (SPEC §4.7): calibrl_loss_counts' two pairs of counts, or the given
//     ones, the dual clip at c_dual = 0.5, rollout-row and all-row denominators.
// It does not replace the GPU tests (tests/gpu_loss.rs): no real memory model, no concurrency
// between blocks, no PTX, and the host's exp.
//
// Run: scripts/emulate-kernels.sh   (g++ >= 12, C++20)

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_host.h"

// The PTX-only conversions (and ex2.approx.ftz) on the host, shared with the emulated driver.
#include "driver/host_cvt.h"

#include "../../cuda/loss.cu"

// ---------------------------------------------------------------------------------------------

static int failures = 0;
static void fail(const std::string& what) {
    if (failures++ < 30) std::printf("FAIL %s\n", what.c_str());
}

// ---------------------------------------------------------------- reference (src/cpu/cov.rs)

struct Tok {
    long long k;
    double a, logp;
    bool clipped;
};

static unsigned long long splitmix(unsigned long long seed, unsigned long long k) {
    unsigned long long z = seed * 0x9E3779B97F4A7C15ull + k + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// cpu::cov::block_sum
static double ref_block_sum(const double* v) {
    double total = 0.0;
    for (int w = 0; w < 8; ++w) {
        double x[32];
        std::memcpy(x, v + 32 * w, sizeof x);
        for (int o = 16; o > 0; o >>= 1)
            for (int l = 0; l < o; ++l) x[l] += x[l + o];
        total += x[0];
    }
    return total;
}

// cpu::cov::fixed_order_sum (tokens in increasing k)
static double ref_fixed_sum(const std::vector<Tok>& toks, double (*f)(const Tok&)) {
    double across[256] = {};
    size_t j = 0;
    const long long tiles = toks.empty() ? 0 : toks.back().k / 2048 + 1;
    for (long long tile = 0; tile < tiles; ++tile) {
        double threads[256] = {};
        for (; j < toks.size() && toks[j].k / 2048 == tile; ++j) threads[(toks[j].k % 2048) / 8] += f(toks[j]);
        across[tile % 256] += ref_block_sum(threads);
    }
    return ref_block_sum(across);
}

struct Given {
    bool on = false;
    double adv_mean = 0, logprob_mean = 0, count = 0;
};

struct RefResult {
    std::vector<long long> selected;  // increasing
    double adv_mean, logprob_mean, frac;
    size_t candidates;
};

static RefResult reference(int control, double ratio, double lb, double ub, unsigned long long seed, const Given& g,
                           const std::vector<Tok>& toks) {
    RefResult r{};
    const double n_local = (double)toks.size();
    // cpu::cov::advantage_mean: the common value, exactly, when every advantage is equal.
    bool equal = true;
    for (const Tok& t : toks) equal = equal && t.a == toks[0].a;
    r.adv_mean = g.on ? g.adv_mean
                      : toks.empty() ? 0.0
                      : equal ? toks[0].a
                              : ref_fixed_sum(toks, [](const Tok& t) { return t.a; }) / n_local;
    r.logprob_mean =
        g.on ? g.logprob_mean : (n_local > 0 ? ref_fixed_sum(toks, [](const Tok& t) { return t.logp; }) / n_local : 0.0);
    const double n_tok = g.on ? g.count : n_local;
    const double nd = std::max(std::floor(ratio * n_tok), 1.0);
    const size_t n = nd >= 1.8e19 ? SIZE_MAX : (size_t)nd;
    std::vector<double> cov;
    for (const Tok& t : toks) cov.push_back((t.a - r.adv_mean) * (t.logp - r.logprob_mean));
    if (control == EC_CLIP_COV) {
        std::vector<std::pair<unsigned long long, long long>> cand;
        for (size_t j = 0; j < toks.size(); ++j)
            if (!toks[j].clipped && lb < cov[j] && cov[j] < ub) cand.push_back({splitmix(seed, toks[j].k), toks[j].k});
        std::sort(cand.begin(), cand.end());
        r.candidates = cand.size();
        for (size_t j = 0; j < std::min(n, cand.size()); ++j) r.selected.push_back(cand[j].second);
    } else {
        // Finite covariances only (SPEC §4.6), largest first, ties by position.
        std::vector<size_t> order;
        for (size_t j = 0; j < toks.size(); ++j)
            if (std::isfinite(cov[j])) order.push_back(j);
        std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return cov[x] > cov[y]; });
        r.candidates = order.size();
        for (size_t j = 0; j < std::min(n, order.size()); ++j) r.selected.push_back(toks[order[j]].k);
    }
    std::sort(r.selected.begin(), r.selected.end());
    r.frac = toks.empty() ? 0.0 : (double)r.selected.size() / n_local;
    return r;
}

// ---------------------------------------------------------------- a batch and its launches

struct Batch {
    bool packed;
    bool plain;  // no mask and no expert flags passed (every position counts, no expert row)
    long long rows, seq_len, numel;
    std::vector<long long> offsets;  // packed
    std::vector<unsigned char> mask, is_expert;
    std::vector<double> logp, old, adv;
    int dt;                              // DT_F32, DT_BF16 or DT_F64 for ℓ and ℓold
    std::vector<unsigned char> lp_raw, old_raw;  // their storage
};

static void encode(int dt, const std::vector<double>& v, std::vector<unsigned char>& raw, std::vector<double>& back) {
    const int es = dt == DT_F64 ? 8 : dt == DT_F32 ? 4 : 2;
    raw.assign(v.size() * es + 8, 0);
    back.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
        if (dt == DT_F64) std::memcpy(&raw[8 * i], &v[i], 8), back[i] = v[i];
        else if (dt == DT_F32) {
            float f = (float)v[i];
            std::memcpy(&raw[4 * i], &f, 4);
            back[i] = f;
        } else {
            unsigned short h = f32_to_bf16((float)v[i]);
            std::memcpy(&raw[2 * i], &h, 2);
            back[i] = bf16_to_f32(h);
        }
    }
}

static Batch make_batch(std::mt19937_64& rng, long long rows, long long max_len, bool packed, int dt, bool plain) {
    Batch b;
    b.packed = packed;
    b.plain = plain;
    b.rows = rows;
    b.dt = dt;
    std::vector<long long> lens(rows);
    for (auto& l : lens) l = plain && !packed ? max_len : rng() % 9 == 0 ? 0 : 1 + (long long)(rng() % max_len);
    b.seq_len = 1;
    for (auto l : lens) b.seq_len = std::max(b.seq_len, l);
    b.offsets.push_back(0);
    for (auto l : lens) b.offsets.push_back(b.offsets.back() + (packed ? l : b.seq_len));
    b.numel = b.offsets.back();
    b.mask.assign(b.numel, 0);
    for (long long i = 0; i < rows; ++i)
        for (long long t = 0; t < lens[i]; ++t) b.mask[b.offsets[i] + t] = plain || rng() % 7 != 0;
    // Few distinct values: many exact ties of the covariance. Not binary fractions, so the
    // order of the sums shows in their last bits.
    const double advs[] = {-1.1, -0.3, 0.1, 0.7, 1.3};
    const double shifts[] = {-0.375, -0.125, 0.0, 0.125, 0.375};
    b.adv.resize(rows);
    b.is_expert.resize(rows);
    for (long long i = 0; i < rows; ++i) {
        b.adv[i] = advs[rng() % 5];
        b.is_expert[i] = !plain && rng() % 6 == 0;
    }
    std::vector<double> lp(b.numel), old(b.numel);
    for (long long k = 0; k < b.numel; ++k) {
        lp[k] = -(double)(1 + rng() % 24) / 7.0;
        old[k] = lp[k] + shifts[rng() % 5];
    }
    encode(dt, lp, b.lp_raw, b.logp);
    encode(dt, old, b.old_raw, b.old);
    return b;
}

static std::vector<Tok> rollout_tokens(const Batch& b, double clip) {
    std::vector<Tok> toks;
    for (long long i = 0; i < b.rows; ++i) {
        if (b.is_expert[i]) continue;
        for (long long k = b.offsets[i]; k < b.offsets[i + 1]; ++k) {
            if (!b.mask[k]) continue;
            const double ratio = std::exp(b.logp[k] - b.old[k]);
            const double p1 = -b.adv[i] * ratio, p2 = -b.adv[i] * std::clamp(ratio, 1.0 - clip, 1.0 + clip);
            toks.push_back({k, b.adv[i], b.logp[k], p2 > p1});
        }
    }
    return toks;
}

struct Run {
    std::vector<long long> selected;
    CovState state;
    std::vector<double> grad, metrics;
};

// The loss kernels as src/cuda/loss/run.rs `loss` launches them (after the counts kernel and the
// entropy control's): the row pass where a row sum is needed, then the token pass, its blocks
// owning whole quanta of 2048 consecutive tokens, at most `max_blocks` of them. `p.final_ws`,
// `p.block_ws`, `p.row_ws` point into `ws` (sized here; NaN-filled: nothing may read unwritten
// values).
static void launch_loss(LossParams& p, unsigned max_blocks, std::vector<double>& ws) {
    const bool seq_explore = !p.token_aligned && (p.baseline_ref ? p.ref_logprobs != nullptr
                                                                 : (p.expert_logprobs != nullptr || p.authors));
    p.row_pass = (p.agg == AGG_SEQ_MEAN || seq_explore) ? 1 : 0;
    const long long quanta = std::max((p.numel + 2047) / 2048, 1LL);
    p.block_tokens = (quanta + max_blocks - 1) / max_blocks * 2048;
    const unsigned blocks = (unsigned)std::max((p.numel + p.block_tokens - 1) / p.block_tokens, 1LL);
    long long threads = (p.numel + std::max(p.rows, 1LL) - 1) / std::max(p.rows, 1LL);
    threads = std::clamp((threads + 15) / 16, 2LL, (long long)LOSS_THREADS);
    long long team = 1;
    while (team < threads) team <<= 1;
    p.team_log2 = __builtin_ctzll(team);
    const unsigned row_blocks = (unsigned)std::clamp((p.rows + LOSS_THREADS / team - 1) / (LOSS_THREADS / team), 1LL,
                                                     (long long)max_blocks);
    const unsigned count_blocks = std::max(blocks, max_blocks);
    const size_t block_doubles = (size_t)count_blocks * (BLOCK_FIELDS + EDGE_FIELDS);
    ws.assign(FINAL_FIELDS + METRICS + block_doubles + (p.row_pass ? (size_t)p.rows * ROW_WS : 0), NAN);
    p.final_ws = ws.data();
    p.block_ws = ws.data() + FINAL_FIELDS + METRICS;
    p.row_ws = p.block_ws + block_doubles;
    if (p.counts == COUNTS_KERNEL) launch(std::min(count_blocks, max_blocks), LOSS_THREADS, [&] { calibrl_loss_counts(p); });
    if (p.row_pass && p.rows > 0) launch(row_blocks, LOSS_THREADS, [&] { calibrl_loss_rows(p); });
    launch(blocks, LOSS_THREADS, [&] { calibrl_loss_any(p); });
}

// The launches of src/cuda/loss/run.rs `loss` with entropy control (normalisers given, so no
// counts kernel), with the grids capped at `max_blocks`.
static Run run(const Batch& b, int control, double ratio, double lb, double ub, unsigned long long seed, double coef,
               const Given& g, unsigned max_blocks, double norm_tokens) {
    LossParams p;
    std::memset(&p, 0, sizeof p);
    p.logprobs = b.lp_raw.data();
    p.logprobs_dt = b.dt;
    p.offsets = b.packed ? b.offsets.data() : nullptr;
    p.offsets_dt = DT_I64;
    p.rows = b.rows;
    p.seq_len = b.packed ? 0 : b.seq_len;
    p.mask = b.plain ? nullptr : b.mask.data();
    p.mask_dt = DT_U8;
    p.old_logprobs = b.old_raw.data();
    p.old_dt = b.dt;
    p.advantages = b.adv.data();
    p.advantages_dt = DT_F64;
    p.weights = b.adv.data();
    p.weights_dt = DT_F64;
    p.signs = b.adv.data();
    p.signs_dt = DT_F64;
    p.is_expert = b.plain ? nullptr : b.is_expert.data();
    p.is_expert_dt = DT_U8;
    Run out;
    out.grad.assign(b.numel + 1, NAN);
    out.metrics.assign(METRICS, NAN);
    p.grad_logprobs = out.grad.data();
    p.grad_dt = DT_F64;
    p.metrics = out.metrics.data();
    p.metrics_dt = DT_F64;
    p.numel = b.numel;
    std::vector<double> ws;
    unsigned tickets[64] = {};
    p.tickets = tickets;
    p.counts = COUNTS_GIVEN;
    p.norm_tokens = norm_tokens;
    p.norm_seqs = 1.0;
    p.loss_kind = LOSS_GRPO;
    p.agg = AGG_TOKEN_MEAN;
    p.clip_low = 0.2;
    p.clip_high = 0.2;
    p.dual_clip = 3.0;
    p.dual_on = 0;  // src/config.rs `dual_clip_on`: never under Clip-Cov / KL-Cov
    // src/cuda/cov.rs `params`
    p.cov.control = control;
    p.cov.lb = lb;
    p.cov.ub = ub;
    p.cov.ratio = ratio;
    p.cov.coef = coef;
    p.cov.seed = seed;
    p.cov.given = g.on ? 7 : 0;
    p.cov.adv_mean = g.adv_mean;
    p.cov.logprob_mean = g.logprob_mean;
    p.cov.token_count = g.count;
    p.cov.numel = b.numel;
    long long bits = 0;
    while (b.numel > 1 && ((b.numel - 1) >> bits) != 0) ++bits;
    p.cov.k_passes = (bits + 7) / 8;
    p.cov.tiles = (b.numel + COV_TILE - 1) / COV_TILE;
    std::vector<unsigned long long> cov_ws(16 + COV_BINS + COV_TILE_FIELDS * p.cov.tiles + 1, 0xdeadbeefdeadbeefull);  // garbage
    p.cov.state = (CovState*)cov_ws.data();
    p.cov.hist = cov_ws.data() + 16;
    p.cov.tile_sums = (double*)(cov_ws.data() + 16 + COV_BINS);
    const unsigned cov_blocks = (unsigned)std::clamp(p.cov.tiles, 1LL, (long long)max_blocks);
    launch(cov_blocks, COV_THREADS, [&] { calibrl_cov_prepare(p); });
    for (long long pass = 0; pass < COV_KEY_PASSES + p.cov.k_passes; ++pass) {
        p.cov.pass = pass;
        launch(cov_blocks, COV_THREADS, [&] { calibrl_cov_histogram(p); });
    }
    launch_loss(p, max_blocks, ws);
    out.state = *p.cov.state;
    for (long long i = 0; i < b.rows; ++i) {
        if (b.is_expert[i]) continue;
        for (long long k = b.offsets[i]; k < b.offsets[i + 1]; ++k) {
            if (!b.mask[k]) continue;
            double pv, dv;
            bool clipped, lower;
            clipped_pg(p, b.adv[i], b.logp[k], b.old[k], pv, dv, clipped, lower);
            unsigned long long key;
            if (cov_candidate(p, p.cov.state, b.adv[i], b.logp[k], k, clipped, key) && cov_chosen(p.cov.state, key, k))
                out.selected.push_back(k);
        }
    }
    for (int j = 0; j < 3; ++j)
        if (tickets[j] != 0) fail("ticket " + std::to_string(j) + " not reset");
    for (int d = 0; d < COV_BINS; ++d)
        if (p.cov.hist[d] != 0) {
            fail("histogram not zeroed");
            break;
        }
    return out;
}

// ---------------------------------------------------------------- the authors' arithmetic

// calibrl_loss_counts (COUNTS_KERNEL) or the caller's normalisers (COUNTS_GIVEN, with the
// all-row counts left 0 or given) and calibrl_loss_any under the `authors` preset (SPEC §4.7):
// L_pg and L_explore over the rollout rows' counts, entropy and KL over every row's, the dual
// clip at c_dual = 0.5, the exploration term against ℓ* = 0 (no expert data). Checked against
// a reference written here from SPEC §4.7. Returns the number of cases.
static int authors_cases(std::mt19937_64& rng) {
    int cases = 0;
    for (int agg : {AGG_TOKEN_MEAN, AGG_SEQ_SUM, AGG_SEQ_MEAN}) {
        for (int counts : {COUNTS_KERNEL, COUNTS_GIVEN}) {
            for (bool packed : {false, true}) {
                ++cases;
                Batch b = make_batch(rng, 37, 23, packed, DT_F64, false);
                std::vector<double> ref(b.numel), ent(b.numel), w(b.rows), c(b.rows);
                for (long long k = 0; k < b.numel; ++k) {
                    ref[k] = b.logp[k] + 0.05 * (double)(rng() % 11) - 0.25;
                    ent[k] = 0.1 * (double)(rng() % 20);
                }
                for (long long i = 0; i < b.rows; ++i) {
                    w[i] = std::fabs(b.adv[i]);
                    c[i] = rng() % 2 ? 1.0 : -1.0;
                }
                // The reference: per-row counts, then the sums.
                double tok_r = 0, seq_r = 0, tok_a = 0, seq_a = 0;
                std::vector<double> n_row(b.rows, 0.0);
                for (long long i = 0; i < b.rows; ++i) {
                    for (long long k = b.offsets[i]; k < b.offsets[i + 1]; ++k) n_row[i] += b.mask[k];
                    tok_a += n_row[i];
                    seq_a += n_row[i] > 0;
                    if (!b.is_expert[i]) tok_r += n_row[i], seq_r += n_row[i] > 0;
                }
                // Given normalisers (global counts above the call's); padded: the all-row counts
                // left 0, which means "the same as the rollout-row counts".
                const bool all_zero = !packed;
                const double given[4] = {tok_r + 5, seq_r + 2, all_zero ? 0.0 : tok_a + 9, all_zero ? 0.0 : seq_a + 3};
                const double n[4] = {counts == COUNTS_GIVEN ? given[0] : tok_r, counts == COUNTS_GIVEN ? given[1] : seq_r,
                                     counts == COUNTS_GIVEN ? (all_zero ? given[0] : given[2]) : tok_a,
                                     counts == COUNTS_GIVEN ? (all_zero ? given[1] : given[3]) : seq_a};
                auto factor = [&](long long i, double nt, double ns) {
                    if (agg == AGG_TOKEN_MEAN) return 1.0 / nt;
                    if (agg == AGG_SEQ_SUM) return 1.0 / ns;
                    return 1.0 / ns / n_row[i];
                };
                const double lambda = 0.1, alpha = 0.5, cdual = 0.5, ent_coef = 0.01, kl_coef = 0.05, clip = 0.2;
                std::vector<double> want_g(b.numel, 0.0);
                double pg = 0, ex = 0, h = 0, kl = 0, nclip = 0, nlow = 0, ntok = 0;
                for (long long i = 0; i < b.rows; ++i)
                    for (long long k = b.offsets[i]; k < b.offsets[i + 1]; ++k) {
                        if (!b.mask[k]) continue;
                        const double a = b.adv[i], r = std::exp(b.logp[k] - b.old[k]);
                        const double p1 = -a * r, p2 = -a * std::clamp(r, 1.0 - clip, 1.0 + clip);
                        const double pc = std::max(p1, p2);
                        double p = pc, dp = p2 > p1 ? 0.0 : -a * r;
                        const bool low = a < 0 && pc > -a * cdual;
                        if (low) p = -a * cdual, dp = 0.0;
                        nclip += p2 > p1;
                        nlow += low;
                        ntok += 1;
                        const double fa = factor(i, n[2], n[3]);
                        h += fa * ent[k];
                        const double d = b.logp[k] - ref[k];
                        kl += fa * 0.5 * d * d;
                        double g = kl_coef * fa * d;
                        if (!b.is_expert[i]) {
                            const double f = factor(i, n[0], n[1]);
                            pg += f * p;
                            const double x = -c[i] * b.logp[k];  // Δ against ℓ* = 0
                            ex += f * w[i] * (x > 0 ? x : alpha * x);
                            g += f * dp + lambda * f * w[i] * (x > 0 ? 1.0 : alpha) * -c[i];
                        }
                        want_g[k] = g;
                    }
                LossParams p;
                std::memset(&p, 0, sizeof p);
                p.logprobs = b.lp_raw.data();
                p.logprobs_dt = DT_F64;
                p.offsets = b.packed ? b.offsets.data() : nullptr;
                p.offsets_dt = DT_I64;
                p.rows = b.rows;
                p.seq_len = b.packed ? 0 : b.seq_len;
                p.mask = b.mask.data();
                p.mask_dt = DT_U8;
                p.old_logprobs = b.old_raw.data();
                p.old_dt = DT_F64;
                p.ref_logprobs = ref.data();
                p.ref_dt = DT_F64;
                p.entropy = ent.data();
                p.entropy_dt = DT_F64;
                p.advantages = b.adv.data();
                p.advantages_dt = DT_F64;
                p.weights = w.data();
                p.weights_dt = DT_F64;
                p.signs = c.data();
                p.signs_dt = DT_F64;
                p.is_expert = b.is_expert.data();
                p.is_expert_dt = DT_U8;
                std::vector<double> grad(b.numel + 1, NAN), metrics(METRICS, NAN), gh(b.numel + 1, NAN);
                p.grad_logprobs = grad.data();
                p.grad_dt = DT_F64;
                p.grad_entropy = gh.data();
                p.grad_entropy_dt = DT_F64;
                p.metrics = metrics.data();
                p.metrics_dt = DT_F64;
                p.numel = b.numel;
                std::vector<double> ws;
                unsigned tickets[64] = {};
                p.tickets = tickets;
                p.counts = counts;
                p.norm_tokens = given[0];
                p.norm_seqs = given[1];
                p.norm_all_tokens = given[2];
                p.norm_all_seqs = given[3];
                p.loss_kind = LOSS_CALIBRL;
                p.token_aligned = 1;
                p.activation = ACT_LEAKY;
                p.agg = agg;
                p.kl_kind = KL_K2;
                p.authors = 1;
                p.dual_on = 1;  // src/config.rs `dual_clip_on`: any c_dual under the authors' arithmetic
                p.t_norm = 1.0;
                p.alpha = alpha;
                p.lambda = lambda;
                p.clip_low = clip;
                p.clip_high = clip;
                p.dual_clip = cdual;
                p.entropy_coef = ent_coef;
                p.kl_coef = kl_coef;
                launch_loss(p, 3, ws);
                char tag[128];
                std::snprintf(tag, sizeof tag, "authors agg=%d counts=%d packed=%d", agg, counts, (int)packed);
                auto close = [](double x, double y) { return std::fabs(x - y) <= 1e-13 + 1e-12 * std::fabs(y); };
                const double loss = pg + lambda * ex - ent_coef * h + kl_coef * kl;
                const double want_m[][2] = {{metrics[0], loss}, {metrics[1], pg}, {metrics[2], ex}, {metrics[3], h},
                                            {metrics[4], kl}, {metrics[5], nclip / ntok}, {metrics[6], nlow / ntok},
                                            {metrics[13], tok_r}, {metrics[14], seq_r}};
                for (int j = 0; j < 9; ++j)
                    if (!close(want_m[j][0], want_m[j][1]))
                        fail(std::string(tag) + ": metric " + std::to_string(j) + " " + std::to_string(want_m[j][0]) +
                             " vs " + std::to_string(want_m[j][1]));
                int bad = 0;
                for (long long k = 0; k < b.numel; ++k)
                    if (!close(grad[k], want_g[k]) && bad++ == 0)
                        fail(std::string(tag) + ": gradient at " + std::to_string(k) + ": " + std::to_string(grad[k]) +
                             " vs " + std::to_string(want_g[k]));
                if (nlow == 0) fail(std::string(tag) + ": no token was dual-clipped (the case tests nothing)");
            }
        }
    }
    return cases;
}

static bool same_bits(double x, double y) { return std::memcmp(&x, &y, 8) == 0; }

int main() {
    std::mt19937_64 rng(20261204);
    int cases = 0;
    const double clip = 0.2, lb = -0.3, ub = 0.8, coef = 0.7;
    struct Shape {
        long long rows, max_len;
        bool packed;
        int dt;
        bool plain;
    };
    const Shape shapes[] = {{1, 5, true, DT_F32, false},     {7, 40, false, DT_BF16, false},
                            {40, 60, true, DT_F64, false},   {300, 30, false, DT_F32, false},
                            {90, 400, true, DT_BF16, false}, {3, 1, false, DT_F32, false},
                            {20, 50, false, DT_F32, true},   {30, 20, true, DT_BF16, true}};
    // The batches: random shapes, then special values (kind 1: every advantage equal, so every
    // covariance ties; kind 2: log-probs of -DBL_MAX, no mask, so the computed mean of ℓ
    // overflows; kind 3: log-probs of -1e308 with a caller-given mean of ℓ of 1e308). Kinds 2
    // and 3 make some covariances infinite or NaN: never selected (SPEC §4.6).
    struct Case {
        Shape sh;
        int kind;
    };
    std::vector<Case> all_cases;
    for (const Shape& sh : shapes) all_cases.push_back({sh, 0});
    all_cases.push_back({{60, 30, true, DT_F64, false}, 1});
    all_cases.push_back({{9, 40, false, DT_BF16, false}, 1});
    all_cases.push_back({{20, 50, false, DT_F64, true}, 2});
    all_cases.push_back({{30, 20, true, DT_F64, false}, 3});
    for (const Case& cs : all_cases) {
        const Shape& sh = cs.sh;
        Batch b = make_batch(rng, sh.rows, sh.max_len, sh.packed, sh.dt, sh.plain);
        if (cs.kind == 1) std::fill(b.adv.begin(), b.adv.end(), 0.7);
        if (cs.kind >= 2) {
            std::vector<double> lp = b.logp, old = b.old;
            for (long long k = 0; k < b.numel; ++k)
                if (rng() % 4 == 0) lp[k] = old[k] = cs.kind == 2 ? -1.7976931348623157e308 : -1e308;
            encode(b.dt, lp, b.lp_raw, b.logp);
            encode(b.dt, old, b.old_raw, b.old);
        }
        const std::vector<Tok> toks = rollout_tokens(b, clip);
        for (int control : {EC_CLIP_COV, EC_KL_COV}) {
            const RefResult local = reference(control, 0.5, lb, ub, 7, Given{}, toks);
            const double c = (double)local.candidates;
            // (ratio, given count): n = 1, candidates − 1, = candidates, > candidates, a fraction.
            std::vector<std::pair<double, Given>> settings = {
                {1e-6, Given{}}, {0.5, Given{true, local.adv_mean, local.logprob_mean, 2 * c - 2}},
                {0.5, Given{true, local.adv_mean, local.logprob_mean, 2 * c}},
                {0.5, Given{true, local.adv_mean, local.logprob_mean, 2 * c + 2}}, {0.3, Given{}},
                {1.0, Given{}},  {0.2, Given{true, 0.1, -1.5, 3.0 * (double)toks.size()}}};
            if (cs.kind == 3) settings.push_back({0.3, Given{true, 0.1, 1e308, (double)toks.size()}});
            if (cs.kind == 1 && control == EC_KL_COV) {
                // Every covariance ties: the first n counted rollout tokens by position.
                const RefResult r = reference(control, 0.1, lb, ub, 0, Given{}, toks);
                const size_t n = std::max<size_t>((size_t)std::floor(0.1 * (double)toks.size()), 1);
                for (size_t j = 0; j < std::min(n, toks.size()); ++j)
                    if (r.selected.size() <= j || r.selected[j] != toks[j].k) {
                        fail("all-equal advantages: the reference does not take the first tokens");
                        break;
                    }
                settings.push_back({0.1, Given{}});
            }
            for (const auto& [ratio, given] : settings) {
                for (unsigned long long seed : {0ull, 12345ull}) {
                    if (control == EC_KL_COV && seed != 0) continue;  // KL-Cov takes no seed
                    ++cases;
                    const RefResult want = reference(control, ratio, lb, ub, seed, given, toks);
                    char tag[256];
                    std::snprintf(tag, sizeof tag, "kind=%d rows=%lld packed=%d plain=%d dt=%d control=%d ratio=%g given=%d(%g) seed=%llu",
                                  cs.kind, sh.rows, (int)sh.packed, (int)sh.plain, sh.dt, control, ratio, (int)given.on, given.count, seed);
                    std::vector<Run> runs;
                    for (unsigned max_blocks : {1u, 4u}) runs.push_back(run(b, control, ratio, lb, ub, seed, coef, given, max_blocks, 997.0));
                    const Run& got = runs[0];
                    if (got.selected != want.selected)
                        fail(std::string(tag) + ": selection differs (" + std::to_string(got.selected.size()) + " vs " +
                             std::to_string(want.selected.size()) + " tokens)");
                    if (!same_bits(got.state.adv_mean, want.adv_mean) || !same_bits(got.state.logprob_mean, want.logprob_mean))
                        fail(std::string(tag) + ": means differ from the fixed-order reference");
                    if (!same_bits(got.metrics[15], want.frac)) fail(std::string(tag) + ": cov_selected_frac");
                    for (size_t j = 1; j < runs.size(); ++j) {
                        if (runs[j].selected != got.selected) fail(std::string(tag) + ": selection depends on the grid");
                        if (!same_bits(runs[j].state.adv_mean, got.state.adv_mean) ||
                            !same_bits(runs[j].state.logprob_mean, got.state.logprob_mean))
                            fail(std::string(tag) + ": means depend on the grid");
                        for (long long k = 0; k < b.numel; ++k)
                            if (!same_bits(runs[j].grad[k], got.grad[k])) {
                                fail(std::string(tag) + ": gradient depends on the grid");
                                break;
                            }
                    }
                    // Gradients: token-mean over the given N_tok = 997, GRPO (no other term).
                    std::vector<bool> chosen(b.numel, false);
                    for (long long k : want.selected) chosen[k] = true;
                    int bad = 0;
                    for (long long i = 0; i < b.rows; ++i)
                        for (long long k = b.offsets[i]; k < b.offsets[i + 1]; ++k) {
                            double g = 0.0;
                            if (b.mask[k] && !b.is_expert[i]) {
                                const double a = b.adv[i], r = std::exp(b.logp[k] - b.old[k]);
                                const double p1 = -a * r, p2 = -a * std::clamp(r, 1.0 - clip, 1.0 + clip);
                                double dv = p2 > p1 ? 0.0 : -a * r;  // no dual clip (SPEC §4.6)
                                if (control == EC_CLIP_COV && chosen[k]) dv = 0.0;
                                if (control == EC_KL_COV) {
                                    const double d = b.logp[k] - b.old[k];
                                    dv = -a * r + (chosen[k] ? coef * (d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0) : 0.0);
                                }
                                g = dv / 997.0;
                            }
                            if (!(std::fabs(got.grad[k] - g) <= 1e-14 + 1e-12 * std::fabs(g)) && bad++ == 0)
                                fail(std::string(tag) + ": gradient at " + std::to_string(k) + ": " +
                                     std::to_string(got.grad[k]) + " vs " + std::to_string(g));
                        }
                }
            }
        }
    }
    cases += authors_cases(rng);
    std::printf("loss_emulate: %d cases, %d failures\n", cases, failures);
    return failures == 0 ? 0 : 1;
}
