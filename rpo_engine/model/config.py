"""ModelConfig: the decoder's hyper-parameters, read from (and written back to) a Hugging Face config.json.

One dataclass covers the Llama, Qwen2 and Qwen3 families; the differences are three switches
(`qkv_bias`, `o_bias`, `qk_norm`) plus the RoPE scaling rule. Anything we do not implement
(sliding windows, RoPE types other than default / llama3 / yarn / linear, other activations) is a
UserError naming the field, never a silently different model.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from rpo_engine.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" / "yarn" / "linear", "factor", ...} or None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always on; Llama/Qwen3: `attention_bias`
    o_bias: bool = False  # Llama/Qwen3 `attention_bias` also biases o_proj; Qwen2 never does
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # generation_config.json's eos_token_id, where a checkpoint has one: what transformers' generate and
    # vLLM stop at. Llama-3-Instruct ends a turn with <|eot_id|> (128009), named only there.
    generation_eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The raw config.json we were built from, written back on save so fields we do not use survive.
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Where generation ends by default: config.json's eos ids, then generation_config.json's others."""
        return self.eos_token_ids + tuple(t for t in dict.fromkeys(self.generation_eos_token_ids)
                                          if t not in self.eos_token_ids)

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + completion) the model takes: max_position_embeddings, or vLLM's
        scaled context where it is longer: a linear rope_scaling's factor times max_position_embeddings, YaRN's
        factor times its original context (Qwen's model cards add YaRN to config.json and leave
        max_position_embeddings at the original 32768). llama3 configs give the scaled context themselves."""
        s, scaled = self.rope_scaling, 0
        rope_type = _rope_type(s)
        if rope_type == "linear":
            scaled = self.max_position_embeddings * s["factor"]
        if rope_type == "yarn":
            original, factor = _yarn_context(self)
            scaled = original * factor
        return max(self.max_position_embeddings, int(scaled))

    def describe_context(self) -> str:
        """max_model_len and where it comes from, for the errors of a sequence too long for it."""
        scaled = ", with its rope_scaling" if self.max_model_len != self.max_position_embeddings else ""
        return f"context of {self.max_model_len} tokens (max_position_embeddings{scaled})"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"unsupported model_type {self.model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
        # transformers computes them too, into NaN rotary frequencies or norms: a silently different model
        if self.rope_theta <= 0:
            raise UserError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rms_norm_eps < 0:
            raise UserError(f"rms_norm_eps must be >= 0, got {self.rms_norm_eps!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise UserError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = _rope_type(self.rope_scaling)
            if rope_type == "dynamic":
                raise UserError("unsupported rope_scaling type 'dynamic': its frequencies change with the sequence "
                                "length at run time, which keys already rotated into the paged KV cache at shorter "
                                "lengths cannot follow (the static 'yarn' and 'linear' scalings are supported)")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UserError(f"unsupported rope_scaling type {rope_type!r}; expected one of {SUPPORTED_ROPE_TYPES}")
            if rope_type == "default":  # no scaling: None is how the rest of the code reads it
                object.__setattr__(self, "rope_scaling", None)
            if rope_type == "llama3":
                keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                missing = [k for k in keys if k not in self.rope_scaling]
                if missing:
                    raise UserError(f"llama3 rope_scaling is missing {missing}")
                for key in keys:
                    if _number(self.rope_scaling[key], f"rope_scaling {key}") <= 0:
                        raise UserError(f"rope_scaling {key} must be > 0, got {self.rope_scaling[key]!r}")
                if self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
                    raise UserError("rope_scaling high_freq_factor must be above low_freq_factor")
            if rope_type == "linear":
                if "factor" not in self.rope_scaling:
                    raise UserError("linear rope_scaling is missing ['factor']")
                if _number(self.rope_scaling["factor"], "rope_scaling factor") <= 0:
                    raise UserError(f"rope_scaling factor must be > 0, got {self.rope_scaling['factor']!r}")
            if rope_type == "yarn":
                _check_yarn(self.rope_scaling)

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Read a transformers config.json, with transformers' defaults for what it leaves out; a field of the
        wrong type or value is a UserError naming `source`, never a traceback or a different model. A transformers
        config object (AutoConfig.from_pretrained's) is read through its to_dict()."""
        if not isinstance(hf, dict) and callable(getattr(hf, "to_dict", None)):
            hf = hf.to_dict()
        if not isinstance(hf, dict):  # a path, say: else "missing required field 'model_type'"
            raise UserError(f"ModelConfig.from_hf_dict takes config.json's contents as a dict, got "
                            f"{type(hf).__name__} (ModelConfig.from_file reads a file)")
        try:
            return cls._from_hf_dict(hf)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        except (TypeError, ValueError, AttributeError, ArithmeticError) as e:
            raise UserError(f"{source}: a field has the wrong type or value ({e})") from None

    @classmethod
    def _from_hf_dict(cls, hf: dict) -> "ModelConfig":
        def need(key):
            if key not in hf:
                raise UserError(f"missing required field {key!r}")
            return hf[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"unsupported model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        if hf.get("quantization_config"):  # fp8 / GPTQ / AWQ weights would load as if they were plain ones
            method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) \
                else hf["quantization_config"]
            raise UserError(f"quantization_config ({method!r}): quantized checkpoints are not supported; "
                            f"use the bf16 / fp16 / fp32 release")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers: "swish" is SiLU too
            raise UserError(f"unsupported hidden_act {act!r}; expected 'silu'")
        num_layers = need("num_hidden_layers")
        dropout = hf.get("attention_dropout") or 0.0
        if dropout:  # transformers drops attention weights in train mode (TRL's disable_dropout leaves it); we never
            warnings.warn(f"attention_dropout {dropout} is ignored: rpo_engine trains without dropout, which would make "
                          f"the training forward differ from the rollout's (the policy ratio would read it as a change "
                          f"of policy)", stacklevel=3)
        # transformers' defaults where a config leaves a field out
        default_context = 2048 if model_type == "llama" else 32768
        context = hf.get("max_position_embeddings", default_context)
        sliding = _sliding_layers(hf, num_layers, context)
        if sliding:
            raise UserError(f"use_sliding_window=true gives {len(sliding)} layer(s) a "
                            f"{hf.get('sliding_window', 4096)}-token window (from layer {sliding[0]}): "
                            f"sliding-window attention is not supported")

        # transformers>=5 nests rope_theta and the scaling rule in `rope_parameters`; older configs (and every
        # released Qwen/Llama checkpoint) keep `rope_theta` and `rope_scaling` at the top. Where a config has a
        # top-level rope_scaling, transformers (4.x and 5.x) reads it with the top-level rope_theta and drops
        # rope_parameters: one that says otherwise is refused, not silently dropped (nor silently preferred).
        rope_params = hf.get("rope_parameters") or {}
        top_scaling = hf.get("rope_scaling") or None
        for key, value in (("rope_parameters", rope_params), ("rope_scaling", top_scaling or {})):
            if not isinstance(value, dict):
                raise UserError(f"{key} must be a JSON object, got {value!r}")

        def rope(source: dict, name: str):
            theta = _number(source["rope_theta"], f"{name}.rope_theta") if "rope_theta" in source \
                else _number(hf.get("rope_theta", 10000.0), "rope_theta")
            rule = {k: v for k, v in source.items() if k not in ("rope_theta", "type", "rope_type")}
            kind = source.get("rope_type", source.get("type", "default"))
            return theta, (None if kind == "default" else dict(rule, rope_type=kind))

        read, read_name = (top_scaling, "rope_scaling") if top_scaling else (rope_params, "rope_parameters")
        rope_theta, rope_scaling = rope(read, read_name)
        if top_scaling and rope_params:
            theta, scaling = rope(rope_params, "rope_parameters")
            if "rope_theta" in rope_params and theta != rope_theta:
                raise UserError(f"rope_parameters.rope_theta {theta} differs from the rope_theta {rope_theta} "
                                f"transformers reads beside rope_scaling; keep one of rope_scaling, rope_parameters")
            if scaling is not None and scaling != rope_scaling:
                raise UserError(f"rope_parameters {rope_params} differ from rope_scaling {top_scaling}, which "
                                f"transformers reads instead; keep one of them")
        # RoPE on part of each head: vLLM's Llama rotates that part, transformers' fails; we rotate every dimension.
        # (transformers' Qwen2/Qwen3 ignore the field, as we do.)
        for partial in (hf.get("partial_rotary_factor"), rope_params.get("partial_rotary_factor"),
                        (top_scaling or {}).get("partial_rotary_factor")):
            if model_type == "llama" and partial is not None and partial != 1:
                raise UserError(f"partial_rotary_factor {partial}: rotary embeddings on part of each head are not "
                                f"supported")
        # transformers 5 takes a top-level original_max_position_embeddings over the scaling rule's own
        top_original = hf.get("original_max_position_embeddings")
        if rope_scaling is not None and top_original is not None \
                and rope_scaling["rope_type"] in ("llama3", "yarn"):  # the types that read it
            if rope_scaling.setdefault("original_max_position_embeddings", top_original) != top_original:
                raise UserError(f"original_max_position_embeddings {top_original} differs from the rope scaling's "
                                f"{rope_scaling['original_max_position_embeddings']} (transformers 5 reads the "
                                f"top-level one, 4.x the other); keep one")

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        attention_bias = _flag(hf, "attention_bias")
        # num_heads 0: __post_init__ names the field (a ZeroDivisionError here named none)
        default_head_dim = 128 if model_type == "qwen3" or num_heads == 0 else hidden // num_heads
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or default_head_dim,
            max_position_embeddings=context,
            rms_norm_eps=_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=_flag(hf, "tie_word_embeddings"),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=model_type == "llama" and _flag(hf, "mlp_bias"),  # Qwen's modules have none
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=token_ids(hf.get("eos_token_id"), "eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=dict(hf),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config.json not found")
        return cls.from_hf_dict(read_json_object(path), source=str(path))

    def to_hf_dict(self) -> dict:
        """A config.json that transformers (4.x and 5.x) loads into the same architecture."""
        hf = dict(self.hf_config)
        hf.pop("rope_parameters", None)  # rewritten below in the form every transformers version reads
        hf.update(
            model_type=self.model_type,
            architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                            "qwen3": "Qwen3ForCausalLM"}[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=(list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0])
            if self.eos_token_ids else None,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        return hf


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _flag(hf: dict, name: str) -> bool:
    """A true/false field, false where left out or null. A string is refused, as transformers 5 refuses it:
    "false" is truthy, and tie_word_embeddings "false" tied the model, dropping the checkpoint's own lm_head."""
    value = hf.get(name)
    if value is not None and not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def token_ids(value, name: str) -> tuple[int, ...]:
    """An eos_token_id field (a token id, a list of them, or null) as a tuple; anything else is a UserError."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise UserError(f"{name} must be a token id or a list of them, got {value!r}")
    return tuple(ids)


def _sliding_layers(hf: dict, num_layers, context) -> list[int]:
    """The layers transformers' Qwen2/Qwen3 give sliding-window attention: none unless use_sliding_window, then
    those `layer_types` names "sliding_attention" (or, without it, those from max_window_layers on), and
    none when the window covers the whole context anyway."""
    window = hf.get("sliding_window", 4096)  # transformers' default where the field is left out (null: none)
    if not hf.get("use_sliding_window", False) or window is None or not isinstance(num_layers, int):
        return []
    if isinstance(window, int) and isinstance(context, int) and window >= context:
        return []
    layer_types = hf.get("layer_types")
    if isinstance(layer_types, list):
        return [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    first = hf.get("max_window_layers", 28)
    return list(range(first, num_layers)) if isinstance(first, int) else list(range(num_layers))


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_generation_eos(path: str | Path) -> tuple[int, ...]:
    """The eos_token_id of a generation_config.json (an int or a list of ints), () if it has none or there
    is no such file."""
    path = Path(path)
    if not path.is_file():
        return ()
    data = read_json_object(path)  # its errors name the file already
    try:
        return token_ids(data.get("eos_token_id"), "eos_token_id")
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _rope_type(rope_scaling: dict | None) -> str | None:
    """The scaling rule's name: `rope_type`, or the older `type` key (None: no scaling)."""
    return None if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))


def _check_yarn(s: dict) -> None:
    """The YaRN keys transformers 5 reads, each a UserError naming it when it cannot mean a rotary embedding.
    An optional key left out or null takes transformers' default; `factor` null is transformers' DeepSeek rule
    (max_position_embeddings / original_max_position_embeddings)."""
    if "factor" not in s:
        raise UserError("yarn rope_scaling is missing ['factor']")
    for key in ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow"):
        if s.get(key) is not None and _number(s[key], f"rope_scaling {key}") <= 0:
            raise UserError(f"rope_scaling {key} must be > 0, got {s[key]!r}")
    for key in ("mscale", "mscale_all_dim"):  # 0 (as null) means unset to transformers
        if s.get(key) is not None and _number(s[key], f"rope_scaling {key}") < 0:
            raise UserError(f"rope_scaling {key} must be >= 0, got {s[key]!r}")
    if (s.get("beta_fast") or 32) < (s.get("beta_slow") or 1):  # the ramp would run backwards
        raise UserError(f"rope_scaling beta_fast ({s.get('beta_fast') or 32}) must be at least beta_slow "
                        f"({s.get('beta_slow') or 1})")
    if "truncate" in s and not isinstance(s["truncate"], bool):  # transformers reads null as false, absent as true
        raise UserError(f"rope_scaling truncate must be true or false, got {s['truncate']!r}")


def rope_frequencies(config: ModelConfig):
    """(inverse frequencies [head_dim // 2] in fp32, the factor cos and sin are scaled by), as transformers 5's
    rope init functions compute them for the config's rope_scaling: the one computation every forward uses."""
    import torch

    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq, 1.0
    rope_type = _rope_type(s)
    if rope_type == "linear":  # positions / factor
        return inv_freq / s["factor"], 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(config, inv_freq)
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _yarn_frequencies(config: ModelConfig, inv_freq_extrapolation):
    """YaRN, step for step as transformers 5's _compute_yarn_parameters: the frequencies that turn fewer than
    beta_slow times over the original context are interpolated (divided by factor), those that turn more than
    beta_fast times kept, a linear ramp between; cos and sin are scaled by the attention factor."""
    import torch

    s, dim, base = config.rope_scaling, config.head_dim, config.rope_theta
    original, factor = _yarn_context(config)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dimension that turns num_rotations times over the original context
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation) + inv_freq_extrapolation * extrapolation
    return inv_freq, attention_factor


def _yarn_context(config: ModelConfig) -> tuple[int, float]:
    """YaRN's original context and factor, with transformers 5's defaults: a missing
    original_max_position_embeddings is max_position_embeddings, a null factor max_position_embeddings over it."""
    s = config.rope_scaling
    original = s.get("original_max_position_embeddings") or config.max_position_embeddings
    return original, s["factor"] if s["factor"] is not None else config.max_position_embeddings / original


def _yarn_mscale(scale, mscale=1):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies [head_dim // 2] in fp32 (rope_frequencies' first half)."""
    return rope_frequencies(config)[0]
