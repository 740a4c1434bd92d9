// One CalibRL training step in C++ on the trainer's own buffers (CPU here; CUDA buffers work the
// same with calibrl::Device::cuda() views and a stream):
//
//   1. rewards -> group advantages, rarity weights, correctness signs        (SPEC §3)
//   2. no-grad pass: behaviour log-probs of the rollouts, expert log-probs    (SPEC §6)
//   3. training pass: policy log-probs and entropy from the logits            (SPEC §6)
//   4. the loss: value, metrics and dL/dlogprob                               (SPEC §4)
//   5. backward through the logits: dL/dlogits, ready for the model's backward
//
// The batch layout (which rows go into which pass) is fixed here; the expert-baseline scheduler
// (SPEC §7, calibrl_plan_*) plans it when the library provides it.
//
// Build against an installed package:  cmake -S . -B build -DCMAKE_PREFIX_PATH=<prefix>
#include <calibrl.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "synthetic_batch.hpp"

int main() {
  try {
    calibrl::check_abi();
    const SyntheticBatch b = make_synthetic_batch();
    const std::int64_t B = b.rows(), T = b.tokens(), V = b.vocab;
    const std::int64_t T_expert = b.expert_offsets.back();
    const calibrl::Config cfg = calibrl::Config::preset("paper");

    // 1. Advantages. Outputs go into buffers the trainer owns.
    std::vector<float> adv(B), weights(B), signs(B);
    calibrl::group_advantages(cfg, calibrl::AdvantageArgs{}
                                       .rewards(b.rewards)
                                       .group_ids(b.group_ids, b.num_groups)
                                       .advantages(adv)
                                       .weights(weights)
                                       .signs(signs));

    // 2. No-grad pass: behaviour log-probs and the expert's log-probs (one copy per prompt).
    std::vector<float> old_lp(T), lse_scratch(T), expert_lp(T_expert), expert_lse(T_expert);
    calibrl::logits_forward(calibrl::TensorView(b.old_logits.data(), {T, V}), b.labels, 1.0,
                            old_lp, std::nullopt, lse_scratch);
    calibrl::logits_forward(calibrl::TensorView(b.expert_logits.data(), {T_expert, V}),
                            b.expert_labels, 1.0, expert_lp, std::nullopt, expert_lse);

    // 3. Training pass: policy log-probs, entropy, and the log-sum-exp kept for the backward.
    std::vector<float> logits = b.logits;  // the model's output buffer (overwritten in step 5)
    const calibrl::TensorView logits_view(logits.data(), {T, V});
    std::vector<float> lp(T), entropy(T), lse(T);
    calibrl::logits_forward(logits_view, b.labels, 1.0, lp, entropy, lse);

    // 4. The loss.
    std::vector<float> grad_lp(T);
    const calibrl_metrics m = calibrl::loss(cfg, calibrl::LossArgs{}
                                                     .logprobs(lp, b.seq_offsets)
                                                     .old_logprobs(old_lp)
                                                     .advantages(adv)
                                                     .weights(weights)
                                                     .signs(signs)
                                                     .expert(expert_lp, b.expert_offsets,
                                                             b.expert_index)
                                                     .grad_logprobs(grad_lp));

    // 5. dL/dlogits, in place over the logits buffer.
    calibrl::logits_backward(logits_view, b.labels, 1.0, 0, lse, std::nullopt, grad_lp,
                             std::nullopt, logits_view);
    double grad_norm = 0.0;
    for (float g : logits) grad_norm += static_cast<double>(g) * g;
    grad_norm = std::sqrt(grad_norm);

    std::printf("calibrl %s (ABI %u), preset paper, %lld rollouts, %lld tokens\n",
                std::string(calibrl::version()).c_str(), calibrl::abi_version(), static_cast<long long>(B),
                static_cast<long long>(T));
    std::printf("rarity weights:");
    for (float w : weights) std::printf(" %.4f", w);
    std::printf("\n");
    std::printf("loss = %.9g\n", m.loss);
    std::printf("pg_loss = %.9g\nexplore_loss = %.9g\nclipfrac = %.9g\nppo_kl = %.9g\n",
                m.pg_loss, m.explore_loss, m.clipfrac, m.ppo_kl);
    std::printf("mean_delta = %.9g\nmean_expert_logprob = %.9g\nfrac_correct = %.9g\n",
                m.mean_delta, m.mean_expert_logprob, m.frac_correct);
    std::printf("num_tokens = %.0f\nnum_seqs = %.0f\n", m.num_tokens, m.num_seqs);
    std::printf("grad_logits_norm = %.9g\n", grad_norm);
    return std::isfinite(m.loss) && std::isfinite(grad_norm) ? 0 : 1;
  } catch (const calibrl::Error& e) {
    std::fprintf(stderr, "calibrl error: %s\n", e.what());
    return 1;
  }
}
