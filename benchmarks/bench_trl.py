"""GRPO step time against TRL's GRPOTrainer: same checkpoint, rows, group size, budget and reward, one process.

Seven runs, one after the other in this process, on the built-in starter model (--model: another) and arithmetic task:
  trl         TRL GRPOTrainer (transformers generate, no vLLM), loss_type="grpo", beta=0
  trl_engine  the same TRL trainer with rollout_func=rpo_engine.integrations.trl.TRLRollout(): our rollout engine
              on TRL's live weights, everything else TRL's
  trl_rpo     the same with rollout_func=RPORollout() (its cache kept by the exact reward): RPO inside TRL
  trl_shared, trl_rpo_shared  trl_engine and trl_rpo in SharedPrefixGRPOTrainer: TRL's trainer whose log-prob
              passes run each group's shared prefix (prompt, and RPO's kept path) once
  full        python -m rpo_engine.train --no-rpo   (full-path GRPO: our rollout engine + fused kernels)
  rpo         python -m rpo_engine.train --rpo      (suffixes from cached paths)
Settings shared by all: B prompts x G samples per step, one optimizer step per rollout batch
(TRL: per_device_train_batch_size = B*G, steps_per_generation = 1), max_completion_length, temperature
1, top_p 1, top_k 0, learning rate, no KL, no gradient checkpointing, the exact-answer reward (0/1; our
length-aware shaping off). --train-size is 2*B by default so every prompt recurs: the first epoch
(train_size/B steps: warm-up for all, RPO's cold starts) is dropped and medians are over the rest.
Each system runs --passes times, the order reversed every other pass, and medians pool the passes; the JSON's
run_order lists each pass's order and `timing` says how many passes there were (one: no alternation at all).
Reported per system: median seconds per step (split into rollout and update; TRL's rollout is its
`_generate` call, rollout_func's included; ours also scores rewards), median seconds per step per 1k generated tokens, reward
(mean of the measured steps, last step), and greedy eval accuracy of the final weights, all measured
by our engine on the same held-out rows.
Writes benchmarks/results/trl_<cpu|cuda>.json (or --out); until the last run has finished, trl_<...>.partial.json
with the systems' results so far (what a time limit leaves). A TRL-hosted system failing fails nothing: errors
says why (trl_error: the trl system's), the later passes leave that system out, and the others still run.
The TRL systems need `pip install -e ".[bench]"` (TRL and datasets); full and rpo alone do not.
"""
import datetime, json, os, statistics, tempfile, time, traceback  # noqa: E401
from pathlib import Path

import torch

import rpo_engine
from common import arg_parser, check_gpu, cli, git_commit, machine, out_path, positive_int, save_json
from rpo_engine.config import parse_args
from rpo_engine.data.arithmetic import make_split
from rpo_engine.data.starter import ensure_starter_model
from rpo_engine.errors import UserError
from rpo_engine.rewards import exact_answer_reward
from rpo_engine.rollout import RolloutEngine
from rpo_engine.train import main as train_main
from rpo_engine.trainer import encode_prompt, evaluate_accuracy, stop_ids

SYSTEMS = ("trl", "trl_engine", "trl_rpo", "trl_shared", "trl_rpo_shared", "full", "rpo")
# TRL's trainer: the trl package needed, its failure recorded, not raised
TRL_SYSTEMS = ("trl", "trl_engine", "trl_rpo", "trl_shared", "trl_rpo_shared")


def run_trl(model_dir, rows, args, device, output, system):
    """A TRL-hosted system (TRL_SYSTEMS) for args.steps steps; per step: wall time, generated tokens, mean reward.
    An RPORollout's generated tokens are its own count (cold starts and suffixes), not the completions' length
    (which includes the kept prefixes)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rpo_engine.integrations.trl import RPORollout, SharedPrefixGRPOTrainer, TRLRollout

    # TRL's generation backend hook (None: its own transformers generate), and the trainer class
    rollout_func = {"trl": None, "trl_engine": TRLRollout(), "trl_shared": TRLRollout()}.get(system)
    rollout_func = RPORollout(seed=args.seed) if system.startswith("trl_rpo") else rollout_func
    trainer_class = SharedPrefixGRPOTrainer if system.endswith("_shared") else GRPOTrainer

    steps, current = [], {}
    counted = {"generated": 0}  # an RPORollout's count at the last step

    def exact_reward(completions, answer, completion_ids, **kwargs):  # TRL's reward signature
        rewards = [exact_answer_reward(c, a) for c, a in zip(completions, answer)]
        tokens = sum(len(ids) for ids in completion_ids)
        if isinstance(rollout_func, RPORollout):
            tokens = rollout_func.counters["generated_tokens"] - counted["generated"]
            counted["generated"] = rollout_func.counters["generated_tokens"]
        current.update(tokens=tokens, reward=statistics.mean(rewards))
        return rewards

    class StepTimer(TrainerCallback):  # generation happens inside the step (steps_per_generation=1)
        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            current.clear()
            current["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - current["t0"]
            steps.append(dict(step_time_s=step_time, generated_tokens=current["tokens"], reward_mean=current["reward"],
                              rollout_time_s=current["generate_s"], update_time_s=step_time - current["generate_s"]))

    gpu = device == "cuda"
    config = GRPOConfig(
        output_dir=str(output), max_steps=args.steps, seed=args.seed, learning_rate=args.learning_rate,
        num_generations=args.num_generations, per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_completion_length, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group", gradient_checkpointing=False,
        use_cpu=not gpu, bf16=gpu, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Same weights dtype as ours: fp32 on CPU, bf16 on CUDA.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    if rollout_func is not None:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    rewards = rollout_func.tracked(exact_reward) if isinstance(rollout_func, RPORollout) else exact_reward
    trainer = trainer_class(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()], rollout_func=rollout_func)
    generate = trainer._generate  # TRL's generation call, timed to split the step like ours

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        if device == "cuda":
            torch.cuda.synchronize()
        current["generate_s"] = current.get("generate_s", 0.0) + time.perf_counter() - start
        return out

    trainer._generate = timed_generate
    trainer.train()
    trainer.model.save_pretrained(output / "final")
    tokenizer.save_pretrained(output / "final")
    return steps, output / "final"


def ours_argv(rpo, args, device, output):
    """rpo_engine.train's flags for our systems: the settings shared with TRL."""
    return ["--rpo" if rpo else "--no-rpo", *(["--model", str(args.model)] if args.model else []), "--device", device,
            "--seed", str(args.seed), "--steps", str(args.steps), "--train-size", str(args.train_size),
            "--prompts-per-step", str(args.prompts_per_step), "--num-generations", str(args.num_generations),
            "--max-completion-length", str(args.max_completion_length), "--learning-rate", str(args.learning_rate),
            "--reward", "exact", "--no-length-shaping", "--eval-steps", "0", "--save-steps", "0",
            "--no-progress", "--output", str(output)]


def run_ours(rpo, args, device, output):
    train_main(ours_argv(rpo, args, device, output))
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [dict(step_time_s=r["step_time_s"], generated_tokens=r["rollout_generated_tokens"],
                 reward_mean=r["reward_mean"], cache_hit_rate=r["cache_hit_rate"],
                 rollout_time_s=r["rollout_time_s"], update_time_s=r["update_time_s"]) for r in records
            if "reward_mean" in r], output / "final"


def eval_accuracy(model_dir, eval_rows, args, device):
    """Greedy accuracy on the held-out rows, every model through the same engine and prompts."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = rpo_engine.load_model(model_dir, dtype=dtype, device=device)
    tokenizer = rpo_engine.load_tokenizer(model_dir)
    prompt_ids = [encode_prompt(tokenizer, r, 10**6) for r in eval_rows]
    eos = stop_ids(model, tokenizer)
    return evaluate_accuracy(RolloutEngine(model), tokenizer, eval_rows, exact_answer_reward, prompt_ids,
                             args.max_completion_length, eos)


def summarize(name, passes, skip):
    """passes: one list of step records per pass; each pass drops its first `skip` steps."""
    measured = [s for steps in passes for s in (steps[skip:] or steps)]
    return dict(system=name, measured_steps=len(measured),
                median_step_time_s=statistics.median(s["step_time_s"] for s in measured),
                median_generated_tokens=statistics.median(s["generated_tokens"] for s in measured),
                median_s_per_step_per_1k_tokens=statistics.median(
                    s["step_time_s"] / (s["generated_tokens"] / 1000) for s in measured if s["generated_tokens"]),
                median_rollout_time_s=statistics.median(s["rollout_time_s"] for s in measured),
                median_update_time_s=statistics.median(s["update_time_s"] for s in measured),
                reward_mean_measured=statistics.mean(s["reward_mean"] for s in measured),
                reward_last_step=[steps[-1]["reward_mean"] for steps in passes], passes=passes)


def results_so_far(systems, steps, evals, skip):
    """summarize's row, with the final eval accuracies, for each system that has finished a pass."""
    return [dict(summarize(name, steps[name], skip), final_eval_accuracy=evals[name])
            for name in systems if steps[name]]


def main(argv=None):
    ap = arg_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", default=torch.cuda.is_available())
    ap.add_argument("--cpu", dest="gpu", action="store_false")
    ap.add_argument("--model", type=Path, default=None,
                    help="model directory (default: the starter model, built if missing)")
    ap.add_argument("--steps", type=positive_int, default=6)
    ap.add_argument("--prompts-per-step", type=positive_int, default=4)
    ap.add_argument("--num-generations", type=positive_int, default=8)
    ap.add_argument("--max-completion-length", type=positive_int, default=320)
    ap.add_argument("--train-size", type=positive_int, default=None, help="default: 2 x prompts-per-step")
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--eval-size", type=positive_int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", type=positive_int, default=2, help="runs per system; even passes go in reverse order")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--out", type=out_path, default=None)
    args = ap.parse_args(argv)
    check_gpu(args.gpu)
    trl_version = None
    if set(TRL_SYSTEMS) & set(args.systems):  # only those systems need TRL; full and rpo run without it
        try:
            import datasets, trl  # noqa: E401, F401
        except ImportError as e:
            raise UserError(f"--systems {' '.join(TRL_SYSTEMS)} need the {e.name or 'trl'} package: pip install -e "
                            f"\".[bench]\" (or leave them out of --systems)") from None
        trl_version = trl.__version__
    device = "cuda" if args.gpu else "cpu"
    args.train_size = args.train_size or 2 * args.prompts_per_step
    skip = min(args.steps - 1, -(-args.train_size // args.prompts_per_step))  # the first epoch
    if args.model is not None and not args.model.is_dir():
        raise UserError(f"--model {args.model}: model directory not found")
    parse_args(ours_argv(True, args, device, Path("unused")))  # the trainer's checks of the shared settings, up front
    model_dir = args.model = args.model or ensure_starter_model()
    rows = make_split("train", args.train_size, args.seed)  # what rpo_engine.train loads for --train-size/--seed
    eval_rows = make_split("eval", args.eval_size, args.seed)
    initial = eval_accuracy(model_dir, eval_rows, args, device)
    steps, evals = {name: [] for name in args.systems}, {name: [] for name in args.systems}
    record = dict(benchmark="trl", device=device, machine=machine(device),
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  git_commit=git_commit(),
                  torch=torch.__version__, trl=trl_version, threads=torch.get_num_threads(),
                  load_average_1_5_15=os.getloadavg(), model=str(model_dir.name),
                  settings=dict(steps=args.steps, passes=args.passes, measured_from_step=skip + 1, prompts_per_step=args.prompts_per_step,
                                num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                                train_size=args.train_size, learning_rate=args.learning_rate, seed=args.seed,
                                eval_size=args.eval_size, reward="exact answer, 0/1"),
                  initial_eval_accuracy=initial, trl_error=None, errors={}, ratios={}, results=[],
                  timing=("one pass: each system ran once, one after another in run_order, so drift on the machine "
                          "between them is not averaged out (--passes 2 or more alternates the order)"
                          if args.passes == 1 else f"{args.passes} passes, the order reversed every other pass "
                          "(run_order); medians pool the passes"),
                  run_order=[])
    out = args.out or Path(__file__).parent / "results" / f"trl_{device}.json"
    with tempfile.TemporaryDirectory() as tmp:
        # A shared box drifts over minutes: alternate the order (A B C, C B A, ...) so drift hits all alike.
        for p in range(args.passes):
            record["run_order"].append([])
            for name in args.systems if p % 2 == 0 else args.systems[::-1]:
                if name in record["errors"]:
                    continue  # it would fail again, in time the other systems need
                record["run_order"][-1].append(name)
                output = Path(tmp) / f"{name}-{p}"
                try:
                    if name in TRL_SYSTEMS:
                        run, final = run_trl(model_dir, rows, args, device, output, name)
                    else:
                        run, final = run_ours(name == "rpo", args, device, output)
                    accuracy = eval_accuracy(final, eval_rows, args, device)
                except Exception as e:  # noqa: BLE001 -- a TRL system's failure is recorded; full's and rpo's raise
                    if name not in TRL_SYSTEMS:
                        raise
                    traceback.print_exc()
                    # each TRL-hosted system on its own: our rollout failing in TRL leaves TRL's baseline running
                    record["errors"][name] = f"{type(e).__name__}: {e}"
                    record["trl_error"] = record["errors"].get("trl")
                    continue
                steps[name].append(run)
                evals[name].append(accuracy)
                print(f"pass {p} {name}: median step {statistics.median(s['step_time_s'] for s in run[skip:]):.2f}s",
                      flush=True)
                record["load_average_1_5_15"] = os.getloadavg()
                record["results"] = results_so_far(args.systems, steps, evals, skip)
                save_json(out, record, partial=True)  # after every run: a time limit keeps what was measured
    for row in record["results"]:
        print(f"{row['system']:10s} median step {row['median_step_time_s']:.2f}s "
              f"(rollout {row['median_rollout_time_s']:.2f}s, update {row['median_update_time_s']:.2f}s), "
              f"gen tokens/step {row['median_generated_tokens']:.0f}, s/step per 1k tokens {row['median_s_per_step_per_1k_tokens']:.3f}, "
              f"reward {row['reward_mean_measured']:.3f}, eval {initial:.3f} -> {row['final_eval_accuracy']}")
    by = {r["system"]: r for r in record["results"]}
    ratios = record["ratios"]
    if "trl" in by:
        if "trl_engine" in by:  # the same trainer, the rollout swapped
            ratios["trl_engine_vs_trl_rollout_time"] = (by["trl_engine"]["median_rollout_time_s"]
                                                        / by["trl"]["median_rollout_time_s"])
        for name in SYSTEMS[1:]:
            if name in by:  # < 1: we are faster
                ratios[f"{name}_vs_trl_step_time"] = by[name]["median_step_time_s"] / by["trl"]["median_step_time_s"]
                ratios[f"{name}_vs_trl_time_per_token"] = (by[name]["median_s_per_step_per_1k_tokens"]
                                                           / by["trl"]["median_s_per_step_per_1k_tokens"])
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    save_json(out, record)


if __name__ == "__main__":
    cli(main)
