"""Fused LM-head log-probabilities: log p(target) (and entropy) without the full [N, V] logits.

`fused_logprobs(hidden, weight, targets)` equals
`log_softmax((hidden @ weight.T).float() / T, -1).gather(targets)`, forward and backward; with
`return_entropy=True` also the entropy of each row's softmax, differentiable too (an entropy bonus).
In bf16 the two backends round differently: "torch" rounds the logits to bf16 (cuBLAS's output) before
the fp32 softmax, as that formula does, while "triton" accumulates each logit in fp32 and never rounds it,
so it is the closer to the exact (fp64) value by ~1e-2 on a bf16 model, and "auto" (Triton on CUDA) gives
slightly different values on a GPU than on a CPU. Under torch.autocast both compute in the inputs' dtypes.
The result is fp32 whatever the inputs' dtype (fp64 too), and every target must be a vocabulary index: there
is no ignore index (mask the positions you do not want).

Forward: only lse (fp32), the target logit and optionally the entropy are kept, O(N) memory. Backward:
the logits are recomputed one chunk at a time, grad_logits = (onehot - softmax) * grad / T for the
chunk (plus -p * (log p + H) * grad_entropy / T when the entropy has a gradient: dH/dx_j =
-p_j (log p_j + H)), and two matmuls give its share of grad_hidden and grad_weight. A chunk holds at most
`chunk_numel` logits (default 2^25, 128 MiB in fp32), never the full [N, V].

The backward chunks along whichever axis makes the accumulated gradient the smaller one: with
N <= V (the usual case: 16k tokens, 152k vocab) it takes vocabulary slices [N, V_c], writes each
grad_weight slice once and accumulates grad_hidden [N, H] in fp32; with N > V it takes token slices
[C, V] and accumulates grad_weight [V, H] in fp32. Chunking tokens against a large vocabulary would
re-read and re-write a [V, H] accumulator once per chunk (GBs each time).

Backends: "torch" chunks the forward over tokens (any device); "triton" runs the forward as one
program per token block looping over vocabulary tiles with an online logsumexp, and in the backward a
Triton kernel recomputes each [BLOCK_N, BLOCK_V] logits tile the way the forward did (so the softmax
uses exactly the saved lse) and writes grad_logits; the two matmuls stay in cuBLAS. Liger-Kernel's
fused linear cross-entropy does the gradient in the forward instead; recomputing keeps the forward
cheap when log-probs are computed without grad (old/ref log-probs of a rollout).
"""
import math
import numbers

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch backend needs nothing else
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")
_CHUNK_NUMEL = 1 << 25  # logits per chunk: 128 MiB in fp32


if HAS_TRITON:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, H, temperature,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     UPCAST: tl.constexpr):
        """(hidden[offs_n] @ weight[offs_v].T) / T as an fp32 [BLOCK_N, BLOCK_V] tile."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        rows_n = offs_n.to(tl.int64)[:, None] * H  # int64: N * H or V * H may pass 2^31
        rows_v = offs_v.to(tl.int64)[:, None] * H
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            a = tl.load(h_ptr + rows_n + offs_h[None, :],
                        mask=mask_n[:, None] & mask_h[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
            b = tl.load(w_ptr + rows_v + offs_h[None, :],
                        mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # [BLOCK_V, BLOCK_H]
            if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")  # no TF32: exact to the reference
        return acc / temperature

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, tgt_logit_ptr, ent_ptr, N, V, H, temperature,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    UPCAST: tl.constexpr, WITH_ENTROPY: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)  # [BLOCK_N]
        row_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
        # sum exp(x - max) * (x - max), for the entropy: taken relative to the running max, since
        # lse - E_p[x] of raw logits cancels to nothing for a confident row (both ~40, H ~1e-4)
        sum_exp_x = tl.zeros([BLOCK_N], dtype=tl.float32)
        tgt_logit = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            x = _logits_tile(h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, H, temperature,
                             BLOCK_N, BLOCK_V, BLOCK_H, UPCAST)  # [BLOCK_N, BLOCK_V]
            x = tl.where(mask_v[None, :], x, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(x, axis=1))  # [BLOCK_N]
            scale = tl.exp(row_max - new_max)  # 0 on the first tile (row_max = -inf)
            p = tl.exp(x - new_max[:, None])  # [BLOCK_N, BLOCK_V]
            if WITH_ENTROPY:  # re-base the old sum on the new max: (x - old) = (x - new) + (new - old)
                shift = tl.where(row_max == float("-inf"), 0.0, row_max - new_max)  # no -inf * 0 on tile 1
                sum_exp_x = scale * (sum_exp_x + shift * sum_exp) + tl.sum(
                    p * tl.where(mask_v[None, :], x - new_max[:, None], 0.0), axis=1)
            sum_exp = sum_exp * scale + tl.sum(p, axis=1)
            tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], x, 0.0), axis=1)
            row_max = new_max
        lse = row_max + tl.log(sum_exp)
        tl.store(lse_ptr + offs_n, lse, mask=mask_n)
        tl.store(tgt_logit_ptr + offs_n, tgt_logit, mask=mask_n)
        if WITH_ENTROPY:  # H = lse - E_p[x] = log(sum_exp) - E_p[x - max]
            tl.store(ent_ptr + offs_n, tl.log(sum_exp) - sum_exp_x / sum_exp, mask=mask_n)

    @triton.jit
    def _grad_logits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, grad_ptr, ent_ptr, grad_ent_ptr, out_ptr, N, V, H,
                            v_offset, temperature,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                            UPCAST: tl.constexpr, ENTROPY_GRAD: tl.constexpr):
        """out[n, v] = (onehot(target_n)[v] - softmax(x_n)[v]) * grad_n / T for one [BLOCK_N, BLOCK_V] tile,
        minus p * (log p + H_n) * grad_entropy_n / T with ENTROPY_GRAD.

        w_ptr/V are a slice of the vocabulary starting at v_offset; out is [N, V] for that slice."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_n = offs_n < N
        mask_v = offs_v < V
        x = _logits_tile(h_ptr, w_ptr, offs_n, offs_v, mask_n, mask_v, H, temperature,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST)  # [BLOCK_N, BLOCK_V]
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)  # [BLOCK_N]
        g = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0) / temperature  # [BLOCK_N]
        p = tl.exp(x - lse[:, None])  # [BLOCK_N, BLOCK_V]
        onehot = (offs_v[None, :] + v_offset == tgt[:, None]).to(tl.float32)
        if ENTROPY_GRAD:
            ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
            ge = tl.load(grad_ent_ptr + offs_n, mask=mask_n, other=0.0) / temperature  # [BLOCK_N]
            grad = onehot * g[:, None] - p * (g[:, None] + ge[:, None] * (x - lse[:, None] + ent[:, None]))
        else:
            grad = (onehot - p) * g[:, None]
        tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * V + offs_v[None, :], grad.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_v[None, :])


def _triton_interpreted():
    return HAS_TRITON and type(_fwd_kernel).__name__ == "InterpretedFunction"


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" as "triton" or "torch" for tensors like `x`; "triton" refused where it cannot run on them."""
    if backend == "auto":
        return "triton" if HAS_TRITON and x.is_cuda else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package, which does not import here")
        if not x.is_cuda and not _triton_interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                             "first imported")
    return backend


def _block_sizes(device, dtype):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps). tl.dot needs every block >= 16."""
    if device.type == "cuda":
        # fp32 operands take twice the registers: at BLOCK_H 64 ptxas spilled ~3 KB per thread on sm_80
        # (56-160 B on sm_90), at 32 it spills 0-112 B (0-128 B with triton 3.6; compiled ahead of time,
        # tests/triton_aot.py).
        return (64, 128, 32, 8) if dtype == torch.float32 else (64, 128, 64, 8)
    # Interpreter: numpy per block, so big blocks are faster; these still give several vocab tiles
    # and a ragged last tile on the test shapes.
    return 32, 128, 32, 4


def _chunk_len(numel, other, total):
    """Length of a chunk along one axis so that chunk x other <= numel (rounded to 128 when large)."""
    length = max(1, numel // max(other, 1))
    return max(1, min(total, length // 128 * 128 if length >= 256 else length))


# ---- forward ---------------------------------------------------------------------------------------

def _torch_forward(hidden, weight, targets, temperature, chunk_numel, with_entropy):
    """One [C, V] fp32 buffer per chunk, worked in place (two of half the size with the entropy)."""
    n, v = hidden.shape[0], weight.shape[0]
    chunk = _chunk_len(chunk_numel // 2 if with_entropy else chunk_numel, v, n)
    lse = hidden.new_empty(n, dtype=torch.float32)  # [N]
    tgt_logit = torch.empty_like(lse)  # [N]
    entropy = torch.empty_like(lse) if with_entropy else None  # [N]
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        x = (hidden[s:e] @ weight.T).float().div_(temperature)  # [C, V]
        tgt_logit[s:e] = x.gather(1, targets[s:e, None]).squeeze(1)
        row_max = x.amax(-1, keepdim=True)  # [C, 1]
        x.sub_(row_max)  # x - max: exp below cannot overflow
        if with_entropy:  # H = lse - E_p[x] = log(sum exp(x - max)) - E_p[x - max]
            p = x.exp()  # [C, V], unnormalised
            sum_exp = p.sum(-1)  # [C]
            entropy[s:e] = sum_exp.log() - p.mul_(x).sum(-1) / sum_exp
        else:
            sum_exp = x.exp_().sum(-1)  # [C]
        lse[s:e] = row_max.squeeze(1) + sum_exp.log()
        x = p = None  # freed before the next chunk's logits exist: one chunk at a time, not two
    return lse, tgt_logit, entropy


def _triton_forward(hidden, weight, targets, temperature, with_entropy):
    n, h = hidden.shape
    v = weight.shape[0]
    lse = hidden.new_empty(n, dtype=torch.float32)  # [N]
    tgt_logit = torch.empty_like(lse)  # [N]
    entropy = torch.empty_like(lse) if with_entropy else lse  # [N]; lse is a dummy pointer when unused
    if n == 0:
        return lse, tgt_logit, entropy if with_entropy else None
    block_n, block_v, block_h, warps = _block_sizes(hidden.device, hidden.dtype)
    _fwd_kernel[(triton.cdiv(n, block_n),)](
        hidden, weight, targets, lse, tgt_logit, entropy, n, v, h, temperature,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, UPCAST=_triton_interpreted(),
        WITH_ENTROPY=with_entropy, num_warps=warps)
    return lse, tgt_logit, entropy if with_entropy else None


# ---- backward: grad_logits for one chunk, tokens h_c [C, H] x vocabulary slice w_c [V_c, H] ----------

def _torch_grad_logits(h_c, w_c, tgt_c, lse_c, g_c, ent_c, ge_c, v_offset, temperature):
    x = (h_c @ w_c.T).float().div_(temperature)  # [C, V_c]
    scale = g_c / temperature  # [C]
    if ge_c is None:
        grad = x.sub_(lse_c[:, None]).exp_().mul_(-scale[:, None])  # -softmax * g / T, in place
    else:  # -p * (g + ge * (log p + H)) / T: a second [C, V_c] buffer (the backward halves its chunks)
        logp = x.sub_(lse_c[:, None])
        p = logp.exp()
        grad = logp.add_(ent_c[:, None]).mul_(ge_c[:, None] / temperature).add_(scale[:, None]).mul_(p).neg_()
    local = tgt_c - v_offset  # [C]; targets outside this slice add nothing (no boolean indexing: no sync)
    inside = (local >= 0) & (local < w_c.shape[0])
    grad.scatter_add_(1, local.clamp(0, w_c.shape[0] - 1)[:, None], torch.where(inside, scale, 0.0)[:, None])
    return grad.to(h_c.dtype)  # [C, V_c] in the matmul dtype, as autograd of the reference does


def _triton_grad_logits(h_c, w_c, tgt_c, lse_c, g_c, ent_c, ge_c, v_offset, temperature):
    c, h = h_c.shape
    v = w_c.shape[0]
    out = h_c.new_empty(c, v)  # [C, V_c]
    block_n, block_v, block_h, warps = _block_sizes(h_c.device, h_c.dtype)
    entropy_grad = ge_c is not None  # else lse stands in for the two unused pointers
    _grad_logits_kernel[(triton.cdiv(c, block_n), triton.cdiv(v, block_v))](
        h_c, w_c, tgt_c, lse_c, g_c, ent_c if entropy_grad else lse_c, ge_c if entropy_grad else lse_c, out,
        c, v, h, v_offset, temperature,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, UPCAST=_triton_interpreted(),
        ENTROPY_GRAD=entropy_grad, num_warps=warps)
    return out


def _write_or_accumulate(out, index, a, b, accumulate):
    """out[index] = a @ b, or out += a @ b into an fp32 accumulator (one rounding at the end, not per chunk)."""
    if not accumulate:
        torch.matmul(a, b, out=out[index])
    elif a.dtype == torch.float32:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)  # the bf16 product is one [C, H] or [V_c, H] slice, promoted into the fp32 sum


class _FusedLogprobs(torch.autograd.Function):
    # Both halves in the inputs' dtype, autocast or not: as the Triton kernels compute, and so that the backward's
    # recomputed logits are the forward's (a bf16 forward's logsumexp against fp32 logits leaves softmax rows
    # that do not sum to 1).
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, use_triton, chunk_numel, with_entropy):
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedLogprobs._forward(ctx, hidden, weight, targets, temperature, use_triton, chunk_numel,
                                           with_entropy)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        with torch.autocast(ctx.device_type, enabled=False):
            return _FusedLogprobs._backward(ctx, grad_logp, grad_entropy)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, temperature, use_triton, chunk_numel, with_entropy):
        ctx.device_type = hidden.device.type
        if use_triton:
            lse, tgt_logit, entropy = _triton_forward(hidden, weight, targets, temperature, with_entropy)
        else:
            lse, tgt_logit, entropy = _torch_forward(hidden, weight, targets, temperature, chunk_numel,
                                                     with_entropy)
        logp = tgt_logit - lse  # [N]
        if entropy is None:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.use_triton, ctx.chunk_numel = temperature, use_triton, chunk_numel
        ctx.set_materialize_grads(False)  # an output nobody used gets None: no work for it
        return logp, entropy

    @staticmethod
    def _backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_logits_fn = _triton_grad_logits if ctx.use_triton else _torch_grad_logits
        g = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros_like(lse)  # [N]
        ge = grad_entropy.float().contiguous() if grad_entropy is not None else None  # [N]
        (n, h), v = hidden.shape, weight.shape[0]
        # the torch backend holds two [C, V_c] buffers per chunk for the entropy's gradient
        chunk_numel = ctx.chunk_numel // 2 if ge is not None and not ctx.use_triton else ctx.chunk_numel
        by_vocab = n <= v  # accumulate the smaller of grad_hidden [N, H] and grad_weight [V, H]
        grad_hidden = grad_weight = None
        if need_hidden:  # [N, H]
            grad_hidden = hidden.new_zeros(n, h, dtype=torch.float32) if by_vocab else torch.empty_like(hidden)
        if need_weight:  # [V, H]
            grad_weight = weight.new_zeros(v, h, dtype=torch.float32) if not by_vocab else torch.empty_like(weight)
        if by_vocab:
            step = _chunk_len(chunk_numel, n, v)
            chunks = [(slice(0, n), slice(s, min(s + step, v))) for s in range(0, v, step)]
        else:
            step = _chunk_len(chunk_numel, v, n)
            chunks = [(slice(s, min(s + step, n)), slice(0, v)) for s in range(0, n, step)]
        for rows, cols in chunks:
            h_c, w_c = hidden[rows], weight[cols]  # [C, H], [V_c, H]
            grad_x = grad_logits_fn(h_c, w_c, targets[rows], lse[rows], g[rows], entropy[rows] if ge is not None
                                    else None, ge[rows] if ge is not None else None, cols.start, ctx.temperature)
            if need_hidden:
                _write_or_accumulate(grad_hidden, rows, grad_x, w_c, accumulate=by_vocab)
            if need_weight:
                _write_or_accumulate(grad_weight, cols, grad_x.T, h_c, accumulate=not by_vocab)
            grad_x = None  # freed before the next chunk's logits exist
        grad_hidden = grad_hidden.to(hidden.dtype) if need_hidden else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _check_inputs(hidden, weight, targets, temperature, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor of shape [..., H], got "
                         f"{getattr(hidden, 'dtype', type(hidden))} {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor of shape [V, H], got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden dim mismatch: hidden has H={hidden.shape[-1]} but weight is "
                         f"{tuple(weight.shape)} (expected [V, {hidden.shape[-1]}])")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"hidden and weight must share dtype and device, got hidden {hidden.dtype} on "
                         f"{hidden.device} and weight {weight.dtype} on {weight.device}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    vocab = weight.shape[0]
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"targets must lie in [0, {vocab}) (vocab size of weight), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise ValueError("temperature is taken as a constant: a tensor that requires grad would get none "
                         "(pass a float or temperature.detach())")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def fused_logprobs(hidden, weight, targets, temperature=1.0, backend="auto", return_entropy=False,
                   chunk_numel=None):
    """Per-token log p(target) fp32 [...] from hidden [..., H], LM-head weight [V, H], targets [...].

    Differentiable w.r.t. hidden and weight (gradients in their dtypes). With return_entropy=True also
    returns the softmax entropy per token, fp32, differentiable as well (an entropy bonus in the loss).
    `chunk_numel` bounds the logits that exist at once (default 2^25: 128 MiB in fp32).
    """
    _check_inputs(hidden, weight, targets, temperature, backend)
    backend = _resolve_backend(backend, hidden)
    # an integer: int() would turn 2.5 into 2 silently and fail on "x" with a message that names nothing
    if chunk_numel is not None and (isinstance(chunk_numel, bool) or not isinstance(chunk_numel, numbers.Integral)
                                    or chunk_numel < 1):
        raise ValueError(f"chunk_numel must be None or an integer >= 1, got {chunk_numel!r}")
    out_shape = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # [N, H]
    targets2 = targets.reshape(-1).to(torch.int64).contiguous()  # [N]
    logp, entropy = _FusedLogprobs.apply(hidden2, weight.contiguous(), targets2, float(temperature),
                                         backend == "triton", int(chunk_numel or _CHUNK_NUMEL), bool(return_entropy))
    if return_entropy:
        return logp.reshape(out_shape), entropy.reshape(out_shape)
    return logp.reshape(out_shape)
