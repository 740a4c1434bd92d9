// calibrl loss family: group advantages (SPEC §3) and the loss on log-prob inputs (SPEC §4).
//
// Unlike the logits family, these kernels are not dtype-suffixed: they read every tensor
// through `ld()` with a runtime dtype code (a uniform branch, negligible beside the memory
// traffic), so mixed input dtypes work as on the CPU backend, and they compute in double, like
// the CPU reference, so the two backends agree to rounding. Every reduction has a fixed order
// (warp shuffles, then warps in index order): the same inputs give the same bits.
//
// Pipeline of one loss call, all on the caller's stream, workspace owned by the caller:
//   expert_sums  (one block per expert slot)  → E_g, Σ m*ℓ*, Σ m*
//   loss_rows    (one warp per row)           → per-row partial sums
//   loss_finish  (one block)                  → normalisers, loss, metrics
//   loss_grad    (one warp per row)           → ∂L/∂ℓ, ∂L/∂H
// and the scheduler's helper that builds the expert baseline from the no-grad pass's output
// (collect_experts, one block per expert slot).

// No header is included, so a bare NVRTC compiles this file.
typedef long long i64;
typedef unsigned short u16;

__device__ __forceinline__ float bf16_bits_to_f32(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
  u16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

// dtype codes shared with src/cuda/loss.rs
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
    case DT_BF16: return (double)bf16_bits_to_f32(((const u16*)p)[i]);
    case DT_F16: return (double)f16_bits_to_f32(((const u16*)p)[i]);
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
    case DT_BF16: ((u16*)p)[i] = f32_to_bf16_bits((float)v); break;
    default: ((u16*)p)[i] = f32_to_f16_bits((float)v); break;
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
  __shared__ double mean_s;
  if (threadIdx.x == 0) mean_s = v[0] > 1.0 ? v[1] / v[0] : 0.0;  // G = 1: μ = 0
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

// Enumerations shared with src/cuda/loss.rs.
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
#define KL_K1 0
#define KL_ABS 1
#define KL_K2 2
#define KL_K3 3

struct LossParams {
  // policy rows
  const void* logprobs; i64 logprobs_dt;
  const void* offsets; i64 offsets_dt;  // null: padded layout
  i64 rows, seq_len;                    // seq_len: padded row length
  const void* mask; i64 mask_dt;        // may be null
  const void* old_logprobs; i64 old_dt;
  const void* ref_logprobs; i64 ref_dt;
  const void* entropy; i64 entropy_dt;
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
  double* expert_ws;  // [expert_rows * 3]: E_g, Σ m*ℓ*, Σ m*
  double* row_ws;     // [rows * ROW_FIELDS]
  double* final_ws;   // [FINAL_FIELDS]
  // configuration
  i64 loss_kind, token_aligned, length_normalize, activation, baseline_ref, agg, kl_kind;
  i64 has_normalizers;
  double norm_tokens, norm_seqs, t_norm;
  double alpha, lambda, clip_low, clip_high, dual_clip, entropy_coef, kl_coef, luffy_gamma;
};

#define ROW_FIELDS 18
// row_ws fields
#define R_N 0          // Σ m (tokens that count)
#define R_PG 1         // Σ m·p
#define R_CLIP 2       // clipped tokens
#define R_LOWER 3      // dual-clipped tokens
#define R_PPO_KL 4     // Σ (ℓold − ℓ) over rollout tokens
#define R_RTOK 5       // rollout tokens
#define R_ENT 6        // Σ m·H
#define R_KL 7         // Σ m·k(ℓ, ℓref)
#define R_TOK_EX 8     // token-aligned Σ m·w·φ(x)
#define R_DSUM 9       // Σ Δ
#define R_DCNT 10      // count of Δ
#define R_SEQ_EX 11    // sequence mode w·φ(x)
#define R_SEQ_COEF 12  // sequence mode w·φ'(x)·(−c)·scale
#define R_TRAINED 13
#define R_ROLLOUT 14
#define R_W 15         // w if rollout
#define R_CORRECT 16   // 1 if rollout and correct
#define R_NROLL 17     // n if rollout
#define FINAL_FIELDS 4  // N_tok, N_seq used for the gradients

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

__device__ __forceinline__ double mask_at(const void* m, i64 dt, i64 k) {
  return m ? (ld(m, dt, k) != 0.0 ? 1.0 : 0.0) : 1.0;
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
  if (p.dual_clip > 1.0 && a < 0.0) {
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

// One block per expert slot.
extern "C" __global__ void calibrl_expert_sums(LossParams p) {
  __shared__ double scratch[32 * 2];
  for (i64 s = blockIdx.x; s < p.expert_rows; s += gridDim.x) {
    i64 start, len;
    expert_range(p, s, start, len);
    double v[2] = {0.0, 0.0};
    for (i64 t = threadIdx.x; t < len; t += blockDim.x) {
      const double m = mask_at(p.expert_mask, p.expert_mask_dt, start + t);
      if (m != 0.0) { v[0] += ld(p.expert_logprobs, p.expert_dt, start + t); v[1] += 1.0; }
    }
    block_sum<2>(v, scratch);
    if (threadIdx.x == 0) {
      p.expert_ws[3 * s + 0] = p.length_normalize ? (v[1] > 0.0 ? v[0] / v[1] : 0.0) : v[0];
      p.expert_ws[3 * s + 1] = v[0];
      p.expert_ws[3 * s + 2] = v[1];
    }
    __syncthreads();
  }
}

// Token-aligned baseline ℓ*[g, t] (0 past the expert's length or at masked positions).
__device__ __forceinline__ double token_baseline(const LossParams& p, i64 slot, i64 t, i64 k) {
  if (p.baseline_ref) return ld(p.ref_logprobs, p.ref_dt, k);
  i64 start, len;
  expert_range(p, slot, start, len);
  if (t >= len) return 0.0;
  return mask_at(p.expert_mask, p.expert_mask_dt, start + t) * ld(p.expert_logprobs, p.expert_dt, start + t);
}

// One warp per row (rows are a few hundred to a few thousand tokens: a block per row spent
// more time in its reduction than in the tokens): the row's partial sums.
extern "C" __global__ void calibrl_loss_rows(LossParams p) {
  const int lane = threadIdx.x & 31;
  const i64 warps = blockDim.x >> 5;
  for (i64 i = blockIdx.x * warps + (threadIdx.x >> 5); i < p.rows; i += gridDim.x * warps) {
    const bool is_exp = expert_row(p, i);
    const bool trained = !is_exp || trains_experts(p);
    const double a = ld(p.advantages, p.advantages_dt, i);
    const double w = ld(p.weights, p.weights_dt, i);
    const double c = ld(p.signs, p.signs_dt, i);
    const i64 slot = (!p.baseline_ref && p.expert_logprobs) ? slot_of(p, i) : -1;
    const bool tok_explore = p.token_aligned && has_baseline(p) && !is_exp && (p.baseline_ref || slot != -1);
    i64 start, len;
    row_range(p, i, start, len);
    // n, pg, clip, lower, ppo_kl, rtok, ent, kl, tok_ex, dsum, dcnt, S, R
    double v[13] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    if (trained) {
      for (i64 t = lane; t < len; t += 32) {
        const i64 k = start + t;
        if (mask_at(p.mask, p.mask_dt, k) == 0.0) continue;
        const double logp = ld(p.logprobs, p.logprobs_dt, k);
        const double old = p.old_logprobs ? ld(p.old_logprobs, p.old_dt, k) : logp;
        double pv, dv;
        v[0] += 1.0;
        if (is_exp) {
          off_policy(p, a, logp, old, pv, dv);
        } else {
          bool clipped, lower;
          clipped_pg(p, a, logp, old, pv, dv, clipped, lower);
          v[2] += clipped; v[3] += lower; v[4] += old - logp; v[5] += 1.0;
        }
        v[1] += pv;
        if (p.entropy) v[6] += ld(p.entropy, p.entropy_dt, k);
        if (p.ref_logprobs) {
          double kv, dk;
          kl_term(p.kl_kind, logp, ld(p.ref_logprobs, p.ref_dt, k), kv, dk);
          v[7] += kv;
          v[12] += ld(p.ref_logprobs, p.ref_dt, k);
        }
        v[11] += logp;
        if (tok_explore) {
          const double delta = slot == -2 ? __longlong_as_double(0x7ff8000000000000ll)
                                          : logp - token_baseline(p, slot, t, k);
          double phi, dphi;
          activation(p, -c * delta, phi, dphi);
          v[8] += w * phi; v[9] += delta; v[10] += 1.0;
        }
      }
    }
    warp_sum<13>(v);
    if (lane == 0) {
      double* r = p.row_ws + i * ROW_FIELDS;
      const double n = v[0];
      r[R_N] = n; r[R_PG] = v[1]; r[R_CLIP] = v[2]; r[R_LOWER] = v[3]; r[R_PPO_KL] = v[4];
      r[R_RTOK] = v[5]; r[R_ENT] = v[6]; r[R_KL] = v[7]; r[R_TOK_EX] = v[8];
      r[R_DSUM] = v[9]; r[R_DCNT] = v[10]; r[R_SEQ_EX] = 0.0; r[R_SEQ_COEF] = 0.0;
      r[R_TRAINED] = trained; r[R_ROLLOUT] = !is_exp;
      r[R_W] = is_exp ? 0.0 : w;
      r[R_CORRECT] = (!is_exp && c > 0.0) ? 1.0 : 0.0;
      r[R_NROLL] = is_exp ? 0.0 : n;
      const bool seq_explore = !p.token_aligned && has_baseline(p) && trained && !is_exp &&
                               (p.baseline_ref || slot != -1);
      if (seq_explore) {
        const double scale = p.length_normalize ? inv(n) : 1.0;
        double e;
        if (p.baseline_ref) e = v[12] * (p.length_normalize ? inv(n) : 1.0);
        else e = slot == -2 ? __longlong_as_double(0x7ff8000000000000ll) : p.expert_ws[3 * slot];
        const double delta = v[11] * scale - e;
        double phi, dphi;
        activation(p, -c * delta, phi, dphi);
        r[R_SEQ_EX] = w * phi;
        r[R_SEQ_COEF] = w * dphi * -c * scale;
        r[R_DSUM] = delta;
        r[R_DCNT] = 1.0;
      }
    }
  }
}

__device__ __forceinline__ double agg_factor(const LossParams& p, double n_row, double n_tok, double n_seq) {
  switch (p.agg) {
    case AGG_TOKEN_MEAN: return inv(n_tok);
    case AGG_SEQ_SUM: return inv(n_seq);
    case AGG_SEQ_MEAN: return inv(n_seq) * inv(n_row);
    default: return inv(p.t_norm);
  }
}

#define METRICS 15

// One block: normalisers, the loss and the metrics.
extern "C" __global__ void __launch_bounds__(512) calibrl_loss_finish(LossParams p) {
  __shared__ double scratch[32 * 16];
  __shared__ double norms[2];
  // Pass 1: local counts (and everything that needs no normaliser).
  // local tokens, local seqs, clip, lower, ppo_kl, rtok, dsum, dcnt, rollouts, w, correct, nroll,
  // expert Σ m*ℓ*, expert Σ m*
  double a[14] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  for (i64 i = threadIdx.x; i < p.rows; i += blockDim.x) {
    const double* r = p.row_ws + i * ROW_FIELDS;
    if (r[R_TRAINED] != 0.0) { a[0] += r[R_N]; a[1] += 1.0; }
    a[2] += r[R_CLIP]; a[3] += r[R_LOWER]; a[4] += r[R_PPO_KL]; a[5] += r[R_RTOK];
    a[6] += r[R_DSUM]; a[7] += r[R_DCNT]; a[8] += r[R_ROLLOUT]; a[9] += r[R_W];
    a[10] += r[R_CORRECT]; a[11] += r[R_NROLL];
  }
  if (p.expert_logprobs)
    for (i64 s = threadIdx.x; s < p.expert_rows; s += blockDim.x) {
      a[12] += p.expert_ws[3 * s + 1];
      a[13] += p.expert_ws[3 * s + 2];
    }
  block_sum<14>(a, scratch);
  if (threadIdx.x == 0) {
    norms[0] = p.has_normalizers ? p.norm_tokens : a[0];
    norms[1] = p.has_normalizers ? p.norm_seqs : a[1];
  }
  __syncthreads();
  const double n_tok = norms[0], n_seq = norms[1];
  // Pass 2: aggregated terms. pg, entropy, kl, token explore, sequence explore
  double b[5] = {0, 0, 0, 0, 0};
  for (i64 i = threadIdx.x; i < p.rows; i += blockDim.x) {
    const double* r = p.row_ws + i * ROW_FIELDS;
    if (r[R_TRAINED] == 0.0) continue;
    const double f = agg_factor(p, r[R_N], n_tok, n_seq);
    b[0] += f * r[R_PG]; b[1] += f * r[R_ENT]; b[2] += f * r[R_KL]; b[3] += f * r[R_TOK_EX];
    b[4] += r[R_SEQ_EX];
  }
  block_sum<5>(b, scratch);
  if (threadIdx.x == 0) {
    const double explore = p.token_aligned ? b[3] : b[4] * inv(n_seq);
    auto mean = [](double s, double n) { return n > 0.0 ? s / n : 0.0; };
    double m[METRICS];
    m[1] = b[0];
    m[2] = explore;
    m[3] = b[1];
    m[4] = b[2];
    m[0] = m[1] + effective_lambda(p) * m[2] - p.entropy_coef * m[3] + p.kl_coef * m[4];
    m[5] = mean(a[2], a[5]);
    m[6] = mean(a[3], a[5]);
    m[7] = mean(a[4], a[5]);
    m[8] = mean(a[6], a[7]);
    m[9] = mean(a[12], a[13]);
    m[10] = mean(a[11], a[8]);
    m[11] = mean(a[10], a[8]);
    m[12] = mean(a[9], a[8]);
    m[13] = a[0];
    m[14] = a[1];
    if (p.metrics)
      for (int j = 0; j < METRICS; ++j) st(p.metrics, p.metrics_dt, j, m[j]);
    p.final_ws[0] = n_tok;
    p.final_ws[1] = n_seq;
    for (int j = 0; j < METRICS; ++j) p.final_ws[FINAL_FIELDS + j] = m[j];
  }
}

// One warp per row: ∂L/∂ℓ and ∂L/∂H for every element (0 where nothing flows).
extern "C" __global__ void calibrl_loss_grad(LossParams p) {
  const double n_tok = p.final_ws[0], n_seq = p.final_ws[1];
  const double lambda = effective_lambda(p);
  const int lane = threadIdx.x & 31;
  const i64 warps = blockDim.x >> 5;
  for (i64 i = blockIdx.x * warps + (threadIdx.x >> 5); i < p.rows; i += gridDim.x * warps) {
    const double* r = p.row_ws + i * ROW_FIELDS;
    const bool trained = r[R_TRAINED] != 0.0;
    const bool is_exp = expert_row(p, i);
    const double f = trained ? agg_factor(p, r[R_N], n_tok, n_seq) : 0.0;
    const double a = ld(p.advantages, p.advantages_dt, i);
    const double w = ld(p.weights, p.weights_dt, i);
    const double c = ld(p.signs, p.signs_dt, i);
    const i64 slot = (!p.baseline_ref && p.expert_logprobs) ? slot_of(p, i) : -1;
    const bool tok_explore = p.token_aligned && has_baseline(p) && !is_exp && (p.baseline_ref || slot != -1);
    const double seq_coef = lambda * inv(n_seq) * r[R_SEQ_COEF];
    i64 start, len;
    row_range(p, i, start, len);
    for (i64 t = lane; t < len; t += 32) {
      const i64 k = start + t;
      double g = 0.0, gh = 0.0;
      if (trained && mask_at(p.mask, p.mask_dt, k) != 0.0) {
        const double logp = ld(p.logprobs, p.logprobs_dt, k);
        const double old = p.old_logprobs ? ld(p.old_logprobs, p.old_dt, k) : logp;
        double pv, dv;
        if (is_exp) {
          off_policy(p, a, logp, old, pv, dv);
        } else {
          bool clipped, lower;
          clipped_pg(p, a, logp, old, pv, dv, clipped, lower);
        }
        g = f * dv;
        if (p.ref_logprobs && p.kl_coef != 0.0) {
          double kv, dk;
          kl_term(p.kl_kind, logp, ld(p.ref_logprobs, p.ref_dt, k), kv, dk);
          g += p.kl_coef * f * dk;
        }
        if (tok_explore) {
          const double delta = slot == -2 ? __longlong_as_double(0x7ff8000000000000ll)
                                          : logp - token_baseline(p, slot, t, k);
          double phi, dphi;
          activation(p, -c * delta, phi, dphi);
          g += lambda * f * w * dphi * -c;
        }
        g += seq_coef;
        if (p.entropy) gh = -p.entropy_coef * f;
      }
      if (p.grad_logprobs) st(p.grad_logprobs, p.grad_dt, k, g);
      if (p.grad_entropy) st(p.grad_entropy, p.grad_entropy_dt, k, gh);
    }
  }
}

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
