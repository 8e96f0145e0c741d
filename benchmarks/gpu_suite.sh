#!/usr/bin/env bash
# Everything a lent GPU machine should run: install (no network: pip --no-deps), env.json, GPU
# tests, then each benchmark in --gpu mode. Every step has its own time limit (also cut to what is
# left of SUITE_BUDGET_S), a failing or timed-out step is recorded and the suite goes on.
# A task that draws a GPU gets ~15 minutes of device time, machine starts included: one ~9-minute
# call, perhaps a short second one. SUITE_STEPS picks a call's steps, in this order of what the open
# issues wait for:
#   1. "tests_kernels kernels rollout"     kernels compiled and checked, then vs naive/Liger; rollout roofline and
#                                           the ratio to transformers.generate (issues 3, 4)
#   2. "shared_prefix torchrun paper_shape trl trl_update"   1.5B-shaped sharing, the torchrun launcher path, the
#                                           paper-shaped step, the TRL ratio and TRL's update (issues 8, 7, 6)
#   3. "tests host rewards sampler lora train"     the rest of the GPU tests and benchmarks
# (install and wheels always run.) After every step suite.json and suite.tar.gz are written again, so a
# call cut short still brings back what it finished. Results, in $OUT (the device returns at most 8 files):
#   suite.json         per step: status (ok / failed / timeout / skipped), exit code, seconds
#   env.json           GPU (nvidia-smi), torch/triton/python versions, importable extras, git commit, date
#   suite.tar.gz       raw/: logs/<step>.log of each step, tests*.xml (pytest's JUnit reports),
#                      <bench>_cuda.json (and .png) of each benchmark (<bench>_cuda.partial.json: what a step
#                      stopped at its time limit, or with a failed case, had measured), torchrun/ metrics
# Usage, from the repository root:  OUT=/some/dir bash benchmarks/gpu_suite.sh
#   SUITE_BUDGET_S=530 total seconds;  SUITE_SKIP_INSTALL=1 skips the pip steps (a dry run on a dev box)
#   GIT_COMMIT=<sha>   names the commit when the copy has no .git
#   .cache/rpo_engine  (git-ignored) is used as the starter-model cache when present, and .whl/ (git-ignored)
#                      wheels are installed: benchmarks/gpu_prepare.sh fills both here; carry [".whl", ".cache"].
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
FINAL=$OUT
OUT=$FINAL/raw  # everything lands here, then goes into suite.tar.gz
mkdir -p "$OUT/logs"
BUDGET=${SUITE_BUDGET_S:-530}
START=$SECONDS
unset TRITON_INTERPRET  # compiled kernels here: tests/conftest.py sets it only for RPO_TEST_DEVICE=cpu
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no network there: fail fast, never wait
[ -d .cache/rpo_engine ] && export RPO_ENGINE_CACHE=${RPO_ENGINE_CACHE:-$PWD/.cache/rpo_engine}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
STEPS_JSON=$OUT/.steps.jsonl
: > "$STEPS_JSON"

record() {  # name status rc seconds
  printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s}\n' "$1" "$2" "$3" "$4" >> "$STEPS_JSON"
  echo "== $1: $2 (rc $3, $4 s; $((SECONDS - START)) s into the suite)"
}

# pack: suite.json and suite.tar.gz from what has run so far (after every step: a call stopped at its
# limit still returns them).
pack() {
  python - "$STEPS_JSON" "$FINAL/suite.json" $((SECONDS - START)) <<'EOF'
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
failed = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
json.dump({"total_seconds": int(sys.argv[3]), "failed": failed, "steps": steps}, open(sys.argv[2], "w"), indent=1)
print(f"suite: {len(steps)} steps, failed or timed out: {failed or 'none'}; {sys.argv[3]} s")
EOF
  cp "$OUT/env.json" "$FINAL/env.json" 2>/dev/null
  tar -czf "$FINAL/suite.tar.gz.tmp" -C "$FINAL" --exclude=.steps.jsonl raw && mv "$FINAL/suite.tar.gz.tmp" "$FINAL/suite.tar.gz"
}

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), log to logs/NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${SUITE_STEPS:-}" ] && [[ " $SUITE_STEPS install wheels " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then record "$name" skipped null 0; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
  record "$name" "$status" "$rc" $((SECONDS - t0))
  tail -n 3 "$OUT/logs/$name.log"
  pack > /dev/null
}

# selected NAME...: whether SUITE_STEPS (unset: every step) picks one of these steps; the work around a step that
# is not a step itself (its model, its probe) is skipped with it: a call that did not pick them spends no time on them.
selected() {
  [ -z "${SUITE_STEPS:-}" ] && return 0
  local name; for name in "$@"; do [[ " $SUITE_STEPS " == *" $name "* ]] && return 0; done
  return 1
}

# bench NAME LIMIT_S CMD...: a step. Each benchmark below writes into $OUT (its --out); a results/*.json or .png
# a step wrote all the same is copied to $OUT too (a stale file never is).
bench() {
  local marker; marker=$(mktemp)
  step "$@"
  find "$RESULTS" -maxdepth 1 \( -name '*.json' -o -name '*.png' \) -newer "$marker" -exec cp {} "$OUT/" \;
  rm -f "$marker"
  pack > /dev/null
}

if [ -z "${SUITE_SKIP_INSTALL:-}" ]; then
  step install 90 python -m pip install --no-deps --no-build-isolation -e .
  # benchmarks/gpu_prepare.sh: peers and extras; of them, those the image lacks (its own stay ahead of any copy)
  missing=$(python benchmarks/missing_wheels.py .whl/*.whl 2> /dev/null)
  if [ -n "$missing" ]; then
    step wheels 60 python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/rpo_site $missing
    export PYTHONPATH=/tmp/rpo_site
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this copy wins even if the install step failed

export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}  # benchmarks record it too
timeout -k 5 60 python - "$OUT/env.json" <<'EOF' > "$OUT/logs/env.log" 2>&1
import datetime, importlib, json, os, platform, subprocess, sys
env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": os.environ["GIT_COMMIT"],
       "python": sys.version, "platform": platform.platform(), "cpu_count": os.cpu_count()}
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                        "--format=csv"], capture_output=True, text=True).stdout
    env["nvidia_smi_full"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
except FileNotFoundError:
    env["nvidia_smi"] = None
for name in ("torch", "triton", "transformers", "tokenizers", "safetensors", "math_verify", "pytest", "trl",
             "liger_kernel", "rpo_engine"):
    try:
        env[name] = getattr(importlib.import_module(name), "__version__", "importable")
    except Exception as e:  # noqa: BLE001 -- record why, keep going
        env[name] = f"not importable: {type(e).__name__}: {e}"
import torch
env["cuda_available"] = torch.cuda.is_available()
env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
env["torch_cuda"] = torch.version.cuda
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v for k, v in env.items() if k != "nvidia_smi_full"}, indent=1))
EOF
cat "$OUT/logs/env.log"

# The tests written to run on the GPU (`-m gpu`: kernels at test and production shapes, the rollout engine
# with Triton decode + CUDA graphs against transformers, shared-prefix training, a bf16 training run);
# the rest of the suite is the CPU suite CI runs.
# The kernels' own tests first (a few minutes at most): the benchmarks after them time kernels these checked.
KERNEL_TESTS="tests/test_kernels.py tests/test_paged_attention.py"
step tests_kernels 120 env RPO_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider -m gpu $KERNEL_TESTS \
  --junitxml="$OUT/tests_kernels.xml"
step tests 400 env RPO_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider -m gpu tests \
  $(for f in $KERNEL_TESTS; do echo "--ignore=$f"; done) --junitxml="$OUT/tests.xml"

# The kernels just checked, timed against the naive path and Liger (issue 4), before the rollout's long step, so
# that run 1's budget (install, tests_kernels, kernels, rollout) cannot starve it.
bench kernels 180 python benchmarks/bench_kernels.py --repeats 3 --out "$OUT/kernels_cuda.json"

# torchrun on the GPU, 1 rank (NCCL): 3 steps with DDP, then 3 with FSDP2, on a tiny random model.
TINY=$OUT/torchrun/tiny_model
selected torchrun && timeout -k 5 120 python - "$TINY" <<'EOF' > "$OUT/logs/tiny_model.log" 2>&1
import sys, torch
from rpo_engine.data.tokenizer import build_task_tokenizer
from rpo_engine.model import CausalLM, ModelConfig
tok = build_task_tokenizer()
config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
torch.manual_seed(0)
CausalLM(config).init_weights(0.02).save_pretrained(sys.argv[1], tokenizer=tok)
EOF
TORCHRUN="python -m torch.distributed.run --standalone --nproc-per-node 1 -m rpo_engine.train --model $TINY"
TORCHRUN+=" --no-progress --steps 3 --prompts-per-step 4 --num-generations 8 --max-completion-length 64"
TORCHRUN+=" --eval-size 8 --eval-steps 3 --reward tests.reward_fns:hash_reward"
step torchrun 90 bash -c "$TORCHRUN --output $OUT/torchrun/ddp && $TORCHRUN --parallel fsdp --output $OUT/torchrun/fsdp"
rm -rf "$OUT/torchrun/tiny_model" "$OUT/torchrun/ddp/final" "$OUT/torchrun/fsdp/final" \
  "$OUT/torchrun/ddp/checkpoints" "$OUT/torchrun/fsdp/checkpoints"  # bring back metrics.jsonl, not weights

bench paper_shape 150 python benchmarks/bench_paper_shape.py --gpu --repeats 2 --out "$OUT/paper_shape_cuda.json"
bench rollout 260 python benchmarks/bench_rollout.py --gpu --repeats 1 --out "$OUT/rollout_cuda.json"
# The engine's host work per decode step on this box's CPU: it adds to rollout_cuda.json's decode_step_ms.
bench host 60 python benchmarks/bench_host.py --repeats 2 --out "$OUT/host_gpu_box.json"
# math-verify over a step's 512 completions on this box's CPUs, in the trainer's process and in --reward-workers.
bench rewards 60 python benchmarks/bench_rewards.py --repeats 3 --out "$OUT/rewards_gpu_box.json"
bench sampler 60 python benchmarks/bench_sampler.py --gpu --out "$OUT/sampler_cuda.json"
bench shared_prefix 60 python benchmarks/bench_shared_prefix.py --gpu --out "$OUT/shared_prefix_cuda.json"
# LoRA: full fine-tuning vs adapters at Qwen2.5-1.5B's shape, and a 7B-shaped model trained with adapters on one GPU
bench lora 120 python benchmarks/bench_lora.py --gpu --repeats 2 --out "$OUT/lora_cuda.json"
bench train 90 python benchmarks/bench_train.py --seeds 0 --steps 10 --out "$OUT/train_cuda.json"
if ! selected trl trl_update; then
  :  # neither is this call's: no import probe (up to 60 s past the budget, at the end of the call)
elif timeout -k 5 60 python -c "import trl, datasets" 2>/dev/null; then
  # issue 6's ratio (trl, full) first: a time limit keeps what finished (trl_cuda.partial.json). One pass (its time on a
  # GPU is not measured yet; a second would double it): each system runs once, in this order, and the JSON says so
  # (timing, run_order)
  bench trl 150 python benchmarks/bench_trl.py --gpu --passes 1 --systems trl full rpo trl_engine trl_rpo trl_rpo_shared --out "$OUT/trl_cuda.json"
  # TRL's update on a paper-shaped RPO group at Qwen2.5-1.5B's shape: GRPOTrainer vs SharedPrefixGRPOTrainer
  bench trl_update 90 python benchmarks/bench_trl_update.py --gpu --repeats 2 --out "$OUT/trl_update_cuda.json"
else
  step trl 20 python -c "import trl, datasets"  # recorded failed (no TRL here: gpu_prepare.sh), or not selected
fi

pack && rm -rf "$OUT"
ls -la "$FINAL"
