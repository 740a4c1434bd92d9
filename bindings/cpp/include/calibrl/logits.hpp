// calibrl/logits.hpp — part of calibrl.hpp (include <calibrl.hpp>).
// The fused logits path (SPEC §6).

#ifndef CALIBRL_LOGITS_HPP
#define CALIBRL_LOGITS_HPP

#include "prelude.hpp"
#include "tensor.hpp"

namespace calibrl {

/// Forward over full-vocabulary logits `[N, V]`: writes logprobs `[N]`, entropy `[N]`
/// (optional) and lse `[N]` (keep it for the backward). Negative labels mark ignored rows.
inline void logits_forward(const TensorView& logits, const TensorView& labels,
                           double temperature, const TensorView& logprobs,
                           const OptionalView& entropy, const TensorView& lse,
                           calibrl_stream stream = nullptr) {
  check(calibrl_logits_forward(logits.dl(), labels.dl(), temperature,
                               detail::out(logprobs, "logprobs"), detail::out(entropy, "entropy"),
                               detail::out(lse, "lse"), stream));
}

/// Backward: grad_logits = ∂L/∂z from grad_logprobs (and grad_entropy, which needs entropy).
/// grad_logits may view the logits buffer itself (in place). vocab_start: 0, or a shard's
/// first vocabulary id.
inline void logits_backward(const TensorView& logits, const TensorView& labels,
                            double temperature, std::int64_t vocab_start, const TensorView& lse,
                            const OptionalView& entropy, const TensorView& grad_logprobs,
                            const OptionalView& grad_entropy, const TensorView& grad_logits,
                            calibrl_stream stream = nullptr) {
  check(calibrl_logits_backward(logits.dl(), labels.dl(), temperature, vocab_start, lse.dl(),
                                detail::in(entropy), grad_logprobs.dl(), detail::in(grad_entropy),
                                detail::out(grad_logits, "grad_logits"), stream));
}

/// Forward and backward in one call, for losses whose grad_logprobs (and grad_entropy) are
/// known per token before it: the values of logits_forward then logits_backward with the saved
/// lse and entropy. logprobs, entropy (optional unless grad_entropy is given) and lse are
/// float32 or float64 `[N]`; grad_logits has the logits' dtype and may view the logits buffer
/// itself (in place). Full vocabulary only; on CUDA sm_90+ one kernel reads each row once
/// where it fits a thread-block cluster.
inline void logits_forward_backward(const TensorView& logits, const TensorView& labels,
                                    double temperature, const TensorView& grad_logprobs,
                                    const OptionalView& grad_entropy, const TensorView& logprobs,
                                    const OptionalView& entropy, const TensorView& lse,
                                    const TensorView& grad_logits,
                                    calibrl_stream stream = nullptr) {
  check(calibrl_logits_forward_backward(
      logits.dl(), labels.dl(), temperature, grad_logprobs.dl(), detail::in(grad_entropy),
      detail::out(logprobs, "logprobs"), detail::out(entropy, "entropy"), detail::out(lse, "lse"),
      detail::out(grad_logits, "grad_logits"), stream));
}

/// Vocabulary-parallel phase 1: stats `[N, 4]` f32 of this rank's shard of the logits.
inline void logits_shard_stats(const TensorView& logits, const TensorView& labels,
                               double temperature, std::int64_t vocab_start,
                               const TensorView& stats, calibrl_stream stream = nullptr) {
  check(calibrl_logits_shard_stats(logits.dl(), labels.dl(), temperature, vocab_start,
                                   detail::out(stats, "stats"), stream));
}

/// Vocabulary-parallel phase 2: all-gathered stats `[R, N, 4]` → logprobs, entropy
/// (optional), lse, each `[N]`.
inline void logits_shard_finish(const TensorView& stats, const TensorView& labels,
                                const TensorView& logprobs, const OptionalView& entropy,
                                const TensorView& lse, calibrl_stream stream = nullptr) {
  check(calibrl_logits_shard_finish(stats.dl(), labels.dl(), detail::out(logprobs, "logprobs"),
                                    detail::out(entropy, "entropy"), detail::out(lse, "lse"),
                                    stream));
}

}  // namespace calibrl

#endif  // CALIBRL_LOGITS_HPP
