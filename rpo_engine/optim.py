"""AdamW for a model whose weights are kept in bf16, with fp32 master weights inside the optimizer.

The rollout engine reads the live weights of the model being trained, so on a GPU those weights are
bf16 (fast decode, half the memory) and there is no second copy to sync. Updating bf16 weights in place
loses every update smaller than half a bf16 ulp (about 0.4% of the weight), which at RL learning rates
is most of them. So the optimizer keeps an fp32 copy of each bf16 parameter, steps AdamW on the copy
with the gradient promoted to fp32, and writes the rounded result back into the model: the usual
"bf16 params + fp32 master weights" mixed precision (Megatron, DeepSpeed), without autocast re-casting
weights on every forward. Parameters that are already fp32 (or fp64) are stepped in place, as plain AdamW does.

With `fp32_grad_accumulation`, each backward's bf16 gradient is added into the master's fp32 gradient as
soon as autograd has it (and the bf16 one dropped), so micro-batches sum in fp32 as Megatron's and
DeepSpeed's bf16 optimizers sum them: summed in bf16, 6-33 micro-batches lose 0.3-0.5% of the gradient.
The gradients then live on the masters, which is where clipping must read them (`params_with_gradients`).
Under `--parallel ddp` too: the trainer then keeps DDP's reducer (which would read and all-reduce each bf16
.grad) out of it and all-reduces the masters' fp32 gradients itself (distributed.Dist.sum_gradients).
"""
from __future__ import annotations

import functools
import math

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` over fp32 masters of the model's low-precision parameters.

    Takes the model's parameters (or param groups) like AdamW. `step()` copies each low-precision
    parameter's gradient into its master, steps, and copies the master back; `zero_grad()` clears the
    model's gradients. `state_dict()` carries the masters, so a resumed run continues from the exact
    fp32 weights rather than from their bf16 rounding.
    """

    def __init__(self, params, fp32_grad_accumulation: bool = False, **kwargs):
        self.model_params: list[torch.Tensor] = []
        # Off by default: an embedder's own loop that clips model.parameters() would find no gradients there, and
        # a DDP reducer would find no bf16 .grad to all-reduce (the trainer's ddp path runs without one).
        self.fp32_grad_accumulation = fp32_grad_accumulation
        super().__init__(params, **kwargs)  # each group through add_param_group below

    def add_param_group(self, param_group: dict) -> None:
        """A group of model parameters, each low-precision one replaced by its fp32 master: torch's __init__ adds
        the first groups through here, and a group added later (layers unfrozen mid-run) gets masters alike."""
        params = param_group["params"]
        if isinstance(params, set):  # torch's refusal (an unordered set would scramble a saved state's order)
            return super().add_param_group(param_group)
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if not {id(q) for q in self.model_params}.isdisjoint(map(id, params)):  # torch's would see two fresh masters
            raise ValueError("some parameters appear in more than one parameter group")
        masters = [p.detach().float().clone().requires_grad_(p.requires_grad) if _needs_master(p) else p
                   for p in params]
        super().add_param_group(dict(param_group, params=masters))
        self.model_params.extend(params)
        for p, m in zip(params, masters):
            if self.fp32_grad_accumulation and p is not m:
                p.register_post_accumulate_grad_hook(functools.partial(_add_grad_into, m))

    def masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def low_precision_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(model parameter, its fp32 master) for the parameters that are not fp32 themselves."""
        return [(p, m) for p, m in zip(self.model_params, self.masters()) if p is not m]

    @torch.no_grad()
    def step(self, closure=None):
        pairs = self.low_precision_pairs()
        for p, m in pairs:
            if self.fp32_grad_accumulation:
                if p.grad is not None:  # set by hand, not by a backward: the hook never saw it
                    _add_grad_into(m, p)
            else:
                m.grad = None if p.grad is None else p.grad.float()
        loss = super().step(closure)
        for p, m in pairs:
            p.copy_(m)  # round to the model's dtype
            if not self.fp32_grad_accumulation:
                m.grad = None  # the model's .grad is the gradient; this was its fp32 copy
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self):
        state = super().state_dict()
        # a copy on the CPU, where a checkpoint goes anyway: no second set of fp32 masters on the device
        state["master_weights"] = [m.detach().to("cpu", copy=True) for _, m in self.low_precision_pairs()]
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        low = self.low_precision_pairs()
        if saved is None:  # a float32 run's state, resumed in bf16: the masters are the model's (rounded) weights
            for p, m in low:
                m.copy_(p)
            return
        if len(saved) != len(low):
            raise ValueError(f"optimizer state has {len(saved)} master weights, the model needs {len(low)}")
        for (p, m), w in zip(low, saved):
            m.copy_(w)
            p.copy_(m)


def params_with_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors whose .grad the optimizer's next step reads: what to clip, and to check for inf/NaN (under
    MasterWeightAdamW the masters when gradients accumulate in fp32, else the model's parameters)."""
    if isinstance(optimizer, MasterWeightAdamW) and not optimizer.fp32_grad_accumulation:
        return list(optimizer.model_params)
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def _add_grad_into(master: torch.Tensor, param: torch.Tensor) -> None:
    """Move `param`'s low-precision gradient into `master`'s fp32 one (the sum of the backwards so far)."""
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad.add_(param.grad)
    param.grad = None


@torch.no_grad()
def load_adamw_state(optimizer: torch.optim.AdamW, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, also where the run resumed with other weights' dtype than it saved
    with (--dtype, or --dtype auto on another device): a bf16 run's fp32 masters become a float32 model's
    weights, exactly (its checkpoint's weights are their bf16 rounding), and a float32 run's state starts
    MasterWeightAdamW's masters from the model's weights."""
    if isinstance(optimizer, MasterWeightAdamW):
        optimizer.load_state_dict(state)
        return
    state = dict(state)
    masters = state.pop("master_weights", None)
    optimizer.load_state_dict(state)
    if masters:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if len(masters) != len(params):
            raise ValueError(f"optimizer state has {len(masters)} master weights, the model needs {len(params)}")
        for p, w in zip(params, masters):
            p.copy_(w)


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine_with_min_lr") -> float:
    """The learning rate at optimizer step `step` (0-based) of `total`, as a fraction of the peak: a linear
    warmup over the first `warmup` steps, then `kind`'s decay over the rest (Hugging Face's schedules by
    name; cosine_with_min_lr at its min_lr_rate 0.1). The warmup starts at 1 / (warmup + 1), not at 0 as
    Hugging Face's does, so no step is spent at a zero learning rate."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    cosine = max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    if kind == "cosine":
        return cosine
    if kind == "cosine_with_min_lr":
        return 0.1 + 0.9 * cosine
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


def make_adamw(model, lr: float, weight_decay: float, betas=(0.9, 0.99), eps: float = 1e-8,
               fp32_grad_accumulation: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (frozen ones, a LoRA base, get no state and no fp32 master), with
    weight decay on matrices only; fp32 masters when the trained weights are low precision (and, with
    `fp32_grad_accumulation`, their gradients summed in fp32: see MasterWeightAdamW)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if trains_low_precision(model):
        return MasterWeightAdamW(groups, lr=lr, betas=betas, eps=eps, fp32_grad_accumulation=fp32_grad_accumulation)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def trains_low_precision(model) -> bool:
    """Whether some trained parameter of `model` is narrower than fp32: then make_adamw keeps fp32 masters."""
    return any(p.requires_grad and _needs_master(p) for p in model.parameters())


def _needs_master(p: torch.Tensor) -> bool:
    """bf16 / fp16 weights get an fp32 master; fp32 and fp64 ones are stepped in place (an fp32 master of an fp64
    weight would round it to fp32 at every step)."""
    return p.is_floating_point() and torch.finfo(p.dtype).bits < 32
