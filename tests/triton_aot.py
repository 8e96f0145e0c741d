"""Compile every Triton kernel for real GPUs (sm_90: H100; sm_80: A100) on a machine without one.

The CPU tests run the kernels through the interpreter, which checks their numbers but not that they
compile: the interpreter accepts code the compiler rejects, and it has no shared-memory limit. Here
each kernel's launch site runs as in production, on CPU tensors of the production dtypes and model
shapes, with the kernel replaced by a recorder; every recorded launch (its arguments, constexprs and
num_warps) is then compiled ahead of time down to a cubin with Triton's own ptxas, and its shared
memory checked against the chip's per-block limit. Run as a script (it must import triton WITHOUT
TRITON_INTERPRET), it prints one JSON line per launch; tests/test_triton_compile.py runs it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import contextlib
import io
import re
import sys
import tempfile
import time

# (name, arch, shared memory a block may opt into, bytes)
TARGETS = {"sm_90": (90, 232448), "sm_80": (80, 166912)}  # H100/H200: 227 KiB per block; A100: 163 KiB

_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int32": "i32",
           "torch.int64": "i64", "torch.uint8": "u8", "torch.bool": "i1"}


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running."""

    def __init__(self, fn, label: str):
        self.fn, self.label, self.launches = fn, label, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _signature(fn, args, kwargs):
    """Triton's AOT signature ({name: type or 'constexpr'}), constexpr values, and compile options of one launch."""
    import torch

    values = dict(zip(fn.arg_names, args))
    values.update((k, v) for k, v in kwargs.items() if k in fn.arg_names)
    signature, constexprs = {}, {}
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(p.num,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[str(v.dtype)]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{p.name}: cannot type {type(v).__name__} for an AOT signature")
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}  # num_warps, num_stages
    return signature, constexprs, options


def record_launches():
    """Run each kernel's launch site as on a GPU, at production dtypes and shapes; return the recorders."""
    import torch

    fl = importlib.import_module("rpo_engine.kernels.fused_logprobs")
    pl = importlib.import_module("rpo_engine.kernels.policy_loss")
    pa = importlib.import_module("rpo_engine.kernels.paged_attention")
    cuda = torch.device("cuda")  # a device object only: nothing is allocated there
    block_sizes, block_size = fl._block_sizes, pl._block_size
    fl._block_sizes = lambda device, dtype: block_sizes(cuda, dtype)
    pl._block_size = lambda device: block_size(cuda)
    recorders = {name: Recorder(getattr(mod, name), name) for mod, name in
                 ((fl, "_fwd_kernel"), (fl, "_grad_logits_kernel"), (pl, "_policy_loss_kernel"),
                  (pa, "_paged_decode_kernel"))}
    for mod in (fl, pl, pa):
        for name, rec in recorders.items():
            if hasattr(mod, name):
                setattr(mod, name, rec)
    try:
        # Fused log-probs: Qwen2.5-1.5B's head (hidden 1536, vocab 151936), bf16 (GPU training) and fp32.
        for dtype in (torch.bfloat16, torch.float32):
            hidden, weight = torch.zeros(64, 1536, dtype=dtype), torch.zeros(151936, 1536, dtype=dtype)
            targets = torch.zeros(64, dtype=torch.int64)
            for entropy in (False, True):
                fl._triton_forward(hidden, weight, targets, 1.0, entropy)
            zeros = torch.zeros(64)
            for entropy_grad in (None, zeros):  # the entropy bonus's gradient (--entropy-coef) too
                fl._triton_grad_logits(hidden, weight[:4096], targets, zeros, zeros, entropy_grad, entropy_grad, 0, 1.0)
        # Policy loss, with and without the KL term and importance-sampling weights; CISPO's and SAPO's.
        logp = torch.zeros(4, 300)
        for ref in (None, logp):
            for is_weights in (None, logp):
                pl._PolicyLoss.apply(logp, logp, ref, torch.zeros(4), logp, logp, is_weights, 0.2, 0.28, 0.04,
                                     float("inf"))
            # CISPO's and SAPO's surrogates (--loss-type cispo / sapo), with and without the KL term
            for surrogate in (1, 2):
                pl._PolicyLoss.apply(logp, logp, ref, torch.zeros(4), logp, logp, None, 0.2, 4.0, 0.04, float("inf"),
                                     surrogate, 1.0, 1.05)
        # VESPO's: its sequence weight always arrives as the IS weight
        pl._PolicyLoss.apply(logp, logp, None, torch.zeros(4), logp, logp, logp, 0.2, 0.28, 0.0, float("inf"),
                             3, 1.0, 1.05)
        # the KL term weighted by the ratio (--use-bias-correction-kl)
        pl._PolicyLoss.apply(logp, logp, logp, torch.zeros(4), logp, logp, None, 0.2, 0.28, 0.04, float("inf"),
                             0, 1.0, 1.05, True)
        # the other KL estimators (--kl-loss-type k1, k2, abs)
        for kl_type in (1, 2, 3):
            pl._PolicyLoss.apply(logp, logp, logp, torch.zeros(4), logp, logp, None, 0.2, 0.28, 0.04, float("inf"),
                                 0, 1.0, 1.05, False, kl_type)
        # Paged decode: (heads, KV heads, head dim) of Qwen2.5-0.5B, Qwen2.5-1.5B, Llama-3-8B / Qwen3-8B;
        # bf16 and fp16 caches, and fp32 (a float32 model); one split and flash-decoding splits.
        bf16 = torch.bfloat16
        shapes = [((14, 2, 64), bf16, 1), ((12, 2, 128), bf16, 1), ((32, 8, 128), bf16, 4),
                  ((12, 2, 128), torch.float16, 2), ((12, 2, 128), torch.float32, 1)]
        for (heads, kv_heads, dim), dtype, splits in shapes:
            cache = torch.zeros(8, 16, kv_heads, dim, dtype=dtype)  # [num_blocks, block_size, KVH, D]
            pa.paged_decode(torch.zeros(3, heads, dim, dtype=dtype), cache, cache.clone(),
                            torch.zeros(3, 4, dtype=torch.int32), torch.ones(3, dtype=torch.int32), splits)
            # The cascade launch: one program per run of shared prompt blocks, its members' queries together.
            members = torch.zeros(2, pa.members_per_program(heads // kv_heads), dtype=torch.int32)
            pa.paged_decode_partials(torch.zeros(3, heads, dim, dtype=dtype), cache, cache.clone(),
                                     torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32), splits,
                                     members)
    finally:
        for mod in (fl, pl, pa):
            for name, rec in recorders.items():
                if hasattr(mod, name):
                    setattr(mod, name, rec.fn)
        fl._block_sizes, pl._block_size = block_sizes, block_size
    return list(recorders.values())


def ptxas_usage(log: str) -> dict:
    """Registers per thread and spilled bytes, from the ptxas -v log of Triton's own compile."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": sum(spills)}


def compile_launches() -> list[dict]:
    """Compile each distinct recorded launch for every target; print (and return) one JSON line per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen, rows = set(), []
    for rec in record_launches():
        for args, kwargs in rec.launches:
            signature, constexprs, options = _signature(rec.fn, args, kwargs)
            key = (rec.label, tuple(signature.items()), tuple(sorted(constexprs.items())),
                   tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            for target, (arch, smem_limit) in TARGETS.items():
                start, log = time.perf_counter(), io.StringIO()
                with contextlib.redirect_stdout(log):  # where ptxas's report is printed
                    kernel = triton.compile(ASTSource(fn=rec.fn, signature=signature, constexprs=constexprs),
                                            target=GPUTarget("cuda", arch, 32), options=options)
                rows.append({
                    "kernel": rec.label, "target": target,
                    "config": {rec.fn.arg_names[i[0]]: v for i, v in constexprs.items()},
                    "dtypes": {k: v for k, v in signature.items() if v.startswith("*")},
                    "options": options, "shared_bytes": kernel.metadata.shared, "shared_limit": smem_limit,
                    **ptxas_usage(log.getvalue()),
                    "cubin_bytes": len(kernel.asm["cubin"]), "seconds": round(time.perf_counter() - start, 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    """`python tests/triton_aot.py [--out FILE]`: FILE gets the report with the machine, date and commit."""
    parser = argparse.ArgumentParser(description="Compile every Triton launch site for sm_90 and sm_80 (no GPU "
                                     "needed); prints one JSON line a launch (registers, spills, shared memory).")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="also write the report, with the machine, date and commit, to this JSON file")
    out = parser.parse_args(argv).out
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report (registers, spills), printed during the compile
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache  # compile afresh: a cached kernel skips ptxas and its report
        rows = compile_launches()
    if out:
        import datetime

        import triton

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
        from common import git_commit, machine, save_json

        save_json(out, {"what": "ahead-of-time compile for sm_90 and sm_80 on a CPU machine (no GPU): "
                                "registers, spills, shared memory per launch configuration; tests/triton_aot.py",
                        "machine": machine("cpu"), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "git_commit": git_commit(), "triton": triton.__version__, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
