"""Clipped-ratio policy loss (PPO/GRPO/DAPO/Dr.GRPO) with an optional KL term, fused in Triton.

Per masked token: ratio = exp(logp - old_logp),
    loss_t = s * max(-A * min(ratio, delta), -A * clip(ratio, 1 - eps_low, 1 + eps_high)) + kl_coef * kl,
    kl = k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (times the ratio, with kl_ratio_weighted), or with
    kl_type the estimator k1 = logp - ref_logp, k2 = (logp - ref_logp)^2 / 2 or abs = |logp - ref_logp|,
both log-differences clamped to +-20 before exp (verl's guard against fp32 overflow),
or with CISPO's surrogate s * -A * sg(min(ratio, 1 + eps_high)) * logp, SAPO's
s * -A * sigmoid(tau (ratio - 1)) * 4 / tau, or VESPO's s * -A * sg(phi) * logp (phi the gamma weight of the
sequence's ratio, computed in torch and passed in as part of s), in place of the clipped one;
s an optional importance-sampling weight (1 without one), a constant to the gradient; delta the
optional two-sided clip (INTELLECT-2, TRL's `delta`; infinity without it), which bounds the ratio of a
negative-advantage token. GSPO's sequence-level ratio (TRL's importance_sampling_level="sequence") uses
one ratio per row, exp of the mean log-ratio over its masked tokens, for each of its tokens.
The aggregation modes differ only in a per-token weight w (reference.loss_token_weights), so the
loss is sum(w * loss_t) for all of them: one elementwise kernel serves GRPO, DAPO and Dr.GRPO, and
the reduction is a torch sum (Liger's warning: no kernel copy per paper). The sequence level runs the
same kernel twice: once over rows ([B, 1]: the row's log-ratio, weight sum_t w_t s_t) for the clipped
surrogate, once over tokens with A = 0 for the KL term.

The Triton kernel writes w * dloss_t/dlogp in the forward (one [B, T] fp32 buffer) instead of
recomputing it in a backward kernel: the backward is then a single scale by the incoming gradient.
Each program also writes its partial sums (loss, clip counts, KL, ratio), reduced in torch without
atomics, so the result is deterministic.
"""
import math
import numbers

import torch

from .fused_logprobs import HAS_TRITON, _resolve_backend
from .reference import (K3_SERIES_BOUND, KL_TYPES, LOG_RATIO_CLAMP, LOSS_AGG_MODES, RATIO_LEVELS, SURROGATES,
                        VESPO_PARAMS, _clamp_log_ratio, loss_token_weights, policy_loss_reference, vespo_weights)

if HAS_TRITON:
    import triton
    import triton.language as tl

    _NUM_PARTIALS = 5  # loss, clip_low count, clip_high count, KL sum, ratio sum

    @triton.jit
    def _policy_loss_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, w_ptr, is_ptr, grad_ptr, partial_ptr,
                            num_el, T, eps_low, eps_high, kl_coef, delta, tau_pos, tau_neg, clamp, series_bound,
                            HAS_REF: tl.constexpr, HAS_IS: tl.constexpr, SURROGATE: tl.constexpr,
                            KL_RATIO: tl.constexpr, KL_TYPE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        active = (offs < num_el) & (tl.load(mask_ptr + offs, mask=offs < num_el, other=0.0) != 0.0)
        # Inactive tokens load zeros, so garbage (-inf padding) never reaches exp.
        logp = tl.load(logp_ptr + offs, mask=active, other=0.0)
        old = tl.load(old_ptr + offs, mask=active, other=0.0)
        adv = tl.load(adv_ptr + offs // T, mask=active, other=0.0)
        w = tl.load(w_ptr + offs, mask=active, other=0.0)
        # The log-ratio clamped to +-LOG_RATIO_CLAMP before exp (verl), so exp never overflows to inf (inf * 0 is
        # NaN); past the clamp the ratio is constant in logp: its gradient is zero there, as torch.clamp's is.
        log_ratio = logp - old
        ratio_live = (log_ratio >= -clamp) & (log_ratio <= clamp)
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -clamp), clamp))
        dratio = tl.where(ratio_live, ratio, 0.0)  # d ratio / d logp
        if SURROGATE == 1:  # CISPO: the capped ratio, a constant weight on the log-prob: every token keeps a gradient
            weight = tl.minimum(ratio, 1.0 + eps_high)
            loss = -adv * weight * logp
            dloss = -adv * weight
            clip_low = active & (ratio < 0.0)  # none: CISPO has no lower bound
            clip_high = active & (ratio > 1.0 + eps_high) & (adv > 0.0)
        elif SURROGATE == 2:  # SAPO: a sigmoid gate in place of the clip, its slope 1 at ratio 1
            tau = tl.where(adv > 0.0, tau_pos, tau_neg)
            gate = tl.sigmoid(tau * (ratio - 1.0))
            loss = -adv * gate * 4.0 / tau
            dloss = -adv * 4.0 * gate * (1.0 - gate) * dratio
            clip_low = active & (ratio < 0.0)  # none: nothing is clipped
            clip_high = clip_low
        elif SURROGATE == 3:  # VESPO: -A * logp; the sequence's gamma weight arrives in the IS weight s
            loss = -adv * logp
            dloss = -adv
            clip_low = active & (ratio < 0.0)  # none: nothing is clipped
            clip_high = clip_low
        else:
            pg_unclipped = -adv * tl.minimum(ratio, delta)
            pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
            loss = tl.maximum(pg_unclipped, pg_clipped)
            # d(-A * ratio)/dlogp = -A * ratio; the clipped branch, when it wins, is constant in logp, and so is
            # the unclipped one past delta.
            dloss = tl.where((pg_unclipped >= pg_clipped) & (ratio <= delta), -adv * dratio, 0.0)
            clip_low = active & (ratio < 1.0 - eps_low) & (adv < 0.0)
            clip_high = active & (((ratio > 1.0 + eps_high) & (adv > 0.0)) | ((ratio > delta) & (adv < 0.0)))
        if HAS_IS:  # importance-sampling weight of the surrogate (not of the KL below)
            s = tl.load(is_ptr + offs, mask=active, other=0.0)
            loss = s * loss
            dloss = s * dloss
        kl = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_REF:
            raw_diff = tl.load(ref_ptr + offs, mask=active, other=0.0) - logp  # ref_logp - logp = -x
            if KL_TYPE == 0:  # k3, its exp of the difference clamped as the log-ratio's is
                diff = tl.minimum(tl.maximum(raw_diff, -clamp), clamp)
                # near 0 its Taylor series (reference.k3_estimate), whose d/d diff, diff + series, is expm1(diff)
                series = diff * diff * (1 / 2 + diff * (1 / 6 + diff * (1 / 24 + diff * (1 / 120 + diff * (
                    1 / 720 + diff * (1 / 5040 + diff * (1 / 40320 + diff / 362880)))))))
                small = tl.abs(diff) < series_bound
                exp_diff = tl.exp(diff)
                kl = tl.where(small, series, exp_diff - diff - 1.0)
                expm1_diff = tl.where(small, diff + series, exp_diff - 1.0)
                dkl = tl.where((raw_diff >= -clamp) & (raw_diff <= clamp), -expm1_diff, 0.0)  # d k3 / d logp
            elif KL_TYPE == 1:  # k1 = x
                kl = -raw_diff
                dkl = tl.full([BLOCK], 1.0, tl.float32)
            elif KL_TYPE == 2:  # k2 = x^2 / 2
                kl = 0.5 * raw_diff * raw_diff
                dkl = -raw_diff
            else:  # abs = |x|, its gradient the sign (0 at 0, as torch's)
                kl = tl.abs(raw_diff)
                dkl = tl.where(raw_diff < 0.0, 1.0, tl.where(raw_diff > 0.0, -1.0, 0.0))
            if KL_RATIO:  # ratio * k3: d/dlogp = dratio * k3 + ratio * dk3 (= ratio * (logp - ref) unclamped)
                loss += kl_coef * ratio * kl
                dloss += kl_coef * (dratio * kl + ratio * dkl)
            else:
                loss += kl_coef * kl
                dloss += kl_coef * dkl
        tl.store(grad_ptr + offs, tl.where(active, w * dloss, 0.0), mask=offs < num_el)
        base = partial_ptr + pid * 5
        tl.store(base + 0, tl.sum(tl.where(active, w * loss, 0.0), axis=0))
        tl.store(base + 1, tl.sum(clip_low.to(tl.float32), axis=0))
        tl.store(base + 2, tl.sum(clip_high.to(tl.float32), axis=0))
        tl.store(base + 3, tl.sum(tl.where(active, kl, 0.0), axis=0))
        tl.store(base + 4, tl.sum(tl.where(active, ratio, 0.0), axis=0))


def _block_size(device: torch.device) -> int:
    """Tokens per program: large on a GPU; small under the interpreter, which runs numpy per block."""
    return 1024 if device.type == "cuda" else 256


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask, weights, is_weights, eps_low, eps_high, kl_coef,
                delta, surrogate=0, tau_pos=1.0, tau_neg=1.0, kl_ratio=False, kl_type=0):
        num_el, seq_len = logp.numel(), logp.shape[-1]
        block = _block_size(logp.device)
        num_blocks = max(1, triton.cdiv(num_el, block))
        grad = torch.empty_like(logp)  # [B, T], w * dloss/dlogp
        partials = torch.zeros(num_blocks, _NUM_PARTIALS, dtype=torch.float32, device=logp.device)
        if num_el:
            _policy_loss_kernel[(num_blocks,)](
                logp, old_logp, ref_logp if ref_logp is not None else logp, advantages, mask, weights,
                is_weights if is_weights is not None else logp, grad, partials, num_el, seq_len, eps_low, eps_high,
                kl_coef, delta, tau_pos, tau_neg, LOG_RATIO_CLAMP, K3_SERIES_BOUND, HAS_REF=ref_logp is not None,
                HAS_IS=is_weights is not None,
                SURROGATE=surrogate, KL_RATIO=kl_ratio, KL_TYPE=kl_type, BLOCK=block)
        ctx.save_for_backward(grad)
        sums = partials.sum(0)  # [5]
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, *[None] * 15  # logp's gradient; the other 15 inputs take none


def _triton_policy_loss(logp, old_logp, advantages, mask, ref_logp, eps_low, eps_high, kl_coef, loss_agg,
                        norm_length, is_weights, delta, ratio_level, surrogate="clip", sapo_temperatures=(1.0, 1.05),
                        kl_ratio_weighted=False, vespo_params=VESPO_PARAMS, vespo_log_is=None, kl_type="k3"):
    weights = loss_token_weights(mask, loss_agg, norm_length).contiguous()  # [B, T]
    kl_kind = KL_TYPES.index(kl_type)
    mask_f = mask.to(torch.float32).contiguous()  # [B, T]
    ref = ref_logp.float().contiguous() if ref_logp is not None else None
    is_w = is_weights.detach().float().contiguous() if is_weights is not None else None
    if surrogate == "vespo":  # its per-sequence weight joins the IS weight: the kernel's surrogate is -A * logp
        phi = vespo_weights(logp, old_logp, advantages, mask, vespo_params, vespo_log_is).expand_as(logp)  # [B, T]
        is_w = (phi if is_w is None else phi * is_w).contiguous()
    logp, old_logp = logp.float().contiguous(), old_logp.float().contiguous()
    advantages = advantages.float().contiguous()
    delta = float("inf") if delta is None else float(delta)
    kind, (tau_pos, tau_neg) = SURROGATES.index(surrogate), map(float, sapo_temperatures)
    num_tokens = mask_f.sum().clamp(min=1.0)
    if ratio_level == "token":
        loss, sums = _PolicyLoss.apply(logp, old_logp, ref, advantages, mask_f, weights, is_w,
                                       float(eps_low), float(eps_high), float(kl_coef), delta, kind, tau_pos, tau_neg,
                                       bool(kl_ratio_weighted and ref is not None), kl_kind)
        clip_low, clip_high, kl_sum, ratio_sum = sums[1], sums[2], sums[3], sums[4]
    else:  # GSPO: the clipped surrogate over rows, its ratio the mean log-ratio of the row's tokens
        m = mask_f.bool()
        lengths = mask_f.sum(-1)  # [B]
        log_ratio = torch.where(m, logp - old_logp, 0.0).sum(-1) / lengths.clamp(min=1.0)  # [B], carries the grad
        # Every token of a row has the row's surrogate: the row weighs sum_t w_t s_t.
        row_weights = (weights * (is_w if is_w is not None else 1.0) * mask_f).sum(-1, keepdim=True)  # [B, 1]
        row_mask = (lengths > 0).to(torch.float32)[:, None]  # [B, 1]
        loss, _ = _PolicyLoss.apply(log_ratio[:, None].contiguous(), torch.zeros_like(row_mask), None, advantages,
                                    row_mask, row_weights.contiguous(), None, float(eps_low), float(eps_high), 0.0,
                                    delta, kind, tau_pos, tau_neg)
        kl_sum = torch.zeros((), device=logp.device)
        if ref is not None:  # the KL term per token, with A = 0 (no surrogate) and ratio 1
            kl_loss, kl_sums = _PolicyLoss.apply(logp, logp.detach(), ref, torch.zeros_like(advantages), mask_f,
                                                 weights, None, float(eps_low), float(eps_high), float(kl_coef),
                                                 delta, 0, 1.0, 1.0, False, kl_kind)
            loss, kl_sum = loss + kl_loss, kl_sums[3]
        with torch.no_grad():  # token counts of the rows whose ratio is clipped, as the token level counts them
            ratio = _clamp_log_ratio(log_ratio.detach()).exp()
            clipped = surrogate == "clip"  # SAPO's gate clips nothing
            low = (ratio < 1.0 - eps_low) & (advantages < 0) & clipped
            high = (((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio > delta) & (advantages < 0))) & clipped
            clip_low, clip_high = (lengths * low).sum(), (lengths * high).sum()
            ratio_sum = (lengths * ratio).sum()
    stats = {
        "clip_low_frac": clip_low / num_tokens,
        "clip_high_frac": clip_high / num_tokens,
        "clip_frac": (clip_low + clip_high) / num_tokens,
        "kl_mean": kl_sum / num_tokens,
        "ratio_mean": ratio_sum / num_tokens,
    }
    return loss, stats


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, eps_low, eps_high, kl_coef, loss_agg,
                  norm_length, backend, is_weights=None, delta=None, ratio_level="token", surrogate="clip",
                  sapo_temperatures=(1.0, 1.05), kl_ratio_weighted=False, vespo_params=VESPO_PARAMS,
                  vespo_log_is=None, kl_type="k3"):
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be one of ('auto', 'torch', 'triton'), got {backend!r}")
    # before the comparisons below: a string from a config file would raise a TypeError that names nothing
    optional = (("norm_length", norm_length), ("delta", delta))  # None: off
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high), ("kl_coef", kl_coef),
                        *((n, v) for n, v in optional if v is not None)):
        if isinstance(value, (bool, str, bytes)) or not isinstance(value, (numbers.Real, torch.Tensor)):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if kl_ratio_weighted and kl_type != "k3":  # TRL's correction is of k3's biased gradient
        raise ValueError(f"kl_ratio_weighted corrects k3's gradient: kl_type='k3', got {kl_type!r}")
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"logp must be a floating tensor of shape [B, T], got "
                         f"{getattr(logp, 'dtype', type(logp))} {tuple(getattr(logp, 'shape', ()))}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("is_weights", is_weights)):
        if name in ("ref_logp", "is_weights") and t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(getattr(t, 'shape', ()))}")
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}")
    # a soft weight (0.5) or an ignore value (-100) would weigh tokens in the aggregation while the clip statistics
    # read it as selected: refused, not silently mixed (a bool mask, the trainer's, needs no check and no sync)
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"mask must be bool or hold only 0 and 1 (False/0: outside the loss), got values "
                         f"{sorted(set(mask[(mask != 0) & (mask != 1)].flatten().tolist()))[:5]}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages must have shape [B] = {shape[:1]}, got "
                         f"{tuple(getattr(advantages, 'shape', ()))}")
    if advantages.device != logp.device:
        raise ValueError(f"advantages is on {advantages.device} but logp is on {logp.device}")
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if not eps >= 0:
            raise ValueError(f"{name} must be >= 0, got {eps}")
    if eps_low >= 1:
        raise ValueError(f"eps_low must be < 1 (the lower clip bound is 1 - eps_low), got {eps_low}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp")
    if norm_length is not None and not norm_length > 0:
        raise ValueError(f"norm_length must be > 0, got {norm_length}")
    if delta is not None and not delta > 1 + eps_high:  # else it would clip positive advantages too
        raise ValueError(f"delta must be > 1 + eps_high = {1 + eps_high}, got {delta}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if surrogate == "cispo" and ratio_level != "token":
        raise ValueError("surrogate='cispo' weighs each token's log-prob by its own capped ratio: ratio_level='token'")
    if surrogate == "vespo" and ratio_level != "token":
        raise ValueError("surrogate='vespo' takes its sequence weight from the summed token log-ratios: "
                         "ratio_level='token'")
    if vespo_log_is is not None and (surrogate != "vespo" or not isinstance(vespo_log_is, torch.Tensor)
                                     or tuple(vespo_log_is.shape) != shape[:1]):
        raise ValueError(f"vespo_log_is is a [B] = {shape[:1]} tensor for surrogate='vespo', got "
                         f"{tuple(getattr(vespo_log_is, 'shape', ()))} with surrogate={surrogate!r}")
    if len(vespo_params) != 4 or not all(math.isfinite(x) for x in vespo_params) or min(vespo_params) < 0:
        raise ValueError(f"vespo_params must be four finite numbers >= 0 (k_pos, lambda_pos, k_neg, lambda_neg), "
                         f"got {vespo_params}")
    if surrogate != "clip" and delta is not None:
        raise ValueError(f"delta caps the clipped surrogate's ratio; surrogate={surrogate!r} has none")
    if kl_ratio_weighted and ratio_level != "token":  # TRL: the unbiased gradient holds at token level only
        raise ValueError("kl_ratio_weighted weighs each token's KL by its own ratio: ratio_level='token'")
    if not all(t > 0 for t in sapo_temperatures):
        raise ValueError(f"sapo_temperatures must be > 0, got {sapo_temperatures}")


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, eps_low=0.2, eps_high=0.2, kl_coef=0.0,
                loss_agg="seq-mean-token-mean", norm_length=None, is_weights=None, delta=None, ratio_level="token",
                surrogate="clip", sapo_temperatures=(1.0, 1.05), kl_ratio_weighted=False, vespo_params=VESPO_PARAMS,
                vespo_log_is=None, kl_type="k3", backend="auto"):
    """Clipped-ratio policy loss over masked tokens; returns (loss, stats).

    logp, old_logp, ref_logp: [B, T] log-probs (only logp carries the grad: every other tensor argument is
    taken as a constant, detached); advantages [B]; mask [B, T]
    (bool or 0/1; False for padding and for tokens outside the loss, e.g. a cached prefix).
    loss_agg: "token-mean" (DAPO), "seq-mean-token-mean" (GRPO), "seq-mean-token-sum-norm"
    (Dr.GRPO: per-row sum / norm_length, default T) or "seq-mean-token-sum" (LUSPO: per-row sum). Seq modes
    average over rows with a masked token.
    is_weights [B, T] (optional, >= 0, no gradient): each token's surrogate is multiplied by it, the KL term
    not: importance sampling when the rollout's distribution differs from the one trained, e.g. truncated,
    min(p_train / p_rollout, C) (TRL's vllm_importance_sampling_correction; the trainer's modes).
    delta (optional, > 1 + eps_high): two-sided clipping (INTELLECT-2; TRL's `delta`): a token with A < 0 has
    its ratio capped at delta in the unclipped term, so a large ratio cannot make its loss unbounded.
    ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO; TRL's importance_sampling_level): each row's tokens
    share one ratio, exp(mean over the row's masked tokens of logp - old_logp), clipped as a token's is.
    surrogate: "clip" (PPO's clipped ratio, the above) or "cispo" (MiniMax-M1; TRL's loss_type="cispo"):
    -A * sg(min(ratio, 1 + eps_high)) * logp, the capped ratio a constant weight, so no token loses its
    gradient; eps_low unused, clip_high_frac counts the capped tokens with A > 0 (TRL's cispo clip ratio);
    or "sapo" (SAPO; TRL's loss_type="sapo"): -A * sigmoid(tau (ratio - 1)) * 4 / tau, tau = sapo_temperatures[0]
    where A > 0, else [1], a soft gate in place of the clip (nothing counts as clipped).
    or "vespo" (VESPO; TRL's loss_type="vespo"): -A * sg(phi(w)) * logp, w = exp(the row's summed log-ratio),
    phi(w) = e^lambda w^k e^(-lambda w) (1 at w = 1), (k, lambda) = vespo_params[:2] where A >= 0, else [2:];
    a soft, asymmetric weight in place of the clip (nothing counts as clipped); token level only.
    vespo_log_is [B] (optional): the log of the rollout's importance ratio per sequence, added to log w (TRL
    folds vLLM's ratio into VESPO's weight this way instead of multiplying the loss by it).
    kl_ratio_weighted (TRL's use_bias_correction_kl, DeepSeek-V3.2): the KL term is ratio * k3, the ratio
    differentiable, so its gradient is ratio * (logp - ref_logp) * dlogp, the unbiased gradient of the
    reverse KL for samples drawn from the old policy (k3's own gradient is not); token level only.
    kl_type (verl's kl_loss_type): the per-token estimate of KL(pi || ref) weighted by kl_coef, x = logp - ref_logp:
    "k3" exp(-x) + x - 1 (verl's low_var_kl, TRL's; the default), "k1" x, "k2" x^2 / 2 (its gradient x dlogp,
    the reverse KL's for on-policy samples), "abs" |x|.

    stats (detached fp32 scalars, averaged over masked tokens; 0 when there are none):
      clip_low_frac  tokens with ratio < 1 - eps_low and A < 0: the clipped branch is the active one
      clip_high_frac tokens with ratio > 1 + eps_high and A > 0 (or ratio > delta and A < 0): likewise
                     on the high side
      clip_frac      their sum, i.e. verl's pg_clipfrac (tokens whose gradient the clip zeroes)
      kl_mean        mean KL estimate (kl_type's) to the reference (0 without ref_logp)
      ratio_mean     mean ratio
    """
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, eps_low, eps_high, kl_coef, loss_agg, norm_length,
                  backend, is_weights, delta, ratio_level, surrogate, sapo_temperatures, kl_ratio_weighted,
                  vespo_params, vespo_log_is, kl_type)
    # only logp is differentiated: the others are constants of the step in both backends (the Triton one has no
    # gradient for them; through torch, an old_logp that requires grad would cancel logp's gradient)
    old_logp, advantages, ref_logp, is_weights, vespo_log_is = (
        None if t is None else t.detach() for t in (old_logp, advantages, ref_logp, is_weights, vespo_log_is))
    if _resolve_backend(backend, logp) == "triton":
        return _triton_policy_loss(logp, old_logp, advantages, mask, ref_logp, eps_low, eps_high, kl_coef,
                                   loss_agg, norm_length, is_weights, delta, ratio_level, surrogate, sapo_temperatures,
                                   kl_ratio_weighted, vespo_params, vespo_log_is, kl_type)
    return policy_loss_reference(logp, old_logp, advantages, mask, ref_logp=ref_logp, eps_low=eps_low,
                                 eps_high=eps_high, kl_coef=kl_coef, loss_agg=loss_agg, norm_length=norm_length,
                                 is_weights=is_weights, delta=delta, ratio_level=ratio_level, surrogate=surrogate,
                                 sapo_temperatures=sapo_temperatures, kl_ratio_weighted=kl_ratio_weighted,
                                 vespo_params=vespo_params, vespo_log_is=vespo_log_is, kl_type=kl_type)
