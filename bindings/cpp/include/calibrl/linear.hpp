// calibrl/linear.hpp — part of calibrl.hpp (include <calibrl.hpp>).
// The fused linear path: hidden states and LM head → log-prob, entropy, lse and the gradients
// of both, in chunks of tokens through a workspace instead of an [N, V] logits tensor.

#ifndef CALIBRL_LINEAR_HPP
#define CALIBRL_LINEAR_HPP

#include "prelude.hpp"
#include "tensor.hpp"

namespace calibrl {

/// Workspace bytes for chunks of `chunk_size` tokens of `hidden [N, H]` against `weight`.
[[nodiscard]] inline std::size_t fused_linear_workspace_size(const TensorView& hidden,
                                                             const TensorView& weight,
                                                             std::int64_t chunk_size) {
  std::size_t bytes = 0;
  check(calibrl_fused_linear_workspace_size(hidden.dl(), weight.dl(), chunk_size, &bytes));
  return bytes;
}

/// The inputs every fused linear call takes (calibrl_linear_input): hidden `[N, H]`, weight
/// `[V, H]` (a vocabulary shard starting at `vocab_start`), optional bias `[V]`, labels `[N]`,
/// and a workspace of at least fused_linear_workspace_size(hidden, weight, chunk_size) bytes.
/// Holds copies of the views (not of the data).
class LinearInput {
 public:
  LinearInput(TensorView hidden, TensorView weight, OptionalView bias, TensorView labels,
              TensorView workspace, std::int64_t chunk_size, double temperature = 1.0,
              std::int64_t vocab_start = 0)
      : hidden_(std::move(hidden)), weight_(std::move(weight)), bias_(std::move(bias)),
        labels_(std::move(labels)), workspace_(std::move(workspace)), chunk_size_(chunk_size),
        temperature_(temperature), vocab_start_(vocab_start) {}

  /// The C struct, pointing into this object's views (valid while it lives).
  [[nodiscard]] calibrl_linear_input capi() const {
    return {hidden_.dl(), weight_.dl(), detail::in(bias_), labels_.dl(), temperature_,
            vocab_start_, chunk_size_, detail::out(workspace_, "workspace")};
  }

 private:
  TensorView hidden_, weight_;
  OptionalView bias_;
  TensorView labels_, workspace_;
  std::int64_t chunk_size_;
  double temperature_;
  std::int64_t vocab_start_;
};

/// Forward (full vocabulary): logprobs `[N]`, entropy `[N]` (optional), lse `[N]`.
inline void fused_linear_forward(const LinearInput& in, const TensorView& logprobs,
                                 const OptionalView& entropy, const TensorView& lse,
                                 calibrl_stream stream = nullptr) {
  const calibrl_linear_input c = in.capi();
  check(calibrl_fused_linear_forward(&c, detail::out(logprobs, "logprobs"),
                                     detail::out(entropy, "entropy"), detail::out(lse, "lse"),
                                     stream));
}

/// Vocabulary-parallel phase 1 for this rank's weight shard: stats `[N, 4]` f32; finish with
/// logits_shard_finish on the all-gathered `[R, N, 4]`.
inline void fused_linear_shard_stats(const LinearInput& in, const TensorView& stats,
                                     calibrl_stream stream = nullptr) {
  const calibrl_linear_input c = in.capi();
  check(calibrl_fused_linear_shard_stats(&c, detail::out(stats, "stats"), stream));
}

/// Backward: d_hidden `[N, H]` (overwritten), d_weight `[V, H]` and d_bias `[V]` (float32,
/// optional bias gradient; overwritten, or added to with `accumulate`).
inline void fused_linear_backward(const LinearInput& in, const TensorView& lse,
                                  const OptionalView& entropy, const TensorView& grad_logprobs,
                                  const OptionalView& grad_entropy, const TensorView& d_hidden,
                                  const TensorView& d_weight, const OptionalView& d_bias,
                                  bool accumulate = false, calibrl_stream stream = nullptr) {
  const calibrl_linear_input c = in.capi();
  check(calibrl_fused_linear_backward(
      &c, lse.dl(), detail::in(entropy), grad_logprobs.dl(), detail::in(grad_entropy),
      detail::out(d_hidden, "d_hidden"), detail::out(d_weight, "d_weight"),
      detail::out(d_bias, "d_bias"), accumulate ? 1 : 0, stream));
}

/// Forward and backward in one pass, for ∂L/∂ℓ (and ∂L/∂H) known per token before the call.
inline void fused_linear_forward_backward(const LinearInput& in, const TensorView& grad_logprobs,
                                          const OptionalView& grad_entropy,
                                          const TensorView& logprobs, const OptionalView& entropy,
                                          const OptionalView& lse, const TensorView& d_hidden,
                                          const TensorView& d_weight, const OptionalView& d_bias,
                                          bool accumulate = false,
                                          calibrl_stream stream = nullptr) {
  const calibrl_linear_input c = in.capi();
  check(calibrl_fused_linear_forward_backward(
      &c, grad_logprobs.dl(), detail::in(grad_entropy), detail::out(logprobs, "logprobs"),
      detail::out(entropy, "entropy"), detail::out(lse, "lse"), detail::out(d_hidden, "d_hidden"),
      detail::out(d_weight, "d_weight"), detail::out(d_bias, "d_bias"), accumulate ? 1 : 0,
      stream));
}

}  // namespace calibrl

#endif  // CALIBRL_LINEAR_HPP
