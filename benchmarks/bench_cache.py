"""What RPO's experience cache costs at dataset scale: host memory, checkpoint save and load, per-step operations.

A cache is filled with N prompts' L-token paths, each with its sampling log-probs (float32 values, as the rollout
engine gives them), token ids uniform over a 152k vocabulary (Qwen2.5's), as a run over a DAPO-Math-17k-sized
(N=17k) or OpenR1-Math-sized (N~100k) dataset leaves it once every prompt has a path of ~L tokens. Measured, each
case in a fresh process (its memory is its own):
- `rss_mib`: the process's resident memory added by the filled cache;
- `save_s`, `file_mib`: what a checkpoint's trainer_state.pt spends on the cache: the digests of the prompts
  (Trainer.prompt_keys, 256-token prompts) + ExperienceCache.state_dict, then torch.save of it to a file;
- `load_s`: torch.load(weights_only=True, mmap=True) as read_trainer_state reads it + the digests again +
  ExperienceCache.load_state_dict with the vocabulary check (check_saved_paths), as Trainer.load_state_dict does;
  `load_rss_mib`: the resumed process's resident memory added by the restored cache, `load_peak_rss_mib` at its
  peak (the loaded state and the cache made from it at once);
- `step_ms`: one step's cache work for B=512 prompts (DAPO's batch): get, cut_cached_path (least-likely, on the
  log-probs), the kept prefix and its log-probs sliced out, then choose + apply of an L-token answer and note_group.
--baseline-src DIR runs the same cases on another checkout's rpo_engine (e.g. `git worktree add /tmp/cache_old
<commit>`) in subprocesses of the same run, side by side: each case on both before the next, which side first
turned case by case. Writes benchmarks/results/cache_cpu.json.
"""
import argparse, datetime, json, os, random, subprocess, sys, tempfile, time  # noqa: E401
from pathlib import Path
from types import SimpleNamespace

import numpy
import torch

from common import arg_parser, cli, git_commit, git_head, machine, out_path, rotated, save_json

VOCAB, PROMPT_TOKENS, BATCH, GROUP = 152_064, 256, 512, 8
CASES = [(17_000, 1024), (17_000, 4096), (100_000, 4096)]


def parse_cases(text: str) -> list[tuple[int, int]]:
    try:
        cases = [tuple(int(x) for x in case.split("x")) for case in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PROMPTSxTOKENS[,...], e.g. 17000x4096, got {text!r}") from None
    if any(len(c) != 2 or min(c) < 1 for c in cases):
        raise argparse.ArgumentTypeError(f"expected PROMPTSxTOKENS[,...] of positive numbers, got {text!r}")
    return cases


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def digests(ids, prompt_ids, saved=None):
    """Trainer.prompt_keys over `ids` (unbound: it reads only row_index, train_rows and prompt_ids)."""
    from rpo_engine.trainer import Trainer

    rows = [{"id": i, "prompt": "", "answer": "1"} for i in prompt_ids]
    trainer = SimpleNamespace(row_index={r["id"]: n for n, r in enumerate(rows)}, train_rows=rows, prompt_ids=prompt_ids)
    return Trainer.prompt_keys(trainer, ids, saved)


def saved_ids(cache_state):
    """The prompt ids a saved cache holds, as Trainer.load_state_dict reads them (whichever format this checkout's
    ExperienceCache.state_dict writes)."""
    from rpo_engine.rpo import cache as cache_module

    reader = getattr(cache_module, "saved_path_ids", None)
    return reader(cache_state) if reader else cache_state["paths"]


def measure(num_prompts: int, length: int) -> dict:
    from rpo_engine.config import RPOConfig
    from rpo_engine.rpo.cache import ExperienceCache
    from rpo_engine.rpo.truncation import cut_cached_path

    rng = numpy.random.default_rng(0)
    pool_ids = rng.integers(0, VOCAB, size=length + 4096, dtype=numpy.int64)
    pool_lp = torch.from_numpy(-rng.exponential(1.0, size=length + 4096)).float()  # float32 values, as sampled
    ids = [f"prompt-{n}" for n in range(num_prompts)]
    prompt_ids = {i: pool_ids[n % 4096:n % 4096 + PROMPT_TOKENS].tolist() for n, i in enumerate(ids)}
    import rpo_engine

    row = dict(prompts=num_prompts, tokens=length, ids_and_logprobs=num_prompts * length,
               rpo_engine=str(Path(rpo_engine.__file__).parent))

    base = rss_mib()
    cache = ExperienceCache("correct-only", 0.5)
    t0 = time.perf_counter()
    for n, i in enumerate(ids):  # fresh lists for each path, as the rollout hands them over
        start = n % 4096
        cache.put(i, pool_ids[start:start + length].tolist(), float("nan") if n % 2 else 1.0, 0, n % 2 == 0,
                  pool_lp[start:start + length].tolist())
    row["fill_s"] = time.perf_counter() - t0
    row["rss_mib"] = rss_mib() - base

    # one step's cache work for BATCH prompts (half verified, half cut at their least likely token)
    config = RPOConfig(rpo_unverified_cut="least-likely")
    step_rng = random.Random(0)
    answer_lp = pool_lp[:length].tolist()
    times = []
    for step in range(3):
        batch = [ids[(step * BATCH + b) % num_prompts] for b in range(BATCH)]
        answers = [pool_ids[n % 4096:n % 4096 + length].tolist() for n in range(BATCH)]  # the rollout's, untimed
        t0 = time.perf_counter()
        for i in batch:
            path = cache.get(i)
            cut = cut_cached_path(len(path.token_ids), path.correct, step_rng, length, config, path.logprobs, 0)
            kept, kept_lp = path.token_ids[:cut.kept], path.logprobs[:cut.kept]
            assert len(kept) == len(kept_lp) == cut.kept
        for n, i in enumerate(batch):
            rewards = [float((n + g) % 2) for g in range(GROUP)]
            pick = cache.choose(rewards, step_rng)  # the group's answer: one list of `length` ids, as Group.answer_ids
            cache.apply(i, answers[n], rewards[pick], step + 1, rewards[pick] == 1.0, answer_lp)
            cache.note_group(i, False)
        times.append(time.perf_counter() - t0)
    row["step_ms"] = 1e3 * sorted(times)[1]
    row["step_batch"] = BATCH

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainer_state.pt"
        t0 = time.perf_counter()
        state = {"cache": cache.state_dict(digests(cache.paths, prompt_ids))}
        row["state_dict_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.save(state, path)
        row["torch_save_s"] = time.perf_counter() - t0
        row["save_s"] = row["state_dict_s"] + row["torch_save_s"]
        row["file_mib"] = path.stat().st_size / 2**20
        expected = {i: (p.token_ids, p.logprobs, p.correct, p.step) for i, p in list(cache.paths.items())[:50]}
        del state, cache
        # the load in a fresh process: its peak memory is the resume's alone
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_cache as b; "
                f"b.print_load({str(path)!r}, {num_prompts}, {length})")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # our cwd: benchmarks/
        if proc.returncode:
            raise RuntimeError(f"load failed: {proc.stderr[-2000:]}")
        loaded = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("LOAD "))[5:])
        assert loaded.pop("first") == [list(v) for v in expected.values()][:1], "the loaded cache differs"
    row.update(loaded)
    return row


def print_load(path: str, num_prompts: int, length: int) -> None:
    """The resume of `path` (measure's checkpoint): prints LOAD and a JSON row."""
    from rpo_engine.rpo.cache import ExperienceCache

    rng = numpy.random.default_rng(0)
    pool_ids = rng.integers(0, VOCAB, size=length + 4096, dtype=numpy.int64)
    ids = [f"prompt-{n}" for n in range(num_prompts)]
    prompt_ids = {i: pool_ids[n % 4096:n % 4096 + PROMPT_TOKENS].tolist() for n, i in enumerate(ids)}
    base = rss_mib()
    t0 = time.perf_counter()
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    torch_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    saved_keys = state["cache"].get("prompt_keys")
    keys = digests(saved_ids(state["cache"]), prompt_ids, saved_keys)
    cache = ExperienceCache("correct-only", 0.5)
    stale = cache.load_state_dict(state["cache"], keys, VOCAB)
    load_state_dict_s = time.perf_counter() - t0
    del state
    # the peak: VmHWM is this process's own (ru_maxrss would count the parent's, across fork and exec)
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    assert not stale and len(cache) == num_prompts
    first = cache.get("prompt-0")
    row = dict(torch_load_s=torch_load_s, load_state_dict_s=load_state_dict_s, load_s=torch_load_s + load_state_dict_s,
               load_rss_mib=rss_mib() - base, load_peak_rss_mib=peak - base,
               first=[[first.token_ids, first.logprobs, first.correct, first.step]])
    print("LOAD " + json.dumps(row))


def run_case(num_prompts: int, length: int, src=None) -> dict:
    """One case in its own process, on `src`'s rpo_engine where given (else this checkout's)."""
    env = {**os.environ, "PYTHONPATH": str(src or Path(__file__).resolve().parents[1])}
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_cache as b; "
            f"print('ROW ' + json.dumps(b.measure({num_prompts}, {length})))")
    # run in benchmarks/: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parent)
    if proc.returncode:  # e.g. out of memory: recorded as such, the other cases still run
        row = dict(prompts=num_prompts, tokens=length, failed=proc.stderr[-500:] or f"rc {proc.returncode}")
    else:
        row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ROW "))[4:])
    print(("baseline " if src else "") + json.dumps(row), flush=True)
    return row


def run_cases(cases, baseline_cases=(), src=None) -> tuple[list[dict], list[dict]]:
    """Each case here and (`src`, its `baseline_cases`) on the baseline checkout, the two sides of a case one after
    the other, which first turned case by case: drift on the box falls on both alike. -> (rows, baseline rows)."""
    rows, base_rows = [], []
    for i, case in enumerate(dict.fromkeys([*cases, *baseline_cases])):
        sides = [side for side, wanted in (("here", cases), ("baseline", baseline_cases)) if case in wanted]
        for side in rotated(sides, i):
            if side == "here":
                rows.append(run_case(*case))
            else:
                base_rows.append(run_case(*case, src))
    return rows, base_rows


def main(argv=None):
    ap = arg_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=parse_cases, default=CASES, help="PROMPTSxTOKENS[,...] (default %(default)s)")
    ap.add_argument("--baseline-cases", type=parse_cases, default=None,
                    help="the baseline's cases, where its memory allows fewer (default: --cases)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="another checkout of the repository: the same cases run on its rpo_engine too")
    ap.add_argument("--out", type=out_path, default=None, help="JSON path (default: benchmarks/results/cache_cpu.json)")
    args = ap.parse_args(argv)
    if args.baseline_src and not (args.baseline_src / "rpo_engine" / "__init__.py").is_file():
        from rpo_engine.errors import UserError

        raise UserError(f"--baseline-src {args.baseline_src}: not a checkout of this repository (no rpo_engine/)")
    result = dict(benchmark="cache", machine=machine("cpu"), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  git_commit=git_commit(), torch=torch.__version__,
                  settings=dict(vocab=VOCAB, prompt_tokens=PROMPT_TOKENS, step_batch=BATCH, group=GROUP),
                  load_average_1_5_15=os.getloadavg())
    src = args.baseline_src.resolve() if args.baseline_src else None
    result["rows"], base_rows = run_cases(args.cases, (args.baseline_cases or args.cases) if src else (), src)
    if src:
        result["baseline"] = dict(src=str(src), git_commit=git_head(src) or "unknown", rows=base_rows)
    save_json(args.out or Path(__file__).parent / "results" / "cache_cpu.json", result)


if __name__ == "__main__":
    cli(main)
