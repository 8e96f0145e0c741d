"""Shared-prefix training equals the plain padded per-sequence batch: log-probs, loss, every gradient."""
import random

import pytest
import torch

from rpo_engine.kernels import policy_loss
from rpo_engine.model import CausalLM, ModelConfig
from rpo_engine.model.shared_prefix import (PrefixGroup, SharedPrefixAttention, layout_tokens, micro_batches,
                                            padded_logprobs, shared_prefix_logprobs, sharing_pays)
from tests.helpers import DEVICE, FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(family, **overrides):
    config = ModelConfig.from_hf_dict(dict(FAMILIES[family], num_hidden_layers=2, max_position_embeddings=256,
                                           **overrides))
    torch.manual_seed(0)
    model = CausalLM(config)
    with torch.no_grad():  # every weight random and O(1) effect, as tests/helpers.make_hf_model does
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.train().to(DEVICE)


def make_groups(vocab, prefix_lens, suffix_lens, loss_start_back=0, seed=0):
    """Groups with random tokens; loss_start = len(prefix) - loss_start_back."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    return [PrefixGroup(tokens(p), [tokens(n) for n in lens], p - loss_start_back,
                        advantages=[rng.gauss(0, 1) for _ in lens])
            for p, lens in zip(prefix_lens, suffix_lens)]


def loss_and_grads(model, groups, fn, loss_agg):
    model.zero_grad(set_to_none=True)
    logp, mask = fn(model, groups)
    adv = torch.tensor([a for g in groups for a in g.advantages], device=logp.device)
    # old log-probs off by a fixed pattern, so ratios differ from 1 and some clip on each side
    old = logp.detach() + 0.3 * torch.sin(torch.arange(logp.numel(), device=logp.device).reshape(logp.shape).float())
    loss, stats = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, loss_agg=loss_agg, backend="torch")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), mask, loss.detach(), stats, grads


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = {
    # several groups per micro-batch, ragged suffixes (one empty), different prefix lengths
    "ragged": dict(prefix_lens=[11, 17, 6], suffix_lens=[[5, 1, 8, 3], [2, 9, 0, 4], [7, 7, 1, 5]]),
    "g1": dict(prefix_lens=[13, 8], suffix_lens=[[6], [9]]),
    "all_empty_but_one": dict(prefix_lens=[10, 7], suffix_lens=[[0, 0, 5, 0], [3, 4, 2, 6]]),
    "loss_in_prefix": dict(prefix_lens=[15, 9], suffix_lens=[[4, 0, 6], [1, 5, 3]], loss_start_back=6),
}


@pytest.mark.gpu
@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_equals_padded(case, loss_agg):
    model = tiny_model("llama")  # GQA 4:2, biases, Llama-3 RoPE
    groups = make_groups(model.config.vocab_size, **CASES[case])
    check_equal(model, groups, loss_agg)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])  # MQA 4:1 tied; qk-norm without GQA
def test_shared_equals_padded_families_with_checkpointing(family):
    model = tiny_model(family)
    model.gradient_checkpointing_enable()
    groups = make_groups(model.config.vocab_size, **CASES["ragged"], loss_start_back=2)
    check_equal(model, groups, "seq-mean-token-mean")


@pytest.mark.gpu
def test_shared_equals_padded_with_lora_adapters():
    # LoRA (--use-peft): the frozen base gets no gradient, the adapters theirs, equal on both layouts
    from rpo_engine.model.lora import apply_lora, lora_modules

    model = apply_lora(tiny_model("qwen3"), r=3, alpha=6.0, target_modules="q_proj,k_proj,v_proj,o_proj,up_proj")
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.3)
    model.gradient_checkpointing_enable()
    groups = make_groups(model.config.vocab_size, **CASES["ragged"], loss_start_back=2)
    check_equal(model, groups, "seq-mean-token-sum-norm")
    assert all(".lora_" in n for n, p in model.named_parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [True, False])
def test_entropy_is_that_of_each_scored_tokens_distribution(shared):
    """with_entropy: the entropy of softmax(logits / T) at the position that predicts each scored token, from
    the model's plain full-logits forward of each sample, laid out as the log-probs are."""
    model = tiny_model("qwen2")
    groups = make_groups(model.config.vocab_size, **CASES["loss_in_prefix"])
    temperature = 0.7
    fn = shared_prefix_logprobs if shared else padded_logprobs
    logp, mask, entropy = fn(model, groups, temperature, with_entropy=True)
    assert torch.equal(logp, fn(model, groups, temperature)[0])
    assert entropy.requires_grad  # differentiable: an entropy bonus's gradient flows through it
    row = 0
    with torch.no_grad():
        for g in groups:
            for suffix in g.suffix_ids:
                ids = torch.tensor([g.prefix_ids + suffix], device=DEVICE)
                logits = model(ids)[0, g.loss_start - 1:-1].double() / temperature  # predicts tokens loss_start..
                want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
                n = len(want)
                assert mask[row, :n].all() and not mask[row, n:].any()
                torch.testing.assert_close(entropy[row, :n].double(), want, atol=1e-5, rtol=1e-5)
                row += 1


@pytest.mark.parametrize("case", ["ragged", "loss_in_prefix"])
def test_entropy_gradient_of_shared_prefix_equals_padded(case):
    """The entropy bonus's gradient (--entropy-coef) through the shared-prefix forward equals the padded
    batch's: every parameter, a prefix trained once per group included."""
    model = tiny_model("qwen2")
    groups = make_groups(model.config.vocab_size, **CASES[case])
    grads = []
    for fn in (padded_logprobs, shared_prefix_logprobs):
        model.zero_grad(set_to_none=True)
        logp, mask, entropy = fn(model, groups, 0.7, with_entropy=True)
        (0.5 * (logp * mask).sum() - (entropy * mask).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        assert rel(grads[1][name], g) < 1e-5, name


def check_equal(model, groups, loss_agg):
    ref = loss_and_grads(model, groups, padded_logprobs, loss_agg)
    got = loss_and_grads(model, groups, shared_prefix_logprobs, loss_agg)
    (logp_r, mask_r, loss_r, stats_r, grads_r), (logp, mask, loss, stats, grads) = ref, got
    assert torch.equal(mask, mask_r)
    assert mask.sum(-1).tolist() == [g.span(i) for g in groups for i in range(len(g.suffix_ids))]
    assert (logp[~mask] == 0).all()
    assert rel(logp, logp_r) < 1e-5
    assert rel(loss, loss_r) < 1e-5 and loss_r.abs() > 0
    assert stats["clip_frac"] == stats_r["clip_frac"] and stats_r["clip_frac"] > 0  # the clipped branch ran
    for name, g in grads_r.items():
        assert g.abs().max() > 0, f"{name}: no gradient, the comparison would prove nothing"
        assert rel(grads[name], g) < 1e-5, name


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_attention_equals_masked(kv_heads, dtype):
    """The split suffix attention (two flash calls merged by log-sum-exp) equals the masked reference:
    outputs and q/k/v gradients on fresh random inputs, ragged prefixes and suffixes, empty ones."""
    prefix_lens, suffix_lens = [11, 17, 6, 9], [[5, 1, 8, 3], [2, 9, 0, 4], [7, 7, 1, 5], [0, 0]]
    B, P, S, H, D = len(prefix_lens), max(prefix_lens), max(sum(s) for s in suffix_lens), 4, 16
    sample_ids = torch.full((B, S), -1)
    real = torch.zeros(B, P + S, dtype=torch.bool)  # the outputs that are used: padding's are not
    for r, lens in enumerate(suffix_lens):
        sample_ids[r, :sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        real[r, :prefix_lens[r]] = True
        real[r, P:P + sum(lens)] = True
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, P + S, heads, D, generator=gen, dtype=dtype) for heads in (H, kv_heads, kv_heads)]
    weight = torch.randn(B, P + S, H, D, generator=gen, dtype=dtype) * real[..., None, None]
    results = []
    for split in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = SharedPrefixAttention(torch.tensor(prefix_lens), sample_ids, P, split=split)(0, q, k, v)
        (out * weight).sum().backward()
        results.append([out.detach() * real[..., None, None], q.grad, k.grad, v.grad])
    for got, ref in zip(*results):
        assert ref.abs().max() > 0
        assert rel(got, ref) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_bf16_split_attention_rounds_its_output_once(kv_heads):
    """In bf16 the split path's two suffix parts are merged in fp32: each suffix output is the exact (fp64)
    attention rounded once to bf16, not two bf16-rounded parts merged and rounded again (up to 1.8x the
    error of one rounding); gradients in bf16, as the inputs."""
    prefix_lens, suffix_lens = [11, 17, 6, 9], [[5, 1, 8, 3], [2, 9, 0, 4], [7, 7, 1, 5], [0, 0]]
    B, P, S, H, D = len(prefix_lens), max(prefix_lens), max(sum(s) for s in suffix_lens), 4, 16
    sample_ids = torch.full((B, S), -1)
    for r, lens in enumerate(suffix_lens):
        sample_ids[r, :sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    suffix = (sample_ids >= 0)[..., None, None].expand(B, S, H, D)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, P + S, heads, D, generator=gen).bfloat16() for heads in (H, kv_heads, kv_heads)]
    q, k, v = (t.clone().requires_grad_() for t in inputs)
    out = SharedPrefixAttention(torch.tensor(prefix_lens), sample_ids, P, split=True)(0, q, k, v)
    out.sum().backward()
    assert out.dtype == q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    exact = SharedPrefixAttention(torch.tensor(prefix_lens), sample_ids, P, split=False)(
        0, *(t.double() for t in inputs))[:, P:][suffix]
    err = (out[:, P:][suffix].double() - exact).abs().max()
    one_rounding = (exact.bfloat16().double() - exact).abs().max()
    assert err <= one_rounding * 1.01, (err / one_rounding).item()


def test_split_attention_is_the_cpu_default_on_this_torch():
    """The probe finds torch's CPU flash kernel (CI's torch has it), so the fast path is what the
    trainer runs on CPU, not only what the test above forces."""
    from rpo_engine.model.shared_prefix import split_attention_available

    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
        assert split_attention_available()
    layout = SharedPrefixAttention(torch.tensor([3]), torch.tensor([[0, 0, 1, -1]]), 3)
    assert (layout.layout is not None) == split_attention_available()


def test_prefix_runs_once():
    """The shared layout feeds each prefix token through the model once per group, not G times."""
    model = tiny_model("qwen2")
    groups = make_groups(model.config.vocab_size, [40], [[3, 5, 2, 4, 1, 6, 2, 3]])
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    with torch.no_grad():
        shared_prefix_logprobs(model, groups)
        padded_logprobs(model, groups)
    assert seen == [40 + 26, 8 * (40 + 6 - 1)]
    assert layout_tokens(groups, shared=True) == 66 and layout_tokens(groups, shared=False) == 8 * 46


@pytest.mark.parametrize("shared", [True, False])
def test_micro_batches_pack_whole_groups(shared):
    groups = make_groups(100, [30, 5, 12, 40, 8, 8, 9],
                         [[4] * 4, [2] * 4, [9, 1, 0, 3], [60, 50, 70, 20], [1] * 4, [1] * 4, [2, 1, 1, 1]])
    budget = 150
    batches = micro_batches(groups, budget, shared)
    pieces = [g for b in batches for g in b]
    for g in groups:  # every sample exactly once, with its advantage
        parts = [p for p in pieces if p.prefix_ids is g.prefix_ids]
        samples = sorted((a, s) for p in parts for a, s in zip(p.advantages, p.suffix_ids))
        assert samples == sorted(zip(g.advantages, g.suffix_ids))
        assert len(parts) == 1 or layout_tokens([g], shared) > budget  # split only when it must be
    for b in batches:
        assert layout_tokens(b, shared) <= budget or (len(b) == 1 and len(b[0].suffix_ids) == 1)
    assert len(batches) < len(pieces)  # small groups of about one size share a micro-batch


def test_micro_batches_keep_padding_down():
    """Rows are padded to a micro-batch's longest: a group much larger than the batch starts its own."""
    small, large = make_groups(100, [8, 8], [[2] * 4, [2] * 4]), make_groups(100, [60], [[40] * 4])
    for shared in (True, False):
        batches = micro_batches(small + large, 10_000, shared)
        assert [len(b) for b in batches] == [2, 1]  # the two small groups together, the large one alone
        assert micro_batches(small + large, 10_000, shared, max_padding=100.0) == [small + large]


# ---- the trainer: sharing on and off give the same run ------------------------------------------


def test_sharing_pays_for_rpo_prefixes_not_long_completions():
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                                           intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                           num_key_value_heads=2, tie_word_embeddings=True))  # Qwen2.5-1.5B
    group = lambda P, n, G: PrefixGroup([5] * P, [[5] * n] * G, P)  # noqa: E731
    assert sharing_pays(group(1500, 100, 8), config) and sharing_pays(group(1500, 100, 1), config) is False
    assert sharing_pays(group(200, 300, 8), config)  # full path, moderate completions: still pays
    assert not sharing_pays(group(100, 4096, 16), config)  # the dense 64k x 64k suffix block does not


def one_step(model_dir, *flags):
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(model_dir), "--no-progress", "--prompts-per-step", "3",
                                        "--num-generations", "4", "--max-completion-length", "40",
                                        "--eval-steps", "0", "--reward", "tests.reward_fns:hash_reward",
                                        "--micro-batch-tokens", "200", *flags]))
    suffixes, update = [], trainer.update
    trainer.update = lambda groups, **kw: (suffixes.append([g.suffix_ids for g in groups]), update(groups, **kw))[1]
    return trainer.step(), suffixes


@pytest.mark.parametrize("flags", [
    ["--num-iterations", "2", "--beta", "0.05"],  # RPO, old and reference log-probs
    ["--rpo-loss-on-prefix", "--gradient-checkpointing"],  # the kept path's tokens in the loss
    ["--no-rpo", "--algo", "dapo"],  # full path: prefix = prompt, token-mean
])
def test_trainer_step_same_with_and_without_sharing(tiny_model_dir, flags, monkeypatch):
    import rpo_engine.model.shared_prefix

    # the tiny model's short prompts and long completions would not pay to share: share them anyway
    monkeypatch.setattr(rpo_engine.model.shared_prefix, "sharing_pays", lambda group, config: True)
    on, tokens_on = one_step(tiny_model_dir, *flags)
    off, tokens_off = one_step(tiny_model_dir, *flags, "--no-prefix-sharing")
    assert tokens_on == tokens_off and tokens_on[0]
    for key in ("reward_mean", "rollout_generated_tokens", "num_groups_trained"):
        assert on[key] == off[key], key
    assert on["num_groups_trained"] > 0 and on["grad_norm"] > 0
    assert on["prefix_shared_groups"] == on["num_groups_trained"] and off["prefix_shared_groups"] == 0
    for key in ("loss", "grad_norm", "kl", "clip_frac", "logprob_mismatch", "entropy"):
        assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-6), key
    assert on["entropy"] > 0
    assert on["logprob_mismatch"] < 1e-4  # rollout log-probs equal the shared-prefix training forward's
    assert on["num_micro_batches"] < off["num_micro_batches"]  # the budget counts each prefix once


def test_loss_start_must_leave_a_predicting_position():
    # loss_start 0 would score the first prefix token from row index base - 1: another group's last position
    # (or the batch's very last, wrapped around); past the prefix it would skip suffix tokens
    for bad in (0, -1, 4):
        with pytest.raises(ValueError, match="loss_start must be in"):
            PrefixGroup([5, 6, 7], [[8]], bad)
    assert PrefixGroup([5, 6, 7], [[8]], 1).span(0) == 3 and PrefixGroup([5, 6, 7], [[8]], 3).span(0) == 1


def test_a_split_group_keeps_each_samples_own_data():
    """A group over the token budget is split into runs of samples (take): each piece carries the advantages,
    rollout log-probs and --mask-truncated-completions flags of its own samples, not the first ones'."""
    suffixes = [[10 + i] * (3 + i) for i in range(5)]
    group = PrefixGroup([5] * 20, suffixes, 20, advantages=[0.1 * i for i in range(5)],
                        rollout_logp=[[-0.5 * i] * (3 + i) for i in range(5)], trained=[True, False, True, True, False])
    pieces = [g for b in micro_batches([group], 30, shared=False) for g in b]
    assert len(pieces) > 1
    got = [(s, a, r, g.is_trained(i)) for g in pieces for i, (s, a, r) in
           enumerate(zip(g.suffix_ids, g.advantages, g.rollout_logp))]
    want = [(s, group.advantages[i], group.rollout_logp[i], group.trained[i]) for i, s in enumerate(suffixes)]
    assert sorted(got) == sorted(want)
    assert all(len(g.trained) == len(g.suffix_ids) for g in pieces)
