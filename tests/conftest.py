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
