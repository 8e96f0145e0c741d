"""Per-token log-probs of GRPO groups (one prefix, G suffixes), with the prefix run once.

After RPO a group's G sequences share prompt + kept reasoning path, often 90%+ of their tokens. The
plain padded batch (`padded_logprobs`, the reference) runs that prefix through forward and backward
G times. `shared_prefix_logprobs` lays each group out as ONE row,

    [ prefix (right-padded to the longest prefix) | suffix_1 suffix_2 ... suffix_G (packed, padded) ]

with positions 0..P-1 for the prefix and P.. for each suffix, and attends in two SDPA calls per layer
(`SharedPrefixAttention`): the prefix part causally over itself (the plain flash path, no mask), the
suffix part with keys = the whole row, [prefix K/V ; suffix K/V], under a block mask (the real prefix,
and causally the suffix's own tokens). The keys are the row itself: no K/V is copied, per suffix or
at all, and the mask is [suffix tokens x row length] per group, linear in the prefix. Gradients reach
each prefix token once per group. verl's PrefixGrouper instead repeats the prefix K/V per suffix
and concatenates ("concat-attention"), which flash-attention's varlen kernels need.

Both functions return the same thing, so the trainer and the tests swap them freely:
logp [S, span] fp32 and mask [S, span] for the S = sum of G samples, in group order; column j is the
sample's token at position loss_start + j (then padding, logp 0). The first suffix token's log-prob
comes from the last prefix position's hidden state. Tokens scored inside the prefix
(loss_start < len(prefix), `--rpo-loss-on-prefix`) are computed once per group and repeated per sample.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rpo_engine.kernels import fused_logprobs


@dataclass
class PrefixGroup:
    """One prefix and its G suffixes; the loss covers positions loss_start.. of each prefix + suffix.

    `advantages` and `rollout_logp` are the trainer's per-sample data, carried along when a group is
    split across micro-batches (`take`); the log-prob functions do not read them.
    """
    prefix_ids: list[int]
    suffix_ids: list[list[int]]
    loss_start: int
    advantages: list[float] | None = None
    rollout_logp: list[list[float]] | None = None

    def __post_init__(self):
        if not 1 <= self.loss_start <= len(self.prefix_ids):
            raise ValueError(f"loss_start must be in [1, len(prefix) = {len(self.prefix_ids)}], got {self.loss_start}")

    def take(self, start: int, stop: int) -> "PrefixGroup":
        """The samples start..stop-1 with the same prefix."""
        cut = (lambda xs: None if xs is None else xs[start:stop])
        return dataclasses.replace(self, suffix_ids=self.suffix_ids[start:stop], advantages=cut(self.advantages),
                                   rollout_logp=cut(self.rollout_logp))

    def span(self, i: int) -> int:
        """Number of scored tokens of sample i."""
        return len(self.prefix_ids) - self.loss_start + len(self.suffix_ids[i])


class SharedPrefixAttention:
    """Attention backend for rows laid out as [prefix (prefix_len) | packed suffixes].

    prefix_lens [B]: real prefix length per row (padding follows it). sample_ids [B, S]: which
    suffix each suffix column belongs to, -1 for padding. Prefix queries: plain causal SDPA (right
    padding is invisible to real tokens). Suffix queries, two exact ways:

    - split (default on CPU, `_SplitSuffixAttention`): each group's suffix queries against its
      prefix K/V unmasked, and each suffix causally against itself, merged by log-sum-exp. It needs
      a flash kernel that returns the log-sum-exp (torch's CPU one); padding columns come out 0.
    - masked (the reference, and the path elsewhere): one SDPA with keys = the whole row under a
      dense block mask [S x (P + S)], which pays for the whole S x S block. A padding query attends
      to the real prefix, so it stays finite. Its output is never used.
    """

    def __init__(self, prefix_lens: torch.Tensor, sample_ids: torch.Tensor, prefix_len: int,
                 split: bool | None = None):
        self.prefix_len = prefix_len
        B, S = sample_ids.shape
        self.split = prefix_lens.device.type == "cpu" if split is None else split
        self.mask = self.layout = None
        if S and self.split:
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
        P, gqa = self.prefix_len, k.shape[2] != q.shape[2]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, P + S, D]
        out = F.scaled_dot_product_attention(qt[:, :, :P], kt[:, :, :P], vt[:, :, :P], is_causal=True,
                                             enable_gqa=gqa)
        if self.mask is not None:
            out_suffix = F.scaled_dot_product_attention(qt[:, :, P:], kt, vt, attn_mask=self.attn_bias(q.dtype),
                                                        enable_gqa=gqa)
            out = torch.cat([out, out_suffix], dim=2)
        out = out.transpose(1, 2)
        if self.layout is not None:
            lay, (B, L, H, D) = self.layout, q.shape
            pick = lambda t: t.reshape(B * L, t.shape[2], D)[lay.rows]  # noqa: E731  [N, heads, D]
            out_suffix = _SplitSuffixAttention.apply(pick(q), pick(k), pick(v), k[:, :P], v[:, :P], lay)
            out_suffix = q.new_zeros(B * (L - P), H, D).index_copy(0, lay.columns, out_suffix)
            out = torch.cat([out, out_suffix.view(B, L - P, H, D)], dim=1)
        return out


class _SuffixLayout:
    """Index maps of the N real suffix tokens of a batch (row by row, left to right), for the split path.

    rows [N]: each token's flat index in [B * (P + S)]; columns [N]: in [B * S]. groups: (row, prefix
    length, first token, token count) per row with suffix tokens. The M suffixes laid out padded,
    [M, longest]: `padded` [M * longest] picks a token for each slot (a padding slot repeats its
    suffix's first token: causal, so only later padding slots see it); `slot` [N] is each token's slot.
    """

    def __init__(self, prefix_lens: torch.Tensor, sample_ids: torch.Tensor, prefix_len: int):
        B, S = sample_ids.shape
        device = sample_ids.device
        real = (sample_ids >= 0).flatten().nonzero().squeeze(1)  # [N] in [B * S]
        row = real // S
        self.columns, self.rows = real, row * (prefix_len + S) + prefix_len + real % S
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


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (out, logsumexp); GQA native
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _SplitSuffixAttention(torch.autograd.Function):
    """Suffix queries over [own prefix ; own suffix, causal], as two flash calls merged by log-sum-exp.

    Part a: a group's suffix queries against the group's prefix K/V, unmasked: one call per group on
    the row's own K/V, never copied. Part b: every suffix causally against itself, [M, longest]
    padded. out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b). Backward: each part's flash
    backward given the MERGED out and lse yields that part's share of the joint softmax's gradient.
    Inputs q_s [N, H, D], k_s/v_s [N, KVH, D] (the real suffix tokens), k_p/v_p [B, P, KVH, D].
    """

    @staticmethod
    def forward(ctx, q_s, k_s, v_s, k_p, v_p, lay):
        heads = lambda t: t[None].transpose(1, 2)  # noqa: E731  [c, heads, ...] -> [1, heads, c, ...]
        o_a, lse_a = zip(*(_flash(heads(q_s[i:i + c]), heads(k_p[r, :n]), heads(v_p[r, :n]))
                           for r, n, i, c in lay.groups))
        o_a, lse_a = torch.cat(o_a, 2)[0].transpose(0, 1), torch.cat(lse_a, 2)[0].transpose(0, 1)  # [N, H, D], [N, H]
        o_b, lse_b = _flash(*(_pad(t, lay) for t in (q_s, k_s, v_s)), is_causal=True)  # [M, H, longest, D]
        lse = torch.logaddexp(lse_a, _unpad(lse_b, lay))  # fp32
        out = (o_a * (lse_a - lse).exp()[..., None]
               + _unpad(o_b, lay) * (_unpad(lse_b, lay) - lse).exp()[..., None]).to(q_s.dtype)
        ctx.save_for_backward(q_s, k_s, v_s, k_p, v_p, out, lse, lse_b)
        ctx.lay = lay
        return out

    @staticmethod
    def backward(ctx, d_out):
        q_s, k_s, v_s, k_p, v_p, out, lse, lse_b = ctx.saved_tensors
        lay = ctx.lay
        heads = lambda t: t[None].transpose(1, 2)  # noqa: E731
        dq_s, dk_p, dv_p = torch.empty_like(q_s), torch.zeros_like(k_p), torch.zeros_like(v_p)
        for r, n, i, c in lay.groups:
            dq, dk, dv = _flash_backward(*(heads(t[i:i + c]) for t in (d_out, q_s)), heads(k_p[r, :n]),
                                         heads(v_p[r, :n]), *(heads(t[i:i + c]) for t in (out, lse)), 0.0, False)
            dq_s[i:i + c], dk_p[r, :n], dv_p[r, :n] = (t[0].transpose(0, 1) for t in (dq, dk, dv))
        # Part b on the padded layout: padding slots get d_out 0 and their own part-b lse, so they add 0.
        zeros = d_out.new_zeros(len(lay.padded), *d_out.shape[1:])
        dq, dk, dv = _flash_backward(_pad(d_out, lay, zeros), *(_pad(t, lay) for t in (q_s, k_s, v_s)),
                                     _pad(out, lay, zeros), _pad(lse, lay, lse_b.transpose(1, 2).flatten(0, 1)),
                                     0.0, True)
        return dq_s + _unpad(dq, lay), _unpad(dk, lay), _unpad(dv, lay), dk_p, dv_p, None


def _pad(t: torch.Tensor, lay: _SuffixLayout, base: torch.Tensor | None = None) -> torch.Tensor:
    """[N, heads, ...] -> [M, heads, longest, ...], the padding slots a copy of their suffix's first
    token, or the rows of `base` [M * longest, heads, ...]."""
    padded = t[lay.padded] if base is None else base.index_copy(0, lay.slot, t)
    return padded.view(-1, lay.longest, *t.shape[1:]).transpose(1, 2)


def _unpad(t: torch.Tensor, lay: _SuffixLayout) -> torch.Tensor:
    """[M, heads, longest, ...] -> [N, heads, ...]: the real tokens."""
    return t.transpose(1, 2).flatten(0, 1)[lay.slot]


def _score(model, hidden, rows: list[int], targets: list[int], take: list[list[int]], temperature: float):
    """Log-probs of `targets` from the flat hidden rows `rows` (fused LM head), laid out per sample by `take`."""
    device = hidden.device
    picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(rows, dtype=torch.long, device=device)]  # [n, H]
    logp_flat = fused_logprobs(picked, model.lm_head.weight, torch.tensor(targets, dtype=torch.long, device=device),
                               temperature)  # [n]
    return _scatter_rows(logp_flat, take, device)


def _scatter_rows(logp_flat: torch.Tensor, take: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [S, span] with logp[s, j] = logp_flat[take[s][j]], padded with 0; mask [S, span]."""
    span = max((len(t) for t in take), default=0)
    pad = logp_flat.shape[0]  # index of a 0 appended below: padding reads it, its gradient is dropped
    index = torch.tensor([t + [pad] * (span - len(t)) for t in take], dtype=torch.long).reshape(len(take), span)
    mask = torch.tensor([[True] * len(t) + [False] * (span - len(t)) for t in take]).reshape(len(take), span)
    logp = F.pad(logp_flat, (0, 1))[index.to(device)]  # [S, span]
    return logp, mask.to(device)


def shared_prefix_logprobs(model, groups: list[PrefixGroup], temperature: float = 1.0):
    """Fast path: each group's prefix run once. Returns logp [S, span], mask [S, span] (module docstring)."""
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
    return _score(model, hidden, rows, targets, take, temperature)


def padded_logprobs(model, groups: list[PrefixGroup], temperature: float = 1.0):
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
    hidden = model.hidden_states(input_ids.to(device))  # [b, T, H]
    return _score(model, hidden, rows, targets, take, temperature)


def group_logprobs(model, groups: list[PrefixGroup], temperature: float = 1.0, shared: bool = True):
    """logp [S, span], mask [S, span] for the samples of `groups`, by either path."""
    return (shared_prefix_logprobs if shared else padded_logprobs)(model, groups, temperature)


def sharing_pays(group: PrefixGroup, config) -> bool:
    """Whether the shared layout costs fewer FLOPs than one padded row per sample (per layer, forward).

    Shared: P + S tokens, the prefix causal (P^2 / 2 query-key pairs) and every suffix query against
    the whole row (S x (P + S) pairs: the S x S block is dense under the mask, though only each
    suffix's own triangle is kept). Padded: G rows of T = P + longest suffix, T^2 / 2 pairs each.
    A token costs about 2 x (parameters of a layer), a pair 4 x heads x head_dim. With an RPO prefix
    sharing wins by about G; with a short prompt and long completions (full-path runs) the dense
    suffix block can cost more than the prefix it saves.
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


def micro_batches(groups: list[PrefixGroup], token_budget: int, shared: bool) -> list[list[PrefixGroup]]:
    """Pack whole groups (sorted by size) into micro-batches of at most `token_budget` layout tokens.

    A group is the unit: splitting one re-runs its prefix. Only a group that alone exceeds the
    budget is split, into runs of consecutive samples that fit (one sample at least).
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
        if current and layout_tokens(current + [g], shared) > token_budget:
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
