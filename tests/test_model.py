"""Our decoder against transformers on tiny random checkpoints of each family."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import rpo_engine
from rpo_engine.errors import UserError
from tests.helpers import DEVICE, FAMILIES, ON_CUDA, SCALED_ROPES, make_hf_model, save_hf_checkpoint

VARIANTS = [
    ("llama", {}),
    ("llama", dict(num_key_value_heads=1, attention_bias=False, mlp_bias=False, rope_scaling=None,
                   tie_word_embeddings=True)),
    ("qwen2", {}),
    ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False, hidden_size=32, num_attention_heads=2)),
    ("qwen3", {}),
    ("qwen3", dict(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True, head_dim=8)),
]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def random_ids(vocab, B=3, T=19, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_logits_match_transformers_fp32(tmp_path, family, overrides):
    hf = save_hf_checkpoint(family, tmp_path, **overrides)
    ours = rpo_engine.load_model(tmp_path)
    assert ours.dtype == torch.float32
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})),
    ("qwen2", dict(rope_theta=1e6)), ("qwen3", dict(rope_theta=1e6))])
def test_long_positions_match_transformers(tmp_path, family, overrides):
    """Positions in the thousands, past a Llama 3.1-style original context (where its RoPE scaling bites), and
    past max_position_embeddings (transformers computes them as well): fp32 tight; bf16 within transformers' own
    bf16 error (the same ops in the same order give the same bits, but that is no contract)."""
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(family, **overrides)
    hf.config.max_position_embeddings = 4096
    hf.save_pretrained(str(tmp_path))
    hf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16, attn_implementation="sdpa")
    ours, ours16 = rpo_engine.load_model(tmp_path), rpo_engine.load_model(tmp_path, dtype="bf16")
    ids = random_ids(hf.config.vocab_size, B=2, T=16)
    for start in (1500, 3000, 5000):
        positions = torch.arange(start, start + 16).expand(2, 16)
        with torch.no_grad():
            ref = hf(ids, position_ids=positions).logits
            assert rel_err(ours(ids, position_ids=positions), ref) < 1e-5
            hf_err = rel_err(hf16(ids, position_ids=positions).logits, ref)
            assert rel_err(ours16(ids, position_ids=positions), ref) <= 2 * hf_err + 1e-3


@pytest.mark.parametrize("rope", sorted(SCALED_ROPES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scaled_rope_matches_transformers_past_the_original_context(tmp_path, family, rope):
    """YaRN and linear RoPE scaling, read from the rope_parameters transformers 5 writes: fp32 logits equal
    transformers' at positions past original_max_position_embeddings, where the scaling bites."""
    hf = save_hf_checkpoint(family, tmp_path, rope_scaling=dict(SCALED_ROPES[rope]))
    ours = rpo_engine.load_model(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == SCALED_ROPES[rope]["rope_type"]
    ids = random_ids(hf.config.vocab_size, B=2, T=48)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5


def test_yarn_as_qwen_model_cards_give_it(tmp_path):
    """Qwen2.5 / Qwen3 cards: add a top-level "rope_scaling" (older cards: "type") to config.json, the original
    context the checkpoint's max_position_embeddings. Read as transformers reads it; a yarn rule without
    original_max_position_embeddings takes max_position_embeddings, as transformers 5 does."""
    from transformers import AutoModelForCausalLM

    save_hf_checkpoint("qwen2", tmp_path)
    ids = random_ids(127, B=2, T=40)
    for scaling in ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
                    {"type": "yarn", "factor": 8.0}):  # static YaRN: these positions are scaled too
        _edit_config(tmp_path, rope_parameters=None, rope_theta=1e6, rope_scaling=scaling, max_position_embeddings=4096)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
        ours = rpo_engine.load_model(tmp_path)
        with torch.no_grad():
            assert rel_err(ours(ids), hf(ids).logits) < 1e-5


@pytest.mark.parametrize("rope", ["yarn-mscale", "linear"])
def test_scaled_rope_survives_a_save(tmp_path, rope):
    """Our save writes the rope scaling back as it was given; transformers and we read the same model from it."""
    from transformers import AutoModelForCausalLM

    given = dict(SCALED_ROPES[rope])
    save_hf_checkpoint("qwen3", tmp_path / "src")
    _edit_config(tmp_path / "src", rope_parameters=None, rope_theta=1e6, rope_scaling=given)
    ours = rpo_engine.load_model(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rope_scaling"] == given and saved["rope_theta"] == 1e6
    again = rpo_engine.load_model(tmp_path / "out")
    assert again.config.rope_scaling == given and again.config == ours.config
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    ids = random_ids(113, B=2, T=40)
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
        assert rel_err(ours(ids), reloaded(ids).logits) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope_equal_their_written_out_forms_bit_for_bit(dtype):
    """RMSNorm is F.rms_norm and RoPE a roll with a pre-signed sine: the same bits as transformers' formulas."""
    from rpo_engine.model.config import ModelConfig
    from rpo_engine.model.decoder import RMSNorm, RotaryEmbedding, apply_rope, rms_norm_reference, rotate_half

    g = torch.Generator().manual_seed(0)
    for dim, shape in [(64, (1, 1, 4)), (128, (3, 7, 2)), (896, (2, 5)), (4096, (1, 3))]:
        norm = RMSNorm(dim, 1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=g))
        x = (torch.randn(*shape, dim, generator=g) * 3).to(dtype)
        assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-6))
    config = ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                         rope_theta=1e6)
    positions = torch.randint(0, 4096, (2, 9), generator=g)
    cos, signed_sin = RotaryEmbedding(config)(positions, dtype)
    freqs = positions.float().unsqueeze(-1) * RotaryEmbedding(config).inv_freq  # transformers' way
    emb = torch.cat((freqs, freqs), -1)
    x = torch.randn(2, 9, 3, 32, generator=g).to(dtype)
    want = x * emb.cos().to(dtype)[:, :, None] + rotate_half(x) * emb.sin().to(dtype)[:, :, None]
    assert torch.equal(apply_rope(x, cos, signed_sin), want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padded_batch_matches_transformers(tmp_path, family):
    hf = save_hf_checkpoint(family, tmp_path)
    ours = rpo_engine.load_model(tmp_path)
    ids = random_ids(hf.config.vocab_size, B=3, T=12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)  # positions derived from the mask
    keep = mask.bool()
    assert rel_err(got[keep], expected[keep]) < 1e-5
    assert torch.isfinite(got).all()


def test_sdpa_repeats_grouped_kv_heads_in_the_query_heads_order():
    """Where no fused CUDA kernel takes grouped K/V heads with a mask, sdpa repeats them to the query heads first
    (else SDPA's math kernel holds [B, H, Tq, Tk] fp32 scores): query head h still reads K/V head h // (H / KVH),
    the same attention and gradients as SDPA's own grouping and as that rule written out."""
    from rpo_engine.model.decoder import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, T, 8, generator=g, dtype=torch.float64) for heads, T in ((6, 5), (2, 7), (2, 7)))
    mask = torch.rand(2, 1, 5, 7, generator=g) < 0.6
    mask[..., 0] = True  # every query sees a key
    written_out = torch.stack([torch.softmax((q[:, h] @ k[:, h // 3].transpose(-1, -2) / 8 ** 0.5).masked_fill(
        ~mask[:, 0], float("-inf")), -1) @ v[:, h // 3] for h in range(6)], 1)
    results = []
    for repeat_kv in (False, True):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sdpa(*inputs, attn_mask=mask, repeat_kv=repeat_kv)
        out.sum().backward()
        assert torch.allclose(out, written_out)
        results.append([out, *(t.grad for t in inputs)])
    for a, b in zip(*results):
        assert torch.allclose(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="which SDPA kernel runs: run with RPO_TEST_DEVICE=cuda")
def test_masked_attention_of_grouped_heads_runs_without_sdpas_math_kernel():
    """A padded batch, a shared-prefix batch (both bf16, GQA 4:2) and a prefill after a prefix-cache hit, each under a
    mask, forward and backward with SDPA's math kernel switched off: torch's fused kernels run them (with enable_gqa
    and a mask, torch 2.11 had none that did, and the math kernel materialised every score)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rpo_engine.model.shared_prefix import PrefixGroup, padded_logprobs, shared_prefix_logprobs
    from rpo_engine.rollout import RolloutEngine, SamplingParams

    # head_dim 16: the llama family's 12 (48 / 4) is no multiple of 8, which the memory-efficient kernel needs in
    # bf16 on sm_80+ (flash pads it, but takes no mask): with the math kernel off, no kernel would take the masks
    model = rpo_engine.model.CausalLM(rpo_engine.model.ModelConfig.from_hf_dict(
        dict(FAMILIES["llama"], num_hidden_layers=2, max_position_embeddings=256, head_dim=16))).init_weights()
    model = model.to(device=DEVICE, dtype=torch.bfloat16)
    groups = [PrefixGroup(list(range(3, 40)), [list(range(5, 17)), list(range(9, 14)), [7]], 37)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for fn in (padded_logprobs, shared_prefix_logprobs):
            model.zero_grad(set_to_none=True)
            logp, mask = fn(model, groups)
            (logp * mask).sum().backward()
            assert torch.isfinite(logp).all() and model.lm_head.weight.grad is not None
        engine = RolloutEngine(model, num_blocks=32, attention_backend="torch")  # PagedPrefill
        prompt = list(range(3, 40))
        engine.generate([prompt, prompt[:33] + [60, 61, 62]], SamplingParams(max_new_tokens=2, temperature=0))
        assert engine.last_stats.prefill_tokens < 2 * len(prompt)  # the second prompt's first blocks were cached


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_within_transformers_own_bf16_error(tmp_path, family):
    hf32 = save_hf_checkpoint(family, tmp_path)
    from transformers import AutoModelForCausalLM

    hf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16, attn_implementation="eager")
    ours16 = rpo_engine.load_model(tmp_path, dtype="bf16")
    assert ours16.dtype == torch.bfloat16
    # "auto", transformers' name, keeps the stored dtype as None does
    assert rpo_engine.load_model(tmp_path, dtype="auto").dtype == rpo_engine.load_model(tmp_path).dtype == hf32.dtype
    ids = random_ids(hf32.config.vocab_size)
    with torch.no_grad():
        ref = hf32(ids).logits
        hf_err = rel_err(hf16(ids).logits, ref)
        our_err = rel_err(ours16(ids), ref)
    # bf16 rounding differs in op order; hold ours to the error transformers itself makes in bf16.
    assert our_err <= 2 * hf_err + 1e-3, (our_err, hf_err)


@pytest.mark.parametrize("family,overrides", [VARIANTS[0], VARIANTS[2], VARIANTS[5]])
def test_save_then_transformers_loads_same_logits(tmp_path, family, overrides):
    save_hf_checkpoint(family, tmp_path / "src", **overrides)
    ours = rpo_engine.load_model(tmp_path / "src")
    with torch.no_grad():  # change the weights so the test sees what we saved, not the source files
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "out")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings == ours.config.tie_word_embeddings
    ids = random_ids(ours.config.vocab_size)
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, ours(ids)) < 1e-5
        again = rpo_engine.load_model(tmp_path / "out")
        assert torch.equal(again(ids), ours(ids))


def test_save_copies_tokenizer_and_replaces_atomically(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    save_hf_checkpoint("qwen2", src)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(src))
    model = rpo_engine.load_model(src)
    out = tmp_path / "out"
    make_hf_model("qwen2").save_pretrained(str(out), max_shard_size="20KB")  # an earlier, sharded save
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    model.save_pretrained(out)
    assert (out / "tokenizer.json").is_file()
    # what else the directory held stays; the earlier save's shards and index go (the loader would read them)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "step-1").is_dir()
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert torch.equal(rpo_engine.load_model(out).lm_head.weight, model.lm_head.weight)
    assert rpo_engine.load_tokenizer(out).encode("a b", add_special_tokens=False) == [1, 2]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    # generation_config.json (stop tokens, sampling defaults) is copied also when a tokenizer is given, as the
    # trainer saves its checkpoints and final/.
    (src / "generation_config.json").write_text('{"eos_token_id": [1, 2], "temperature": 0.6}')
    model = rpo_engine.load_model(src)
    model.save_pretrained(tmp_path / "trained", tokenizer=rpo_engine.load_tokenizer(src))
    assert json.loads((tmp_path / "trained" / "generation_config.json").read_text())["temperature"] == 0.6
    assert rpo_engine.load_model(tmp_path / "trained").config.generation_eos_token_ids == (1, 2)


def test_save_writes_the_tokenizer_whole_with_its_named_chat_templates(tmp_path):
    """A tokenizer with named chat templates keeps the others in additional_chat_templates/ (transformers 5): a
    save copying the source's tokenizer brought the default alone. A save over an earlier model's directory
    leaves none of that tokenizer's files behind: its chat_template.jinja gave the new tokenizer, which has no
    template, the old one on reload."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    def tokenizer(chat_template):
        tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
        out.chat_template = chat_template
        return out

    templates = {"default": "{{ messages[0]['content'] }}", "tool_use": "{{ tools }}{{ messages[0]['content'] }}"}
    src = tmp_path / "src"
    save_hf_checkpoint("qwen2", src)
    tokenizer(templates).save_pretrained(str(src))
    assert (src / "additional_chat_templates").is_dir()
    rpo_engine.load_model(src).save_pretrained(tmp_path / "copied")
    assert rpo_engine.load_tokenizer(tmp_path / "copied").chat_template == templates
    base = tmp_path / "base"
    save_hf_checkpoint("qwen2", base)
    tokenizer(None).save_pretrained(str(base))
    rpo_engine.load_model(base).save_pretrained(tmp_path / "copied", tokenizer=rpo_engine.load_tokenizer(base))
    assert rpo_engine.load_tokenizer(tmp_path / "copied").chat_template is None
    rpo_engine.load_model(src).save_pretrained(tmp_path / "copied")  # and back: the copy replaces it whole too
    assert rpo_engine.load_tokenizer(tmp_path / "copied").chat_template == templates


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = rpo_engine.load_model(tmp_path)
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5
    last = sorted(tmp_path.glob("model-*-of-*.safetensors"))[-1]
    last.unlink()  # a download cut short: the index names the shard that is missing
    with pytest.raises(UserError, match=f"model.safetensors.index.json: shard {last.name} is missing"):
        rpo_engine.load_model(tmp_path)


def test_gradient_checkpointing_same_grads(tmp_path):
    save_hf_checkpoint("qwen3", tmp_path)
    ids = random_ids(113)
    grads = []
    for ckpt in (False, True):
        model = rpo_engine.load_model(tmp_path).train()
        model.gradient_checkpointing = ckpt
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_hidden_states_feed_lm_head(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    model = rpo_engine.load_model(tmp_path)
    ids = random_ids(131)
    with torch.no_grad():
        h = model.hidden_states(ids)
        assert h.shape == (*ids.shape, 48)
        torch.testing.assert_close(h @ model.lm_head.weight.T, model(ids))


def test_a_tied_model_built_from_its_config_shares_its_head_and_saves_what_it_runs(tmp_path):
    """A tied model made from a config (the starter's, tiny_task_model's) has one tensor for embedding and head:
    a step moves both, and the checkpoint, which stores it once, loads with the same logits (a head of its own
    would be dropped by the save, and the load would tie it back to the embedding)."""
    from rpo_engine.data.starter import tiny_task_model

    model, tok = tiny_task_model(hidden_size=16, seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_ids(model.config.vocab_size, B=2, T=7)
    model(ids).square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    model.save_pretrained(tmp_path, tokenizer=tok)
    with torch.no_grad():
        torch.testing.assert_close(rpo_engine.load_model(tmp_path)(ids), model(ids), rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="device memory: run with RPO_TEST_DEVICE=cuda")
def test_loading_onto_a_gpu_allocates_the_weights_once(tmp_path):
    """load_model puts one copy of the weights on the device, each converted as it arrives: the peak allocation is
    about the model's size, not twice it (an uninitialised copy made first, then replaced: 32 GB at 8B in bf16)."""
    save_hf_checkpoint("llama", tmp_path, hidden_size=256, intermediate_size=1024, vocab_size=512)  # fp32 on disk
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = rpo_engine.load_model(tmp_path, dtype="bfloat16", device=DEVICE)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size <= torch.cuda.max_memory_allocated() - before < 1.5 * size  # a tensor in transit: at most 23% more


def test_loading_imports_neither_dynamo_nor_sympy(tiny_model_dir):
    """load_model's shapes-only model on the meta device draws no random init and computes its rotary frequencies on
    the CPU: normal_, arange and pow on meta import torch._dynamo and sympy, ~1.3 s of every eval CLI's start (and of
    each of the suite's CLI runs that ends before the trainer's optimizer imports it)."""
    import subprocess
    import sys

    code = ("import sys; import rpo_engine; rpo_engine.load_model(sys.argv[1]); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_model_built_on_meta_has_the_cpu_models_rotary_frequencies(family):
    """The meta model's rotary buffer (shape) and attention scaling (a float load_model keeps) are the CPU model's."""
    from rpo_engine.model import CausalLM, ModelConfig

    config = ModelConfig.from_hf_dict(json.loads(make_hf_model(family, num_layers=1).config.to_json_string()))
    with torch.device("meta"):
        meta = CausalLM(config)
    cpu = CausalLM(config)
    assert meta.model.rotary_emb.inv_freq.is_meta and meta.model.embed_tokens.weight.is_meta
    assert meta.model.rotary_emb.inv_freq.shape == cpu.model.rotary_emb.inv_freq.shape
    assert meta.model.rotary_emb.attention_scaling == cpu.model.rotary_emb.attention_scaling

def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        rpo_engine.load_model(tmp_path / "nope")


def test_a_hub_model_id_loads_from_the_local_cache(tmp_path, monkeypatch, tiny_model_dir):
    """`org/name` (from_pretrained's and TRL's model_name_or_path) is the model in the Hugging Face cache (offline
    here; online, huggingface_hub brings it up to date or downloads it first); a local directory of that relative
    name wins, as in from_pretrained; an id in no cache is one error naming it, the cache and why."""
    import huggingface_hub

    from tests.helpers import hub_snapshot

    cache = tmp_path / "hub"
    snapshot = hub_snapshot(cache, "org/tiny", tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = rpo_engine.load_model("org/tiny")
    assert model.source_dir == snapshot
    want = rpo_engine.load_model(tiny_model_dir).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    assert rpo_engine.load_tokenizer("org/tiny").get_vocab() == rpo_engine.load_tokenizer(tiny_model_dir).get_vocab()
    local = save_hf_checkpoint("qwen2", tmp_path / "cwd" / "org" / "tiny")
    monkeypatch.chdir(tmp_path / "cwd")
    assert rpo_engine.load_model("org/tiny").config.vocab_size == local.config.vocab_size != model.config.vocab_size
    with pytest.raises(UserError, match=f"^org/missing: no such directory, and no Hugging Face Hub model of that name "
                                        f"in the local cache \\({re.escape(str(cache))}\\) or to download "
                                        f"\\(HF_HUB_OFFLINE is set\\)$"):
        rpo_engine.load_model("org/missing")
    with pytest.raises(UserError, match="^org/missing: no such directory, and no Hugging Face Hub model"):
        rpo_engine.load_tokenizer("org/missing")
    with pytest.raises(UserError, match="model directory not found"):  # a path, not an id: never looked up
        rpo_engine.load_model("org/tiny/extra")


def test_a_hub_model_brings_only_its_weights_configs_and_tokenizer(tmp_path, monkeypatch):
    """A Hub id asks huggingface_hub for the safetensors weights, the JSON files and every kind of tokenizer file
    (SentencePiece, tiktoken, vocab/merges text, a chat template file), not the .bin/.pth/.gguf copies of the
    weights beside them; what the resume check reads (where_model_is) is the cache alone, never a download."""
    import fnmatch

    import huggingface_hub

    from rpo_engine.model.checkpoint import model_directory
    from rpo_engine.train import where_model_is

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: calls.append(dict(kwargs, repo_id=repo_id)) or str(tmp_path))
    assert model_directory("org/tiny") == tmp_path
    assert calls[0]["repo_id"] == "org/tiny" and calls[0]["repo_type"] == "model"
    assert calls[0]["local_files_only"] is False  # brought up to date or downloaded where the network allows
    patterns = calls[0]["allow_patterns"]
    wanted = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "qwen.tiktoken",
              "vocab.txt", "merges.txt", "chat_template.jinja"]
    assert [f for f in wanted if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
    unwanted = ["pytorch_model.bin", "consolidated.00.pth", "model.gguf", "flax_model.msgpack"]
    assert [f for f in unwanted if any(fnmatch.fnmatch(f, p) for p in patterns)] == []
    assert where_model_is("org/tiny") == tmp_path.resolve() and calls[1]["local_files_only"] is True


def test_a_hub_id_that_cannot_be_fetched_names_the_requests_own_error(monkeypatch):
    """Online, an id neither downloaded nor in the cache is one line naming the request's error (the first line
    of it), which huggingface_hub's cache miss was raised from, not the cache miss that hides it."""
    import huggingface_hub.constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from rpo_engine.model.checkpoint import model_directory

    def snapshot_download(repo_id, **kwargs):
        try:
            raise ConnectionError("[Errno 101] Network is unreachable\nwhile connecting")
        except ConnectionError as e:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from e

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(UserError, match=r"^org/tiny: no such directory, and no Hugging Face Hub model of that name in "
                                        r"the local cache \(.*\) or to download \(ConnectionError: \[Errno 101\] "
                                        r"Network is unreachable\)$"):
        model_directory("org/tiny")


def test_config_not_json(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json: not valid JSON"):
        rpo_engine.load_model(tmp_path)


@pytest.mark.parametrize("text,message", [("{not json", "not valid JSON"), ("[1]", "expected a JSON object"),
                                          ('{"eos_token_id": "</s>"}', "eos_token_id must be a token id"),
                                          ('{"eos_token_id": [2, -1]}', "eos_token_id must be a token id")])
def test_broken_generation_config(tmp_path, text, message):
    save_hf_checkpoint("qwen2", tmp_path)
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(UserError, match=rf"generation_config\.json: {message}"):
        rpo_engine.load_model(tmp_path)


def test_unsupported_model_type(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
        rpo_engine.load_model(tmp_path)


@pytest.mark.parametrize("rope_type,message", [
    ("dynamic", "unsupported rope_scaling type 'dynamic': its frequencies change with the sequence length"),
    ("longrope", "unsupported rope_scaling type 'longrope'; expected one of"),
])
def test_unsupported_rope_type(tmp_path, rope_type, message):
    save_hf_checkpoint("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key):
            cfg[key]["rope_type"] = rope_type
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=message):
        rpo_engine.load_model(tmp_path)


def test_llama_partial_rotary_factor_is_refused(tmp_path):
    """A Llama config.json with partial_rotary_factor < 1 asks for RoPE on part of each head (vLLM's Llama rotates
    that part; transformers' computes that many frequencies and then fails to apply them): our decoder rotates
    every dimension, so it is a one-line error naming the field, top-level or in rope_parameters; 1.0 is plain
    RoPE. (Qwen2/Qwen3 in transformers ignore the field, as we do.)"""
    from transformers import AutoModelForCausalLM

    save_hf_checkpoint("llama", tmp_path)
    params = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    for changes in (dict(partial_rotary_factor=0.5), dict(rope_parameters=dict(params, partial_rotary_factor=0.5))):
        _edit_config(tmp_path, **changes)
        with pytest.raises(UserError, match=r"config\.json: partial_rotary_factor 0\.5: .*not supported"):
            rpo_engine.load_model(tmp_path)
        _edit_config(tmp_path, partial_rotary_factor=None, rope_parameters=params)
    _edit_config(tmp_path, partial_rotary_factor=1.0)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    ids = random_ids(131)
    with torch.no_grad():
        assert rel_err(rpo_engine.load_model(tmp_path)(ids), hf(ids).logits) < 1e-5


def test_missing_tensor(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        rpo_engine.load_model(tmp_path)


@pytest.mark.parametrize("family,changes,extra", [
    ("qwen2", dict(model_type="llama", layer_types=None), "model.layers.0.self_attn.k_proj.bias"),  # biases dropped
    ("llama", dict(mlp_bias=False), "model.layers.0.mlp.down_proj.bias"),
    ("qwen3", dict(num_hidden_layers=1, layer_types=None), "model.layers.1.input_layernorm.weight")])
def test_tensors_the_config_has_no_place_for_are_refused(tmp_path, family, changes, extra):
    """A checkpoint whose tensors the config does not use describes another model (transformers loads it with
    an UNEXPECTED report and drops them): refused, naming one. A tied model's lm_head.weight (transformers
    re-ties it) and old checkpoints' rotary inv_freq buffers are no weights and stay allowed."""
    save_hf_checkpoint(family, tmp_path)
    _edit_config(tmp_path, **changes)
    unused = rf"\d+ tensor\(s\) config\.json has no place for, first '{re.escape(extra)}'"
    with pytest.raises(UserError, match=unused):
        rpo_engine.load_model(tmp_path)
    save_hf_checkpoint("qwen2", tmp_path)  # tied
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors")
    assert rpo_engine.load_model(tmp_path).config.tie_word_embeddings


def test_misshaped_tensor(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(7,\), expected \(64,\)"):
        rpo_engine.load_model(tmp_path)


def test_corrupt_safetensors(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="model.safetensors: not a readable safetensors file"):
        rpo_engine.load_model(tmp_path)


def _edit_config(directory, **changes):
    """config.json with `changes` applied; a value None deletes the key."""
    cfg = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        cfg.pop(key, None) if value is None else cfg.__setitem__(key, value)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    (dict(rope_parameters=None, rope_theta="1e4"), "rope_theta must be a finite number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": None}), "rope_parameters.rope_theta must be a"),
    (dict(rms_norm_eps="1e-6x"), "rms_norm_eps must be a finite number"),
    (dict(rope_scaling="linear"), "rope_scaling must be a JSON object"),
    (dict(rope_parameters=[1, 2]), "rope_parameters must be a JSON object"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                           "original_max_position_embeddings": 64}), "rope_scaling factor must be a finite number"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 0, "original_max_position_embeddings": 64}),
     "rope_scaling factor must be > 0"),
    (dict(rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 64}),
     r"yarn rope_scaling is missing \['factor'\]"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": "32k"}),
     "rope_scaling original_max_position_embeddings must be a finite number"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4, "attention_factor": -1.0}),
     "rope_scaling attention_factor must be > 0"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4, "mscale": "1"}), "rope_scaling mscale must be a finite"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 4}),
     r"rope_scaling beta_fast \(1\) must be at least beta_slow \(4\)"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4, "truncate": "yes"}), "rope_scaling truncate must be true"),
    (dict(rope_parameters={"rope_type": "linear", "factor": -2}), "rope_scaling factor must be > 0"),
    (dict(rope_parameters={"type": "linear"}), r"linear rope_scaling is missing \['factor'\]"),
    (dict(eos_token_id="</s>"), "eos_token_id must be a token id"),
    (dict(eos_token_id=[2, -1]), "eos_token_id must be a token id"),
    (dict(num_attention_heads="4"), "wrong type or value"),
    # absurd values: NaN rotary frequencies (a silently different model), a division by zero that named no field
    (dict(rope_parameters=None, rope_theta=-1.0), "rope_theta must be > 0, got -1.0"),
    (dict(rope_parameters=None, rope_theta=0), "rope_theta must be > 0, got 0"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be >= 0, got -1e-06"),
    (dict(num_attention_heads=0), "config field num_attention_heads must be a positive integer, got 0"),
    # "false" is truthy: the model was tied and the checkpoint's own lm_head.weight dropped, silently
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (dict(attention_bias="no"), "attention_bias must be true or false, got 'no'"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config \\('fp8'\\): quantized checkpoints"),
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None), "sliding-window"),
    (dict(use_sliding_window=True, sliding_window=16, layer_types=["full_attention", "sliding_attention"]),
     "sliding-window"),
])
def test_config_fields_of_the_wrong_type_or_value_are_named(tmp_path, changes, message):
    save_hf_checkpoint("llama" if "llama3" in str(changes) else "qwen2", tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(UserError, match=rf"config\.json: .*{message}"):
        rpo_engine.load_model(tmp_path)


def test_more_layers_than_the_weights_hold_is_named_before_the_model_is_built(tmp_path, monkeypatch):
    """num_hidden_layers above the weights' layers (a typo, or a hostile 1e9) is refused before the meta model is
    built: a billion layers' modules, even on the meta device, took hours and memory before the missing-tensor
    error."""
    from rpo_engine.model import checkpoint

    save_hf_checkpoint("qwen2", tmp_path)
    for layers in (3, 10 ** 9):
        _edit_config(tmp_path, num_hidden_layers=layers)
        monkeypatch.setattr(checkpoint, "CausalLM", lambda config: pytest.fail("the model was built"))
        with pytest.raises(UserError, match=re.escape(f"{tmp_path}: config.json's num_hidden_layers is {layers}, "
                                                      f"but the weights hold layers 0 to 1 (2 layers)")):
            rpo_engine.load_model(tmp_path)


@pytest.mark.parametrize("scaling,expected", [
    (None, 256),
    ({"rope_type": "linear", "factor": 3.0}, 768),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 512),  # the original, scaled
    ({"type": "yarn", "factor": 2.5, "original_max_position_embeddings": 200}, 500),
    ({"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 16}, 256),  # vLLM's 40: the config's
    ({"rope_type": "yarn", "factor": 4.0}, 1024),  # no original: transformers takes max_position_embeddings
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32}, 256),  # Llama 3.1 states the scaled context itself
])
def test_max_model_len_is_vllms(scaling, expected):
    from rpo_engine.model.config import ModelConfig

    config = ModelConfig.from_hf_dict(dict(FAMILIES["llama"], num_hidden_layers=1, max_position_embeddings=256,
                                           rope_scaling=scaling))
    assert config.max_model_len == expected


def test_yarn_factor_null_is_the_context_over_the_original():
    """YaRN's factor left null (transformers 5's DeepSeek rule): max_position_embeddings over the original context,
    the frequencies and context the factor written out gives."""
    import dataclasses

    from rpo_engine.model.config import ModelConfig, rope_frequencies

    def config(factor):
        return ModelConfig.from_hf_dict(dict(FAMILIES["qwen2"], num_hidden_layers=1, max_position_embeddings=64,
                                             rope_scaling={"rope_type": "yarn", "factor": factor,
                                                           "original_max_position_embeddings": 16}))

    null, four = config(None), config(4.0)
    assert null.max_model_len == four.max_model_len == 64
    (a, scale_a), (b, scale_b) = rope_frequencies(null), rope_frequencies(four)
    assert torch.equal(a, b) and scale_a == scale_b > 1
    # generation_config.json's stop ids after config.json's, each once
    assert dataclasses.replace(four, eos_token_ids=(2,), generation_eos_token_ids=(5, 2, 5, 7)).stop_token_ids == (2, 5, 7)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_config_defaults_are_transformers(tmp_path, family):
    """Fields a config.json leaves out take transformers' defaults: an untied LM head (Qwen's lm_head.weight
    was dropped for the embedding before), a 32k context; "swish" is SiLU; a sliding window that no layer
    uses (max_window_layers past the last layer) or that covers the context is no sliding window."""
    from transformers import AutoModelForCausalLM

    save_hf_checkpoint(family, tmp_path, tie_word_embeddings=False)
    _edit_config(tmp_path, tie_word_embeddings=None, max_position_embeddings=None, hidden_act="swish",
                 use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    ours = rpo_engine.load_model(tmp_path)
    assert not ours.config.tie_word_embeddings and ours.config.max_position_embeddings == 32768
    ids = random_ids(hf.config.vocab_size, T=23)  # longer than the window
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5
    _edit_config(tmp_path, max_window_layers=1)  # now layer 1 slides
    with pytest.raises(UserError, match="1 layer\\(s\\) a 8-token window \\(from layer 1\\)"):
        rpo_engine.load_model(tmp_path)
    _edit_config(tmp_path, sliding_window=None)  # left out: transformers' default window, 4096 tokens
    with pytest.raises(UserError, match="1 layer\\(s\\) a 4096-token window"):
        rpo_engine.load_model(tmp_path)
    _edit_config(tmp_path, sliding_window=32768)  # a window as long as the context never cuts anything
    assert rpo_engine.load_model(tmp_path).config.num_hidden_layers == 2


def test_fields_left_out_take_transformers_defaults_of_their_family(tmp_path):
    """Llama's max_position_embeddings left out is transformers' 2048 (Qwen's 32768: the context runs are checked
    against); Qwen3's head_dim left out is 128 (not hidden / heads, as for Llama and Qwen2)."""
    from transformers import AutoConfig

    from rpo_engine.model.config import ModelConfig
    from tests.helpers import hf_config

    save_hf_checkpoint("llama", tmp_path)
    _edit_config(tmp_path, max_position_embeddings=None)
    want = AutoConfig.from_pretrained(str(tmp_path)).max_position_embeddings
    assert rpo_engine.load_model(tmp_path).config.max_position_embeddings == want == 2048
    qwen3 = hf_config("qwen3").to_dict()
    del qwen3["head_dim"]
    assert ModelConfig.from_hf_dict(qwen3).head_dim == AutoConfig.for_model(**qwen3).head_dim == 128


@pytest.mark.parametrize("family,dropped,added", [
    ("llama", ("num_key_value_heads", "rms_norm_eps", "head_dim"), {}),
    ("qwen2", ("rms_norm_eps",), {"attention_bias": True, "mlp_bias": True}),  # Qwen2: q/k/v biases, whatever it says
    ("qwen3", ("head_dim", "rms_norm_eps"), {"attention_bias": True, "mlp_bias": True})])
def test_config_builds_the_modules_transformers_builds(family, dropped, added):
    """From a config.json with fields left out or set that the family ignores, our decoder has the tensors (names
    and shapes) transformers' model has, and its norms' eps: such a checkpoint loads, and computes the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rpo_engine.model.config import ModelConfig
    from rpo_engine.model.decoder import CausalLM
    from tests.helpers import hf_config

    hf = hf_config(family).to_dict()
    for key in dropped:
        del hf[key]
    hf.update(added)
    theirs_config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        theirs, ours = AutoModelForCausalLM.from_config(theirs_config), CausalLM(ModelConfig.from_hf_dict(hf))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("inv_freq")}
    assert shapes(ours) == shapes(theirs)
    assert ours.config.rms_norm_eps == theirs_config.rms_norm_eps


def test_rope_parameters_win_over_top_level_rope_theta(tmp_path):
    """transformers 5 reads rope_parameters first; a config with both forms means what it says there."""
    from transformers import AutoModelForCausalLM

    save_hf_checkpoint("qwen3", tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rope_theta=1e6)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    ours = rpo_engine.load_model(tmp_path)
    assert ours.config.rope_theta == 500.0
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5


def test_rope_scaling_beside_rope_parameters(tmp_path):
    """transformers (4.x and 5.x) reads a top-level rope_scaling, with the top-level rope_theta, before
    rope_parameters, and 5.x a top-level original_max_position_embeddings before the scaling's own: a config
    means what transformers reads, and one whose rope_parameters say something transformers drops is refused."""
    from transformers import AutoModelForCausalLM

    save_hf_checkpoint("llama", tmp_path)  # transformers 5 wrote rope_parameters: llama3, factor 8, theta 5e4
    params = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    ids = random_ids(131, T=40)
    for changes in (dict(rope_scaling=scaling, rope_theta=params["rope_theta"]),  # the same RoPE twice
                    dict(rope_scaling=scaling, rope_theta=params["rope_theta"],
                         rope_parameters={"rope_type": "default"})):  # a default beside it says nothing
        _edit_config(tmp_path, **changes)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
        with torch.no_grad():
            assert rel_err(rpo_engine.load_model(tmp_path)(ids), hf(ids).logits) < 1e-5
    for changes, message in [
            (dict(rope_parameters=params, rope_scaling=dict(scaling, factor=4.0)), "rope_parameters"),
            (dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}), "rope_parameters.rope_theta"),
            (dict(rope_parameters=params, rope_scaling=None, original_max_position_embeddings=32),
             "original_max_position_embeddings")]:
        _edit_config(tmp_path, **changes)
        with pytest.raises(UserError, match=rf"config\.json: .*{message}.*transformers"):
            rpo_engine.load_model(tmp_path)


def test_model_config_with_default_rope_scaling_is_unscaled():
    """ModelConfig is public: a rope_scaling of type "default", as transformers writes it, means no scaling."""
    from rpo_engine.model import CausalLM, ModelConfig

    fields = dict(model_type="llama", vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    config = ModelConfig(**fields, rope_scaling={"rope_type": "default", "rope_theta": 10000.0})
    assert config.rope_scaling is None and config == ModelConfig(**fields)
    unscaled = CausalLM(ModelConfig(**fields)).model.rotary_emb.inv_freq
    assert torch.equal(CausalLM(config).model.rotary_emb.inv_freq, unscaled)


def test_attention_dropout_is_ignored_with_a_warning():
    """transformers drops attention weights in train mode; our training forward never does (it would differ
    from the rollout's), so a config asking for it is told, and 0.0 (every release's) passes quietly."""
    import warnings

    from rpo_engine.model import ModelConfig

    hf = dict(model_type="qwen2", vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2)
    with pytest.warns(UserWarning, match="attention_dropout 0.1 is ignored"):
        ModelConfig.from_hf_dict(dict(hf, attention_dropout=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_hf_dict(dict(hf, attention_dropout=0.0))


def test_quantized_weights_are_refused(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = (state[name] * 100).to(torch.float8_e4m3fn)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=rf"tensor '{name}' is float8_e4m3fn, not a float16/bfloat16/float32"):
        rpo_engine.load_model(tmp_path)


@pytest.mark.parametrize("weight_map", [None, ["model.safetensors"], {"model.norm.weight": None}])
def test_broken_shard_index(tmp_path, weight_map):
    save_hf_checkpoint("qwen2", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="model.safetensors.index.json: .*weight_map"):
        rpo_engine.load_model(tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_names_the_dtype_it_wrote(tmp_path, dtype):
    """A checkpoint converted on load is saved in its new dtype and says so: transformers 5 reads config.json's
    "dtype" (which the source's config brought along), 4.x "torch_dtype"."""
    from transformers import AutoModelForCausalLM

    source = make_hf_model("qwen2").to(torch.float16)
    source.save_pretrained(str(tmp_path / "src"))
    assert json.loads((tmp_path / "src" / "config.json").read_text()).get("dtype") == "float16"
    # unconverted (no dtype, or transformers' "auto"), a model keeps the dtype its weights are stored in
    assert rpo_engine.load_model(tmp_path / "src").dtype == rpo_engine.load_model(tmp_path / "src", dtype="auto").dtype \
        == torch.float16
    rpo_engine.load_model(tmp_path / "src", dtype=dtype).save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == dtype
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto").dtype == getattr(torch, dtype)


def test_interrupted_saves_leave_the_good_copy_in_reach(tmp_path, monkeypatch):
    """A save killed between renaming the old directory out and the new one in leaves only the hidden old copy;
    a save killed while deleting the old copy leaves it half carried over; one killed while writing leaves a
    temporary directory. The next save puts each right: the good copy back, the user's files kept, the
    temporary directories gone."""
    from rpo_engine.model import atomic

    save_hf_checkpoint("qwen2", tmp_path / "src")
    model = rpo_engine.load_model(tmp_path / "src")
    out = tmp_path / "out"
    model.save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    out.rename(tmp_path / ".out.old-1")  # killed between the renames
    (tmp_path / ".out.tmp-x").mkdir()  # killed while writing
    model.save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    # killed while carrying over: the old copy still holds an entry the new one lacks
    (tmp_path / ".out.old-7").mkdir()
    (tmp_path / ".out.old-7" / "metrics.jsonl").write_text("{}")
    (tmp_path / ".out.old-7" / "model-00001-of-00002.safetensors").write_text("stale shard")
    model.save_pretrained(out)
    assert (out / "metrics.jsonl").is_file() and not (out / "model-00001-of-00002.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    # a failure inside the block deletes the new directory and leaves the old one as it was
    monkeypatch.setattr(rpo_engine.model.checkpoint, "save_file", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model.save_pretrained(out)
    assert (out / "notes.txt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    monkeypatch.undo()
    # a file in the way is refused before anything is written; a symlink is followed to its directory
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file: exists and is not a directory"):
        model.save_pretrained(tmp_path / "file")
    (tmp_path / "latest").symlink_to(out)
    model.save_pretrained(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and (out / "notes.txt").is_file()
    # a live save's temporary directory (another process saving here at the same time: two runs building the
    # starter model) is left alone; an exited process's is not, nor is another host's touched
    import socket
    import subprocess
    import sys

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    live, dead, remote = (tmp_path / f".out.tmp-{host}-{os.getppid()}-abc", tmp_path / f".out.tmp-{host}-"
                          f"{exited.stdout.strip()}-abc", tmp_path / ".out.tmp-elsewhere-1-abc")
    for d in (live, dead, remote):
        d.mkdir()
    model.save_pretrained(out)
    assert live.is_dir() and remote.is_dir() and not dead.exists()
    assert atomic._OWNER == f"{host}-{os.getpid()}"


def test_a_saved_directory_takes_the_umasks_mode_not_mkdtemps_private_one(tmp_path):
    """A save is built in a mkdtemp directory (mode 0700) renamed into place: final/, a checkpoint's model/ and the
    starter model in a cache several users' runs share came out readable by their owner alone, whatever the umask."""
    import os

    from rpo_engine.model.atomic import replacing_directory

    old = os.umask(0o022)
    try:
        with replacing_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_weights_take_the_umasks_mode_as_the_other_files_do(tmp_path, tiny_model_dir, umask):
    """safetensors 0.8 writes through a temporary file of mode 0600 renamed into place: model.safetensors (final/,
    a checkpoint's, the starter model's) and adapter_model.safetensors came out readable by their owner alone
    beside a config.json the umask made readable to the group or everyone, and another user's vLLM or
    transformers could not load them. They take the umask's mode, as an open() does."""
    import os

    import rpo_engine
    from rpo_engine.model.lora import apply_lora, save_adapter

    model = apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0, target_modules="q_proj")
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "merged")
        save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(old)
    mode = 0o666 & ~umask
    for directory, weights, config in ((tmp_path / "merged", "model.safetensors", "config.json"),
                                       (tmp_path / "adapter", "adapter_model.safetensors", "adapter_config.json")):
        assert (directory / config).stat().st_mode & 0o777 == mode
        assert (directory / weights).stat().st_mode & 0o777 == mode, oct((directory / weights).stat().st_mode)
