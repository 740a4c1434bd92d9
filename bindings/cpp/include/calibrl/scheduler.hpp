// calibrl/scheduler.hpp — part of calibrl.hpp (include <calibrl.hpp>).
// The expert-baseline scheduler (SPEC §7, docs/scheduler.md): SchedulerConfig and Plan.

#ifndef CALIBRL_SCHEDULER_HPP
#define CALIBRL_SCHEDULER_HPP

#include "prelude.hpp"
#include "errors.hpp"
#include "tensor.hpp"

namespace calibrl {

/// calibrl_scheduler_config, starting from the library's defaults
/// (calibrl_scheduler_config_default: 1 rank, 16384-token budgets, one mini-batch, CalibRL, all
/// experts). Setters return *this; capi() gives the C struct.
class SchedulerConfig {
 public:
  SchedulerConfig() { check(calibrl_scheduler_config_default(&c_)); }
  /// Wraps a filled C struct.
  explicit SchedulerConfig(const calibrl_scheduler_config& c) noexcept : c_(c) {}

  SchedulerConfig& dp_ranks(std::uint32_t v) noexcept { c_.dp_ranks = v; return *this; }
  SchedulerConfig& minibatch_prompts(std::uint32_t v) noexcept { c_.minibatch_prompts = v; return *this; }
  SchedulerConfig& nograd_token_budget(std::uint64_t v) noexcept { c_.nograd_token_budget = v; return *this; }
  SchedulerConfig& train_token_budget(std::uint64_t v) noexcept { c_.train_token_budget = v; return *this; }
  /// CALIBRL_LOSS_CALIBRL, _GRPO, _LUFFY or _RLPLUS.
  SchedulerConfig& loss_kind(std::uint32_t v) noexcept { c_.loss_kind = v; return *this; }
  /// Every prompt with an expert (the default).
  SchedulerConfig& select_all() noexcept { c_.expert_selection = CALIBRL_SELECT_ALL; return *this; }
  /// round(fraction · E) of the E prompts with an expert, drawn with `seed`.
  SchedulerConfig& select_random_fraction(double fraction, std::uint64_t seed) noexcept {
    c_.expert_selection = CALIBRL_SELECT_RANDOM_FRACTION;
    c_.fraction = fraction;
    c_.seed = seed;
    return *this;
  }
  /// Prompts whose pass rate (share of rollouts with reward > threshold) is in [low, high];
  /// the plan then needs rewards.
  SchedulerConfig& select_pass_rate(double low, double high, double reward_threshold = 0.1) noexcept {
    c_.expert_selection = CALIBRL_SELECT_PASS_RATE;
    c_.pass_rate_low = low;
    c_.pass_rate_high = high;
    c_.reward_threshold = reward_threshold;
    return *this;
  }
  /// `c` of the workload model tokens + c·tokens².
  SchedulerConfig& quadratic_coef(double v) noexcept { c_.quadratic_coef = v; return *this; }
  /// DAPO dynamic sampling (SPEC §7.6): groups whose rewards are all equal leave both passes,
  /// the normalisers and expert selection (the plan then needs rewards); see
  /// Plan::dropped_prompts.
  SchedulerConfig& dynamic_sampling(bool on) noexcept { c_.dynamic_sampling = on ? 1u : 0u; return *this; }

  [[nodiscard]] const calibrl_scheduler_config& capi() const noexcept { return c_; }
  [[nodiscard]] calibrl_scheduler_config& capi() noexcept { return c_; }

 private:
  calibrl_scheduler_config c_{};
};

/// One prompt of a step, for calibrl::Plan.
struct Prompt {
  std::uint32_t prompt_len = 0;
  std::vector<std::uint32_t> rollout_lens;  // response lengths of its rollouts (>= 1 rollout)
  std::optional<std::uint32_t> expert_len;  // its expert response's length, if it has one
  std::vector<double> rewards;              // empty, or one per rollout (pass-rate selection)
};

/// One micro-batch: its sequences' ids and kinds (CALIBRL_SEQ_ROLLOUT / CALIBRL_SEQ_EXPERT).
/// Rollout i has id i; expert slot s has id R + s.
struct Microbatch {
  std::vector<std::int64_t> ids;
  std::vector<std::uint8_t> kinds;
  [[nodiscard]] std::size_t size() const noexcept { return ids.size(); }
  [[nodiscard]] bool empty() const noexcept { return ids.empty(); }
};

/// An owned plan of one training step (move-only): the no-grad pass, the training pass's
/// mini-batches, the gather map, expert slots and normalisers. Accessors copy the plan's data
/// into std::vectors (the ABI's two-call convention: size query, then read).
class Plan {
 public:
  /// Plans `prompts` under `config`. Rewards are given for every prompt or for none.
  Plan(const SchedulerConfig& config, const std::vector<Prompt>& prompts)
      : ptr_(create(config, prompts)) {}

  /// Plans from the C arrays of calibrl_plan_new (`rewards` may be NULL).
  Plan(const SchedulerConfig& config, const calibrl_prompt_desc* prompts, std::size_t n_prompts,
       const std::uint32_t* rollout_lens, std::size_t n_rollouts, const double* rewards = nullptr)
      : ptr_(create(config.capi(), prompts, n_prompts, rollout_lens, n_rollouts, rewards)) {}

  /// Takes ownership of a handle from calibrl_plan_new.
  explicit Plan(calibrl_plan* raw) noexcept : ptr_(raw) {}

  /// Counts: prompts, rollouts R, expert slots P*, expert tokens T*, ranks, micro-batches...
  [[nodiscard]] calibrl_plan_info summary() const {
    calibrl_plan_info info{};
    check(calibrl_plan_summary(capi(), &info));
    return info;
  }
  /// Mini-batch `b`: prompt range, micro-batches per rank, normalisers.
  [[nodiscard]] calibrl_minibatch_info minibatch(std::size_t b) const {
    calibrl_minibatch_info info{};
    check(calibrl_plan_minibatch(capi(), b, &info));
    return info;
  }
  /// The global normalisers of mini-batch `b`: pass them to every loss call of it
  /// (LossArgs::normalizers(n)).
  [[nodiscard]] calibrl_normalizers normalizers(std::size_t b) const {
    calibrl_normalizers n{};
    check(calibrl_plan_normalizers(capi(), b, &n));
    return n;
  }
  /// Micro-batch `mb` of rank `rank` in the no-grad pass.
  [[nodiscard]] Microbatch nograd_microbatch(std::size_t rank, std::size_t mb) const {
    return read_microbatch([&](std::int64_t* ids, std::uint8_t* kinds, std::size_t cap, std::size_t* len) {
      return calibrl_plan_nograd_microbatch(capi(), rank, mb, ids, kinds, cap, len);
    });
  }
  /// Micro-batch `mb` of rank `rank` in mini-batch `b` of the training pass.
  [[nodiscard]] Microbatch train_microbatch(std::size_t b, std::size_t rank, std::size_t mb) const {
    return read_microbatch([&](std::int64_t* ids, std::uint8_t* kinds, std::size_t cap, std::size_t* len) {
      return calibrl_plan_train_microbatch(capi(), b, rank, mb, ids, kinds, cap, len);
    });
  }
  /// The whole no-grad pass: [rank][micro-batch].
  [[nodiscard]] std::vector<std::vector<Microbatch>> nograd() const {
    const calibrl_plan_info info = summary();
    std::vector<std::vector<Microbatch>> out(info.dp_ranks);
    for (std::size_t r = 0; r < out.size(); ++r) {
      for (std::size_t m = 0; m < info.nograd_microbatches; ++m) out[r].push_back(nograd_microbatch(r, m));
    }
    return out;
  }
  /// Mini-batch `b` of the training pass: [rank][micro-batch].
  [[nodiscard]] std::vector<std::vector<Microbatch>> train(std::size_t b) const {
    const calibrl_minibatch_info mbi = minibatch(b);
    std::vector<std::vector<Microbatch>> out(summary().dp_ranks);
    for (std::size_t r = 0; r < out.size(); ++r) {
      for (std::size_t m = 0; m < mbi.microbatches; ++m) out[r].push_back(train_microbatch(b, r, m));
    }
    return out;
  }
  /// `[R]`: each rollout's expert slot, -1 for none (expert_index of the loss).
  [[nodiscard]] std::vector<std::int64_t> gather_map() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_gather_map(capi(), out, cap, len);
    });
  }
  /// `[P*]`: the prompt of each expert slot.
  [[nodiscard]] std::vector<std::int64_t> expert_prompts() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_expert_prompts(capi(), out, cap, len);
    });
  }
  /// The prompts left out by dynamic sampling (all-equal rewards): sample this many more.
  [[nodiscard]] std::vector<std::int64_t> dropped_prompts() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_dropped_prompts(capi(), out, cap, len);
    });
  }
  /// `[P* + 1]`: offsets of the packed expert tensor (expert_offsets of the loss).
  [[nodiscard]] std::vector<std::int64_t> expert_offsets() const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_expert_offsets(capi(), out, cap, len);
    });
  }
  /// Ids of the sequences over a pass's budget (CALIBRL_PASS_NOGRAD or CALIBRL_PASS_TRAIN).
  [[nodiscard]] std::vector<std::int64_t> oversize(std::uint32_t pass) const {
    return read_ids([&](std::int64_t* out, std::size_t cap, std::size_t* len) {
      return calibrl_plan_oversize(capi(), pass, out, cap, len);
    });
  }
  /// Sequence `id`: kind, prompt, rollout index or expert slot, tokens, response length.
  [[nodiscard]] calibrl_seq_info seq(std::int64_t id) const {
    calibrl_seq_info info{};
    check(calibrl_plan_seq(capi(), id, &info));
    return info;
  }

  /// The expert baseline from the no-grad pass's output: `nograd_logprobs` holds the response
  /// log-probs of rank `rank`'s no-grad sequences (or all ranks' in rank order, rank = -1),
  /// packed in plan order. Writes the packed expert tensor `[T*]` and/or E_g per slot `[P*]`
  /// (host tensors for now). With one rank's part, other ranks' slots are 0: all-reduce (sum).
  void collect_experts(std::int64_t rank, const TensorView& nograd_logprobs,
                       const OptionalView& expert_logprobs, const OptionalView& expert_sums,
                       bool length_normalize = false, calibrl_stream stream = nullptr) const {
    check(calibrl_plan_collect_experts(capi(), rank, nograd_logprobs.dl(),
                                       detail::out(expert_logprobs, "expert_logprobs"),
                                       detail::out(expert_sums, "expert_sums"), length_normalize,
                                       stream));
  }

  [[nodiscard]] const calibrl_plan* capi() const noexcept { return ptr_.get(); }
  [[nodiscard]] calibrl_plan* capi() noexcept { return ptr_.get(); }
  /// Gives up ownership; the caller frees it with calibrl_plan_free.
  [[nodiscard]] calibrl_plan* release() noexcept { return ptr_.release(); }

 private:
  static calibrl_plan* create(const calibrl_scheduler_config& config,
                              const calibrl_prompt_desc* prompts, std::size_t n_prompts,
                              const std::uint32_t* rollout_lens, std::size_t n_rollouts,
                              const double* rewards) {
    calibrl_plan* raw = nullptr;
    check(calibrl_plan_new(&config, prompts, n_prompts, rollout_lens, n_rollouts, rewards, &raw));
    return raw;
  }
  static calibrl_plan* create(const SchedulerConfig& config, const std::vector<Prompt>& prompts) {
    std::vector<calibrl_prompt_desc> descs;
    std::vector<std::uint32_t> lens;
    std::vector<double> rewards;
    const bool with_rewards = !prompts.empty() && !prompts.front().rewards.empty();
    for (std::size_t g = 0; g < prompts.size(); ++g) {
      const Prompt& p = prompts[g];
      if (p.rewards.empty() == with_rewards ||
          (with_rewards && p.rewards.size() != p.rollout_lens.size())) {
        throw Error(CALIBRL_STATUS_INVALID_ARGUMENT,
                    "`prompts[" + std::to_string(g) + "].rewards`: has " +
                        std::to_string(p.rewards.size()) + " rewards for " +
                        std::to_string(p.rollout_lens.size()) +
                        " rollouts (give one per rollout for every prompt, or none)");
      }
      if (p.rollout_lens.size() > UINT32_MAX) {
        throw Error(CALIBRL_STATUS_INVALID_ARGUMENT,
                    "`prompts[" + std::to_string(g) + "].rollout_lens`: more than 2^32 - 1 rollouts");
      }
      calibrl_prompt_desc d{};
      d.prompt_len = p.prompt_len;
      d.num_rollouts = static_cast<std::uint32_t>(p.rollout_lens.size());
      d.expert_len = p.expert_len ? static_cast<std::int64_t>(*p.expert_len) : -1;
      descs.push_back(d);
      lens.insert(lens.end(), p.rollout_lens.begin(), p.rollout_lens.end());
      rewards.insert(rewards.end(), p.rewards.begin(), p.rewards.end());
    }
    return create(config.capi(), descs.data(), descs.size(), lens.data(), lens.size(),
                  with_rewards ? rewards.data() : nullptr);
  }

  // The two-call convention: a size query (NULL arrays), then the read.
  template <class F>
  static std::vector<std::int64_t> read_ids(F&& f) {
    std::size_t len = 0;
    calibrl_status s = f(nullptr, 0, &len);
    if (s != CALIBRL_STATUS_BUFFER_TOO_SMALL) check(s);
    std::vector<std::int64_t> out(len);
    check(f(out.data(), out.size(), &len));
    out.resize(len);
    return out;
  }
  template <class F>
  static Microbatch read_microbatch(F&& f) {
    std::size_t len = 0;
    calibrl_status s = f(nullptr, nullptr, 0, &len);
    if (s != CALIBRL_STATUS_BUFFER_TOO_SMALL) check(s);
    Microbatch m;
    m.ids.resize(len);
    m.kinds.resize(len);
    check(f(m.ids.data(), m.kinds.data(), len, &len));
    m.ids.resize(len);
    m.kinds.resize(len);
    return m;
  }

  struct Deleter {
    void operator()(calibrl_plan* p) const noexcept { calibrl_plan_free(p); }
  };
  std::unique_ptr<calibrl_plan, Deleter> ptr_;
};

}  // namespace calibrl

#endif  // CALIBRL_SCHEDULER_HPP
