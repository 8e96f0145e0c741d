"""Host time per decode step: what RolloutEngine does on the CPU around the model forward.

That is scheduling, block bookkeeping, the block-table and attention-metadata build, the sampler's
inputs and appending the sampled tokens. Here the forward is replaced by zero logits, so only that
host work is timed (plus sampling a 512-token vocabulary on the CPU). On a GPU a decode step ends in one
host sync (the sampled tokens), so this time is added to every step's device time: compare it with
`decode_step_ms` in rollout_cuda.json. Not counted: on CUDA, the copies into the CUDA graph's input
buffers and the graph launch. The engine is built on the CPU, on a GPU box too, with TRITON_INTERPRET=1
set here: RolloutEngine asks for it for the Triton backend off CUDA, but with the forward replaced no
kernel runs, so the interpreter never does.

Cases: 64 and 256 sequences (8 samples of each prompt) at 1k and 4k tokens of context, 128 new tokens,
a 150k-block cache (about what bench_rollout --gpu gives a 1.5B model: 90% of an H100, 448 KiB a
block), for the metadata of the Triton decode kernel (the CUDA path), of the same with
triton_cascade=True, and of the torch cascade path (the CPU one); and the torch path again with two stop
strings that never occur (SamplingParams.stop, read in the built-in task tokenizer's text): their
reading's cost a step. `torch_stop`: tokens uniform over that byte-level vocabulary, a quarter of them
pieces of characters (a worst case: real text seldom cuts a character); `torch_stop_text`: whole
characters only. --baseline-src DIR runs the same cases on another checkout of the package (e.g. a git
worktree of an older commit) in a subprocess of the same run, so both appear side by side. A case's engines
(and the baseline's) are all built first, then timed in turns: each round one generate call of each, the
order turned every round; medians over the rounds. Writes benchmarks/results/host_cpu.json.
"""
import argparse, datetime, json, os, statistics, subprocess, sys, time  # noqa: E401
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: see the docstring (no kernel runs)

import torch  # noqa: E402

import rpo_engine  # noqa: E402
from common import (arg_parser, cli, git_commit, git_head, machine, out_path, positive_int, save_json,  # noqa: E402
                    time_alternating)
from rpo_engine.errors import UserError  # noqa: E402
from rpo_engine.model import CausalLM, ModelConfig  # noqa: E402
from rpo_engine.rollout import RolloutEngine, SamplingParams  # noqa: E402

CASES = [(64, 1024), (64, 4096), (256, 1024), (256, 4096)]  # (sequences, context tokens)
SAMPLES, NEW_TOKENS, NUM_BLOCKS, VOCAB = 8, 128, 150_000, 512


def host_only(runner, logits):
    """runner.run without the forward: prepare the step's inputs and metadata (with triton_cascade also the
    cascade programs a CUDA graph replay fills), return `logits` (a [vocab] row) for every sequence."""
    def run(seqs, is_prefill, copies, input_ids=None):
        with torch.inference_mode():  # as ModelRunner.run prepares them (a baseline checkout's, too: conservative)
            if is_prefill:
                runner._prepare_prefill(seqs)
                return logits.expand(len(seqs), -1)
            _, _, meta = runner._prepare_decode(seqs)
            if getattr(runner, "triton_cascade", False) and meta.group_tables is not None:
                runner._cascade_programs(meta)  # what a graph replay makes (or reuses) before filling its buffers
            return logits.expand(len(seqs), -1)
    return run


BACKENDS = ("triton", "triton_cascade", "torch", "torch_stop", "torch_stop_text")


def build(num_seqs, context, backend):
    """`backend`'s engine for the case, its forward replaced (host_only), warmed up. -> a function that runs one
    generate call: (its seconds, the seconds of each of its decode steps); None where this checkout's engine
    lacks the backend (a baseline from before triton_cascade or stop strings)."""
    vocab, stop, extra = VOCAB, None, {}
    if backend == "triton_cascade":
        extra = dict(triton_cascade=True)
    if backend.startswith("torch_stop"):
        from rpo_engine.data.tokenizer import build_task_tokenizer

        extra = dict(tokenizer=build_task_tokenizer())
        vocab, stop = len(extra["tokenizer"]), ["never in this text \u20ac", "zzzz"]
    logits = torch.zeros(vocab)
    if backend == "torch_stop_text":  # only tokens that are whole characters, as text mostly is
        pieces = [i for i in range(vocab) if "\ufffd" in extra["tokenizer"].decode([i])]
        logits[pieces] = float("-inf")
    config = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=8192)
    try:
        engine = RolloutEngine(CausalLM(config).eval(), attention_backend=backend.split("_")[0],
                               num_blocks=NUM_BLOCKS, max_num_seqs=256, **extra)
    except TypeError:  # a baseline checkout from before triton_cascade (or stop strings)
        return None
    engine.runner.run = host_only(engine.runner, logits)
    step, decode_times = engine.step, []

    def timed_step():
        decode_steps = engine.stats.decode_steps
        start = time.perf_counter()
        finished = step()
        if engine.stats.decode_steps > decode_steps:
            decode_times.append(time.perf_counter() - start)
        return finished

    engine.step = timed_step
    g = torch.Generator().manual_seed(0)
    prompt_len = context - NEW_TOKENS
    prompts = torch.randint(3, vocab, (num_seqs // SAMPLES, prompt_len), generator=g).tolist()
    params = SamplingParams(n=SAMPLES, max_new_tokens=NEW_TOKENS, stop_token_ids=[], seed=0,
                            **(dict(stop=stop) if stop else {}))
    engine.generate(prompts, params)  # warm-up

    def run():
        decode_times.clear()
        start = time.perf_counter()
        engine.generate(prompts, params)
        return time.perf_counter() - start, list(decode_times)
    return run


def row(num_seqs, context, backend, runs):
    """A backend's row from its timed calls' (seconds, decode step seconds); None for a backend it lacks."""
    if runs is None:
        return None
    decode_times = [t for _, steps in runs for t in steps]
    return dict(num_seqs=num_seqs, context=context, backend=backend, decode_steps=len(decode_times),
                host_ms_per_decode_step=1e3 * statistics.median(decode_times),
                host_s_per_call=statistics.median(call for call, _ in runs))


class Baseline:
    """This script on another checkout's rpo_engine, in a subprocess (`--serve`) that builds a case's engines and
    times one generate call at a time when asked: its calls take turns with ours."""

    def __init__(self, src, threads):
        env = {**os.environ, "PYTHONPATH": str(src)}  # its rpo_engine before the installed one
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--threads", str(threads)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=Path(__file__).parent)

    def ask(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:  # its rpo_engine may print lines of its own
            if line.startswith("REPLY "):
                return json.loads(line[6:])
        sys.exit(f"baseline run failed (exit code {self.proc.wait()}); its errors are above")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve():
    """--serve: build a case's engines (["build", seqs, context] -> the backends built), run one call
    (["run", backend] -> [seconds, decode step seconds]), one JSON request a line on stdin, until it closes."""
    engines = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request[0] == "build":
            engines.clear()  # the last case's K/V caches go before this case's are made
            engines = {b: run for b in BACKENDS if (run := build(request[1], request[2], b)) is not None}
            reply = list(engines)
        else:
            reply = engines[request[1]]()
        print("REPLY " + json.dumps(reply), flush=True)


def measure_all(repeats, cases, baseline=None):
    """Each case's backends, here and (`baseline`, a Baseline) on the other checkout, one generate call of each a
    round in turns (time_alternating). -> (our rows, the baseline's rows or None)."""
    rows, base_rows = [], ([] if baseline else None)
    for num_seqs, context in cases:
        calls = {("here", b): run for b in BACKENDS if (run := build(num_seqs, context, b)) is not None}
        if baseline:
            for b in baseline.ask(["build", num_seqs, context]):
                calls["baseline", b] = lambda b=b: baseline.ask(["run", b])
        timings = time_alternating(calls, repeats, warmup=0)  # build warmed each engine up
        del calls  # our engines' K/V caches, before the next case's
        for side, out in (("here", rows), ("baseline", base_rows)):
            if out is None:
                continue
            for b in BACKENDS:
                out.append(row(num_seqs, context, b, timings[side, b]["results"] if (side, b) in timings else None))
                if side == "here" and out[-1] is not None:
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out[-1].items()}),
                          flush=True)
    return rows, base_rows


def parse_cases(text):
    """--cases "64x1024,256x4096": sequences (a multiple of SAMPLES) x context tokens (more than NEW_TOKENS)."""
    cases = []
    for case in text.split(","):
        seqs, _, context = case.partition("x")
        if not (seqs.isdigit() and context.isdigit() and int(seqs) % SAMPLES == 0 and int(seqs) > 0
                and int(context) > NEW_TOKENS):
            raise argparse.ArgumentTypeError(f"{case!r} is not SEQUENCESxCONTEXT, sequences a positive multiple of "
                                             f"{SAMPLES} (samples per prompt), context more than {NEW_TOKENS} tokens")
        cases.append((int(seqs), int(context)))
    return cases


def main(argv=None):
    ap = arg_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=positive_int, default=3, help="generate calls per case (each ~128 decode steps)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    ap.add_argument("--cases", type=parse_cases, default=CASES, help="e.g. 64x1024,256x4096")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="another checkout of the repository: the same cases run on its rpo_engine too")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the baseline subprocess
    ap.add_argument("--out", type=out_path, default=None, help="JSON path (default: benchmarks/results/host_cpu.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = args.cases
    if args.baseline_src and not (args.baseline_src / "rpo_engine" / "__init__.py").is_file():
        raise UserError(f"--baseline-src {args.baseline_src}: not a checkout of this repository (no rpo_engine/)")
    if args.serve:
        return serve()
    if Path(rpo_engine.__file__).resolve().parents[1] != Path(__file__).resolve().parents[1]:
        sys.exit(f"rpo_engine is imported from {rpo_engine.__file__}, not this checkout: pip install -e .")
    result = dict(benchmark="host", machine=machine("cpu"), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  git_commit=git_commit(), torch=torch.__version__, threads=args.threads,
                  settings=dict(samples_per_prompt=SAMPLES, new_tokens=NEW_TOKENS, num_blocks=NUM_BLOCKS, vocab=VOCAB,
                                repeats=args.repeats),
                  load_average_1_5_15=os.getloadavg())
    baseline = Baseline(args.baseline_src.resolve(), args.threads) if args.baseline_src else None
    result["rows"], base_rows = measure_all(args.repeats, cases, baseline)
    if baseline:
        baseline.close()
        src = args.baseline_src.resolve()
        result["baseline"] = dict(src=str(src), git_commit=git_head(src) or "unknown", rows=base_rows)
        for ours, base in zip(result["rows"], base_rows):
            if ours is not None and base is not None:
                ours["baseline_host_ms_per_decode_step"] = base["host_ms_per_decode_step"]
                ours["speedup"] = base["host_ms_per_decode_step"] / ours["host_ms_per_decode_step"]
    save_json(args.out or Path(__file__).parent / "results" / "host_cpu.json", result)


if __name__ == "__main__":
    cli(main)
