"""Every Triton kernel compiles for an H100 (sm_90) and an A100 (sm_80) at its production launch configurations.

The other kernel tests run through the interpreter, which checks values but accepts code the compiler
rejects and knows no shared-memory or register limits. tests/triton_aot.py records each launch site's
real launches (production dtypes, model shapes, GPU block sizes) and compiles them ahead of time with
Triton's own ptxas: no GPU needed, only the nvidia backend that ships in the triton wheel.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
if platform.machine() != "x86_64" or sys.platform != "linux":
    pytest.skip("Triton's bundled ptxas is an x86_64 Linux binary", allow_module_level=True)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set, so triton does not warn about it
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_aot.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_within_shared_memory(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_fwd_kernel", "_grad_logits_kernel", "_policy_loss_kernel", "_paged_decode_kernel"}
    policy = [r["config"] for r in compiled if r["kernel"] == "_policy_loss_kernel"]
    assert {c["SURROGATE"] for c in policy} == {0, 1, 2, 3}  # clip, CISPO, SAPO, VESPO
    assert {c["KL_RATIO"] for c in policy} == {False, True}
    grad_logits = [r["config"] for r in compiled if r["kernel"] == "_grad_logits_kernel"]
    assert {c["ENTROPY_GRAD"] for c in grad_logits} == {False, True}  # with the entropy bonus's gradient
    assert {r["target"] for r in compiled} == {"sm_90", "sm_80"}
    assert len(compiled) >= 2 * 18  # every distinct launch: dtypes x entropy x KL x head shapes x splits (x cascade),
    # per target
    for r in compiled:
        assert r["cubin_bytes"] > 0, r
        assert 0 <= r["shared_bytes"] <= r["shared_limit"], r  # else the launch fails: out of resources


def test_paged_decode_does_not_spill(compiled):
    """The decode kernel runs once per layer per token: its tile is sized so ptxas keeps it in registers
    (fp32 at head dim 128 and 32-token tiles spilled 13 KB per thread)."""
    decode = [r for r in compiled if r["kernel"] == "_paged_decode_kernel"]
    assert {r["dtypes"]["q_ptr"] for r in decode} == {"*bf16", "*fp16", "*fp32"}
    assert {r["config"]["HAS_MEMBERS"] for r in decode} == {False, True}  # plain and cascade launches
    for r in decode:
        assert r["registers"] and r["spill_bytes"] <= 1024, r


@pytest.mark.parametrize("args, code, says", [(["--help"], 0, "usage:"), (["--bogus"], 2, "unrecognized arguments"),
                                              (["--out"], 2, "expected one argument")])
def test_report_options_are_parsed(args, code, says):
    """`python tests/triton_aot.py --help` prints its usage, and a mistyped option is an error: neither starts the
    minutes-long compile of every launch (an unparsed argv ran it for any option but --out)."""
    env = dict(os.environ, TRITON_INTERPRET="1")  # a compile started by mistake stops at once, with another message
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_aot.py")), *args], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code, out.stderr[-2000:]
    assert says in out.stdout + out.stderr
    assert not any(line.startswith("{") for line in out.stdout.splitlines())  # no launch compiled
