"""Pure-torch references for the kernels: the naive log-prob/entropy and the clipped-ratio policy loss.

Tests compare every backend against these, benchmarks use them as the baseline, and the "torch"
backend of `policy_loss` is `policy_loss_reference` itself. The naive log-prob materializes the full
[N, V] logits; `fused_logprobs` is the memory-bounded version of it.
"""
import math

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum")
RATIO_LEVELS = ("token", "sequence")  # PPO/GRPO's per-token ratio; GSPO's one ratio per sequence
SURROGATES = ("clip", "cispo", "sapo", "vespo")  # PPO's clipped ratio; CISPO's capped ratio weighing logp; SAPO's
# gate; VESPO's gamma weight of the sequence's ratio weighing logp
VESPO_PARAMS = (2.0, 3.0, 3.0, 2.0)  # (k_pos, lambda_pos, k_neg, lambda_neg): TRL's defaults
# The per-token KL estimators of KL(pi || ref), x = logp - ref_logp (verl's kl_loss_type; Schulman's k1, k2, k3):
# k1 = x, k2 = x^2 / 2, k3 = exp(-x) + x - 1 (verl's low_var_kl, TRL's, the default), abs = |x|.
KL_TYPES = ("k3", "k1", "k2", "abs")
# |logp - old_logp| and |ref_logp - logp| are clamped to this before exp (verl's clamp): past it exp overflows
# fp32 near 88, and inf times a zero advantage or coefficient is NaN. Ordinary steps sit far inside it.
LOG_RATIO_CLAMP = 20.0
# k3 = exp(d) - d - 1 (d = ref_logp - logp) is ~d^2 / 2 near 0, below fp32's ulp of 1 for |d| < 5e-4: written so it is
# rounding noise (negative as often as not) for a policy near its reference. Below this |d| both backends take its
# Taylor series to d^9 / 9! instead (relative error < 3e-9 there); past it exp's rounding is < 1e-6 of k3 >= 0.1.
K3_SERIES_BOUND = 0.5


def logprobs_reference(hidden, weight, targets, temperature=1.0):
    """log p(target) = log_softmax((hidden @ weight.T).float() / T).gather(targets), fp32 (fp64 stays fp64)."""
    logits = (hidden @ weight.T).float() if hidden.dtype != torch.float64 else hidden @ weight.T  # [..., V]
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [..., V]
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [...]


def entropy_reference(hidden, weight, temperature=1.0):
    """Entropy of softmax(logits / T) per token, computed on the full logits."""
    logits = (hidden @ weight.T).float() if hidden.dtype != torch.float64 else hidden @ weight.T  # [..., V]
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [..., V]
    return -(logp.exp() * logp).sum(-1)  # [...]


@torch.no_grad()
def vespo_weights(logp, old_logp, advantages, mask, params=VESPO_PARAMS, log_is=None):
    """VESPO's per-sequence weight [B, 1] (no grad), TRL's get_gamma_weights: w = exp(sum over the row's
    masked tokens of logp - old_logp, plus log_is [B] when given: the rollout's importance ratio folded
    in), phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1), with (k, lambda) by the sign of the advantage
    (A >= 0: the first pair); log-ratios clamped to [-20, 20], log w to [log 1e-8, 20], as there."""
    k_pos, lambda_pos, k_neg, lambda_neg = params
    m = mask.bool()
    log_ratio = torch.clamp(torch.where(m, logp.float() - old_logp.float(), 0.0), -20.0, 20.0)  # [B, T]
    seq_log_ratio = log_ratio.sum(-1, keepdim=True)  # [B, 1]
    if log_is is not None:
        seq_log_ratio = seq_log_ratio + log_is.float()[:, None]
    log_w = torch.clamp(seq_log_ratio, math.log(1e-8), 20.0)  # [B, 1]
    positive = advantages.float()[:, None] >= 0  # [B, 1]
    k = torch.where(positive, float(k_pos), float(k_neg))
    lam = torch.where(positive, float(lambda_pos), float(lambda_neg)).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _clamp_log_ratio(log_ratio):
    return torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def k3_estimate(diff):
    """k3 = exp(diff) - diff - 1 of diff = ref_logp - logp (clamped), to fp32's relative precision near 0 too."""
    series = diff * diff * (1 / 2 + diff * (1 / 6 + diff * (1 / 24 + diff * (1 / 120 + diff * (
        1 / 720 + diff * (1 / 5040 + diff * (1 / 40320 + diff / 362880)))))))
    return torch.where(diff.abs() < K3_SERIES_BOUND, series, torch.exp(diff) - diff - 1.0)


def loss_token_weights(mask, loss_agg, norm_length=None):
    """Per-token weights w [B, T] such that loss = sum(w * per_token_loss) for each aggregation mode.

    token-mean              (DAPO):     w = m / (number of masked tokens in the batch)
    seq-mean-token-mean     (GRPO):     w = m / (len_b * number of non-empty rows)
    seq-mean-token-sum-norm (Dr.GRPO):  w = m / (norm_length * number of non-empty rows)
    seq-mean-token-sum      (LUSPO):    w = m / (number of non-empty rows): each row's loss scaled by its length
    Rows without a masked token get weight 0 and are not counted; an all-masked batch gives w = 0.
    """
    m = mask.to(torch.float32)  # [B, T]
    if loss_agg == "token-mean":
        return m / m.sum().clamp(min=1.0)
    lengths = m.sum(-1)  # [B]
    num_rows = (lengths > 0).sum().clamp(min=1).to(torch.float32)
    if loss_agg == "seq-mean-token-mean":
        return m / (lengths.clamp(min=1.0) * num_rows).unsqueeze(-1)
    if loss_agg == "seq-mean-token-sum":
        return m / num_rows
    if loss_agg == "seq-mean-token-sum-norm":
        norm = float(mask.shape[-1] if norm_length is None else norm_length)
        return m / (norm * num_rows)
    raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")


def policy_loss_reference(logp, old_logp, advantages, mask, *, ref_logp=None, eps_low=0.2, eps_high=0.2,
                          kl_coef=0.0, loss_agg="seq-mean-token-mean", norm_length=None, is_weights=None, delta=None,
                          ratio_level="token", surrogate="clip", sapo_temperatures=(1.0, 1.05),
                          kl_ratio_weighted=False, vespo_params=VESPO_PARAMS, vespo_log_is=None, kl_type="k3"):
    """Clipped-ratio surrogate (times is_weights) (+ the `kl_type` KL estimate, times the ratio with
    kl_ratio_weighted) aggregated by `loss_agg`; returns (loss, stats).
    See policy_loss."""
    m = mask.bool()  # [B, T]
    # Masked positions may hold garbage (padding, -inf): zero them before exp so no NaN reaches the
    # loss or flows back through torch.where's gradient.
    logp = torch.where(m, logp.float(), 0.0)  # [B, T]
    old_logp = torch.where(m, old_logp.float(), 0.0)  # [B, T]
    adv = advantages.float().unsqueeze(-1)  # [B, 1]
    if ratio_level == "sequence":  # GSPO: one ratio per row, from the mean log-ratio of its tokens
        log_ratio = (logp - old_logp).sum(-1) / m.sum(-1).clamp(min=1)  # [B]
        ratio = torch.exp(_clamp_log_ratio(log_ratio))[:, None].expand_as(logp)  # [B, T]
    else:
        ratio = torch.exp(_clamp_log_ratio(logp - old_logp))  # [B, T]
    if surrogate == "vespo":  # the sequence's gamma weight (a constant) weighs the log-prob
        per_token = -adv * vespo_weights(logp, old_logp, advantages, m, vespo_params, vespo_log_is) * logp  # [B, T]
    elif surrogate == "cispo":  # the capped ratio weighs the log-prob, as a constant
        per_token = -adv * torch.clamp(ratio, max=1.0 + eps_high).detach() * logp  # [B, T]
    elif surrogate == "sapo":  # a sigmoid gate of the ratio, by the advantage's sign
        tau = torch.where(adv > 0, float(sapo_temperatures[0]), float(sapo_temperatures[1]))  # [B, 1]
        per_token = -adv * torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau  # [B, T]
    else:
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)  # two-sided clipping
        pg_unclipped = -adv * capped  # [B, T]
        pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [B, T]
        per_token = torch.maximum(pg_unclipped, pg_clipped)  # [B, T]
    if is_weights is not None:  # importance-sampling correction of the surrogate only, never of the KL
        per_token = per_token * torch.where(m, is_weights.detach().float(), 0.0)
    if ref_logp is not None:
        x = logp - torch.where(m, ref_logp.float(), 0.0)  # [B, T] logp - ref_logp
        if kl_type == "k3":  # exp only of the clamped difference, as the ratio's
            kl = k3_estimate(_clamp_log_ratio(-x))  # [B, T]
        else:
            kl = {"k1": x, "k2": 0.5 * x * x, "abs": x.abs()}[kl_type]
        # times the (differentiable) ratio: the unbiased gradient of KL(pi || ref) off-policy and on (TRL's
        # use_bias_correction_kl, DeepSeek-V3.2); its value is k3 on-policy, its gradient ratio * (logp - ref)
        per_token = per_token + kl_coef * (kl * ratio if kl_ratio_weighted else kl)
    weights = loss_token_weights(mask, loss_agg, norm_length)  # [B, T]
    loss = (weights * torch.where(m, per_token, 0.0)).sum()

    with torch.no_grad():
        mf = m.float()
        num_tokens = mf.sum().clamp(min=1.0)
        # Fractions of masked tokens where the clipped branch is the active one (verl's pg_clipfrac,
        # split by side): low = ratio < 1 - eps_low with A < 0, high = ratio > 1 + eps_high with A > 0
        # (or, with two-sided clipping, ratio > delta with A < 0).
        low = (ratio < 1.0 - eps_low) & (adv < 0) & (surrogate == "clip")  # CISPO: no lower bound; SAPO: no clip
        clip_low = (low & m).float().sum() / num_tokens
        high = (ratio > 1.0 + eps_high) & (adv > 0) & (surrogate in ("clip", "cispo"))  # SAPO, VESPO: no clip
        if delta is not None:  # a negative advantage's ratio past delta: its gradient is zeroed too
            high = high | ((ratio > delta) & (adv < 0))
        clip_high = (high & m).float().sum() / num_tokens
        kl_mean = (kl * mf).sum() / num_tokens if ref_logp is not None else torch.zeros((), device=logp.device)
        stats = {
            "clip_low_frac": clip_low,
            "clip_high_frac": clip_high,
            "clip_frac": clip_low + clip_high,
            "kl_mean": kl_mean.float(),
            "ratio_mean": (ratio * mf).sum() / num_tokens,
        }
    return loss, stats
