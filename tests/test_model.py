"""Our decoder against transformers on tiny random checkpoints of each family."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import rpo_engine
from rpo_engine.errors import UserError
from tests.helpers import FAMILIES, make_hf_model, save_hf_checkpoint

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
    out.mkdir()
    (out / "stale.txt").write_text("old")
    model.save_pretrained(out)
    assert (out / "tokenizer.json").is_file() and not (out / "stale.txt").exists()
    assert rpo_engine.load_tokenizer(out).encode("a b", add_special_tokens=False) == [1, 2]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    # generation_config.json (stop tokens, sampling defaults) is copied also when a tokenizer is given, as the
    # trainer saves its checkpoints and final/.
    (src / "generation_config.json").write_text('{"eos_token_id": [1, 2], "temperature": 0.6}')
    model = rpo_engine.load_model(src)
    model.save_pretrained(tmp_path / "trained", tokenizer=rpo_engine.load_tokenizer(src))
    assert json.loads((tmp_path / "trained" / "generation_config.json").read_text())["temperature"] == 0.6
    assert rpo_engine.load_model(tmp_path / "trained").config.generation_eos_token_ids == (1, 2)


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = rpo_engine.load_model(tmp_path)
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5


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


# ---- bad input -------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        rpo_engine.load_model(tmp_path / "nope")


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


def test_unsupported_rope_type(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key):
            cfg[key]["rope_type"] = "yarn"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="unsupported rope_scaling type 'yarn'"):
        rpo_engine.load_model(tmp_path)


def test_missing_tensor(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        rpo_engine.load_model(tmp_path)


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
