"""Parity with verl's loss and GRPO advantages (the README's "Coming from verl"), on the same tensors.

verl is not a dependency: its formulas are transcribed below from volcengine/verl at commit
b178a3cd56f58b2d502255daba591e92833930a7, verl/trainer/ppo/core_algos.py (line numbers of that commit), as
its default (legacy, dp_actor.py) worker calls them: one micro-batch, `global_batch_info` empty. Where the
README says we differ, `test_documented_differences` pins by how much.
"""
from collections import defaultdict

import pytest
import torch

from rpo_engine.algos.grpo import ADVANTAGE_EPS, group_advantages
from rpo_engine.kernels import policy_loss

LENGTHS = [7, 1, 4, 7, 5, 2]
T = 8  # the padded response width: verl's loss_mask.shape[-1], Dr.GRPO's normaliser there


# ---- verl's side (transcribed) -------------------------------------------------------------------------------
def verl_grpo_advantage(scores, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """compute_grpo_outcome_advantage (core_algos.py:266-330): per-group mean and torch.std (unbiased),
    (r - mean) / (std + epsilon); a group of one gets mean 0, std 1."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[idx], id2std[idx] = torch.mean(torch.stack(vals)), torch.std(torch.stack(vals))
    for i in range(len(scores)):
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    return scores


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    """agg_loss (core_algos.py:1025-1081) without global batch info (dp_actor.py's call)."""
    if loss_agg_mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    if loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    if loss_agg_mode == "seq-mean-token-sum-norm":  # no mean over sequences (documented difference)
        return torch.sum(torch.sum(loss_mat * loss_mask, dim=-1)) / loss_mask.shape[-1]
    raise ValueError(loss_agg_mode)


def verl_kl(logprob, ref_logprob, kl_type):
    """kl_penalty_forward (core_algos.py:1867-1902)."""
    if kl_type in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_type == "abs":
        return (logprob - ref_logprob).abs()
    if kl_type in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)  # low_var_kl / k3
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def verl_vanilla(old_log_prob, log_prob, advantages, response_mask, agg, low, high, clip_ratio_c):
    """compute_policy_loss_vanilla (core_algos.py:1159-1250): PPO's clip plus the dual clip of A < 0."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return verl_agg_loss(pg_losses, response_mask, agg)


def verl_gspo(old_log_prob, log_prob, advantages, response_mask, low, high):
    """compute_policy_loss_gspo (core_algos.py:1253-1326): always seq-mean-token-mean."""
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    seq_importance_ratio = torch.exp(torch.clamp(log_seq_importance_ratio, max=10.0))
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - low, 1 + high)
    return verl_agg_loss(torch.maximum(pg_losses1, pg_losses2), response_mask, "seq-mean-token-mean")


def verl_sapo(old_log_prob, log_prob, advantages, response_mask, tau_pos, tau_neg):
    """compute_policy_loss_sapo (core_algos.py:1329-1411): always seq-mean-token-mean."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
    taus = torch.where(advantages > 0, torch.tensor(tau_pos), torch.tensor(tau_neg))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    return verl_agg_loss(-gates * advantages, response_mask, "seq-mean-token-mean")


# ---- the inputs ----------------------------------------------------------------------------------------------
def make_inputs(seed, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).float()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * spread  # ratios ~0.8-1.2
    logp[0, :3] = old[0, :3] + torch.tensor([1.3, -1.3, 0.05], dtype=torch.float64)  # far past either clip
    ref = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)  # inside verl's k3 clamp
    adv = torch.tensor([1.0, -0.7, 0.4, -1.2, 0.9, -0.3], dtype=torch.float64)
    adv[3] = -1.2  # row 3 with a ratio past the dual clip
    logp[3, :2] = old[3, :2] + 1.4  # ratio ~4 > clip_ratio_c 3
    return {"logp": logp.float().double(), "old": old.float().double(), "ref": ref.float().double(),
            "adv": adv, "mask": mask}


def ours(t, backend="torch", **kw):
    logp = t["logp"].float().clone().requires_grad_(True)
    loss, stats = policy_loss(logp, t["old"].float(), t["adv"].float(), t["mask"],
                              ref_logp=t["ref"].float() if kw.get("kl_coef") else None, backend=backend, **kw)
    loss.backward()
    return loss.detach().double(), logp.grad.double(), stats


def theirs(fn, t, *args, kl=None):
    logp = t["logp"].clone().requires_grad_(True)
    adv = t["adv"][:, None].expand(-1, T)  # verl's advantages are per token
    loss = fn(t["old"], logp, adv, t["mask"], *args)
    if kl is not None:  # dp_actor.py:640-648: the KL term aggregated as the loss
        kl_type, agg, coef = kl
        loss = loss + coef * verl_agg_loss(verl_kl(logp, t["ref"], kl_type), t["mask"], agg)
    loss.backward()
    return loss.detach(), logp.grad * t["mask"]


def assert_same(a, b, factor=1.0):
    torch.testing.assert_close(a[0] * factor, b[0], rtol=2e-6, atol=1e-7)
    scale = float(b[1].abs().max()) or 1.0
    torch.testing.assert_close(a[1] * factor, b[1], rtol=1e-5, atol=2e-6 * scale)


# ---- the tests -----------------------------------------------------------------------------------------------
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", AGGS)
def test_vanilla_dual_clip_matches_verl(agg, backend):
    """verl's clip_ratio_low/_high/_c (its dual clip, on by default at 3.0) = --epsilon/--epsilon-high/--delta."""
    t = make_inputs(0)
    a = ours(t, backend, eps_low=0.2, eps_high=0.28, delta=3.0, loss_agg=agg)
    b = theirs(verl_vanilla, t, agg, 0.2, 0.28, 3.0)
    assert_same(a, b)
    # the inputs reach both clips and the dual clip
    ratio = torch.exp(t["logp"] - t["old"])
    assert bool(((ratio > 3.0) & (t["adv"][:, None] < 0) & t["mask"].bool()).any())
    assert bool(((ratio > 1.28) & (t["adv"][:, None] > 0) & t["mask"].bool()).any())


@pytest.mark.parametrize("kl_type,verl_name", [("k3", "low_var_kl"), ("k1", "kl"), ("k2", "mse"), ("abs", "abs")])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_kl_loss_matches_verl(kl_type, verl_name, agg):
    """use_kl_loss + kl_loss_coef + kl_loss_type = --beta + --kl-loss-type (verl's k3 clamp not reached)."""
    t = make_inputs(1)
    a = ours(t, eps_low=0.2, eps_high=0.2, delta=3.0, loss_agg=agg, kl_coef=0.05, kl_type=kl_type)
    b = theirs(verl_vanilla, t, agg, 0.2, 0.2, 3.0, kl=(verl_name, agg, 0.05))
    assert_same(a, b)


def test_gspo_matches_verl():
    """verl's policy_loss.loss_mode=gspo = --importance-sampling-level sequence --loss-agg seq-mean-token-mean."""
    t = make_inputs(2, spread=0.002)
    a = ours(t, eps_low=3e-4, eps_high=4e-4, ratio_level="sequence", loss_agg="seq-mean-token-mean")
    b = theirs(verl_gspo, t, 3e-4, 4e-4)
    assert_same(a, b)


def test_sapo_matches_verl():
    """verl's loss_mode=sapo, tau_pos/tau_neg = --loss-type sapo, --sapo-temperature-pos/-neg."""
    t = make_inputs(3)
    a = ours(t, surrogate="sapo", sapo_temperatures=(1.0, 1.05), loss_agg="seq-mean-token-mean")
    b = theirs(verl_sapo, t, 1.0, 1.05)
    assert_same(a, b)


def test_grpo_advantages_match_verl():
    """algorithm.adv_estimator=grpo: the same unbiased std; verl's epsilon is 1e-6, ours TRL's 1e-4;
    norm_adv_by_std_in_grpo=False is --scale-rewards none."""
    g = torch.Generator().manual_seed(4)
    G = 6
    rewards = torch.cat([torch.rand(3, G, generator=g, dtype=torch.float64),
                         torch.randint(0, 2, (1, G), generator=g).double()])
    index = [i // G for i in range(rewards.numel())]
    torch.testing.assert_close(group_advantages(rewards).flatten(),
                               verl_grpo_advantage(rewards.flatten(), index, epsilon=ADVANTAGE_EPS))
    torch.testing.assert_close(group_advantages(rewards, "none").flatten(),
                               verl_grpo_advantage(rewards.flatten(), index, norm_adv_by_std_in_grpo=False))
    # at verl's own epsilon the two differ by the factor (std + 1e-4) / (std + 1e-6), at most 3e-4 here
    ratio = verl_grpo_advantage(rewards.flatten(), index) / group_advantages(rewards).flatten()
    std = rewards.std(dim=1).repeat_interleave(G)
    torch.testing.assert_close(ratio, (std + ADVANTAGE_EPS) / (std + 1e-6))


def test_documented_differences():
    """Where the README says we differ from verl, by how much."""
    t = make_inputs(0)
    rows = len(LENGTHS)
    # seq-mean-token-sum-norm: verl's agg_loss sums the micro-batch's sequences over loss_mask.shape[-1] with no
    # mean over them (dp_actor.py then divides by the micro-batches of the mini-batch), ours is Dr.GRPO's mean
    a = ours(t, eps_low=0.2, eps_high=0.2, delta=3.0, loss_agg="seq-mean-token-sum-norm", norm_length=T)
    b = theirs(verl_vanilla, t, "seq-mean-token-sum-norm", 0.2, 0.2, 3.0)
    assert_same(a, b, factor=rows)
    # low_var_kl / k3: verl clamps the estimate to [-10, 10] (no gradient past it), ours is TRL's, unclamped
    logp, ref = torch.tensor([[-5.0, -1.0]]), torch.tensor([[-1.0, -1.2]])  # ref - logp = 4: k3 = e^4 - 5 = 49.6
    assert float(verl_kl(logp, ref, "low_var_kl")[0, 0]) == 10.0
    _, stats = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), ref_logp=ref, kl_coef=1.0, backend="torch")
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    assert float(stats["kl_mean"]) == pytest.approx(float(k3.mean()), rel=1e-6)
    # a group of equal rewards: verl's (r - mean) / (std + 1e-6) is fp32 rounding noise, ours exactly 0
    rewards = torch.full((1, 8), 0.7)
    noise = verl_grpo_advantage(rewards.flatten(), [0] * 8).abs().max()
    assert noise > 0.01
    assert torch.equal(group_advantages(rewards), torch.zeros(1, 8))
    # rollout.n=1: verl's group of one keeps its raw score as advantage; we need --num-generations >= 2
    assert float(verl_grpo_advantage(torch.tensor([0.8]), [0])[0]) == pytest.approx(0.8)
