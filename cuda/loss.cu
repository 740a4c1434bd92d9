// calibrl loss family: group advantages (SPEC §3) and the loss on log-prob inputs (SPEC §4).
//
// The group-advantage kernels read every tensor through `ld()` with a runtime dtype code, so
// mixed input dtypes work as on the CPU backend. The loss kernel is instantiated per dtype of
// its main float inputs (ℓ, ℓold, ∂L/∂ℓ: `calibrl_loss_f32` …, `calibrl_loss_any` for mixed
// dtypes); its other inputs go through `ld()`. Arithmetic is in double, like the CPU reference,
// so the two backends agree to rounding. Every reduction has a fixed order (warp shuffles, then
// warps and blocks in index order): the same inputs give the same bits.
//
// One loss call, on the caller's stream, workspace owned by the library (see the loss section):
//   loss_counts (only when N_tok, N_seq are neither given nor known from the layout)
//   loss_rows (only where a row sum is needed: a team of threads per row)
//   loss_<dtype> (token-parallel: gradients, metrics in the last block)
// and the scheduler's helper that builds the expert baseline from the no-grad pass's output
// (collect_experts, one block per expert slot).

#include "dtype.cuh"  // u16, i64, the bf16 / f16 conversions

// dtype codes shared with src/cuda/loss/args.rs
#define DT_F32 0
#define DT_F64 1
#define DT_BF16 2
#define DT_F16 3
#define DT_U8 4
#define DT_I8 5
#define DT_I32 6
#define DT_I64 7

__device__ __forceinline__ double ld(const void* p, i64 code, i64 i) {
  switch (code) {
    case DT_F32: return (double)((const float*)p)[i];
    case DT_F64: return ((const double*)p)[i];
    case DT_BF16: return (double)bf16_to_f32(((const u16*)p)[i]);
    case DT_F16: return (double)f16_to_f32(((const u16*)p)[i]);
    case DT_U8: return (double)((const unsigned char*)p)[i];
    case DT_I8: return (double)((const signed char*)p)[i];
    case DT_I32: return (double)((const int*)p)[i];
    default: return (double)((const i64*)p)[i];
  }
}

__device__ __forceinline__ i64 ld_index(const void* p, i64 code, i64 i) {
  return code == DT_I32 ? (i64)((const int*)p)[i] : ((const i64*)p)[i];
}

__device__ __forceinline__ void st(void* p, i64 code, i64 i, double v) {
  switch (code) {
    case DT_F32: ((float*)p)[i] = (float)v; break;
    case DT_F64: ((double*)p)[i] = v; break;
    case DT_BF16: ((u16*)p)[i] = f32_to_bf16((float)v); break;
    default: ((u16*)p)[i] = f32_to_f16((float)v); break;
  }
}

__device__ __forceinline__ double inv(double x) { return x > 0.0 ? 1.0 / x : 0.0; }

// Sums N values across the block in a fixed order; the result is valid in thread 0.
// `scratch` holds 32 * N doubles.
template <int N>
__device__ void block_sum(double (&v)[N], double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j)
    for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < N; ++j) scratch[warp * N + j] = v[j];
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      double s = 0.0;
      for (int w = 0; w < warps; ++w) s += scratch[w * N + j];
      v[j] = s;
    }
  }
}

// Sums N values across a warp in a fixed order; the result is valid in lane 0.
template <int N>
__device__ __forceinline__ void warp_sum(double (&v)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
    for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
}

// ---------------------------------------------------------------- group advantages (SPEC §3)

struct AdvParams {
  const void* rewards; i64 rewards_dt;
  const void* group_ids; i64 group_ids_dt;
  const void* correct; i64 correct_dt;      // may be null
  const void* is_expert; i64 is_expert_dt;  // may be null
  void* advantages; i64 advantages_dt;
  void* weights; i64 weights_dt;
  void* signs; i64 signs_dt;
  double* stats;  // workspace [num_groups * 3]: mean, std, count
  i64 rows, num_groups;
  double adv_eps, correct_threshold;
  i64 norm_by_std, rarity_weighting;
};

// One block per group: scans every row (B is a training batch, so B·groups stays small).
extern "C" __global__ void calibrl_group_stats(AdvParams p) {
  __shared__ double scratch[32 * 2];
  const i64 g = blockIdx.x;
  double v[2] = {0.0, 0.0};
  for (i64 i = threadIdx.x; i < p.rows; i += blockDim.x) {
    bool expert = p.is_expert && ld(p.is_expert, p.is_expert_dt, i) != 0.0;
    if (!expert && ld_index(p.group_ids, p.group_ids_dt, i) == g) {
      v[0] += 1.0;
      v[1] += ld(p.rewards, p.rewards_dt, i);
    }
  }
  block_sum<2>(v, scratch);
  // Whether every rollout reward equals the first one found (by a fixed block-wide scan):
  // such a group takes that reward as its mean, so A = 0 exactly (SPEC §3).
  __shared__ double first_s;
  __shared__ int unequal_s;
  if (threadIdx.x == 0) {
    first_s = 0.0;
    unequal_s = 0;
    for (i64 i = 0; i < p.rows; ++i) {
      bool expert = p.is_expert && ld(p.is_expert, p.is_expert_dt, i) != 0.0;
      if (!expert && ld_index(p.group_ids, p.group_ids_dt, i) == g) { first_s = ld(p.rewards, p.rewards_dt, i); break; }
    }
  }
  __syncthreads();
  for (i64 i = threadIdx.x; i < p.rows; i += blockDim.x) {
    bool expert = p.is_expert && ld(p.is_expert, p.is_expert_dt, i) != 0.0;
    if (!expert && ld_index(p.group_ids, p.group_ids_dt, i) == g && ld(p.rewards, p.rewards_dt, i) != first_s)
      unequal_s = 1;  // benign race: every writer stores 1
  }
  __syncthreads();
  __shared__ double mean_s;
  if (threadIdx.x == 0) mean_s = v[0] > 1.0 ? (unequal_s ? v[1] / v[0] : first_s) : 0.0;  // G = 1: μ = 0
  __syncthreads();
  const double count = v[0];
  double q[1] = {0.0};
  for (i64 i = threadIdx.x; i < p.rows; i += blockDim.x) {
    bool expert = p.is_expert && ld(p.is_expert, p.is_expert_dt, i) != 0.0;
    if (!expert && ld_index(p.group_ids, p.group_ids_dt, i) == g) {
      double d = ld(p.rewards, p.rewards_dt, i) - mean_s;
      q[0] += d * d;
    }
  }
  block_sum<1>(q, scratch);
  if (threadIdx.x == 0) {
    p.stats[3 * g + 0] = mean_s;
    p.stats[3 * g + 1] = count > 1.0 ? sqrt(q[0] / (count - 1.0)) : 1.0;  // G = 1: σ = 1
    p.stats[3 * g + 2] = count;
  }
}

// One thread per row. Rows with an out-of-range group id, or expert rows of a group without
// rollouts, get NaN (the CUDA backend does not copy values back to check them).
extern "C" __global__ void calibrl_group_advantages(AdvParams p) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.rows) return;
  const i64 g = ld_index(p.group_ids, p.group_ids_dt, i);
  const double r = ld(p.rewards, p.rewards_dt, i);
  double a = __longlong_as_double(0x7ff8000000000000ll);
  if (g >= 0 && g < p.num_groups) {
    bool expert = p.is_expert && ld(p.is_expert, p.is_expert_dt, i) != 0.0;
    if (!(expert && p.stats[3 * g + 2] == 0.0)) {
      const double c = r - p.stats[3 * g + 0];
      a = p.norm_by_std ? c / (p.stats[3 * g + 1] + p.adv_eps) : c;
    }
  }
  const bool correct = p.correct ? ld(p.correct, p.correct_dt, i) != 0.0 : r > p.correct_threshold;
  st(p.advantages, p.advantages_dt, i, a);
  st(p.weights, p.weights_dt, i, p.rarity_weighting ? fabs(a) : (a == a ? 1.0 : a));
  st(p.signs, p.signs_dt, i, correct ? 1.0 : -1.0);
}

// ------------------------------------------------------------------------- loss (SPEC §4)
//
// One call is split by tokens, not rows (issue 34):
//   calibrl_loss_counts (first, only when the normalisers' token and row counts are neither
//          given nor known from the layout);
//   calibrl_loss_rows (only when a row sum is needed: sequence Δ, seq-mean-token-mean): a team
//          of threads per row sums n_i, S_i and the expert baseline E_g, and writes the row's
//          n_i, its sequence-Δ gradient constant and metric terms to a per-row workspace;
//   calibrl_loss_<dtype>: a flat token-parallel pass (consecutive tokens per block, 16-byte
//          vector loads, each tile's rows staged in shared memory), writing ∂L/∂ℓ and ∂L/∂H
//          and the metrics' partial sums; the last block to finish (a ticket counter, reset by
//          that block) adds them in block order and writes the metrics.
// Reductions have a fixed order and the geometry depends only on the shape and the device, so
// results are bitwise repeatable. Arithmetic is in double (as the CPU reference).

// Enumerations shared with src/cuda/loss/params.rs.
#define LOSS_CALIBRL 0
#define LOSS_GRPO 1
#define LOSS_LUFFY 2
#define LOSS_RLPLUS 3
#define ACT_LEAKY 0
#define ACT_RELU 1
#define ACT_TANH 2
#define ACT_SIGMOID 3
#define ACT_HUBER 4
#define AGG_TOKEN_MEAN 0
#define AGG_SEQ_SUM 1
#define AGG_SEQ_MEAN 2
#define AGG_SUM_NORM 3
#define AGG_TOKEN_SUM 4
#define KL_K1 0
#define KL_ABS 1
#define KL_K2 2
#define KL_K3 3
// Where N_tok and N_seq come from.
#define COUNTS_GIVEN 0     // the caller's global normalisers
#define COUNTS_KERNEL 1    // calibrl_loss_counts wrote them to final_ws[0..4]
#define COUNTS_ALL_ROWS 2  // padded, every row trained, no mask: the layout's token and row counts
// "Any dtype" instantiation of the loss kernel (runtime switch per load).
#define DT_ANY (-1)

// Clip-Cov / KL-Cov (SPEC §4.6); the kernels and their state are in the entropy-control
// section below.
#define EC_NONE 0
#define EC_CLIP_COV 1
#define EC_KL_COV 2

// What the entropy-control kernels leave for the loss kernel (device memory, cov_state).
struct CovState {
  double adv_mean, logprob_mean;  // the means of the covariance
  double n_tok;                   // N_tok of n = max(⌊r·N_tok⌋, 1)
  double local_n;                 // counted rollout tokens of this call
  double frac;                    // the selected fraction (metric)
  unsigned long long key, k;      // the selection threshold: candidates with (key, k) ≤ it
  unsigned long long rank;        // the rank still to find among the tokens matching the prefix
  unsigned long long all;         // 1: every candidate is selected (n ≥ candidates)
};

// Entropy-control parameters (mirrors src/cuda/cov.rs `CovParams`).
struct CovParams {
  i64 control;                     // EC_*
  double lb, ub, ratio, coef;      // Clip-Cov's bounds; r of the active control; KL-Cov's β
  unsigned long long seed;
  i64 given;                       // bit 0: cov_adv_mean, bit 1: cov_logprob_mean, bit 2: cov_token_count
  double adv_mean, logprob_mean, token_count;
  i64 pass;                        // calibrl_cov_histogram: digit pass (0…7: key bytes, then k bytes)
  i64 k_passes;                    // bytes of the largest flat index
  i64 numel;                       // flat length of the policy tensor
  i64 tiles;                       // ⌈numel / COV_TILE⌉
  CovState* state;
  unsigned long long* hist;        // [COV_BINS], zero between passes
  double* tile_sums;               // [tiles * COV_TILE_FIELDS]
};

struct LossParams {
  // policy rows
  const void* logprobs; i64 logprobs_dt;
  const void* offsets; i64 offsets_dt;  // null: padded layout
  i64 rows, seq_len;                    // seq_len: padded row length
  const void* mask; i64 mask_dt;        // may be null
  const void* old_logprobs; i64 old_dt;
  const void* ref_logprobs; i64 ref_dt;
  const void* entropy; i64 entropy_dt;
  const void* token_weights; i64 token_weights_dt;  // ω of SPEC §4.1, may be null
  const void* advantages; i64 advantages_dt;
  const void* weights; i64 weights_dt;
  const void* signs; i64 signs_dt;
  const void* is_expert; i64 is_expert_dt;
  // expert rows
  const void* expert_logprobs; i64 expert_dt;
  const void* expert_offsets; i64 expert_offsets_dt;
  i64 expert_rows, expert_seq_len;
  const void* expert_mask; i64 expert_mask_dt;
  const void* expert_index; i64 expert_index_dt;
  // outputs
  void* grad_logprobs; i64 grad_dt;
  void* grad_entropy; i64 grad_entropy_dt;
  void* metrics; i64 metrics_dt;
  // workspace
  double* block_ws;   // [gridDim.x * (BLOCK_FIELDS + EDGE_FIELDS)]: each block's partial sums
  double* final_ws;   // [FINAL_FIELDS + METRICS]: N_tok, N_seq, then the metrics
  unsigned* tickets;  // [2], zero between calls: blocks finished (counts kernel, loss kernel)
  double* row_ws;     // [rows * ROW_WS]: calibrl_loss_rows' per-row results (row_pass only)
  // geometry and counts
  i64 team_log2;     // calibrl_loss_rows: threads per row = 1 << team_log2 (1 … LOSS_THREADS)
  i64 row_pass;      // 1: calibrl_loss_rows runs before the token pass (a row sum is needed)
  i64 block_tokens;  // the token pass: consecutive tokens per block (a multiple of its tiles)
  i64 numel;         // flat length of the policy tensors
  i64 counts;        // COUNTS_*
  // configuration
  i64 loss_kind, token_aligned, length_normalize, activation, baseline_ref, agg, kl_kind;
  // SPEC §4.7 (preset `authors`, never with LUFFY / RL-PLUS): every row counts in entropy,
  // KL (with every row's counts as denominators) and the metrics; p and the exploration term
  // are 0 on expert rows, whose tokens are not in the L_pg / L_explore denominators; a rollout
  // without a selected expert explores against ℓ* = 0.
  i64 authors;
  i64 dual_on;  // the dual clip applies (src/config.rs `dual_clip_on`)
  // The caller's normalisers (COUNTS_GIVEN): rollout rows, then every row (0: the same).
  double norm_tokens, norm_seqs, norm_all_tokens, norm_all_seqs, t_norm;
  double alpha, lambda, clip_low, clip_high, dual_clip, entropy_coef, kl_coef, luffy_gamma;
  CovParams cov;
};

#define LOSS_THREADS 256
#define FINAL_FIELDS 4  // N_tok, N_seq, then every row's N_tok, N_seq (SPEC §4.7), as used
#define METRICS 16
// Block partial sums (block_ws), each a per-thread sum added by block_sum.
#define B_NTOK 0       // Σ m over trained rows (the metric num_tokens)
#define B_CLIP 1       // clipped rollout tokens
#define B_LOWER 2      // dual-clipped rollout tokens
#define B_RTOK 3       // rollout tokens
#define B_DCNT 4       // count of Δ (token-aligned: tokens; sequence: rows)
#define B_PPO_KL 5     // Σ (ℓold − ℓ) over rollout tokens
#define B_DSUM 6       // Σ Δ
#define B_PG 7         // Σ f·p
#define B_ENT 8        // Σ f·H
#define B_KL 9         // Σ f·k(ℓ, ℓref)
#define B_TOK_EX 10    // token-aligned Σ f·w·φ(x)
#define B_SEQS 11      // trained rows with a counted token, lying within one block
#define B_ROLLOUTS 12  // rollout rows
#define B_WSUM 13      // Σ w over rollouts
#define B_CORRECT 14   // correct rollouts
#define B_SEQ_EX 15    // sequence mode Σ w·φ(x)
#define B_EXP_SUM 16   // Σ m*ℓ* over expert rows
#define B_EXP_CNT 17   // Σ m* over expert rows
#define BLOCK_FIELDS 18
// After every block's partial sums, each block's two edge rows (rows it may share with the
// previous and the next block): row index (−1: none) and whether it has a counted token here.
#define EDGE_FIELDS 4
// calibrl_loss_rows' results per row (row_ws).
#define RW_NROW 0   // n_i: counted tokens
#define RW_COEF 1   // sequence Δ: the constant ∂L/∂ℓ of every counted token of the row
#define RW_WPHI 2   // sequence Δ: w·φ(x) (metric)
#define RW_DELTA 3  // sequence Δ: Δ (metric)
#define RW_HAS 4    // 1 where the row has a Δ (metric count)
#define ROW_WS 5

#define NAN_D __longlong_as_double(0x7ff8000000000000ll)
#define INF_D __longlong_as_double(0x7ff0000000000000ll)

// Loads of the main float inputs (ℓ, ℓold, ∂L/∂ℓ), specialised on their common dtype; DT_ANY
// reads through the runtime switch.
template <int FT>
__device__ __forceinline__ double ldf(const void* p, i64 code, i64 i) {
  if constexpr (FT == DT_F32) return (double)((const float*)p)[i];
  else if constexpr (FT == DT_F64) return ((const double*)p)[i];
  else if constexpr (FT == DT_BF16) return (double)bf16_to_f32(((const u16*)p)[i]);
  else if constexpr (FT == DT_F16) return (double)f16_to_f32(((const u16*)p)[i]);
  else return ld(p, code, i);
}
template <int FT>
__device__ __forceinline__ void stf(void* p, i64 code, i64 i, double v) {
  if constexpr (FT == DT_F32) ((float*)p)[i] = (float)v;
  else if constexpr (FT == DT_F64) ((double*)p)[i] = v;
  else if constexpr (FT == DT_BF16) ((u16*)p)[i] = f32_to_bf16((float)v);
  else if constexpr (FT == DT_F16) ((u16*)p)[i] = f32_to_f16((float)v);
  else st(p, code, i, v);
}

__device__ __forceinline__ void row_range(const LossParams& p, i64 i, i64& start, i64& len) {
  if (p.offsets) {
    start = ld_index(p.offsets, p.offsets_dt, i);
    len = ld_index(p.offsets, p.offsets_dt, i + 1) - start;
  } else {
    start = i * p.seq_len;
    len = p.seq_len;
  }
}

__device__ __forceinline__ void expert_range(const LossParams& p, i64 s, i64& start, i64& len) {
  if (p.expert_offsets) {
    start = ld_index(p.expert_offsets, p.expert_offsets_dt, s);
    len = ld_index(p.expert_offsets, p.expert_offsets_dt, s + 1) - start;
  } else {
    start = s * p.expert_seq_len;
    len = p.expert_seq_len;
  }
}

__device__ __forceinline__ bool mask_at(const void* m, i64 dt, i64 k) {
  return m == nullptr || ld(m, dt, k) != 0.0;
}

__device__ __forceinline__ void activation(const LossParams& p, double x, double& phi, double& dphi) {
  switch (p.activation) {
    case ACT_LEAKY: phi = x > 0.0 ? x : p.alpha * x; dphi = x > 0.0 ? 1.0 : p.alpha; break;
    case ACT_RELU: phi = x > 0.0 ? x : 0.0; dphi = x > 0.0 ? 1.0 : 0.0; break;
    case ACT_TANH: { double t = tanh(x); phi = t; dphi = 1.0 - t * t; break; }
    case ACT_SIGMOID: {
      double s = 1.0 / (1.0 + exp(-fmax(x, 0.0)));
      phi = s; dphi = x > 0.0 ? s * (1.0 - s) : 0.0; break;
    }
    default:  // huber: smooth-L1 (δ = 1) of max(x, 0)
      if (x <= 0.0) { phi = 0.0; dphi = 0.0; }
      else if (x < 1.0) { phi = 0.5 * x * x; dphi = x; }
      else { phi = x - 0.5; dphi = 1.0; }
  }
}

// Clipped PG of one rollout token: p, ∂p/∂ℓ, clipped, dual-clipped.
__device__ __forceinline__ void clipped_pg(const LossParams& p, double a, double logp, double old,
                                           double& v, double& dv, bool& clipped, bool& lower) {
  const double ratio = exp(logp - old);
  const double p1 = -a * ratio;
  const double p2 = -a * fmin(fmax(ratio, 1.0 - p.clip_low), 1.0 + p.clip_high);
  clipped = p2 > p1;
  const double pc = fmax(p1, p2);
  v = pc;
  dv = clipped ? 0.0 : -a * ratio;
  lower = false;
  if (p.dual_on && a < 0.0) {
    const double cap = -a * p.dual_clip;
    if (pc > cap) { v = cap; dv = 0.0; lower = true; }
  }
}

// Off-policy term of an expert row (LUFFY / RL-PLUS).
__device__ __forceinline__ void off_policy(const LossParams& p, double a, double logp, double old,
                                           double& v, double& dv) {
  const double pi = exp(logp);
  if (p.loss_kind == LOSS_LUFFY) {
    const double g = p.luffy_gamma;
    v = -a * pi / (pi + g);
    dv = -a * g * pi / ((pi + g) * (pi + g));
  } else {
    const double pi_old = exp(old);
    const double denom = pi_old + 0.5 * (pi_old + 1.0);
    v = -a * 2.0 * pi / denom * sqrt(fmax(1.0 - pi, 0.0));
    dv = v;
  }
}

__device__ __forceinline__ void kl_term(i64 kind, double logp, double ref, double& v, double& dv) {
  const double d = logp - ref;
  switch (kind) {
    case KL_K1: v = d; dv = 1.0; break;
    case KL_ABS: v = fabs(d); dv = d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0); break;
    case KL_K2: v = 0.5 * d * d; dv = d; break;
    default: {
      const double r = -d, raw = exp(r) - r - 1.0;
      if (raw > 10.0 || raw < -10.0) { v = fmin(fmax(raw, -10.0), 10.0); dv = 0.0; }
      else { v = raw; dv = 1.0 - exp(r); }
    }
  }
}

__device__ __forceinline__ bool expert_row(const LossParams& p, i64 i) {
  return p.is_expert && ld(p.is_expert, p.is_expert_dt, i) != 0.0;
}
__device__ __forceinline__ bool trains_experts(const LossParams& p) {
  return p.loss_kind == LOSS_LUFFY || p.loss_kind == LOSS_RLPLUS;
}
// The exploration baseline exists (the term and its metrics are computed).
__device__ __forceinline__ bool has_baseline(const LossParams& p) {
  return p.baseline_ref ? p.ref_logprobs != nullptr : p.expert_logprobs != nullptr;
}
__device__ __forceinline__ double effective_lambda(const LossParams& p) {
  return p.loss_kind == LOSS_CALIBRL ? p.lambda : 0.0;
}
// Expert slot of row i, −1 for none, −2 for out of range (gives NaN).
__device__ __forceinline__ i64 slot_of(const LossParams& p, i64 i) {
  const i64 s = ld_index(p.expert_index, p.expert_index_dt, i);
  return (s < -1 || s >= p.expert_rows) ? -2 : s;
}

// Token-aligned baseline ℓ*[g, t] (0 past the expert's length or at masked positions, and for
// a row without an expert under the authors' arithmetic).
__device__ __forceinline__ double token_baseline(const LossParams& p, i64 slot, i64 t, i64 k) {
  if (p.baseline_ref) return ld(p.ref_logprobs, p.ref_dt, k);
  if (slot == -1) return 0.0;
  i64 start, len;
  expert_range(p, slot, start, len);
  if (t >= len) return 0.0;
  return mask_at(p.expert_mask, p.expert_mask_dt, start + t) ? ld(p.expert_logprobs, p.expert_dt, start + t) : 0.0;
}

__device__ __forceinline__ double agg_factor(const LossParams& p, double n_row, double n_tok, double n_seq) {
  switch (p.agg) {
    case AGG_TOKEN_MEAN: return inv(n_tok);
    case AGG_SEQ_SUM: return inv(n_seq);
    case AGG_SEQ_MEAN: return inv(n_seq) * inv(n_row);
    case AGG_TOKEN_SUM: return 1.0;
    default: return inv(p.t_norm);
  }
}

// Sums N values over a team of `team` threads (a power of two ≤ LOSS_THREADS, aligned in the
// block); every thread of the team gets the total. Butterfly order: two partners add the same
// two values, so all lanes hold the same bits. Every thread of the block must call it.
// `scratch` holds (LOSS_THREADS / 32) * N doubles.
template <int N>
__device__ __forceinline__ void team_sum(double (&v)[N], int team, double* scratch) {
  const int width = team < 32 ? team : 32;
#pragma unroll
  for (int j = 0; j < N; ++j)
    for (int o = width >> 1; o > 0; o >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], o);
  if (team > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = team >> 5, first = warp & ~(warps - 1);
    if (lane == 0)
#pragma unroll
      for (int j = 0; j < N; ++j) scratch[warp * N + j] = v[j];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) {
      double s = 0.0;
      for (int w = 0; w < warps; ++w) s += scratch[(first + w) * N + j];
      v[j] = s;
    }
    __syncthreads();
  }
}

// Writes this block's N partial sums (valid in thread 0) to `ws`; returns true in every thread
// of the last block to finish, which then reads all partials. The ticket is reset by that block.
template <int N>
__device__ bool publish_partials(const double (&v)[N], double* ws, unsigned* ticket) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) ws[blockIdx.x * N + j] = v[j];
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    if (last) *ticket = 0u;  // every block has taken its ticket: ready for the next call
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// In the last block: the sum of every block's N partials, in block order (valid in thread 0).
template <int N>
__device__ void gather_partials(double (&v)[N], const double* ws, double* scratch) {
  const volatile double* w = ws;  // written by other blocks: bypass L1
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = 0.0;
  for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] += w[(i64)b * N + j];
  block_sum<N>(v, scratch);
}

// N_tok and N_seq over the trained rows, and over every counted row (the authors'
// arithmetic), when they are neither given nor known from the layout (a mask, or expert rows
// the loss does not train). One warp per row.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) calibrl_loss_counts(LossParams p) {
  __shared__ double scratch[32 * 4];
  const int lane = threadIdx.x & 31;
  const i64 warps = blockDim.x >> 5;
  double v[4] = {0.0, 0.0, 0.0, 0.0};  // trained tokens, rows; counted tokens, rows
  for (i64 i = blockIdx.x * warps + (threadIdx.x >> 5); i < p.rows; i += gridDim.x * warps) {
    const bool trained = !expert_row(p, i) || trains_experts(p);
    if (!trained && !p.authors) continue;
    i64 start, len;
    row_range(p, i, start, len);
    double n_row = 0.0;
    if (p.mask) {
      for (i64 t = lane; t < len; t += 32) n_row += mask_at(p.mask, p.mask_dt, start + t) ? 1.0 : 0.0;
    } else if (lane == 0 && len > 0) {
      n_row = (double)len;
    }
    // A row without counted tokens is not counted in N_seq (SPEC §4.5).
    const double seq = (__any_sync(0xffffffffu, n_row > 0.0) && lane == 0) ? 1.0 : 0.0;
    if (trained) { v[0] += n_row; v[1] += seq; }
    v[2] += n_row;
    v[3] += seq;
  }
  block_sum<4>(v, scratch);
  if (publish_partials<4>(v, p.block_ws, &p.tickets[0])) {
    gather_partials<4>(v, p.block_ws, scratch);  // integers: exact in any order
    if (threadIdx.x == 0)
      for (int j = 0; j < 4; ++j) p.final_ws[j] = v[j];
  }
}

// ------------------------------------------------- entropy control: Clip-Cov, KL-Cov (SPEC §4.6)
//
// Before the loss kernel, with the same LossParams (every launch on the caller's stream; no
// host synchronisation, so the call stays capturable in a CUDA graph):
//   calibrl_cov_prepare   Σ A, Σ ℓ and the count over the counted rollout tokens, in a fixed
//                         order (below), the means and N_tok; zeroes the histogram;
//   calibrl_cov_histogram once per byte of the sort key (8), then per byte of the flat index
//                         (k_passes): a radix select of the n-th smallest (key, k) among the
//                         candidates; its last block picks the byte and updates the state.
// The loss kernel then recomputes each token's key and selects it iff it is a candidate and
// (key, k) ≤ the threshold: exactly the CPU backend's n first of the sorted (key, k), so the
// same tokens (src/cpu/cov.rs). Keys: Clip-Cov, the SplitMix64 hash of (seed, k) over the
// unclipped tokens with lb < cov < ub; KL-Cov, an order-preserving map of −cov over every
// counted rollout token (largest covariance first, ties by position).
//
// The sums have an order fixed by the flat indices alone (never by the grid or the device), the
// order src/cpu/cov.rs `fixed_order_sum` reproduces, so both backends get the same means to the
// bit: a thread sums its COV_PER_THREAD consecutive indices in order, the 256 threads of a tile
// of COV_TILE indices are added by block_sum, and the last block adds tile t into thread
// t % COV_THREADS's sum, then block_sum again. The histograms count integers (atomics in any
// order give the same counts).

#define COV_THREADS 256
#define COV_PER_THREAD 8
#define COV_TILE (COV_THREADS * COV_PER_THREAD)
#define COV_BINS 256
#define COV_KEY_PASSES 8
#define COV_TILE_FIELDS 5  // per tile: Σ A, Σ ℓ, count, min A, max A

// Clip-Cov's random key: SplitMix64 of the seed and the flat index (src/cpu/cov.rs `cov_key`).
__device__ __forceinline__ unsigned long long cov_hash(unsigned long long seed, unsigned long long k) {
  unsigned long long z = seed * 0x9E3779B97F4A7C15ull + k + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Whether a counted rollout token is a candidate, and its key. `clipped`: p2 > p1 of clipped_pg.
__device__ __forceinline__ bool cov_candidate(const LossParams& p, const CovState* s, double a, double logp,
                                              i64 k, bool clipped, unsigned long long& key) {
  // Detached covariance; no multiply-add to contract, so the same bits as the CPU backend.
  const double cov = (a - s->adv_mean) * (logp - s->logprob_mean);
  // A covariance that is not finite (an overflow of finite inputs) is never a candidate.
  if (!(fabs(cov) < INF_D)) return false;
  if (p.cov.control == EC_CLIP_COV) {
    if (clipped || !(p.cov.lb < cov && cov < p.cov.ub)) return false;
    key = cov_hash(p.cov.seed, (unsigned long long)k);
    return true;
  }
  double x = -cov;
  if (x == 0.0) x = 0.0;  // −0 and +0 are one covariance (a tie)
  const unsigned long long bits = (unsigned long long)__double_as_longlong(x);
  key = (bits >> 63) ? ~bits : bits | 0x8000000000000000ull;  // ascending x, ascending key
  return true;
}

// Bits at and above position `b` (b ≤ 64).
__device__ __forceinline__ unsigned long long high_bits(int b) { return b >= 64 ? 0ull : ~0ull << b; }

// Whether a candidate token is selected (after the passes).
__device__ __forceinline__ bool cov_chosen(const CovState* s, unsigned long long key, i64 k) {
  return s->all || key < s->key || (key == s->key && (unsigned long long)k <= s->k);
}

// The policy-gradient term of a rollout token under Clip-Cov / KL-Cov (src/cpu/loss.rs):
// Clip-Cov zeroes p and ∂p/∂ℓ of a selected token; KL-Cov uses the unclipped −A·r, plus
// β·|ℓ − ℓold| on a selected token.
__device__ __forceinline__ void cov_pg(const LossParams& p, double a, double logp, double old, i64 k,
                                       bool clipped, double& pv, double& dv) {
  const CovState* s = p.cov.state;
  unsigned long long key;
  const bool chosen = cov_candidate(p, s, a, logp, k, clipped, key) && cov_chosen(s, key, k);
  if (p.cov.control == EC_CLIP_COV) {
    if (chosen) { pv = 0.0; dv = 0.0; }
    return;
  }
  const double ratio = exp(logp - old);
  pv = -a * ratio;
  dv = -a * ratio;
  if (chosen) {
    const double d = logp - old;
    pv += p.cov.coef * fabs(d);
    dv += p.cov.coef * (d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0));
  }
}

// Calls f(k, a, ℓ, ℓold) for the counted rollout tokens among the flat indices
// k0 … k0 + COV_PER_THREAD − 1, in increasing order.
template <class F>
__device__ __forceinline__ void cov_tokens(const LossParams& p, i64 k0, F f) {
  if (k0 >= p.cov.numel) return;
  i64 r, end;
  if (p.offsets) {
    // The row holding k0: the last r with offsets[r] ≤ k0 (empty rows share their offset).
    i64 lo = 0, hi = p.rows;
    while (hi - lo > 1) {
      const i64 mid = (lo + hi) >> 1;
      if (ld_index(p.offsets, p.offsets_dt, mid) <= k0) lo = mid; else hi = mid;
    }
    r = lo;
    end = ld_index(p.offsets, p.offsets_dt, r + 1);
  } else {
    r = k0 / p.seq_len;
    end = (r + 1) * p.seq_len;
  }
  for (int u = 0; u < COV_PER_THREAD; ++u) {
    const i64 k = k0 + u;
    if (k >= p.cov.numel) break;
    while (k >= end && r + 1 < p.rows) {
      ++r;
      end = p.offsets ? ld_index(p.offsets, p.offsets_dt, r + 1) : (r + 1) * p.seq_len;
    }
    if (!mask_at(p.mask, p.mask_dt, k) || expert_row(p, r)) continue;
    const double logp = ld(p.logprobs, p.logprobs_dt, k);
    f(k, ld(p.advantages, p.advantages_dt, r), logp, p.old_logprobs ? ld(p.old_logprobs, p.old_dt, k) : logp);
  }
}

// True in every thread of the last block of the grid to get here; the block's global writes
// before the call are visible to that block. The ticket is reset by that block.
__device__ bool last_block(unsigned* ticket) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    if (last) *ticket = 0u;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// The smallest and largest of `lo`, `hi` over the block (valid in thread 0). Every thread
// must call it; `scratch` holds 64 doubles.
__device__ void block_min_max(double& lo, double& hi, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    lo = fmin(lo, __shfl_down_sync(0xffffffffu, lo, o));
    hi = fmax(hi, __shfl_down_sync(0xffffffffu, hi, o));
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) { scratch[2 * warp] = lo; scratch[2 * warp + 1] = hi; }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 0; w < warps; ++w) { lo = fmin(lo, scratch[2 * w]); hi = fmax(hi, scratch[2 * w + 1]); }
}

// Σ A, Σ ℓ, the count, min A and max A over the counted rollout tokens (sums in the fixed
// order, see above); the last block writes the means (the advantages' common value, exactly,
// when they are all equal: src/cpu/cov.rs `advantage_mean`), N_tok and a fresh selection
// state, and zeroes the histogram.
extern "C" __global__ void __launch_bounds__(COV_THREADS) calibrl_cov_prepare(LossParams p) {
  __shared__ double scratch[32 * 3];
  for (i64 tile = blockIdx.x; tile < p.cov.tiles; tile += gridDim.x) {
    double v[3] = {0.0, 0.0, 0.0};
    double lo = INF_D, hi = -INF_D;
    cov_tokens(p, tile * COV_TILE + (i64)threadIdx.x * COV_PER_THREAD, [&](i64, double a, double logp, double) {
      v[0] += a;
      v[1] += logp;
      v[2] += 1.0;
      lo = fmin(lo, a);
      hi = fmax(hi, a);
    });
    block_sum<3>(v, scratch);
    block_min_max(lo, hi, scratch);
    if (threadIdx.x == 0) {
      double* ts = p.cov.tile_sums + tile * COV_TILE_FIELDS;
      for (int j = 0; j < 3; ++j) ts[j] = v[j];
      ts[3] = lo;
      ts[4] = hi;
    }
  }
  if (!last_block(&p.tickets[2])) return;
  const volatile double* ts = p.cov.tile_sums;  // written by other blocks: bypass L1
  double v[3] = {0.0, 0.0, 0.0};
  double lo = INF_D, hi = -INF_D;
  for (i64 t = threadIdx.x; t < p.cov.tiles; t += COV_THREADS) {
    for (int j = 0; j < 3; ++j) v[j] += ts[t * COV_TILE_FIELDS + j];
    lo = fmin(lo, ts[t * COV_TILE_FIELDS + 3]);
    hi = fmax(hi, ts[t * COV_TILE_FIELDS + 4]);
  }
  block_sum<3>(v, scratch);
  block_min_max(lo, hi, scratch);
  p.cov.hist[threadIdx.x] = 0ull;  // COV_BINS == COV_THREADS
  if (threadIdx.x == 0) {
    CovState* s = p.cov.state;
    const double n = v[2];
    const double adv_mean = lo == hi ? lo : (n > 0.0 ? v[0] / n : 0.0);
    s->adv_mean = (p.cov.given & 1) ? p.cov.adv_mean : adv_mean;
    s->logprob_mean = (p.cov.given & 2) ? p.cov.logprob_mean : (n > 0.0 ? v[1] / n : 0.0);
    s->n_tok = (p.cov.given & 4) ? p.cov.token_count : n;
    s->local_n = n;
    s->frac = 0.0;
    s->key = 0ull;
    s->k = 0ull;
    s->rank = 0ull;
    s->all = 0ull;
  }
}

// One digit pass of the radix select: counts the candidates whose key (then index) matches the
// prefix found so far, by their next byte; the last block picks the byte holding the wanted
// rank, updates the state and zeroes the histogram for the next pass.
extern "C" __global__ void __launch_bounds__(COV_THREADS) calibrl_cov_histogram(LossParams p) {
  __shared__ unsigned long long bins[COV_BINS];
  CovState* s = p.cov.state;
  if (s->all) return;  // the whole grid reads the same value
  const i64 pass = p.cov.pass;
  const bool on_key = pass < COV_KEY_PASSES;
  const int shift = on_key ? 56 - 8 * (int)pass : 8 * (int)(p.cov.k_passes - 1 - (pass - COV_KEY_PASSES));
  const unsigned long long above = high_bits(shift + 8);
  const unsigned long long want_key = s->key, want_k = s->k;
  bins[threadIdx.x] = 0ull;
  __syncthreads();
  for (i64 tile = blockIdx.x; tile < p.cov.tiles; tile += gridDim.x) {
    cov_tokens(p, tile * COV_TILE + (i64)threadIdx.x * COV_PER_THREAD, [&](i64 k, double a, double logp, double old) {
      double pv, dv;
      bool clipped = false, lower;
      if (p.cov.control == EC_CLIP_COV) clipped_pg(p, a, logp, old, pv, dv, clipped, lower);
      unsigned long long key;
      if (!cov_candidate(p, s, a, logp, k, clipped, key)) return;
      unsigned digit;
      if (on_key) {
        if ((key & above) != (want_key & above)) return;
        digit = (unsigned)(key >> shift) & 0xffu;
      } else {
        const unsigned long long kk = (unsigned long long)k;
        if (key != want_key || (kk & above) != (want_k & above)) return;
        digit = (unsigned)(kk >> shift) & 0xffu;
      }
      atomicAdd(&bins[digit], 1ull);
    });
  }
  __syncthreads();
  if (bins[threadIdx.x] != 0ull) {
    atomicAdd(&p.cov.hist[threadIdx.x], bins[threadIdx.x]);
    __threadfence();  // visible before this block's ticket
  }
  if (!last_block(&p.tickets[3])) return;
  if (threadIdx.x == 0) {
    const volatile unsigned long long* h = p.cov.hist;
    unsigned long long rank = s->rank;
    bool all = false;
    if (pass == 0) {
      // n = max(⌊r·N_tok⌋, 1), capped at the candidates (all of them when n reaches their count).
      unsigned long long total = 0ull;
      for (int d = 0; d < COV_BINS; ++d) total += h[d];
      const double n = fmax(floor(p.cov.ratio * s->n_tok), 1.0);
      all = !(n < (double)total);
      const double chosen = all ? (double)total : n;
      s->frac = s->local_n > 0.0 ? chosen / s->local_n : 0.0;
      s->all = all ? 1ull : 0ull;
      rank = all ? 0ull : (unsigned long long)n;
    }
    if (!all) {
      unsigned long long below = 0ull;
      int d = 0;
      for (; d < COV_BINS - 1 && below + h[d] < rank; ++d) below += h[d];
      rank -= below;
      if (on_key) s->key = want_key | ((unsigned long long)d << shift);
      else s->k = want_k | ((unsigned long long)d << shift);
      s->rank = rank;
    }
  }
  __syncthreads();  // thread 0 has read the histogram
  p.cov.hist[threadIdx.x] = 0ull;
}

// N_tok and N_seq as the gradients use them: n[0], n[1] over the trained rows (L_pg,
// L_explore), n[2], n[3] over every counted row (entropy, KL; the same rows but under the
// authors' arithmetic).
__device__ __forceinline__ void normalisers(const LossParams& p, double (&n)[4]) {
  if (p.counts == COUNTS_GIVEN) {
    n[0] = p.norm_tokens; n[1] = p.norm_seqs;
    n[2] = p.norm_all_tokens != 0.0 ? p.norm_all_tokens : p.norm_tokens;
    n[3] = p.norm_all_seqs != 0.0 ? p.norm_all_seqs : p.norm_seqs;
  } else if (p.counts == COUNTS_KERNEL) {
    for (int j = 0; j < 4; ++j) n[j] = p.final_ws[j];
  } else {
    n[0] = n[2] = (double)p.rows * (double)p.seq_len;
    n[1] = n[3] = p.seq_len > 0 ? (double)p.rows : 0.0;
  }
}

// The metrics from the block partials' totals (thread 0 of the last block).
__device__ void write_metrics(const LossParams& p, const double (&a)[BLOCK_FIELDS], const double (&n)[4]) {
  const double explore = p.token_aligned ? a[B_TOK_EX] : a[B_SEQ_EX] * inv(n[1]);
  auto mean = [](double s, double n) { return n > 0.0 ? s / n : 0.0; };
  double m[METRICS];
  m[1] = a[B_PG];
  m[2] = explore;
  m[3] = a[B_ENT];
  m[4] = a[B_KL];
  m[0] = m[1] + effective_lambda(p) * m[2] - p.entropy_coef * m[3] + p.kl_coef * m[4];
  m[5] = mean(a[B_CLIP], a[B_RTOK]);
  m[6] = mean(a[B_LOWER], a[B_RTOK]);
  m[7] = mean(a[B_PPO_KL], a[B_RTOK]);
  m[8] = mean(a[B_DSUM], a[B_DCNT]);
  m[9] = mean(a[B_EXP_SUM], a[B_EXP_CNT]);
  m[10] = mean(a[B_RTOK], a[B_ROLLOUTS]);  // every rollout token is a counted token of a rollout
  m[11] = mean(a[B_CORRECT], a[B_ROLLOUTS]);
  m[12] = mean(a[B_WSUM], a[B_ROLLOUTS]);
  m[13] = a[B_NTOK];
  m[14] = a[B_SEQS];
  m[15] = p.cov.control != EC_NONE ? p.cov.state->frac : 0.0;  // cov_selected_frac
  if (p.metrics)
    for (int j = 0; j < METRICS; ++j) st(p.metrics, p.metrics_dt, j, m[j]);
  for (int j = 0; j < 4; ++j) p.final_ws[j] = n[j];
  for (int j = 0; j < METRICS; ++j) p.final_ws[FINAL_FIELDS + j] = m[j];
}

// ------------------------------------------------------------ the loss kernels: rows, then tokens

// Tokens each thread of the row pass loads before using any of them: keeps enough bytes in
// flight to cover the memory latency.
#define BATCH 8

// Raw storage of the main float inputs while a batch is in flight (the loaded bits, converted
// to double only when used).
template <int FT> struct RawOf { typedef double T; };
template <> struct RawOf<DT_F32> { typedef float T; };
template <> struct RawOf<DT_BF16> { typedef u16 T; };
template <> struct RawOf<DT_F16> { typedef u16 T; };
template <int FT>
__device__ __forceinline__ typename RawOf<FT>::T ld_raw(const void* p, i64 code, i64 i) {
  if constexpr (FT == DT_F32) return ((const float*)p)[i];
  else if constexpr (FT == DT_F64) return ((const double*)p)[i];
  else if constexpr (FT == DT_BF16 || FT == DT_F16) return ((const u16*)p)[i];
  else return ld(p, code, i);
}
template <int FT>
__device__ __forceinline__ double raw_value(typename RawOf<FT>::T r) {
  if constexpr (FT == DT_BF16) return (double)bf16_to_f32(r);
  else if constexpr (FT == DT_F16) return (double)f16_to_f32(r);
  else return (double)r;
}

// What a row contributes, from its per-row scalars (shared by the row pass and the token pass).
struct RowInfo {
  double a, w, c;
  i64 slot, start, len;
  bool is_exp, trained, counted, seq_explore, tok_explore;
};

__device__ __forceinline__ RowInfo row_info(const LossParams& p, i64 i) {
  // The authors' arithmetic explores against ℓ* = 0 even without expert data.
  const bool baseline = has_baseline(p) || (p.authors && !p.baseline_ref);
  const bool expert_baseline = !p.baseline_ref && p.expert_logprobs != nullptr;
  RowInfo r;
  r.is_exp = expert_row(p, i);
  r.trained = !r.is_exp || trains_experts(p);
  r.counted = r.trained || p.authors;  // in the normalisers, regularisers and metrics
  r.a = ld(p.advantages, p.advantages_dt, i);
  r.w = ld(p.weights, p.weights_dt, i);
  r.c = ld(p.signs, p.signs_dt, i);
  r.slot = expert_baseline ? slot_of(p, i) : -1;
  row_range(p, i, r.start, r.len);
  const bool explores = baseline && r.trained && !r.is_exp && (p.baseline_ref || r.slot != -1 || p.authors);
  r.seq_explore = explores && !p.token_aligned;
  r.tok_explore = explores && p.token_aligned;
  return r;
}

// The row pass (only when a row sum is needed: sequence Δ, seq-mean-token-mean). A team of
// 2^team_log2 threads (up to the block: few long rows still fill the device) owns one row at a
// time: n_i, S_i = Σ m·ℓ, Σ m·ℓref and the expert's Σ m*ℓ*, Σ m* (the expert row read inline),
// then the row's sequence-Δ gradient constant and metric terms, written to row_ws.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS, 2) calibrl_loss_rows(LossParams p) {
  __shared__ double scratch[(LOSS_THREADS / 32) * 5];
  const int team = 1 << p.team_log2;
  const int lane = threadIdx.x & (team - 1);
  const int teams = LOSS_THREADS >> p.team_log2;
  double n[4];
  normalisers(p, n);
  const double lambda = effective_lambda(p);
  const bool expert_baseline = !p.baseline_ref && p.expert_logprobs != nullptr;
  const bool with_ref = p.baseline_ref && p.ref_logprobs;
  const i64 per_round = (i64)gridDim.x * teams;
  const i64 rounds = (p.rows + per_round - 1) / per_round;  // the same in every block
  for (i64 rd = 0; rd < rounds; ++rd) {
    const i64 i = (rd * gridDim.x + blockIdx.x) * teams + (threadIdx.x >> p.team_log2);
    const bool active = i < p.rows;
    RowInfo r{};
    if (active) r = row_info(p, i);
    double s1[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    if (active && r.counted && (p.agg == AGG_SEQ_MEAN || r.seq_explore)) {
      for (i64 t0 = lane; t0 < r.len; t0 += (i64)BATCH * team) {
        double lr[BATCH], rr[BATCH];
        unsigned in = 0;
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const i64 t = t0 + (i64)u * team, k = r.start + t;
          const bool ok = t < r.len && mask_at(p.mask, p.mask_dt, k);
          in |= (unsigned)ok << u;
          lr[u] = ok ? ld(p.logprobs, p.logprobs_dt, k) : 0.0;
          rr[u] = (ok && with_ref) ? ld(p.ref_logprobs, p.ref_dt, k) : 0.0;
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          if (!((in >> u) & 1u)) continue;
          s1[0] += 1.0;
          s1[1] += lr[u];
          s1[2] += rr[u];
        }
      }
      if (r.seq_explore && expert_baseline && r.slot >= 0) {
        i64 es, el;
        expert_range(p, r.slot, es, el);
        for (i64 t = lane; t < el; t += team)
          if (mask_at(p.expert_mask, p.expert_mask_dt, es + t)) {
            s1[3] += ld(p.expert_logprobs, p.expert_dt, es + t);
            s1[4] += 1.0;
          }
      }
    }
    team_sum<5>(s1, team, scratch);
    if (!active || lane != 0) continue;
    const double n_row = s1[0];
    double coef = 0.0, wphi = 0.0, delta = 0.0, has = 0.0;
    // An empty rollout adds nothing, not even φ of a length-normalised Δ (SPEC §4.5).
    if (r.seq_explore && n_row > 0.0) {
      const double scale = p.length_normalize ? inv(n_row) : 1.0;
      double e;
      if (p.baseline_ref) e = s1[2] * scale;
      else if (r.slot == -2) e = NAN_D;
      else e = p.length_normalize ? (s1[4] > 0.0 ? s1[3] / s1[4] : 0.0) : s1[3];
      delta = s1[1] * scale - e;
      double phi, dphi;
      activation(p, -r.c * delta, phi, dphi);
      coef = lambda * inv(n[1]) * r.w * dphi * -r.c * scale;
      wphi = r.w * phi;
      has = 1.0;
    }
    double* o = p.row_ws + i * ROW_WS;
    o[RW_NROW] = n_row;
    o[RW_COEF] = coef;
    o[RW_WPHI] = wphi;
    o[RW_DELTA] = delta;
    o[RW_HAS] = has;
  }
}

// The token pass. Block b owns the consecutive tokens [b·block_tokens, (b+1)·block_tokens),
// walked in tiles of LOSS_THREADS·V tokens, V consecutive tokens per thread (one vector of ℓ
// and of ℓold where aligned, else scalar loads; `TokVec`). The rows a tile touches are staged in
// shared memory (at most STAGE at a time: a tile of many tiny or empty rows takes several
// chunks); each thread finds its first token's row by a binary search over the stage. Row
// sums come from row_ws (the row pass). Metrics: per-thread sums, block_sum, the blocks'
// partials added in block order by the last block; N_seq's rows that lie within one block are
// counted there, the rows a block shares with its neighbours (its first and last) are merged
// in block order by the last block. Everything has a fixed order: bitwise repeatable.
#define STAGE LOSS_THREADS

// Per-row scalars of the rows in the current chunk.
struct RowStage {
  double a, w, c, f, f_all, seq_coef;
  i64 start, end, slot;
  int flags;  // RS_*
};
#define RS_EXPERT 1
#define RS_TRAINED 2
#define RS_COUNTED 4
#define RS_TOK_EXPLORE 8

// Tokens per thread and tile: one 16-byte vector for f32 (4) and f64 (2); 4 for bf16 / f16 (an
// 8-byte vector: 8 tokens per thread spilled at 128 registers on sm_90); DT_ANY: 4 scalar loads.
template <int FT> struct TokVec { static constexpr int V = 16 / sizeof(typename RawOf<FT>::T); };
template <> struct TokVec<DT_BF16> { static constexpr int V = 4; };
template <> struct TokVec<DT_F16> { static constexpr int V = 4; };
template <> struct TokVec<DT_ANY> { static constexpr int V = 4; };
// V elements of T loaded or stored as one vector (aligned to its size: 8 or 16 bytes).
template <class T, int V> struct __align__(sizeof(T) * V) RawVec { T v[V]; };

// Loads ℓ (or ℓold, ∂L/∂ℓ's dtype) of tokens kb … kb+V−1 that lie in [lo, hi); one vector load
// when all do and the address is aligned to the vector's size.
template <int FT>
__device__ __forceinline__ void load_tokens(const void* base, i64 code, i64 kb, i64 lo, i64 hi,
                                            typename RawOf<FT>::T (&out)[TokVec<FT>::V]) {
  typedef typename RawOf<FT>::T T;
  constexpr int V = TokVec<FT>::V;
  if constexpr (FT != DT_ANY) {
    const T* ptr = (const T*)base + kb;
    if (kb >= lo && kb + V <= hi && ((u64)ptr & (sizeof(T) * V - 1)) == 0) {
      const RawVec<T, V> r = *reinterpret_cast<const RawVec<T, V>*>(ptr);
#pragma unroll
      for (int u = 0; u < V; ++u) out[u] = r.v[u];
      return;
    }
  }
#pragma unroll
  for (int u = 0; u < V; ++u) {
    const i64 k = kb + u;
    out[u] = (k >= lo && k < hi) ? ld_raw<FT>(base, code, k) : T(0);
  }
}

// Stores ∂L/∂ℓ of the tokens whose bit is set in `wrote`; one vector store when all are and
// the address is aligned to the vector's size.
template <int FT>
__device__ __forceinline__ void store_tokens(void* base, i64 code, i64 kb, unsigned wrote, const double (&g)[TokVec<FT>::V]) {
  constexpr int V = TokVec<FT>::V;
  if constexpr (FT != DT_ANY && FT != DT_BF16 && FT != DT_F16) {
    typedef typename RawOf<FT>::T T;
    T* ptr = (T*)base + kb;
    if (wrote == (1u << V) - 1u && ((u64)ptr & (sizeof(T) * V - 1)) == 0) {
      RawVec<T, V> r;
#pragma unroll
      for (int u = 0; u < V; ++u) r.v[u] = (T)g[u];
      *reinterpret_cast<RawVec<T, V>*>(ptr) = r;
      return;
    }
  } else if constexpr (FT == DT_BF16 || FT == DT_F16) {
    u16* ptr = (u16*)base + kb;
    if (wrote == (1u << V) - 1u && ((u64)ptr & (2 * V - 1)) == 0) {
      RawVec<u16, V> r;
#pragma unroll
      for (int u = 0; u < V; ++u) r.v[u] = FT == DT_BF16 ? f32_to_bf16((float)g[u]) : f32_to_f16((float)g[u]);
      *reinterpret_cast<RawVec<u16, V>*>(ptr) = r;
      return;
    }
  }
#pragma unroll
  for (int u = 0; u < V; ++u)
    if ((wrote >> u) & 1u) stf<FT>(base, code, kb + u, g[u]);
}

// The row holding token k: the last r with start(r) ≤ k (empty rows share their start); 0 when
// k precedes every row.
__device__ i64 row_at(const LossParams& p, i64 k) {
  if (!p.offsets) return p.seq_len > 0 ? k / p.seq_len : 0;
  i64 lo = 0, hi = p.rows;
  while (hi - lo > 1) {
    const i64 mid = (lo + hi) >> 1;
    if (ld_index(p.offsets, p.offsets_dt, mid) <= k) lo = mid; else hi = mid;
  }
  return lo;
}

// Per-thread sums of the token pass.
struct TokenSums {
  double pg = 0.0, ent = 0.0, kl = 0.0, tok_ex = 0.0, ppo_kl = 0.0, dsum = 0.0;
  int counted = 0, clip = 0, lower = 0, rtok = 0, delta = 0;
};

// ∂L/∂ℓ (returned) and ∂L/∂H (gh) of one counted token k of row `r`, adding its metric terms.
template <int FT>
__device__ __forceinline__ double token_grad(const LossParams& p, const RowStage& r, i64 k, double logp, double old,
                                             double lambda, TokenSums& acc, double& gh) {
  const bool is_exp = r.flags & RS_EXPERT, trained = r.flags & RS_TRAINED;
  double pv, dv;
  if (is_exp && trained) {
    off_policy(p, r.a, logp, old, pv, dv);
  } else {
    bool clipped, lower;
    clipped_pg(p, r.a, logp, old, pv, dv, clipped, lower);
    acc.clip += clipped; acc.lower += lower; acc.ppo_kl += old - logp; acc.rtok += 1;
    if (!trained) { pv = 0.0; dv = 0.0; }  // an expert row under the authors' arithmetic
    else if (p.cov.control != EC_NONE) cov_pg(p, r.a, logp, old, k, clipped, pv, dv);
  }
  if (p.token_weights) {
    const double omega = ld(p.token_weights, p.token_weights_dt, k);
    pv *= omega; dv *= omega;
  }
  acc.counted += trained;
  acc.pg += r.f * pv;
  double g = r.f * dv;
  gh = 0.0;
  if (p.entropy) { acc.ent += r.f_all * ld(p.entropy, p.entropy_dt, k); gh = -p.entropy_coef * r.f_all; }
  if (p.ref_logprobs) {
    double kv, dk;
    kl_term(p.kl_kind, logp, ld(p.ref_logprobs, p.ref_dt, k), kv, dk);
    acc.kl += r.f_all * kv;
    if (p.kl_coef != 0.0) g += p.kl_coef * r.f_all * dk;
  }
  if (r.flags & RS_TOK_EXPLORE) {
    const double delta = r.slot == -2 ? NAN_D : logp - token_baseline(p, r.slot, k - r.start, k);
    double phi, dphi;
    activation(p, -r.c * delta, phi, dphi);
    acc.tok_ex += r.f * r.w * phi; acc.dsum += delta; acc.delta += 1;
    g += lambda * r.f * r.w * dphi * -r.c;
  }
  return g + r.seq_coef;
}

template <int FT>
__device__ __forceinline__ void loss_kernel(const LossParams& p) {
  typedef typename RawOf<FT>::T Raw;
  constexpr int V = TokVec<FT>::V;
  constexpr i64 TILE = (i64)LOSS_THREADS * V;
  __shared__ double scratch[32 * BLOCK_FIELDS];
  __shared__ RowStage stage[STAGE];
  __shared__ int seen[STAGE];  // the staged row has a counted token of a trained row here
  __shared__ int staged;
  __shared__ i64 first_row, carry_row;  // the block's edge rows (−1: none)
  __shared__ int first_seen, carry_seen;
  const int tid = threadIdx.x;
  double n[4];
  normalisers(p, n);
  const double lambda = effective_lambda(p);
  TokenSums acc;
  double seqs = 0.0;

  // The tokens.
  const i64 k_begin = (i64)blockIdx.x * p.block_tokens;
  const i64 k_end = k_begin + p.block_tokens < p.numel ? k_begin + p.block_tokens : p.numel;
  __shared__ i64 begin_row;
  if (tid == 0) {
    first_row = -1; carry_row = -1; first_seen = 0; carry_seen = 0;
    begin_row = k_begin < k_end ? row_at(p, k_begin) : 0;
  }
  __syncthreads();
  i64 r0 = begin_row;  // the chunk's first row (the same in every thread)
  for (i64 tb = k_begin; tb < k_end; tb += TILE) {
    const i64 tile_end = tb + TILE < k_end ? tb + TILE : k_end;
    i64 ck0 = tb;
    while (ck0 < tile_end) {
      // Stage rows r0, r0 + 1, … that start before the tile's end (a prefix of the threads).
      __syncthreads();  // the previous chunk is done with the stage
      if (tid == 0) staged = 0;
      __syncthreads();
      {
        const i64 r = r0 + tid;
        i64 rs = 0, rl = 0;
        if (r < p.rows) row_range(p, r, rs, rl);
        if (r < p.rows && rs < tile_end) {
          const RowInfo ri = row_info(p, r);
          RowStage& st = stage[tid];
          const double n_row = p.row_pass ? p.row_ws[r * ROW_WS + RW_NROW] : 0.0;
          st.a = ri.a; st.w = ri.w; st.c = ri.c;
          st.f = ri.counted ? agg_factor(p, n_row, n[0], n[1]) : 0.0;
          st.f_all = ri.counted ? agg_factor(p, n_row, n[2], n[3]) : 0.0;  // entropy, KL
          st.seq_coef = p.row_pass ? p.row_ws[r * ROW_WS + RW_COEF] : 0.0;
          st.start = rs; st.end = rs + rl; st.slot = ri.slot;
          st.flags = (ri.is_exp ? RS_EXPERT : 0) | (ri.trained ? RS_TRAINED : 0) |
                     (ri.counted ? RS_COUNTED : 0) | (ri.tok_explore ? RS_TOK_EXPLORE : 0);
          seen[tid] = 0;
          atomicAdd(&staged, 1);
        }
      }
      __syncthreads();
      const int m = staged;
      // The chunk: tokens [ck0, ck1). With a full stage it ends where the last staged row does
      // (possibly where it began, when every staged row lies before ck0: then only r0 moves).
      i64 ck1 = tile_end;
      if (m == STAGE) {
        const i64 e = stage[m - 1].end > ck0 ? stage[m - 1].end : ck0;
        if (e < ck1) ck1 = e;
      }
      const i64 kb = tb + (i64)tid * V;
      if (m > 0 && kb < ck1 && kb + V > ck0) {
        Raw lr[V], orr[V];
        load_tokens<FT>(p.logprobs, p.logprobs_dt, kb, ck0, ck1, lr);
        if (p.old_logprobs) load_tokens<FT>(p.old_logprobs, p.old_dt, kb, ck0, ck1, orr);
        else
#pragma unroll
          for (int u = 0; u < V; ++u) orr[u] = lr[u];
        // The row of the first token in the chunk: the last staged row starting at or before it.
        const i64 k_first = kb > ck0 ? kb : ck0;
        int j = -1;
        {
          int lo = 0, hi = m;  // stage[lo].start ≤ k_first < stage[hi].start, if any
          if (stage[0].start <= k_first) {
            while (hi - lo > 1) {
              const int mid = (lo + hi) >> 1;
              if (stage[mid].start <= k_first) lo = mid; else hi = mid;
            }
            j = lo;
          }
        }
        double g[V];
        unsigned wrote = 0;  // bit u: token u is in a row of this chunk (its gradient is written)
#pragma unroll
        for (int u = 0; u < V; ++u) {
          g[u] = 0.0;
          const i64 k = kb + u;
          if (k < ck0 || k >= ck1) continue;
          while (j + 1 < m && stage[j + 1].start <= k) ++j;
          if (j < 0 || k >= stage[j].end) continue;  // in no row: left untouched
          wrote |= 1u << u;
          const RowStage& r = stage[j];
          double gh = 0.0;
          if ((r.flags & RS_COUNTED) && mask_at(p.mask, p.mask_dt, k)) {
            if (r.flags & RS_TRAINED) seen[j] = 1;  // every writer stores 1
            g[u] = token_grad<FT>(p, r, k, raw_value<FT>(lr[u]), raw_value<FT>(orr[u]), lambda, acc, gh);
          }
          if (p.grad_entropy) st(p.grad_entropy, p.grad_entropy_dt, k, gh);
        }
        if (p.grad_logprobs) store_tokens<FT>(p.grad_logprobs, p.grad_dt, kb, wrote, g);
      }
      // N_seq: a staged row that ends in this chunk and began in this block is complete; the
      // row that goes on past the chunk is carried (its flag merged into the next chunk's first
      // row); the block's first row, begun in an earlier block, is an edge row.
      __syncthreads();  // every token's `seen` is written
      int here = 0;
      bool carries = false, first = false;
      if (tid < m) {
        here = seen[tid];
        if (tid == 0 && r0 == carry_row) here |= carry_seen;
        if (stage[tid].end > ck1) carries = true;
        else if (stage[tid].start < k_begin) first = true;
        else seqs += here;
      }
      __syncthreads();  // thread 0 has read the carry
      if (tid == 0 && m > 0) { carry_row = -1; carry_seen = 0; }
      __syncthreads();
      if (carries) { carry_row = r0 + tid; carry_seen = here; }
      if (first) { first_row = r0 + tid; first_seen = here; }
      if (m > 0) r0 = stage[m - 1].end > ck1 ? r0 + m - 1 : r0 + m;
      ck0 = ck1;
    }
  }

  // Per-row metrics (grid-strided rows) and the sequence-Δ terms of the row pass (after the
  // tokens, so that their sums take no registers during the token loop).
  double rollouts = 0.0, wsum = 0.0, correct = 0.0, seq_ex = 0.0, exp_sum = 0.0, exp_cnt = 0.0;
  for (i64 i = (i64)blockIdx.x * LOSS_THREADS + tid; i < p.rows; i += (i64)gridDim.x * LOSS_THREADS) {
    if (!expert_row(p, i) || p.authors) {
      const double c = ld(p.signs, p.signs_dt, i);
      rollouts += 1.0;
      wsum += ld(p.weights, p.weights_dt, i);
      if (c > 0.0) correct += 1.0;
    }
    if (p.row_pass && p.row_ws[i * ROW_WS + RW_HAS] != 0.0) {
      seq_ex += p.row_ws[i * ROW_WS + RW_WPHI];
      acc.dsum += p.row_ws[i * ROW_WS + RW_DELTA];
      acc.delta += 1;
    }
  }
  // The expert rows' Σ m*ℓ*, Σ m* (metric), a warp per expert row.
  if (p.expert_logprobs) {
    const i64 warps = LOSS_THREADS / 32;
    for (i64 s = (i64)blockIdx.x * warps + (tid >> 5); s < p.expert_rows; s += (i64)gridDim.x * warps) {
      i64 es, el;
      expert_range(p, s, es, el);
      for (i64 t = tid & 31; t < el; t += 32)
        if (mask_at(p.expert_mask, p.expert_mask_dt, es + t)) {
          exp_sum += ld(p.expert_logprobs, p.expert_dt, es + t);
          exp_cnt += 1.0;
        }
    }
  }

  // This block's partial sums and edge rows, then the last block's totals and metrics.
  double v[BLOCK_FIELDS];
  v[B_NTOK] = acc.counted; v[B_CLIP] = acc.clip; v[B_LOWER] = acc.lower; v[B_RTOK] = acc.rtok;
  v[B_DCNT] = acc.delta; v[B_PPO_KL] = acc.ppo_kl; v[B_DSUM] = acc.dsum; v[B_PG] = acc.pg;
  v[B_ENT] = acc.ent; v[B_KL] = acc.kl; v[B_TOK_EX] = acc.tok_ex; v[B_SEQS] = seqs;
  v[B_ROLLOUTS] = rollouts; v[B_WSUM] = wsum; v[B_CORRECT] = correct; v[B_SEQ_EX] = seq_ex;
  v[B_EXP_SUM] = exp_sum; v[B_EXP_CNT] = exp_cnt;
  block_sum<BLOCK_FIELDS>(v, scratch);  // its barriers order the edge rows' last writes
  double* edges = p.block_ws + (i64)gridDim.x * BLOCK_FIELDS;
  if (tid == 0) {
    double* e = edges + (i64)blockIdx.x * EDGE_FIELDS;
    e[0] = (double)first_row; e[1] = first_seen; e[2] = (double)carry_row; e[3] = carry_seen;
  }
  if (publish_partials<BLOCK_FIELDS>(v, p.block_ws, &p.tickets[1])) {
    gather_partials<BLOCK_FIELDS>(v, p.block_ws, scratch);
    if (tid == 0) {
      // The edge rows in token order: each distinct row counts once if any block saw a
      // counted token of it.
      const volatile double* e = edges;
      i64 cur = -1;
      int cur_seen = 0;
      for (unsigned b = 0; b < gridDim.x; ++b)
        for (int h = 0; h < 2; ++h) {
          const i64 row = (i64)e[(i64)b * EDGE_FIELDS + 2 * h];
          const int s = e[(i64)b * EDGE_FIELDS + 2 * h + 1] != 0.0;
          if (row < 0) continue;
          if (row == cur) { cur_seen |= s; continue; }
          v[B_SEQS] += cur_seen;
          cur = row;
          cur_seen = s;
        }
      v[B_SEQS] += cur_seen;
      write_metrics(p, v, n);
    }
  }
}

#define LOSS_KERNEL(suffix, FT) \
  extern "C" __global__ void __launch_bounds__(LOSS_THREADS, 2) calibrl_loss_##suffix(LossParams p) { loss_kernel<FT>(p); }
LOSS_KERNEL(f32, DT_F32)
LOSS_KERNEL(f64, DT_F64)
LOSS_KERNEL(bf16, DT_BF16)
LOSS_KERNEL(f16, DT_F16)
LOSS_KERNEL(any, DT_ANY)

// ------------------------------------------------- expert baseline from the no-grad output (§7)

// Each selected expert's token log-probs copied from its place in the no-grad pass's packed
// output into its slot of the packed expert tensor, and its sum E_g (optionally divided by its
// length).
struct ExpertParams {
  const void* nograd; i64 nograd_dt;
  void* expert_logprobs; i64 expert_dt;  // may be null
  void* expert_sums; i64 sums_dt;        // may be null
  const i64* source;                     // [slots]: start in `nograd`, −1 if not in this part
  const i64* offsets;                    // [slots + 1]: the packed expert layout
  i64 slots, length_normalize;
};

extern "C" __global__ void calibrl_collect_experts(ExpertParams p) {
  __shared__ double partial[32];
  for (i64 s = blockIdx.x; s < p.slots; s += gridDim.x) {
    const i64 o0 = p.offsets[s], len = p.offsets[s + 1] - o0, src = p.source[s];
    double sum = 0.0;
    for (i64 t = threadIdx.x; t < len; t += blockDim.x) {
      const double v = src >= 0 ? ld(p.nograd, p.nograd_dt, src + t) : 0.0;
      if (p.expert_logprobs) st(p.expert_logprobs, p.expert_dt, o0 + t, v);
      sum += v;
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += partial[w];
      if (p.length_normalize && len > 0) total /= (double)len;
      if (p.expert_sums) st(p.expert_sums, p.sums_dt, s, total);
    }
    __syncthreads();
  }
}
