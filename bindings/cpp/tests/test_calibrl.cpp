// Tests of calibrl.hpp against libcalibrl: hand-computed cases of SPEC §3, §4.1, §4.2 and §6,
// errors surfacing as calibrl::Error, and the train_step example's batch recomputed through an
// independent path (log-softmax by hand in double, padded layout, the raw C ABI).
//
// Prints one line per check, then "checks: N passed, M failed"; exits non-zero on a failure.
// With --train-step-reference it also prints "train_step reference loss = X" for
// scripts/cpp-tests.sh to compare with the example's output.
#include <calibrl.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../examples/synthetic_batch.hpp"

namespace {

int g_passed = 0;
int g_failed = 0;

void report(bool ok, const std::string& what) {
  (ok ? g_passed : g_failed) += 1;
  std::printf("%s %s\n", ok ? "  ok  " : "FAILED", what.c_str());
}

bool near(double got, double want, double tol) {
  return std::isfinite(got) && std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
}

void check_near(double got, double want, double tol, const std::string& what) {
  char buf[160];
  std::snprintf(buf, sizeof buf, " (got %.10g, want %.10g)", got, want);
  report(near(got, want, tol), what + buf);
}

// Runs `f`, expecting a calibrl::Error with `status` whose message contains `needle`.
void expect_error(const std::function<void()>& f, calibrl_status status, const std::string& needle,
                  const std::string& what) {
  try {
    f();
    report(false, what + " (no exception)");
  } catch (const calibrl::Error& e) {
    const bool ok = e.status() == status && e.message().find(needle) != std::string::npos &&
                    std::string(e.what()).find(needle) != std::string::npos &&
                    std::string(e.what()).find(calibrl_status_name(status)) != std::string::npos;
    report(ok, what + " -> " + e.what());
  } catch (const std::exception& e) {
    report(false, what + " (wrong exception type: " + e.what() + ")");
  }
}

// ---- compile-time properties ----------------------------------------------------------------
static_assert(std::is_base_of_v<std::runtime_error, calibrl::Error>);
static_assert(!std::is_copy_constructible_v<calibrl::Config>, "Config is move-only");
static_assert(std::is_nothrow_move_constructible_v<calibrl::Config>);
static_assert(std::is_constructible_v<calibrl::TensorView, std::vector<float>&>);
static_assert(std::is_constructible_v<calibrl::TensorView, const std::vector<double>&>);
static_assert(std::is_constructible_v<calibrl::TensorView, std::array<std::int64_t, 3>&>);
static_assert(!std::is_constructible_v<calibrl::TensorView, std::vector<float>&&>,
              "a view of a temporary container would dangle");
static_assert(!std::is_constructible_v<calibrl::TensorView, std::vector<std::string>&>);

void test_version() {
  report(calibrl::abi_version() == CALIBRL_ABI_VERSION, "abi_version() == CALIBRL_ABI_VERSION");
  bool threw = false;
  try {
    calibrl::check_abi();
  } catch (...) {
    threw = true;
  }
  report(!threw, "check_abi() accepts the installed library");
  report(!calibrl::version().empty(), "version() = " + std::string(calibrl::version()));
  report(calibrl::status_name(CALIBRL_STATUS_SHAPE_MISMATCH) == "CALIBRL_STATUS_SHAPE_MISMATCH",
         "status_name()");
}

void test_config() {
  calibrl::Config paper;  // default: the paper preset
  const std::string json = paper.to_json();
  report(json.find("\"lambda\":0.1") != std::string::npos &&
             json.find("\"delta_mode\":\"sequence\"") != std::string::npos,
         "Config() is the paper preset: " + json.substr(0, 60) + "...");

  const calibrl::Config ref = calibrl::Config::preset("reference");
  report(ref.to_json().find("\"delta_mode\":\"token_aligned\"") != std::string::npos,
         "Config::preset(\"reference\") is token-aligned");

  const calibrl::Config custom = calibrl::Config::from_json(R"({"preset":"paper","lambda":0.25})");
  report(custom.to_json().find("\"lambda\":0.25") != std::string::npos,
         "Config::from_json overrides a key");

  calibrl::Config a = calibrl::Config::preset("grpo");
  const calibrl_config* raw = a.capi();
  calibrl::Config b = std::move(a);
  report(a.capi() == nullptr && b.capi() == raw, "Config moves its handle");  // NOLINT(use-after-move)
  calibrl_config* released = b.release();
  report(b.capi() == nullptr && released == raw, "Config::release gives up ownership");
  calibrl_config_free(released);

  expect_error([] { (void)calibrl::Config::from_json(R"({"lamda":0.2})"); },
               CALIBRL_STATUS_INVALID_CONFIG, "`lamda`", "unknown config key names the key");
  expect_error([] { (void)calibrl::Config::preset("nope"); }, CALIBRL_STATUS_INVALID_CONFIG,
               "nope", "unknown preset names the preset");
}

void test_views() {
  std::vector<float> v(6);
  calibrl::TensorView a(v, {2, 3});
  calibrl::TensorView copy = a;
  report(copy.dl()->shape == copy.shape().data() && copy.dl()->shape != a.dl()->shape &&
             copy.dl()->shape[0] == 2 && copy.dl()->shape[1] == 3 && copy.dl()->ndim == 2,
         "a copied TensorView describes the same shape from its own storage");
  report(a.dl()->data == v.data() && a.dl()->strides == nullptr && a.dl()->dtype.code == 2 &&
             a.dl()->dtype.bits == 32 && a.dl()->device.device_type == 1,
         "TensorView wraps the vector's memory without copying (f32, CPU, row-major)");
  const std::vector<double> cd(3);
  const calibrl::TensorView c(cd);
  report(c.read_only() && c.dl()->dtype.bits == 64 && c.dl()->data == cd.data(),
         "a const container gives a read-only f64 view");
  std::array<std::int64_t, 3> arr{};
  const calibrl::TensorView ai(arr);
  report(ai.dl()->dtype.code == 0 && ai.dl()->dtype.bits == 64 && ai.numel() == 3,
         "std::array<int64_t> gives an int64 view");
  expect_error([&] { calibrl::TensorView bad(v, {4, 2}); }, CALIBRL_STATUS_SHAPE_MISMATCH,
               "container has 6", "reshaping a container to the wrong size");
  expect_error([&] { calibrl::TensorView bad(v.data(), {1, 1, 1, 1, 1, 1, 1, 1, 6}); },
               CALIBRL_STATUS_SHAPE_MISMATCH, "9 dimensions", "more than kMaxDims dimensions");
}

// SPEC §3 worked example: rewards [0,1,1,1] -> |A| = [0.75,0.25,0.25,0.25]; [1,0,0,0] the same.
void test_advantages() {
  const calibrl::Config cfg = calibrl::Config::preset("paper");
  const auto r = calibrl::group_advantages(cfg, {0, 1, 1, 1, 1, 0, 0, 0},
                                           {0, 0, 0, 0, 1, 1, 1, 1}, 2);
  const float want_w[] = {0.75f, 0.25f, 0.25f, 0.25f, 0.75f, 0.25f, 0.25f, 0.25f};
  const float want_a[] = {-0.75f, 0.25f, 0.25f, 0.25f, 0.75f, -0.25f, -0.25f, -0.25f};
  const float want_s[] = {-1, 1, 1, 1, 1, -1, -1, -1};
  bool ok = true;
  for (int i = 0; i < 8; ++i) {
    ok = ok && near(r.weights[i], want_w[i], 1e-6) && near(r.advantages[i], want_a[i], 1e-6) &&
         r.signs[i] == want_s[i];
  }
  report(ok, "group_advantages: [0,1,1,1] and [1,0,0,0] give |A| = [0.75,0.25,0.25,0.25]");

  // The builder form, int32 ids and explicit correctness, into double buffers.
  std::vector<float> rewards{0.f, 1.f, 1.f, 1.f};
  std::vector<std::int32_t> ids{0, 0, 0, 0};
  std::vector<std::uint8_t> correct{1, 0, 0, 0};
  std::vector<double> adv(4), w(4), s(4);
  calibrl::group_advantages(cfg, calibrl::AdvantageArgs{}
                                     .rewards(rewards)
                                     .group_ids(ids, 1)
                                     .correct(correct)
                                     .advantages(adv)
                                     .weights(w)
                                     .signs(s));
  report(near(w[0], 0.75, 1e-9) && near(adv[1], 0.25, 1e-9) && s[0] == 1 && s[1] == -1,
         "AdvantageArgs builder: int32 ids, explicit correctness, f64 outputs");
}

// One rollout, one token (SPEC §4.1 + §4.2, paper preset: λ = 0.1, α = 0.5, sequence Δ):
//   ℓ = −1, ℓold = −1.1, A = 0.5, w = 0.4 (any weight; not |A|, to tell them apart), c = +1,
//   expert ℓ* = −0.5
//   ρ = e^0.1 (unclipped), L_pg = −A·ρ = −0.5e^0.1
//   Δ = −1 − (−0.5) = −0.5, x = −c·Δ = 0.5 > 0, L_explore = w·φ(x) = 0.2
//   L = −0.5e^0.1 + 0.1·0.2,   ∂L/∂ℓ = −A·ρ + λ·w·φ'(x)·(−c) = −0.5e^0.1 − 0.04
void test_loss_one_token() {
  const calibrl::Config cfg = calibrl::Config::preset("paper");
  std::vector<float> lp{-1.f}, old{-1.1f}, adv{0.5f}, w{0.4f}, sign{1.f}, expert{-0.5f};
  std::vector<std::int64_t> offsets{0, 1}, expert_offsets{0, 1}, expert_index{0};
  std::vector<float> grad{7.f};
  std::vector<double> metrics(CALIBRL_METRICS_LEN, -1.0);
  const double rho = std::exp(double(-1.f) - double(-1.1f));
  const calibrl_metrics m = calibrl::loss(cfg, calibrl::LossArgs{}
                                                   .logprobs(lp, offsets)
                                                   .old_logprobs(old)
                                                   .advantages(adv)
                                                   .weights(w)
                                                   .signs(sign)
                                                   .expert(expert, expert_offsets, expert_index)
                                                   .grad_logprobs(grad)
                                                   .metrics(metrics));
  check_near(m.loss, -0.5 * rho + 0.1 * double(0.4f) * 0.5, 1e-7, "one-token loss L = -0.5e^0.1 + 0.1*0.2");
  check_near(m.pg_loss, -0.5 * rho, 1e-7, "one-token pg_loss = -0.5e^0.1");
  check_near(m.explore_loss, double(0.4f) * 0.5, 1e-7, "one-token explore_loss = w*phi(0.5) = 0.2");
  check_near(grad[0], -0.5 * rho - 0.04, 1e-6, "one-token dL/dl = -0.5e^0.1 - 0.04");
  check_near(m.mean_delta, -0.5, 1e-7, "one-token mean_delta = -0.5");
  report(m.clipfrac == 0.0 && m.num_tokens == 1.0 && m.num_seqs == 1.0,
         "one-token clipfrac 0, 1 token, 1 row");
  bool same = true;
  const double* host = &m.loss;  // calibrl_metrics is CALIBRL_METRICS_LEN doubles, in order
  for (int i = 0; i < CALIBRL_METRICS_LEN; ++i) same = same && near(metrics[i], host[i], 1e-12);
  report(same, "metrics tensor output equals the host calibrl_metrics, field by field");

  // The same case padded [1, 2] with a mask hiding the second token: same loss and gradient.
  std::vector<double> lp2{-1.0, 5.0}, old2{-1.1, 0.0}, expert2{-0.5};
  std::vector<std::uint8_t> mask{1, 0};
  std::vector<double> grad2{7.0, 7.0};
  const calibrl_metrics m2 = calibrl::loss(cfg, calibrl::LossArgs{}
                                                    .logprobs(calibrl::TensorView(lp2, {1, 2}))
                                                    .mask(calibrl::TensorView(mask, {1, 2}))
                                                    .old_logprobs(calibrl::TensorView(old2, {1, 2}))
                                                    .advantages(adv)
                                                    .weights(w)
                                                    .signs(sign)
                                                    .expert(calibrl::TensorView(expert2, {1, 1}),
                                                            expert_index)
                                                    .grad_logprobs(calibrl::TensorView(grad2, {1, 2})));
  check_near(m2.loss, -0.5 * std::exp(0.1) + 0.1 * double(0.4f) * 0.5, 1e-12,
             "padded f64 layout: same loss");
  report(near(grad2[0], -0.5 * std::exp(0.1) - 0.1 * double(0.4f), 1e-12) && grad2[1] == 0.0,
         "padded f64 layout: same gradient, 0 at the masked token");
}

// GRPO (λ = 0), three one-token rows, token-mean over 3 tokens:
//   row 0: A = 0.5, ℓ−ℓold = 0.5: ρ = e^0.5, p1 = −0.824 < p2 = −0.5·1.2 = −0.6 → p = −0.6, ∂ = 0
//   row 1: A = −1, ℓ−ℓold = 1.5: pc = p1 = e^1.5 = 4.48 > −A·c_dual = 3 → dual clip: p = 3, ∂ = 0
//   row 2: A = −1, ℓ = ℓold: ρ = 1, p = 1, ∂ = −A·ρ = 1
//   L = (−0.6 + 3 + 1)/3, ∂L/∂ℓ = [0, 0, 1/3], clipfrac = 1/3, clipfrac_lower = 1/3
void test_loss_clipping() {
  const calibrl::Config cfg = calibrl::Config::preset("grpo");
  std::vector<double> lp{-0.5, -0.5, -2.0}, old{-1.0, -2.0, -2.0}, adv{0.5, -1.0, -1.0};
  std::vector<double> w{1, 1, 1}, sign{1, -1, -1}, grad(3, 7.0);
  std::vector<std::int32_t> offsets{0, 1, 2, 3};
  const calibrl_metrics m = calibrl::loss(cfg, calibrl::LossArgs{}
                                                   .logprobs(lp, offsets)
                                                   .old_logprobs(old)
                                                   .advantages(adv)
                                                   .weights(w)
                                                   .signs(sign)
                                                   .grad_logprobs(grad));
  check_near(m.loss, (-0.6 + 3.0 + 1.0) / 3.0, 1e-12, "clip + dual clip: L = 3.4/3");
  report(grad[0] == 0.0 && grad[1] == 0.0 && near(grad[2], 1.0 / 3.0, 1e-12),
         "clip + dual clip: dL/dl = [0, 0, 1/3]");
  report(near(m.clipfrac, 1.0 / 3.0, 1e-12) && near(m.clipfrac_lower, 1.0 / 3.0, 1e-12),
         "clip + dual clip: clipfrac = clipfrac_lower = 1/3");

  // token_weights ρ_t (verl's rollout_is_weights) multiply each token's PG term and gradient:
  // L = (0.5·(−0.6) + 2·3 + 4·1)/3, ∂L/∂ℓ = [0, 0, 4/3].
  std::vector<double> rho{0.5, 2.0, 4.0}, grad_w(3, 7.0);
  const calibrl_metrics mw = calibrl::loss(cfg, calibrl::LossArgs{}
                                                    .logprobs(lp, offsets)
                                                    .old_logprobs(old)
                                                    .token_weights(rho)
                                                    .advantages(adv)
                                                    .weights(w)
                                                    .signs(sign)
                                                    .grad_logprobs(grad_w));
  check_near(mw.loss, (-0.3 + 6.0 + 4.0) / 3.0, 1e-12, "token_weights: L = 9.7/3");
  report(grad_w[0] == 0.0 && grad_w[1] == 0.0 && near(grad_w[2], 4.0 / 3.0, 1e-12),
         "token_weights: dL/dl = [0, 0, 4/3]");

  // A strided view (column 0 of an interleaved [3, 2] buffer) gives the same result uncopied.
  std::vector<double> interleaved{-0.5, -1.0, -0.5, -2.0, -2.0, -2.0};  // (ℓ, ℓold) pairs
  const calibrl::TensorView lp_col(interleaved.data(), calibrl::dtype::float64(), {3},
                                   calibrl::Device::cpu(), {2});
  const calibrl::TensorView old_col(interleaved.data(), calibrl::dtype::float64(), {3},
                                    calibrl::Device::cpu(), {2}, sizeof(double));
  try {
    const calibrl_metrics ms = calibrl::loss(cfg, calibrl::LossArgs{}
                                                      .logprobs(lp_col, offsets)
                                                      .old_logprobs(old_col)
                                                      .advantages(adv)
                                                      .weights(w)
                                                      .signs(sign));
    check_near(ms.loss, m.loss, 1e-12, "strided views with byte_offset: same loss");
  } catch (const calibrl::Error& e) {
    report(e.status() == CALIBRL_STATUS_LAYOUT_UNSUPPORTED,
           std::string("strided views: refused as a layout error: ") + e.what());
  }
}

// KL-Cov (SPEC §4.6) with GRPO, three one-token rows, token-mean over 3 tokens:
//   mean A = 0, mean ℓ = −3.5/3, so cov = A·(ℓ + 3.5/3) = [2/3, 0, 5/6]; n = max(⌊0.2·3⌋, 1)
//   = 1 selects row 2 (the largest covariance). Every row uses the unclipped p = −A·ρ; row 2
//   adds β·|ℓ − ℓold| = 0.5 (β = 1, set here: the default is verl's 0.1) and ∂ += β·sign(ℓ − ℓold) = 1.
//   L = (−e^0.2 + 0 + e^0.5 + 0.5)/3, ∂L/∂ℓ = [−e^0.2, 0, e^0.5 + 1]/3, selected fraction 1/3.
void test_loss_kl_cov() {
  const calibrl::Config cfg =
      calibrl::Config::from_json(R"({"preset":"grpo","entropy_control":"kl_cov","kl_cov_ratio":0.2,"kl_cov_coef":1})");
  std::vector<double> lp{-0.5, -1.0, -2.0}, old{-0.7, -1.0, -2.5}, adv{1.0, 0.0, -1.0};
  std::vector<double> w{1, 1, 1}, sign{1, -1, -1}, grad(3, 7.0);
  std::vector<std::int64_t> offsets{0, 1, 2, 3};
  const calibrl_metrics m = calibrl::loss(cfg, calibrl::LossArgs{}
                                                   .logprobs(lp, offsets)
                                                   .old_logprobs(old)
                                                   .advantages(adv)
                                                   .weights(w)
                                                   .signs(sign)
                                                   .grad_logprobs(grad));
  const double e02 = std::exp(0.2), e05 = std::exp(0.5);
  check_near(m.loss, (-e02 + e05 + 0.5) / 3.0, 1e-12, "KL-Cov: L = (-e^0.2 + e^0.5 + 0.5)/3");
  report(near(grad[0], -e02 / 3.0, 1e-12) && grad[1] == 0.0 && near(grad[2], (e05 + 1.0) / 3.0, 1e-12),
         "KL-Cov: dL/dl = [-e^0.2, 0, e^0.5 + 1]/3");
  check_near(m.cov_selected_frac, 1.0 / 3.0, 1e-15, "KL-Cov: one token of three selected");
}

void test_errors() {
  const calibrl::Config cfg = calibrl::Config::preset("paper");
  std::vector<float> lp{-1.f}, old{-1.1f}, adv{0.5f}, w{0.5f, 0.5f}, sign{1.f}, expert{-0.5f};
  std::vector<std::int64_t> offsets{0, 1}, expert_offsets{0, 1}, expert_index{0};
  std::vector<float> grad{7.f};
  auto args = [&] {
    return calibrl::LossArgs{}
        .logprobs(lp, offsets)
        .old_logprobs(old)
        .advantages(adv)
        .weights(w)
        .signs(sign)
        .expert(expert, expert_offsets, expert_index)
        .grad_logprobs(grad);
  };
  expect_error([&] { (void)calibrl::loss(cfg, args()); }, CALIBRL_STATUS_SHAPE_MISMATCH,
               "`weights`", "wrong shape: weights [2] for 1 row");
  report(grad[0] == 7.f, "nothing written on failure (grad_logprobs untouched)");

  w.resize(1);
  std::vector<std::int32_t> int_lp{-1};
  expect_error([&] { (void)calibrl::loss(cfg, args().logprobs(int_lp, offsets)); },
               CALIBRL_STATUS_DTYPE_MISMATCH, "`logprobs`", "wrong dtype: int32 logprobs");
  lp[0] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { (void)calibrl::loss(cfg, args()); }, CALIBRL_STATUS_NON_FINITE,
               "`logprobs`", "NaN logprobs");
  lp[0] = -1.f;
  const std::vector<float> const_grad{0.f};
  expect_error([&] { (void)calibrl::loss(cfg, args().grad_logprobs(const_grad)); },
               CALIBRL_STATUS_INVALID_ARGUMENT, "`grad_logprobs`",
               "const memory as an output is refused");
  const calibrl::TensorView on_gpu(lp.data(), calibrl::dtype::float32(), {1},
                                   calibrl::Device::cuda(0));
  try {
    (void)calibrl::loss(cfg, args().logprobs(on_gpu, offsets));
    report(false, "mixed devices: no exception");
  } catch (const calibrl::Error& e) {
    report(e.status() == CALIBRL_STATUS_DEVICE_MISMATCH ||
               e.status() == CALIBRL_STATUS_CUDA_UNAVAILABLE,
           std::string("mixed CPU/CUDA tensors -> ") + e.what());
  }
  report(near(calibrl::loss(cfg, args()).loss, -0.5 * std::exp(0.1) + 0.025, 1e-6),
         "the next call after failures succeeds");
}

// SPEC §6 by hand: z = [0, ln 2, ln 3], label 2 → p = [1/6, 2/6, 3/6], ℓ = ln(1/2),
// H = −Σ p ln p, and with g = 1, h = 0: ∂L/∂z = δ − p = [−1/6, −1/3, 1/2].
void test_logits() {
  std::vector<float> z{0.f, float(std::log(2.0)), float(std::log(3.0))};
  std::vector<std::int64_t> labels{2};
  std::vector<float> lp(1), ent(1), lse(1), g{1.f}, dz(3);
  const calibrl::TensorView zv(z, {1, 3});
  calibrl::logits_forward(zv, labels, 1.0, lp, ent, lse);
  const double p[] = {1.0 / 6, 2.0 / 6, 3.0 / 6};
  const double H = -(p[0] * std::log(p[0]) + p[1] * std::log(p[1]) + p[2] * std::log(p[2]));
  check_near(lp[0], std::log(0.5), 1e-6, "logits_forward: l = ln(1/2)");
  check_near(ent[0], H, 1e-6, "logits_forward: entropy");
  check_near(lse[0], std::log(6.0), 1e-6, "logits_forward: lse = ln 6");
  calibrl::logits_backward(zv, labels, 1.0, 0, lse, std::nullopt, g, std::nullopt,
                           calibrl::TensorView(dz, {1, 3}));
  report(near(dz[0], -1.0 / 6, 1e-6) && near(dz[1], -1.0 / 3, 1e-6) && near(dz[2], 0.5, 1e-6),
         "logits_backward: dL/dz = onehot - p");

  // Both in one call, in place: the same bits as the two calls above (CPU backend), and a
  // NaN grad_logprobs is refused by name with every output untouched.
  std::vector<float> z1 = z, lp1{-7.f}, ent1{-7.f}, lse1{-7.f};
  calibrl::logits_forward_backward(calibrl::TensorView(z1, {1, 3}), labels, 1.0, g, std::nullopt,
                                   lp1, ent1, lse1, calibrl::TensorView(z1, {1, 3}));
  report(lp1 == lp && ent1 == ent && lse1 == lse && z1 == dz,
         "logits_forward_backward in place = logits_forward + logits_backward");
  std::vector<float> nan_g{std::nanf("")}, z2 = z, dz2(3, -7.f), lp2{-7.f}, lse2{-7.f};
  expect_error(
      [&] {
        calibrl::logits_forward_backward(calibrl::TensorView(z2, {1, 3}), labels, 1.0, nan_g,
                                         std::nullopt, lp2, std::nullopt, lse2,
                                         calibrl::TensorView(dz2, {1, 3}));
      },
      CALIBRL_STATUS_NON_FINITE, "`grad_logprobs`", "logits_forward_backward: NaN grad_logprobs");
  report(lp2[0] == -7.f && lse2[0] == -7.f && dz2 == std::vector<float>(3, -7.f) && z2 == z,
         "logits_forward_backward: outputs untouched on error");

  // Vocabulary-parallel: two shards of the synthetic batch's logits give the full forward.
  const SyntheticBatch b = make_synthetic_batch();
  const std::int64_t N = b.tokens(), V = b.vocab, H2 = V / 2;
  std::vector<float> full_lp(N), full_ent(N), full_lse(N);
  calibrl::logits_forward(calibrl::TensorView(b.logits.data(), {N, V}), b.labels, 0.7, full_lp,
                          full_ent, full_lse);
  std::vector<float> gathered(2 * N * 4);  // [R = 2, N, 4]
  for (std::int64_t r = 0; r < 2; ++r) {
    const calibrl::TensorView shard(b.logits.data() + r * H2, calibrl::dtype::float32(), {N, H2},
                                    calibrl::Device::cpu(), {V, 1});
    calibrl::logits_shard_stats(shard, b.labels, 0.7, r * H2,
                                calibrl::TensorView(gathered.data() + r * N * 4, {N, 4}));
  }
  std::vector<float> sh_lp(N), sh_ent(N), sh_lse(N);
  calibrl::logits_shard_finish(calibrl::TensorView(gathered, {2, N, 4}), b.labels, sh_lp, sh_ent,
                               sh_lse);
  bool ok = true;
  for (std::int64_t k = 0; k < N; ++k) {
    ok = ok && near(sh_lp[k], full_lp[k], 1e-5) && near(sh_ent[k], full_ent[k], 1e-5) &&
         near(sh_lse[k], full_lse[k], 1e-5);
  }
  report(ok, "logits_shard_stats + shard_finish over 2 strided shards = full forward");
}

// The fused linear path equals the materialised one: logits = hidden · weightᵀ computed here,
// then logits_forward / logits_backward; d_weight = dzᵀ · hidden, d_hidden = dz · weight.
void test_fused_linear() {
  const std::int64_t N = 5, H = 3, V = 7;
  std::vector<float> hidden(N * H), weight(V * H), z(N * V);
  for (std::int64_t i = 0; i < N * H; ++i) hidden[i] = float(std::sin(0.7 * double(i) + 0.3));
  for (std::int64_t i = 0; i < V * H; ++i) weight[i] = float(std::cos(1.3 * double(i)));
  for (std::int64_t k = 0; k < N; ++k)
    for (std::int64_t v = 0; v < V; ++v)
      for (std::int64_t j = 0; j < H; ++j) z[k * V + v] += hidden[k * H + j] * weight[v * H + j];
  std::vector<std::int64_t> labels{0, 6, -1, 3, 2};
  std::vector<float> lp(N), ent(N), lse(N), g{1.f, -0.5f, 2.f, 0.25f, 1.f};
  calibrl::logits_forward(calibrl::TensorView(z, {N, V}), labels, 0.9, lp, ent, lse);
  std::vector<float> dz(N * V);
  calibrl::logits_backward(calibrl::TensorView(z, {N, V}), labels, 0.9, 0, lse, std::nullopt, g,
                           std::nullopt, calibrl::TensorView(dz, {N, V}));

  const std::int64_t chunk = 2;
  std::vector<std::uint8_t> ws(calibrl::fused_linear_workspace_size(
      calibrl::TensorView(hidden, {N, H}), calibrl::TensorView(weight, {V, H}), chunk) + 16);
  // 16-byte aligned start inside the buffer.
  const std::size_t skip = (16 - reinterpret_cast<std::uintptr_t>(ws.data()) % 16) % 16;
  const calibrl::TensorView wsv(ws.data() + skip, {std::int64_t(ws.size() - 16)});
  const calibrl::LinearInput in(calibrl::TensorView(hidden, {N, H}),
                                calibrl::TensorView(weight, {V, H}), std::nullopt, labels, wsv,
                                chunk, 0.9);
  std::vector<float> f_lp(N), f_ent(N), f_lse(N), dh(N * H), dw(V * H);
  calibrl::fused_linear_forward(in, f_lp, f_ent, f_lse);
  bool ok = true;
  for (std::int64_t k = 0; k < N; ++k) ok = ok && near(f_lp[k], lp[k], 1e-5) && near(f_ent[k], ent[k], 1e-5);
  report(ok, "fused_linear_forward = logits_forward of hidden·weightᵀ");
  calibrl::fused_linear_backward(in, f_lse, std::nullopt, g, std::nullopt,
                                 calibrl::TensorView(dh, {N, H}), calibrl::TensorView(dw, {V, H}),
                                 std::nullopt);
  ok = true;
  for (std::int64_t v = 0; v < V; ++v)
    for (std::int64_t j = 0; j < H; ++j) {
      double want = 0;
      for (std::int64_t k = 0; k < N; ++k) want += double(dz[k * V + v]) * hidden[k * H + j];
      ok = ok && near(dw[v * H + j], want, 1e-5);
    }
  for (std::int64_t k = 0; k < N; ++k)
    for (std::int64_t j = 0; j < H; ++j) {
      double want = 0;
      for (std::int64_t v = 0; v < V; ++v) want += double(dz[k * V + v]) * weight[v * H + j];
      ok = ok && near(dh[k * H + j], want, 1e-5);
    }
  report(ok, "fused_linear_backward = dzᵀ·hidden and dz·weight of logits_backward");
  try {
    const calibrl::LinearInput small(calibrl::TensorView(hidden, {N, H}),
                                     calibrl::TensorView(weight, {V, H}), std::nullopt, labels,
                                     calibrl::TensorView(ws.data() + skip, {8}), chunk, 0.9);
    calibrl::fused_linear_forward(small, f_lp, f_ent, f_lse);
    report(false, "short workspace: no exception");
  } catch (const calibrl::Error& e) {
    report(e.status() == CALIBRL_STATUS_BUFFER_TOO_SMALL &&
               std::string(e.what()).find("`workspace`") != std::string::npos,
           std::string("short workspace -> ") + e.what());
  }
}

// ---- the scheduler (SPEC §7) ----------------------------------------------------------------
static_assert(!std::is_copy_constructible_v<calibrl::Plan>, "Plan is move-only");
static_assert(std::is_nothrow_move_constructible_v<calibrl::Plan>);

// A deterministic step: `n` prompts, 1..6 rollouts of 1..60 tokens, an expert for 3 prompts in 4,
// and one 200-token rollout (over both budgets below).
std::vector<calibrl::Prompt> plan_prompts(int n) {
  std::uint64_t state = 7;
  auto next = [&state](std::uint32_t lo, std::uint32_t hi) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return lo + static_cast<std::uint32_t>((state >> 33) % (hi - lo + 1));
  };
  std::vector<calibrl::Prompt> prompts(n);
  for (int g = 0; g < n; ++g) {
    prompts[g].prompt_len = next(1, 40);
    const std::uint32_t k = next(1, 6);
    for (std::uint32_t j = 0; j < k; ++j) prompts[g].rollout_lens.push_back(next(1, 60));
    if (g % 4 != 0) prompts[g].expert_len = next(1, 80);
  }
  prompts[2].rollout_lens[0] = 200;
  return prompts;
}

// Every property of docs/scheduler.md that a plan must have, for CalibRL or LUFFY.
void check_plan(const std::vector<calibrl::Prompt>& prompts, const calibrl::SchedulerConfig& cfg,
                const std::string& name) {
  const calibrl::Plan plan(cfg, prompts);
  const calibrl_plan_info info = plan.summary();
  const bool trains_experts = cfg.capi().loss_kind == CALIBRL_LOSS_LUFFY;
  std::vector<std::uint32_t> prompt_of, lens;  // per rollout id
  std::uint64_t experts = 0, expert_tokens = 0;
  for (std::size_t g = 0; g < prompts.size(); ++g) {
    for (std::uint32_t n : prompts[g].rollout_lens) {
      prompt_of.push_back(static_cast<std::uint32_t>(g));
      lens.push_back(n);
    }
    if (prompts[g].expert_len) {
      experts += 1;
      expert_tokens += *prompts[g].expert_len;
    }
  }
  const std::int64_t R = static_cast<std::int64_t>(lens.size());
  const std::int64_t P = static_cast<std::int64_t>(experts);
  report(info.num_prompts == prompts.size() && info.num_rollouts == lens.size() &&
             info.num_expert_slots == experts && info.expert_tokens == expert_tokens &&
             info.dp_ranks == cfg.capi().dp_ranks,
         name + ": summary counts the input (" + std::to_string(R) + " rollouts, " +
             std::to_string(P) + " experts)");

  // Sequences describe the input.
  bool seqs_ok = true;
  for (std::int64_t i = 0; i < R; ++i) {
    const calibrl_seq_info s = plan.seq(i);
    seqs_ok = seqs_ok && s.kind == CALIBRL_SEQ_ROLLOUT && s.prompt == prompt_of[i] &&
              s.response_len == lens[i] && s.tokens == prompts[s.prompt].prompt_len + lens[i];
  }
  report(seqs_ok, name + ": seq(i) of every rollout matches its prompt and length");

  // Gather map, expert slots and offsets.
  const std::vector<std::int64_t> gather = plan.gather_map(), eprompts = plan.expert_prompts(),
                                  eoffsets = plan.expert_offsets();
  bool gather_ok = static_cast<std::int64_t>(gather.size()) == R &&
                   static_cast<std::int64_t>(eprompts.size()) == P &&
                   eoffsets.size() == eprompts.size() + 1 && eoffsets.front() == 0;
  for (std::size_t s = 0; gather_ok && s < eprompts.size(); ++s) {
    gather_ok = prompts[eprompts[s]].expert_len &&
                eoffsets[s + 1] - eoffsets[s] == *prompts[eprompts[s]].expert_len &&
                plan.seq(R + static_cast<std::int64_t>(s)).kind == CALIBRL_SEQ_EXPERT;
  }
  for (std::int64_t i = 0; gather_ok && i < R; ++i) {
    const std::int64_t slot = gather[i];
    gather_ok = slot == -1 ? !prompts[prompt_of[i]].expert_len
                           : slot < P && eprompts[slot] == prompt_of[i];
  }
  report(gather_ok, name + ": gather map points each rollout at its prompt's expert slot (-1: none)");

  // No-grad pass: every rollout and every expert exactly once; equal micro-batch counts.
  std::vector<int> seen(R + P, 0);
  bool ranks_ok = true, kinds_ok = true;
  for (const auto& rank : plan.nograd()) {
    ranks_ok = ranks_ok && rank.size() == info.nograd_microbatches;
    for (const calibrl::Microbatch& mb : rank) {
      for (std::size_t j = 0; j < mb.size(); ++j) {
        seen.at(mb.ids[j]) += 1;
        kinds_ok = kinds_ok && mb.kinds[j] == (mb.ids[j] >= R ? CALIBRL_SEQ_EXPERT : CALIBRL_SEQ_ROLLOUT);
      }
    }
  }
  report(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }) && ranks_ok && kinds_ok,
         name + ": no-grad pass holds every rollout and every expert once, " +
             std::to_string(info.nograd_microbatches) + " micro-batches on each rank");

  // Training pass: every rollout once per pass; experts only for LUFFY; normalisers = counts.
  std::fill(seen.begin(), seen.end(), 0);
  bool mb_ok = true, norm_ok = true;
  for (std::size_t b = 0; b < info.num_minibatches; ++b) {
    const calibrl_minibatch_info mbi = plan.minibatch(b);
    double tokens = 0, rows = 0;
    for (const auto& rank : plan.train(b)) {
      mb_ok = mb_ok && rank.size() == mbi.microbatches;
      for (const calibrl::Microbatch& mb : rank) {
        for (std::int64_t id : mb.ids) {
          seen.at(id) += 1;
          const calibrl_seq_info s = plan.seq(id);
          mb_ok = mb_ok && s.prompt >= mbi.first_prompt && s.prompt < mbi.first_prompt + mbi.num_prompts;
          tokens += s.response_len;
          rows += 1;
        }
      }
    }
    const calibrl_normalizers n = plan.normalizers(b);
    norm_ok = norm_ok && n.token_count == tokens && n.seq_count == rows &&
              mbi.normalizers.token_count == tokens && mbi.normalizers.seq_count == rows &&
              n.all_token_count == tokens && n.all_seq_count == rows;  // no untrained expert row
  }
  const bool rollouts_once = std::all_of(seen.begin(), seen.begin() + R, [](int c) { return c == 1; });
  const int want_expert = trains_experts ? 1 : 0;
  const bool experts_ok = std::all_of(seen.begin() + R, seen.end(), [&](int c) { return c == want_expert; });
  report(rollouts_once && mb_ok, name + ": training pass holds every rollout once, in its mini-batch, "
                                        "with equal micro-batch counts per rank");
  report(experts_ok, name + (trains_experts ? ": LUFFY trains each expert row once"
                                            : ": CalibRL never trains an expert row"));
  report(norm_ok, name + ": normalizers(b) = response tokens and rows of the trained sequences");

  // Oversize: the 200-token rollout (id of prompt 2's first rollout) is over both budgets.
  std::int64_t long_id = 0;
  for (std::size_t g = 0; g < 2; ++g) long_id += static_cast<std::int64_t>(prompts[g].rollout_lens.size());
  const auto over_ng = plan.oversize(CALIBRL_PASS_NOGRAD), over_tr = plan.oversize(CALIBRL_PASS_TRAIN);
  report(std::find(over_ng.begin(), over_ng.end(), long_id) != over_ng.end() &&
             std::find(over_tr.begin(), over_tr.end(), long_id) != over_tr.end() &&
             over_ng.size() == info.nograd_oversize && over_tr.size() == info.train_oversize,
         name + ": oversize(NOGRAD/TRAIN) list the 200-token rollout");
}

void test_plan() {
  const std::vector<calibrl::Prompt> prompts = plan_prompts(20);
  const calibrl::SchedulerConfig defaults;
  report(defaults.capi().dp_ranks == 1 && defaults.capi().nograd_token_budget == 16384 &&
             defaults.capi().loss_kind == CALIBRL_LOSS_CALIBRL &&
             defaults.capi().expert_selection == CALIBRL_SELECT_ALL &&
             near(defaults.capi().quadratic_coef, CALIBRL_DEFAULT_QUADRATIC_COEF, 1e-15),
         "SchedulerConfig() holds calibrl_scheduler_config_default");
  const calibrl::SchedulerConfig cfg = calibrl::SchedulerConfig{}
                                           .dp_ranks(3)
                                           .minibatch_prompts(6)
                                           .nograd_token_budget(150)
                                           .train_token_budget(100);
  check_plan(prompts, cfg, "CalibRL plan");
  check_plan(prompts, calibrl::SchedulerConfig(cfg).loss_kind(CALIBRL_LOSS_LUFFY), "LUFFY plan");

  // The two-call convention of the raw ABI, which the wrapper relies on.
  calibrl::Plan plan(cfg, prompts);
  std::size_t len = 0;
  std::int64_t one[1];
  const calibrl_status s = calibrl_plan_gather_map(plan.capi(), one, 1, &len);
  const std::string message = calibrl_last_error_message();  // before the next calibrl call
  report(s == CALIBRL_STATUS_BUFFER_TOO_SMALL && len == plan.summary().num_rollouts &&
             message.find("`expert_index`") != std::string::npos,
         "a short buffer gives BUFFER_TOO_SMALL and the needed length: " + message);

  // collect_experts: each token's value encodes (id, position); the expert tensor and sums follow.
  const std::int64_t R = static_cast<std::int64_t>(plan.summary().num_rollouts);
  std::vector<double> nograd_out;
  for (const auto& rank : plan.nograd()) {
    for (const calibrl::Microbatch& mb : rank) {
      for (std::int64_t id : mb.ids) {
        for (std::uint32_t t = 0; t < plan.seq(id).response_len; ++t) nograd_out.push_back(id * 1000.0 + t);
      }
    }
  }
  const std::vector<std::int64_t> offsets = plan.expert_offsets();
  std::vector<double> expert_lp(offsets.back()), sums(offsets.size() - 1);
  plan.collect_experts(-1, nograd_out, expert_lp, sums);
  bool collect_ok = true;
  for (std::size_t slot = 0; slot + 1 < offsets.size(); ++slot) {
    double sum = 0;
    for (std::int64_t t = offsets[slot]; t < offsets[slot + 1]; ++t) {
      const double want = (R + static_cast<std::int64_t>(slot)) * 1000.0 + double(t - offsets[slot]);
      collect_ok = collect_ok && expert_lp[t] == want;
      sum += want;
    }
    collect_ok = collect_ok && sums[slot] == sum;
  }
  report(collect_ok, "collect_experts gathers each expert's no-grad log-probs and sums them");
  expect_error([&] { plan.collect_experts(-1, expert_lp, std::nullopt, sums); },
               CALIBRL_STATUS_SHAPE_MISMATCH, "`nograd_logprobs`",
               "collect_experts with the wrong length names nograd_logprobs");

  calibrl_plan* raw = plan.capi();
  calibrl::Plan moved = std::move(plan);
  report(plan.capi() == nullptr && moved.capi() == raw, "Plan moves its handle");  // NOLINT(use-after-move)

  // Errors name the argument.
  expect_error([&] { calibrl::Plan p(calibrl::SchedulerConfig(cfg).dp_ranks(0), prompts); },
               CALIBRL_STATUS_INVALID_ARGUMENT, "`config.dp_ranks`", "zero ranks");
  expect_error([&] { calibrl::Plan p(calibrl::SchedulerConfig(cfg).train_token_budget(0), prompts); },
               CALIBRL_STATUS_INVALID_ARGUMENT, "`config.train_token_budget`", "zero training budget");
  std::vector<calibrl::Prompt> bad = prompts;
  bad[1].rollout_lens.clear();
  expect_error([&] { calibrl::Plan p(cfg, bad); }, CALIBRL_STATUS_INVALID_ARGUMENT,
               "`prompts[1].num_rollouts`", "a prompt with no rollouts");
  bad = prompts;
  bad[0].rewards.assign(bad[0].rollout_lens.size(), 1.0);
  expect_error([&] { calibrl::Plan p(cfg, bad); }, CALIBRL_STATUS_INVALID_ARGUMENT,
               "`prompts[1].rewards`", "rewards for some prompts only");
  expect_error([&] { (void)moved.minibatch(99); }, CALIBRL_STATUS_INVALID_ARGUMENT, "`minibatch`",
               "a mini-batch index out of range");
  expect_error([&] { (void)moved.oversize(7); }, CALIBRL_STATUS_INVALID_ARGUMENT, "`pass`",
               "an unknown pass");
}

// The train_step example's batch, recomputed independently: log-softmax by hand in double,
// advantages by hand, padded [B, S] f64 layout with a mask, the raw C ABI (no wrapper).
double reference_train_step_loss() {
  const SyntheticBatch b = make_synthetic_batch();
  const std::int64_t B = b.rows(), V = b.vocab;
  auto log_softmax_at = [V](const std::vector<float>& logits, std::int64_t row, std::int64_t y) {
    double mx = -1e300, sum = 0;
    for (std::int64_t v = 0; v < V; ++v) mx = std::max(mx, double(logits[row * V + v]));
    for (std::int64_t v = 0; v < V; ++v) sum += std::exp(double(logits[row * V + v]) - mx);
    return double(logits[row * V + y]) - mx - std::log(sum);
  };
  std::int64_t S = 0;
  for (std::int64_t i = 0; i < B; ++i) S = std::max(S, b.seq_offsets[i + 1] - b.seq_offsets[i]);
  std::vector<double> lp(B * S, 0.0), old(B * S, 0.0);
  std::vector<std::uint8_t> mask(B * S, 0);
  for (std::int64_t i = 0; i < B; ++i) {
    for (std::int64_t t = b.seq_offsets[i]; t < b.seq_offsets[i + 1]; ++t) {
      const std::int64_t j = i * S + (t - b.seq_offsets[i]);
      lp[j] = log_softmax_at(b.logits, t, b.labels[t]);
      old[j] = log_softmax_at(b.old_logits, t, b.labels[t]);
      mask[j] = 1;
    }
  }
  const std::int64_t Se = b.expert_offsets[1];
  std::vector<double> expert(Se);
  for (std::int64_t t = 0; t < Se; ++t) expert[t] = log_softmax_at(b.expert_logits, t, b.expert_labels[t]);
  // SPEC §3 with norm_by_std = false: A = r − μ_g, w = |A|, c = +1 iff r > 0.1.
  std::vector<double> adv(B), w(B), sign(B);
  for (std::int64_t i = 0; i < B; ++i) {
    double mu = 0;
    int n = 0;
    for (std::int64_t k = 0; k < B; ++k) {
      if (b.group_ids[k] == b.group_ids[i]) { mu += b.rewards[k]; ++n; }
    }
    mu /= n;
    adv[i] = b.rewards[i] - mu;
    w[i] = std::fabs(adv[i]);
    sign[i] = b.rewards[i] > 0.1 ? 1.0 : -1.0;
  }

  std::int64_t shape_bs[] = {B, S}, shape_b[] = {B}, shape_e[] = {1, Se};
  auto dl = [](void* data, std::int32_t ndim, std::int64_t* shape, std::uint8_t code,
               std::uint8_t bits) {
    DLTensor t{};
    t.data = data;
    t.device.device_type = static_cast<decltype(t.device.device_type)>(1);
    t.ndim = ndim;
    t.dtype = DLDataType{code, bits, 1};
    t.shape = shape;
    return t;
  };
  DLTensor t_lp = dl(lp.data(), 2, shape_bs, 2, 64), t_old = dl(old.data(), 2, shape_bs, 2, 64);
  DLTensor t_mask = dl(mask.data(), 2, shape_bs, 1, 8);
  DLTensor t_adv = dl(adv.data(), 1, shape_b, 2, 64), t_w = dl(w.data(), 1, shape_b, 2, 64);
  DLTensor t_sign = dl(sign.data(), 1, shape_b, 2, 64);
  DLTensor t_exp = dl(expert.data(), 2, shape_e, 2, 64);
  std::vector<std::int64_t> index = b.expert_index;
  DLTensor t_idx = dl(index.data(), 1, shape_b, 0, 64);
  calibrl_loss_args args{};
  args.logprobs = &t_lp;
  args.mask = &t_mask;
  args.old_logprobs = &t_old;
  args.advantages = &t_adv;
  args.weights = &t_w;
  args.signs = &t_sign;
  args.expert_logprobs = &t_exp;
  args.expert_index = &t_idx;
  calibrl_config* cfg = nullptr;
  if (calibrl_config_new("{\"preset\":\"paper\"}", &cfg) != CALIBRL_STATUS_OK) return NAN;
  calibrl_metrics m{};
  const calibrl_status s = calibrl_loss(cfg, &args, &m, nullptr);
  calibrl_config_free(cfg);
  if (s != CALIBRL_STATUS_OK) {
    std::printf("reference path failed: %s\n", calibrl_last_error_message());
    return NAN;
  }
  return m.loss;
}

// The example's path (wrapper, packed f32, fused logits forward) inside this test as well.
double wrapper_train_step_loss() {
  const SyntheticBatch b = make_synthetic_batch();
  const std::int64_t B = b.rows(), T = b.tokens(), V = b.vocab, Te = b.expert_offsets.back();
  const calibrl::Config cfg;
  std::vector<float> adv(B), w(B), sign(B), lp(T), old(T), lse(T), elp(Te), else_(Te);
  calibrl::group_advantages(cfg, calibrl::AdvantageArgs{}
                                     .rewards(b.rewards)
                                     .group_ids(b.group_ids, b.num_groups)
                                     .advantages(adv)
                                     .weights(w)
                                     .signs(sign));
  calibrl::logits_forward(calibrl::TensorView(b.logits.data(), {T, V}), b.labels, 1.0, lp,
                          std::nullopt, lse);
  calibrl::logits_forward(calibrl::TensorView(b.old_logits.data(), {T, V}), b.labels, 1.0, old,
                          std::nullopt, lse);
  calibrl::logits_forward(calibrl::TensorView(b.expert_logits.data(), {Te, V}), b.expert_labels,
                          1.0, elp, std::nullopt, else_);
  return calibrl::loss(cfg, calibrl::LossArgs{}
                                .logprobs(lp, b.seq_offsets)
                                .old_logprobs(old)
                                .advantages(adv)
                                .weights(w)
                                .signs(sign)
                                .expert(elp, b.expert_offsets, b.expert_index))
      .loss;
}

}  // namespace

// SPEC §7.6: dynamic sampling leaves out groups whose rewards are all equal, and reports them.
void test_dynamic_sampling() {
  std::vector<calibrl::Prompt> prompts(3);
  prompts[0] = {10, {5, 7, 9}, 12, {1.0, 1.0, 1.0}};
  prompts[1] = {4, {3, 3}, 6, {0.0, 1.0}};
  prompts[2] = {8, {2, 4}, 5, {0.0, 0.0}};
  calibrl::SchedulerConfig cfg;
  cfg.dynamic_sampling(true);
  const calibrl::Plan plan(cfg, prompts);
  const std::vector<std::int64_t> dropped = plan.dropped_prompts();
  report(dropped == std::vector<std::int64_t>{0, 2} && plan.summary().dropped_prompts == 2,
         "dynamic sampling: prompts 0 and 2 (all equal) are dropped and reported");
  report(plan.expert_prompts() == std::vector<std::int64_t>{1},
         "dynamic sampling: only the kept prompt's expert is forwarded");
  const calibrl_normalizers n = plan.minibatch(0).normalizers;
  report(n.token_count == 6.0 && n.seq_count == 2.0,
         "dynamic sampling: the normalisers count the kept rollouts only");
  const calibrl::Plan off(calibrl::SchedulerConfig{}, prompts);
  report(off.dropped_prompts().empty() && off.expert_prompts().size() == 3,
         "dynamic sampling off: nothing dropped");
}

int main(int argc, char** argv) {
  const bool print_reference = argc > 1 && std::strcmp(argv[1], "--train-step-reference") == 0;
  const std::pair<const char*, void (*)()> groups[] = {
      {"version", test_version},     {"config", test_config},
      {"views", test_views},         {"advantages", test_advantages},
      {"loss (one token)", test_loss_one_token},
      {"loss (clipping)", test_loss_clipping},
      {"loss (KL-Cov)", test_loss_kl_cov},
      {"errors", test_errors},       {"logits", test_logits},
      {"fused linear", test_fused_linear},
      {"plan", test_plan},           {"dynamic sampling", test_dynamic_sampling},
  };
  for (const auto& [name, fn] : groups) {
    std::printf("[%s]\n", name);
    try {
      fn();
    } catch (const std::exception& e) {
      report(false, std::string(name) + ": unexpected exception: " + e.what());
    }
  }
  std::printf("[train_step]\n");
  try {
    const double ref = reference_train_step_loss();
    const double wrapped = wrapper_train_step_loss();
    check_near(wrapped, ref, 1e-5, "example batch: wrapper/packed/f32 path = raw C/padded/f64 path");
    report(std::isfinite(ref) && ref != 0.0, "example batch: loss finite and non-zero");
    if (print_reference) std::printf("train_step reference loss = %.9g\n", ref);
  } catch (const std::exception& e) {
    report(false, std::string("train_step: unexpected exception: ") + e.what());
  }
  std::printf("checks: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
