"""fused_logprobs forward+backward: naive torch vs chunked torch vs Triton (CUDA) vs Liger FLCE (if installed).

Also with an entropy bonus in the objective (method names ending in +entropy: sum(logp + 0.01 * entropy),
the gradient of both; the naive path takes both from one log-softmax of the full logits), at the first
shape only (on a GPU each method is a fresh process: CUDA start-up and Triton compiles). Liger has no
differentiable entropy, so it runs without.

Each method runs in a child process of its own so its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated minus what was allocated before the call, on CPU the peak RSS
(Linux's VmHWM, reset just before the call) minus the resident set before the call. Both count everything the step allocates, the returned
gradients included. Time: a shape's children are all started, then take turns (each round one timed step
of each, the order turned every round, each timed step right after a warm-up step of its own, as a child
gives its cached CUDA memory back between turns); the median of --repeats rounds. CPU runs fp32 and no Triton
(the interpreter is not a benchmark). Writes benchmarks/results/kernels_<cpu|cuda>.json; until every method
has run, kernels_<...>.partial.json. Liger failing fails nothing: its row says why in error.
Usage: python benchmarks/bench_kernels.py [--repeats 3] [--shape TOKENS HIDDEN VOCAB]
"""
import argparse, datetime, importlib.metadata, importlib.util, json, os, platform  # noqa: E401
import resource, statistics, subprocess, sys, tempfile, time  # noqa: E401

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import arg_parser, cli, git_commit, machine, out_path, positive_int, save_json, time_alternating  # noqa: E402
from rpo_engine.kernels import fused_logprobs, logprobs_reference  # noqa: E402

CPU_SHAPES = [(8192, 256, 32000, torch.float32)]
GPU_SHAPES = [(16384, 1536, 151936, torch.bfloat16), (16384, 3584, 151936, torch.bfloat16)]
PEERS = {"liger"}  # other projects' kernels, compared against ours


def step(method, hidden, weight, targets):
    if method == "naive+entropy":
        logits = (hidden @ weight.T).float()  # [N, V]
        log_probs = torch.log_softmax(logits, dim=-1)  # [N, V]
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # [N]
        (log_probs.gather(-1, targets[:, None]).squeeze(-1) + 0.01 * entropy).sum().backward()
        return
    if method.endswith("+entropy"):
        logp, entropy = fused_logprobs(hidden, weight, targets, backend=method.split("+")[0], return_entropy=True)
        (logp + 0.01 * entropy).sum().backward()
        return
    if method == "naive":
        logp = logprobs_reference(hidden, weight, targets)
    elif method == "liger":  # cross-entropy = -logp summed; Liger computes its gradients in the forward
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        logp = -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
    else:
        logp = fused_logprobs(hidden, weight, targets, backend=method)
    logp.sum().backward()


def make_inputs(n, h, v, dtype, dev):
    """hidden [n, h], weight [v, h] and targets [n], with no temporary freed on the way: on the CPU the peak RSS
    before the call is the memory baseline, so a freed temporary (the weight's unscaled draw, v*h floats: 31 MiB at
    the CPU shape) would raise it above what is resident and read that much less of every method's extra memory."""
    hidden = torch.randn(n, h, device=dev, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, device=dev, dtype=dtype).mul_(h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=dev)
    return hidden, weight, targets


def reset_cpu_peak() -> None:
    """Linux: the peak resident set (VmHWM) starts again from the current one (clear_refs 5); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_peak_bytes() -> int:
    """The peak resident set since reset_cpu_peak (Linux's VmHWM), or since the start (ru_maxrss, KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method, n, h, v, dtype):
    """A method's process: for each line on stdin (a turn) one warm-up step and one timed one, answered with a JSON
    line {"ms"}; when stdin closes, {"peak_extra_mib"} over all its steps. Between turns it gives its cached CUDA
    memory back (each turn's warm-up allocates it again), so the other methods' processes have the room."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets = make_inputs(n, h, v, dtype, dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    peak_bytes = torch.cuda.max_memory_allocated if dev == "cuda" else cpu_peak_bytes
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # the peak from here on: since the process's start it held the imports' (and pages evicted since)
        reset_cpu_peak()
    base = torch.cuda.memory_allocated() if dev == "cuda" else peak_bytes()
    for _ in sys.stdin:
        for warm_up in (True, False):
            hidden.grad = weight.grad = None
            sync()
            t0 = time.perf_counter()
            step(method, hidden, weight, targets)
            sync()
        ms = 1e3 * (time.perf_counter() - t0)
        hidden.grad = weight.grad = None
        if dev == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"ms": ms}), flush=True)
    print(json.dumps({"peak_extra_mib": (peak_bytes() - base) / 2**20}), flush=True)


class Child:
    """A method's child process (--child) at one shape, its stderr in a temporary file."""

    def __init__(self, method, n, h, v, dt):
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", method, str(n), str(h), str(v), dt],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            raise ChildFailed((self.stderr.read().strip().splitlines() or [f"exit code {self.proc.returncode}"])[-1])
        return json.loads(line)

    def turn(self) -> float:
        self.proc.stdin.write("turn\n")
        self.proc.stdin.flush()
        return self.reply()["ms"]

    def finish(self) -> float:
        """Its peak extra MiB; the process ends."""
        self.proc.stdin.close()
        peak = self.reply()["peak_extra_mib"]
        self.proc.wait()
        return peak

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ChildFailed(Exception):
    pass


def main(argv=None):
    p = arg_parser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", type=out_path, default=None, help="JSON path (default: benchmarks/results/)")
    p.add_argument("--shape", type=positive_int, nargs=3, metavar=("TOKENS", "HIDDEN", "VOCAB"), default=None,
                   help="one shape instead of the default ones (fp32 on the CPU, bf16 on CUDA), e.g. a quick check")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        m, n, h, v, dt = args.child
        return child(m, int(n), int(h), int(v), getattr(torch, dt))
    cuda = torch.cuda.is_available()
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    methods = ["naive", "torch"] + ["triton"] * cuda + ["liger"] * liger
    with_entropy = ["naive+entropy", "torch+entropy"] + ["triton+entropy"] * cuda
    rows, failed = [], []
    print(f"{machine('cuda' if cuda else 'cpu')}: fused_logprobs fwd+bwd, median of {args.repeats}; memory = "
          f"{'max_memory_allocated' if cuda else 'peak RSS (VmHWM, reset before the call)'} delta incl. gradients")
    print(f"{'tokens':>6} {'hidden':>6} {'vocab':>6} {'dtype':>8} {'method':>14} {'ms':>9} {'peak MiB':>9} "
          f"{'time/naive':>10} {'mem/naive':>9}")
    triton_version = importlib.metadata.version("triton") if importlib.util.find_spec("triton") else None
    result = {"machine": machine("cuda" if cuda else "cpu"), "platform": platform.platform(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
              "torch": torch.__version__, "triton": triton_version, "repeats": args.repeats,
              "memory_method": "cuda max_memory_allocated delta" if cuda else "peak RSS (VmHWM) reset before the call, delta",
              "results": rows}
    json_path = args.out or os.path.join(HERE, "results", f"kernels_{'cuda' if cuda else 'cpu'}.json")
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    if args.shape:
        shapes = [(*args.shape, shapes[0][3])]
    for i, (n, h, v, dtype) in enumerate(shapes):
        dt = str(dtype).split(".")[1]
        shape_methods = methods + (with_entropy if i == 0 else [])
        children = {m: Child(m, n, h, v, dt) for m in shape_methods}  # each started, then all timed in turns
        try:
            timings = time_alternating({m: c.turn for m, c in children.items()}, args.repeats, warmup=0,
                                       errors=(ChildFailed,))
            for m in shape_methods:
                case = dict(tokens=n, hidden=h, vocab=v, dtype=dt, method=m)
                try:
                    if "error" in timings[m]:
                        raise timings[m]["error"]
                    r = dict(ms=statistics.median(timings[m]["results"]), peak_extra_mib=children[m].finish(), **case)
                except ChildFailed as e:
                    print(f"{m}: failed: {e}")
                    if m in PEERS:  # recorded in its row; our figures are complete without it
                        rows.append(dict(case, error=str(e)))
                        save_json(json_path, result, partial=True)
                    else:
                        failed.append(m)
                    continue
                baseline = "naive+entropy" if m.endswith("+entropy") else "naive"
                naive = next((x for x in rows if x["method"] == baseline and x["hidden"] == h), r)
                print(f"{n:>6} {h:>6} {v:>6} {dt:>8} {m:>14} {r['ms']:>9.1f} {r['peak_extra_mib']:>9.0f} "
                      f"{r['ms'] / naive['ms']:>10.2f} {r['peak_extra_mib'] / naive['peak_extra_mib']:>9.3f}")
                rows.append(r)
                result["load_avg_1m"] = os.getloadavg()[0]  # other jobs skew the times, not memory
                save_json(json_path, result, partial=True)  # after every row: a time limit keeps what was measured
        finally:
            for c in children.values():
                c.kill()
    save_json(json_path, result, partial=bool(failed))  # the complete file only when every method ran
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    cli(main)
