"""torchrun on the CPU (gloo): 2 ranks take the same steps as 1 process, with DDP and FSDP2; a 2-rank
checkpoint resumes on 1 or 2 ranks; a failing rank stops the job; bad launches are one-line errors."""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def run(args, nproc=None, env=None, timeout=300):
    """`python -m rpo_engine.train ARGS`, or under torchrun with `nproc` ranks."""
    launch = [sys.executable, "-m", "rpo_engine.train"]
    if nproc is not None:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                  "-m", "rpo_engine.train"]
    return subprocess.run([*launch, "--no-progress", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=dict(ENV, **(env or {})))


def check(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def assert_same_steps(a, b, steps):
    """Same samples (rewards, tokens) and the same update (loss, grad norm, KL) at each of `steps`."""
    by_step = ({m["step"]: m for m in a}, {m["step"]: m for m in b})
    for step in steps:
        x, y = by_step[0][step], by_step[1][step]
        for key in ("reward_mean", "reward_std", "accuracy_mean", "rollout_generated_tokens", "num_prompts_sampled",
                    "num_groups_trained", "cache_hit_rate", "cache_verified_rate", "cold_starts", "suffix_len_mean", "lr"):
            assert x[key] == y[key], (step, key, x[key], y[key])
        for key in ("loss", "grad_norm", "kl", "clip_frac", "policy_loss"):
            if key in x or key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (step, key)
        assert x.get("entropy_coef") == y.get("entropy_coef"), step
        if x["entropy"] is None or y["entropy"] is None:  # a step without an update
            assert x["entropy"] is y["entropy"] is None, step
        else:  # a token mean over every rank's trained tokens;
            # near log(vocab) for the random model: ranks' own means would differ from it by ~1e-5
            assert x["entropy"] == pytest.approx(y["entropy"], rel=1e-6, abs=0), step


# DAPO with coin-flip rewards: dynamic sampling drops a group at step 3 and resamples 1 prompt, so
# one rank rolls out none; two optimizer passes (the second off-policy: the loss is not trivially 0) and a KL reference; small micro-batches, so at step 3 one rank runs more of them than
# the other (which pads with zero-weight ones).
COMMON = ["--steps", 3, "--save-steps", 2, "--eval-steps", 3, "--eval-size", 5, "--algo", "dapo", "--seed", 1,
          "--prompts-per-step", 4, "--num-generations", 4, "--max-completion-length", 48, "--train-size", 6,
          "--overlong-buffer", 0, "--no-length-shaping", "--num-iterations", 2, "--beta", 0.05,
          "--micro-batch-tokens", 72, "--learning-rate", 1e-3, "--reward", "tests.reward_fns:hash_reward",
          "--scale-rewards", "batch",  # each rank's advantages divided by the std of every rank's rewards
          "--top-entropy-quantile", 0.5,  # one entropy threshold from every rank's tokens
          "--ppo-mini-batch-size", 2,  # mini-batches by each group's place in the whole batch, on any rank count
          # an entropy bonus over every rank's kept tokens; its coefficient moves each optimizer step (up: the
          # entropy is below the target) and must come back from a checkpoint
          "--use-adaptive-entropy", "--entropy-coef", 0.02, "--entropy-coef-delta", 0.01, "--entropy-target", 10,
          "--dist-timeout", 60, "--log-completions",
          "--eval-temperature", 1.0, "--num-generations-eval", 3,  # sampled eval rows split 3 / 2 over the ranks
          "--warmup-ratio", 0,  # no warmup step: with it (ceil of 5% of 3 steps) these draws hold no resample round
          "--device", "cpu"]  # gloo: on a GPU box two ranks cannot share its one GPU
# The full-weight runs also move their KL reference after step 2 (saved in the step-2 checkpoint, so the
# 2-rank checkpoint resumed on one rank must load it to give step 3's KL).
SYNC = ["--sync-ref-model", "--ref-model-sync-steps", 2, "--ref-model-mixup-alpha", 0.5]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same job on 1 process, on 2 ranks with DDP and on 2 ranks with FSDP2."""
    root = tmp_path_factory.mktemp("dist")
    common = ["--model", tiny_model_dir, *COMMON, *SYNC]
    check(run([*common, "--output", root / "one"]))
    check(run([*common, "--output", root / "ddp"], nproc=2))
    check(run([*common, "--output", root / "fsdp", "--parallel", "fsdp"], nproc=2))
    return root


def test_two_ranks_match_one_process(runs):
    one, ddp = read_metrics(runs / "one"), read_metrics(runs / "ddp")
    assert [m["step"] for m in ddp] == [0, 1, 2, 3]
    assert_same_steps(one, ddp, [1, 2, 3])
    for key in ("eval_accuracy", "eval_pass_at_k"):  # each row's answers seeded by its place in the eval set
        assert [m[key] for m in one if key in m] == [m[key] for m in ddp if key in m], key
    assert len([m for m in one if "eval_pass_at_k" in m]) == 2
    # every round's completions of every rank, in the one process's order (a resample round included)
    assert (runs / "one" / "completions.jsonl").read_text() == (runs / "ddp" / "completions.jsonl").read_text()
    assert any(m["num_prompts_sampled"] > 4 for m in one[1:])  # a resample round ran (odd rows: a rank without)
    assert all(m["grad_norm"] > 0 and abs(m["loss"]) > 1e-3 and m["kl"] > 0 for m in one[1:])
    # the bonus applied from the second optimizer step on (4 a step: 2 passes x mini-batches of 2 of the 4 groups)
    assert [m["entropy_coef"] for m in one[1:]] == pytest.approx([0.06, 0.10, 0.14])
    assert all(m["loss"] < m["policy_loss"] for m in one[1:])
    assert (runs / "ddp" / "final" / "model.safetensors").is_file() and (runs / "ddp" / "curves.png").is_file()


def test_fsdp_matches_ddp(runs):
    ddp, fsdp = read_metrics(runs / "ddp"), read_metrics(runs / "fsdp")
    assert_same_steps(ddp, fsdp, [1, 2, 3])
    from safetensors.torch import load_file
    a, b = load_file(runs / "ddp" / "final" / "model.safetensors"), load_file(runs / "fsdp" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # the gathered FSDP2 weights, saved by rank 0, equal the DDP replica's
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("nproc", [None, 2], ids=["one-process", "two-fsdp-ranks"])
def test_two_rank_checkpoint_resumes(runs, tiny_model_dir, tmp_path, nproc):
    # The FSDP2 run's step-2 checkpoint (sharded optimizer state, consolidated by rank 0), resumed by one plain
    # process or sharded again on two ranks, gives the uninterrupted run's step 3.
    part = tmp_path / "part"
    shutil.copytree(runs / "fsdp", part, ignore=shutil.ignore_patterns("step-3", "final", "tensorboard"))
    sharded = ["--parallel", "fsdp"] if nproc else []
    proc = check(run(["--model", tiny_model_dir, *COMMON, *SYNC, *sharded, "--output", part, "--resume"], nproc=nproc))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    one, resumed = read_metrics(runs / "one"), read_metrics(part)
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]
    assert_same_steps(one, resumed, [3])
    assert (runs / "one" / "completions.jsonl").read_text() == (part / "completions.jsonl").read_text()


def test_two_ranks_skipping_groups_without_signal_match_one_process(tiny_model_dir, tmp_path):
    """GRPO without a KL term: each rank leaves its groups with all-equal rewards out of the forward and
    backward (coin flips over G = 2: half the groups), so ranks run different numbers of micro-batches, or
    none and pad; the loss normalisers still count every group of every rank. The coin flips come from an
    async TRL-style judge, which logs a metric (its mean is over every rank's calls) and a completions column."""
    common = ["--model", tiny_model_dir, "--steps", 3, "--eval-steps", 0, "--seed", 2, "--prompts-per-step", 4,
              "--num-generations", 2, "--max-completion-length", 32, "--train-size", 8, "--no-length-shaping",
              "--micro-batch-tokens", 40, "--learning-rate", 1e-3, "--reward", "tests.reward_fns:async_judge",
              "--rpo-unverified-cut", "least-likely",  # these samples give every step a mix of groups
              "--dist-timeout", 60, "--device", "cpu"]
    check(run([*common, "--output", tmp_path / "one", "--log-completions"]))
    check(run([*common, "--output", tmp_path / "ddp", "--log-completions"], nproc=2))
    one, ddp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")
    assert_same_steps(one, ddp, [1, 2, 3])
    # rank 0 writes every rank's completions, in the one process's order
    assert (tmp_path / "one" / "completions.jsonl").read_text() == (tmp_path / "ddp" / "completions.jsonl").read_text()
    assert all(0 < m["frac_reward_zero_std"] < 1 and m["grad_norm"] > 0 for m in one[1:])
    assert [m["judge/mean_score"] for m in one] == pytest.approx([m["judge/mean_score"] for m in ddp], abs=1e-12)
    assert [m["judge/mean_score"] for m in one] == pytest.approx([m["reward_mean"] for m in one], abs=1e-12)


def test_two_ranks_train_lora_adapters_like_one_process(tiny_model_dir, tmp_path):
    """--use-peft under DDP: only the adapters are all-reduced; the KL reference is each rank's base."""
    common = ["--model", tiny_model_dir, *COMMON, "--use-peft", "--lora-r", 4, "--steps", 2, "--eval-steps", 0]
    check(run([*common, "--output", tmp_path / "one"]))
    check(run([*common, "--output", tmp_path / "ddp"], nproc=2))
    one, ddp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")
    assert_same_steps(one, ddp, [1, 2])
    assert all(m["grad_norm"] > 0 for m in one)
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "final-adapter" / "adapter_model.safetensors") for run in ("one", "ddp"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_failing_rank_stops_the_job(tiny_model_dir, tmp_path):
    start = time.monotonic()
    # the timeout is the bound on the job's time: at 30 s, a rank 0 that hung to it ended the job 48 s in, under it
    proc = run(["--model", tiny_model_dir, *COMMON, "--output", tmp_path / "o", "--dist-timeout", 60], nproc=2,
               env={"RPO_ENGINE_TEST_FAIL_AT": "1:2"}, timeout=120)
    assert proc.returncode != 0
    assert "RPO_ENGINE_TEST_FAIL_AT: rank 1 fails at step 2" in proc.stderr
    assert time.monotonic() - start < 60  # rank 0, waiting in a collective, did not hang to the timeout
    assert [m["step"] for m in read_metrics(tmp_path / "o")] == [0, 1]
    # torchrun's root cause is rank 1's error, not rank 0's collective that lost it
    root = root_cause(proc)
    assert "rank      : 1 (local_rank: 1)" in root and "RPO_ENGINE_TEST_FAIL_AT: rank 1 fails" in root


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_model_dir, tmp_path):
    """SIGUSR1 reaching rank 1 alone, in step 2 (each rank scores its 1 prompt x 4 completions a step): both
    ranks finish step 2, write its checkpoint together and end, each with 128 + SIGUSR1."""
    import signal

    proc = run(["--model", tiny_model_dir, "--output", tmp_path / "o", "--steps", 4, "--save-steps", 0, "--eval-steps", 0,
                "--prompts-per-step", 2, "--num-generations", 4, "--max-completion-length", 16, "--train-size", 2,
                "--reward", "tests.reward_fns:signalling_reward", "--dist-timeout", 60, "--device", "cpu"], nproc=2,
               env={"RPO_ENGINE_TEST_SIGNAL": "USR1", "RPO_ENGINE_TEST_SIGNAL_AT_CALL": "5",
                    "RPO_ENGINE_TEST_SIGNAL_RANK": "1"}, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("SIGUSR1: stopping after this step") == 1
    assert f"stopped by SIGUSR1 after step 2 of 4: {tmp_path / 'o' / 'checkpoints' / 'step-2'} written" in proc.stdout
    assert proc.stderr.count(f"exitcode  : {128 + signal.SIGUSR1}") == 2  # torchrun's summary: both ranks
    assert [m["step"] for m in read_metrics(tmp_path / "o")] == [1, 2]
    assert (tmp_path / "o" / "checkpoints" / "step-2" / "trainer_state.pt").is_file()


def test_torchrun_restarts_a_failed_job_which_resumes_as_if_never_failed(tiny_model_dir, tmp_path):
    """torchrun --max-restarts 1 with --resume: rank 1 fails in step 4 of the first attempt (each rank scores 1
    prompt x 4 completions a step); torchrun starts both ranks again, which resume from the step-2 checkpoint and
    give the steps of a job that never failed. (A restarted gloo group read the first attempt's addresses from
    torchrun's store, and failed to connect.)"""
    flags = ["--model", tiny_model_dir, "--steps", 4, "--save-steps", 2, "--eval-steps", 0, "--prompts-per-step", 2,
             "--num-generations", 4, "--max-completion-length", 16, "--train-size", 2, "--learning-rate", 1e-3,
             "--reward", "tests.reward_fns:first_attempt_failing_reward", "--dist-timeout", 60, "--device", "cpu"]
    env = {"RPO_ENGINE_TEST_FAIL_AT_CALL": "13"}
    whole = check(run([*flags, "--output", tmp_path / "whole"], nproc=2, env=dict(env, RPO_ENGINE_TEST_FAIL_AT_CALL="0")))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
              "-m", "rpo_engine.train", "--no-progress", "--resume", "--output", str(tmp_path / "restarted")]
    proc = check(subprocess.run([*launch, *map(str, flags)], capture_output=True, text=True, timeout=180, cwd=REPO,
                                env=dict(ENV, **env)))
    assert "error: [rank 1] reward function 'tests.reward_fns:first_attempt_failing_reward' raised" in proc.stderr
    assert f"resumed from {tmp_path / 'restarted' / 'checkpoints' / 'step-2'} at step 2 on 2 ranks" in proc.stdout
    assert "done:" in whole.stdout and "done:" in proc.stdout
    assert_same_steps(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "restarted"), [1, 2, 3, 4])


def test_user_error_on_one_rank_is_the_root_cause(tiny_model_dir, tmp_path):
    """A user mistake on rank 1 only: its one line, naming the rank, is what torchrun's summary gives as the
    root cause (not rank 0's traceback of the connection rank 1 closed), and the job ends at once."""
    start = time.monotonic()
    proc = run(["--model", tiny_model_dir, *COMMON, "--reward", "tests.reward_fns:rank_one_failing_reward",
                "--output", tmp_path / "o", "--dist-timeout", 60], nproc=2, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60  # within the timeout: no rank waited it out
    line = ("error: [rank 1] reward function 'tests.reward_fns:rank_one_failing_reward' raised ZeroDivisionError: "
            "rank 1 reward bug (")
    assert line in proc.stderr
    root = root_cause(proc)
    assert "rank      : 1 (local_rank: 1)" in root and "exitcode  : 2" in root
    assert f"traceback : {line}" in root and "Traceback" not in root


def root_cause(proc) -> str:
    """The root-cause section of torchrun's failure summary."""
    return proc.stderr.split("Root Cause (first observed failure):", 1)[1]


def test_bad_launch_is_a_one_line_error(tiny_model_dir, tmp_path):
    proc = run(["--parallel", "zero3", "--output", tmp_path / "o"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --parallel must be ddp or fsdp, got 'zero3'"
    proc = run(["--model", tiny_model_dir, "--prompts-per-step", 3, "--device", "cpu", "--output", tmp_path / "o"],
               nproc=2, timeout=120)
    assert proc.returncode != 0 and not (tmp_path / "o").exists()
    # a rank's line names it (the first to fail can end the other before it reaches its own)
    assert re.search(r"error: \[rank [01]\] --prompts-per-step \(3\) must be divisible by the number of ranks \(2\)",
                     proc.stderr)
    assert "exitcode  : 2" in proc.stderr  # torchrun reports the rank's user-error exit code
    # each rank's one line, not its traceback in torchrun's summary (torchrun's own trace of its launcher stays)
    assert "UserError" not in proc.stderr and "rpo_engine/train.py" not in proc.stderr


def _consolidate_on_two_ranks(rank, rendezvous):
    """One rank of test_fsdp_checkpoint_state_is_built_on_rank_zero_only: an FSDP2 tiny model after one AdamW
    step; its consolidated optimizer state, kept by rank 0 only, with each gathered tensor watched."""
    import weakref

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from rpo_engine import distributed
    from rpo_engine.model import CausalLM, ModelConfig
    from rpo_engine.optim import make_adamw

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(0)
    rank0_weights = CausalLM(config).init_weights(0.02).bfloat16()  # low precision: the masters are saved too
    torch.manual_seed(rank)  # rank 1 loaded other weights (a node's own Hub snapshot or starter model)
    replica = CausalLM(config).init_weights(0.02).bfloat16()
    group = distributed.Dist(rank, 2, 0, "fsdp")
    _, policy = group.wrap(replica, 1.0)
    # every rank trains and rolls out rank 0's weights, as DDP's wrap makes them
    for whole, shard, mine in zip(rank0_weights.parameters(), policy.parameters(), replica.parameters(), strict=True):
        assert torch.equal(mine, whole) and torch.equal(distributed.full_tensor(shard), whole.float())
    optimizer = make_adamw(policy, lr=1e-3, weight_decay=0.0)
    for p in policy.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()

    gathered, most_alive = [], 0
    def watched(t):
        nonlocal most_alive
        whole = full_tensor(t)
        if isinstance(t, DTensor):
            gathered.append(weakref.ref(whole))
            most_alive = max(most_alive, sum(ref() is not None for ref in gathered))
        return whole

    full_tensor, distributed.full_tensor = distributed.full_tensor, watched
    state = distributed.consolidated_optimizer_state(optimizer, low_precision=True, keep=rank == 0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if rank == 0:  # everything whole: exp_avg, exp_avg_sq and a master per parameter
        assert len(gathered) == most_alive == 3 * len(params)
        assert [w.shape for w in state["master_weights"]] == [p.shape for p in params]  # a DTensor's: the whole
        assert all(type(s["exp_avg"]) is torch.Tensor and s["exp_avg"].shape == p.shape
                   for s, p in zip(state["state"].values(), params))
    else:  # joined every gather, held one gathered tensor at a time, built nothing
        assert len(gathered) == 3 * len(params) and most_alive == 1 and state is None
    group.close()  # as the trainer leaves: a barrier first, so no rank shuts gloo down under its peer, and
    distributed.leave_process(0)  # no interpreter teardown, where the group's destructor can abort the process


def test_fsdp_checkpoint_state_is_built_on_rank_zero_only(tmp_path):
    """Consolidating the sharded optimizer state is a collective, but only rank 0 writes it: the other ranks
    keep none of it, not the whole state (and fp32 masters) on every rank's host at every save."""
    torch.multiprocessing.spawn(_consolidate_on_two_ranks, args=(str(tmp_path / "rendezvous"),), nprocs=2)


def _shard_on_two_ranks(rank, rendezvous):
    """One rank of test_fsdp_wrap_never_holds_a_whole_float32_copy: how far this process's peak memory rises while
    Dist.wrap shards a bf16 replica's float32 copy (the model is big enough to stand out of the noise)."""
    import resource

    import torch.distributed as dist

    from rpo_engine import distributed
    from rpo_engine.model import CausalLM, ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8))
    with torch.device("meta"):  # made in bf16: no float32 model passes through the peak before the wrap
        replica = CausalLM(config).bfloat16()
    replica.to_empty(device="cpu").init_weights(0.02)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux counts KiB)
    group = distributed.Dist(rank, 2, 0, "fsdp")
    group.wrap(replica, 1.0)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    whole_float32 = 4 * sum(p.numel() for p in replica.parameters())
    # this rank's half of the float32 copy and a parameter in passing (~0.6), not the whole copy (~1.1)
    assert growth < 0.8 * whole_float32, (growth, whole_float32)
    group.close()
    distributed.leave_process(0)  # as the trainer leaves


def test_fsdp_wrap_never_holds_a_whole_float32_copy(tmp_path):
    """fsdp: each rank keeps its shard of a float32 copy of the model; building the copy whole first, then
    sharding it, would need a whole float32 model per GPU at start-up, twice the bf16 replica beside it."""
    torch.multiprocessing.spawn(_shard_on_two_ranks, args=(str(tmp_path / "rendezvous"),), nprocs=2)


# A bf16 model's update with several micro-batches a rank (each group its own: the budget fits no two) and no
# clipping, so the gradient the step reads is the plain sum.
BF16_UPDATE = ["--dtype", "bfloat16", "--micro-batch-tokens", 24, "--max-grad-norm", 0, "--device", "cpu"]


def _bf16_gradients(model_dir, rank=0, world_size=1, rendezvous=None):
    """The gradients the optimizer's step reads after one bf16 update of 6 groups, on this rank of `world_size`
    (each rank running its share of the groups), as fp32 tensors; with the number of micro-batches run."""
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.optim import params_with_gradients
    from rpo_engine.train import build_trainer
    from tests.test_train import random_groups

    torch.set_num_threads(1)
    group = Dist()
    if world_size > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
        group = Dist(rank, world_size, 0, "ddp")
    trainer = build_trainer(parse_args(["--model", str(model_dir), *map(str, BF16_UPDATE)]), dist=group)
    share = list(group.share(6))
    stats = trainer.update([random_groups(0, min_len=1)[i] for i in share], positions=share)
    grads = [p.grad.float() for p in params_with_gradients(trainer.optimizer)]
    return grads, stats["num_micro_batches"]


def _bf16_gradients_on_two_ranks(rank, rendezvous, model_dir, out):
    from rpo_engine.distributed import Dist, leave_process

    grads, micro_batches = _bf16_gradients(model_dir, rank, 2, rendezvous)
    torch.save((grads, micro_batches), out / f"rank{rank}.pt")
    Dist(rank, 2, 0, "ddp").close()
    leave_process(0)


def test_ddp_sums_bf16_gradients_in_fp32_like_one_process(tiny_model_dir, tmp_path, one_thread):
    """--parallel ddp with bf16 weights: each rank's micro-batches sum into the fp32 masters and the ranks' sums
    are all-reduced in fp32, so the step reads what one process's fp32 sum of the same bf16 backwards gives (up
    to fp32's summation order). DDP's reducer summed and all-reduced them in bf16: ~1e-3 off."""
    want, micro_batches = _bf16_gradients(tiny_model_dir)
    # forked: the ranks start with the modules this process has imported (spawned ones took seconds to import)
    torch.multiprocessing.start_processes(_bf16_gradients_on_two_ranks, nprocs=2, start_method="fork",
                                          args=(str(tmp_path / "rendezvous"), tiny_model_dir, tmp_path))
    (got, micro_0), (other, micro_1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert micro_batches == micro_0 == micro_1 > 6  # every group alone (a larger one split), whatever the ranks
    for g, o, w in zip(got, other, want, strict=True):
        assert torch.equal(g, o)  # every rank steps with the same gradient
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))


def _master_gradients_on_two_ranks(rank, rendezvous):
    """One rank of test_ddp_with_bf16_weights_sums_fp32_master_gradients_itself."""
    import torch.distributed as dist

    from rpo_engine import distributed
    from rpo_engine.model import CausalLM, ModelConfig
    from rpo_engine.optim import make_adamw, params_with_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(rank)  # the ranks start apart: the wrap gives every rank rank 0's weights
    model = CausalLM(config).init_weights(0.02).bfloat16()
    group = distributed.Dist(rank, 2, 0, "ddp")
    assert group.sums_master_gradients(model)
    _, policy = group.wrap(model, 1.0)
    assert type(policy) is distributed.PolicyForward  # no DDP reducer to all-reduce the bf16 gradients
    torch.manual_seed(0)
    rank_zero = CausalLM(config).init_weights(0.02).bfloat16()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), rank_zero.parameters(), strict=True))

    optimizer = make_adamw(policy, lr=1e-3, weight_decay=0.0, fp32_grad_accumulation=True)
    masters = params_with_gradients(optimizer)
    for i, m in enumerate(masters):  # rank 0: every other one has no gradient; rank 1: the last has none either
        if (rank == 0 and i % 2) or i == len(masters) - 1:
            continue
        m.grad = torch.full_like(m, 1 + 2 ** -12 * (rank + 1))  # an fp32 sum of 2 + 3 * 2**-12 (bf16's is 2)
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: calls.append(t.numel()) or all_reduce(t, *a, **k)
    distributed.COALESCED_BUCKET_BYTES = 16 * 1024  # a few buckets for this model's ~10k fp32 gradients
    group.sum_gradients(masters)
    for i, m in enumerate(masters[:-1]):
        assert torch.equal(m.grad, torch.full_like(m, 1 + 2 ** -12 * 2 if i % 2 else 2 + 3 * 2 ** -12)), i
    assert masters[-1].grad is None  # no rank had one: as in one process, AdamW leaves it be
    assert 1 < len(calls) < len(masters) and sum(calls) == sum(m.numel() for m in masters) + len(masters)
    group.close()
    distributed.leave_process(0)


def test_ddp_with_bf16_weights_sums_fp32_master_gradients_itself(tmp_path):
    """--parallel ddp with bf16 weights has no DDP wrapper (its reducer would sum bf16 .grad): the wrap broadcasts
    rank 0's weights as DDP's does, and Dist.sum_gradients sums the fp32 masters' gradients over the ranks in a few
    flat collectives, a rank without a gradient joining with zeros."""
    torch.multiprocessing.start_processes(_master_gradients_on_two_ranks, args=(str(tmp_path / "rendezvous"),),
                                          nprocs=2, start_method="fork")


def test_ddp_buffer_sync_keyword_follows_the_torch_version():
    """torch 2.13 takes forward_sync_buffers (broadcast_buffers=False is deprecated there); the 2.11 on the
    GPU image knows only broadcast_buffers, and an unknown keyword would stop DDP at construction."""
    from torch.nn.parallel import DistributedDataParallel

    from rpo_engine.distributed import no_forward_buffer_sync

    class OldDDP:  # the torch <= 2.12 signature's buffer keyword
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    assert no_forward_buffer_sync(OldDDP) == {"broadcast_buffers": False}
    expected = no_forward_buffer_sync(DistributedDataParallel)
    assert set(expected) <= set(inspect.signature(DistributedDataParallel.__init__).parameters)


def test_shares_of_the_ranks_cover_every_item_once_in_order():
    """Dist.share on any world size, n not a multiple of it too (an eval set's rows, a resample round): contiguous
    shares in rank order that cover range(n) once, sizes at most one apart."""
    from rpo_engine.distributed import Dist

    for world_size in (1, 2, 3, 4):
        for n in range(10):
            shares = [Dist(rank, world_size, 0, "ddp").share(n) for rank in range(world_size)]
            assert [i for share in shares for i in share] == list(range(n)), (world_size, n)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_coalesced_runs_the_collective_on_every_tensor_once_in_place(monkeypatch):
    """Mixed dtypes and a bucket limit that splits them: each tensor comes back from the collective (here x2 + 1,
    which a tensor run twice or left out would show), in place, whatever bucket it went in."""
    from rpo_engine import distributed

    monkeypatch.setattr(distributed, "COALESCED_BUCKET_BYTES", 64)
    tensors = [torch.arange(n, dtype=dtype).reshape(-1, 1) for n, dtype in
               [(3, torch.float32), (20, torch.float32), (5, torch.float64), (4, torch.float32), (1, torch.float64)]]
    want = [t * 2 + 1 for t in tensors]
    storages = [t.data_ptr() for t in tensors]
    calls = []
    distributed.coalesced(lambda flat: calls.append(flat.numel()) or flat.mul_(2).add_(1), tensors)
    for t, w, ptr in zip(tensors, want, storages):
        assert t.data_ptr() == ptr and torch.equal(t, w)
    assert len(calls) > 2 and sum(calls) == sum(t.numel() for t in tensors)


def test_dist_timeout_beyond_torch_timers_is_a_one_line_error():
    """gloo's timers overflow far past 1e9 s: --dist-timeout 9e9 hung the job at start, 1e10 failed it, 1e15 was an
    OverflowError traceback; a user meaning "no timeout" gets the bound instead."""
    from rpo_engine.config import config_from_dict
    from rpo_engine.errors import UserError

    assert config_from_dict({"dist_timeout": 1e9}).dist_timeout == 1e9
    for value in (9e9, 1e15):
        with pytest.raises(UserError, match=r"--dist-timeout must be > 0 and at most 1e9 seconds .*, got "):
            config_from_dict({"dist_timeout": value})


def test_rank_variables_without_torchrun_are_a_one_line_error(monkeypatch):
    """RANK and WORLD_SIZE left set (a job script, an export) without torchrun's MASTER_ADDR: torch's ValueError
    traceback was all a plain `python -m rpo_engine.train` gave."""
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR expected.*launch with torchrun, or unset them"):
        Dist.from_env("ddp", "cpu", 60)


def test_more_ranks_than_gpus_is_a_one_line_error(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine: rank 1 names the mistake, not CUDA's invalid device ordinal."""
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"local rank 1 has no GPU of its own: this machine shows 1; .*--nproc-per-node"):
        Dist.from_env("ddp", "cuda", 60)


def test_ranks_part_before_rank_zero_uploads_to_the_hub(tiny_model_dir, tmp_path, monkeypatch):
    """--push-to-hub: the other ranks' last wait (Dist.close's barrier, bounded by --dist-timeout) ends before rank
    0 uploads final/; an upload longer than the timeout (a large model, a slow link) failed their barrier, and
    torchrun then stopped rank 0 in the middle of it."""
    from rpo_engine import hub, train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist

    calls = []

    class WatchedDist(Dist):
        def close(self):
            calls.append("close")

    monkeypatch.setattr(hub, "create_push_repo", lambda repo_id, private: f"me/{repo_id}")
    monkeypatch.setattr(hub, "push_folder", lambda repo, folder, message: calls.append("push") or "url")
    monkeypatch.setattr(train, "write_plot", lambda *args: None)
    config = parse_args(list(map(str, ["--model", tiny_model_dir, "--no-progress", "--prompts-per-step", 1,
                                       "--num-generations", 2, "--max-completion-length", 4, "--train-size", 1,
                                       "--eval-size", 1, "--eval-steps", 0, "--steps", 1, "--push-to-hub",
                                       "--output", tmp_path / "run"])))
    assert train.train(config, WatchedDist()) == 0
    assert calls[:2] == ["close", "push"]


def _reference_on_two_ranks(rank, rendezvous, model_dir, out):
    """One rank of test_a_resumed_runs_kl_reference_is_rank_zeros: a Trainer given a KL reference (a resume loads
    it on each rank) whose weights differ on rank 1; the reference it keeps, saved for the test."""
    import torch.distributed as dist

    import rpo_engine
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist, leave_process
    from rpo_engine.train import load_rows, resolve_reward
    from rpo_engine.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    group = Dist(rank, 2, 0, "ddp")
    config = parse_args(["--model", str(model_dir), "--beta", "0.04", "--device", "cpu", "--no-progress"])
    model, reference = rpo_engine.load_model(model_dir), rpo_engine.load_model(model_dir)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(rank)  # rank 1 loaded another starting model (a node's own snapshot)
    trainer = Trainer(config, model, rpo_engine.load_tokenizer(model_dir), *load_rows(config), resolve_reward(config),
                      torch.device("cpu"), group, reference=reference)
    torch.save([p.detach().clone() for p in trainer.reference.parameters()], out / f"reference{rank}.pt")
    group.close()
    leave_process(0)


def test_a_resumed_runs_kl_reference_is_rank_zeros(tiny_model_dir, tmp_path, one_thread):
    """A resumed run loads the KL reference (the starting model) on each rank; every rank keeps rank 0's, as the
    policy starts from rank 0's weights, so the KL term is the same on every rank."""
    import rpo_engine

    torch.multiprocessing.start_processes(_reference_on_two_ranks, nprocs=2, start_method="fork",
                                          args=(str(tmp_path / "rendezvous"), tiny_model_dir, tmp_path))
    first, second = (torch.load(tmp_path / f"reference{r}.pt") for r in range(2))
    for a, b, loaded in zip(first, second, rpo_engine.load_model(tiny_model_dir).parameters(), strict=True):
        assert torch.equal(a, loaded) and torch.equal(b, loaded)
