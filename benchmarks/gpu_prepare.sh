#!/usr/bin/env bash
# Run HERE (a machine with pip access) before handing the repo to a lent GPU machine, which has no
# network. Fills two git-ignored folders that the device call carries (carry: [".whl", ".cache"]):
#   .whl/             wheels of what the GPU image may lack: TRL and datasets (bench_trl's peer),
#                     Liger-Kernel (bench_kernels' peer), math-verify (the math reward, its tests), matplotlib
#                     (every training run's curves.png), pytest (the suite's tests); all built for Python 3.12.
#                     gpu_suite.sh installs those the image lacks with pip --no-index --target, nothing else touched
#   .cache/rpo_engine a copy of the starter model, so the suite does not rebuild it there
# The versions are the ones our CPU runs use; the image's own torch/transformers/accelerate stay.
set -eu
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.69.1 kiwisolver==1.5.1 pillow==13.0.0 \
  pyparsing==3.3.2 python-dateutil==2.9.0.post0 six==1.17.0 \
  pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.20.0
python3 - <<'PY'
from pathlib import Path
from rpo_engine.data.starter import ensure_starter_model
import shutil
src = ensure_starter_model()
dst = Path(".cache/rpo_engine") / src.name
if dst.resolve() == src.resolve():  # RPO_ENGINE_CACHE is .cache/rpo_engine: removing dst would remove src
    print("starter model already in", dst)
else:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    print("starter model copied to", dst)
PY
du -sh .whl .cache
# The copy on the device has no .git: the commit travels in GIT_COMMIT. Steps: gpu_suite.sh's header
# lists each call's, in the order the open issues wait for them.
commit=$(git rev-parse HEAD)
git diff --quiet HEAD || echo "warning: uncommitted changes: the results will name $commit all the same"
echo "device run 1: command \"GIT_COMMIT=$commit SUITE_STEPS='tests_kernels kernels rollout' OUT=\$OUT bash benchmarks/gpu_suite.sh\", carry [\".whl\", \".cache\"], timeout_s 600"
echo "then, with 5+ minutes left: SUITE_STEPS='shared_prefix torchrun paper_shape trl trl_update' SUITE_BUDGET_S=<left - 60>"
