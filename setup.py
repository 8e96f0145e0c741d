from setuptools import find_packages, setup

# torch is required but pinned loosely: installing rpo_engine must never replace a torch that is
# already installed (a CPU build here, a CUDA build on a GPU box).
setup(
    name="rpo_engine",
    version="0.1.0",
    description="Reinforcement fine-tuning with Partial Reasoning Optimization (RPO): a self-contained GRPO/DAPO engine",
    packages=find_packages(include=["rpo_engine", "rpo_engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "math-verify>=0.5",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # peft: the LoRA tests load our adapters in PEFT and PEFT's in ours (pure Python); pytest-xdist: the
        # README's `-n 2` runs the suite in two processes (most tests use one core: 8 minutes instead of 12);
        # datasets: Hub datasets are read through it (an optional dependency of a run, tested here); trl:
        # tests/test_trl_parity.py compares our policy losses with its GRPOTrainer's, calling its internals on a
        # stub: pinned, so a TRL release changes the test only when we move the pin (pure Python, and its other
        # requirements are already these)
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark", "peft>=0.13", "datasets", "trl==1.16.0"],
        "gpu": ["flash-attn", "xformers"],
        # benchmarks/bench_trl.py (the TRL peer). Install torch first: with a torch present pip keeps it.
        "bench": ["trl>=1.16", "datasets", "accelerate"],
    },
    entry_points={"console_scripts": ["rpo-train=rpo_engine.train:main", "rpo-eval=rpo_engine.eval:main"]},
)
