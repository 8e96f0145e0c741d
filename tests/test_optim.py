"""MasterWeightAdamW: bf16 model weights stepped through fp32 masters."""
import io

import pytest
import torch

from rpo_engine.optim import MasterWeightAdamW, lr_multiplier, make_adamw, params_with_gradients
from tests.helpers import DEVICE


def _pair(seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    ref.load_state_dict({k: v.bfloat16().float() for k, v in ref.state_dict().items()})  # start bf16-exact
    low = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).bfloat16()
    low.load_state_dict(ref.state_dict())
    return ref, low


def _set_grads(models, step):
    g = torch.Generator().manual_seed(100 + step)
    for params in zip(*(m.parameters() for m in models)):
        grad = torch.randn(params[0].shape, generator=g).bfloat16()  # representable in both dtypes
        for p in params:
            p.grad = grad.to(p.device, p.dtype)


def test_masters_follow_fp32_adamw_exactly():
    ref, low = _pair()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    opt_low = MasterWeightAdamW(low.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(5):
        _set_grads([ref, low], step)
        opt_ref.step()
        opt_low.step()
        opt_low.zero_grad()
        assert all(p.grad is None for p in low.parameters())
    for r, m, p in zip(ref.parameters(), opt_low.masters(), low.parameters()):
        assert m.dtype == torch.float32 and p.dtype == torch.bfloat16
        torch.testing.assert_close(m, r, rtol=0, atol=0)
        torch.testing.assert_close(p, r.bfloat16(), rtol=0, atol=0)


def test_updates_below_bf16_resolution_accumulate():
    # Plain AdamW on bf16 weights drops updates smaller than half an ulp; the masters keep them.
    _, plain = _pair()
    _, mixed = _pair()
    start = [p.detach().clone() for p in mixed.parameters()]
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.0)
    opt_mixed = MasterWeightAdamW(mixed.parameters(), lr=1e-4, weight_decay=0.0)
    for step in range(60):
        _set_grads([plain, mixed], 0)  # the same direction every step
        opt_plain.step()
        opt_mixed.step()
    plain_moved = sum(int((p != s).sum()) for p, s in zip(plain.parameters(), start))
    mixed_moved = sum(int((p != s).sum()) for p, s in zip(mixed.parameters(), start))
    total = sum(p.numel() for p in start)
    assert mixed_moved > 0.9 * total
    assert plain_moved < mixed_moved // 2


@pytest.mark.parametrize("fp32_grad_accumulation", [False, True])
def test_a_param_group_added_later_gets_masters_too(fp32_grad_accumulation):
    """add_param_group (unfreezing layers mid-run): the new group's bf16 weights are stepped through fp32 masters
    as the first groups' are, and their masters are saved, not stepped in bf16 in place."""
    ref, low = _pair()
    opt_ref = torch.optim.AdamW(ref[0].parameters(), lr=1e-3)
    opt_ref.add_param_group({"params": list(ref[1].parameters()), "lr": 1e-2})
    opt = MasterWeightAdamW(low[0].parameters(), lr=1e-3, fp32_grad_accumulation=fp32_grad_accumulation)
    opt.add_param_group({"params": list(low[1].parameters()), "lr": 1e-2})
    assert len(opt.low_precision_pairs()) == 4
    x = torch.randn(3, 16)
    for step in range(3):
        opt.zero_grad()
        opt_ref.zero_grad()
        ref(x).square().sum().backward()
        low(x.bfloat16()).square().sum().backward()
        grads = [m.grad if fp32_grad_accumulation else p.grad for p, m in opt.low_precision_pairs()]
        for r, g in zip(ref.parameters(), grads):
            r.grad = g.float()  # the same gradient for both
        opt.step()
        opt_ref.step()
    for r, m, p in zip(ref.parameters(), opt.masters(), low.parameters()):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, r, rtol=0, atol=0)
        torch.testing.assert_close(p, r.bfloat16(), rtol=0, atol=0)
    assert len(opt.state_dict()["master_weights"]) == 4


def test_state_dict_resumes_from_the_masters():
    _, low = _pair()
    opt = MasterWeightAdamW(low.parameters(), lr=1e-3)
    for step in range(3):
        _set_grads([low], step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": low.state_dict(), "opt": opt.state_dict()}, buffer)
    for step in range(3, 5):
        _set_grads([low], step)
        opt.step()

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    _, resumed = _pair(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = MasterWeightAdamW(resumed.parameters(), lr=1e-3)
    opt2.load_state_dict(saved["opt"])
    for step in range(3, 5):
        _set_grads([resumed], step)
        opt2.step()
    for a, b in zip(opt.masters(), opt2.masters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(low.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_state_dict_masters_are_cpu_copies_and_load_back_onto_the_device():
    """The saved masters go to a CPU file: copied there, not cloned on the device (a second fp32 model's worth
    of GPU memory at every save); loading puts them back as fp32 beside the model, which takes their rounding."""
    _, low = _pair()
    low.to(DEVICE)
    opt = MasterWeightAdamW(low.parameters(), lr=1e-3)
    _set_grads([low], 0)
    opt.step()
    saved = opt.state_dict()["master_weights"]
    assert [w.device.type for w in saved] == ["cpu"] * len(opt.masters())
    for w, m in zip(saved, opt.masters()):
        assert w.dtype == torch.float32 and torch.equal(w, m.cpu()) and w.data_ptr() != m.data_ptr()
    _, resumed = _pair(seed=1)
    resumed.to(DEVICE)
    opt2 = MasterWeightAdamW(resumed.parameters(), lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    for m, w, p in zip(opt2.masters(), saved, resumed.parameters()):
        assert m.device == p.device and m.dtype == torch.float32 and torch.equal(m.cpu(), w)
        assert torch.equal(p, m.bfloat16())


def test_make_adamw_is_plain_adamw_for_fp32_models():
    model = torch.nn.Linear(4, 4)
    opt = make_adamw(model, lr=1e-3, weight_decay=0.01)
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert isinstance(make_adamw(model.bfloat16(), lr=1e-3, weight_decay=0.01), MasterWeightAdamW)


def test_fp64_weights_are_stepped_in_fp64():
    """Masters are for weights narrower than fp32: an fp64 model (load_model(dtype=torch.float64), the tests'
    exact references) is stepped as plain AdamW steps it, not through fp32 copies that round every weight to
    fp32 at each step; given to MasterWeightAdamW, its fp64 parameters are stepped in place like fp32 ones."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).double()
    ref = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).double()
    ref.load_state_dict(model.state_dict())
    opt = make_adamw(model, lr=1e-3, weight_decay=0.1)
    opt_ref = torch.optim.AdamW([{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    mixed = torch.nn.Sequential(torch.nn.Linear(16, 8).double(), torch.nn.Linear(8, 4).bfloat16())
    opt_mixed = MasterWeightAdamW(mixed.parameters(), lr=1e-3)
    assert [p.dtype for p, _ in opt_mixed.low_precision_pairs()] == [torch.bfloat16] * 2
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_lr_schedules_match_hugging_face_after_the_warmup():
    """Each --lr-scheduler-type is Hugging Face's schedule of that name from the warmup's end on (during the
    warmup ours starts at 1 / (warmup + 1) instead of 0), on fresh lengths."""
    from transformers import get_scheduler

    g = torch.Generator().manual_seed(0)
    for kind in ("cosine_with_min_lr", "cosine", "linear", "constant_with_warmup", "constant"):
        total = int(torch.randint(5, 60, (1,), generator=g))
        # at least 1 (seed 0 drew 0 for cosine, which left its warmup and the decay's offset after it unchecked)
        warmup = 0 if kind == "constant" else int(torch.randint(1, total // 2 + 1, (1,), generator=g))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        kwargs = {"min_lr_rate": 0.1} if kind == "cosine_with_min_lr" else {}
        hf = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs)
        for step in range(total):
            expected = hf.get_last_lr()[0] / 2.0
            ours = lr_multiplier(step, total, warmup, kind)
            if step >= warmup:
                assert abs(ours - expected) < 1e-12, (kind, step)
            else:  # linear from above 0 to 1
                assert ours == (step + 1) / (warmup + 1)
            opt.step()
            hf.step()
    assert lr_multiplier(0, 10, 3, "constant") == 1.0  # no warmup, as Hugging Face's constant
    assert lr_multiplier(9, 10, 0, "cosine_with_min_lr") > 0.1 and lr_multiplier(10, 10, 0, "cosine_with_min_lr") == 0.1
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(0, 10, 0, "exponential")


def test_make_adamw_takes_betas_and_eps():
    model = torch.nn.Linear(4, 2)
    opt = make_adamw(model, 1e-3, 0.0, (0.8, 0.95), 1e-6)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in opt.param_groups)
    low = make_adamw(torch.nn.Linear(4, 2).bfloat16(), 1e-3, 0.0, (0.8, 0.95), 1e-6)
    assert isinstance(low, MasterWeightAdamW) and low.param_groups[0]["eps"] == 1e-6


def test_warmup_steps_round_up_as_hugging_face():
    """--warmup-ratio's step count is Hugging Face's (TrainingArguments.get_warmup_steps: rounded up), so a short
    run still warms up: 5% of 10 steps is one step, not none."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from rpo_engine.config import warmup_length

    def warmup_steps(ratio, total):
        return warmup_length(SimpleNamespace(warmup_steps=None, warmup_ratio=ratio, steps=total))

    for ratio in (0.0, 0.03, 0.05, 0.1, 0.2, 0.25, 0.5, 0.99):
        for total in (1, 3, 4, 10, 19, 20, 30, 39, 40, 100, 333):
            hf = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
            assert warmup_steps(ratio, total) == hf, (ratio, total)
    assert warmup_steps(0.05, 10) == 1 and warmup_steps(0.05, 40) == 2


def test_resume_across_a_change_of_the_weights_dtype():
    """A run resumed in another dtype than it saved in (--dtype, or --dtype auto on another device): a bf16 run's
    fp32 masters become a float32 model's weights exactly (not their bf16 rounding, which its checkpoint holds),
    and a float32 run's state loads into MasterWeightAdamW, the masters started from the model's weights."""
    from rpo_engine.optim import load_adamw_state

    _, low = _pair()
    opt = make_adamw(low, lr=1e-4, weight_decay=0.1)
    for step in range(3):
        _set_grads([low], step)
        opt.step()
    state = opt.state_dict()
    high = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # the checkpoint's bf16 weights
    opt_high = make_adamw(high, lr=1e-4, weight_decay=0.1)
    load_adamw_state(opt_high, state)
    masters = {id(p): m for p, m in zip(opt.model_params, opt.masters())}
    assert any(not torch.equal(p.float(), masters[id(p)]) for p in low.parameters())  # sub-ulp updates held there
    for p, q in zip(low.parameters(), high.parameters()):
        assert torch.equal(q, masters[id(p)])
    assert torch.equal(opt_high.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])

    fp32_state = opt_high.state_dict()
    _, back = _pair(seed=1)
    back.load_state_dict({k: v.bfloat16() for k, v in high.state_dict().items()})
    opt_back = make_adamw(back, lr=1e-4, weight_decay=0.1)
    load_adamw_state(opt_back, fp32_state)
    assert all(torch.equal(m, p.float()) for p, m in opt_back.low_precision_pairs())
    assert torch.equal(opt_back.state_dict()["state"][0]["exp_avg_sq"], fp32_state["state"][0]["exp_avg_sq"])
    _set_grads([back], 3)
    opt_back.step()



def _mlp(*sizes):
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
    return torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())][:-1]).bfloat16()


def _summed_micro_batch_grads(model, inputs, sizes):
    """The fp32 sum of each micro-batch's own bf16 gradient (what autograd hands a parameter in that backward),
    taken on a twin of `model` with no hooks."""
    twin = _mlp(*sizes)
    twin.load_state_dict(model.state_dict())
    sums = [torch.zeros(p.shape) for p in twin.parameters()]
    for x in inputs:
        twin.zero_grad(set_to_none=True)
        twin(x).square().sum().backward()
        for total, p in zip(sums, twin.parameters()):
            total += p.grad.float()
    return sums


def test_fp32_grad_accumulation_sums_micro_batches_in_fp32():
    """24 micro-batches: with fp32_grad_accumulation the masters' gradient is the fp32 sum of the bf16 gradients
    of each backward, exactly, and the model keeps no bf16 .grad; summed in bf16 (.grad's own accumulation)
    the same gradient is off by ~0.5% of its size."""
    torch.manual_seed(0)
    sizes = (64, 64, 32)
    model, bf16_sum = _mlp(*sizes), _mlp(*sizes)
    bf16_sum.load_state_dict(model.state_dict())
    inputs = [torch.randn(16, 64).bfloat16() for _ in range(24)]
    want = _summed_micro_batch_grads(model, inputs, sizes)

    optimizer = MasterWeightAdamW(model.parameters(), lr=1e-3, fp32_grad_accumulation=True)
    for x in inputs:
        model(x).square().sum().backward()
        bf16_sum(x).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert params_with_gradients(optimizer) == optimizer.masters()
    for m, w in zip(optimizer.masters(), want):
        torch.testing.assert_close(m.grad, w, rtol=0, atol=0)
    err = max(float((p.grad.float() - w).norm() / w.norm()) for p, w in zip(bf16_sum.parameters(), want))
    assert err > 2e-3  # what the fp32 sum saves


def test_fp32_grad_accumulation_steps_as_fp32_adamw_on_the_summed_gradient():
    """Two optimizer steps of 5 micro-batches each, clipped through params_with_gradients(): the masters equal fp32 AdamW
    stepped with the fp32 sum (clipped alike), bitwise; zero_grad clears the sum between steps."""
    torch.manual_seed(1)
    sizes = (16, 8, 4)
    low = _mlp(*sizes)
    ref = _mlp(*sizes).float()
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    optimizer = MasterWeightAdamW(low.parameters(), lr=1e-2, weight_decay=0.1, fp32_grad_accumulation=True)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        inputs = [torch.randn(4, 16).bfloat16() for _ in range(5)]
        for p, g in zip(ref.parameters(), _summed_micro_batch_grads(low, inputs, sizes)):
            p.grad = g
        optimizer.zero_grad()
        for x in inputs:
            low(x).square().sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(params_with_gradients(optimizer), 1.0)
        optimizer.step()
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0), rtol=0, atol=0)
        opt_ref.step()
        for m, r, p in zip(optimizer.masters(), ref.parameters(), low.parameters()):
            torch.testing.assert_close(m, r, rtol=0, atol=0)
            torch.testing.assert_close(p, r.bfloat16(), rtol=0, atol=0)
