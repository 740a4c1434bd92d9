/* A consumer of libcalibrl in plain C99: builds a configuration, computes the group advantages
 * of a 2-group batch, calls the loss on a packed batch and prints the metrics and gradients.
 * tests/c_program.rs compiles it with -std=c99 -Wall -Wextra -Werror -pedantic and compares
 * the printed numbers with the Rust API's. */
#include "calibrl.h"

#include <stdio.h>
#include <string.h>

#define B 6
#define T 15
#define P 2
#define TS 7

static DLTensor tensor(void *data, int64_t *shape, int ndim, uint8_t code, uint8_t bits) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.device.device_type = 1; /* CPU */
  t.device.device_id = 0;
  t.ndim = ndim;
  t.dtype.code = code;
  t.dtype.bits = bits;
  t.dtype.lanes = 1;
  t.shape = shape;
  t.strides = NULL;
  t.byte_offset = 0;
  return t;
}

static int check(calibrl_status st, const char *what) {
  if (st != CALIBRL_STATUS_OK) {
    fprintf(stderr, "%s failed: %s: %s\n", what, calibrl_status_name(st), calibrl_last_error_message());
    return 1;
  }
  return 0;
}

int main(void) {
  calibrl_config *cfg = NULL;
  double rewards[B] = {1.0, 0.0, 1.0, 0.0, 0.0, 1.0};
  int64_t groups[B] = {0, 0, 0, 1, 1, 1};
  double adv[B], w[B], sg[B];
  int64_t sh_b[1] = {B}, sh_t[1] = {T}, sh_o[1] = {B + 1}, sh_e[1] = {TS}, sh_eo[1] = {P + 1};
  int64_t offsets[B + 1] = {0, 3, 5, 9, 10, 13, 15};
  int64_t eoffsets[P + 1] = {0, 4, TS};
  int64_t eindex[B] = {0, 0, 0, 1, 1, 1};
  double logp[T], old[T], elogp[TS], grad[T];
  calibrl_metrics m;
  calibrl_advantage_args aa;
  calibrl_loss_args la;
  DLTensor t_r, t_g, t_a, t_w, t_s, t_l, t_o, t_old, t_e, t_eo, t_ei, t_grad;
  int i;
  char json[2048];
  size_t len = 0;

  if (calibrl_abi_version() != CALIBRL_ABI_VERSION) {
    fprintf(stderr, "ABI mismatch\n");
    return 1;
  }
  printf("version %s\n", calibrl_version());
  if (check(calibrl_config_new("{\"preset\":\"paper\",\"lambda\":0.2}", &cfg), "config_new")) return 1;
  if (check(calibrl_config_to_json(cfg, json, sizeof json, &len), "config_to_json")) return 1;
  printf("config %s\n", json);

  for (i = 0; i < T; i++) {
    logp[i] = -0.05 - 0.1 * (double)((i * 7) % 13);
    old[i] = logp[i] + 0.03 * (double)((i % 5) - 2);
  }
  for (i = 0; i < TS; i++) elogp[i] = -0.2 - 0.15 * (double)((i * 3) % 5);

  t_r = tensor(rewards, sh_b, 1, 2, 64);
  t_g = tensor(groups, sh_b, 1, 0, 64);
  t_a = tensor(adv, sh_b, 1, 2, 64);
  t_w = tensor(w, sh_b, 1, 2, 64);
  t_s = tensor(sg, sh_b, 1, 2, 64);
  memset(&aa, 0, sizeof aa);
  aa.rewards = &t_r;
  aa.group_ids = &t_g;
  aa.num_groups = 2;
  aa.correct = NULL;
  aa.is_expert = NULL;
  aa.advantages = &t_a;
  aa.weights = &t_w;
  aa.signs = &t_s;
  if (check(calibrl_group_advantages(cfg, &aa, NULL), "group_advantages")) return 1;
  for (i = 0; i < B; i++) printf("adv %d %.17g %.17g %.17g\n", i, adv[i], w[i], sg[i]);

  t_l = tensor(logp, sh_t, 1, 2, 64);
  t_o = tensor(offsets, sh_o, 1, 0, 64);
  t_old = tensor(old, sh_t, 1, 2, 64);
  t_e = tensor(elogp, sh_e, 1, 2, 64);
  t_eo = tensor(eoffsets, sh_eo, 1, 0, 64);
  t_ei = tensor(eindex, sh_b, 1, 0, 64);
  t_grad = tensor(grad, sh_t, 1, 2, 64);
  memset(&la, 0, sizeof la);
  la.logprobs = &t_l;
  la.seq_offsets = &t_o;
  la.old_logprobs = &t_old;
  la.advantages = &t_a;
  la.weights = &t_w;
  la.signs = &t_s;
  la.expert_logprobs = &t_e;
  la.expert_offsets = &t_eo;
  la.expert_index = &t_ei;
  la.grad_logprobs = &t_grad;
  if (check(calibrl_loss(cfg, &la, &m, NULL), "loss")) return 1;
  printf("metric loss %.17g\n", m.loss);
  printf("metric pg_loss %.17g\n", m.pg_loss);
  printf("metric explore_loss %.17g\n", m.explore_loss);
  printf("metric clipfrac %.17g\n", m.clipfrac);
  printf("metric mean_delta %.17g\n", m.mean_delta);
  printf("metric mean_rarity_weight %.17g\n", m.mean_rarity_weight);
  printf("metric num_tokens %.17g\n", m.num_tokens);
  for (i = 0; i < T; i++) printf("grad %d %.17g\n", i, grad[i]);

  /* A bad call: status and message. */
  la.seq_offsets = NULL;
  {
    /* Read the message after the call (argument evaluation order is unspecified in C). */
    calibrl_status bad = calibrl_loss(cfg, &la, &m, NULL);
    printf("bad %d %s\n", (int)bad, calibrl_last_error_message());
  }
  calibrl_config_free(cfg);
  printf("done\n");
  return 0;
}
