import os
import shutil

# Triton kernels run on the CPU through the interpreter when there is no GPU. The variable must be
# set before triton is first imported, so it is set here, ahead of every test module.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds wake-up latency (seconds, on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2-shaped model (tied embeddings) with the task tokenizer: fast, and (small init)
    its samples vary."""
    from rpo_engine.data.tokenizer import build_task_tokenizer
    from rpo_engine.model import CausalLM, ModelConfig

    directory = tmp_path_factory.mktemp("tiny")
    tok = build_task_tokenizer()
    config = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    torch.manual_seed(0)
    CausalLM(config).init_weights(0.02).save_pretrained(directory, tokenizer=tok)
    return directory
