"""MasterWeightAdamW: bf16 model weights stepped through fp32 masters."""
import io

import torch

from rpo_engine.optim import MasterWeightAdamW, make_adamw


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
            p.grad = grad.to(p.dtype)


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


def test_make_adamw_is_plain_adamw_for_fp32_models():
    model = torch.nn.Linear(4, 4)
    opt = make_adamw(model, lr=1e-3, weight_decay=0.01)
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert isinstance(make_adamw(model.bfloat16(), lr=1e-3, weight_decay=0.01), MasterWeightAdamW)
