import os

# Tests run on RPO_TEST_DEVICE: "cpu" (the default, also on a GPU box) or "cuda". On the CPU the Triton
# kernels run through the interpreter, which must be switched on before triton is first imported, so it
# is set here, ahead of every test module. On "cuda" they compile for the GPU, and `-m gpu` picks the
# tests written to run there (kernels, rollout engine, shared-prefix training, a training run).
DEVICE_NAME = os.environ.get("RPO_TEST_DEVICE", "cpu")
if DEVICE_NAME not in ("cpu", "cuda"):
    raise SystemExit(f"RPO_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE_NAME!r}")
ONE_THREAD = DEVICE_NAME == "cpu" and "OMP_NUM_THREADS" not in os.environ
if DEVICE_NAME == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU box too: "auto" devices (the CLI's) resolve to the CPU, as in CI
    # One torch thread in each worker and in the programs the tests start (unless OMP_NUM_THREADS says otherwise):
    # `-n 2` on 2 cores already keeps both busy, and the tests' tiny tensors gain nothing from a second thread, whose
    # wake-ups on a busy box cost seconds (an in-process 2-step training run: 21 s with 2 threads, 2 s with 1).
    if ONE_THREAD:
        os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if ONE_THREAD:
    torch.set_num_threads(1)  # torch may have been imported before this file, OMP_NUM_THREADS then read
if DEVICE_NAME == "cuda" and not torch.cuda.is_available():
    raise SystemExit("RPO_TEST_DEVICE=cuda, but torch sees no CUDA device")


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
    from rpo_engine.data.starter import tiny_task_model

    directory = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_task_model(hidden_size=32, seed=0)
    model.save_pretrained(directory, tokenizer=tok)
    return directory
