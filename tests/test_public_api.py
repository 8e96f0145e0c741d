"""The embeddable API as a user's own trainer calls it: arguments it gets wrong are named, not crashed on deep
inside, and the shapes a user naturally passes (a tensor row of rewards, an integer device) work."""

import pytest
import torch

import rpo_engine
from tests.helpers import ON_CUDA


def test_load_model_takes_an_integer_device_as_torch_does(tiny_model_dir):
    # torch.device(0) is cuda:0; `device or "cpu"` read it as no device and loaded onto the CPU
    if ON_CUDA:
        assert rpo_engine.load_model(tiny_model_dir, device=0).device == torch.device("cuda", 0)
    else:
        for device in (0, "cuda"):  # torch's own errors here: "Cannot access accelerator", an AssertionError
            with pytest.raises(rpo_engine.UserError, match=f"^device {device!r}: "):
                rpo_engine.load_model(tiny_model_dir, device=device)


def test_load_model_refuses_a_dtype_that_is_not_floating(tiny_model_dir):
    with pytest.raises(rpo_engine.UserError, match="dtype must be a floating-point dtype, got torch.int8"):
        rpo_engine.load_model(tiny_model_dir, dtype=torch.int8)
    with pytest.raises(rpo_engine.UserError, match="unknown dtype"):
        rpo_engine.load_model(tiny_model_dir, dtype=["bf16"])  # not a TypeError from a dict lookup
