"""LoRA: train low-rank updates of the projection matrices while the base weights stay frozen.

Why: fully fine-tuning a 7-8B model keeps ~18 bytes a parameter on the GPU (bf16 weights, fp32 master
weights and their fp32 gradients, two AdamW moments), 125+ GB, more than one H100 holds. With LoRA
the base stays bf16 and frozen (2 bytes a parameter) and only the adapters carry gradients and
optimizer state; the KL reference is the base itself, the adapters switched off (TRL with PEFT does
the same), so no second model is loaded.

Each target `nn.Linear` becomes a `LoRALinear` that computes y = x W^T + b + B(A x) * alpha / r, with
A [r, in] drawn as nn.Linear's default (kaiming-uniform, PEFT's too) and B [out, r] = 0, so training
starts from the base model exactly. W and b stay the same Parameters, so the rollout engine, the
shared-prefix update and the padded reference, which all call the modules, read the adapters live:
nothing is merged for rollout and nothing is synced.

Adapters are saved in PEFT's layout (adapter_model.safetensors with `base_model.model.<module>.lora_A.weight`
keys, adapter_config.json), so `peft.PeftModel.from_pretrained` loads them; `save_pretrained` writes
the merged weights W + B A alpha / r, a plain Hugging Face model. rsLoRA (alpha / sqrt(r), PEFT's
use_rslora) is supported. Not supported (a clear error when an adapter asks for them): DoRA, bias training,
adapters on the embeddings or the LM head, on some layers only, variants such as aLoRA, PEFT's
layer_replication, and PiSSA, OLoRA, CorDA or LoftQ adapters saved unconverted (PEFT rewrites the base weights
when it loads those). An adapter's lora_dropout is ignored with a warning: dropout on the adapter input would make
the training forward differ from the rollout's, which the policy ratio reads as a change of policy. (Under TRL, on a live PEFT model,
share_peft_adapters applies it in train mode, because TRL's own passes do.)
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rpo_engine.errors import UserError
from rpo_engine.model.atomic import private_to_umask, replacing_directory

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel -> LoraModel -> the transformers model
# full module names in layer 0, which stands for every layer in PEFT's target_modules/exclude_modules matching
_LAYER0_NAMES = {f"model.layers.0.{_PARENT[t]}.{t}": t for t in TARGETS}


@dataclass(frozen=True)
class LoRASettings:
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False  # rank-stabilized LoRA: alpha / sqrt(r), so high ranks still learn

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def describe(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, targets {','.join(self.target_modules)}"
                + (", rsLoRA" if self.use_rslora else ""))


def parse_targets(spec, what: str = "LoRA target modules") -> tuple[str, ...]:
    """"all-linear" (every projection, PEFT's name; never the LM head), or a comma-separated / list of
    projection names; in TARGETS order. `what` names the option in the error."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
    if names == ["all-linear"]:
        return TARGETS
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise UserError(f"{what} must be all-linear or a comma-separated subset of {','.join(TARGETS)}; "
                        f"got {unknown[0] if unknown else spec!r}")
    return tuple(n for n in TARGETS if n in names)


class LoRALinear(nn.Linear):
    """`base` (its own weight and bias Parameters, frozen) plus B(A x) * scaling."""

    def __init__(self, base: nn.Linear, r: int, scaling: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        # skip_init: uninitialised (apply_lora fills them), and no draw from the global RNG
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.utils.skip_init(nn.Linear, self.in_features, r, **kw)  # [r, in]
        self.lora_B = nn.utils.skip_init(nn.Linear, r, self.out_features, **kw)  # [out, r]
        self.scaling = scaling
        self.dropout = 0.0  # on the adapter's input in train mode (PEFT's lora_dropout, share_peft_adapters)
        self.adapter_enabled = True
        # A merged copy for rollouts (RolloutEngine(merge_lora=True)); not a parameter, not saved.
        self.rollout_weight: torch.Tensor | None = None
        self.rollout_weight_versions: tuple | None = None  # (storage, version) of W when it was merged
        self.rollout_adapters: tuple | None = None  # copies of A and B as they were merged
        self.use_rollout_weight = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:  # the base, whether or not a merged copy is in use
            return F.linear(x, self.weight, self.bias)
        if self.use_rollout_weight:
            return F.linear(x, self.rollout_weight, self.bias)
        adapter_dtype = self.lora_A.weight.dtype
        if adapter_dtype == x.dtype:
            return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self._dropped(x))) * self.scaling
        # PEFT's fp32 adapters on a bf16 base (share_peft_adapters): as PEFT computes it, the adapter in its
        # dtype, the sum in the wider one, rounded back
        delta = self.lora_B(self.lora_A(self._dropped(x.to(adapter_dtype)))) * self.scaling
        return (F.linear(x, self.weight, self.bias) + delta).to(x.dtype)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

    def merged_weight(self) -> torch.Tensor:
        """W + B A * scaling [out, in], computed in fp32 (fp64 for an fp64 model) and rounded to W's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling
        return (self.weight.to(dtype) + delta).to(self.weight.dtype)


_PEFT_ADAPTER_PARAMETER = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.[^.]+\.(weight|bias)$")


def is_peft_adapter_parameter(name: str) -> bool:
    """Whether a transformers model's parameter `name` belongs to a PEFT LoRA adapter (`...q_proj.lora_A.default.weight`;
    DoRA's magnitude and a lora_bias too, so that share_peft_adapters names them in its error)."""
    return _PEFT_ADAPTER_PARAMETER.search(name) is not None


def share_peft_adapters(model: nn.Module, peft_model: nn.Module) -> None:
    """Give our `model` (whose base weights are already `peft_model`'s, from_transformers) each PEFT LoRA adapter
    of the transformers model `peft_model`: a LoRALinear on the adapter's own A and B Parameters and its scaling,
    so an optimizer step on them is a step of ours. One active adapter a projection, on the layers' seven
    projections only; DoRA, adapter biases and other PEFT tuners are a UserError (they would run as plain
    LoRA or not at all), as are PEFT's LoRA variants (aLoRA, ...). The adapters are taken as they stand at the
    build: one merged (PEFT's merge_adapter) is in the base weight already and stays out, as do adapters switched
    off (inside disable_adapter()); merged and switched off at once is a UserError (PEFT unmerges at its next
    forward). A later merge, unmerge, switch, set_adapter or set_scale changes peft_adapter_state, and the model
    must be built again (TRLRollout and SharedPrefixGRPOTrainer do). PEFT's lora_dropout is applied as PEFT
    applies it, on the adapter's input in train mode (LoRALinear.dropout): build in eval mode for a rollout."""
    for name, module in peft_model.named_modules():
        if hasattr(module, "base_layer") and not (hasattr(module, "lora_A") and hasattr(module, "lora_B")):
            raise UserError(f"from_transformers: {name} is a {type(module).__name__}, a PEFT layer other than LoRA")
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        merged, disabled = getattr(module, "merged", False), getattr(module, "disable_adapters", False)
        if merged and disabled:  # PEFT computes the base, unmerging first: the weight still holds the adapter
            raise UserError(f"from_transformers: {name}'s adapter is merged into its weight and switched off "
                            f"(disable_adapter()); call unmerge_adapter() first")
        if merged or disabled:  # in the base weight already; or the base alone, as PEFT computes it in there
            continue
        active = list(module.active_adapters)
        if len(active) != 1:
            raise UserError(f"from_transformers: {name} has {len(active)} active adapters {active}; one is supported")
        adapter = active[0]
        if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            raise UserError(f"from_transformers: {name}'s adapter uses {'DoRA' if module.use_dora.get(adapter) else 'a bias'}, "
                            f"which rpo_engine's LoRA does not compute")
        variant = getattr(module, "lora_variant", {}).get(adapter)
        if variant is not None:  # aLoRA and the like: computed otherwise than W x + B A x s
            raise UserError(f"from_transformers: {name}'s adapter is a PEFT LoRA variant ({type(variant).__name__}), "
                            f"which rpo_engine's LoRA does not compute")
        target = name.rpartition(".")[2]
        if target not in TARGETS or not re.fullmatch(rf"model\.layers\.\d+\.{_PARENT[target]}\.{target}", name):
            raise UserError(f"from_transformers: a LoRA adapter on {name}; only the layers' projections "
                            f"({','.join(TARGETS)}) can have one")
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapted = LoRALinear(getattr(parent, attr), A.shape[0], float(module.scaling[adapter]))
        adapted.lora_A._parameters["weight"], adapted.lora_B._parameters["weight"] = A, B  # the objects: no copy
        dropout = module.lora_dropout[adapter] if hasattr(module, "lora_dropout") else None
        adapted.dropout = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
        setattr(parent, attr, adapted)


def peft_adapter_state(peft_model: nn.Module) -> tuple:
    """What share_peft_adapters reads of each PEFT LoRA layer beyond its Parameters: which adapters are
    merged into the base, whether the adapters are switched off, which are active, their scalings. Equal
    states, equal Parameters: a model built by from_transformers still computes what `peft_model` does."""
    return tuple((name, tuple(getattr(m, "merged_adapters", ())), bool(getattr(m, "disable_adapters", False)),
                  tuple(getattr(m, "active_adapters", ())), tuple(sorted(getattr(m, "scaling", {}).items())))
                 for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """module name -> LoRALinear, in model order ({} for a model without adapters)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_settings(model: nn.Module) -> LoRASettings | None:
    return getattr(model, "lora_settings", None)


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, target_modules="all-linear",
               seed: int = 0, use_rslora: bool = False) -> nn.Module:
    """Freeze every weight of `model` (our CausalLM) and give each target projection of each layer a LoRA
    adapter, in place; returns the model. A is drawn from a generator seeded by `seed`, so a run's
    starting adapters depend on its seed only. use_rslora: scale by alpha / sqrt(r) instead of alpha / r."""
    if lora_settings(model) is not None:
        raise ValueError("the model already has LoRA adapters")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"LoRA rank must be an integer >= 1, got {r!r}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise UserError(f"LoRA alpha must be > 0, got {alpha}")
    settings = LoRASettings(int(r), float(alpha), parse_targets(target_modules), bool(use_rslora))
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for name in settings.target_modules:
            parent = getattr(layer, _PARENT[name])
            adapted = LoRALinear(getattr(parent, name), settings.r, settings.scaling)
            with torch.no_grad():
                bound = 1 / math.sqrt(adapted.in_features)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
                a = torch.rand(adapted.lora_A.weight.shape, generator=generator, dtype=torch.float64) * 2 - 1
                adapted.lora_A.weight.copy_(a * bound)
                adapted.lora_B.weight.zero_()
            setattr(parent, name, adapted)
    model.lora_settings = settings
    return model


@contextlib.contextmanager
def _switched(model: nn.Module, flag: str, value: bool):
    """Every adapter's `flag` set to `value` inside the block, back to what it was after (blocks nest)."""
    before = {m: getattr(m, flag) for m in lora_modules(model).values()}
    for m in before:
        setattr(m, flag, value)
    try:
        yield model
    finally:
        for m, previous in before.items():
            setattr(m, flag, previous)


def adapters_disabled(model: nn.Module):
    """The base model, for the KL reference: every adapter switched off inside the block. (A RolloutEngine's
    CUDA graphs replay the forward they captured: a generate call inside the block captures them again, and
    the next one outside it too.)"""
    return _switched(model, "adapter_enabled", False)


@torch.no_grad()
def refresh_rollout_weights(model: nn.Module) -> int:
    """Give each adapter a merged copy of its weight for rollouts (allocated on the first call) and bring
    it up to date: recomputed only where W, A or B changed since, and written in place, so captured CUDA graphs
    read the new values. A and B are compared by value with copies kept at the last merge (a fused optimizer
    step, or a write through `.data`, changes them without bumping their version counters); W, frozen, by its
    version counter and storage (a replaced Parameter starts its count again).
    Returns how many were recomputed."""
    done = 0
    for m in lora_modules(model).values():
        base = (m.weight.data_ptr(), m.weight._version)
        adapters = (m.lora_A.weight, m.lora_B.weight)
        if m.rollout_weight is None:
            m.rollout_weight = torch.empty_like(m.weight)
        elif base == m.rollout_weight_versions and all(map(torch.equal, adapters, m.rollout_adapters)):
            continue
        m.rollout_weight.copy_(m.merged_weight())
        m.rollout_weight_versions = base
        m.rollout_adapters = tuple(a.detach().clone() for a in adapters)
        done += 1
    return done


def free_rollout_weights(model: nn.Module) -> None:
    """Drop the merged rollout copies (RolloutEngine.sleep): the next refresh_rollout_weights makes them again."""
    for m in lora_modules(model).values():
        m.rollout_weight = m.rollout_weight_versions = m.rollout_adapters = None


def rollout_weights_in_use(model: nn.Module):
    """Inside the block every adapted projection computes with its merged rollout copy (one matmul instead
    of three); outside, the training forward runs the live adapters."""
    if any(m.rollout_weight is None for m in lora_modules(model).values()):
        raise RuntimeError("refresh_rollout_weights(model) first")
    return _switched(model, "use_rollout_weight", True)


@torch.no_grad()
def merged_state_dict(model: nn.Module, device=None) -> dict[str, torch.Tensor]:
    """The model's state dict with each adapter merged into its weight (in fp32 or wider, then rounded to
    the weight's dtype, as PEFT's merge_and_unload) and the adapter tensors left out: a plain model's
    tensors. A model without adapters gives its state dict unchanged. `device`: each merged weight moved
    there as it is made (a save's "cpu": not every merged weight on the GPU at once, 13 GB at 7B)."""
    state = model.state_dict()
    for name, m in lora_modules(model).items():
        del state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        state[f"{name}.weight"] = m.merged_weight().to(device)
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved names."""
    return {f"{_PEFT_PREFIX}{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach().contiguous().cpu()
            for name, m in lora_modules(model).items() for ab in "AB"}


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json (PEFT's layout), written under a temporary name and
    renamed into place, so an interrupted save never replaces a good adapter with a broken one."""
    from safetensors.torch import save_file

    settings = lora_settings(model)
    if settings is None:
        raise ValueError("the model has no LoRA adapters")
    with replacing_directory(directory, supersedes=(ADAPTER_WEIGHTS, ADAPTER_CONFIG, "adapter_model.bin")) as tmp:
        save_file(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        private_to_umask(tmp / ADAPTER_WEIGHTS)
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.alpha,
            "target_modules": list(settings.target_modules), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": settings.use_rslora, "use_dora": False, "modules_to_save": None,
            "layers_to_transform": None, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path or (str(model.source_dir) if model.source_dir else None),
        }
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def adapter_in(directory: Path) -> str | None:
    """Whether a model directory given as --model holds a PEFT adapter (adapter_config.json): "alone" (no model's
    config.json: an adapter, not a model), "beside" (a model's too, which transformers' from_pretrained loads with
    the adapter applied, where our loader would leave it out), or None."""
    if not (directory / ADAPTER_CONFIG).is_file():
        return None
    return "beside" if (directory / "config.json").is_file() else "alone"


def read_adapter_settings(directory) -> LoRASettings:
    """The LoRA settings of a PEFT adapter directory; anything we cannot apply exactly is a UserError."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        # a LoRA run's directory, or one of its checkpoints: the adapter is inside
        inside = [Path(directory) / name for name in ("final-adapter", "adapter")
                  if (Path(directory) / name / ADAPTER_CONFIG).is_file()]
        raise UserError(f"{directory}: no {ADAPTER_CONFIG} (not a LoRA adapter directory"
                        + (f"; pass {inside[0]})" if inside else ")"))
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {config.get('peft_type')!r}, only LORA adapters are supported")
    for key, plain in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False),
                       ("modules_to_save", None), ("layers_to_transform", None)):
        value = config.get(key, plain)
        if value != plain and not (plain is None and value == []):
            raise UserError(f"{path}: {key} = {config[key]!r} is not supported (only plain LoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise UserError(f"{path}: {key} is not supported (one rank and alpha for every module)")
    # variants whose tensors have plain LoRA's names and shapes but compute something else (aLoRA: the adapter
    # only from its invocation tokens on; layer_replication: a model of copied layers): loaded as plain LoRA they
    # would be another model, silently
    for key in ("alora_invocation_tokens", "use_bdlora", "arrow_config", "use_qalora", "lora_bias", "layer_replication"):
        if config.get(key):
            raise UserError(f"{path}: {key} = {config[key]!r} is not supported (only plain LoRA)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora", "loftq")):
        # PEFT rebuilds these adapters' residual base (W minus the initial B A) when it loads them; on the
        # original base their B A would be added to the weights it was taken out of
        raise UserError(f"{path}: init_lora_weights = {init!r} is not supported: PEFT changes the base weights when "
                        f"it loads such an adapter; save it as plain LoRA with PEFT's save_pretrained("
                        f"path_initial_model_for_weight_conversion=...)")
    if config.get("lora_dropout"):  # a training-time regularizer; we train without it (see the docstring)
        warnings.warn(f"{path}: lora_dropout {config['lora_dropout']} is ignored: rpo_engine trains without adapter "
                      f"dropout", stacklevel=2)
    try:
        # null: PEFT's default for the model type, q_proj and v_proj for every family we load
        targets = _adapter_targets(config["target_modules"] if config.get("target_modules") is not None
                                   else ["q_proj", "v_proj"])
        excluded = _excluded_targets(config.get("exclude_modules"))
        if not set(targets) - excluded:
            raise UserError(f"exclude_modules {config['exclude_modules']!r} leaves no projection to adapt")
        return LoRASettings(int(config["r"]), float(config.get("lora_alpha", 8)),
                            tuple(t for t in targets if t not in excluded), bool(config.get("use_rslora", False)))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: bad LoRA settings ({e!r})") from None


def _adapter_targets(spec) -> tuple[str, ...]:
    """PEFT's target_modules: "all-linear", a list of module names or name suffixes (a module is a target when
    its name ends with one: "q_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj"), or a regular
    expression over full module names. -> the projections targeted in some layer; load_adapter's tensor check
    refuses an adapter that skips a layer."""
    if spec == "all-linear":
        return TARGETS
    if isinstance(spec, str):
        hit = {t for full, t in _LAYER0_NAMES.items() if re.fullmatch(spec, full)} or \
            {t for i in range(1024) for t in TARGETS if re.fullmatch(spec, f"model.layers.{i}.{_PARENT[t]}.{t}")}
    elif isinstance(spec, list) and all(isinstance(n, str) for n in spec):
        hit = {t for n in spec for t in TARGETS if n == t or n.endswith(f".{t}") or n.endswith(f".{_PARENT[t]}.{t}")}
        unknown = [n for n in spec if not any(n == t or n.endswith(f".{t}") for t in TARGETS)]
        if unknown:
            raise UserError(f"target_modules {unknown[0]!r} is not one of the projections {','.join(TARGETS)}")
    else:
        raise UserError(f"target_modules must be a list of module names or a regular expression, got {spec!r}")
    if not hit:
        raise UserError(f"target_modules {spec!r} matches none of the projections {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in hit)


def _excluded_targets(spec) -> set[str]:
    """PEFT's exclude_modules (names or name suffixes, or a regular expression over full module names; what it
    names is no target even where target_modules matches it, as with all-linear minus o_proj) -> the
    projections it excludes, layer 0 standing for every layer: an exclusion of some layers only leaves tensors
    that load_adapter's check finds missing or unexpected."""
    if not spec:
        return set()
    if isinstance(spec, str):
        return {t for full, t in _LAYER0_NAMES.items() if re.fullmatch(spec, full)}
    if isinstance(spec, list) and all(isinstance(n, str) for n in spec):
        return {t for full, t in _LAYER0_NAMES.items() for n in spec if full == n or full.endswith(f".{n}")}
    raise UserError(f"exclude_modules must be a list of module names or a regular expression, got {spec!r}")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a PEFT LoRA adapter into `model`: adapters are applied first when the model has none; a model
    that has them must have the same rank, alpha and targets. Every tensor is checked by name and shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    settings = read_adapter_settings(directory)
    if lora_settings(model) is not None and lora_settings(model) != settings:
        raise UserError(f"{directory}: adapter has {settings.describe()}; this run has {lora_settings(model).describe()}")
    path = directory / ADAPTER_WEIGHTS
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    # every tensor checked before the model is touched: a broken adapter leaves it as it was
    expected = {}  # PEFT name -> shape
    for i, layer in enumerate(model.model.layers):
        for t in settings.target_modules:
            linear, name = getattr(getattr(layer, _PARENT[t]), t), f"model.layers.{i}.{_PARENT[t]}.{t}"
            expected[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (settings.r, linear.in_features)
            expected[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (linear.out_features, settings.r)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing:
        raise UserError(f"{path}: adapter is missing {len(missing)} tensor(s), first {missing[0]!r}")
    if unexpected:
        raise UserError(f"{path}: adapter has {len(unexpected)} tensor(s) this model has no place for, "
                        f"first {unexpected[0]!r}")
    for name, shape in expected.items():
        if tuple(saved[name].shape) != shape:
            raise UserError(f"{path}: tensor {name!r} has shape {tuple(saved[name].shape)}, expected {shape}")
    if lora_settings(model) is None:
        apply_lora(model, settings.r, settings.alpha, settings.target_modules, use_rslora=settings.use_rslora)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for ab in "AB":
                getattr(m, f"lora_{ab}").weight.copy_(saved[f"{_PEFT_PREFIX}{name}.lora_{ab}.weight"])
    return model
