"""The embeddable API as a user's own trainer calls it: arguments it gets wrong are named, not crashed on deep
inside, and the shapes a user naturally passes (a tensor row of rewards, an integer device) work."""
import inspect
import random
import re

import pytest
import torch

import rpo_engine
from rpo_engine.kernels import fused_logprobs, policy_loss
from rpo_engine.rpo import ExperienceCache
from tests.helpers import ON_CUDA


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return rpo_engine.load_model(tiny_model_dir)


def test_load_model_takes_an_integer_device_as_torch_does(tiny_model_dir):
    # torch.device(0) is cuda:0; `device or "cpu"` read it as no device and loaded onto the CPU
    if ON_CUDA:
        assert rpo_engine.load_model(tiny_model_dir, device=0).device == torch.device("cuda", 0)
    else:
        for device in (0, "cuda"):  # torch's own errors here: "Cannot access accelerator", an AssertionError
            with pytest.raises(rpo_engine.UserError, match=f"^device {device!r}: "):
                rpo_engine.load_model(tiny_model_dir, device=device)


def test_load_model_refuses_a_dtype_that_is_not_floating(tiny_model_dir):
    with pytest.raises(rpo_engine.UserError, match="dtype must be a floating-point dtype, got torch.int8"):
        rpo_engine.load_model(tiny_model_dir, dtype=torch.int8)
    with pytest.raises(rpo_engine.UserError, match="unknown dtype"):
        rpo_engine.load_model(tiny_model_dir, dtype=["bf16"])  # not a TypeError from a dict lookup


def test_model_call_names_bad_input_ids_and_mask(tiny_model):
    vocab = tiny_model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 5))
    cases = [
        (dict(input_ids=ids[0]), r"input_ids must be an integer tensor of shape \[B, T\], got torch.int64 \(5,\)"),
        (dict(input_ids=ids.float()), "input_ids must be an integer tensor"),
        (dict(input_ids=ids.tolist()), "input_ids must be an integer tensor"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 4)), r"attention_mask must have the shape of input_ids"),
        (dict(input_ids=torch.full((1, 3), vocab)), rf"input_ids must lie in \[0, {vocab}\).*\[{vocab}, {vocab}\]"),
        (dict(input_ids=torch.tensor([[3, -1]])), r"got values in \[-1, 3\]"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            tiny_model(**kwargs)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        tiny_model.hidden_states(torch.full((1, 3), vocab))
    with torch.no_grad():  # what is accepted is unchanged: int32 ids, a bool mask
        mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
        assert torch.equal(tiny_model(ids.int(), attention_mask=mask.bool()), tiny_model(ids, attention_mask=mask))


@pytest.mark.parametrize("chunk_numel", [2.5, "4096", True, 0])
def test_fused_logprobs_chunk_numel_must_be_a_positive_integer(chunk_numel):
    # int() made 2.5 into 2 silently, "4096" into 4096, and "x" into a message that named no argument
    hidden, weight, targets = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="chunk_numel must be None or an integer >= 1"):
        fused_logprobs(hidden, weight, targets, chunk_numel=chunk_numel, backend="torch")


def test_experience_cache_takes_a_tensor_row_of_rewards_and_keeps_ints():
    # rewards[i] of a [B, G] tensor is what a trainer holds; `if not rewards` raised on it
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    cache = ExperienceCache("correct-only", epsilon=1.0)
    answers = [torch.tensor([5, 6]), torch.tensor([7, 8, 9]), torch.tensor([4])]
    assert cache.update("q", answers, rewards[0], step=1, rng=random.Random(0))
    path = cache.get("q")
    assert path.token_ids == [7, 8, 9] and all(type(t) is int for t in path.token_ids)
    assert type(path.reward) is float and path.correct
    assert cache.choose(torch.tensor([0.0, float("nan"), 2.0]), random.Random(0)) == 2


def test_experience_cache_epsilon_must_be_a_number():
    for epsilon in ("0.5", None, True):
        with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\] \(a number\)"):
            ExperienceCache(epsilon=epsilon)


def test_import_rpo_engine_and_its_rewards_leaves_torch_unloaded():
    """`import rpo_engine` is cheap: the model's names load on first use, as the rollout's and trainer's do. A
    process that scores rewards only (math-verify's helper process, a reward function's own) reads
    rpo_engine.rewards without torch (the helper started in 1.06 s at 229 MB peak with it, 0.32 s and 58 MB without)."""
    import subprocess
    import sys

    code = ("import sys, rpo_engine, rpo_engine.rewards.answers; assert 'torch' not in sys.modules, 'torch'; "
            "rpo_engine.load_model; assert 'torch' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_dir_lists_the_lazy_names():
    assert {"RolloutEngine", "SamplingParams", "TrainConfig", "Trainer", "load_model"} <= set(dir(rpo_engine))


@pytest.mark.parametrize("name", ["eps_low", "eps_high", "kl_coef", "norm_length", "delta"])
def test_policy_loss_scalar_options_that_are_not_numbers_are_named(name):
    # a YAML or CLI value left as a string: `"0.2" >= 0` raised a TypeError that named no argument
    logp = torch.randn(2, 3)
    with pytest.raises(ValueError, match=f"{name} must be a number, got '2.5'"):
        policy_loss(logp, logp, torch.ones(2), torch.ones(2, 3), backend="torch", **{name: "2.5"})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_logprobs_under_autocast_computes_in_the_inputs_dtype(backend):
    # A trainer's forward under torch.autocast: the torch backend's forward matmul ran in bf16 there while its
    # backward recomputed the logits in fp32 against the bf16 forward's logsumexp (softmax rows off 1 by ~3%)
    # and the Triton backend ignored autocast: the two backends differed by ~3e-2 in value and gradient.
    hidden = torch.randn(16, 64, requires_grad=True)
    weight = (0.5 * torch.randn(500, 64)).requires_grad_()
    targets = torch.randint(0, 500, (16,))
    plain = fused_logprobs(hidden, weight, targets, backend=backend)
    plain_grads = torch.autograd.grad(plain.sum(), (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fused_logprobs(hidden, weight, targets, backend=backend)
    mixed_grads = torch.autograd.grad(mixed.sum(), (hidden, weight))
    torch.testing.assert_close(mixed, plain)
    for a, b in zip(mixed_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_model_config_from_a_transformers_config_object(tmp_path):
    # what `AutoConfig.from_pretrained` returns: it was read as a broken config.json ("object is not subscriptable")
    from transformers import AutoConfig

    from tests.helpers import save_hf_checkpoint

    save_hf_checkpoint("qwen3", tmp_path)
    ours = rpo_engine.ModelConfig.from_hf_dict(AutoConfig.from_pretrained(tmp_path))
    assert ours == rpo_engine.ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(rpo_engine.UserError, match="config.json's contents as a dict, got str"):
        rpo_engine.ModelConfig.from_hf_dict(str(tmp_path / "config.json"))


def test_group_advantages_takes_integer_rewards_and_refuses_a_flat_batch():
    """0/1 correctness as an integer tensor gives the float rewards' advantages; a 1-D batch is refused, not taken
    for groups of one sample."""
    from rpo_engine.algos import group_advantages

    right = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(right, scale), group_advantages(right.float(), scale))
    with pytest.raises(ValueError, match=r"rewards must be \[num_groups, G\], got shape \(4,\)"):
        group_advantages(right[0].float())


# ---- the contract of DESIGN.md ("Contract (tests outside the repo rely on these names)") -------------------------
EMPTY = inspect.Parameter.empty


def _parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_the_top_level_names_design_lists_import_and_are_the_modules_own():
    """`rpo_engine`'s public API by DESIGN.md's layout: each name in __all__, and the very object of the module
    DESIGN.md names it in (a lazy name resolving to another object would split isinstance checks)."""
    from rpo_engine import config, rollout, trainer

    design = {"load_model": rpo_engine.model.load_model, "load_tokenizer": rpo_engine.model.load_tokenizer,
              "RolloutEngine": rollout.RolloutEngine, "SamplingParams": rollout.SamplingParams,
              "TrainConfig": config.TrainConfig, "Trainer": trainer.Trainer}
    assert set(design) <= set(rpo_engine.__all__)
    for name, obj in design.items():
        assert getattr(rpo_engine, name) is obj, name
    assert rollout.Completion.__module__ == "rpo_engine.rollout.sequence"


def test_the_signatures_design_lists():
    """The arguments DESIGN.md names, in its order (callers pass them positionally), with its defaults."""
    from rpo_engine.model import CausalLM
    from rpo_engine.rollout import Completion, RolloutEngine, SamplingParams

    assert _parameters(rpo_engine.load_model) == [("path", EMPTY), ("dtype", None), ("device", None)]
    assert [n for n, _ in _parameters(rpo_engine.load_tokenizer)] == ["path"]
    assert _parameters(CausalLM.forward)[:2] == [("input_ids", EMPTY), ("attention_mask", None)]
    assert [n for n, _ in _parameters(CausalLM.save_pretrained)][:1] == ["directory"]
    assert [n for n, _ in _parameters(RolloutEngine)][:1] == ["model"]
    assert [n for n, _ in _parameters(RolloutEngine.generate)][:2] == ["prompts", "params"]
    assert [n for n, _ in _parameters(SamplingParams)][:7] == ["n", "max_new_tokens", "temperature", "top_p", "top_k",
                                                              "stop_token_ids", "seed"]
    assert SamplingParams().stop_token_ids is None  # None: the model's EOS tokens; [] never stops early
    assert {"token_ids", "logprobs", "finish_reason"} <= set(Completion.__dataclass_fields__)
    assert _parameters(fused_logprobs)[:5] == [("hidden", EMPTY), ("weight", EMPTY),
                                               ("targets", EMPTY), ("temperature", 1.0), ("backend", "auto")]
    assert [n for n, _ in _parameters(policy_loss)][:4] == ["logp", "old_logp", "advantages", "mask"]


def test_the_cli_options_design_lists(capsys):
    """DESIGN.md's `python -m rpo_engine.train` flags (at least those) and the eval's `--model DIR --dataset FILE`:
    an option renamed for its field would drop one silently from --help."""
    from rpo_engine import eval as eval_cli
    from rpo_engine.config import build_parser

    listed = set(re.findall(r"(--[a-z0-9-]+)", build_parser().format_help()))
    assert {"--model", "--dataset", "--algo", "--rpo", "--no-rpo", "--steps", "--output", "--resume", "--seed",
            "--config", "--num-generations", "--prompts-per-step", "--max-completion-length",
            "--learning-rate", "--help"} <= listed
    with pytest.raises(SystemExit) as stop:
        eval_cli.main(["--help"])
    assert stop.value.code == 0
    assert {"--model", "--dataset"} <= set(re.findall(r"(--[a-z0-9-]+)", capsys.readouterr().out))


def test_evaluate_takes_every_eval_flag_by_name():
    """`rpo_engine.eval.evaluate(**options)`, the eval from Python as `rpo_engine.train.train(config)` is the run
    (README): each of the command line's flags by its name with underscores, the flag's default given explicitly
    reading as the flag left out (a flag of a type evaluate cannot take would raise here)."""
    from rpo_engine.eval import build_parser, eval_options, evaluate

    assert callable(evaluate)
    defaults = {action.dest: action.default for action in build_parser()._actions if action.dest != "help"}
    assert {"model", "dataset", "adapter", "num_samples", "temperature", "output", "no_progress"} <= set(defaults)
    assert eval_options(defaults) == eval_options({}) == build_parser().parse_args([])
