// calibrl/loss.hpp — part of calibrl.hpp (include <calibrl.hpp>).
// Group advantages (SPEC §3) and the loss (SPEC §4).

#ifndef CALIBRL_LOSS_HPP
#define CALIBRL_LOSS_HPP

#include "prelude.hpp"
#include "config.hpp"
#include "tensor.hpp"

namespace calibrl {

/// Arguments of calibrl::group_advantages, set by name (a builder).
class AdvantageArgs {
 public:
  /// Inputs: `[B]` float rewards, `[B]` int32/int64 group ids in [0, num_groups).
  AdvantageArgs& rewards(TensorView v) { rewards_ = v; return *this; }
  AdvantageArgs& group_ids(TensorView v, std::int64_t num_groups) {
    group_ids_ = v;
    num_groups_ = num_groups;
    return *this;
  }
  /// Optional `[B]` correctness (non-zero = correct); otherwise correct iff reward > τ.
  AdvantageArgs& correct(TensorView v) { correct_ = v; return *this; }
  /// Optional `[B]` expert rows (excluded from the group statistics).
  AdvantageArgs& is_expert(TensorView v) { is_expert_ = v; return *this; }
  /// Outputs, each `[B]` float.
  AdvantageArgs& advantages(TensorView v) { advantages_ = v; return *this; }
  AdvantageArgs& weights(TensorView v) { weights_ = v; return *this; }
  AdvantageArgs& signs(TensorView v) { signs_ = v; return *this; }

  /// The C struct, pointing into this object: valid while it lives, unchanged.
  [[nodiscard]] calibrl_advantage_args capi() const {
    calibrl_advantage_args a{};
    a.rewards = detail::in(rewards_);
    a.group_ids = detail::in(group_ids_);
    a.num_groups = num_groups_;
    a.correct = detail::in(correct_);
    a.is_expert = detail::in(is_expert_);
    a.advantages = detail::out(advantages_, "advantages");
    a.weights = detail::out(weights_, "weights");
    a.signs = detail::out(signs_, "signs");
    return a;
  }

 private:
  OptionalView rewards_, group_ids_, correct_, is_expert_, advantages_, weights_, signs_;
  std::int64_t num_groups_ = 0;
};

/// Group-normalised advantages, rarity weights |A| and signs into the caller's buffers.
inline void group_advantages(const Config& cfg, const AdvantageArgs& args,
                             calibrl_stream stream = nullptr) {
  const calibrl_advantage_args a = args.capi();
  check(calibrl_group_advantages(cfg.capi(), &a, stream));
}

/// Host-side results of the convenience overload.
struct Advantages {
  std::vector<float> advantages;
  std::vector<float> weights;
  std::vector<float> signs;
};

/// Convenience for host data: allocates and returns the three `[B]` outputs.
[[nodiscard]] inline Advantages group_advantages(const Config& cfg,
                                                 const std::vector<float>& rewards,
                                                 const std::vector<std::int64_t>& group_ids,
                                                 std::int64_t num_groups) {
  Advantages r;
  r.advantages.resize(rewards.size());
  r.weights.resize(rewards.size());
  r.signs.resize(rewards.size());
  group_advantages(cfg, AdvantageArgs{}
                            .rewards(rewards)
                            .group_ids(group_ids, num_groups)
                            .advantages(r.advantages)
                            .weights(r.weights)
                            .signs(r.signs));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Loss (SPEC §4)

/// Arguments of calibrl::loss, set by name (a builder); unset optional fields are absent.
/// Stores copies of the views (descriptors only), so temporaries of TensorView are fine.
class LossArgs {
 public:
  /// Policy log-probs ℓ: packed `[T]` with `[B+1]` row offsets ...
  LossArgs& logprobs(TensorView v, TensorView seq_offsets) {
    logprobs_ = v;
    seq_offsets_ = seq_offsets;
    return *this;
  }
  /// ... or padded `[B, S]` (then usually with a mask).
  LossArgs& logprobs(TensorView v) { logprobs_ = v; seq_offsets_.reset(); return *this; }
  LossArgs& mask(TensorView v) { mask_ = v; return *this; }
  LossArgs& old_logprobs(TensorView v) { old_logprobs_ = v; return *this; }
  LossArgs& ref_logprobs(TensorView v) { ref_logprobs_ = v; return *this; }
  LossArgs& entropy(TensorView v) { entropy_ = v; return *this; }
  /// Per-token importance weights ρ ≥ 0 (layout of logprobs) on the policy-gradient term,
  /// like verl's rollout_is_weights (CPU and CUDA backends).
  LossArgs& token_weights(TensorView v) { token_weights_ = v; return *this; }
  /// `[B]` advantages, rarity weights and signs (as from calibrl::group_advantages).
  LossArgs& advantages(TensorView v) { advantages_ = v; return *this; }
  LossArgs& weights(TensorView v) { weights_ = v; return *this; }
  LossArgs& signs(TensorView v) { signs_ = v; return *this; }
  LossArgs& is_expert(TensorView v) { is_expert_ = v; return *this; }
  /// Expert baseline, packed: `[T*]` log-probs, `[P+1]` offsets, `[B]` slot per row (−1: none).
  LossArgs& expert(TensorView logprobs, TensorView offsets, TensorView index) {
    expert_logprobs_ = logprobs;
    expert_offsets_ = offsets;
    expert_index_ = index;
    return *this;
  }
  /// Expert baseline, padded: `[P, S*]` log-probs (optional mask via expert_mask), `[B]` slots.
  LossArgs& expert(TensorView logprobs, TensorView index) {
    expert_logprobs_ = logprobs;
    expert_offsets_.reset();
    expert_index_ = index;
    return *this;
  }
  LossArgs& expert_mask(TensorView v) { expert_mask_ = v; return *this; }
  /// Global token and sequence counts of the mini-batch's trained rows (all ranks, all
  /// micro-batches); optionally every row's counts, expert rows included (the entropy and KL
  /// denominators of the `authors` preset, SPEC §4.7; 0 = the same as the trained rows').
  LossArgs& normalizers(double token_count, double seq_count, double all_token_count = 0.0,
                        double all_seq_count = 0.0) {
    normalizers_ = calibrl_normalizers{token_count, seq_count, all_token_count, all_seq_count};
    return *this;
  }
  /// The same from a calibrl::Plan (Plan::normalizers(b)).
  LossArgs& normalizers(const calibrl_normalizers& n) { normalizers_ = n; return *this; }
  /// Outputs: ∂L/∂ℓ and ∂L/∂H (shape of logprobs), `[CALIBRL_METRICS_LEN]` device metrics.
  LossArgs& grad_logprobs(TensorView v) { grad_logprobs_ = v; return *this; }
  LossArgs& grad_entropy(TensorView v) { grad_entropy_ = v; return *this; }
  LossArgs& metrics(TensorView v) { metrics_ = v; return *this; }

  /// The C struct, pointing into this object: valid while it lives, unchanged.
  [[nodiscard]] calibrl_loss_args capi() const {
    calibrl_loss_args a{};
    a.logprobs = detail::in(logprobs_);
    a.seq_offsets = detail::in(seq_offsets_);
    a.mask = detail::in(mask_);
    a.old_logprobs = detail::in(old_logprobs_);
    a.ref_logprobs = detail::in(ref_logprobs_);
    a.entropy = detail::in(entropy_);
    a.advantages = detail::in(advantages_);
    a.weights = detail::in(weights_);
    a.signs = detail::in(signs_);
    a.is_expert = detail::in(is_expert_);
    a.expert_logprobs = detail::in(expert_logprobs_);
    a.expert_offsets = detail::in(expert_offsets_);
    a.expert_mask = detail::in(expert_mask_);
    a.expert_index = detail::in(expert_index_);
    a.normalizers = normalizers_ ? &*normalizers_ : nullptr;
    a.grad_logprobs = detail::out(grad_logprobs_, "grad_logprobs");
    a.grad_entropy = detail::out(grad_entropy_, "grad_entropy");
    a.metrics = detail::out(metrics_, "metrics");
    a.token_weights = detail::in(token_weights_);
    return a;
  }

 private:
  OptionalView logprobs_, seq_offsets_, mask_, old_logprobs_, ref_logprobs_, entropy_,
      advantages_, weights_, signs_, is_expert_, expert_logprobs_, expert_offsets_,
      expert_mask_, expert_index_, grad_logprobs_, grad_entropy_, metrics_, token_weights_;
  std::optional<calibrl_normalizers> normalizers_;
};

/// The loss: writes the requested gradients into the caller's buffers and returns the metrics
/// (on CUDA this synchronises `stream` to read them; set LossArgs::metrics and call
/// loss_async to keep them on the device).
[[nodiscard]] inline calibrl_metrics loss(const Config& cfg, const LossArgs& args,
                                          calibrl_stream stream = nullptr) {
  const calibrl_loss_args a = args.capi();
  calibrl_metrics m{};
  check(calibrl_loss(cfg.capi(), &a, &m, stream));
  return m;
}

/// The loss without host metrics: no stream synchronisation on CUDA.
inline void loss_async(const Config& cfg, const LossArgs& args, calibrl_stream stream = nullptr) {
  const calibrl_loss_args a = args.capi();
  check(calibrl_loss(cfg.capi(), &a, nullptr, stream));
}

}  // namespace calibrl

#endif  // CALIBRL_LOSS_HPP
