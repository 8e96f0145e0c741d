"""Hugging Face checkpoint directories in and out: config.json + safetensors (single file or sharded).

Loading checks every tensor the architecture needs: a missing, misshaped or quantized one is a UserError
naming the file and the tensor, never a half-initialised model. Saving writes into a temporary directory
and renames it into place, so an interrupted save never leaves a broken model where a good one was; other
files in the directory stay.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rpo_engine.errors import UserError
from rpo_engine.hub import hub_snapshot, is_hub_id
from rpo_engine.model.atomic import private_to_umask, replacing_directory
from rpo_engine.model.config import ModelConfig, read_generation_eos, rope_inv_freq, token_ids
from rpo_engine.model.decoder import CausalLM
from rpo_engine.model.lora import is_peft_adapter_parameter, merged_state_dict, share_peft_adapters

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
# transformers 5 writes a tokenizer's named chat templates (all but the default) as files in this folder
CHAT_TEMPLATES_DIR = "additional_chat_templates"

# An earlier save's weights, which a new save replaces even where it names its files differently (shards)
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:  # torch.int8 would cast every weight to integers (no quantization here)
            raise UserError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if dtype is None or dtype == "auto":  # "auto": transformers' name for None's
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")


def _weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file holding it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: weight_map must map each tensor name to a shard file name")
        files = {name: directory / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise UserError(f"{index}: shard {shard.name} is missing")
        return files
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{single}: not a readable safetensors file ({e})") from None


# What a model needs from a Hub repository: config and index JSON, safetensors weights, tokenizer files, a chat
# template; never the .bin / .pth / .gguf / ONNX copies many repositories also hold (gigabytes we do not read)
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja")


def model_directory(path, cached_only: bool = False) -> Path:
    """`path` itself, or where it is a Hub id (`Qwen/Qwen2.5-0.5B-Instruct`) and no local path, its snapshot in
    the Hugging Face cache (rpo_engine.hub): only the JSON, safetensors and tokenizer files."""
    if is_hub_id(path):
        return hub_snapshot(str(path), "model", HUB_FILES, cached_only)
    # ./org/tiny or org/tiny/ is a local path, but a Path drops the ./ and the /: made absolute, or a caller that
    # resolves what this returns again (load_model, given a run's model directory) would read the Hub's org/tiny
    directory = Path(path)
    return directory.absolute() if is_hub_id(directory) else directory


def load_model(path, dtype=None, device=None) -> CausalLM:
    """Load a Llama / Qwen2 / Qwen3 checkpoint directory, or a Hub model id (`Qwen/Qwen2.5-0.5B-Instruct`:
    the local cache's copy, downloaded first where missing; `model_directory`).

    dtype None (or "auto", transformers' spelling) keeps the dtype the weights are stored in; device None means
    CPU. The model comes back in train mode (it has no dropout, so eval mode changes nothing).
    """
    directory = model_directory(path)
    if not directory.is_dir():
        raise UserError(f"{directory}: model directory not found")
    config = ModelConfig.from_file(directory / "config.json")
    generation = directory / "generation_config.json"
    config = dataclasses.replace(config, generation_eos_token_ids=read_generation_eos(generation))
    dtype = resolve_dtype(dtype)
    try:  # not `device or "cpu"`: device 0 is torch's cuda:0
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:  # "gpu", or 0 where torch sees no accelerator
        raise UserError(f"device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():  # else an AssertionError deep in torch
        raise UserError(f"device {str(device)!r}: torch sees no CUDA device")
    files = _weight_files(directory)
    held = sorted({int(m.group(1)) for name in files if (m := re.match(r"model\.layers\.(\d+)\.", name))})
    if config.num_hidden_layers > len(held):  # before the meta model: a billion layers' modules take hours to build
        holding = f"layers {held[0]} to {held[-1]} ({len(held)} layers)" if held else "no layers"
        raise UserError(f"{directory}: config.json's num_hidden_layers is {config.num_hidden_layers}, but the "
                        f"weights hold {holding}")

    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: p for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # shares embed_tokens.weight; checkpoints usually omit it
    missing = sorted(set(expected) - set(files))
    if missing:
        raise UserError(f"{directory}: checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r}")
    # Tensors the config has no place for belong to another model (biases config.json leaves out, more layers):
    # dropping them would run a different one. A tied head's own copy and old rotary buffers are no weights.
    unused = sorted(name for name in set(files) - set(expected) if name != "lm_head.weight"
                    and not name.endswith("rotary_emb.inv_freq"))
    if unused:
        raise UserError(f"{directory}: checkpoint has {len(unused)} tensor(s) config.json has no place for, first "
                        f"{unused[0]!r} (a field such as attention_bias, mlp_bias or num_hidden_layers that does "
                        f"not match the weights, or another architecture)")

    state = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                        raise UserError(f"{file}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, "
                                        f"not a float16/bfloat16/float32 weight (quantized checkpoints are not "
                                        f"supported)")
                    if tuple(tensor.shape) != tuple(expected[name].shape):
                        raise UserError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                        f"expected {tuple(expected[name].shape)}")
                    state[name] = tensor
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None

    if dtype is None:
        dtype = state["model.embed_tokens.weight"].dtype
    # The meta model's tensors replaced by the loaded ones (assign=True), never allocated first: to_empty would put a
    # second, uninitialised copy of the model on the device until the load replaced it (32 GB at 8B in bf16).
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)  # not a checkpoint tensor: still on meta
    model.source_dir = directory
    model.generation_config_file = generation.read_bytes() if generation.is_file() else None
    return model


def from_transformers(hf_model) -> CausalLM:
    """Our decoder on a transformers model's own parameters: the same Parameter objects, no copy. An optimizer
    stepping either model steps both, so a RolloutEngine on the result samples from the weights being trained
    (how rpo_engine.integrations.trl rolls out inside TRL's GRPOTrainer, with no second copy and no weight sync).

    `hf_model`: a Llama / Qwen2 / Qwen3 causal LM (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM) with
    whole parameters on one device in one dtype, or such a model with PEFT LoRA adapters (a PeftModel, TRL's
    peft_config): each adapted projection becomes a LoRALinear on the adapter's own A and B (model/lora.py:
    share_peft_adapters), so the adapters too are read live. Parameters sharded by DeepSpeed ZeRO-3 or FSDP are
    a UserError: they are not whole tensors here. RoPE's inverse frequencies are computed from the config, as
    load_model computes them. The result is in train mode, as a loaded model is (neither has dropout: a config's
    attention_dropout is warned about and ignored)."""
    name = type(hf_model).__name__
    # a PeftModel wraps the transformers model, whose adapted projections hold the base Linear as `base_layer`
    inner = hf_model.get_base_model() if callable(getattr(hf_model, "get_base_model", None)) else hf_model
    config_object = getattr(inner, "config", None)
    if config_object is None or not callable(getattr(inner, "named_parameters", None)):
        raise UserError(f"from_transformers takes a transformers causal LM (with .config), got {name}")
    config = ModelConfig.from_hf_dict(config_object, source=f"{name}.config")
    generation = getattr(inner, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    config = dataclasses.replace(config, generation_eos_token_ids=token_ids(eos, f"{name}.generation_config.eos_token_id"))

    # a tied head under both names; an adapted projection's base weight under the plain projection's name
    theirs = {key.replace(".base_layer.", "."): p for key, p in inner.named_parameters(remove_duplicate=False)
              if not is_peft_adapter_parameter(key)}
    for key in theirs:  # wrappers whose weights are not the plain modules': a clear refusal, not "missing"
        if ".modules_to_save." in key or ".original_module." in key:
            raise UserError(f"from_transformers: {name} trains a full copy of a module through PEFT's modules_to_save "
                            f"({key!r}); not supported (LoRA adapters on the layers' projections are)")
        if "_flat_param" in key or "_fsdp_wrapped_module" in key:
            raise UserError(f"from_transformers: {name} is wrapped by FSDP ({key!r}): sharded weights are not supported")
    with torch.device("meta"):
        model = CausalLM(config)
    ours = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise UserError(f"from_transformers: {name} has no parameter {missing[0]!r} ({len(missing)} missing): not a "
                        f"{config.model_type} causal LM as its config describes")
    unused = sorted(set(theirs) - set(ours))
    if unused:
        raise UserError(f"from_transformers: {name} has {len(unused)} parameter(s) our decoder has no place for, "
                        f"first {unused[0]!r}")
    kinds = set()
    for key, p in ours.items():
        param = theirs[key]
        if type(param) is not torch.nn.Parameter or hasattr(param, "ds_id"):  # a DTensor shard, a ZeRO-3 stub
            raise UserError(f"from_transformers: {name}'s {key!r} is a {type(param).__name__}"
                            f"{' (DeepSpeed ZeRO-3)' if hasattr(param, 'ds_id') else ''}, not a whole tensor: "
                            f"sharded weights are not supported")
        if tuple(param.shape) != tuple(p.shape):
            raise UserError(f"from_transformers: {name}'s {key!r} has shape {tuple(param.shape)}, expected "
                            f"{tuple(p.shape)} from its config")
        kinds.add((param.device, param.dtype))
    if len(kinds) != 1:
        mixed = len({dtype for _, dtype in kinds}) > 1 and theirs["lm_head.weight"].dtype == torch.float32
        cast = " (TRL's cast_lm_head_to_fp32 makes the head fp32: not supported, leave it off)" if mixed else ""
        raise UserError(f"from_transformers: {name}'s parameters are on several devices or in several dtypes "
                        f"({sorted(str(k) for k in kinds)}); the rollout engine runs one{cast}")
    for key in ours:
        module_name, _, attr = key.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = theirs[key]  # the object itself: no copy
    (device, _), = kinds
    model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)
    share_peft_adapters(model, inner)
    source = Path(str(getattr(hf_model, "name_or_path", "") or ""))
    model.source_dir = source if str(source) and source.is_dir() else None  # tokenizer files for save_pretrained
    model.generation_config_file = generation.to_json_string(use_diff=True).encode() if generation is not None else None
    return model


def save_pretrained(model: CausalLM, directory, tokenizer=None) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) so that transformers loads the model
    (with any LoRA adapters merged into the weights).

    The tokenizer comes from `tokenizer` (anything with save_pretrained) or is copied from the
    directory the model was loaded from.
    """
    # a tokenizer written (given, or copied from the source) replaces an earlier save's whole: a file of the other
    # left behind (its chat_template.jinja beside a tokenizer without one) would be read with it on reload
    source = Path(model.source_dir) if model.source_dir is not None else None
    writes_tokenizer = tokenizer is not None or (source is not None and any(
        (source / name).exists() for name in (*TOKENIZER_FILES, CHAT_TEMPLATES_DIR)))
    tokenizer_files = (*TOKENIZER_FILES, CHAT_TEMPLATES_DIR) if writes_tokenizer else ()
    with replacing_directory(directory, supersedes=WEIGHT_FILES + tokenizer_files) as tmp:
        # LoRA adapters are merged into their weights: the directory is a plain model (model/lora.py)
        state = {k: v.detach().contiguous().cpu() for k, v in merged_state_dict(model, device="cpu").items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # safetensors refuses shared tensors; transformers re-ties on load
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        private_to_umask(tmp / "model.safetensors")
        hf = model.config.to_hf_dict()
        # transformers 5 reads "dtype" (copied from the source's config, maybe another dtype), 4.x "torch_dtype"
        hf["dtype"] = hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        # generation_config.json comes along either way: its stop tokens and sampling defaults are the model's.
        if model.generation_config_file is not None:
            (tmp / "generation_config.json").write_bytes(model.generation_config_file)
        copied = TOKENIZER_FILES if tokenizer is None else ()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if source is not None:
            for name in copied:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
            if tokenizer is None and (source / CHAT_TEMPLATES_DIR).is_dir():
                shutil.copytree(source / CHAT_TEMPLATES_DIR, tmp / CHAT_TEMPLATES_DIR)


def load_tokenizer(path):
    """A transformers tokenizer from a model directory (tokenizer.json and friends) or a Hub model id."""
    directory = model_directory(path)
    if not directory.is_dir():
        raise UserError(f"{directory}: tokenizer directory not found")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{directory}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{directory}: tokenizer could not be loaded ({str(e).splitlines()[0]})") from None
    # Prompt lengths are checked against the model's context (a one-line error naming the row); transformers'
    # warning about tokenizer_config.json's model_max_length would print a second line first. Marked as given.
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer
