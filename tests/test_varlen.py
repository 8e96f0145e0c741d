"""Varlen attention (flash-attn's packed layout): our packing, checked on the CPU with an SDPA reference."""
import pytest
import torch

from rpo_engine.model import CausalLM, ModelConfig
from rpo_engine.model.decoder import PaddedAttention, VarlenAttention, flash_attn_available, sdpa_varlen
from tests.helpers import ON_CUDA


def _mask(lengths, T, left):
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_varlen_packing_equals_padded_sdpa(left, kv_heads):
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 3, 11, 4, 8
    q = torch.randn(B, T, H, D, generator=g)
    k, v = (torch.randn(B, T, kv_heads, D, generator=g) for _ in range(2))
    mask = _mask([11, 5, 1], T, left)
    want = PaddedAttention(mask, T, q.device)(0, q, k, v)
    got = VarlenAttention(mask, varlen_fn=sdpa_varlen)(0, q, k, v)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    assert (got[~real] == 0).all()


def test_model_with_varlen_backend_matches_default(one_thread):
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=64, tie_word_embeddings=True))
    model = CausalLM(config).init_weights(0.2)
    ids = torch.randint(0, 64, (3, 9))
    mask = _mask([9, 4, 6], 9, left=True)
    want = model.hidden_states(ids, mask)
    got = model.hidden_states(ids, mask, attn=VarlenAttention(mask, varlen_fn=sdpa_varlen))
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
    got.sum().backward()  # gradients flow through the packing
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_CUDA and flash_attn_available()), reason="needs RPO_TEST_DEVICE=cuda and flash-attn")
def test_flash_varlen_matches_sdpa_reference_on_gpu():
    from rpo_engine.model.decoder import flash_varlen

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D = 4, 64, 8, 64
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, T, 2, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    mask = _mask([64, 10, 33, 1], T, left=False).cuda()
    got = VarlenAttention(mask, varlen_fn=flash_varlen)(0, q, k, v).float()
    want = VarlenAttention(mask, varlen_fn=sdpa_varlen)(0, q.float(), k.float(), v.float())
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=2e-2, atol=2e-2)
