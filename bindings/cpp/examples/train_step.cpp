// One CalibRL training step in C++ on the trainer's own buffers (CPU here; CUDA buffers work the
// same with calibrl::Device::cuda() views and a stream):
//
//   1. plan the step's passes with the expert-baseline scheduler             (SPEC §7)
//   2. rewards -> group advantages, rarity weights, correctness signs        (SPEC §3)
//   3. no-grad pass, micro-batch by micro-batch as planned: behaviour log-probs of the rollouts
//      and, once per prompt, the expert's log-probs; the plan gathers the expert tensor (SPEC §6)
//   4. training pass, micro-batch by micro-batch on each (simulated) rank: policy log-probs from
//      the logits, the loss with the plan's global normalisers, and the backward into the logits
//      (SPEC §4, §6). With those normalisers the micro-batches' losses and gradients add up to
//      one call over the whole batch.
//
// Build against an installed package:  cmake -S . -B build -DCMAKE_PREFIX_PATH=<prefix>
#include <calibrl.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "synthetic_batch.hpp"

namespace {

// Copies rows [from, to) of a [rows, V] buffer to the end of `out`.
template <class T>
void append_rows(std::vector<T>& out, const std::vector<T>& src, std::int64_t from, std::int64_t to,
                 std::int64_t V) {
  out.insert(out.end(), src.begin() + from * V, src.begin() + to * V);
}

}  // namespace

int main() {
  try {
    calibrl::check_abi();
    const SyntheticBatch b = make_synthetic_batch();
    const std::int64_t B = b.rows(), T = b.tokens(), V = b.vocab;
    const calibrl::Config cfg = calibrl::Config::preset("paper");

    // 1. The plan: two prompts (4 prompt tokens each) with four rollouts; prompt 0 has an expert.
    //    Two data-parallel ranks (run one after the other here), small token budgets so that
    //    each pass splits into several micro-batches.
    std::vector<calibrl::Prompt> prompts(b.num_groups);
    for (std::int64_t i = 0; i < B; ++i) {
      calibrl::Prompt& p = prompts[b.group_ids[i]];
      p.prompt_len = 4;
      p.rollout_lens.push_back(static_cast<std::uint32_t>(b.seq_offsets[i + 1] - b.seq_offsets[i]));
    }
    std::vector<std::int64_t> batch_slot(b.num_groups, -1);  // the synthetic batch's expert rows
    for (std::int64_t i = 0; i < B; ++i) {
      if (b.expert_index[i] >= 0) {
        const std::int64_t slot = b.expert_index[i];
        batch_slot[b.group_ids[i]] = slot;
        prompts[b.group_ids[i]].expert_len =
            static_cast<std::uint32_t>(b.expert_offsets[slot + 1] - b.expert_offsets[slot]);
      }
    }
    const calibrl::Plan plan(calibrl::SchedulerConfig{}
                                 .dp_ranks(2)
                                 .nograd_token_budget(24)
                                 .train_token_budget(12),
                             prompts);
    const calibrl_plan_info info = plan.summary();
    const std::vector<std::int64_t> gather = plan.gather_map();
    const std::vector<std::int64_t> expert_prompts = plan.expert_prompts();
    const std::vector<std::int64_t> expert_offsets = plan.expert_offsets();
    // Rollout id i is batch row i (input order); expert slot s is id R + s.
    const std::int64_t R = static_cast<std::int64_t>(info.num_rollouts);

    // 2. Advantages over the whole batch. Outputs go into buffers the trainer owns.
    std::vector<float> adv(B), weights(B), signs(B);
    calibrl::group_advantages(cfg, calibrl::AdvantageArgs{}
                                       .rewards(b.rewards)
                                       .group_ids(b.group_ids, b.num_groups)
                                       .advantages(adv)
                                       .weights(weights)
                                       .signs(signs));

    // 3. No-grad pass. Each micro-batch's logits stand in for the model's output on it: the
    //    behaviour policy's for rollouts, the expert rows' for experts. Their log-probs, packed
    //    in plan order over all ranks, are what collect_experts takes.
    std::vector<float> old_lp(T), nograd_out;
    for (const auto& rank : plan.nograd()) {
      for (const calibrl::Microbatch& mb : rank) {
        std::vector<float> logits;
        std::vector<std::int64_t> labels;
        for (std::int64_t id : mb.ids) {
          std::int64_t from = 0, to = 0;
          if (id < R) {
            from = b.seq_offsets[id], to = b.seq_offsets[id + 1];
            append_rows(logits, b.old_logits, from, to, V);
            labels.insert(labels.end(), b.labels.begin() + from, b.labels.begin() + to);
          } else {
            const std::int64_t slot = batch_slot[expert_prompts[id - R]];
            from = b.expert_offsets[slot], to = b.expert_offsets[slot + 1];
            append_rows(logits, b.expert_logits, from, to, V);
            labels.insert(labels.end(), b.expert_labels.begin() + from, b.expert_labels.begin() + to);
          }
        }
        const std::int64_t n = static_cast<std::int64_t>(labels.size());
        std::vector<float> lp(n), lse(n);
        if (n > 0) {
          calibrl::logits_forward(calibrl::TensorView(logits, {n, V}), labels, 1.0, lp,
                                  std::nullopt, lse);
        }
        std::int64_t at = 0;
        for (std::int64_t id : mb.ids) {  // keep the rollouts' behaviour log-probs
          const std::int64_t len = plan.seq(id).response_len;
          if (id < R) std::copy(lp.begin() + at, lp.begin() + at + len, old_lp.begin() + b.seq_offsets[id]);
          at += len;
        }
        nograd_out.insert(nograd_out.end(), lp.begin(), lp.end());
      }
    }
    std::vector<float> expert_lp(info.expert_tokens);
    plan.collect_experts(-1, nograd_out, expert_lp, std::nullopt);

    // 4. Training pass: per mini-batch, rank and micro-batch, gather the rows, forward, loss with
    //    the mini-batch's normalisers, backward in place, scatter d-logits back.
    std::vector<float> grad_logits(T * V, 0.f);
    calibrl_metrics m{};
    double clipped_tokens = 0.0;
    int steps = 0;
    for (std::size_t mb_index = 0; mb_index < info.num_minibatches; ++mb_index) {
      const calibrl_normalizers norm = plan.normalizers(mb_index);
      for (const auto& rank : plan.train(mb_index)) {
        for (const calibrl::Microbatch& mb : rank) {
          if (mb.empty()) continue;  // a zero-token step on this rank
          std::vector<float> logits, old, a, w, c;
          std::vector<std::int64_t> labels, offsets{0}, index;
          for (std::int64_t id : mb.ids) {  // rollouts only: CalibRL never trains expert rows
            const std::int64_t from = b.seq_offsets[id], to = b.seq_offsets[id + 1];
            append_rows(logits, b.logits, from, to, V);
            labels.insert(labels.end(), b.labels.begin() + from, b.labels.begin() + to);
            old.insert(old.end(), old_lp.begin() + from, old_lp.begin() + to);
            offsets.push_back(offsets.back() + (to - from));
            a.push_back(adv[id]);
            w.push_back(weights[id]);
            c.push_back(signs[id]);
            index.push_back(gather[id]);
          }
          const std::int64_t n = offsets.back();
          const calibrl::TensorView logits_view(logits, {n, V});
          std::vector<float> lp(n), entropy(n), lse(n), grad_lp(n);
          calibrl::logits_forward(logits_view, labels, 1.0, lp, entropy, lse);
          const calibrl_metrics mm = calibrl::loss(cfg, calibrl::LossArgs{}
                                                            .logprobs(lp, offsets)
                                                            .old_logprobs(old)
                                                            .advantages(a)
                                                            .weights(w)
                                                            .signs(c)
                                                            .expert(expert_lp, expert_offsets, index)
                                                            .normalizers(norm)
                                                            .grad_logprobs(grad_lp));
          calibrl::logits_backward(logits_view, labels, 1.0, 0, lse, std::nullopt, grad_lp,
                                   std::nullopt, logits_view);
          std::int64_t at = 0;
          for (std::int64_t id : mb.ids) {
            const std::int64_t from = b.seq_offsets[id], to = b.seq_offsets[id + 1];
            std::copy(logits.begin() + at * V, logits.begin() + (at + to - from) * V,
                      grad_logits.begin() + from * V);
            at += to - from;
          }
          // loss, pg_loss and explore_loss add across slices; clipfrac is a per-call mean.
          m.loss += mm.loss;
          m.pg_loss += mm.pg_loss;
          m.explore_loss += mm.explore_loss;
          m.num_tokens += mm.num_tokens;
          m.num_seqs += mm.num_seqs;
          clipped_tokens += mm.clipfrac * mm.num_tokens;
          steps += 1;
        }
      }
    }
    m.clipfrac = clipped_tokens / m.num_tokens;
    double grad_norm = 0.0;
    for (float g : grad_logits) grad_norm += static_cast<double>(g) * g;
    grad_norm = std::sqrt(grad_norm);

    std::printf("calibrl %s (ABI %u), preset paper, %lld rollouts, %lld tokens\n",
                std::string(calibrl::version()).c_str(), calibrl::abi_version(), static_cast<long long>(B),
                static_cast<long long>(T));
    std::printf("plan: %llu rollouts, %llu expert slot(s), %llu ranks, %llu no-grad micro-batches "
                "per rank, %d training micro-batch calls\n",
                static_cast<unsigned long long>(info.num_rollouts),
                static_cast<unsigned long long>(info.num_expert_slots),
                static_cast<unsigned long long>(info.dp_ranks),
                static_cast<unsigned long long>(info.nograd_microbatches), steps);
    std::printf("rarity weights:");
    for (float w : weights) std::printf(" %.4f", w);
    std::printf("\n");
    std::printf("loss = %.9g\n", m.loss);
    std::printf("pg_loss = %.9g\nexplore_loss = %.9g\nclipfrac = %.9g\n", m.pg_loss,
                m.explore_loss, m.clipfrac);
    std::printf("num_tokens = %.0f\nnum_seqs = %.0f\n", m.num_tokens, m.num_seqs);
    std::printf("grad_logits_norm = %.9g\n", grad_norm);
    return std::isfinite(m.loss) && std::isfinite(grad_norm) ? 0 : 1;
  } catch (const calibrl::Error& e) {
    std::fprintf(stderr, "calibrl error: %s\n", e.what());
    return 1;
  }
}
