"""Sampling: temperature, top-k, top-p, greedy, with a counter-based random stream per sample.

Randomness. Each draw uses one uniform number u = splitmix64(key, sample index, position), where
`key` mixes the request's seed with its prompt tokens. So a sample depends only on (seed, prompt,
sample index, position): not on the batch it ran in, on preemptions, or on CUDA graphs, and two
different prompts with the same seed do not get correlated noise. The token is drawn by inverse CDF
(u against the fp64 cumulative sum of the truncated, renormalized probabilities): one uniform per row
is all the host computes, and a zero-probability token can never be drawn.

Log-probs. The returned log-prob is log_softmax(logits / T) at the drawn token, BEFORE top-k/top-p
truncation (T = 1 for greedy): exactly what the trainer recomputes by teacher forcing. With top-k or
top-p on, the token was drawn from the truncated distribution, whose log-prob is this minus
log(kept mass).
"""
from __future__ import annotations

import torch

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def request_key(seed: int, prompt: list[int]) -> int:
    return splitmix64((seed & _M64) ^ (hash(tuple(prompt)) & _M64))


def sample_stream(key: int, sample_index: int) -> int:
    """One sample's stream: a Sequence computes it once, then draws `stream_uniform(stream, position)`."""
    return splitmix64(key ^ sample_index)


def stream_uniform(stream: int, position: int) -> float:
    return (splitmix64(stream ^ position) >> 11) * 2.0 ** -53


def uniform(key: int, sample_index: int, position: int) -> float:
    """A uniform in [0, 1) (53 bits) for one draw."""
    return stream_uniform(sample_stream(key, sample_index), position)


def truncate_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) all but the top-k, then all but the top-p nucleus of what is left.

    sorted_logits [R, V] in descending order (temperature applied); top_k [R] (<= 0: off); top_p [R].
    The nucleus is the smallest prefix whose mass reaches top_p (the token that crosses it is kept).
    """
    R, V = sorted_logits.shape
    ranks = torch.arange(V, device=sorted_logits.device)  # [V]
    k = torch.where(top_k > 0, top_k, V)  # [R]
    logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # [R, V] mass of the strictly better tokens
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # top_p 1 is off, whatever the rounding
    return logits.masked_fill(outside, float("-inf"))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           u: torch.Tensor, truncate: bool = True, any_greedy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] fp32; temperature/top_p [R] float; top_k [R] long; u [R] fp64 in [0, 1).

    Returns token ids [R] and their log-probs [R] (see the module docstring). `truncate=False`
    skips the sort when no row uses top-k or top-p, `any_greedy=False` the argmax when no row is greedy.
    """
    logits = logits.float()
    greedy = temperature == 0  # [R]
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # [R, V]
    logp = scaled.log_softmax(-1)  # [R, V]
    if truncate:
        sorted_logits, order = scaled.sort(-1, descending=True)  # [R, V]
        probs = truncate_sorted(sorted_logits, top_k, top_p).softmax(-1)
    else:
        probs, order = logp.exp(), None
    cdf = probs.double().cumsum(-1)  # [R, V]
    # First token whose cdf reaches u * total: P(i) = p_i / total. u * total <= total (u < 1), and the
    # floor keeps a leading zero-probability token out when u = 0.
    target = (u * cdf[:, -1]).clamp_min(torch.finfo(torch.float64).tiny)[:, None]  # [R, 1]
    idx = torch.searchsorted(cdf, target).clamp_max(cdf.shape[1] - 1)  # [R, 1]
    drawn = (order.gather(1, idx) if order is not None else idx).squeeze(1)  # [R]
    tokens = torch.where(greedy, logits.argmax(-1), drawn) if any_greedy else drawn
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def sample_sequences(logits: torch.Tensor, seqs) -> tuple[list[int], list[float]]:
    """Sample the next token of each sequence from its logits row [len(seqs), V]; one host sync.

    The per-row inputs go to the device in one copy, made after all the Python work: on CUDA a copy
    from pageable memory waits for the forward still running, so work done before it overlaps that
    forward and work after it does not.
    """
    params = [seq.params for seq in seqs]
    temperature = [p.temperature for p in params]
    top_p = [p.top_p for p in params]
    top_k = [p.top_k for p in params]  # ints < 2**53: exact in fp64
    u = [stream_uniform(seq.stream, len(seq.token_ids)) for seq in seqs]
    truncate = any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params)
    any_greedy = any(t == 0 for t in temperature)
    rows = torch.tensor([temperature, top_p, top_k, u], dtype=torch.float64, device=logits.device)  # [4, S]
    tokens, logp = sample(logits, rows[0].float(), rows[2].long(), rows[1].float(), rows[3], truncate, any_greedy)
    return tokens.tolist(), logp.tolist()
