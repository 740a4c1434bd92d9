// A small deterministic batch standing in for a model's outputs: two prompts with four rollouts
// each, one expert response, a 16-word vocabulary. Shared by train_step.cpp and the tests (which
// recompute the example's loss through an independent path).
#ifndef CALIBRL_EXAMPLE_SYNTHETIC_BATCH_HPP
#define CALIBRL_EXAMPLE_SYNTHETIC_BATCH_HPP

#include <cstdint>
#include <vector>

struct SyntheticBatch {
  std::int64_t vocab = 16;
  std::int64_t num_groups = 2;
  // Rollouts, packed: row i holds tokens [seq_offsets[i], seq_offsets[i+1]).
  std::vector<std::int64_t> seq_offsets;
  std::vector<std::int64_t> group_ids;  // [B]
  std::vector<float> rewards;           // [B]
  std::vector<std::int64_t> labels;     // [T] sampled token ids
  std::vector<float> logits;            // [T, V] current policy
  std::vector<float> old_logits;        // [T, V] behaviour policy (rollout time)
  // Expert responses, packed: slot p holds tokens [expert_offsets[p], expert_offsets[p+1]).
  std::vector<std::int64_t> expert_offsets;
  std::vector<std::int64_t> expert_labels;  // [T*]
  std::vector<float> expert_logits;         // [T*, V]
  std::vector<std::int64_t> expert_index;   // [B]: the row's expert slot, -1 for none

  [[nodiscard]] std::int64_t rows() const { return static_cast<std::int64_t>(rewards.size()); }
  [[nodiscard]] std::int64_t tokens() const { return seq_offsets.back(); }
};

[[nodiscard]] inline SyntheticBatch make_synthetic_batch() {
  SyntheticBatch b;
  std::uint64_t state = 42;
  auto uniform = [&state]() {  // in [0, 1)
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 40) / static_cast<double>(1ULL << 24);
  };

  const std::int64_t lengths[] = {3, 5, 4, 6, 2, 4, 5, 3};
  b.group_ids = {0, 0, 0, 0, 1, 1, 1, 1};
  b.rewards = {0.f, 1.f, 1.f, 1.f, 1.f, 0.f, 0.f, 0.5f};  // group 0: the paper's [0,1,1,1]
  b.expert_index = {0, 0, 0, 0, -1, -1, -1, -1};           // only prompt 0 has an expert
  b.seq_offsets = {0};
  for (std::int64_t n : lengths) b.seq_offsets.push_back(b.seq_offsets.back() + n);
  b.expert_offsets = {0, 5};

  auto fill = [&](std::int64_t n_tokens, std::vector<std::int64_t>& labels,
                  std::vector<float>& logits, std::vector<float>* old) {
    for (std::int64_t t = 0; t < n_tokens; ++t) {
      labels.push_back(static_cast<std::int64_t>(uniform() * static_cast<double>(b.vocab)));
      for (std::int64_t v = 0; v < b.vocab; ++v) {
        const float z = static_cast<float>(4.0 * uniform() - 2.0);
        logits.push_back(z);
        if (old != nullptr) old->push_back(z + static_cast<float>(0.3 * uniform() - 0.15));
      }
    }
  };
  fill(b.tokens(), b.labels, b.logits, &b.old_logits);
  fill(b.expert_offsets.back(), b.expert_labels, b.expert_logits, nullptr);
  return b;
}

#endif  // CALIBRL_EXAMPLE_SYNTHETIC_BATCH_HPP
