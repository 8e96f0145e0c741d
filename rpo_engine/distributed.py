"""Training across processes and nodes with torchrun: process group, DDP / FSDP2 wrapping, collectives.

`torchrun --nproc-per-node N -m rpo_engine.train ...` starts N ranks; `Dist.from_env` sees torchrun's
RANK / WORLD_SIZE / LOCAL_RANK and joins the process group (NCCL on CUDA, gloo on the CPU). Without
torchrun nothing here touches torch.distributed and every collective below is the identity.

How the trainer splits a step (trainer.py): every rank holds the same config, data order, RNG and
experience cache. The step's prompts are the same list on every rank; rank r rolls out a contiguous
share of them, whole groups only, with its own RolloutEngine. What decides the next move (rewards,
the cache's pick per group, DAPO's informative groups) is gathered to every rank, so all ranks draw
the same cuts and cache choices from the same RNG and agree on resample rounds and on updating. The
update then runs each rank's own groups; gradients are reduced by DDP or FSDP2, in fp32 either way: under
ddp with bf16 weights, not by DDP (its reducer all-reduces the bf16 .grad) but by `Dist.sum_gradients`,
which sums the optimizer's fp32 masters' gradients once the mini-batch's backwards are done.

Weights for rollout:
- ddp: every rank holds the full model; the engine reads it live, as in one process.
- fsdp: FSDP2 (`fully_shard`, per decoder layer + root) shards a float32 copy of the model (params,
  grads and AdamW state: what dominates memory); the model the trainer was given stays a plain,
  unsharded module in its own dtype (bf16 on a GPU) that the engine reads. It is refreshed from the
  shards (`DTensor.full_tensor()`, one all-gather per parameter) once after each optimizer step, when
  the next rollout, eval or save needs it. We keep this replica rather than unsharding around
  `generate` because FSDP2's forward hooks all-gather inside every layer call, and ranks decode
  different numbers of steps: collectives inside generation would deadlock, and a plain module keeps
  the engine's CUDA graphs valid (parameters are copied in place, their addresses never change).
  The sharded copy computes in the replica's dtype (MixedPrecisionPolicy) and reduces in float32.
"""
from __future__ import annotations

import copy
import gc
import inspect
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from rpo_engine.errors import UserError
from rpo_engine.model.shared_prefix import group_logprobs
from rpo_engine.optim import trains_low_precision

# The most bytes one coalesced collective moves (Dist.sum_gradients, the start-up weight broadcast): a few large
# flat buffers a step, not one collective a parameter; each is also a temporary copy of what it moves.
COALESCED_BUCKET_BYTES = 128 * 2**20


def no_forward_buffer_sync(ddp_class) -> dict:
    """DDP's keyword for "do not broadcast buffers before each forward": forward_sync_buffers since torch
    2.13 (which deprecates broadcast_buffers=False), broadcast_buffers before (the GPU image has 2.11)."""
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class PolicyForward(nn.Module):
    """The training forward as a module call: (groups, shared, with_entropy) -> (logp, mask[, entropy]).

    The log-prob path calls `model.hidden_states` and reads `lm_head.weight` directly; DDP and
    fully_shard hook `forward`, so the gradient pass must enter through a module's forward.
    """

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, groups, shared: bool, with_entropy: bool = False):
        return group_logprobs(self.model, groups, self.temperature, shared=shared, with_entropy=with_entropy)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "none": one process, no torch.distributed; else ddp or fsdp
    device: torch.device = torch.device("cpu")  # where collective tensors live (CUDA for NCCL)

    @classmethod
    def from_env(cls, parallel: str, device_type: str, timeout_s: float) -> "Dist":
        """Join torchrun's process group, or a single process when not launched by torchrun."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:  # else CUDA's "invalid device ordinal" traceback
                raise UserError(f"local rank {local_rank} has no GPU of its own: this machine shows {gpus}; start at "
                                f"most {gpus} ranks per machine (--nproc-per-node), or train with --device cpu")
            torch.cuda.set_device(local_rank)
            backend, device = "nccl", torch.device("cuda", local_rank)
        else:
            backend, device = "gloo", torch.device("cpu")
        # The timeout bounds a collective that waits on a dead peer (gloo raises; NCCL aborts), so a
        # failure torchrun does not see (another node's) still ends the job instead of hanging it.
        try:
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
            # torchrun's agent keeps its store across the restarts of --max-restarts, and the group's keys (each
            # rank's address) from the attempt before: read again, a restarted gloo group connected to ranks that
            # were gone, and failed. Each attempt keys its group apart.
            store = dist.PrefixStore(f"rpo_engine/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
        except ValueError as e:  # env:// without MASTER_ADDR / MASTER_PORT: RANK left set in a plain shell or job
            raise UserError(f"torch.distributed cannot start: {e}; RANK and WORLD_SIZE are set as torchrun sets them, "
                            f"without its rendezvous: launch with torchrun, or unset them to train in one process") from None
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, parallel, device)

    @property
    def enabled(self) -> bool:
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items (sizes differ by at most one; may be empty)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return range(lo, lo + base + (self.rank < extra))

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values, op) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sums_master_gradients(self, model: nn.Module) -> bool:
        """ddp with low-precision trained weights (bf16 on a GPU, fp32 masters in the optimizer): the policy is not
        DDP-wrapped, each backward's gradient is summed into the fp32 masters as in one process, and the trainer
        all-reduces them with `sum_gradients` after the mini-batch's last backward."""
        return self.parallel == "ddp" and trains_low_precision(model)

    @torch.no_grad()
    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Every rank's gradients of `params` (the fp32 masters), summed in fp32 into each rank's .grad. The
        trainer's loss is normalised over every rank's tokens, so the sum is the global batch's gradient (DDP's
        mean of world_size-scaled losses, without scaling the bf16 backward). A parameter without a gradient here
        joins with zeros; one without on every rank keeps None, as in one process. Coalesced into flat buckets,
        one all-reduce each. Its cost, against DDP's over bf16: not overlapped with the backward (it runs after
        the last one) and twice the bytes; the price of micro-batches and ranks summing in fp32."""
        if not self.enabled or not params:
            return
        had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        coalesced(dist.all_reduce, [*grads, had])
        for p, grad, any_rank in zip(params, grads, had.tolist()):
            p.grad = grad if any_rank else None

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """End of a good run: wait for every rank (rank 0 still writes), then leave the group together."""
        if self.enabled and dist.is_initialized():
            gc.collect()  # FSDP's module cycles (their DTensors, meshes, collectives' work) go while the group is up
            dist.barrier()
            dist.destroy_process_group()

    # ---- the model -----------------------------------------------------------------------------
    def wrap(self, model: nn.Module, temperature: float) -> tuple[nn.Module, nn.Module]:
        """(rollout model, policy): the plain module with full weights, and the gradient forward."""
        if self.parallel == "none":
            return model, PolicyForward(model, temperature)
        plain_ddp = self.sums_master_gradients(model)  # no DDP: it would all-reduce the bf16 gradients (sum_gradients)
        if self.parallel == "ddp" and not plain_ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Rank 0's weights are broadcast here; buffers (RoPE frequencies, computed from the config on every
            # rank) never change, so they are not broadcast on every forward.
            ids = [self.local_rank] if self.device.type == "cuda" else None
            return model, DDP(PolicyForward(model, temperature), device_ids=ids, **no_forward_buffer_sync(DDP))
        # What DDP's wrap does, done here: every rank starts from rank 0's weights. Under fsdp each rank cuts its
        # shard from its replica, which the rollout reads too.
        self.broadcast_weights(model)
        if plain_ddp:
            return model, PolicyForward(model, temperature)
        return model, float32_shards(model, temperature)

    def broadcast_weights(self, model: nn.Module) -> None:
        """Rank 0's parameters into every rank's `model`, one coalesced broadcast. Ranks can load different
        weights from one name (each node's own Hub snapshot, or starter model built on its own CPUs). Buffers
        (RoPE frequencies) come from the config."""
        if self.enabled:
            coalesced(lambda flat: dist.broadcast(flat, src=0), list(model.parameters()))

    @torch.no_grad()
    def copy_to_replica(self, policy: nn.Module, replica: nn.Module) -> None:
        """fsdp: write the sharded weights, gathered whole, into the rollout replica (a collective)."""
        sharded = list(policy.parameters())
        plain = list(replica.parameters())
        assert len(sharded) == len(plain)
        for p, q in zip(sharded, plain):
            q.copy_(full_tensor(p))


@torch.no_grad()
def coalesced(collective, tensors: list[torch.Tensor]) -> None:
    """Run an in-place collective (all_reduce, a broadcast) on `tensors` through flat buffers of one dtype and
    device, at most COALESCED_BUCKET_BYTES each (a tensor larger than that gets one of its own), written back in
    place. Every rank must pass tensors of the same shapes, in the same order."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buckets: dict[tuple, list[torch.Tensor]] = {}  # by (dtype, device)
    sizes: dict[tuple, int] = {}

    def flush(key):
        bucket = buckets.pop(key)
        del sizes[key]
        flat = _flatten_dense_tensors(bucket)
        collective(flat)
        for t, done in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(done)

    for t in tensors:
        key = (t.dtype, t.device)
        if key in buckets and sizes[key] + t.nbytes > COALESCED_BUCKET_BYTES:
            flush(key)
        buckets.setdefault(key, []).append(t)
        sizes[key] = sizes.get(key, 0) + t.nbytes
    for key in list(buckets):
        flush(key)


@torch.no_grad()
def float32_shards(model: nn.Module, temperature: float) -> nn.Module:
    """fsdp: the gradient forward over a float32 copy of `model` (the sharded masters; `model` stays the rollout
    replica), fully_shard-ed per decoder layer and at the root. The copy never exists whole: it is made on the
    meta device (no memory), sharded there, given memory for this rank's shards only, and filled from `model`
    one parameter at a time (each rank cuts its shard from its own replica, which Dist.wrap made rank 0's)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor

    def float32_on_meta(t):
        return torch.empty_like(t, device="meta", dtype=torch.float32 if t.is_floating_point() else t.dtype)

    # deepcopy's memo gives each tensor its meta stand-in; the rest (config, flags) is copied as it is
    stand_ins = {id(p): nn.Parameter(float32_on_meta(p), requires_grad=p.requires_grad) for p in model.parameters()}
    stand_ins.update({id(b): float32_on_meta(b) for b in model.buffers()})
    train = copy.deepcopy(model, stand_ins)
    mp = MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=torch.float32)
    for layer in train.model.layers:
        fully_shard(layer, mp_policy=mp)
    policy = fully_shard(PolicyForward(train, temperature), mp_policy=mp)
    policy.to_empty(device=model.device)
    for shard, whole in zip(policy.parameters(), model.parameters(), strict=True):
        shard.copy_(distribute_tensor(whole.float(), shard.device_mesh, shard.placements, src_data_rank=None))
    for copied, buffer in zip(policy.buffers(), model.buffers(), strict=True):
        copied.copy_(buffer)
    return policy


def full_tensor(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def consolidated_optimizer_state(optimizer, low_precision: bool, keep: bool) -> dict | None:
    """fsdp: the optimizer's state with every sharded tensor gathered whole (a collective: every rank calls it).

    The result has the layout of a one-process optimizer's state_dict, so a checkpoint resumes on any
    number of ranks, sharded or not. When the replica is low precision, the float32 shards are also
    written as the `master_weights` a one-process bf16 run keeps (rpo_engine/optim.py). Only a rank
    that `keep`s it (the one that writes it) builds the whole state on the CPU; the others join each
    gather and drop its result at once (None), holding one gathered tensor at a time.
    """
    def gathered(t):
        whole = full_tensor(t)
        return whole.cpu() if keep else None

    state = optimizer.state_dict()
    state["state"] = {i: {k: gathered(v) for k, v in s.items()} for i, s in state["state"].items()}
    if low_precision:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state["master_weights"] = [gathered(p.detach()) for p in params]
    return state if keep else None


@torch.no_grad()
def load_consolidated_optimizer_state(optimizer, state: dict) -> None:
    """fsdp: load a one-process layout state (any rank count wrote it), sharding it like the parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = dict(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    masters = state.pop("master_weights", [])

    def like(t, p):
        if isinstance(p, DTensor) and isinstance(t, torch.Tensor) and t.shape == p.shape:
            return distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements)
        return t

    if masters:  # exact float32 weights of a low-precision run
        if len(masters) != len(params):
            raise ValueError(f"optimizer state has {len(masters)} master weights, the model needs {len(params)}")
        for p, w in zip(params, masters):
            p.copy_(like(w, p))
    state["state"] = {i: {k: like(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict(state)


def leave_process(code: int) -> NoReturn:
    """End a rank's process now, after Dist.close, skipping the interpreter's teardown. torch keeps a destroyed
    process group alive through DTensor's sharding cache (its device mesh holds the group), so the group's C++
    destructor runs during that teardown, where gloo's can abort the process (SIGABRT, "terminate called without
    an active exception"; seen at the end of good 2-rank fsdp runs on the CPU), and torchrun then reports a
    failed job. Everything the run writes is closed by then; only stdio is left to flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# How gloo words a collective whose peer process is gone (that peer failed first, or was killed).
PEER_GONE = ("closed by peer", "reset by peer", "broken pipe")


def write_torchrun_error(message: str, callstack: str | None = None, later_by_s: int = 0) -> None:
    """Under torchrun, this rank's failure for torchrun's summary: the error file it gives each rank
    (TORCHELASTIC_ERROR_FILE), in torch.distributed.elastic's ErrorHandler format. Of the failed ranks, torchrun
    names the one with the earliest timestamp (whole seconds) the root cause; a rank without an error file is
    stamped when torchrun sees it exit."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    extra = {"timestamp": str(int(time.time()) + later_by_s)}
    if callstack is not None:  # torchrun shows it in place of the message (an empty one: nothing at all)
        extra["py_callstack"] = callstack
    with open(path, "w") as f:
        json.dump({"message": {"message": message, "extraInfo": extra}}, f)


class RankErrorHandler(ErrorHandler):
    """@record's error file for a rank's exception (a bug, not a user mistake), stamped a second late when it is
    a collective that lost its peer: the peer failed first (its error file is written before its connections
    close), and its failure, not this consequence of it, is the root cause torchrun should name."""

    def record_exception(self, e: BaseException) -> None:
        peer_gone = any(words in str(e).lower() for words in PEER_GONE)
        write_torchrun_error(f"{type(e).__name__}: {e}", traceback.format_exc(), later_by_s=int(peer_gone))


def check_divisible(prompts_per_step: int, world_size: int) -> None:
    if prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step ({prompts_per_step}) must be divisible by the number of ranks "
                        f"({world_size}): each rank rolls out prompts_per_step / world_size prompts")
