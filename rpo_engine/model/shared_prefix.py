"""Per-token log-probs of GRPO groups (one prefix, G suffixes), with the prefix run once.

After RPO a group's G sequences share prompt + kept reasoning path, often 90%+ of their tokens. The
plain padded batch (`padded_logprobs`, the reference) runs that prefix through forward and backward
G times. `shared_prefix_logprobs` lays each group out as ONE row,

    [ prefix (right-padded to the longest prefix) | suffix_1 suffix_2 ... suffix_G (packed, padded) ]

with positions 0..P-1 for the prefix and P.. for each suffix (`SharedPrefixAttention`). Prefix
queries attend causally over the prefix; a suffix query over the real prefix and, causally, its own
suffix. On CPU that is unmasked flash calls per layer: one for the prefixes causally, one per group for
its suffix queries against its prefix K/V, one for every suffix causally against itself (the suffixes'
tokens gathered, padded to the longest), the last two merged exactly by their log-sum-exps. Elsewhere it
is two SDPA calls, the second with keys = the whole row under a block mask. Either way the prefix's K/V
are the row's own, never copied per suffix. Gradients reach each prefix token once per group. verl's
PrefixGrouper instead repeats the prefix K/V per suffix and concatenates ("concat-attention"), which
flash-attention's varlen kernels need.

Both functions return the same thing, so the trainer and the tests swap them freely:
logp [S, span] fp32 and mask [S, span] for the S = sum of G samples, in group order; column j is the
sample's token at position loss_start + j (then padding, logp 0). The first suffix token's log-prob
comes from the last prefix position's hidden state. Tokens scored inside the prefix
(loss_start < len(prefix), `--rpo-loss-on-prefix`) are computed once per group and repeated per sample.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rpo_engine.kernels import fused_logprobs
from rpo_engine.model.decoder import PaddedAttention, sdpa


@dataclass
class PrefixGroup:
    """One prefix and its G suffixes; the loss covers positions loss_start.. of each prefix + suffix.

    `advantages`, `rollout_logp` and `trained` (False: the sample is left out of the loss; None: all are
    in) are the trainer's per-sample data, carried along when a group is split across micro-batches
    (`take`); the log-prob functions do not read them.
    """
    prefix_ids: list[int]
    suffix_ids: list[list[int]]
    loss_start: int
    advantages: list[float] | None = None
    rollout_logp: list[list[float]] | None = None
    trained: list[bool] | None = None

    def __post_init__(self):
        if not 1 <= self.loss_start <= len(self.prefix_ids):
            raise ValueError(f"loss_start must be in [1, len(prefix) = {len(self.prefix_ids)}], got {self.loss_start}")

    def take(self, start: int, stop: int) -> "PrefixGroup":
        """The samples start..stop-1 with the same prefix."""
        cut = (lambda xs: None if xs is None else xs[start:stop])
        return dataclasses.replace(self, suffix_ids=self.suffix_ids[start:stop], advantages=cut(self.advantages),
                                   rollout_logp=cut(self.rollout_logp), trained=cut(self.trained))

    def span(self, i: int) -> int:
        """Number of scored tokens of sample i."""
        return len(self.prefix_ids) - self.loss_start + len(self.suffix_ids[i])

    def is_trained(self, i: int) -> bool:
        return self.trained is None or self.trained[i]


class SharedPrefixAttention:
    """Attention backend for rows laid out as [prefix (prefix_len) | packed suffixes].

    prefix_lens [B]: real prefix length per row (padding follows it). sample_ids [B, S]: which
    suffix each suffix column belongs to, -1 for padding. Two exact ways:

    - split (default on CPU, `_SplitAttention`): flash calls with no mask, the suffix queries'
      attention split into prefix and own-suffix parts merged by log-sum-exp. It needs a flash
      kernel that returns the log-sum-exp (torch's CPU one). Padding columns come out 0.
    - masked (the reference, and the path elsewhere): prefix queries by causal SDPA (right padding
      is invisible to real tokens); suffix queries by one SDPA with keys = the whole row under a
      dense block mask [S x (P + S)], which pays for the whole S x S block. A padding query attends
      to the real prefix, so it stays finite. Its output is never used.
    """

    def __init__(self, prefix_lens: torch.Tensor, sample_ids: torch.Tensor, prefix_len: int,
                 split: bool | None = None):
        self.prefix_len = prefix_len
        S = sample_ids.shape[1]
        if split is None:
            split = prefix_lens.device.type == "cpu" and split_attention_available()
        self.mask = self.layout = None
        if S and split:
            self.layout = _SuffixLayout(prefix_lens, sample_ids, prefix_len)
        elif S:
            cols = torch.arange(prefix_len, device=prefix_lens.device)
            to_prefix = (cols[None, :] < prefix_lens[:, None])[:, None, :].expand(-1, S, -1)  # [B, S, P]
            same = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (sample_ids[:, :, None] >= 0)  # [B, S, S]
            causal = torch.ones(S, S, dtype=torch.bool, device=prefix_lens.device).tril()
            self.mask = torch.cat([to_prefix, same & causal], dim=-1)[:, None]  # [B, 1, S, P + S]
        self.bias = None  # the mask as an additive float tensor, built once per forward, not per layer

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is None or self.bias.dtype != dtype:
            self.bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill(
                ~self.mask, float("-inf"))
        return self.bias

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, P + S, H, D], k/v [B, P + S, KVH, D] -> [B, P + S, H, D]
        if self.layout is not None:
            device = q.device.type
            if torch.is_autocast_enabled(device):  # in autocast's dtype, as SDPA under autocast takes them
                q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
            if q.dtype in (torch.bfloat16, torch.float16):
                # The flash kernel hands each part's output back rounded to q's dtype: merged and rounded again,
                # a bf16 suffix output carried up to 1.8x one rounding's error. In fp32 (copies: the saved
                # activations of this CPU path double) the merge, and the gradients summed over the parts, round once.
                return _SplitAttention.apply(q.float(), k.float(), v.float(), self.layout).to(q.dtype)
            return _SplitAttention.apply(q, k, v, self.layout)
        P = self.prefix_len
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, P + S, D]
        # Prefix queries see only the prefix: plain causal; right padding is invisible to real tokens.
        out = sdpa(q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=True)
        if self.mask is not None:
            # Suffix queries: keys are the whole row, [prefix ; all suffixes of the group], masked.
            out_suffix = sdpa(q[:, :, P:], k, v, attn_mask=self.attn_bias(q.dtype))
            out = torch.cat([out, out_suffix], dim=2)
        return out.transpose(1, 2)


class _SuffixLayout:
    """Where the N real suffix tokens of a batch are (row by row, left to right), for the split path.

    rows [N]: each token's flat index in [B * (P + S)]. groups: (row, prefix length, first token,
    token count) per row with suffix tokens, which sit at columns P.. of the row. The M suffixes laid
    out padded, [M, longest]: `padded` [M * longest] picks a token for each slot (a padding slot
    repeats its suffix's first token: causal, so only later padding slots see it); `slot` [N] is each
    token's slot.
    """

    def __init__(self, prefix_lens: torch.Tensor, sample_ids: torch.Tensor, prefix_len: int):
        S, device = sample_ids.shape[1], sample_ids.device
        self.prefix_len = prefix_len
        real = (sample_ids >= 0).flatten().nonzero().squeeze(1)  # [N] in [B * S]
        row = real // S
        self.rows = row * (prefix_len + S) + prefix_len + real % S
        counts, starts = (sample_ids >= 0).sum(1).tolist(), 0
        self.groups = []
        for r, (n, count) in enumerate(zip(prefix_lens.tolist(), counts)):
            if count:
                self.groups.append((r, n, starts, count))
            starts += count
        # suffixes are packed runs of one sample id within a row
        _, lengths = torch.unique_consecutive(row * (sample_ids.max() + 1) + sample_ids.flatten()[real],
                                              return_counts=True)
        self.longest = int(lengths.max())
        first = lengths.cumsum(0) - lengths  # [M]
        j = torch.arange(self.longest, device=device)
        self.padded = torch.where(j < lengths[:, None], first[:, None] + j, first[:, None]).flatten()
        suffix = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # [N]
        self.slot = suffix * self.longest + torch.arange(len(real), device=device) - first[suffix]


def _flash(*args, **kwargs):  # -> (out, logsumexp); takes fewer K/V heads than query heads
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)


def _flash_backward(*args):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args)


@functools.cache
def split_attention_available() -> bool:
    """The split path runs on torch's CPU flash kernel, a private op (it returns the log-sum-exp the
    merge needs). Probe it once, grouped K/V heads included, against SDPA; on a torch without it, or
    where it behaves otherwise, the masked path runs instead."""
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    q, k, v = (torch.randn(1, heads, 5, 8, generator=gen) for heads in (4, 2, 2))
    with torch.autocast("cpu", enabled=False):  # the first call may come under a caller's autocast (TRL's)
        try:
            out, lse = _flash(q, k, v, is_causal=True)
        except (AttributeError, RuntimeError, TypeError):
            return False
        ref = F.scaled_dot_product_attention(q, *(t.repeat_interleave(2, dim=1) for t in (k, v)), is_causal=True)
    return out.shape == ref.shape and lse.shape == (1, 4, 5) and torch.allclose(out, ref, atol=1e-5)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """[B, T, heads, ...] <-> [B, heads, T, ...], the layout the flash kernels take."""
    return t.transpose(1, 2)


class _SplitAttention(torch.autograd.Function):
    """All of a shared-prefix layout's attention in flash calls, no mask, gradients written in place.

    Prefix queries: causal over the prefix. Suffix queries see [own prefix ; own suffix, causal],
    as two parts: (a) a group's suffix queries against the group's prefix K/V, unmasked (one call per
    group on the row's own K/V, never copied); (b) every suffix causally against itself, [M, longest]
    padded. Merged exactly: out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b). Backward:
    each part's flash backward given the MERGED out and lse yields that part's share of the joint
    softmax's gradient. Padding columns come out 0 and get no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, lay):
        P = lay.prefix_len
        out = torch.zeros_like(q)
        o_p, lse_p = _flash(*(_heads(t[:, :P]) for t in (q, k, v)), is_causal=True)
        out[:, :P] = _heads(o_p)
        o_a, lse_a = zip(*(_flash(_heads(q[r:r + 1, P:P + c]), _heads(k[r:r + 1, :n]), _heads(v[r:r + 1, :n]))
                           for r, n, i, c in lay.groups))
        o_a, lse_a = (torch.cat([_heads(t)[0] for t in ts]) for ts in (o_a, lse_a))  # [N, H, D], [N, H] fp32
        o_b, lse_b = _flash(*(_pad(_real(t, lay), lay) for t in (q, k, v)), is_causal=True)
        lse = torch.logaddexp(lse_a, _unpad(lse_b, lay))
        o_s = o_a * (lse_a - lse).exp()[..., None] + _unpad(o_b, lay) * (_unpad(lse_b, lay) - lse).exp()[..., None]
        out.flatten(0, 1).index_copy_(0, lay.rows, o_s.to(q.dtype))
        ctx.save_for_backward(q, k, v, out, lse_p, lse, lse_b)
        ctx.lay = lay
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse_p, lse, lse_b = ctx.saved_tensors
        lay, P, d_out = ctx.lay, ctx.lay.prefix_len, d_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grads = _flash_backward(*(_heads(t[:, :P]) for t in (d_out, q, k, v, out)), lse_p, 0.0, True)
        for grad, g in zip((dq, dk, dv), grads):
            grad[:, :P] = _heads(g)
        for r, n, i, c in lay.groups:  # part a
            suffix = lambda t: _heads(t[r:r + 1, P:P + c])  # noqa: E731
            dq_a, dk_a, dv_a = _flash_backward(suffix(d_out), suffix(q), _heads(k[r:r + 1, :n]),
                                               _heads(v[r:r + 1, :n]), suffix(out), _heads(lse[None, i:i + c]),
                                               0.0, False)
            dq[r, P:P + c] += _heads(dq_a)[0]
            dk[r, :n] += _heads(dk_a)[0]
            dv[r, :n] += _heads(dv_a)[0]
        # Part b on the padded layout: padding slots get d_out 0 and their own part-b lse, so they add 0.
        zeros = d_out.new_zeros(len(lay.padded), *d_out.shape[2:])
        d_out_b, out_b = (_pad(_real(t, lay), lay, zeros) for t in (d_out, out))
        lse_b = _pad(lse, lay, _heads(lse_b).flatten(0, 1))
        grads = _flash_backward(d_out_b, *(_pad(_real(t, lay), lay) for t in (q, k, v)), out_b, lse_b, 0.0, True)
        for grad, g in zip((dq, dk, dv), grads):
            grad.flatten(0, 1).index_add_(0, lay.rows, _unpad(g, lay))
        return dq, dk, dv, None


def _pad(t: torch.Tensor, lay: _SuffixLayout, base: torch.Tensor | None = None) -> torch.Tensor:
    """[N, heads, ...] -> [M, heads, longest, ...], the padding slots a copy of their suffix's first
    token, or the rows of `base` [M * longest, heads, ...]."""
    padded = t.index_select(0, lay.padded) if base is None else base.index_copy(0, lay.slot, t)
    return padded.view(-1, lay.longest, *t.shape[1:]).transpose(1, 2)


def _real(t: torch.Tensor, lay: _SuffixLayout) -> torch.Tensor:
    """[B, P + S, heads, ...] -> [N, heads, ...]: the real suffix tokens."""
    return t.flatten(0, 1).index_select(0, lay.rows)


def _unpad(t: torch.Tensor, lay: _SuffixLayout) -> torch.Tensor:
    """[M, heads, longest, ...] -> [N, heads, ...]: the real tokens."""
    return t.transpose(1, 2).flatten(0, 1).index_select(0, lay.slot)


def _score(model, hidden, rows: list[int], targets: list[int], take: list[list[int]], temperature: float,
           with_entropy: bool = False):
    """Log-probs of `targets` from the flat hidden rows `rows` (fused LM head), laid out per sample by `take`;
    with_entropy: also the entropy of each of those tokens' next-token distributions, laid out alike."""
    device = hidden.device
    picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(rows, dtype=torch.long, device=device)]  # [n, H]
    # under autocast (TRL's mixed precision) the hidden states come in its dtype: the head runs in the weight's
    with torch.autocast(device.type, enabled=False):
        out = fused_logprobs(picked.to(model.lm_head.weight.dtype), model.lm_head.weight,
                             torch.tensor(targets, dtype=torch.long, device=device), temperature,
                             return_entropy=with_entropy)  # [n], or ([n], [n])
    if not with_entropy:
        return _scatter_rows(out, take, device)
    logp, mask = _scatter_rows(out[0], take, device)
    return logp, mask, _scatter_rows(out[1], take, device)[0]


def _scatter_rows(logp_flat: torch.Tensor, take: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [S, span] with logp[s, j] = logp_flat[take[s][j]], padded with 0; mask [S, span]."""
    span = max((len(t) for t in take), default=0)
    pad = logp_flat.shape[0]  # index of a 0 appended below: padding reads it, its gradient is dropped
    index = torch.tensor([t + [pad] * (span - len(t)) for t in take], dtype=torch.long).reshape(len(take), span)
    mask = torch.tensor([[True] * len(t) + [False] * (span - len(t)) for t in take],
                        dtype=torch.bool).reshape(len(take), span)  # bool even when every row is empty (span 0)
    logp = F.pad(logp_flat, (0, 1))[index.to(device)]  # [S, span]
    return logp, mask.to(device)


def shared_prefix_logprobs(model, groups: list[PrefixGroup], temperature: float = 1.0, with_entropy: bool = False):
    """Fast path: each group's prefix run once. Returns logp [S, span], mask [S, span] (module docstring), and
    with_entropy the entropy [S, span] (fp32, differentiable) of the distribution each scored token was drawn from."""
    device = model.device
    P = max(len(g.prefix_ids) for g in groups)
    S = max(sum(len(s) for s in g.suffix_ids) for g in groups)
    L = P + S
    input_ids = torch.zeros(len(groups), L, dtype=torch.long)  # padding id 0: never attended by a real token
    position_ids = torch.zeros(len(groups), L, dtype=torch.long)
    sample_ids = torch.full((len(groups), S), -1, dtype=torch.long)
    rows, targets, take = [], [], []  # hidden row (flat) and target of each distinct scored token
    for r, g in enumerate(groups):
        n = len(g.prefix_ids)
        input_ids[r, :n] = torch.tensor(g.prefix_ids)
        position_ids[r, :n] = torch.arange(n)
        base = r * L
        # Scored prefix tokens: the same for every sample of the group, computed once.
        prefix_take = list(range(len(rows), len(rows) + n - g.loss_start))
        rows += range(base + g.loss_start - 1, base + n - 1)
        targets += g.prefix_ids[g.loss_start:]
        col = P  # the next free suffix column of this row
        for i, suffix in enumerate(g.suffix_ids):
            m = len(suffix)
            if m:
                input_ids[r, col:col + m] = torch.tensor(suffix)
                position_ids[r, col:col + m] = torch.arange(n, n + m)  # positions continue from the prefix
                sample_ids[r, col - P:col - P + m] = i
            # suffix[0] is predicted by the last prefix position, suffix[j] by the column before it
            take.append(prefix_take + list(range(len(rows), len(rows) + m)))
            if m:
                rows += [base + n - 1] + list(range(base + col, base + col + m - 1))
                targets += suffix
            col += m
    prefix_lens = torch.tensor([len(g.prefix_ids) for g in groups], device=device)
    attn = SharedPrefixAttention(prefix_lens, sample_ids.to(device), P)
    hidden = model.hidden_states(input_ids.to(device), position_ids=position_ids.to(device), attn=attn)  # [B, L, H]
    return _score(model, hidden, rows, targets, take, temperature, with_entropy)


def padded_logprobs(model, groups: list[PrefixGroup], temperature: float = 1.0, with_entropy: bool = False):
    """Reference path: every sample as its own right-padded row, prefix included. Same returns."""
    device = model.device
    seqs = [(g.prefix_ids + s, g.loss_start) for g in groups for s in g.suffix_ids]
    T = max(len(ids) for ids, _ in seqs) - 1
    input_ids = torch.zeros(len(seqs), T, dtype=torch.long)  # right padding: invisible under causal attention
    rows, targets, take = [], [], []
    for b, (ids, start) in enumerate(seqs):
        input_ids[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        take.append(list(range(len(rows), len(rows) + len(ids) - start)))
        rows += range(b * T + start - 1, b * T + len(ids) - 1)  # the position that predicts each target
        targets += ids[start:]
    # the default attention, passed so that hidden_states skips its id-range check (a host sync): ids made here
    hidden = model.hidden_states(input_ids.to(device), attn=PaddedAttention(None, T, device))  # [b, T, H]
    return _score(model, hidden, rows, targets, take, temperature, with_entropy)


def group_logprobs(model, groups: list[PrefixGroup], temperature: float = 1.0, shared: bool = True,
                   with_entropy: bool = False):
    """logp [S, span], mask [S, span] for the samples of `groups`, by either path (and the entropy
    [S, span] with_entropy)."""
    return (shared_prefix_logprobs if shared else padded_logprobs)(model, groups, temperature, with_entropy)


def sharing_pays(group: PrefixGroup, config) -> bool:
    """Whether the shared layout costs fewer FLOPs than one padded row per sample (per layer, forward).

    Shared: P + S tokens, the prefix causal (P^2 / 2 query-key pairs) and every suffix query against
    the whole row (S x (P + S) pairs: the S x S block is dense under the mask, though only each
    suffix's own triangle is kept). Padded: G rows of T = P + longest suffix, T^2 / 2 pairs each.
    A token costs about 2 x (parameters of a layer), a pair 4 x heads x head_dim. With an RPO prefix
    sharing wins by about G; with a short prompt and long completions (full-path runs) the dense
    suffix block can cost more than the prefix it saves. This models the masked attention (GPU). The
    split one on CPU pays only S x P + each suffix's own block, but sharing every group there measured
    no faster on the default job (rows pad within a micro-batch), so one rule serves both.
    """
    P, lens = len(group.prefix_ids), [len(s) for s in group.suffix_ids]
    S, T, G = sum(lens), P + max(lens), len(lens)
    h, q_dim = config.hidden_size, config.num_attention_heads * config.head_dim
    per_token = 2 * (2 * h * q_dim + 2 * h * config.num_key_value_heads * config.head_dim + 3 * h * config.intermediate_size)
    per_pair = 4 * q_dim
    shared = (P + S) * per_token + (P * P / 2 + S * (P + S)) * per_pair
    padded = G * T * per_token + G * T * T / 2 * per_pair
    return shared < padded


def layout_tokens(groups: list[PrefixGroup], shared: bool) -> int:
    """Tokens of the padded layout `groups` run as: what a micro-batch budget bounds."""
    if shared:  # one row per group: longest prefix + longest packed suffixes
        return len(groups) * (max(len(g.prefix_ids) for g in groups)
                              + max(sum(len(s) for s in g.suffix_ids) for g in groups))
    return sum(len(g.suffix_ids) for g in groups) * max(len(g.prefix_ids) + len(s) for g in groups for s in g.suffix_ids)


def micro_batches(groups: list[PrefixGroup], token_budget: int, shared: bool,
                  max_padding: float = 0.25) -> list[list[PrefixGroup]]:
    """Pack whole groups (sorted by size) into micro-batches of at most `token_budget` layout tokens.

    A group is the unit: splitting one re-runs its prefix. Only a group that alone exceeds the
    budget is split, into runs of consecutive samples that fit (one sample at least). A group joins
    the micro-batch before it only if that grows the batch by at most (1 + max_padding) x the
    group's own layout: rows are padded to the batch's longest, and on the default job's ragged
    groups one budget-sized batch ran 1.5-3x the real tokens (RPO's median update: 0.62 s in one
    batch, 0.38 s packed by size).
    """
    pieces = []
    for g in groups:
        if layout_tokens([g], shared) <= token_budget:
            pieces.append(g)
            continue
        start = 0
        while start < len(g.suffix_ids):
            stop = start + 1
            while stop < len(g.suffix_ids) and layout_tokens([g.take(start, stop + 1)], shared) <= token_budget:
                stop += 1
            pieces.append(g.take(start, stop))
            start = stop
    pieces.sort(key=lambda g: layout_tokens([g], shared))
    batches, current = [], []
    for g in pieces:
        if current:
            size = layout_tokens(current + [g], shared)
            growth = size - layout_tokens(current, shared)
            if size > token_budget or growth > (1 + max_padding) * layout_tokens([g], shared):
                batches.append(current)
                current = []
        current.append(g)
    return batches + ([current] if current else [])


def plan_micro_batches(groups: list[PrefixGroup], model_config, token_budget: int,
                       prefix_sharing: bool = True) -> list[tuple[list[PrefixGroup], bool]]:
    """(micro-batch, shared layout?) pairs: with sharing on, a group runs shared where `sharing_pays`
    (nearly always after RPO; not for long completions of a short prompt), else padded."""
    use = [prefix_sharing and sharing_pays(g, model_config) for g in groups]
    return [(batch, shared) for shared in (True, False)
            for batch in micro_batches([g for g, u in zip(groups, use) if u == shared], token_budget, shared)]
