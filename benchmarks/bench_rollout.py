"""Rollout throughput: RolloutEngine against transformers.generate on the same random checkpoint.

CPU (default): a tiny Qwen2-shaped model; 8 prompts x 16 samples, 256-token prompts, 128 new tokens
(transformers: one generate call, num_return_sequences=16, same sampling settings). Then an RPO-shaped
load, 16 suffixes of 64 tokens from each of 8 1k-token prefixes, with and without prefix sharing.
--gpu (default on CUDA): Qwen2.5-1.5B's shape in bf16, 64 and 256 sequences at 1k and 4k context:
tokens/s, achieved GB/s (weights + K/V read per decode step / step time) against a measured device copy
bandwidth, and the ratio to transformers; also the decode forward's own device time (CUDA events around
each graph replay) and the GB/s it reaches, so host work and kernel speed show apart; at 4k context
also with triton_cascade=True (shared prompt K/V read once per prompt; its achieved_GB_s is then an
effective figure: the bytes the plain path reads). Every GPU load and the first CPU one also run with
async_scheduling=True (each decode step scheduled while the previous one runs; on the CPU it has nothing
to overlap and should cost nothing). A load's variants (and transformers) are timed in turns, one generate call
of each a round, the order turned every round, medians over --repeats rounds; on CUDA each engine is built for
its turn (each takes 90% of the GPU). New tokens/s counts every returned token over the call's wall time. Writes
benchmarks/results/rollout_<cpu|cuda>.json; until every case has run without an error, rollout_<...>.partial.json.
transformers failing on a case does not fail the case: its row keeps our figures and says why in hf_error.
"""
import datetime, json, os, statistics, sys, tempfile, traceback  # noqa: E401
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import rpo_engine
from common import (arg_parser, check_gpu, cli, git_commit, machine, out_path, positive_int, save_json,
                    time_alternating)
from rpo_engine.rollout import RolloutEngine, SamplingParams

TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=True)
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_theta=1e6)


def copy_bandwidth(device):
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timed = time_alternating({"copy": lambda: y.copy_(x)}, 5, sync=sync)
    return 2 * x.numel() * 4 / statistics.median(timed["copy"]["wall"]) / 1e9  # read + write


class TimedGraph:
    """A captured decode graph whose replays are timed on the device: CUDA events around each replay."""

    def __init__(self, graph, events: list):
        self.graph, self.events = graph, events

    def replay(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        self.events.append((start, end))


HF = "transformers"  # the peer's name among a load's timed calls


def run_load(hf, model, num_prompts, n, prompt_len, new_tokens, repeats, variants):
    """One load (`num_prompts` random prompts x `n` samples of `new_tokens` after `prompt_len` tokens) on each of
    `variants`, (case name, RolloutEngine keyword arguments) pairs, and on `hf` (transformers, None: not run)
    beside the first. One generate call of each a round, in turns, the order turned every round
    (time_alternating): drift on the box falls on all alike. On CUDA each engine is built for its turn and freed
    after it (each takes 90% of the GPU's memory, and transformers needs room); on the CPU all are held.
    -> one row per variant, the first with transformers' figures (or hf_error, why it failed)."""
    device = model.device
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (num_prompts, prompt_len), generator=g)
    params = SamplingParams(n=n, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=[])
    total = num_prompts * n * new_tokens
    engine_kwargs = dict(variants)
    engines, num_blocks = {}, {}
    replays = {name: [] for name in engine_kwargs}  # (start, end) events of each decode forward run as a CUDA graph

    def open_engine(name):
        if name == HF or name in engines:
            return
        engine = RolloutEngine(model, **engine_kwargs[name])
        engine.generate(prompts[:2, :32].tolist(), SamplingParams(n=2, max_new_tokens=4))  # warm-up
        engine.runner.graphs = {size: (TimedGraph(graph, replays[name]), out)
                                for size, (graph, out) in engine.runner.graphs.items()}
        engines[name], num_blocks[name] = engine, engine.num_blocks

    def close_engine(name):  # on CUDA: its K/V cache back before the next turn's engine (or transformers) runs
        engines.pop(name, None)
        torch.cuda.empty_cache()

    def ours(name):
        def call():
            engines[name].generate(prompts.tolist(), params)
            return engines[name].last_stats
        return call

    calls = {name: ours(name) for name in engine_kwargs}
    if not cuda:  # all held at once
        for name in engine_kwargs:
            open_engine(name)
    hf_error = None
    if hf is not None:
        ids = prompts.to(device)
        kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0)
        warm = ids[:2, :32]
        try:
            hf.generate(warm, attention_mask=torch.ones_like(warm), num_return_sequences=2, max_new_tokens=4, **kw)
            kw.update(attention_mask=torch.ones_like(ids), num_return_sequences=n, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens)  # min_new_tokens: no early eos, same token count as ours

            def theirs():
                with torch.no_grad():
                    hf.generate(ids, **kw)
            calls[HF] = theirs
        except Exception as e:  # noqa: BLE001 -- recorded in the row, which keeps our figures
            hf_error = e
    timings = time_alternating(calls, repeats, warmup=0, sync=torch.cuda.synchronize if cuda else None,
                               before=open_engine if cuda else None, after=close_engine if cuda else None,
                               errors=(Exception,))  # recorded in the rows; the other variants still run
    engines.clear()
    rows = []
    for name, timed in ((name, timings[name]) for name in engine_kwargs):
        if "error" in timed:
            e = timed["error"]
            traceback.print_exception(e)
            rows.append(dict(case=name, error=f"{type(e).__name__}: {e}"))
            continue
        s, ours_s = timed["results"][-1], statistics.median(timed["wall"])
        assert s.sampled_tokens == total, (s.sampled_tokens, total)
        row = dict(case=name, num_prompts=num_prompts, n=n, prompt_len=prompt_len, new_tokens=new_tokens,
                   ours_s=ours_s, ours_tok_s=total / ours_s, prefill_tokens=s.prefill_tokens,
                   reused_tokens=s.reused_tokens, decode_step_ms=1e3 * s.decode_time_s / max(1, s.decode_steps),
                   num_blocks=num_blocks[name])
        if cuda:  # bytes a decode step reads: every weight once + each sequence's K/V
            cfg = model.config
            kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            step_bytes = weights + num_prompts * n * (prompt_len + new_tokens / 2) * kv_token
            row["achieved_GB_s"] = step_bytes / (s.decode_time_s / s.decode_steps) / 1e9
            if replays[name]:  # the forward alone on the device: the rest of decode_step_ms is host work and sampling
                graph_ms = statistics.mean(start.elapsed_time(end) for start, end in replays[name])
                row.update(graph_ms_per_decode_step=graph_ms, graph_GB_s=step_bytes / graph_ms / 1e6,
                           graph_share_of_decode_step=graph_ms / row["decode_step_ms"])
        if hf is not None and name == variants[0][0]:
            hf_error = timings.get(HF, {}).get("error", hf_error)
            if hf_error is None:
                theirs_s = statistics.median(timings[HF]["wall"])
                row.update(hf_s=theirs_s, hf_tok_s=total / theirs_s, speedup=theirs_s / ours_s)
            else:  # e.g. out of memory: transformers prefills all n copies of each prompt at once
                traceback.print_exception(hf_error)
                row.update(hf_s=None, hf_tok_s=None, speedup=None, hf_error=f"{type(hf_error).__name__}: {hf_error}")
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = arg_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", default=torch.cuda.is_available())
    ap.add_argument("--cpu", dest="gpu", action="store_false")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", type=out_path, default=None, help="JSON path (default: benchmarks/results/)")
    args = ap.parse_args(argv)
    check_gpu(args.gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    shape = QWEN25_15B if args.gpu else TINY
    config = AutoConfig.for_model("qwen2", bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
        hf.save_pretrained(tmp)
        model = rpo_engine.load_model(tmp, dtype=dtype, device=device)
    hf = None if args.skip_hf else hf
    loads = []  # (run_load's load arguments, its variants: (case name, RolloutEngine keyword arguments))
    if not args.gpu:
        loads.append(((8, 16, 256, 128), [("8x16 p256 g128", {}),
                                          ("8x16 p256 g128 async_scheduling", dict(async_scheduling=True))]))
        loads.append(((8, 16, 1024, 64), [(f"rpo 8x16 p1024 g64 sharing={share}", dict(enable_prefix_sharing=share))
                                          for share in (True, False)]))
    else:
        for num_seqs in (64, 256):
            for ctx in (1024, 4096):
                name, gpu = f"{num_seqs} seqs ctx {ctx}", dict(gpu_memory_utilization=0.9)
                variants = [(name, gpu), (f"{name} async_scheduling", dict(gpu, async_scheduling=True))]
                if ctx == 4096:  # the same load with each prompt's K/V read once for its 8 samples
                    variants.append((f"{name} triton_cascade", dict(gpu, triton_cascade=True)))
                loads.append(((num_seqs // 8, 8, ctx - 256, 256), variants))
    result = dict(benchmark="rollout", device=device.type, machine=machine(device),
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  git_commit=git_commit(),
                  torch=torch.__version__, threads=torch.get_num_threads(), model=shape, dtype=str(dtype),
                  load_average_1_5_15=os.getloadavg() if device.type == "cpu" else None,  # the box may be shared
                  copy_GB_s=copy_bandwidth(device), rows=[])
    out = args.out or Path(__file__).parent / "results" / f"rollout_{device.type}.json"
    for load, variants in loads:  # a failing variant is recorded and the others still run (one GPU lease)
        try:
            result["rows"] += run_load(hf, model, *load, args.repeats, variants)
        except Exception as e:  # noqa: BLE001 -- recorded in the results, and the exit code says so
            traceback.print_exc()
            result["rows"] += [dict(case=name, error=f"{type(e).__name__}: {e}") for name, _ in variants]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save_json(out, result, partial=True)  # after every load: a time limit keeps what was measured
    failed = any("error" in row for row in result["rows"])
    save_json(out, result, partial=failed)  # the complete file only when every case ran
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
