"""Our own decoder for the Llama, Qwen2 and Qwen3 families, in plain PyTorch.

Module and parameter names mirror transformers' (`model.layers.0.self_attn.q_proj.weight`, ...), so a
checkpoint's state dict loads and saves without renaming. The families differ by three switches in
ModelConfig: q/k/v biases (Qwen2), q/k RMSNorm (Qwen3), and the RoPE scaling rule (Llama 3, YaRN, linear).

Attention is pluggable: every layer computes q, k, v (after norm and RoPE) and hands them to an
`attn` object, `attn(layer_idx, q, k, v) -> out`. The default, `PaddedAttention`, is causal SDPA over a
padded batch (training, teacher forcing, parity tests); `VarlenAttention` runs the real tokens packed
through flash-attn's varlen kernel when that optional extra is installed. The rollout engine passes a paged-KV-cache
backend instead, and shared-prefix training a prefix-aware one; the decoder itself never changes.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rpo_engine.model.config import ModelConfig, rope_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, cast back, times the weight, as in the reference
        # implementations; F.rms_norm computes it bit for bit the same (tests/test_model.py), in one op.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written out, as transformers writes it: what RMSNorm must equal."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]; cos and signed_sin [B, T, 1, D] from RotaryEmbedding. Equals
    x * cos + rotate_half(x) * sin bit for bit: rotate_half(x) * sin = roll(x, D/2) * (-sin1, sin2), and
    negating either factor of a product rounds the same. One roll instead of a split, a negation and a cat."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # Not a checkpoint tensor (persistent=False): always recomputed from the config. The attention scaling
        # (YaRN's; 1.0 for the others) is a plain float, so no device move or dtype cast touches it.
        # Computed on the CPU, as load_model's: on the meta device (its shapes-only model) arange and pow import
        # torch._dynamo and sympy, ~1.3 s of every CLI start.
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, T] -> cos, signed sin [B, T, 1, D] (broadcast over heads), for `apply_rope`: computed in
        fp32, then cast (as transformers does); the sine's first half negated (exact), for the roll."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [B, T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:  # YaRN: in fp32, before the cast, as transformers does
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos, sin = cos.to(dtype), sin.to(dtype)
        return torch.cat((cos, cos), -1).unsqueeze(2), torch.cat((-sin, sin), -1).unsqueeze(2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False, repeat_kv: bool | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention of q [B, H, Tq, D] over k/v [B, KVH, Tk, D], KVH dividing H.

    Grouped K/V heads go in as they are (enable_gqa), unless a mask comes with them on a GPU whose torch has no
    fused kernel for that: flash takes no mask, and the memory-efficient kernel took no grouped heads (torch 2.11;
    transformers' use_gqa_in_sdpa gives CUDA a mask only with repeated heads), so SDPA ran its math kernel, which
    holds [B, H, Tq, Tk] fp32 scores: ~8 GB a layer for a 7B model's group of 8 suffixes of 1k tokens under a 1k
    prefix. Then K/V are repeated to H heads first, as transformers does. `repeat_kv` forces either way (tests)."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and repeat_kv is None:
        repeat_kv = attn_mask is not None and q.is_cuda and not _masked_gqa_fused(q.dtype, q.shape[-1], q.device)
    if gqa and repeat_kv:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))  # query head h reads h // group
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)


@functools.cache
def _masked_gqa_fused(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether torch's memory-efficient CUDA kernel (ahead of the math kernel in SDPA's order) takes grouped heads
    with a mask, asked once per dtype, head dim and GPU on small tensors of that kind."""
    from torch.backends import cuda

    q = torch.zeros(1, 2, 8, head_dim, dtype=dtype, device=device)
    k = torch.zeros(1, 1, 8, head_dim, dtype=dtype, device=device)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=device)
    return cuda.can_use_efficient_attention(cuda.SDPAParams(q, k, k, mask, 0.0, False, True), False)


class PaddedAttention:
    """Causal attention over a padded batch with torch SDPA.

    `attention_mask` [B, T] marks real tokens (1) and padding (0), left or right. A padding query
    row attends to itself (and, after right padding, to the real tokens before it), so it always has a
    key and stays finite; its output is never used.
    """

    def __init__(self, attention_mask: torch.Tensor | None, seq_len: int, device: torch.device):
        self.mask = None  # None: plain causal, the fast SDPA path
        if attention_mask is not None and not bool(attention_mask.all()):  # host sync, once per forward
            keep = attention_mask.bool()  # [B, T]
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
            eye = torch.eye(seq_len, dtype=torch.bool, device=device)
            self.mask = ((causal & keep[:, None, :]) | eye)[:, None]  # [B, 1, T, T]

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, T, H, D], k/v [B, T, KVH, D] -> [B, T, H, D]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return sdpa(q, k, v, attn_mask=self.mask, is_causal=self.mask is None).transpose(1, 2)


def flash_attn_available() -> bool:
    """flash-attn is an optional GPU extra (`pip install rpo_engine[gpu]`): used when importable, never required."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def flash_varlen(q, k, v, cu_seqlens, max_seqlen):
    """flash-attn's variable-length causal attention over packed sequences (GQA native)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen):
    """Reference for `flash_varlen`: causal SDPA over each packed sequence in turn. q [N, H, D], k/v [N, KVH, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=ks.shape[1] != qs.shape[1])
        out[start:end] = o[0].transpose(0, 1)
    return out


class VarlenAttention:
    """Causal attention over a padded batch computed on the real tokens only, packed end to end.

    SDPA over a padded batch with a mask pays for the padding and leaves torch's flash kernel (which
    takes no mask); flash-attn's varlen kernel runs the packed tokens with per-row boundaries
    (`cu_seqlens`) instead. `varlen_fn(q, k, v, cu_seqlens, max_seqlen)` is `flash_varlen` on a GPU
    and `sdpa_varlen` (its reference) in the tests. Padding positions come out as zeros, never read.
    """

    def __init__(self, attention_mask: torch.Tensor, varlen_fn=flash_varlen):
        keep = attention_mask.bool()  # [B, T]
        lengths = keep.sum(-1)
        self.index = keep.flatten().nonzero().squeeze(1)  # packed order: row by row, left to right
        self.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        self.max_seqlen = int(lengths.max())
        self.varlen_fn = varlen_fn

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, H, D = q.shape
        pack = lambda t: t.reshape(B * T, t.shape[2], D)[self.index]  # noqa: E731
        out = self.varlen_fn(pack(q), pack(k), pack(v), self.cu_seqlens, self.max_seqlen)
        full = q.new_zeros(B * T, H, D)
        full[self.index] = out
        return full.view(B, T, H, D)


def default_attention(attention_mask, seq_len: int, device: torch.device, dtype: torch.dtype):
    """flash-attn varlen for padded half-precision batches on a GPU when installed, else causal SDPA."""
    if (attention_mask is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and flash_attn_available() and not bool(attention_mask.all())):
        return VarlenAttention(attention_mask)
    return PaddedAttention(attention_mask, seq_len, device)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, cos, sin, attn) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, KVH, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attn(self.layer_idx, q, k, v)  # [B, T, H, D]
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        shape = (config.vocab_size, config.hidden_size)
        # On the meta device (load_model's and from_transformers' shapes-only model: the weights are replaced) no
        # random init: normal_ on meta imports torch._dynamo and sympy, ~1.3 s of every CLI start.
        on_meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape) if on_meta else None)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """Decoder-only LM. `model(input_ids, attention_mask=None)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.source_dir = None  # the checkpoint directory we were loaded from, if any (for tokenizer files)
        # its generation_config.json as loaded, saved with the model: the directory may be gone by then (a resumed
        # run's checkpoint, pruned by --save-total-limit)
        self.generation_config_file: bytes | None = None

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, attn=None) -> torch.Tensor:
        """Final (normed) hidden states [B, T, hidden]: the input of the LM head, for fused log-prob kernels.

        position_ids default to each token's index among the real tokens of its row (so left-padded
        rows start at 0), or 0..T-1 without a mask. `attn` defaults to causal SDPA over the padded batch
        (flash-attn's varlen kernel instead, for a padded bf16/fp16 batch on a GPU, when it is installed).
        input_ids that are not [B, T] integer ids in [0, vocab_size), or a mask of another shape: a ValueError.
        """
        self._check_inputs(input_ids, attention_mask, check_ids=attn is None)
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if attn is None:
            attn = default_attention(attention_mask, T, input_ids.device, self.dtype)
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the layer in backward instead of keeping its activations.
                x = checkpoint(layer, x, cos, sin, attn, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    def _check_inputs(self, input_ids, attention_mask, check_ids: bool) -> None:
        """A ValueError naming the argument, not an unpacking error, an embedding IndexError or (on CUDA) a
        device-side assert that ends the process's CUDA context. The id range costs a host sync, so it is
        checked only for callers without their own attention backend (the rollout engine and shared-prefix
        training pass one, with ids they made) and never while a CUDA graph is being captured."""
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point()
                or input_ids.is_complex() or input_ids.dtype == torch.bool):
            raise ValueError(f"input_ids must be an integer tensor of shape [B, T], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != tuple(input_ids.shape)):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(getattr(attention_mask, 'shape', ()))}")
        if check_ids and input_ids.numel() and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            low, high = (int(x) for x in torch.aminmax(input_ids))
            vocab = self.config.vocab_size
            if low < 0 or high >= vocab:
                raise ValueError(f"input_ids must lie in [0, {vocab}) (the model's vocab_size), got values in "
                                 f"[{low}, {high}]")

    def forward(self, input_ids, attention_mask=None, position_ids=None, attn=None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, attn))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> "CausalLM":
        """transformers' initialisation: N(0, std) for every matrix, ones for norms, zeros for biases."""
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        return self

    def gradient_checkpointing_enable(self):
        self.gradient_checkpointing = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def save_pretrained(self, directory, tokenizer=None) -> None:
        from rpo_engine.model.checkpoint import save_pretrained

        save_pretrained(self, directory, tokenizer=tokenizer)
