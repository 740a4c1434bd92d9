"""SPEC.md written directly in float64 PyTorch, differentiated by autograd: the oracle the
library is checked against. Plain, slow and literal on purpose; nothing here calls calibrl.

Layouts: everything is padded ``[B, S]`` here; tests convert packed inputs with ``unpack``.
"""

from __future__ import annotations

import torch

F64 = torch.float64


# ---------------------------------------------------------------------------------- §3


def advantages(cfg: dict, rewards, group_ids, num_groups, correct=None, is_expert=None):
    r = torch.as_tensor(rewards, dtype=F64)
    gid = torch.as_tensor(group_ids).long()
    b = r.shape[0]
    expert = torch.zeros(b, dtype=torch.bool) if is_expert is None else torch.as_tensor(is_expert).bool()
    mean = torch.zeros(num_groups, dtype=F64)
    std = torch.ones(num_groups, dtype=F64)
    for g in range(num_groups):
        rg = r[(gid == g) & ~expert]
        if rg.numel() > 1 and bool((rg == rg[0]).all()):  # all equal: A = 0 exactly
            mean[g] = rg[0]
            std[g] = 0.0
        elif rg.numel() > 1:  # G_g == 1: μ = 0, σ = 1
            mean[g] = rg.mean()
            std[g] = rg.std(unbiased=True)
    centered = r - mean[gid]
    a = centered / (std[gid] + cfg["adv_eps"]) if cfg["norm_by_std"] else centered
    w = a.abs() if cfg["rarity_weighting"] else torch.ones_like(a)
    if correct is None:
        c = torch.where(r > cfg["correct_threshold"], 1.0, -1.0).to(F64)
    else:
        c = torch.where(torch.as_tensor(correct).bool(), 1.0, -1.0).to(F64)
    return a, w, c


# ---------------------------------------------------------------------------------- §4

_M64 = (1 << 64) - 1
_PHI64 = 0x9E3779B97F4A7C15


def splitmix_key(seed: int, k: int) -> int:
    """docs/abi.md: Clip-Cov's random key of flat position k, SplitMix64(seed·φ64 + k + φ64)."""
    z = (seed * _PHI64 + k + _PHI64) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def cov_selection(cfg: dict, lp, m, A, rollout, clipped):
    """§4.6: a bool [B, S] of the tokens Clip-Cov / KL-Cov select among counted rollout tokens.
    Positions are flat indices of the padded layout (i·S + t)."""
    B, S = lp.shape
    ec = cfg.get("entropy_control", "none")
    sel = torch.zeros(B, S, dtype=torch.bool)
    counted = [i * S + t for i in range(B) for t in range(S) if m[i, t] > 0 and rollout[i]]
    if ec == "none" or not counted:
        return sel
    a = [float(A[k // S, 0]) for k in counted]
    lv = [float(lp[k // S, k % S]) for k in counted]
    a_mean = cfg["cov_adv_mean"] if cfg.get("cov_adv_mean") is not None else sum(a) / len(a)
    l_mean = cfg["cov_logprob_mean"] if cfg.get("cov_logprob_mean") is not None else sum(lv) / len(lv)
    n_tok = cfg["cov_token_count"] if cfg.get("cov_token_count") is not None else len(counted)
    cov = {k: (x - a_mean) * (y - l_mean) for k, x, y in zip(counted, a, lv)}
    if ec == "clip_cov":
        n = max(int(cfg["clip_cov_ratio"] * n_tok), 1)
        cands = [k for k in counted
                 if not bool(clipped[k // S, k % S]) and cfg["clip_cov_lb"] < cov[k] < cfg["clip_cov_ub"]]
        chosen = sorted(cands, key=lambda k: (splitmix_key(cfg["cov_seed"], k), k))[:n]
    else:
        n = max(int(cfg["kl_cov_ratio"] * n_tok), 1)
        chosen = sorted(counted, key=lambda k: (-cov[k], k))[:n]
    for k in chosen:
        sel[k // S, k % S] = True
    return sel


def phi(cfg: dict, x):
    act = cfg["activation"]
    if act == "leaky_relu":
        return torch.where(x > 0, x, cfg["alpha"] * x)
    if act == "relu":
        return torch.clamp(x, min=0)
    if act == "tanh":
        return torch.tanh(x)
    if act == "sigmoid":
        return torch.sigmoid(torch.clamp(x, min=0))
    if act == "huber":
        y = torch.clamp(x, min=0)
        return torch.where(y < 1, 0.5 * y * y, y - 0.5)
    raise ValueError(act)


def kl(cfg: dict, lp, ref):
    d = lp - ref
    kind = cfg["kl_kind"]
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.clamp(torch.exp(-d) + d - 1, -10, 10)
    raise ValueError(kind)


def loss(
    cfg: dict,
    lp,
    mask,
    adv,
    w,
    c,
    *,
    old=None,
    ref=None,
    ent=None,
    is_expert=None,
    expert_lp=None,
    expert_mask=None,
    expert_index=None,
    normalizers=None,
    token_weights=None,
):
    """Returns (L, parts dict). ``lp`` and ``ent`` are float64 leaves the caller
    differentiates; every other input is data."""
    B, S = lp.shape
    m = torch.as_tensor(mask).to(F64)
    A = torch.as_tensor(adv).to(F64)[:, None]
    W = torch.as_tensor(w).to(F64)
    C = torch.as_tensor(c).to(F64)
    expert = torch.zeros(B, dtype=torch.bool) if is_expert is None else torch.as_tensor(is_expert).bool()
    kind = cfg["loss"]
    trains_expert = kind in ("luffy", "rlplus")
    rollout = ~expert
    trained = torch.ones(B, dtype=torch.bool) if trains_expert else rollout
    tm = m * trained[:, None].to(F64)  # tokens that count
    n_i = tm.sum(1)
    # §4.5: a row without counted tokens is not counted in N_seq
    token_count, seq_count = (
        (tm.sum(), (trained & (n_i > 0)).sum().to(F64)) if normalizers is None else map(float, normalizers)
    )

    def agg(v):
        mode = cfg["agg"]
        if mode == "token-mean":
            return (tm * v).sum() / token_count
        if mode == "seq-mean-token-sum":
            return (tm * v).sum() / seq_count
        if mode == "seq-mean-token-mean":
            per_row = (tm * v).sum(1) / torch.clamp(n_i, min=1)
            return per_row.sum() / seq_count
        if mode == "seq-mean-token-sum-norm":
            return (tm * v).sum() / cfg["t_norm"]
        if mode == "token-sum":
            return (tm * v).sum()
        raise ValueError(mode)

    # §4.1 clipped PG
    old_t = lp.detach() if old is None else torch.as_tensor(old).to(F64)
    rho = torch.exp(lp - old_t)
    p1 = -A * rho
    p2 = -A * torch.clamp(rho, 1 - cfg["clip_low"], 1 + cfg["clip_high"])
    pc = torch.maximum(p1, p2)
    cd = cfg["dual_clip"]
    p = torch.where(A < 0, torch.minimum(pc, -A * cd), pc) if cd > 1 else pc
    # §4.4 expert rows of LUFFY / RL-PLUS
    if trains_expert:
        pi = torch.exp(lp)
        if kind == "luffy":
            p_off = -A * pi / (pi + cfg["luffy_gamma"])
        else:
            pi_old = torch.exp(old_t)
            p_off = -A * (2 * pi / (pi_old + 0.5 * (pi_old + 1))) * torch.sqrt(1 - pi).detach()
        p = torch.where(expert[:, None], p_off, p)
    # §4.6 covariance-based entropy control, on rollout rows
    ec = cfg.get("entropy_control", "none")
    cov_frac = 0.0
    if ec != "none":
        with torch.no_grad():
            sel = cov_selection(cfg, lp.detach(), m, A, rollout, p2 > p1)
            n_roll = float((m * rollout[:, None].to(F64)).sum())
            cov_frac = float(sel.sum()) / n_roll if n_roll > 0 else 0.0
        on_rollout = rollout[:, None].expand(B, S)
        if ec == "clip_cov":
            p = torch.where(sel & on_rollout, torch.zeros_like(p), p)
        else:
            unclipped = -A * rho
            penalised = unclipped + cfg["kl_cov_coef"] * (lp - old_t).abs()
            p = torch.where(on_rollout, torch.where(sel, penalised, unclipped), p)
    # Per-token importance weights (verl's rollout_is_weights): data, no gradient.
    if token_weights is not None:
        p = p * torch.as_tensor(token_weights).to(F64)
    l_pg = agg(p)

    # §4.2 exploration
    lam = cfg["lambda"] if kind == "calibrl" else 0.0
    l_explore = torch.zeros((), dtype=F64)
    delta_values = []
    # L_explore is computed whenever there is a baseline (GRPO reports it as a metric, λ = 0).
    has_baseline = expert_lp is not None if cfg["baseline"] == "expert" else ref is not None
    if kind in ("calibrl", "grpo") and has_baseline:
        rm = m * rollout[:, None].to(F64)
        n_r = rm.sum(1)
        has = torch.ones(B, dtype=torch.bool)
        if cfg["baseline"] == "expert":
            idx = torch.as_tensor(expert_index).long()
            has = idx >= 0
            E_lp = torch.as_tensor(expert_lp).to(F64)
            E_m = torch.ones_like(E_lp) if expert_mask is None else torch.as_tensor(expert_mask).to(F64)
            E_lp = E_lp * E_m
        if cfg["delta_mode"] == "sequence":
            S_i = (rm * lp).sum(1)
            if cfg["baseline"] == "expert":
                E_g = E_lp.sum(1)
                if cfg["length_normalize"]:
                    S_i = S_i / torch.clamp(n_r, min=1)
                    E_g = E_g / torch.clamp(E_m.sum(1), min=1)
                base = E_g[idx.clamp(min=0)]
            else:
                base = (rm * torch.as_tensor(ref).to(F64)).sum(1)
                if cfg["length_normalize"]:
                    S_i = S_i / torch.clamp(n_r, min=1)
                    base = base / torch.clamp(n_r, min=1)
            delta = S_i - base
            x = -C * delta
            use = has & rollout & (n_r > 0)  # §4.5: an empty rollout adds nothing
            l_explore = (W * phi(cfg, x) * use.to(F64)).sum() / seq_count
            delta_values = delta[use].detach()
        else:  # token-aligned: ℓ* = 0 past the expert's length
            Sx = E_lp.shape[1]
            aligned = torch.zeros(E_lp.shape[0], S, dtype=F64)
            k = min(S, Sx)
            aligned[:, :k] = E_lp[:, :k]
            delta = lp - aligned[idx.clamp(min=0)]
            x = -C[:, None] * delta
            v = W[:, None] * phi(cfg, x) * has[:, None].to(F64)
            l_explore = agg(v)
            delta_values = delta[(has & rollout)[:, None].expand(B, S) & (m > 0)].detach()

    # §4.3 regularisers
    l_h = agg(ent) if ent is not None else torch.zeros((), dtype=F64)
    l_kl = agg(kl(cfg, lp, torch.as_tensor(ref).to(F64))) if ref is not None else torch.zeros((), dtype=F64)
    total = l_pg + lam * l_explore - cfg["entropy_coef"] * l_h + cfg["kl_coef"] * l_kl

    # local metrics over rollout tokens
    rmask = (m * rollout[:, None].to(F64)) > 0
    with torch.no_grad():
        clipfrac = (p2 > p1)[rmask].to(F64).mean() if rmask.any() else torch.tensor(0.0)
        # no lower clip when dual clip is off (c ≤ 1)
        lower_hit = ((pc > -A * cd) & (A < 0) & (cd > 1)).expand(B, S)
        lower = lower_hit[rmask].to(F64).mean() if rmask.any() else torch.tensor(0.0)
        ppo_kl = (old_t - lp)[rmask].mean() if rmask.any() else torch.tensor(0.0)
    parts = {
        "loss": total.item(),
        "pg_loss": l_pg.item(),
        "explore_loss": l_explore.item(),
        "entropy_loss": l_h.item(),
        "kl_loss": l_kl.item(),
        "clipfrac": clipfrac.item(),
        "clipfrac_lower": lower.item(),
        "ppo_kl": ppo_kl.item(),
        "mean_delta": float(torch.as_tensor(delta_values).mean()) if len(delta_values) else 0.0,
        "num_tokens": tm.sum().item(),
        "num_seqs": (trained & (n_i > 0)).sum().item(),
        "cov_selected_frac": cov_frac,
    }
    return total, parts


# ---------------------------------------------------------------------------------- §6


def logits_outputs(z, labels, temperature):
    """(ℓ, H, lse) per row in float64; rows with a negative label give 0."""
    u = z.to(F64) / temperature
    lse = torch.logsumexp(u, dim=-1)
    keep = labels >= 0
    y = labels.clamp(min=0).long()
    lp = u.gather(1, y[:, None])[:, 0] - lse
    p = torch.softmax(u, dim=-1)
    ent = lse - (p * u).sum(-1)
    zero = torch.zeros((), dtype=F64)
    return torch.where(keep, lp, zero), torch.where(keep, ent, zero), torch.where(keep, lse, zero)


# ---------------------------------------------------------------------------------- layouts


def unpack(values, offsets, fill=0.0):
    """Packed ``[T]`` + ``[B+1]`` offsets → padded ``[B, S_max]`` and its mask."""
    off = [int(o) for o in offsets]
    b = len(off) - 1
    s = max([off[i + 1] - off[i] for i in range(b)] + [1])
    out = torch.full((b, s), fill, dtype=values.dtype)
    mask = torch.zeros((b, s))
    for i in range(b):
        n = off[i + 1] - off[i]
        out[i, :n] = values[off[i] : off[i + 1]]
        mask[i, :n] = 1
    return out, mask
