"""LoRA adapters: the adapted forward and its gradients against the merged weights, PEFT's format both ways,
the rollout engine reading live adapters, the optimizer holding adapter state only, and bad adapters."""
import json
import re
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import rpo_engine
from rpo_engine.errors import UserError
from rpo_engine.model.lora import (
    TARGETS, adapters_disabled, apply_lora, load_adapter, lora_modules, merged_state_dict,
    save_adapter)
from rpo_engine.optim import MasterWeightAdamW, make_adamw
from tests.helpers import DEVICE, FAMILIES, ON_CUDA, save_hf_checkpoint


def randomize_adapters(model, seed=1, std=0.2):
    """B starts at zero (the base model exactly); a trained adapter's B does not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=generator) * std)  # in place


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(request.param, directory)
    return directory


def test_adapted_forward_and_gradients_equal_the_merged_weights(family_dir):
    # fp64 throughout: the adapted path (W x + B A x * s) against W + s B A as one matrix, values and gradients
    model = apply_lora(rpo_engine.load_model(family_dir, dtype=torch.float64), r=3, alpha=5.0,
                       target_modules="q_proj,v_proj,o_proj,up_proj,down_proj")
    randomize_adapters(model)
    assert [n.split(".")[-1] for n in lora_modules(model)][:5] == ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    targets = torch.randint(0, model.config.vocab_size, (2, 9))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    loss.backward()

    adapters = {name: (m.lora_A.weight.detach().clone().requires_grad_(), m.lora_B.weight.detach().clone().requires_grad_())
                for name, m in lora_modules(model).items()}
    plain = rpo_engine.load_model(family_dir, dtype=torch.float64)
    weights = dict(plain.named_parameters())
    for name, (a, b) in adapters.items():
        weights[f"{name}.weight"] = weights[f"{name}.weight"] + (b @ a) * (5.0 / 3)
    reference = torch.nn.functional.cross_entropy(functional_call(plain, weights, (ids,)).flatten(0, 1), targets.flatten())
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for name, m in lora_modules(model).items():
        a, b = adapters[name]
        torch.testing.assert_close(m.lora_A.weight.grad, a.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(m.lora_B.weight.grad, b.grad, rtol=1e-10, atol=1e-14)
    # only the adapters train: the base weights, embeddings, norms and LM head get no gradient
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if ".lora_" in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    # the merged state dict is the plain model's layout, and it computes the adapted model
    merged = merged_state_dict(model)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), rtol=1e-12, atol=1e-12)


def test_adapters_start_at_the_base_and_switch_off(family_dir):
    base = rpo_engine.load_model(family_dir)
    model = apply_lora(rpo_engine.load_model(family_dir), r=4, alpha=8.0, seed=3)
    assert len(lora_modules(model)) == len(TARGETS) * model.config.num_hidden_layers  # all-linear: never lm_head
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        expected = base(ids)
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)  # B = 0
        randomize_adapters(model)
        assert (model(ids) - expected).abs().max() > 1e-2
        adapted = model(ids)
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
            with adapters_disabled(model):  # blocks nest: the outer one still computes the base after
                pass
            torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=0)  # back on after the block
    # A is drawn from the seed alone, and the global RNG is left as it was
    torch.manual_seed(5)
    untouched = torch.rand(4)
    torch.manual_seed(5)
    again = apply_lora(rpo_engine.load_model(family_dir), r=4, alpha=8.0, seed=3)
    assert torch.equal(torch.rand(4), untouched)
    other = apply_lora(rpo_engine.load_model(family_dir), r=4, alpha=8.0, seed=4)
    a = [m.lora_A.weight for m in lora_modules(model).values()]
    assert all(torch.equal(x, m.lora_A.weight) for x, m in zip(a, lora_modules(again).values()))
    assert not torch.equal(a[0], next(iter(lora_modules(other).values())).lora_A.weight)


def test_adapter_and_merged_model_load_in_peft_and_transformers(family_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = apply_lora(rpo_engine.load_model(family_dir), r=4, alpha=12.0, target_modules="q_proj,k_proj,gate_proj",
                       use_rslora=True)  # scale alpha / sqrt(r): 6, not 3
    assert next(iter(lora_modules(model).values())).scaling == 6.0
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "merged")
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ours = model(ids)
        hf = AutoModelForCausalLM.from_pretrained(family_dir, attn_implementation="eager", dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-5, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager", dtype=torch.float32)
        torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-5, atol=1e-5)

    # the other way: an adapter PEFT trained and saved loads into our model and computes what PEFT's does
    hf = AutoModelForCausalLM.from_pretrained(family_dir, attn_implementation="eager", dtype=torch.float32)
    config = peft.LoraConfig(r=5, lora_alpha=7, target_modules=["v_proj", "o_proj", "down_proj"], lora_dropout=0.0)
    assert not config.use_rslora  # this direction checks the plain scale, alpha / r
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "from_peft")
    ours = load_adapter(rpo_engine.load_model(family_dir), tmp_path / "from_peft")
    assert [n.split(".")[-1] for n in lora_modules(ours)][:3] == ["v_proj", "o_proj", "down_proj"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("merge_lora", [False, True], ids=["live", "merged"])
def test_rollout_reads_the_live_adapters(tmp_path, tiny_model_dir, merge_lora):
    # on CUDA the decode step replays CUDA graphs: they must see the adapters' new values, not the captured ones;
    # merge_lora: the merged rollout copies are brought up to date at each generate call
    from rpo_engine.rollout import RolloutEngine, SamplingParams

    model = apply_lora(rpo_engine.load_model(tiny_model_dir, device=DEVICE), r=4, alpha=16.0)
    engine = RolloutEngine(model, merge_lora=merge_lora)
    prompts = [[5, 9, 13, 7], [11, 4, 6], [8, 8, 3, 12, 10]]
    params = SamplingParams(n=2, max_new_tokens=12, temperature=1.0, seed=7)

    def check_against_merged():
        merged = rpo_engine.load_model(tiny_model_dir, device=DEVICE)
        merged.load_state_dict(merged_state_dict(model))
        greedy = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
        reference = RolloutEngine(merged).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
        assert [c[0].token_ids for c in greedy] == [c[0].token_ids for c in reference]
        for prompt, group in zip(prompts, engine.generate(prompts, params)):
            for c in group:  # sampled log-probs equal the merged model's teacher-forced ones
                with torch.no_grad():
                    logits = merged(torch.tensor([prompt + c.token_ids], device=DEVICE))[0, len(prompt) - 1:-1].float().cpu()
                expected = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
                torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=1e-5, atol=1e-5)
        return greedy

    before = check_against_merged()
    randomize_adapters(model, std=2.0)  # what an optimizer step does: the same tensors, new values
    after = check_against_merged()
    assert [c[0].token_ids for c in before] != [c[0].token_ids for c in after]
    # outside generate the model runs its live adapters (the training forward), never a stale merged copy
    randomize_adapters(model, seed=9, std=1.0)
    merged = rpo_engine.load_model(tiny_model_dir, device=DEVICE)
    merged.load_state_dict(merged_state_dict(model))
    ids = torch.tensor([prompts[0]], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), merged(ids), rtol=1e-5, atol=1e-5)
    assert all((m.rollout_weight is not None) == merge_lora for m in lora_modules(model).values())
    # adapters replaced by new Parameters (their version counters start again) are merged again, however often
    for seed in (11, 12):
        for m in lora_modules(model).values():
            m.lora_B.weight = torch.nn.Parameter(torch.randn_like(m.lora_B.weight) * 1.5)
        check_against_merged()
    # asleep through an update (--enable-sleep-mode): the cache and the merged copies are freed, then made again
    # (the decode graphs captured again where they land elsewhere), from the adapters' new values
    engine.sleep()
    assert engine.is_sleeping and all(m.rollout_weight is None for m in lora_modules(model).values())
    randomize_adapters(model, seed=13, std=1.0)
    check_against_merged()
    assert all((m.rollout_weight is not None) == merge_lora for m in lora_modules(model).values())
    # a fused optimizer step (AdamW(fused=True)), or a write through .data, leaves the version counters as they were
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.data.copy_(torch.randn_like(m.lora_B.weight) * 1.5)
    check_against_merged()
    # generating from the base with the adapters switched off: a merged copy is not the base
    base = RolloutEngine(rpo_engine.load_model(tiny_model_dir, device=DEVICE))
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    with adapters_disabled(model):
        got = engine.generate(prompts, greedy)
    assert [c[0].token_ids for c in got] == [c[0].token_ids for c in base.generate(prompts, greedy)]


def test_merged_rollout_weights_follow_the_base_and_the_adapters(tiny_model_dir):
    """refresh_rollout_weights recomputes a merged copy where W changed in place (a resume's load, a weight sync)
    or was replaced, or A or B changed, and only there."""
    from rpo_engine.model.lora import refresh_rollout_weights

    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=4, target_modules="q_proj,v_proj")
    randomize_adapters(model)
    (first, m), (second, other) = list(lora_modules(model).items())[:2]
    count = len(lora_modules(model))
    assert refresh_rollout_weights(model) == count and refresh_rollout_weights(model) == 0
    with torch.no_grad():
        m.weight.add_(0.5)  # W in place
    assert refresh_rollout_weights(model) == 1
    other.weight = torch.nn.Parameter(other.weight.detach() * 2, requires_grad=False)  # W replaced
    assert refresh_rollout_weights(model) == 1
    with torch.no_grad():
        m.lora_A.weight.data.mul_(3)  # A through .data: no version bump
    assert refresh_rollout_weights(model) == 1
    for module in lora_modules(model).values():
        torch.testing.assert_close(module.rollout_weight, module.merged_weight(), rtol=0, atol=0)


def test_optimizer_holds_adapter_state_only(tiny_model_dir):
    for dtype in (torch.float32, torch.bfloat16):
        model = apply_lora(rpo_engine.load_model(tiny_model_dir, dtype=dtype), r=2, alpha=4.0, target_modules="q_proj")
        optimizer = make_adamw(model, 1e-3, 0.1)
        assert isinstance(optimizer, MasterWeightAdamW) == (dtype == torch.bfloat16)
        held = [p for group in optimizer.param_groups for p in group["params"]]
        assert sum(p.numel() for p in held) == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
        randomize_adapters(model)
        model(torch.tensor([[3, 4, 5, 6]])).float().square().mean().backward()
        optimizer.step()
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
        assert all(p.dtype == dtype for n, p in model.named_parameters())


def test_bad_adapters_are_user_errors(tmp_path, tiny_model_dir, monkeypatch):
    with pytest.raises(UserError, match="target modules .* got 'lm_head'"):
        apply_lora(rpo_engine.load_model(tiny_model_dir), target_modules="q_proj,lm_head")
    for r in (0, 1.7, "4"):
        with pytest.raises(UserError, match="rank must be an integer >= 1"):
            apply_lora(rpo_engine.load_model(tiny_model_dir), r=r)
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path)
    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="q_proj,v_proj")
    save_adapter(model, tmp_path / "a")
    with pytest.raises(UserError, match="adapter has r=2.*this run has r=3"):
        load_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=3, alpha=4.0, target_modules="q_proj,v_proj"),
                     tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(UserError, match="use_dora = True is not supported"):
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    # plain LoRA's tensors that PEFT computes something else with: PiSSA saved unconverted (PEFT takes its initial
    # B A out of the base when loading it), aLoRA (the adapter only from its invocation tokens on)
    for key, value, message in (("init_lora_weights", "pissa_niter_4", "init_lora_weights = 'pissa_niter_4' is not "
                                 "supported: PEFT changes the base weights"), ("init_lora_weights", "olora", "'olora'"),
                                ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens = \\[5, 6\\] is not")):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, **{key: value})))
        with pytest.raises(UserError, match=message):
            load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    for init in (False, "gaussian", "eva"):  # inits that leave the base as it is load as they are
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, init_lora_weights=init)))
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["q_proj", "k_proj"])))
    untouched = rpo_engine.load_model(tiny_model_dir)
    with pytest.raises(UserError, match="missing 4 tensor"):  # k_proj's A and B, in both layers
        load_adapter(untouched, tmp_path / "a")
    assert not lora_modules(untouched) and all(p.requires_grad for p in untouched.parameters())  # left as it was
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["q_proj"])))
    with pytest.raises(UserError, match="no place for"):  # v_proj's tensors
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    # PEFT's other spellings of the targets: full module names (its all-linear on a small model), name suffixes,
    # a regular expression; a name that is no projection is named with the file
    for targets in (["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "self_attn.v_proj"],
                    r"model\.layers\.\d+\.self_attn\.(q|v)_proj"):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=targets)))
        loaded = load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
        assert loaded.lora_settings.target_modules == ("q_proj", "v_proj")
    # PEFT's exclude_modules takes projections out of the targets (all-linear minus k_proj: plain LoRA on the rest)
    for excluded in (["k_proj"], r".*\.k_proj"):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(
            config, target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=excluded)))
        loaded = load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
        assert loaded.lora_settings.target_modules == ("q_proj", "v_proj")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, exclude_modules=["q_proj", "v_proj"])))
    with pytest.raises(UserError, match="exclude_modules .* leaves no projection to adapt"):
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["q_proj", "lm_head"])))
    with pytest.raises(UserError, match="adapter_config.json: target_modules 'lm_head' is not one of"):
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, lora_dropout=0.05)))
    with pytest.warns(UserWarning, match="lora_dropout 0.05 is ignored"):
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    # a save that fails midway leaves the adapter that was there
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    randomize_adapters(model)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind


# ----------------------------------------------------------------------------- mutation-audit additions

def test_adapter_a_is_drawn_as_peft_draws_it(tiny_model_dir):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's and PEFT's kaiming_uniform(a=sqrt(5))), B = 0 (kills a
    bound of 1/in, which starts every adapter sqrt(in) times too small)."""
    import math

    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=8, alpha=16.0, seed=0)
    for m in lora_modules(model).values():
        bound, top = 1 / math.sqrt(m.in_features), m.lora_A.weight.abs().max().item()
        assert 0.8 * bound < top <= bound, (top, bound)
        assert torch.count_nonzero(m.lora_B.weight) == 0


def test_peft_config_defaults_and_empty_lists(tmp_path, tiny_model_dir):
    """An adapter_config.json without lora_alpha gets PEFT's default, 8 (kills another default); PEFT's empty
    modules_to_save / layers_to_transform lists mean none, as null does (kills refusing [])."""
    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="q_proj")
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, modules_to_save=[], layers_to_transform=[])))
    loaded = load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
    assert loaded.lora_settings.alpha == 8.0 and loaded.lora_settings.scaling == 4.0


def test_adapter_without_target_modules_has_pefts_default_targets(tmp_path, tiny_model_dir):
    """target_modules null (or absent) in adapter_config.json: PEFT adapts its default modules for the model
    type, not every linear layer (the adapter's q/v tensors were refused as missing the others)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="q_proj,v_proj")
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    model_type = json.loads((Path(tiny_model_dir) / "config.json").read_text())["model_type"]
    for absent in (dict(config, target_modules=None), {k: v for k, v in config.items() if k != "target_modules"}):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(absent))
        loaded = load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")
        assert loaded.lora_settings.target_modules == tuple(PEFT_DEFAULTS[model_type])
        ids = torch.tensor([[1, 5, 9, 3]])
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_rslora_adapter_loads_as_rslora_into_a_plain_model(tmp_path, tiny_model_dir):
    """An rsLoRA adapter loaded into a model without adapters keeps alpha / sqrt(r) (kills apply_lora called
    without use_rslora in load_adapter): same settings, same logits."""
    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=4, alpha=8.0, target_modules="q_proj,v_proj",
                       use_rslora=True)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "rs")
    loaded = load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "rs")
    assert loaded.lora_settings == model.lora_settings and loaded.lora_settings.scaling == 4.0
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_adapter_alpha_must_match_the_runs(tmp_path, tiny_model_dir):
    """load_adapter into a model with adapters compares alpha too, not only the rank (kills comparing r alone,
    which would load alpha-4 tensors under this run's alpha-8 scaling)."""
    save_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="q_proj"), tmp_path / "a")
    with pytest.raises(UserError, match="adapter has r=2, alpha=4.*this run has r=2, alpha=8"):
        load_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=8.0, target_modules="q_proj"),
                     tmp_path / "a")


def test_targets_are_kept_in_model_order_and_alpha_must_be_finite(tmp_path, tiny_model_dir):
    """--lora-target-modules v_proj,q_proj is the same run as q_proj,v_proj: its own saved adapter loads back
    (kills keeping the user's order, which then differs from the saved config's); an infinite alpha is refused
    (kills dropping the isfinite check)."""
    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="v_proj,q_proj")
    assert model.lora_settings.target_modules == ("q_proj", "v_proj")
    save_adapter(model, tmp_path / "a")
    load_adapter(model, tmp_path / "a")
    with pytest.raises(UserError, match="alpha must be > 0"):
        apply_lora(rpo_engine.load_model(tiny_model_dir), alpha=float("inf"))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="device memory: run with RPO_TEST_DEVICE=cuda")
def test_saving_a_lora_model_merges_one_weight_at_a_time_on_the_gpu(tmp_path):
    """save_pretrained of an adapted model on a GPU moves each merged weight to the host as it is made: the device
    never holds every merged weight at once (13 GB for a 7B model's all-linear adapters)."""
    save_hf_checkpoint("llama", tmp_path / "base", hidden_size=256, intermediate_size=1024, vocab_size=512)
    model = apply_lora(rpo_engine.load_model(tmp_path / "base", device=DEVICE), r=2, alpha=4.0)
    adapted = sum(m.weight.numel() * m.weight.element_size() for m in lora_modules(model).values())
    largest = max(m.weight.numel() * m.weight.element_size() for m in lora_modules(model).values())
    # one merge first: a process's first matmul on the device allocates cuBLAS's workspace (MiBs, from the caching
    # allocator), which would count in the peak below where no test before this one multiplied on the GPU
    next(iter(lora_modules(model).values())).merged_weight()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model.save_pretrained(tmp_path / "merged")
    assert torch.cuda.max_memory_allocated() - before < min(adapted / 2, 4 * largest)


def test_merge_of_a_bf16_model_is_computed_in_fp32(tiny_model_dir):
    """merged_state_dict / merged_weight: W + B A * scaling computed in fp32 and rounded to bf16 once (kills
    computing B A and the sum in bf16, which rounds twice and gives other weights)."""
    model = apply_lora(rpo_engine.load_model(tiny_model_dir, dtype=torch.bfloat16), r=4, alpha=8.0,
                       target_modules="q_proj")
    randomize_adapters(model)
    state = merged_state_dict(model)
    for name, m in lora_modules(model).items():
        want = (m.weight.float() + (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling).to(torch.bfloat16)
        assert state[f"{name}.weight"].dtype == torch.bfloat16
        assert torch.equal(state[f"{name}.weight"], want), name


def test_an_adapter_for_replicated_layers_is_refused(tmp_path, tiny_model_dir):
    """PEFT's layer_replication builds the model from copies of its layers ([[0, 1], [0, 1]]: layer 0 twice); an
    adapter saved so has the plain layers' tensor names and loaded silently into the model as it is, another model
    (0.29 apart in the logits from PEFT's on the tiny one). Refused as the other non-plain settings are."""
    save_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="q_proj"), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, layer_replication=[[0, 1], [0, 1]])))
    untouched = rpo_engine.load_model(tiny_model_dir)
    with pytest.raises(UserError, match=r"layer_replication = \[\[0, 1\], \[0, 1\]\] is not supported"):
        load_adapter(untouched, tmp_path / "a")
    assert not lora_modules(untouched)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, layer_replication=None)))
    load_adapter(rpo_engine.load_model(tiny_model_dir), tmp_path / "a")  # PEFT's default, null, is plain


def test_a_run_or_checkpoint_given_as_the_adapter_names_the_adapter_inside(tmp_path, tiny_model_dir):
    """eval --adapter given a LoRA run's directory or one of its checkpoints (the adapter is in final-adapter/,
    step-N/adapter/) said only "not a LoRA adapter directory"; now the error names the directory that is."""
    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="q_proj")
    run, step = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-2"
    save_adapter(model, run / "final-adapter")
    save_adapter(model, step / "adapter")
    for given, inside in ((run, run / "final-adapter"), (step, step / "adapter")):
        with pytest.raises(UserError, match=re.escape(f"not a LoRA adapter directory; pass {inside})") + "$"):
            load_adapter(rpo_engine.load_model(tiny_model_dir), given)
