"""Kernels against fp64 naive references: values and gradients, every backend, odd shapes.

Triton runs through the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are
small but odd: vocab 331 is 3 vocab tiles of 128 with a ragged last one, hidden 48 is 2 ragged tiles
of 32, 37 tokens are 2 ragged token blocks. A small chunk_numel forces several chunks: the backward
chunks the vocabulary when N <= V and the tokens when N > V, so shapes of both kinds appear.
With RPO_TEST_DEVICE=cuda every tensor is made on the GPU and the Triton kernels run compiled.
"""
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rpo_engine.kernels import (entropy_reference, fused_logprobs, logprobs_reference, policy_loss,
                                policy_loss_reference)
from tests.helpers import DEVICE, ON_CUDA

pytestmark = pytest.mark.gpu

BACKENDS = ["torch", "triton"]
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum"]


@pytest.fixture(autouse=True)
def _tensors_on_test_device():
    with torch.device(DEVICE):  # every factory call below (randn, full, tensor, ...) makes its tensor there
        yield


def _lm_inputs(n, h, v, dtype=torch.float32):
    hidden = torch.randn(n, h)  # [N, H]
    weight = torch.randn(v, h) / math.sqrt(h) * 3  # [V, H], logits of a few units, like a trained head
    targets = torch.randint(0, v, (n,))  # [N]
    return hidden.to(dtype), weight.to(dtype), targets


def _fp64_reference(hidden, weight, targets, temperature, grad_out):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp = logprobs_reference(h, w, targets, temperature)
    logp.backward(grad_out.double())
    return logp.detach(), h.grad, w.grad


def _ours(hidden, weight, targets, temperature, grad_out, backend, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp = fused_logprobs(h, w, targets, temperature, backend=backend, **kw)
    logp.backward(grad_out)
    return logp.detach(), h.grad, w.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _scaled_err(a, b):
    """Max error relative to 1 + |reference|. fp32 rounding grows with the value (a log-prob of -19 has an
    ulp of 2e-6, and the logit behind it sums 48 rounded products), and about one process in 100 torch's CPU
    logsumexp errs by 3-4e-5 on one row of the same inputs (seen in CI and here; the same call again in that
    process is exact to 2e-8), so the bound is 1e-4 (FP32_TOL). Bugs err by more: a temperature off by
    0.1% by 9e-4 to 2e-3 (values, gradients), a dropped vocab tile by 0.17."""
    return ((a.double() - b.double()).abs() / (1 + b.double().abs())).max().item()


FP32_TOL = 1e-4


# ---- fused_logprobs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v,temperature,chunk_numel", [
    (37, 48, 331, 1.0, 37 * 128),  # 3 vocab chunks in backward, 3 token chunks in the torch forward
    (37, 48, 331, 0.7, None),      # default chunking (one chunk), temperature < 1
    (1, 48, 331, 1.7, None),       # a single token
    (20, 16, 128, 1.0, 20 * 50),   # vocab an exact multiple of the tile; vocab chunks 50, 50, 28
    (150, 16, 67, 1.3, 40 * 67),   # N > V: token chunks 40, 40, 40, 30; vocab smaller than one tile
])
def test_logprobs_fp32_matches_fp64(backend, n, h, v, temperature, chunk_numel):
    hidden, weight, targets = _lm_inputs(n, h, v)
    grad_out = torch.randn(n)  # [N]
    ref, ref_gh, ref_gw = _fp64_reference(hidden, weight, targets, temperature, grad_out)
    logp, gh, gw = _ours(hidden, weight, targets, temperature, grad_out, backend, chunk_numel=chunk_numel)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert _scaled_err(logp, ref) < FP32_TOL
    assert _scaled_err(gh, ref_gh) < FP32_TOL
    assert _scaled_err(gw, ref_gw) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_leading_dims_and_weight_only_grad(backend):
    hidden, weight, targets = _lm_inputs(3 * 7, 48, 331)
    hidden, targets = hidden.reshape(3, 7, 48), targets.reshape(3, 7)  # [B, T, H], [B, T]
    w = weight.clone().requires_grad_()
    logp = fused_logprobs(hidden, w, targets, 1.3, backend=backend, chunk_numel=21 * 100)  # hidden has no grad
    assert logp.shape == (3, 7)
    grad_out = torch.randn(3, 7)
    logp.backward(grad_out)
    ref, _, ref_gw = _fp64_reference(hidden.reshape(21, 48), weight, targets.reshape(21), 1.3, grad_out.reshape(21))
    assert _scaled_err(logp.detach().reshape(21), ref) < FP32_TOL
    assert _scaled_err(w.grad, ref_gw) < FP32_TOL


def _fp64_with_entropy(hidden, weight, targets, temperature, grad_logp, grad_entropy):
    """logp, entropy and the gradients of sum(grad_logp * logp + grad_entropy * entropy), in fp64."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp = logprobs_reference(h, w, targets, temperature)
    entropy = entropy_reference(h, w, temperature)
    objective = entropy.mul(grad_entropy.double()).sum()
    if grad_logp is not None:
        objective = objective + logp.mul(grad_logp.double()).sum()
    objective.backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def _ours_with_entropy(hidden, weight, targets, temperature, grad_logp, grad_entropy, backend, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, entropy = fused_logprobs(h, w, targets, temperature, backend=backend, return_entropy=True, **kw)
    assert entropy.dtype == torch.float32 and entropy.shape == targets.shape and entropy.requires_grad
    objective = entropy.mul(grad_entropy).sum()
    if grad_logp is not None:  # else logp takes no part: its gradient reaches the backward as None
        objective = objective + logp.mul(grad_logp).sum()
    objective.backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v,temperature,chunk_numel,with_logp", [
    (37, 48, 331, 0.8, 16 * 331, True),  # vocab chunks in the backward, temperature < 1
    (37, 48, 331, 1.0, None, False),     # the entropy alone has a gradient
    (1, 48, 331, 1.7, None, True),       # a single token
    (150, 16, 67, 1.3, 40 * 67, True),   # N > V: token chunks
])
def test_entropy_values_and_gradients_match_fp64(backend, n, h, v, temperature, chunk_numel, with_logp):
    hidden, weight, targets = _lm_inputs(n, h, v)
    grad_logp = torch.randn(n) if with_logp else None  # [N]
    grad_entropy = torch.randn(n)  # [N]
    ref = _fp64_with_entropy(hidden, weight, targets, temperature, grad_logp, grad_entropy)
    ours = _ours_with_entropy(hidden, weight, targets, temperature, grad_logp, grad_entropy, backend,
                              chunk_numel=chunk_numel)
    for a, b in zip(ours, ref):  # logp, entropy, grad_hidden, grad_weight
        assert _scaled_err(a, b) < FP32_TOL
    # the entropy term is really in the gradient: without it the gradient is far off
    _, _, gh_logp_only, _ = _fp64_with_entropy(hidden, weight, targets, temperature, grad_logp, grad_entropy * 0)
    assert _scaled_err(ours[2], gh_logp_only) > 100 * FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_without_grad_is_a_plain_value(backend):
    hidden, weight, targets = _lm_inputs(37, 48, 331)
    with torch.no_grad():
        logp, entropy = fused_logprobs(hidden, weight, targets, 0.8, backend=backend, return_entropy=True)
    assert not entropy.requires_grad and not logp.requires_grad
    assert _scaled_err(entropy, entropy_reference(hidden.double(), weight.double(), 0.8)) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_confident_rows_keeps_its_precision(backend):
    # Logits near 40 with the target 14-30 nats ahead: H is 1e-9..1e-4, and lse - E_p[x] taken on the
    # raw logits cancels it away in fp32 (the Triton forward gave 0 on half of these rows).
    n, h, v = 32, 48, 600
    hidden, weight = torch.zeros(n, h, dtype=torch.float64), torch.zeros(v, h, dtype=torch.float64)
    hidden[:, 0], weight[:, 0] = 1.0, 40.0  # a common offset
    hidden[:, 1], weight[:, 1] = 1.0, torch.randn(v, dtype=torch.float64)  # a spread
    targets = torch.randint(0, v, (n,))
    hidden[torch.arange(n), 2 + torch.arange(n)] = torch.linspace(14, 30, n, dtype=torch.float64)
    weight[targets, 2 + torch.arange(n)] = 1.0
    exact = entropy_reference(hidden, weight)
    _, entropy = fused_logprobs(hidden.float(), weight.float(), targets, backend=backend, return_entropy=True)
    rel = (entropy.double() - exact).abs() / exact
    assert bool((entropy > 0).all()) and float(rel.median()) < 1e-2, (entropy, exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_bf16_within_reference_error(backend):
    n, h, v = 37, 48, 331
    hidden, weight, targets = _lm_inputs(n, h, v, torch.bfloat16)
    grad_logp, grad_entropy = torch.randn(n), torch.randn(n)
    _, exact_ent, exact_gh, exact_gw = _fp64_with_entropy(hidden, weight, targets, 1.0, grad_logp, grad_entropy)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()  # the naive path in bf16
    naive_ent = entropy_reference(hr, wr)
    (naive_ent * grad_entropy).sum().add((logprobs_reference(hr, wr, targets) * grad_logp).sum()).backward()
    _, ent, gh, gw = _ours_with_entropy(hidden, weight, targets, 1.0, grad_logp, grad_entropy, backend,
                                        chunk_numel=n * 128)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    for ours, ref_bf16, ex in ((ent, naive_ent.detach(), exact_ent), (gh, hr.grad, exact_gh), (gw, wr.grad, exact_gw)):
        err_ref = _max_err(ref_bf16, ex)
        assert err_ref > 0
        assert _max_err(ours, ex) <= 2 * err_ref + 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v,chunk_numel", [(37, 48, 331, 37 * 128), (150, 16, 67, 40 * 67)])
def test_logprobs_bf16_within_reference_error(backend, n, h, v, chunk_numel):
    _check_bf16_within_reference_error(backend, n, h, v, chunk_numel)


@pytest.mark.skipif(not ON_CUDA, reason="production shapes: run with RPO_TEST_DEVICE=cuda")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h", [1536, 3584])  # Qwen2.5-1.5B's and 7B's hidden size, their 151,936-token vocab
def test_logprobs_bf16_production_shapes(backend, h):
    _check_bf16_within_reference_error(backend, 2048, h, 151936, None)


def _check_bf16_within_reference_error(backend, n, h, v, chunk_numel):
    hidden, weight, targets = _lm_inputs(n, h, v, torch.bfloat16)
    grad_out = torch.randn(n)
    # Exact answer for these bf16 values, and how far the naive bf16 reference is from it: bf16 logits
    # carry ~2^-9 relative rounding and bf16 gradients another, so that measured error (not a guess)
    # sets the bar. Ours may round differently (fp32 logits in Triton, fp32 grad_weight accumulation),
    # so it must be within 2x the reference's own error plus a hair.
    exact, exact_gh, exact_gw = _fp64_reference(hidden, weight, targets, 1.0, grad_out)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    naive = logprobs_reference(h, w, targets)
    naive.backward(grad_out)
    logp, gh, gw = _ours(hidden, weight, targets, 1.0, grad_out, backend, chunk_numel=chunk_numel)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    for ours, ref_bf16, ex in ((logp, naive.detach(), exact), (gh, h.grad, exact_gh), (gw, w.grad, exact_gw)):
        err_ref = _max_err(ref_bf16, ex)
        assert err_ref > 0  # the measurement is real
        assert _max_err(ours, ex) <= 2 * err_ref + 1e-4


class _MaxBytes(TorchDispatchMode):
    """Records the largest tensor (in bytes) any aten op produces, the interpreter's host copies included."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v", [(64, 16, 331), (300, 16, 50)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_logprobs_never_materializes_full_logits(backend, n, h, v, with_entropy):
    chunk_numel = 32 * max(n, v)
    hidden, weight, targets = _lm_inputs(n, h, v)
    hidden.requires_grad_()
    weight.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), _MaxBytes() as mode:
        out = fused_logprobs(hidden, weight, targets, backend=backend, chunk_numel=chunk_numel,
                             return_entropy=with_entropy)
        (out[0] + 0.1 * out[1] if with_entropy else out).sum().backward()
    # Saved for backward: the inputs plus O(N) (the fp32 lse, the entropy). Transient: one fp32 logits
    # chunk (the entropy's gradient: two of half the size), or an [N, H] / [V, H] gradient; never the
    # [N, V] logits.
    assert all(t.data_ptr() in (hidden.data_ptr(), weight.data_ptr()) or t.numel() <= n for t in saved)
    assert mode.max_bytes <= 4 * max(chunk_numel, v * h, n * h) < 4 * n * v


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_bad_inputs(backend):
    hidden, weight, targets = _lm_inputs(5, 8, 11)
    cases = [
        (dict(targets=targets[:4]), "targets"),
        (dict(targets=targets.float()), "integer"),
        (dict(targets=torch.full((5,), 11)), r"\[0, 11\)"),
        (dict(targets=torch.full((5,), -1)), r"\[0, 11\)"),
        (dict(weight=torch.randn(11, 9)), "hidden dim"),
        (dict(weight=weight.double()), "dtype"),
        (dict(hidden=torch.randn(8)), "hidden"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=torch.tensor(0.8, requires_grad=True)), "constant"),  # its grad would be dropped
        (dict(backend="cuda"), "backend"),
    ]
    for override, match in cases:
        args = dict(hidden=hidden, weight=weight, targets=targets, temperature=1.0, backend=backend) | override
        with pytest.raises(ValueError, match=match):
            fused_logprobs(**args)


def test_logprobs_auto_is_triton_on_cuda_else_torch():
    # bf16: the two backends round differently here (in fp32 at these sizes they agree bit for bit, and
    # "auto" picking the other one went unnoticed)
    hidden, weight, targets = _lm_inputs(9, 16, 50, dtype=torch.bfloat16)
    picked, other = ("triton", "torch") if ON_CUDA else ("torch", "triton")
    auto = fused_logprobs(hidden, weight, targets, backend="auto")
    assert torch.equal(auto, fused_logprobs(hidden, weight, targets, backend=picked))
    assert not torch.equal(auto, fused_logprobs(hidden, weight, targets, backend=other))


# ---- policy_loss ------------------------------------------------------------------------------------

def _naive_policy_loss(logp, old_logp, adv, mask, ref_logp, eps_low, eps_high, kl_coef, loss_agg, norm_length,
                       is_weights=None, delta=None, level="token", surrogate="clip", sapo_temperatures=(1.0, 1.05),
                       bias_correction_kl=False, vespo_params=(2.0, 3.0, 3.0, 2.0), vespo_log_is=None, kl_type="k3"):
    """Row by row, as TRL's GRPOTrainer._compute_loss writes it: the log importance weight per token, or per
    sequence (the masked mean, GSPO), coef_1 = exp of it capped at delta, coef_2 = clip(exp of it),
    -min(coef_1 A, coef_2 A) (times the IS weight) + kl_coef k3, then the mode's means."""
    rows, all_tokens = [], []
    for b in range(logp.shape[0]):
        m = mask[b].bool()
        if not m.any():
            continue
        log_w = logp[b][m] - old_logp[b][m]
        if level == "sequence":
            log_w = log_w.mean().expand(int(m.sum()))
        log_w = torch.clamp(log_w, -20, 20)  # verl's guard: exp never overflows (TRL has none)
        coef_2 = torch.clamp(torch.exp(log_w), 1 - eps_low, 1 + eps_high)
        coef_1 = torch.exp(log_w) if delta is None else torch.clamp(torch.exp(log_w), max=delta)
        tok = -torch.min(coef_1 * adv[b], coef_2 * adv[b])
        if surrogate == "cispo":  # TRL's cispo: -sg(min(coef_1, cap)) * A * logp (its cap: our 1 + eps_high)
            tok = -torch.clamp(torch.exp(log_w), max=1 + eps_high).detach() * adv[b] * logp[b][m]
        if surrogate == "sapo":  # TRL's sapo: -sigmoid(tau (coef_1 - 1)) * 4 / tau * A, tau by the sign of A
            tau = sapo_temperatures[0] if adv[b] > 0 else sapo_temperatures[1]
            tok = -torch.sigmoid(tau * (torch.exp(log_w) - 1)) * 4 / tau * adv[b]
        if surrogate == "vespo":  # TRL's get_gamma_weights, then -phi * A * logp
            k_pos, lambda_pos, k_neg, lambda_neg = vespo_params
            seq_log_ratio = torch.clamp(logp[b][m] - old_logp[b][m], -20, 20).sum()
            if vespo_log_is is not None:  # TRL: the rollout's log importance ratio added before the clamp
                seq_log_ratio = seq_log_ratio + vespo_log_is[b]
            log_w_seq = torch.clamp(seq_log_ratio, math.log(1e-8), 20)
            k, lam = (k_pos, lambda_pos) if adv[b] >= 0 else (k_neg, lambda_neg)
            phi = torch.exp(lam + k * log_w_seq - lam * torch.exp(log_w_seq)).detach()
            tok = -phi * adv[b] * logp[b][m]
        if is_weights is not None:
            tok = tok * is_weights[b][m]
        if ref_logp is not None:
            d = torch.clamp(ref_logp[b][m] - logp[b][m], -20, 20)
            kl = torch.exp(d) - d - 1
            x = logp[b][m] - ref_logp[b][m]  # verl's kl_penalty: kl (k1), mse (k2), abs
            kl = {"k3": kl, "k1": x, "k2": 0.5 * x.square(), "abs": x.abs()}[kl_type]
            if bias_correction_kl:  # TRL's use_bias_correction_kl: per_token_kl * coef_1 (before delta's cap)
                kl = kl * torch.exp(log_w)
            tok = tok + kl_coef * kl
        all_tokens.append(tok)
        rows.append({"token-mean": tok.sum(), "seq-mean-token-mean": tok.mean(),
                     "seq-mean-token-sum-norm": tok.sum() / (norm_length or logp.shape[1]),
                     "seq-mean-token-sum": tok.sum()}[loss_agg])  # TRL's luspo: (loss * mask).sum(-1).mean()
    if not rows:
        return logp.sum() * 0.0
    if loss_agg == "token-mean":
        return torch.cat(all_tokens).sum() / sum(t.numel() for t in all_tokens)
    return torch.stack(rows).mean()


def _naive_stats(logp, old_logp, adv, mask, ref_logp, eps_low, eps_high):
    m = mask.bool()
    ratio = torch.exp(logp - old_logp)[m]
    a = adv[:, None].expand_as(logp)[m]
    n = max(int(m.sum()), 1)
    low = ((ratio < 1 - eps_low) & (a < 0)).sum().item() / n
    high = ((ratio > 1 + eps_high) & (a > 0)).sum().item() / n
    kl = 0.0
    if ref_logp is not None:
        d = (ref_logp - logp)[m]
        kl = (torch.exp(d) - d - 1).sum().item() / n
    return {"clip_low_frac": low, "clip_high_frac": high, "clip_frac": low + high, "kl_mean": kl,
            "ratio_mean": ratio.sum().item() / n}


def _policy_inputs(b=6, t=13):
    logp = torch.randn(b, t) * 0.5 - 1.5  # [B, T]
    old_logp = logp + torch.randn(b, t) * 0.3  # ratios spread across both clip bounds
    ref_logp = logp + torch.randn(b, t) * 0.2
    adv = torch.randn(b)  # [B]
    mask = torch.rand(b, t) > 0.3  # [B, T]
    mask[1] = False  # a row without tokens
    mask[-1, :2] = False  # a cached prefix
    adv[-2] = 0.0  # a group whose rewards were all equal
    return logp, old_logp, ref_logp, adv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("with_is", [False, True])
def test_policy_loss_matches_naive(backend, loss_agg, with_ref, with_is):
    logp, old_logp, ref_logp, adv, mask = _policy_inputs()
    ref_logp = ref_logp if with_ref else None
    # truncated importance weights: some 0 (masked out), some at the cap, the rest in between
    is_weights = (torch.rand(logp.shape) * 3.0).clamp(max=2.0).masked_fill(torch.rand(logp.shape) < 0.1, 0.0) \
        if with_is else None
    kl_coef = 0.05 if with_ref else 0.0
    norm_length = 20 if loss_agg == "seq-mean-token-sum-norm" else None
    kw = dict(eps_low=0.2, eps_high=0.28, kl_coef=kl_coef, loss_agg=loss_agg, norm_length=norm_length)
    garbage = logp.masked_fill(~mask, float("-inf"))  # padding values must not leak into the loss or grads

    lp = garbage.clone().requires_grad_()
    loss, stats = policy_loss(lp, old_logp, adv, mask, ref_logp=ref_logp, backend=backend, is_weights=is_weights, **kw)
    loss.backward()

    lp64 = logp.double().requires_grad_()
    expected = _naive_policy_loss(lp64, old_logp.double(), adv.double(), mask,
                                  None if ref_logp is None else ref_logp.double(),
                                  kw["eps_low"], kw["eps_high"], kl_coef, loss_agg, norm_length,
                                  None if is_weights is None else is_weights.double())
    expected.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - expected.item()) < 1e-6
    assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all()
    assert _max_err(lp.grad, lp64.grad) < 1e-7
    want = _naive_stats(logp.double(), old_logp.double(), adv.double(), mask,
                        None if ref_logp is None else ref_logp.double(), 0.2, 0.28)
    assert want["clip_low_frac"] > 0 and want["clip_high_frac"] > 0  # the inputs exercise both sides
    for key, value in want.items():
        assert stats[key].dtype == torch.float32 and not stats[key].requires_grad
        assert abs(stats[key].item() - value) < 1e-6, key


def _spread_policy_inputs(b=8, t=13):
    """Rows whose mean log-ratio sits well past each bound, for both signs of the advantage: a sequence-level
    ratio is clipped low, clipped high, capped by delta and left alone in the same batch."""
    logp, _, ref_logp, adv, mask = _policy_inputs(b, t)
    offsets = torch.tensor([-0.7, -0.7, 0.7, 0.7, 1.2, 1.2, 0.05, -0.05])[:b]  # log-ratio of each row
    old_logp = logp - offsets[:, None] + torch.randn(b, t) * 0.1
    adv = adv.abs() * torch.tensor([1.0, -1.0] * (b // 2))  # rows alternate A > 0, A < 0
    mask[1] = True  # (_policy_inputs empties row 1)
    mask[5, :] = False  # a row without tokens
    return logp, old_logp, ref_logp, adv, mask


def _matches_naive(backend, loss_agg, with_ref_is, eps_high=0.28, delta=None, level="token", surrogate="clip",
                   sapo_temperatures=(1.0, 1.05), kl_ratio_weighted=False, vespo_params=(2.0, 3.0, 3.0, 2.0), inputs=None,
                   vespo_log_is=None, kl_type="k3"):
    """policy_loss on the spread inputs (garbage at padding; KL and IS weights with_ref_is) against
    _naive_policy_loss in fp64: value and gradient. -> (logp, old_logp, adv, mask, logp's gradient, stats).
    `inputs` replaces the spread inputs (logp, old_logp, ref_logp, adv, mask)."""
    logp, old_logp, ref_logp, adv, mask = inputs or _spread_policy_inputs()
    ref_logp = ref_logp if with_ref_is else None
    is_weights = (torch.rand(logp.shape) * 3.0).clamp(max=2.0) if with_ref_is else None
    kl_coef = 0.05 if with_ref_is else 0.0
    norm_length = 20 if loss_agg == "seq-mean-token-sum-norm" else None
    options = dict(delta=delta, ratio_level=level, surrogate=surrogate, sapo_temperatures=sapo_temperatures,
                   kl_ratio_weighted=kl_ratio_weighted, vespo_params=vespo_params, vespo_log_is=vespo_log_is,
                   kl_type=kl_type)
    lp = logp.masked_fill(~mask, float("-inf")).requires_grad_()  # padding must not leak in
    loss, stats = policy_loss(lp, old_logp, adv, mask, ref_logp=ref_logp, is_weights=is_weights, eps_low=0.2,
                              eps_high=eps_high, kl_coef=kl_coef, loss_agg=loss_agg, norm_length=norm_length,
                              backend=backend, **options)
    loss.backward()
    lp64 = logp.double().requires_grad_()
    expected = _naive_policy_loss(lp64, old_logp.double(), adv.double(), mask,
                                  None if ref_logp is None else ref_logp.double(), 0.2, eps_high, kl_coef, loss_agg,
                                  norm_length, None if is_weights is None else is_weights.double(), delta, level,
                                  surrogate, sapo_temperatures, kl_ratio_weighted, vespo_params,
                                  None if vespo_log_is is None else vespo_log_is.double(), kl_type)
    expected.backward()
    # fp32 rounding scales with the size of the sums: the token-sum mode's are a row's length larger
    scale = 13.0 if loss_agg == "seq-mean-token-sum" else 1.0
    assert abs(loss.item() - expected.item()) < 1e-6 * scale
    assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all()
    assert _max_err(lp.grad, lp64.grad) < 1e-7 * scale
    return logp, old_logp, adv, mask, lp.grad, stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("level,delta", [("token", 1.5), ("sequence", None), ("sequence", 1.5)])
@pytest.mark.parametrize("with_ref_is", [False, True])
def test_policy_loss_delta_and_sequence_level_match_trl(backend, loss_agg, level, delta, with_ref_is):
    logp, old_logp, adv, mask, _, stats = _matches_naive(backend, loss_agg, with_ref_is, delta=delta, level=level)
    # Clip fractions count tokens, each with its row's ratio at the sequence level.
    m = mask.bool()
    lr = (logp - old_logp).double()
    if level == "sequence":
        lr = (torch.where(m, lr, 0.0).sum(-1) / m.sum(-1).clamp(min=1))[:, None].expand_as(lr)
    ratio, a = lr.exp()[m], adv.double()[:, None].expand_as(lr)[m]
    low = ((ratio < 0.8) & (a < 0)).sum().item() / m.sum().item()
    high = (((ratio > 1.28) & (a > 0)) | ((ratio > (delta or math.inf)) & (a < 0))).sum().item() / m.sum().item()
    capped = ((ratio > (delta or math.inf)) & (a < 0)).sum().item()
    assert low > 0 and high > 0 and (capped > 0) == (delta is not None)  # the inputs reach every bound
    assert stats["clip_low_frac"].item() == pytest.approx(low, abs=1e-6)
    assert stats["clip_high_frac"].item() == pytest.approx(high, abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(ratio.mean().item(), abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("surrogate,delta,eps_high", [("clip", None, 0.28), ("clip", 1.5, 0.28), ("cispo", None, 1.0),
                                                      ("sapo", None, 0.28)])
def test_policy_loss_bias_corrected_kl_matches_trl(backend, loss_agg, surrogate, delta, eps_high):
    """kl_ratio_weighted: TRL's use_bias_correction_kl, the KL term times the differentiable ratio."""
    _, _, _, _, grad, _ = _matches_naive(backend, loss_agg, True, eps_high=eps_high, delta=delta, surrogate=surrogate,
                                         kl_ratio_weighted=True)
    _, _, _, _, plain_grad, _ = _matches_naive(backend, loss_agg, True, eps_high=eps_high, delta=delta,
                                               surrogate=surrogate)
    assert _max_err(grad, plain_grad) > 1e-4  # the weighting changes the gradient


def _vespo_inputs():
    """Rows whose summed log-ratios (the sequence ratio VESPO weighs) spread over -1.2..0.9: the spread
    inputs' row offsets, per token, would sum to ratios of e^+-15, where phi is 0."""
    logp, old_logp, ref_logp, adv, mask = _spread_policy_inputs()
    offsets = torch.tensor([-0.09, -0.03, 0.0, 0.02, 0.07, 0.0, -0.05, 0.04])  # per token
    return logp, logp - offsets[:, None] + torch.randn(logp.shape) * 0.02, ref_logp, adv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("with_ref_is", [False, True])
@pytest.mark.parametrize("params,with_log_is", [((2.0, 3.0, 3.0, 2.0), False), ((1.0, 0.5, 4.0, 6.0), False),
                                               ((2.0, 3.0, 3.0, 2.0), True)])
def test_policy_loss_vespo_matches_trl(backend, loss_agg, with_ref_is, params, with_log_is):
    log_is = torch.tensor([0.3, -0.2, 0.0, -25.0, 0.1, 0.0, 0.4, -0.6]) if with_log_is else None  # -25: masked
    _, _, _, _, _, stats = _matches_naive(backend, loss_agg, with_ref_is, surrogate="vespo", vespo_params=params,
                                          inputs=_vespo_inputs(), vespo_log_is=log_is)
    assert stats["clip_frac"].item() == 0.0  # a weight, not a clip


@pytest.mark.parametrize("backend", BACKENDS)
def test_vespo_weight_is_one_on_policy(backend):
    """phi(1) = 1: at ratio 1 VESPO's gradient is REINFORCE's, which is the clipped surrogate's there."""
    logp, _, _, adv, mask = _policy_inputs()
    grads = []
    for surrogate in ("vespo", "clip"):
        lp = logp.clone().requires_grad_()
        loss, _ = policy_loss(lp, logp, adv, mask, surrogate=surrogate, loss_agg="token-mean", backend=backend)
        loss.backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_corrected_kl_gradient_on_policy_is_the_unbiased_one(backend):
    """At ratio 1 the weighted KL's value is k3 and its gradient (logp - ref) w, k1's (the reverse KL's
    unbiased score-function gradient), where k3's own is (1 - exp(ref - logp)) w."""
    logp, _, ref_logp, adv, mask = _policy_inputs()
    lp = logp.clone().requires_grad_()
    loss, stats = policy_loss(lp, logp, adv * 0, mask, ref_logp=ref_logp, kl_coef=1.0, loss_agg="token-mean",
                              kl_ratio_weighted=True, backend=backend)
    loss.backward()
    m = mask.bool()
    w = m.float() / m.sum()
    d = ref_logp - logp
    assert loss.item() == pytest.approx(float((w * (d.exp() - d - 1)).sum()), rel=1e-6)
    torch.testing.assert_close(lp.grad, torch.where(m, w * (logp - ref_logp), 0.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("with_ref_is", [False, True])
def test_policy_loss_cispo_matches_trl(backend, loss_agg, with_ref_is):
    logp, old_logp, adv, mask, grad, stats = _matches_naive(backend, loss_agg, with_ref_is, eps_high=1.0,
                                                            surrogate="cispo")
    m = mask.bool()
    ratio, a = (logp - old_logp).exp()[m], adv[:, None].expand_as(logp)[m]
    capped = ((ratio > 2.0) & (a > 0)).sum().item()
    assert capped > 0 and stats["clip_high_frac"].item() == pytest.approx(capped / m.sum().item(), abs=1e-6)
    assert stats["clip_low_frac"].item() == 0.0
    # every token keeps a gradient: -A * min(ratio, 2) * w, none zeroed by a clip
    assert (grad[m & (adv[:, None] != 0)] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("with_ref_is", [False, True])
def test_policy_loss_sapo_matches_trl(backend, loss_agg, level, with_ref_is):
    *_, stats = _matches_naive(backend, loss_agg, with_ref_is, eps_high=0.2, level=level, surrogate="sapo",
                               sapo_temperatures=(1.5, 0.7))
    assert stats["clip_frac"].item() == 0.0  # a gate, no clip


def test_sapo_gate_has_the_clipped_ratio_slope_at_one():
    # on-policy (ratio 1) the gate's gradient equals PPO's: -A per token, whatever the temperatures
    logp = torch.randn(3, 5, requires_grad=True)
    adv, mask = torch.tensor([1.0, -2.0, 0.5]), torch.ones(3, 5)
    policy_loss(logp, logp.detach(), adv, mask, loss_agg="token-mean", surrogate="sapo",
                sapo_temperatures=(2.0, 0.5), backend="torch")[0].backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(3, 5) / 15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_delta_by_hand(backend):
    # A = -1, ratios 0.5, 1.1, 2.0, 4.0; eps 0.2 / 0.3; delta 3. Unclipped -A * min(r, 3) = 0.5, 1.1, 2.0, 3.0
    # against the clipped 0.8, 1.1, 1.3, 1.3: the max is 0.8, 1.1, 2.0, 3.0, and the last has no gradient.
    logp = torch.tensor([[0.5, 1.1, 2.0, 4.0]]).log().requires_grad_()
    loss, stats = policy_loss(logp, torch.zeros(1, 4), torch.tensor([-1.0]), torch.ones(1, 4), eps_low=0.2,
                              eps_high=0.3, delta=3.0, loss_agg="token-mean", backend=backend)
    assert loss.item() == pytest.approx((0.8 + 1.1 + 2.0 + 3.0) / 4, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.1, 2.0, 0.0]]) / 4, atol=1e-7)
    assert stats["clip_low_frac"].item() == pytest.approx(1 / 4) and stats["clip_high_frac"].item() == pytest.approx(1 / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_sequence_level_by_hand(backend):
    # One row of 3 tokens, log-ratios 0.1, 0.2, 0.6 (mean 0.3, ratio e^0.3 = 1.35 > 1.2), A = +1, token-mean:
    # every token's loss is -min(1.35, 1.2) = -1.2 (so is their mean) and the clip zeroes the gradient; with
    # A = -1 the unclipped 1.35 wins and each token gets d/dlogp_t = -A * e^0.3 / 3 (its share of the mean).
    old = torch.zeros(1, 3)
    for adv, want_loss, want_grad in [(1.0, -1.2, 0.0), (-1.0, math.exp(0.3), math.exp(0.3) / 3)]:
        logp = torch.tensor([[0.1, 0.2, 0.6]], requires_grad=True)
        loss, stats = policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 3), eps_low=0.2, eps_high=0.2,
                                  ratio_level="sequence", loss_agg="token-mean", backend=backend)
        loss.backward()
        assert loss.item() == pytest.approx(want_loss, abs=1e-6)
        assert torch.allclose(logp.grad, torch.full((1, 3), want_grad), atol=1e-7)
        assert stats["clip_high_frac"].item() == (1.0 if adv > 0 else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_clip_stats_by_hand(backend):
    # ratios 0.5, 0.9, 1.1, 1.5 for A = +1 and A = -1; eps_low 0.2, eps_high 0.3.
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.5])
    old_logp = torch.zeros(2, 4)
    logp = ratios.log().expand(2, 4).clone().requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, stats = policy_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.3, loss_agg="token-mean",
                              backend=backend)
    # A=+1: 1.5 is clipped high (active); 0.5 is below the low bound but with A > 0 the unclipped term wins.
    # A=-1: 0.5 is clipped low (active); 1.5 is above the high bound but with A < 0 the unclipped term wins.
    assert stats["clip_high_frac"].item() == pytest.approx(1 / 8)
    assert stats["clip_low_frac"].item() == pytest.approx(1 / 8)
    assert stats["clip_frac"].item() == pytest.approx(2 / 8)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["kl_mean"].item() == 0.0
    # loss per token: A=+1 -> -[0.5, 0.9, 1.1, 1.3]; A=-1 -> [0.8, 0.9, 1.1, 1.5]
    assert loss.item() == pytest.approx((-(0.5 + 0.9 + 1.1 + 1.3) + (0.8 + 0.9 + 1.1 + 1.5)) / 8, abs=1e-6)
    loss.backward()
    # Clipped tokens get no gradient; the others get -A * ratio / 8.
    expected = torch.tensor([[-0.5, -0.9, -1.1, 0.0], [0.0, 0.9, 1.1, 1.5]]) / 8
    assert torch.allclose(logp.grad, expected, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
def test_policy_loss_all_masked(backend, loss_agg):
    logp, old_logp, ref_logp, adv, _ = _policy_inputs(3, 5)
    mask = torch.zeros(3, 5)  # float 0/1 mask, nothing selected
    lp = logp.masked_fill(mask == 0, float("nan")).requires_grad_()
    loss, stats = policy_loss(lp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, loss_agg=loss_agg,
                              backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and (lp.grad == 0).all()
    assert all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surrogate,level,delta,kl_ratio_weighted", [
    ("clip", "token", None, False), ("clip", "token", 3.0, True), ("clip", "sequence", None, False),
    ("cispo", "token", None, False), ("sapo", "token", None, False), ("sapo", "sequence", None, False),
    ("vespo", "token", None, False)])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_policy_loss_far_off_policy_stays_finite(backend, surrogate, level, delta, kl_ratio_weighted, kl_coef):
    """Log-ratios far past exp's fp32 range (a stale old_logp, a -inf log-prob from the rollout) are clamped to
    +-20 in both backends, so no inf * 0 turns into NaN: not with A = 0, not through a saturated SAPO gate, not
    from ref_logp with kl_coef = 0. Values and gradients match the fp64 reference, which clamps the same way."""
    logp, old_logp, ref_logp, adv, mask = _policy_inputs(6, 13)
    mask[1] = True
    far = torch.tensor([-300.0, -100.0, -25.0, 25.0, 100.0, 300.0])
    old_logp[:, 3] = logp[:, 3] - far  # one far token per row; rows 0, 2 and 4 whole-sequence too
    old_logp[0], old_logp[2] = logp[0] + 95.0, logp[2] - 95.0
    ref_logp[:, 5] = logp[:, 5] + far.flip(0)
    adv[0] = 0.0  # a zero advantage on a token whose ratio overflowed fp32 made NaN
    kw = dict(ref_logp=ref_logp, kl_coef=kl_coef, eps_low=0.2, eps_high=0.28, delta=delta, ratio_level=level,
              surrogate=surrogate, kl_ratio_weighted=kl_ratio_weighted)
    lp = logp.clone().requires_grad_()
    loss, stats = policy_loss(lp, old_logp, adv, mask, backend=backend, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(value) for value in stats.values())
    lp64 = logp.double().requires_grad_()
    expected = _naive_policy_loss(lp64, old_logp.double(), adv.double(), mask, ref_logp.double(), 0.2, 0.28, kl_coef,
                                  "seq-mean-token-mean", None, None, delta, level, surrogate,
                                  bias_correction_kl=kl_ratio_weighted)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_float_mask_equals_bool_mask(backend):
    logp, old_logp, ref_logp, adv, mask = _policy_inputs()
    a, _ = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, backend=backend)
    b, _ = policy_loss(logp, old_logp, adv, mask.float(), ref_logp=ref_logp, kl_coef=0.1, backend=backend)
    assert torch.equal(a, b)


def test_policy_loss_differentiates_logp_alone():
    """old_logp, ref_logp, advantages and is_weights that require grad (e.g. old_logp = logp, GRPO's first pass
    computed in one graph) are constants in both backends: the same gradient for logp, none for them."""
    logp, old_logp, ref_logp, adv, mask = _policy_inputs(3, 5)
    weights, grads = torch.rand_like(logp), {}
    for backend in BACKENDS:
        lp = logp.clone().requires_grad_()
        others = [t.clone().requires_grad_() for t in (ref_logp, adv, weights)]
        loss, _ = policy_loss(lp, lp, others[1], mask, ref_logp=others[0], kl_coef=0.1, is_weights=others[2],
                              backend=backend)  # old_logp is logp itself
        loss.backward()
        assert all(t.grad is None for t in others), backend
        grads[backend] = lp.grad
    assert grads["torch"].abs().sum() > 0
    torch.testing.assert_close(grads["torch"], grads["triton"], rtol=1e-5, atol=1e-7)


def test_policy_loss_torch_backend_is_the_reference_and_auto_picks_by_device():
    logp, old_logp, ref_logp, adv, mask = _policy_inputs()
    a, sa = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, backend="torch")
    b, sb = policy_loss_reference(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1)
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, backend="auto")
    d, _ = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1,
                       backend="triton" if ON_CUDA else "torch")
    assert torch.equal(c, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_bad_inputs(backend):
    logp, old_logp, ref_logp, adv, mask = _policy_inputs(3, 5)
    cases = [
        (dict(old_logp=old_logp[:, :4]), "old_logp"),
        (dict(mask=mask[:2]), "mask"),
        (dict(ref_logp=ref_logp[:, :1]), "ref_logp"),
        (dict(is_weights=torch.ones(3, 4)), "is_weights"),
        (dict(advantages=adv[:2]), "advantages"),
        (dict(advantages=adv[:, None].expand(3, 5)), "advantages"),
        (dict(logp=logp[0]), "logp"),
        (dict(eps_low=-0.1), "eps_low"),
        (dict(eps_high=-0.1), "eps_high"),
        (dict(loss_agg="seq-sum"), "loss_agg"),
        (dict(kl_coef=0.1), "ref_logp"),
        (dict(loss_agg="seq-mean-token-sum-norm", norm_length=0), "norm_length"),
        (dict(backend="cuda"), "backend"),
        (dict(delta=1.1), "delta"),  # not above 1 + eps_high
        (dict(ratio_level="group"), "ratio_level"),
        (dict(surrogate="ppo"), "surrogate"),
        (dict(surrogate="cispo", ratio_level="sequence"), "cispo"),
        (dict(surrogate="cispo", delta=4.0), "cispo"),
        (dict(surrogate="sapo", delta=4.0), "delta caps"),
        (dict(surrogate="sapo", sapo_temperatures=(1.0, 0.0)), "sapo_temperatures"),
        (dict(kl_ratio_weighted=True, ratio_level="sequence"), "kl_ratio_weighted weighs each token"),
        (dict(surrogate="vespo", ratio_level="sequence"), "surrogate='vespo' takes its sequence weight"),
        (dict(surrogate="vespo", vespo_params=(1.0, -1.0, 1.0, 1.0)), "vespo_params must be four finite"),
        (dict(surrogate="vespo", delta=4.0), "delta caps"),
        (dict(vespo_log_is=torch.zeros(6)), "vespo_log_is is a"),
        (dict(surrogate="vespo", vespo_log_is=torch.zeros(5)), "vespo_log_is is a"),
    ]
    for override, match in cases:
        args = dict(logp=logp, old_logp=old_logp, advantages=adv, mask=mask, backend=backend) | override
        with pytest.raises(ValueError, match=match):
            policy_loss(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dr_grpo_norm_length_defaults_to_the_padded_length(backend):
    # Dr.GRPO without norm_length divides each row's token sum by T (the padded length, mask.shape[-1]), not
    # by B or a row's own length. On-policy every ratio is 1, so each token's loss is -A: row 0 has 3 tokens
    # with A = 1, row 1 5 tokens with A = -2, row 2 none. B = 3, T = 5: (-3 + 10) / (5 * 2 non-empty rows).
    logp = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 0.5])
    kw = dict(loss_agg="seq-mean-token-sum-norm", backend=backend)
    loss, _ = policy_loss(logp, logp, adv, mask, **kw)
    assert loss.item() == pytest.approx(0.7, abs=1e-6)
    assert torch.equal(loss, policy_loss(logp, logp, adv, mask, norm_length=5, **kw)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_gradient_scales_with_the_upstream_gradient(backend, level):
    # The trainer backpropagates a scaled loss (micro-batch shares, loss scaling): logp's gradient must be
    # the incoming gradient times dloss/dlogp, not dloss/dlogp alone. KL and IS weights on, both levels.
    logp, old_logp, ref_logp, adv, mask = _policy_inputs()
    is_weights, grads = torch.rand_like(logp), []
    for scale in (1.0, -3.0):
        lp = logp.clone().requires_grad_()
        loss, _ = policy_loss(lp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, ratio_level=level,
                              is_weights=is_weights, backend=backend)
        (scale * loss).backward()
        grads.append(lp.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], -3.0 * grads[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_kl_mean_stat_at_both_ratio_levels(backend, level):
    # kl_mean is the mean k3 over masked tokens whatever the ratio level (GSPO's sequence ratio does not
    # touch the KL term): checked against the naive per-token k3.
    logp, old_logp, ref_logp, adv, mask = _policy_inputs()
    _, stats = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.05, ratio_level=level,
                           backend=backend)
    want = _naive_stats(logp.double(), old_logp.double(), adv.double(), mask, ref_logp.double(), 0.2, 0.2)["kl_mean"]
    assert want > 1e-3
    assert stats["kl_mean"].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_mask_values_other_than_0_and_1_are_refused(backend):
    # The mask is a selection (bool or 0/1, as TRL's completion_mask and verl's response_mask): a soft weight
    # (0.5) or another library's ignore value (-100) was read as a token weight by the aggregation and as
    # "selected" by the clip statistics, and the two backends disagreed on ratio_mean. 0/1 in any dtype is fine.
    logp, old_logp, _, adv, mask = _policy_inputs(3, 5)
    for bad in (mask.float() * 0.5, torch.where(mask, 1, -100), mask.float().masked_fill(~mask, float("nan"))):
        with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
            policy_loss(logp, old_logp, adv, bad, backend=backend)
    want = policy_loss(logp, old_logp, adv, mask, backend=backend)[0]
    for ok in (mask.float(), mask.long(), mask.to(torch.uint8)):
        assert torch.equal(policy_loss(logp, old_logp, adv, ok, backend=backend)[0], want)


def test_policy_loss_rejects_eps_low_of_one():
    # eps_low must be < 1 (the lower clip bound 1 - eps_low > 0), on the boundary too; just under it is fine
    logp, old_logp, _, adv, mask = _policy_inputs(3, 5)
    with pytest.raises(ValueError, match="eps_low must be < 1"):
        policy_loss(logp, old_logp, adv, mask, eps_low=1.0, eps_high=1.0, backend="torch")
    assert torch.isfinite(policy_loss(logp, old_logp, adv, mask, eps_low=0.999, backend="torch")[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_references_and_kernels_by_hand(backend):
    """The references every other test trusts, against numbers worked by hand (math, not log_softmax): a bug
    shared by the reference and a backend (temperature multiplied, the wrong axis) would pass every
    comparison between them. hidden @ weight.T gives the logits [2, 0, -1] and [0, 3, 0]; T = 2."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    weight = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([2, 1])
    want_logp, want_entropy = [], []
    for logits, t in (([2.0, 0.0, -1.0], 2), ([0.0, 3.0, 0.0], 1)):
        x = [z / 2.0 for z in logits]
        lse = math.log(sum(math.exp(z) for z in x))
        want_logp.append(x[t] - lse)
        want_entropy.append(-sum(math.exp(z - lse) * (z - lse) for z in x))
    want_logp, want_entropy = torch.tensor(want_logp, dtype=torch.float64), torch.tensor(want_entropy, dtype=torch.float64)
    torch.testing.assert_close(logprobs_reference(hidden, weight, targets, 2.0), want_logp, rtol=1e-12, atol=0)
    torch.testing.assert_close(entropy_reference(hidden, weight, 2.0), want_entropy, rtol=1e-12, atol=0)
    logp, entropy = fused_logprobs(hidden.float(), weight.float(), targets, 2.0, backend=backend, return_entropy=True)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-6, atol=1e-6)


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that aten ops made and that something still references at once (the
    inputs' storages and their views left out): what a chunked computation really holds, which the largest
    single tensor (_MaxBytes) does not show when one chunk's buffer outlives the next one's allocation."""

    def __init__(self, *inputs):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in inputs}
        self.live, self.peak = {}, 0  # storage ptr -> [nbytes, weak references to the tensors on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.exclude:
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), [storage.nbytes(), []])[1].append(weakref.ref(t))
        self.live = {p: e for p, e in self.live.items() if any(r() is not None for r in e[1])}
        self.peak = max(self.peak, sum(e[0] for e in self.live.values()))
        return out


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("n,v", [(64, 2000), (2000, 64)])  # backward by vocabulary slices / by token slices
def test_torch_logprobs_hold_one_chunk_of_logits_at_once(n, v, with_entropy):
    """chunk_numel bounds the fp32 logits alive at once, forward and backward, entropy's second buffer included
    (it halves the chunk), and the chunks fill it: not 2x the bound (a chunk's buffer kept alive while the
    next is made, or the entropy's two full-size buffers), nor a sliver of it (chunks cut along the wrong axis
    run hundreds of tiny matmuls). Beyond the chunk: gradient accumulators [N, H] and [V, H], O(N + V) vectors."""
    h, chunk_numel = 4, 32 * 1024  # 128 KiB of fp32 logits; [N, V] is 500 KiB
    hidden, weight, targets = _lm_inputs(n, h, v)
    hidden.requires_grad_()
    weight.requires_grad_()
    budget, slack = 4 * chunk_numel, 4 * (n + v) * h + 24 * (n + v)  # fp32 accumulators; six fp32 [N] or [V]
    with _PeakLiveBytes(hidden, weight, targets) as forward:
        out = fused_logprobs(hidden, weight, targets, backend="torch", chunk_numel=chunk_numel,
                             return_entropy=with_entropy)
    loss = (out[0] + 0.1 * out[1] if with_entropy else out).sum()
    with _PeakLiveBytes(hidden, weight, targets) as backward:
        loss.backward()
    for peak in (forward.peak, backward.peak):
        assert 0.75 * budget <= peak <= budget + slack, (forward.peak, backward.peak, budget, slack)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "abs", "k3"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_kl_estimators_match_verls(backend, kl_type, level):
    """kl_type (verl's kl_loss_type): k1 = x, k2 = x^2 / 2, abs = |x|, k3 = exp(-x) + x - 1, x = logp - ref_logp,
    value and gradient against the fp64 row-by-row loss, at both ratio levels; kl_mean is the estimator's mean."""
    inputs = _spread_policy_inputs()
    ref_logp = inputs[2]
    logp, old_logp, adv, mask, grad, stats = _matches_naive(backend, "token-mean", True, level=level, kl_type=kl_type,
                                                            inputs=inputs)
    x = (logp - ref_logp)[mask.bool()].double()
    want = {"k1": x, "k2": 0.5 * x.square(), "abs": x.abs(), "k3": torch.exp(-x) + x - 1}[kl_type].mean()
    assert abs(stats["kl_mean"].item() - want.item()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_k3_of_a_policy_near_its_reference_keeps_fp32_precision(backend, level):
    """k3 = exp(-x) + x - 1 of x = logp - ref_logp near 0 (a policy a few steps from its reference) is ~x^2 / 2, far
    below fp32's ulp of 1 (1.2e-7): written so, it is rounding noise, as often negative as not (x = 1e-4: -6e-8
    instead of 5e-9), and its gradient 1 - exp(-x) ~ x loses as many digits. kl_mean, the KL loss (A = 0) and its
    gradient for rows that each hold one x, against fp64, relative to the value; x from 1e-6 to 15 on both sides,
    each side of the switch from a series to exp at |x| = 0.5."""
    xs = [1e-6, -1e-6, 1e-4, -1e-4, 3e-3, -3e-3, 0.1, -0.1, 0.49, -0.49, 0.51, -0.51, 2.0, -2.0, 15.0, -15.0]
    logp = torch.full((len(xs), 3), -1.5)
    ref_logp = logp - torch.tensor(xs)[:, None]  # fp32: the x below is the difference these hold, exactly
    mask = torch.ones_like(logp, dtype=torch.bool)
    x = (logp.double() - ref_logp.double())[:, 0]
    want, want_grad = torch.expm1(-x) + x, -torch.expm1(-x) * 0.5 / 3  # [rows] fp64: k3, d (0.5 * mean k3) / d logp
    for row in range(len(xs)):
        pick = torch.arange(len(xs)) == row
        lp = logp[pick].clone().requires_grad_()
        loss, stats = policy_loss(lp, logp[pick], torch.zeros(1), mask[pick], ref_logp=ref_logp[pick],
                                  kl_coef=0.5, loss_agg="token-mean", ratio_level=level, backend=backend)
        loss.backward()
        for got, expected in ((stats["kl_mean"], want[row]), (loss, 0.5 * want[row]), (lp.grad, want_grad[row])):
            err = (got.double() - expected).abs().max().item()
            assert err <= 1e-5 * abs(expected.item()), (xs[row], got, expected.item())


def test_policy_loss_kl_estimators_differ_and_are_checked():
    logp, old_logp, ref_logp, adv, mask = _policy_inputs()
    losses = {k: policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.5, kl_type=k)[0].item()
              for k in ("k1", "k2", "k3", "abs")}
    assert len(set(losses.values())) == 4
    with pytest.raises(ValueError, match=r"kl_type must be one of \('k3', 'k1', 'k2', 'abs'\), got 'low_var_kl'"):
        policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.5, kl_type="low_var_kl")
    with pytest.raises(ValueError, match="kl_ratio_weighted corrects k3's gradient: kl_type='k3', got 'k2'"):
        policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.5, kl_type="k2", kl_ratio_weighted=True)
