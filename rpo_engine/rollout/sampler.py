"""Sampling: temperature, top-k, top-p, greedy, with a counter-based random stream per sample.

Randomness. Each draw uses one uniform number u = splitmix64(key, sample index, position), where
`key` mixes the request's seed with its prompt tokens. So a sample depends only on (seed, prompt,
sample index, position): not on the batch it ran in, on preemptions, or on CUDA graphs, and two
different prompts with the same seed do not get correlated noise. The token is drawn by inverse CDF
(u against the cumulative sum of the truncated, renormalized probabilities, in fp64 where it is
searched): one uniform per row is all the host computes, and a zero-probability token can never be
drawn. `sample` does it in work linear in the vocabulary (no sort, no fp64 copy of the logits);
`sample_reference` is the plain version it is tested against.

Log-probs. The returned log-prob is log_softmax(logits / T) at the drawn token, BEFORE top-k/top-p/min-p
truncation and a repetition penalty (T = 1 for greedy): exactly what the trainer recomputes by teacher
forcing. With a truncation on, the token was drawn from the truncated distribution, whose log-prob is
this minus log(kept mass).
"""
from __future__ import annotations

import numpy as np
import torch

from rpo_engine.rollout.penalty import SeenTokens, apply_repetition_penalty
from rpo_engine.rollout.transfer import to_device

_M64 = (1 << 64) - 1
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's constants


def splitmix64(x: int) -> int:
    x = (x + _GAMMA) & _M64
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def request_key(seed: int, prompt: list[int]) -> int:
    return splitmix64((seed & _M64) ^ (hash(tuple(prompt)) & _M64))


def sample_stream(key: int, sample_index: int) -> int:
    """One sample's stream: a Sequence computes it once, then draws `stream_uniform(stream, position)`."""
    return splitmix64(key ^ sample_index)


def stream_uniform(stream: int, position: int) -> float:
    return (splitmix64(stream ^ position) >> 11) * 2.0 ** -53


def stream_uniforms(streams: list[int], positions: list[int]) -> np.ndarray:
    """`stream_uniform` of each (stream, position) pair at once, in uint64 arrays (which wrap as the
    masks above do): one decode step's draws for hundreds of sequences in microseconds."""
    x = np.array(streams, dtype=np.uint64) ^ np.array(positions, dtype=np.uint64)
    x = x + np.uint64(_GAMMA)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def uniform(key: int, sample_index: int, position: int) -> float:
    """A uniform in [0, 1) (53 bits) for one draw."""
    return stream_uniform(sample_stream(key, sample_index), position)


def truncate_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Mask (-inf) every token below the k-th largest logit (a token tied with it is kept, as transformers
    and vLLM keep it), then all but the top-p nucleus of what is left, then (min-p) every token less likely
    than min_p times the most likely one (transformers' order; as the most likely token is always kept,
    min-p is then just the intersection).

    sorted_logits [R, V] in descending order (temperature applied); top_k [R] (<= 0: off); top_p [R];
    min_p [R] (0: off). The nucleus is the smallest prefix whose mass reaches top_p (the token that
    crosses it is kept).
    """
    R, V = sorted_logits.shape
    k = torch.where(top_k > 0, top_k.clamp_max(V), V)  # [R]
    kth = sorted_logits.gather(1, k[:, None] - 1)  # [R, 1] the k-th largest logit
    logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # [R, V] mass of the strictly better tokens
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # top_p 1 is off, whatever the rounding
    if min_p is not None:  # p / p_max, computed as `sample` computes it, so both cut at the same tokens
        outside |= (sorted_logits - sorted_logits[:, :1]).exp() < min_p[:, None]
    return logits.masked_fill(outside, float("-inf"))


def scale_logits(logits: torch.Tensor, temperature: torch.Tensor | None) -> torch.Tensor:
    """logits / T per row, T = 1 for a greedy row (T = 0). temperature None: every row at T = 1, and the logits are
    returned as they are (x / 1 is x, bit for bit), a pass over [R, V] fewer."""
    if temperature is None:
        return logits
    return logits / torch.where(temperature == 0, 1.0, temperature)[:, None]  # [R, V]


def sample_reference(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None,
                     top_p: torch.Tensor | None, u: torch.Tensor, truncate: bool | None = None,
                     any_greedy: bool | None = None,
                     min_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` written plainly, for tests and benchmarks: an fp64 cumulative sum over the whole
    vocabulary, in token order, or in descending order (the whole vocabulary sorted) for a row with top-k
    or top-p; min-p masks either. At Qwen's 152k-token vocabulary, 64 rows take ~0.15 s on one CPU core,
    ~1.2 s with a sort. `truncate` / `any_greedy` False skip work no row needs (None: read from the tensors);
    the tensors that work would read may then be None (`sample`'s docstring)."""
    logits = logits.float()
    scaled = scale_logits(logits, temperature)  # [R, V]
    logp = scaled.log_softmax(-1)  # [R, V]
    probs = logp.exp()
    if min_p is not None:  # in token order, as `sample` draws a row without top-k/top-p
        probs = probs.masked_fill((scaled - scaled.amax(-1, keepdim=True)).exp() < min_p[:, None], 0.0)
    tokens = _draw(probs, u).squeeze(1)
    if truncate is not False:  # rows with top-k or top-p are drawn in descending order (min-p included)
        truncating = (top_k > 0) | (top_p < 1)
        if truncate or bool(truncating.any()):
            sorted_logits, order = scaled.sort(-1, descending=True)  # [R, V]
            truncated = order.gather(1, _draw(truncate_sorted(sorted_logits, top_k, top_p, min_p).softmax(-1), u))
            tokens = torch.where(truncating, truncated.squeeze(1), tokens)
    if any_greedy is not False and temperature is not None:
        tokens = torch.where(temperature == 0, logits.argmax(-1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R, 1]: the first index whose fp64 cumulative probability reaches u * total."""
    cdf = probs.double().cumsum(-1)  # [R, V]
    target = (u * cdf[:, -1]).clamp_min(torch.finfo(torch.float64).tiny)[:, None]  # [R, 1]
    return torch.searchsorted(cdf, target).clamp_max(cdf.shape[1] - 1)


CHUNK = 1024  # tokens per chunk of the two-level inverse CDF
CANDIDATES = 1024  # top-p looks for its nucleus among this many top tokens first (the whole sort if not there)
_TINY = torch.finfo(torch.float64).tiny


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index whose interval of the cumulative weights holds u * total: P(i) = w_i / total, and a
    zero-weight index is never returned. weights [R, V] fp32 >= 0 with a positive sum per row; u [R]
    fp64 in [0, 1) -> [R] long.

    In two levels, so nothing of size V is converted to fp64 or scanned: fp32 sums of chunks of CHUNK
    tokens, an fp64 cumulative sum over the chunks to find u's chunk, then an fp64 cumulative sum inside
    that one chunk. The two levels round differently (by ~1e-7 of a chunk's mass, the fp32 rounding of the
    weights themselves): a target that lands past the chunk's own total takes its last token with weight.
    """
    R, V = weights.shape
    full = V // CHUNK
    sums = [weights[:, :full * CHUNK].view(R, full, CHUNK).sum(-1)] if full else []
    if V % CHUNK:
        sums.append(weights[:, full * CHUNK:].sum(-1, keepdim=True))
    chunks = torch.cat(sums, 1).double().cumsum(-1)  # [R, C]
    target = (u * chunks[:, -1]).clamp_min(_TINY)[:, None]  # [R, 1]
    c = torch.searchsorted(chunks, target).clamp_max(chunks.shape[1] - 1)  # [R, 1]: chunk[c] >= target > chunk[c-1]
    before = torch.where(c > 0, chunks.gather(1, (c - 1).clamp_min(0)), 0.0)  # [R, 1]
    cols = c * CHUNK + torch.arange(min(CHUNK, V), device=weights.device)  # [R, CHUNK], or [R, V] if fewer
    inside = weights.gather(1, cols.clamp_max(V - 1)).masked_fill_(cols >= V, 0.0).double().cumsum(-1)
    j = torch.searchsorted(inside, target - before)  # [R, 1]; target > before, so j's weight is > 0
    last = (inside < inside[:, -1:]).sum(-1, keepdim=True)  # the chunk's last index with weight
    return (c * CHUNK + torch.minimum(j, last)).squeeze(1)


def sample(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None,
           top_p: torch.Tensor | None, u: torch.Tensor, truncate: bool | None = None, any_greedy: bool | None = None,
           all_greedy: bool = False, min_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] fp32; temperature/top_p [R] float; top_k [R] long; u [R] fp64 in [0, 1); min_p [R]
    float or None (off for every row). temperature None: every row at T = 1 (no division; no greedy row);
    top_k and top_p may be None where `truncate` is False (no row truncates).

    Returns token ids [R] and their log-probs [R] (see the module docstring), the same draws as
    `sample_reference` but for rounding (a u within ~1e-7 of a boundary between two tokens, or a row whose
    probability mass before some token lies within ~1e-8 of its top_p, where the two nuclei may end one token
    apart) and for which of two tied logits comes first (the same distribution either way). `truncate`
    (any row uses top-k/top-p), `any_greedy` and `all_greedy` let the caller skip work it knows no row
    needs; None: read from the tensors (a host sync on CUDA, which the engine avoids by passing them).
    Min-p (None: no row uses it) is a mask on the probabilities relative to the row's most likely token,
    which the fp32 weights below already are: no candidates needed.

    Nothing of size [R, V] is sorted or held in fp64: the probabilities are exp(logit - max) in fp32, drawn
    from by `inverse_cdf`. Top-k/top-p look for their tokens among the top K (topk, not a sort), K the
    largest of the rows' top_k + 32 (CANDIDATES for a row with top-p alone); a row whose top-p nucleus, or
    the run of tokens tied with its k-th, is not among them looks among 8x as many (top-k: + 256), then (a
    flat distribution) is drawn by `sample_reference`. A
    vocabulary of at most 2 * CHUNK tokens is drawn by `sample_reference` (fewer ops; the same draws).
    """
    logits = logits.float()
    if any_greedy is None:
        any_greedy = temperature is not None and bool((temperature == 0).any())
    if all_greedy:
        tokens = logits.argmax(-1)
        return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - logits.logsumexp(-1)
    if logits.shape[1] <= 2 * CHUNK:  # a small vocabulary: fewer, larger ops win (measured at 64 rows, 1 CPU thread)
        return sample_reference(logits, temperature, top_k, top_p, u, truncate, any_greedy, min_p)
    if truncate is None:
        truncating = (top_k > 0) | (top_p < 1)
        truncate = bool((truncating if temperature is None else (temperature > 0) & truncating).any())
    scaled = scale_logits(logits, temperature)  # [R, V]
    top = scaled.amax(-1, keepdim=True)  # [R, 1]
    weights = (scaled - top).exp_()  # [R, V] probabilities over the most likely token's (itself 1)
    drawn_from = weights if min_p is None else weights.masked_fill(weights < min_p[:, None], 0.0)
    tokens = inverse_cdf(drawn_from, u)
    if truncate:
        tokens = torch.where((top_k > 0) | (top_p < 1), _sample_truncated(logits, scaled, weights, temperature,
                                                                          top_k, top_p, u, min_p=min_p), tokens)
    if any_greedy and temperature is not None:
        tokens = torch.where(temperature == 0, logits.argmax(-1), tokens)
    log_total = weights.sum(-1).log()  # [R], over the whole vocabulary: log-probs before truncation
    return tokens, scaled.gather(1, tokens[:, None]).squeeze(1) - top[:, 0] - log_total


def _sample_truncated(logits, scaled, weights, temperature, top_k, top_p, u, candidates=CANDIDATES,
                      min_p=None) -> torch.Tensor:
    """Top-k/top-p (and min-p) draws (rows without top-k or top-p get some token, replaced by the caller)."""
    R, V = scaled.shape
    k = torch.where(top_k > 0, top_k.clamp_max(V), V)  # [R]
    # Candidates: each row's top-k and a few past it (tokens tied with its k-th are kept too: bf16 logits
    # often tie there), or `candidates` for a top-p-only row. Host syncs: truncation is rare in RL.
    K = min(V, int(torch.where(top_k > 0, k + candidates // 32, candidates).max()))
    if 4 * K > V:  # most of the vocabulary: the plain sort costs no more
        return sample_reference(logits, temperature, top_k, top_p, u, min_p=min_p)[0]
    values, order = scaled.topk(K, -1)  # [R, K] descending
    kth = values.gather(1, k.clamp_max(K)[:, None] - 1)  # [R, 1] (meaningless for a row without top-k)
    in_top_k = (values >= kth) | (top_k <= 0)[:, None]  # [R, K]
    top_weights = torch.exp(values - values[:, :1]).masked_fill_(~in_top_k, 0.0)  # [R, K]
    # With top-k the distribution is the top-k tokens'; without, the whole vocabulary's.
    cum = top_weights.cumsum(-1)  # [R, K]
    total = torch.where(top_k > 0, cum[:, -1], weights.sum(-1))  # [R] (the row's max has weight 1 in both)
    nucleus = ((cum - top_weights) / total[:, None] < top_p[:, None]) | (top_p[:, None] >= 1)
    if min_p is not None:  # top_weights are p / p_max (values[:, :1] is the row's max), as in `sample`
        nucleus &= top_weights >= min_p[:, None]
    tokens = order.gather(1, inverse_cdf(top_weights.masked_fill_(~nucleus, 0.0), u)[:, None]).squeeze(1)
    # Without top-k, the nucleus lies among the K candidates only if their mass reaches top_p (else the
    # next token would be in it too).
    outside = (top_k <= 0) & (top_p < 1) & (cum[:, -1] / total < top_p)
    outside |= (top_k > 0) & in_top_k[:, -1]  # the tie at the k-th token may go on past the candidates
    if bool(outside.any()):  # a flatter row: look among 8x as many, then in the whole sorted vocabulary
        rows = outside.nonzero().squeeze(1)
        tokens[rows] = _sample_truncated(logits[rows], scaled[rows], weights[rows],
                                         None if temperature is None else temperature[rows], top_k[rows],
                                         top_p[rows], u[rows], 8 * candidates,
                                         None if min_p is None else min_p[rows])
    return tokens


def policy_logprobs(logits: torch.Tensor, temperature: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / T)[token] per row (T = 1 for a greedy row; temperature None: 1 for every row, one
    pass over the logits fewer): the log-prob `sample` returns, from logits it did not draw from (a repetition
    penalty's)."""
    scaled = scale_logits(logits.float(), temperature)
    return scaled.gather(1, tokens[:, None]).squeeze(1) - scaled.logsumexp(-1)


def sample_sequences(logits: torch.Tensor, seqs, seen: SeenTokens | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the next token of each sequence from its logits row [len(seqs), V] -> (token ids [S] long,
    log-probs [S] fp32) on the logits' device. No host sync (but with top-k/top-p, see `sample`): the
    per-row inputs go to the device in one copy from pinned memory, which does not wait for the forward.
    Each token is drawn for position `seq.num_tokens` (a pending token of async scheduling counted).

    A sequence with a repetition penalty (`seen`: the call's SeenTokens, needed then) draws from its
    penalized logits; its log-prob stays the unpenalized distribution's, the policy's that training
    recomputes, as with top-k/top-p/min-p.

    What the draw needs is read from the step's distinct SamplingParams (a few: a rollout's requests share
    their settings, RL's usually T = 1 and nothing else), and only the per-row inputs some row needs are made:
    at T = 1 without top-k/top-p/min-p/penalty, the uniforms alone, and the logits are not divided (the same
    draws; measured on one CPU core, 115 -> 81 us a decode step at the default job's 64 rows, 73 -> 50 us at 23).
    """
    distinct = {id(seq.params): seq.params for seq in seqs}.values()
    unit = all(p.temperature == 1 for p in distinct)  # no temperature row: the logits are not divided
    truncate = any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in distinct)
    any_greedy = any(p.temperature == 0 for p in distinct)
    all_greedy = all(p.temperature == 0 for p in distinct)
    any_min_p = any(p.min_p > 0 for p in distinct)
    penalized = any(p.repetition_penalty != 1 for p in distinct)
    names = (["temperature"] * (not unit) + ["top_p", "top_k"] * truncate + ["min_p"] * any_min_p
             + ["repetition_penalty"] * penalized)
    rows = np.empty((1 + len(names), len(seqs)))  # fp64 (top_k: ints < 2**53, exact)
    rows[0] = stream_uniforms([seq.stream for seq in seqs],
                              [len(seq.token_ids) + seq.num_pending for seq in seqs])  # at seq.num_tokens
    for i, name in enumerate(names, 1):
        rows[i] = [getattr(seq.params, name) for seq in seqs]
    u, *rest = to_device(torch.from_numpy(rows), logits.device)  # [1 to 6, S]: one copy
    rows = dict(zip(names, rest))
    temperature = rows["temperature"].float() if "temperature" in rows else None
    drawn_from = logits.float()
    if penalized:
        if seen is None:
            raise ValueError("sample_sequences: a repetition penalty needs the call's SeenTokens")
        seen_rows = seen.rows(seqs)
        drawn_from = apply_repetition_penalty(drawn_from, seen.mask[seen_rows], rows["repetition_penalty"].float())
    tokens, logprobs = sample(drawn_from, temperature, rows["top_k"].long() if truncate else None,
                              rows["top_p"].float() if truncate else None, u, truncate, any_greedy, all_greedy,
                              rows["min_p"].float() if any_min_p else None)
    if penalized:
        greedy_or_unit = all(p.temperature in (0, 1) for p in distinct)  # RL's usual T = 1: no division
        logprobs = policy_logprobs(logits, None if greedy_or_unit else temperature, tokens)
        seen.mark(seen_rows, tokens)
    return tokens, logprobs
