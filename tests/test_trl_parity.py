"""Numerical parity of the policy loss with TRL's GRPOTrainer, on the same tensors.

TRL's side is the real `GRPOTrainer._compute_loss`, called unbound on a stub that carries the attributes it
reads, its forward patched to return our log-probs and entropies. Our side is `policy_loss` fed the way
`Trainer.update` feeds it, through the trainer's own helpers (importance weights, off-policy mask, entropy
threshold, surrogate weights) and an `AlgoConfig` built from TRL's option names. One micro-batch, one
process, one accumulation step: where the two aggregate over other spans (the README's "Coming from TRL"),
a single micro-batch is where they must agree.

The inputs are fp32 values held in fp64: TRL computes in fp64 on them, our loss in fp32 (its kernel's dtype,
and the torch reference's), so the tolerances are fp32's, not 1e-10.

TRL is a test requirement (setup.py's `test` extra), so CI runs this; without TRL the module is skipped.
"""
import collections
import math
import types

import pytest
import torch

trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from rpo_engine.algos.grpo import group_advantages  # noqa: E402
from rpo_engine.config import AlgoConfig  # noqa: E402
from rpo_engine.kernels import policy_loss  # noqa: E402
from rpo_engine.model.shared_prefix import PrefixGroup  # noqa: E402
from rpo_engine.trainer import Trainer, at_or_above  # noqa: E402

MAX_COMPLETION_LENGTH = 9  # above the widest row: Dr.GRPO's normaliser must be this, not the padded width
LENGTHS = [7, 1, 4, 7, 5, 2]  # ragged, with a one-token row
TRUNCATED = [False, False, False, True, False, False]  # row 3 ran out of budget (--mask-truncated-completions)


# ---- TRL's side ----------------------------------------------------------------------------------------------
class _Accelerator:
    """One process: gather and reduce are the identity."""
    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor


class _TRLStub:
    """What GRPOTrainer._compute_loss reads of `self`, the forward replaced by the given tensors."""
    _compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

    def __init__(self, logp, entropies, opts):
        self._forward = (logp, entropies)
        # TRL defaults use_bias_correction_kl to True, we to False (README): each case says which it compares
        args = dict(use_bias_correction_kl=opts.get("use_bias_correction_kl", False), delta=opts.get("delta"),
                    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                    vespo_k_neg=3.0, vespo_lambda_neg=2.0, steps_per_generation=1, entropy_target=0.2)
        self.args = types.SimpleNamespace(**args)
        self.loss_type = opts.get("loss_type", "dapo")
        self.beta = opts.get("beta", 0.0)
        self.epsilon_low = opts.get("epsilon", 0.2)
        self.epsilon_high = opts.get("epsilon_high") or self.epsilon_low
        self.importance_sampling_level = opts.get("importance_sampling_level", "token")
        self.top_entropy_quantile = opts.get("top_entropy_quantile", 1.0)
        self.off_policy_mask_threshold = opts.get("off_policy_mask_threshold")
        self.use_vllm = self.vllm_importance_sampling_correction = opts.get("importance_sampling_mode") is not None
        self.entropy_coef = opts.get("entropy_coef", 0.0)
        self._entropy_bonus_enabled = self.entropy_coef != 0.0
        self.use_adaptive_entropy, self._last_world_entropy, self._entropy_window_stats = False, 0.0, None
        self.max_completion_length = MAX_COMPLETION_LENGTH
        self.current_gradient_accumulation_steps = 1
        self.aux_loss_enabled = False
        self.model = types.SimpleNamespace(training=True)
        self.accelerator = _Accelerator()
        self._metrics = collections.defaultdict(lambda: collections.defaultdict(list))

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        return *self._forward, None


def trl_importance_sampling_ratio(old_logp, sampling_logp, mask, mode, clip_max, clip_min=None):
    """TRL's vLLM importance-sampling ratio, written out from _generate_and_score_completions (inline there, so
    not callable alone): (B, T) for token_* modes, (B, 1) for sequence_* modes. clip_min None: no lower bound."""
    diff = torch.nan_to_num((old_logp - sampling_logp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), 0.0)


def trl_loss(t, opts):
    """(loss, grad wrt logp, grad wrt entropies, TRL's metrics) from the real _compute_loss."""
    logp = t["logp"].clone().requires_grad_(True)
    entropies = t["entropy"].clone().requires_grad_(True)
    mask = t["mask"].clone()
    if opts.get("mask_truncated_completions"):  # as _generate_and_score_completions masks them
        mask = mask * (~torch.tensor(TRUNCATED)).unsqueeze(1).to(mask.dtype)
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": t["adv"], "num_items_in_batch": mask.sum(), "old_per_token_logps": t["old"],
              "ref_per_token_logps": t["ref"], "sampling_per_token_logps": t["sampling"]}
    if opts.get("importance_sampling_mode"):
        inputs["importance_sampling_ratio"] = trl_importance_sampling_ratio(
            t["old"], t["sampling"], mask, opts["importance_sampling_mode"],
            opts.get("importance_sampling_clip_max", 3.0), opts.get("importance_sampling_clip_min"))
    stub = _TRLStub(logp, entropies, opts)
    loss = stub._compute_loss(None, inputs)
    grad_logp, grad_entropy = torch.autograd.grad(loss, (logp, entropies), allow_unused=True)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss.detach(), grad_logp, grad_entropy, metrics


# ---- ours ----------------------------------------------------------------------------------------------------
class _UpdateHost:
    """The Trainer methods update() feeds policy_loss through, on one rank."""
    rollout_logp_layout = staticmethod(Trainer.rollout_logp_layout)
    loss_mask = staticmethod(Trainer.loss_mask)
    importance_weights = Trainer.importance_weights
    surrogate_weights = Trainer.surrogate_weights
    off_policy_mask = Trainer.off_policy_mask
    vespo_log_is = Trainer.vespo_log_is
    entropy_threshold = Trainer.entropy_threshold

    def __init__(self, algo):
        self.algo = algo
        self.dist = types.SimpleNamespace(gather=lambda part: [part])


def algo_config(opts):
    """Our AlgoConfig from TRL's option names (the trainer's own mapping of loss_type, epsilon_high, ...)."""
    keys = ("loss_type", "epsilon", "epsilon_high", "delta", "beta", "importance_sampling_level",
            "use_bias_correction_kl", "top_entropy_quantile", "off_policy_mask_threshold",
            "mask_truncated_completions", "entropy_coef", "importance_sampling_mode", "importance_sampling_clip_max",
            "importance_sampling_clip_min", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max",
            "entropy_coef_delta", "entropy_target")
    kwargs = {k: opts[k] for k in keys if opts.get(k) is not None}
    if "importance_sampling_mode" in kwargs:
        kwargs["importance_sampling_correction"] = True
    kwargs.setdefault("loss_type", "dapo")
    kwargs.setdefault("use_bias_correction_kl", False)
    return AlgoConfig(**kwargs)


def our_loss(t, opts, backend="torch"):
    """(loss, grad wrt logp, grad wrt entropies, stats) as Trainer.update computes them for one micro-batch."""
    algo = algo_config(opts)
    host = _UpdateHost(algo)
    logp = t["logp"].clone().requires_grad_(True)
    entropy = t["entropy"].clone().requires_grad_(True)
    lengths = [int(n) for n in t["mask"].sum(-1)]
    batch = [PrefixGroup([0], [[0] * n for n in lengths], 1, advantages=t["adv"].tolist(),
                         rollout_logp=[t["sampling"][b, :n].tolist() for b, n in enumerate(lengths)],
                         trained=[not x for x in TRUNCATED] if algo.mask_truncated_completions else None)]
    mask = host.loss_mask(batch, t["mask"].bool())
    adv = torch.tensor([a for g in batch for a in g.advantages])  # fp32, as update() builds it
    old_logp, ref_logp = t["old"], t["ref"] if algo.beta > 0 else None
    is_weights = host.importance_weights(batch, old_logp, mask) if algo.importance_sampling_correction else None
    keep = None
    if algo.top_entropy_quantile < 1:
        masked_entropy = entropy.detach().masked_fill(~mask, math.nan)
        keep = at_or_above(masked_entropy, host.entropy_threshold([(batch, True)], [masked_entropy]))
    weights, _ = host.surrogate_weights(batch, logp, mask, adv, is_weights, keep)
    loss, stats = policy_loss(
        logp, old_logp, adv, mask, ref_logp=ref_logp, eps_low=algo.epsilon, eps_high=algo.loss_eps_high,
        kl_coef=algo.beta, loss_agg=algo.loss_agg, norm_length=MAX_COMPLETION_LENGTH, is_weights=weights,
        delta=algo.delta, ratio_level=algo.importance_sampling_level, surrogate=algo.surrogate,
        sapo_temperatures=(algo.sapo_temperature_pos, algo.sapo_temperature_neg),
        kl_ratio_weighted=algo.use_bias_correction_kl, kl_type=algo.kl_loss_type,
        vespo_params=(algo.vespo_k_pos, algo.vespo_lambda_pos, algo.vespo_k_neg, algo.vespo_lambda_neg),
        vespo_log_is=host.vespo_log_is(is_weights, mask), backend=backend)
    objective = loss  # one micro-batch: its share of the step is 1
    if algo.entropy_bonus:
        tokens = mask if keep is None else mask & keep
        objective = objective - algo.entropy_coef * (entropy * tokens).sum() / max(1, int(tokens.sum()))
    grad_logp, grad_entropy = torch.autograd.grad(objective, (logp, entropy), allow_unused=True)
    return objective.detach(), grad_logp, grad_entropy, {k: float(v) for k, v in stats.items()}


# ---- inputs --------------------------------------------------------------------------------------------------
def make_inputs(seed, zero_advantage=True):
    """fp32 values in fp64 tensors: log-probs, old (ratios past the clip range both ways), reference, rollout
    log-probs, entropies, advantages of both signs and one zero (zero_advantage; ours leaves zero-advantage
    samples out of the entropy quantile, TRL does not: README), a right-padded ragged mask."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()

    def rand(scale=1.0):
        return (torch.randn(B, T, generator=g) * scale).double()

    logp = -rand().abs() - 0.05
    old = logp + rand(0.35)
    sampling = old + rand(0.25)
    ref = logp + rand(0.5)
    entropy = torch.rand(B, T, generator=g).double() * 2
    adv = torch.randn(B, generator=g).double()
    adv = torch.where(adv.abs() < 0.05, 0.5, adv)
    adv[:3] = torch.tensor([0.8, -0.6, -0.9], dtype=torch.float64)  # both signs certain
    if zero_advantage:
        adv[4] = 0.0
    pad = mask == 0  # padding holds garbage, as a padded forward's does
    return {"logp": logp.masked_fill(pad, -30.0), "old": old.masked_fill(pad, 0.0), "ref": ref.masked_fill(pad, 7.0),
            "sampling": sampling.masked_fill(pad, 0.0), "entropy": entropy.masked_fill(pad, 0.0), "adv": adv,
            "mask": mask}


SEEDS = (0, 1)
CLIP_MIN = 0.8  # high enough that every mode floors some ratios here (test_importance_sampling_cases_cap_some_ratios)
CASES = {
    **{f"{lt}": {"loss_type": lt} for lt in ("grpo", "bnpo", "dapo", "dr_grpo", "sapo", "luspo", "vespo", "cispo")},
    "dapo-asymmetric": {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28},
    **{f"{lt}-sequence": {"loss_type": lt, "importance_sampling_level": "sequence", "epsilon": 0.1,
                          "epsilon_high": 0.15} for lt in ("grpo", "dapo", "luspo")},
    "sapo-sequence": {"loss_type": "sapo", "importance_sampling_level": "sequence"},
    "grpo-delta": {"loss_type": "grpo", "delta": 1.5},
    "dapo-delta-sequence": {"loss_type": "dapo", "delta": 1.2, "importance_sampling_level": "sequence",
                            "epsilon": 0.1, "epsilon_high": 0.15},
    "grpo-k3": {"loss_type": "grpo", "beta": 0.1},
    "grpo-k3-bias-corrected": {"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": True},
    "dapo-k3-sequence": {"loss_type": "dapo", "beta": 0.05, "importance_sampling_level": "sequence"},
    "cispo-k3-bias-corrected": {"loss_type": "cispo", "beta": 0.1, "use_bias_correction_kl": True},
    **{f"{lt}-k3-bias-corrected": {"loss_type": lt, "beta": 0.1, "use_bias_correction_kl": True}
       for lt in ("vespo", "sapo", "dr_grpo", "luspo")},
    **{f"{lt}-entropy-quantile": {"loss_type": lt, "top_entropy_quantile": 0.37} for lt in ("grpo", "dapo")},
    "dapo-entropy-quantile-bonus": {"loss_type": "dapo", "top_entropy_quantile": 0.37, "entropy_coef": 0.01},
    **{f"{lt}-entropy-bonus": {"loss_type": lt, "entropy_coef": 0.02} for lt in ("grpo", "dr_grpo", "vespo")},
    **{f"{lt}-mask-truncated": {"loss_type": lt, "mask_truncated_completions": True}
       for lt in ("bnpo", "dapo", "cispo", "vespo")},
    **{f"{lt}-off-policy-mask": {"loss_type": lt, "off_policy_mask_threshold": 0.05} for lt in ("grpo", "dapo")},
    **{f"dapo-is-{mode}": {"loss_type": "dapo", "importance_sampling_mode": mode}
       for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
    **{f"vespo-is-{mode}": {"loss_type": "vespo", "importance_sampling_mode": mode}
       for mode in ("token_mask", "sequence_truncate")},
    # with a floor (TRL's vllm_importance_sampling_clip_min): truncate raises the ratios below it, mask zeroes them
    **{f"dapo-is-{mode}-clip-min": {"loss_type": "dapo", "importance_sampling_mode": mode,
                                    "importance_sampling_clip_min": CLIP_MIN}
       for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
    **{f"vespo-is-{mode}-clip-min": {"loss_type": "vespo", "importance_sampling_mode": mode,
                                     "importance_sampling_clip_min": CLIP_MIN}
       for mode in ("token_truncate", "token_mask")},  # TRL's VESPO takes the token modes only
    "dapo-entropy-quantile-mask-truncated": {"loss_type": "dapo", "top_entropy_quantile": 0.37,
                                             "mask_truncated_completions": True},
    "vespo-is-mask-truncated": {"loss_type": "vespo", "importance_sampling_mode": "token_truncate",
                                "mask_truncated_completions": True},
    "grpo-sequence-everything": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.1,
                                 "epsilon_high": 0.15, "beta": 0.04, "delta": 1.2, "top_entropy_quantile": 0.5,
                                 "off_policy_mask_threshold": 0.05, "importance_sampling_mode": "sequence_mask"},
    "grpo-everything": {"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": True, "delta": 1.6,
                        "top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.05, "entropy_coef": 0.01,
                        "importance_sampling_mode": "token_truncate"},
}
for _opts in CASES.values():
    if _opts["loss_type"] == "cispo":  # the cap itself (TRL recommends 5.0); ours must be given it
        _opts.setdefault("epsilon_high", 1.3)
    if "importance_sampling_mode" in _opts:  # low enough that every mode caps some ratios here
        _opts.setdefault("importance_sampling_clip_max", 1.3)


def case_inputs(opts, seed):
    return make_inputs(seed, zero_advantage=opts.get("top_entropy_quantile", 1.0) == 1.0)


def assert_grads_close(ours, theirs):
    scale = float(theirs.abs().max()) or 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6 * scale)


def assert_same(ours, theirs, mask, entropy_bonus):
    loss, grad, grad_entropy, _ = ours
    trl_value, trl_grad, trl_grad_entropy, _ = theirs
    torch.testing.assert_close(loss.double(), trl_value, rtol=2e-6, atol=1e-7)
    assert_grads_close(grad, torch.where(mask.bool(), trl_grad, 0.0))  # TRL's padding may get a gradient of 0 * x
    assert bool((grad[mask == 0] == 0).all())
    if entropy_bonus:
        assert_grads_close(grad_entropy, trl_grad_entropy)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradient_match_trl(name, backend):
    opts = CASES[name]
    for seed in SEEDS:
        t = case_inputs(opts, seed)
        ours, theirs = our_loss(t, opts, backend), trl_loss(t, opts)
        assert_same(ours, theirs, t["mask"], opts.get("entropy_coef"))
        stats, metrics = ours[3], theirs[3]
        # TRL's clip fractions count sequences at the sequence level, and leave delta's cap out (README)
        if "clip_ratio/low_mean" in metrics and opts.get("importance_sampling_level") != "sequence" \
                and opts.get("delta") is None:
            assert stats["clip_low_frac"] == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-6)
            assert stats["clip_high_frac"] == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-6)
            assert stats["clip_frac"] == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-6)
        if "cispo_clip_ratio" in metrics:
            assert stats["clip_high_frac"] == pytest.approx(metrics["cispo_clip_ratio"], abs=1e-6)
        if "kl" in metrics and not opts.get("use_bias_correction_kl"):  # TRL logs the ratio-weighted KL then
            assert stats["kl_mean"] == pytest.approx(metrics["kl"], rel=1e-5)


@pytest.mark.parametrize("name", [n for n, o in CASES.items() if len(o) > 1])
def test_cases_exercise_their_options(name):
    """Each option of a case changes TRL's gradient on these inputs (else the parity above would not test it),
    and the clip cases clip on both sides."""
    opts = CASES[name]
    for option in [k for k in opts if k not in ("loss_type", "epsilon", "epsilon_high")]:
        changed = False
        for seed in SEEDS:
            t = case_inputs(opts, seed)
            without = {k: v for k, v in opts.items() if k != option}
            if option == "beta":
                without.pop("use_bias_correction_kl", None)
            (loss, grad, grad_entropy, _), (loss_without, grad_without, _, _) = trl_loss(t, opts), trl_loss(t, without)
            changed |= not (torch.allclose(grad, grad_without) and torch.allclose(loss, loss_without))
            changed |= option == "entropy_coef" and bool(grad_entropy.abs().sum() > 0)
        assert changed, option


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_importance_sampling_cases_cap_some_ratios(mode):
    for seed in SEEDS:
        t = make_inputs(seed)
        ratio = trl_importance_sampling_ratio(t["old"], t["sampling"], t["mask"], mode, math.inf)
        assert bool((ratio > 1.3).any()) and bool((ratio < 1.3).any())
        # and some below the clip-min cases' lower bound, some between the two bounds
        assert bool((ratio < CLIP_MIN).any()) and bool(((ratio > CLIP_MIN) & (ratio < 1.3)).any())


def test_clip_cases_clip_on_both_sides():
    for opts in ({"loss_type": "grpo"}, {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                           "epsilon": 0.1, "epsilon_high": 0.15}):
        metrics = [trl_loss(case_inputs(opts, seed), opts)[3] for seed in SEEDS]
        assert max(m["clip_ratio/low_mean"] for m in metrics) > 0
        assert max(m["clip_ratio/high_mean"] for m in metrics) > 0


def test_documented_differences():
    """Where the README says we differ, by how much: the relation each side's numbers keep."""
    t = make_inputs(0)
    mask, B = t["mask"].bool(), len(LENGTHS)
    # --mask-truncated-completions: the masked completions leave the row count of the per-sequence means too
    # (TRL's grpo, sapo, dr_grpo and luspo still divide by every completion of the batch)
    kept = B - sum(TRUNCATED)
    for loss_type in ("grpo", "sapo", "dr_grpo", "luspo"):
        opts = {"loss_type": loss_type, "mask_truncated_completions": True}
        (loss, grad, _, _), (trl_value, trl_grad, _, _) = our_loss(t, opts), trl_loss(t, opts)
        torch.testing.assert_close(loss.double() * kept / B, trl_value, rtol=2e-6, atol=1e-7)
        assert_grads_close(grad * kept / B, torch.where(mask, trl_grad, 0.0))
    # GSPO's clip fractions: ours count the clipped rows' tokens, TRL's the clipped rows
    opts = {"loss_type": "dapo", "importance_sampling_level": "sequence", "epsilon": 0.1, "epsilon_high": 0.15}
    stats, metrics = our_loss(t, opts)[3], trl_loss(t, opts)[3]
    ratio = torch.exp(((t["logp"] - t["old"]) * mask).sum(-1) / mask.sum(-1))
    low = (ratio < 0.9) & (t["adv"] < 0)
    assert low.any() and not low.all()
    assert metrics["clip_ratio/low_mean"] == pytest.approx(float(low.double().mean()))
    assert stats["clip_low_frac"] == pytest.approx(float((low * mask.sum(-1)).sum() / mask.sum()))
    # delta: a negative advantage's ratio past it counts as clipped high here, not in TRL
    opts = {"loss_type": "grpo", "delta": 1.5}
    stats, metrics = our_loss(t, opts)[3], trl_loss(t, opts)[3]
    capped = float(((torch.exp(t["logp"] - t["old"]) > 1.5) & (t["adv"] < 0)[:, None] & mask).sum() / mask.sum())
    assert capped > 0
    assert stats["clip_high_frac"] == pytest.approx(metrics["clip_ratio/high_mean"] + capped, abs=1e-6)
    # use_bias_correction_kl: TRL logs the ratio-weighted KL, we the estimator's own mean
    opts = {"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": True}
    stats, metrics = our_loss(t, opts)[3], trl_loss(t, opts)[3]
    x = t["ref"] - t["logp"]
    k3 = torch.exp(x) - x - 1
    assert stats["kl_mean"] == pytest.approx(float(k3[mask].mean()), rel=1e-5)
    assert metrics["kl"] == pytest.approx(float((k3 * torch.exp(t["logp"] - t["old"]))[mask].mean()), rel=1e-9)


def trl_advantages(rewards, G, scale_rewards):
    """TRL's sum_then_normalize advantages, written out from _generate_and_score_completions (inline there):
    rewards [N * G] -> [N * G]."""
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    advantages = rewards - mean
    return advantages if scale_rewards == "none" else advantages / (std + 1e-4)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(scale_rewards):
    g = torch.Generator().manual_seed(3)
    G = 6  # 5 groups
    rewards = torch.cat([torch.rand(3, G, generator=g, dtype=torch.float64),
                         torch.randint(0, 2, (1, G), generator=g).double(),
                         torch.full((1, G), 1.0, dtype=torch.float64)])  # a group without signal: 0 both sides
    ours = group_advantages(rewards, scale_rewards)
    # fp64 rewards, but TRL's nanstd takes Bessel's count / (count - 1) of integer counts, in fp32: 1e-7
    torch.testing.assert_close(ours.flatten(), trl_advantages(rewards.flatten(), G, scale_rewards),
                               rtol=1e-7, atol=1e-12)
    assert torch.equal(ours[-1], torch.zeros(G, dtype=torch.float64))


@pytest.mark.parametrize("last_entropy", [math.inf, 0.5, 0.7, 2.0])  # the first step; below, at (0.7) or above a target
def test_adaptive_entropy_matches_trl(last_entropy):
    """use_adaptive_entropy: the bonus applied (gated by the entropy of the step before) and the coefficient's
    move after the step, from TRL's _compute_loss and from Trainer.adapt_entropy_coef."""
    t = make_inputs(0, zero_advantage=False)
    control = {"entropy_coef": 0.05, "entropy_coef_min": 0.01, "entropy_coef_max": 0.3, "entropy_coef_delta": 0.02,
               "entropy_target": 1.0}
    for target in (0.7, 1.5):  # the inputs' entropy (~1) above, then below the target
        control["entropy_target"] = target
        opts = {"loss_type": "grpo", "top_entropy_quantile": 0.37}
        # TRL
        logp = t["logp"].clone().requires_grad_(True)
        entropy = t["entropy"].clone().requires_grad_(True)
        stub = _TRLStub(logp, entropy, {**opts, "entropy_coef": control["entropy_coef"]})
        stub.use_adaptive_entropy, stub._entropy_bonus_enabled, stub._last_world_entropy = True, True, last_entropy
        for key in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
            setattr(stub.args, key, control[key])
        trl_value = stub._compute_loss(None, {
            "prompt_ids": torch.zeros(len(LENGTHS), 1, dtype=torch.long),
            "prompt_mask": torch.ones(len(LENGTHS), 1, dtype=torch.long),
            "completion_ids": torch.zeros_like(t["mask"]), "completion_mask": t["mask"], "advantages": t["adv"],
            "num_items_in_batch": t["mask"].sum(), "old_per_token_logps": t["old"]})
        trl_grad = torch.autograd.grad(trl_value, entropy)[0]
        # ours: update()'s gate and bonus, then adapt_entropy_coef on the step's (kept) tokens
        algo = algo_config({**opts, **control, "use_adaptive_entropy": True})
        host = _UpdateHost(algo)
        host.entropy_coef, host.last_entropy = algo.entropy_coef, last_entropy
        mask = t["mask"].bool()
        masked_entropy = t["entropy"].masked_fill(~mask, math.nan)
        batch = [PrefixGroup([0], [[0] * n for n in LENGTHS], 1, advantages=t["adv"].tolist())]
        tokens = mask & at_or_above(masked_entropy, host.entropy_threshold([(batch, True)], [masked_entropy]))
        entropy = t["entropy"].clone().requires_grad_(True)
        coef = Trainer.bonus_coef(host)
        bonus = -coef * (entropy * tokens).sum() / int(tokens.sum())
        grad = torch.autograd.grad(bonus, entropy, allow_unused=True)[0]
        assert_grads_close(torch.zeros_like(entropy) if grad is None else grad, trl_grad)
        Trainer.adapt_entropy_coef(host, float((t["entropy"] * tokens).sum()), int(tokens.sum()))
        assert host.entropy_coef == pytest.approx(stub.entropy_coef, abs=1e-12)
        assert host.last_entropy == pytest.approx(stub._last_world_entropy, rel=1e-12)
