"""rpo_engine inside TRL: from_transformers (our decoder on a transformers model's own parameters) and
TRLRollout, GRPOTrainer's rollout_func, checked against transformers and inside a real TRL 1.16 run."""
import types

import pytest
import torch

from rpo_engine.errors import UserError
from rpo_engine.model import from_transformers
from tests.helpers import DEVICE, make_hf_model, with_chat_template

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tie", [False, True])
def test_from_transformers_runs_on_the_same_parameters(family, tie):
    hf = make_hf_model(family, tie_word_embeddings=tie)
    ours = from_transformers(hf)
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    assert all(p is theirs[name] for name, p in ours.named_parameters(remove_duplicate=False))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        # an update to transformers' weights is an update to ours: no copy to sync
        before = ours(ids)
        hf.model.layers[0].mlp.down_proj.weight.mul_(-1.5)
        after = ours(ids)
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(after, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_from_transformers_refuses_what_it_cannot_share():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
        from_transformers(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
    hf = make_hf_model("qwen2")
    hf.lm_head.to(torch.float64)
    with pytest.raises(UserError, match="several devices or in several dtypes"):
        from_transformers(hf)
    with pytest.raises(UserError, match="takes a transformers causal LM"):
        from_transformers(torch.nn.Linear(2, 2))
    hf = make_hf_model("qwen2").to(torch.bfloat16)
    hf.lm_head.to(torch.float32)  # what TRL's cast_lm_head_to_fp32 does
    with pytest.raises(UserError, match="cast_lm_head_to_fp32"):
        from_transformers(hf)


def with_adapters(model, std=0.1, **lora):
    """PEFT LoRA on a transformers `model` (r 4, alpha 8, three projections unless `lora` says otherwise), with
    B random too (PEFT starts it at zero, which would hide an adapter left out or counted twice)."""
    peft = pytest.importorskip("peft")
    lora = dict(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), **lora)
    model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def peft_model(family="qwen2", dtype=torch.float32, **lora):
    """A PEFT LoRA model on a random transformers model of `family`."""
    return with_adapters(make_hf_model(family).to(dtype), **lora)


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True, "r": 8, "target_modules": "all-linear"}],
                         ids=["three-projections", "rslora-all-linear"])
def test_from_transformers_runs_peft_adapters_live(lora):
    from rpo_engine.model.lora import lora_modules

    model = peft_model(**lora)
    ours = from_transformers(model)
    adapted = lora_modules(ours)
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert sorted(adapted) == sorted(peft_layers) and adapted
    for name, m in adapted.items():
        assert m.lora_A.weight is peft_layers[name].lora_A["default"].weight
        assert m.lora_B.weight is peft_layers[name].lora_B["default"].weight
        assert m.weight is peft_layers[name].base_layer.weight
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, rtol=1e-5, atol=1e-5)
        for m in peft_layers.values():  # a step on the adapters is a step of ours
            m.lora_A["default"].weight.mul_(2.0)
        torch.testing.assert_close(ours(ids), model(ids).logits, rtol=1e-5, atol=1e-5)


def test_from_transformers_peft_fp32_adapters_on_a_bf16_base():
    """PEFT keeps adapters in fp32 on a bf16 base (autocast_adapter_dtype): ours is as close to the model in
    fp32 as PEFT's own bf16 forward is."""
    import copy

    model = peft_model(dtype=torch.bfloat16)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    exact = copy.deepcopy(model).float()
    ours = from_transformers(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        truth = exact(ids).logits
        ours_error = (ours(ids).float() - truth).abs().max().item()
        peft_error = (model(ids).logits.float() - truth).abs().max().item()
        with model.disable_adapter():  # what leaving the adapters out would cost: far more than rounding
            assert (model(ids).logits.float() - truth).abs().max().item() > 10 * peft_error
    assert ours_error <= 1.5 * peft_error
    # each projection as PEFT computes it, bit for bit: the fp32 adapter added to the bf16 base in fp32, then rounded
    from rpo_engine.model.lora import lora_modules

    peft_layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            x = torch.randn(4, m.in_features).to(torch.bfloat16)
            assert torch.equal(m(x), peft_layers[name](x)), name


@pytest.mark.parametrize("lora, words", [
    ({"use_dora": True}, "DoRA"),
    ({"alora_invocation_tokens": [5, 6]}, "LoRA variant"),
    ({"target_modules": ["q_proj", "lm_head"]}, "adapter on lm_head"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "uses a bias"),
])
def test_from_transformers_refuses_peft_adapters_it_cannot_compute(lora, words):
    with pytest.raises(UserError, match=words):
        from_transformers(peft_model(**lora))


def test_from_transformers_refuses_an_adapter_merged_and_switched_off():
    model = peft_model()
    model.merge_adapter()
    with model.disable_adapter(), pytest.raises(UserError, match="merged into its weight and switched off"):
        from_transformers(model)


def test_from_transformers_applies_peft_lora_dropout_as_peft_does():
    """PEFT's lora_dropout on the adapter's input in train mode: the same draw as PEFT's layer under the same
    seed; none in eval mode (how TRLRollout builds the rollout's model)."""
    model = peft_model(lora_dropout=0.3)
    ours = from_transformers(model)
    theirs_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    our_layer = ours.model.layers[0].self_attn.q_proj
    assert our_layer.dropout == 0.3
    x = torch.randn(3, 5, theirs_layer.in_features)
    with torch.no_grad():
        model.train(), ours.train()
        torch.manual_seed(7)
        dropped = theirs_layer(x)
        torch.manual_seed(7)
        torch.testing.assert_close(our_layer(x), dropped, rtol=1e-6, atol=1e-6)
        model.eval(), ours.eval()
        plain = theirs_layer(x)
        torch.testing.assert_close(our_layer(x), plain, rtol=1e-6, atol=1e-6)
        assert (dropped - plain).abs().max() > 1e-3  # the dropout acted


def stub_trainer(model, tokenizer, **overrides):
    """The attributes TRLRollout reads from a GRPOTrainer, with TRL 1.16's defaults."""
    fields = dict(model=model, accelerator=types.SimpleNamespace(unwrap_model=lambda m: m),
                  processing_class=tokenizer, chat_template=None, chat_template_kwargs={}, temperature=1.0,
                  top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, max_completion_length=12,
                  eos_token_ids=[tokenizer.eos_token_id], use_vllm=False, tools=[], environment_factories=None,
                  args=types.SimpleNamespace(generation_kwargs=None, vllm_gpu_memory_utilization=0.3,
                                             vllm_enable_sleep_mode=False))
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


@pytest.fixture
def hf_tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_greedy_rollout_matches_transformers_generate(hf_tiny):
    from rpo_engine.integrations.trl import TRLRollout

    hf, tok = hf_tiny
    hf.eval()
    prompts = ["12+34=", "7*8=", "7*8=", "100-1="]
    out = TRLRollout()(prompts, stub_trainer(hf, tok, temperature=0.0))
    assert out["prompt_ids"] == [tok(p)["input_ids"] for p in prompts]
    for ids, completion in zip(out["prompt_ids"], out["completion_ids"]):
        expected = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in expected:  # generate pads after eos
            expected = expected[:expected.index(tok.eos_token_id) + 1]
        assert completion == expected


def test_engine_is_built_again_when_the_model_changes_its_parameters(hf_tiny):
    from rpo_engine.integrations.trl import TRLRollout

    hf, tok = hf_tiny
    rollout, trainer = TRLRollout(), stub_trainer(hf, tok, temperature=0.0)
    first = rollout(["1+2="], trainer)
    engine = rollout.engine
    rollout(["1+2="], trainer)
    assert rollout.engine is engine
    hf.resize_token_embeddings(hf.config.vocab_size + 8)  # new embedding and head Parameters
    assert rollout(["1+2="], trainer)["completion_ids"] == first["completion_ids"]  # (8 more tokens to normalize over)
    assert rollout.engine is not engine and rollout.engine.config.vocab_size == hf.config.vocab_size
    engine = rollout.engine
    mlp = hf.model.layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach() * 3)  # a Parameter replaced: rebuilt on it
    rollout(["1+2="], trainer)
    assert rollout.engine is not engine and rollout.engine.model.model.layers[0].mlp.up_proj.weight is mlp.up_proj.weight


def test_rollout_follows_peft_merge_and_disable_adapter(hf_tiny):
    """PEFT's switches after the engine was built: inside disable_adapter() the rollout samples the base model,
    after merge_adapter() the merged weights (the adapter not counted twice), after unmerge_adapter() base plus
    adapter again; each time a completion's log-probs are the PEFT model's teacher-forced ones."""
    from rpo_engine.integrations.trl import TRLRollout

    hf, tok = hf_tiny
    model = with_adapters(hf, std=0.5)
    rollout, trainer = TRLRollout(), stub_trainer(model, tok, temperature=1.0, max_completion_length=8)
    prompts = ["12+34=", "7*8="]

    def worst_logprob_gap():
        out = rollout(prompts, trainer)
        worst = 0.0
        with torch.no_grad():
            for p, c, lp in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
                ids = torch.tensor([p + c])
                ref = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1], -1).gather(-1, ids[0, len(p):, None])[:, 0]
                worst = max(worst, (ref - torch.tensor(lp)).abs().max().item())
        return worst

    assert worst_logprob_gap() < 1e-4
    with model.disable_adapter():
        assert worst_logprob_gap() < 1e-4
    model.merge_adapter()
    assert worst_logprob_gap() < 1e-4
    model.unmerge_adapter()
    assert worst_logprob_gap() < 1e-4


def test_rollout_has_no_lora_dropout(hf_tiny):
    """A PEFT model with lora_dropout, in train mode as TRL holds it: the rollout samples without dropout (its
    log-probs are the model's own in eval mode), as vLLM's would."""
    from rpo_engine.integrations.trl import TRLRollout

    hf, tok = hf_tiny
    model = with_adapters(hf, std=0.5, lora_dropout=0.5, target_modules="all-linear")
    model.train()
    out = TRLRollout()(["12+34=", "7*8="], stub_trainer(model, tok, temperature=1.0, max_completion_length=8))
    model.eval()
    with torch.no_grad():
        for p, c, lp in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
            ids = torch.tensor([p + c])
            ref = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1], -1).gather(-1, ids[0, len(p):, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lp), ref, rtol=1e-4, atol=1e-4)


def test_chat_prompts_are_templated_as_trl_templates_them(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpo_engine.integrations.trl import tokenize_prompts

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if think %}think{% endif %}{% endif %}")
    directory = with_chat_template(tiny_model_dir, tmp_path / "chat", template)
    tok = AutoTokenizer.from_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory)
    prompts = [[{"role": "user", "content": "1+2="}], [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "3*4="}]]
    ids = tokenize_prompts(prompts, stub_trainer(hf, tok, chat_template_kwargs={"think": True}))
    assert [tok.decode(i) for i in ids] == ["<user>1+2=<assistant>think",
                                            "<system>be brief<user>3*4=<assistant>think"]


def test_sampling_settings_and_generation_kwargs(hf_tiny):
    from rpo_engine.integrations.trl import RPORollout, TRLRollout, sampling_params

    hf, tok = hf_tiny
    args = types.SimpleNamespace(generation_kwargs={"stop": ["="], "stop_token_ids": [5, tok.eos_token_id],
                                                    "max_tokens": 4})
    trainer = stub_trainer(hf, tok, top_k=None, min_p=0.1, temperature=0.7, args=args)
    params = sampling_params(trainer)
    assert params == dict(max_new_tokens=4, temperature=0.7, top_p=1.0, top_k=0, min_p=0.1, repetition_penalty=1.0,
                          stop_token_ids=[tok.eos_token_id, 5], stop=["="])
    with pytest.raises(ValueError, match=r"generation_kwargs \['presence_penalty'\] are not taken"):
        sampling_params(stub_trainer(hf, tok, args=types.SimpleNamespace(generation_kwargs={"presence_penalty": 1})))
    for kwargs, words in (({"stop_token_ids": 5}, "stop_token_ids must be a list"),
                          ({"max_tokens": None}, "max_new_tokens must be an integer"),
                          ({"stop": [""]}, "stop must be a string or a list of non-empty strings")):
        with pytest.raises(ValueError, match=words):
            sampling_params(stub_trainer(hf, tok, args=types.SimpleNamespace(generation_kwargs=kwargs)))
    with pytest.raises(ValueError, match="set use_vllm=False"):
        TRLRollout()(["1+1="], stub_trainer(hf, tok, use_vllm=True))
    with pytest.raises(ValueError, match="does not run tool calls"):
        TRLRollout()(["1+1="], stub_trainer(hf, tok, tools=[print]))
    with pytest.raises(ValueError, match=r"rollout_func=TRLRollout\(\), not the class"):
        TRLRollout(["1+1="], stub_trainer(hf, tok))  # what TRL does with rollout_func=TRLRollout
    with pytest.raises(ValueError, match=r"rollout_func=RPORollout\(\), not the class"):
        RPORollout(["1+1="], stub_trainer(hf, tok))


@pytest.mark.gpu
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft"])
def test_trl_grpo_trainer_rolls_out_with_the_engine_on_live_weights(hf_tiny, tmp_path, monkeypatch, use_peft):
    """A real TRL GRPOTrainer run with rollout_func=TRLRollout(), fully fine-tuned or with TRL's peft_config:
    each step's prompts (each repeated num_generations times) are prefilled once, and every completion's
    log-probs are the trained model's own teacher-forced ones at that moment, although the trained weights
    change from step to step. On a GPU (RPO_TEST_DEVICE=cuda): the Triton attention and the CUDA graphs,
    replayed over parameters TRL's optimizer steps in place."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rpo_engine.integrations.trl import TRLRollout
    from rpo_engine.model.lora import lora_modules

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    hf, tok = hf_tiny
    rollout, calls = TRLRollout(), []

    def checked_rollout(prompts, trainer):
        out = rollout(prompts, trainer)
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
        worst = 0.0
        with torch.no_grad():
            for p, c, lp in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
                ids = torch.tensor([p + c], device=trainer.model.device)
                logits = trainer.model(ids).logits[0, len(p) - 1:-1].float() / trainer.temperature
                ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None])[:, 0]
                worst = max(worst, (ref.cpu() - torch.tensor(lp)).abs().max().item())
        calls.append(dict(prompts=list(prompts), out=out, weights=weights, worst=worst,
                          stats=rollout.engine.last_stats, engine=rollout.engine))
        return out

    def digits(completions, **kwargs):  # varies within a group, so every step has a gradient
        return [float(sum(ch.isdigit() for ch in c)) for c in completions]

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(12, 34), (5, 6), (70, 8), (9, 99)]]
    config = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, num_generations=4, per_device_train_batch_size=8,
                        max_completion_length=10, learning_rate=0.05, use_cpu=DEVICE.type == "cpu", bf16=False,
                        report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", seed=3)
    peft_config = None
    if use_peft:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    trainer = GRPOTrainer(model=hf, reward_funcs=digits, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, rollout_func=checked_rollout, peft_config=peft_config)
    trainer.train()

    assert len(calls) == 2
    for call in calls:
        prompts, out, stats = call["prompts"], call["out"], call["stats"]
        assert len(prompts) == 8 and len(out["completion_ids"]) == 8
        assert all(prompts[i] == prompts[i - i % 4] for i in range(8))  # TRL's runs of num_generations copies
        lengths = [len(ids) for ids in out["prompt_ids"][::4]]
        assert stats.prefill_tokens == sum(lengths) and stats.forked_tokens == 3 * sum(lengths)
        assert call["worst"] < (1e-4 if DEVICE.type == "cpu" else 1e-3)  # fp32 both; other kernels on a GPU
    assert (calls[1]["weights"] - calls[0]["weights"]).abs().max() > 1e-4  # the second rollout saw trained weights
    assert calls[1]["engine"] is calls[0]["engine"]  # built once: its K/V cache is not made again each step
    assert bool(lora_modules(calls[0]["engine"].model)) == use_peft
    assert any(entry.get("grad_norm", 0) > 0 for entry in trainer.state.log_history)  # it trained


def test_rpo_rollout_in_a_trl_run(hf_tiny, tmp_path, monkeypatch):
    """RPORollout in a real TRL run whose two prompts come back every step: the first rollout cold-starts
    both, every later one continues a kept prefix of the answer the tracked reward chose; TRL's rewards see
    whole answers (kept + suffix), its loss mask (env_mask) only the suffix, and the suffix log-probs are the
    trained model's own."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rpo_engine.integrations.trl import RPORollout, prompt_key

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    hf, tok = hf_tiny
    rpo = RPORollout(seed=1, rpo_cache_policy="epsilon-greedy", rpo_unverified_cut_fraction=0.5)
    calls, scored = [], []

    def checked_rollout(prompts, trainer):
        cached = {key: list(path.token_ids) for key, path in rpo.cache.paths.items()}
        cold_before = rpo.counters["cold_starts"]
        out = rpo(prompts, trainer)
        worst = 0.0
        with torch.no_grad():
            for p, c, lp, mask in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"], out["env_mask"]):
                kept = mask.index(1) if 1 in mask else len(mask)
                logits = trainer.model(torch.tensor([p + c])).logits[0, len(p) + kept - 1:-1] / trainer.temperature
                ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c[kept:])[:, None])[:, 0]
                worst = max(worst, (ref - torch.tensor(lp[kept:])).abs().max().item())
        calls.append(dict(out=out, cached=cached, cold=rpo.counters["cold_starts"] - cold_before, worst=worst))
        return out

    def longer(completions, completion_ids, **kwargs):  # varies within a group; the cache keeps by it
        scored.append(dict(completions=list(completions), ids=[list(c) for c in completion_ids]))
        return [len(c) / 10.0 for c in completions]

    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "7*8=", "answer": "56"}]
    config = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, num_generations=4, per_device_train_batch_size=8,
                        max_completion_length=24, learning_rate=0.01, use_cpu=True, bf16=False, report_to="none",
                        disable_tqdm=True, logging_steps=1, save_strategy="no", seed=3)
    trainer = GRPOTrainer(model=hf, reward_funcs=rpo.tracked(longer), args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, rollout_func=checked_rollout)
    trainer.train()

    assert [c["cold"] for c in calls] == [2, 0, 0]
    for call, rewarded in zip(calls, scored):
        out = call["out"]
        assert rewarded["ids"] == out["completion_ids"]  # TRL rewards the whole answer
        assert rewarded["completions"] == tok.batch_decode(out["completion_ids"], skip_special_tokens=True)
        assert call["worst"] < 1e-4
        for p, c, mask, key in zip(out["prompt_ids"], out["completion_ids"], out["env_mask"], out["rpo_prompt_key"]):
            kept = mask.count(0)
            assert mask == [0] * kept + [1] * (len(c) - kept) and len(c) > kept and key == prompt_key(p)
            if call is not calls[0]:  # a kept prefix of the answer the cache held: cut, never whole
                assert kept < len(call["cached"][key]) and c[:kept] == call["cached"][key][:kept]
    # after each step the cache holds one of each group's answers, chosen by the tracked reward
    after = [c["cached"] for c in calls[1:]] + [{key: path.token_ids for key, path in rpo.cache.paths.items()}]
    for call, cached in zip(calls, after):
        out = call["out"]
        assert sorted(cached) == sorted(set(out["rpo_prompt_key"]))
        for key, path in cached.items():
            assert path in [c for c, k in zip(out["completion_ids"], out["rpo_prompt_key"]) if k == key]
    assert any(mask.count(0) for call in calls[1:] for mask in call["out"]["env_mask"])  # prefixes were kept
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
    suffixes = [sum(sum(m) for m in c["out"]["env_mask"]) / 8 for c in calls]
    assert lengths == pytest.approx(suffixes)  # TRL counts (and trains) the suffix tokens only


def test_rpo_rollout_options_and_eval_rollouts(hf_tiny):
    from rpo_engine.integrations.trl import RPORollout

    with pytest.raises(ValueError, match=r"\['rpo_max_cuts'\] are not RPOConfig's"):
        RPORollout(rpo_max_cuts=3)
    with pytest.raises(ValueError, match=r"\['rpo'\]"):
        RPORollout(rpo=False)
    with pytest.raises(UserError, match="--rpo-max-cut-fraction must be in"):
        RPORollout(rpo_max_cut_fraction=2.0)
    hf, tok = hf_tiny
    hf.eval()  # TRL's eval: full completions from the prompt, the cache untouched
    rpo = RPORollout()
    out = rpo(["1+2=", "1+2="], stub_trainer(hf, tok, temperature=0.0))
    assert "env_mask" not in out and len(rpo.cache) == 0 and out["completion_ids"][0] == out["completion_ids"][1]


def test_rpo_rollout_cache_rides_in_trl_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    """The cache is saved with each TRL checkpoint and restored on resume: the resumed run cold-starts
    nothing and continues prefixes of the paths the stopped run had cached. (Its rollouts are not an
    uninterrupted run's: TRL's resumed sampler orders a batch's prompts differently.)"""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rpo_engine.integrations.trl import RPORollout

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    rows = [{"prompt": p, "answer": "1"} for p in ("12+34=", "7*8=", "5-3=", "9+9=")]

    def run(output, max_steps, resume=False):
        rpo, seen = RPORollout(seed=5), []

        def rollout(prompts, trainer):
            out = rpo(prompts, trainer)
            seen.append((trainer.state.global_step, out))
            return out

        def digits(completions, **kwargs):
            return [float(sum(ch.isdigit() for ch in c)) for c in completions]

        config = GRPOConfig(output_dir=str(output), max_steps=max_steps, num_generations=4, per_device_train_batch_size=8,
                            max_completion_length=12, learning_rate=0.01, use_cpu=True, bf16=False, report_to="none",
                            disable_tqdm=True, logging_steps=1, save_strategy="steps", save_steps=2, seed=3)
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=rpo.tracked(digits),
                              args=config, train_dataset=Dataset.from_list(rows),
                              processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), rollout_func=rollout)
        trainer.train(resume_from_checkpoint=resume or None)
        return rpo, seen

    first, _ = run(tmp_path / "run", 2)
    saved = {key: list(path.token_ids) for key, path in first.cache.paths.items()}
    assert len(saved) == 4 and (tmp_path / "run" / "checkpoint-2" / "rpo_state.pt").is_file()
    resumed, seen = run(tmp_path / "run", 4, resume=True)
    assert [step for step, _ in seen] == [2, 3]
    assert resumed.counters["cold_starts"] == first.counters["cold_starts"] == 4  # none in the resumed run
    out = seen[0][1]  # its first rollout: cut from the paths the stopped run saved
    for completion, mask, key in zip(out["completion_ids"], out["env_mask"], out["rpo_prompt_key"]):
        kept = mask.count(0)
        assert completion[:kept] == saved[key][:kept] and kept < len(saved[key])
    assert any(mask.count(0) for mask in out["env_mask"])
    (tmp_path / "run" / "checkpoint-4" / "rpo_state.pt").unlink()
    with pytest.warns(UserWarning, match="cold-start again"):  # resumed where no cache was saved
        again, _ = run(tmp_path / "run", 6, resume=True)
    assert again.counters["cold_starts"] == 4


def test_length_aware_reward_by_hand():
    """Two groups (runs of equal prompts); right answers shaped against their own group's mean right length."""
    import asyncio
    import math

    from rpo_engine.integrations.trl import length_aware

    def accuracy(prompts, completions, completion_ids, **kwargs):
        return [1.0 if c.endswith("!") else 0.0 for c in completions]

    async def async_accuracy(**kwargs):
        return accuracy(**kwargs)

    prompts = ["a", "a", "a", "b", "b"]
    completions = ["x!", "y!", "z", "u!", "v"]
    ids = [[1] * 10, [1] * 30, [1] * 5, [1] * 7, [1] * 3]
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # group a: right lengths 10 and 30, mean 20: 10 -> sigmoid(1) = 0.731, 30 -> sigmoid(-1) = 0.269 -> 0.5
    expected = [sigmoid(1.0), 0.5, 0.0, 0.5, 0.0]  # group b: one right answer, at its own mean: sigmoid(0)
    shaped = length_aware(accuracy)(prompts=prompts, completions=completions, completion_ids=ids)
    assert shaped == pytest.approx(expected)

    def unscorable_last(**kwargs):  # TRL's None: no score; it stays None, and counts as not right
        return accuracy(**kwargs)[:-1] + [None]

    assert length_aware(unscorable_last)(prompts=prompts, completions=completions, completion_ids=ids)[-1] is None
    assert length_aware(accuracy).__name__ == "accuracy"  # TRL names its reward metrics by __name__
    result = asyncio.run(length_aware(async_accuracy)(prompts=prompts, completions=completions, completion_ids=ids))
    assert result == pytest.approx(expected)


def test_tracked_keeps_the_reward_functions_kind_and_name():
    """TRL names a reward's metrics by the function (get_callable_name) and awaits an async one, also an
    object with an async __call__ or a partial; a reward model or a Hub id is no function to wrap."""
    import asyncio
    import functools

    from rpo_engine.integrations.trl import RPORollout

    class Judge:
        async def __call__(self, completions, **kwargs):
            return [1.0] * len(completions)

    def scaled(completions, scale, **kwargs):
        return [scale] * len(completions)

    rpo = RPORollout()
    judge, part = rpo.tracked(Judge()), rpo.tracked(functools.partial(scaled, scale=0.5))
    assert judge.__name__ == "Judge" and part.__name__ == "scaled"
    assert asyncio.run(judge(prompts=["a"], completions=["b"], completion_ids=[[1]])) == [1.0]  # eval: no rpo fields
    assert part(prompts=["a"], completions=["b"], completion_ids=[[1]]) == [0.5]
    for wrong in (torch.nn.Linear(2, 1), "org/reward-model"):
        with pytest.raises(ValueError, match="reward model stays a plain entry"):
            rpo.tracked(wrong)


def test_rpo_rollout_cold_starts_a_prompt_once_and_needs_a_tracked_reward(hf_tiny, tmp_path):
    from rpo_engine.integrations.trl import RPORollout

    hf, tok = hf_tiny
    hf.train()  # a training rollout (transformers loads models in eval mode; TRL trains them)
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m, num_processes=1, process_index=0)
    trainer = stub_trainer(hf, tok, accelerator=accelerator, state=types.SimpleNamespace(global_step=0),
                           add_callback=lambda callback: None, temperature=0.0,
                           args=types.SimpleNamespace(generation_kwargs=None, output_dir=str(tmp_path),
                                                      vllm_enable_sleep_mode=False))
    rpo = RPORollout()
    out = rpo(["1+2="] * 2 + ["3+4="] * 2 + ["1+2="] * 2, trainer)  # a prompt leading two groups
    assert rpo.counters["cold_starts"] == 2 and len(out["completion_ids"]) == 6
    with pytest.raises(ValueError, match="no tracked reward function updated"):  # no reward tracked it
        rpo(["1+2="] * 2, trainer)


def test_two_tracked_reward_functions_are_refused(hf_tiny, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rpo_engine.integrations.trl import RPORollout

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    hf, tok = hf_tiny
    rpo = RPORollout()

    def one(completions, **kwargs):
        return [1.0] * len(completions)

    def two(completions, **kwargs):
        return [0.0] * len(completions)

    config = GRPOConfig(output_dir=str(tmp_path), max_steps=1, num_generations=2, per_device_train_batch_size=2,
                        max_completion_length=4, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
                        save_strategy="no")
    trainer = GRPOTrainer(model=hf, reward_funcs=[rpo.tracked(one), rpo.tracked(two)], args=config,
                          train_dataset=Dataset.from_list([{"prompt": "1+2="}]), processing_class=tok, rollout_func=rpo)
    with pytest.raises(ValueError, match="a second tracked reward function"):
        trainer.train()


def test_rpo_rollout_on_two_processes_keeps_one_cache(tiny_model_dir, tmp_path):
    """torchrun, 2 CPU processes, TRL splitting every group of 4 over them: both hold the same cache after
    each step, a group's members continue the same kept prefix on both, and length_aware shapes each group
    as a whole (what one process computes on the whole batch). SharedPrefixGRPOTrainer there, its loss pass
    through DDP's wrapper, trains as GRPOTrainer does: the same losses, gradient norms and weights."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("trl")
    from rpo_engine.integrations.trl import length_aware

    repo = Path(__file__).resolve().parents[1]

    def torchrun(trainer, out):
        out.mkdir()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(repo / "tests" / "trl_ranks.py"), str(out), str(tiny_model_dir), trainer],
                              capture_output=True, text=True, timeout=300, cwd=repo,
                              env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-4000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    ranks, plain = torchrun("shared", tmp_path / "shared"), torchrun("grpo", tmp_path / "grpo")
    for shared, theirs in zip(ranks, plain):  # DDP's all-reduce ran: every rank trained as GRPOTrainer's did
        assert shared["fallbacks"] == [] and len(shared["log"]) == 3
        for mine, trl_log in zip(shared["log"], theirs["log"], strict=True):
            assert mine == pytest.approx(trl_log, rel=1e-4, abs=1e-6)
        assert shared["weights"] == pytest.approx(theirs["weights"], rel=1e-6)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the same weights on both processes
    steps = list(zip(ranks[0]["rollouts"], ranks[1]["rollouts"]))
    assert len(steps) == 3
    seen = {key for a, b in steps for key in a["rpo_prompt_key"] + b["rpo_prompt_key"]}
    assert ranks[0]["cache"] == ranks[1]["cache"] and set(ranks[0]["cache"]) == seen
    for number, (a, b) in enumerate(steps):
        kept = {}
        for share in (a, b):
            for completion, mask, key in zip(share["completion_ids"], share["env_mask"], share["rpo_prompt_key"]):
                kept.setdefault(key, set()).add(tuple(completion[:mask.count(0)]))
        both = set(a["rpo_prompt_key"]) & set(b["rpo_prompt_key"])
        assert both, "no group was split over the processes"
        assert all(len(kept[key]) == 1 for key in kept)  # one kept prefix a prompt, on both processes
        if number:  # after the cold starts, prefixes are kept
            assert any(len(prefix) for prefixes in kept.values() for prefix in prefixes)
    for a, b in zip(ranks[0]["scored"], ranks[1]["scored"]):
        whole = {k: a[k] + b[k] for k in ("prompts", "lengths", "accuracy", "rewards")}
        expected = length_aware(lambda **kwargs: whole["accuracy"])(
            prompts=whole["prompts"], completion_ids=[[0] * n for n in whole["lengths"]])
        assert whole["rewards"] == pytest.approx(expected)
        assert any(0 < r < 1 for r in whole["rewards"])  # some group had right answers of different lengths


def trl_batch(tok, groups, width, seed=0):
    """A TRL-shaped batch: each (prompt, kept, suffix lengths) group gives a row per suffix, prompt left-padded
    to `width` columns, kept + a random suffix right-padded; rows shuffled, as TRL's shuffled batches come.
    -> input_ids, attention mask, completion columns, each row's prompt."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, kept, suffix_lengths in groups:
        ids = tok(prompt)["input_ids"]
        for m in suffix_lengths:
            suffix = torch.randint(3, tok.vocab_size, (m,), generator=generator).tolist()
            rows.append((ids, kept + suffix))
    order = torch.randperm(len(rows), generator=generator).tolist()
    rows = [rows[i] for i in order]
    C = max(len(c) for _, c in rows)
    input_ids = torch.full((len(rows), width + C), tok.pad_token_id)
    mask = torch.zeros(len(rows), width + C, dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        input_ids[r, width - len(p):width], mask[r, width - len(p):width] = torch.tensor(p), 1
        input_ids[r, width:width + len(c)], mask[r, width:width + len(c)] = torch.tensor(c, dtype=torch.long), 1
    return input_ids, mask, C, [tok.decode(p) for p, _ in rows]


def shared_prefix_trainer(hf, tok, tmp_path, monkeypatch, **config):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig

    from rpo_engine.integrations.trl import SharedPrefixGRPOTrainer

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "7*8=", "answer": "56"}]
    config = GRPOConfig(**{**dict(output_dir=str(tmp_path / "out"), max_steps=3, num_generations=4,
                                  per_device_train_batch_size=8, max_completion_length=24, learning_rate=0.01,
                                  use_cpu=DEVICE.type == "cpu", bf16=False, report_to="none", disable_tqdm=True,
                                  logging_steps=1, save_strategy="no", seed=3), **config})
    return SharedPrefixGRPOTrainer(model=hf, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                   args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)


def test_shared_prefix_trainer_refuses_a_trl_with_other_internals(monkeypatch):
    """A TRL whose GRPOTrainer renamed or reordered what SharedPrefixGRPOTrainer overrides is refused before the
    trainer is built, not run through TRL's own pass silently (or ours called with the wrong arguments)."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    from rpo_engine.integrations.trl import SharedPrefixGRPOTrainer

    def reordered(self, model, input_ids, logits_to_keep, attention_mask, batch_size=None):
        pass

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", reordered)
    with pytest.raises(RuntimeError, match=r"TRL 1\.16 has them; TRL .* has _get_per_token_logps_and_entropies\(self, model, "
                                           r"input_ids, logits_to_keep, .*use GRPOTrainer"):
        SharedPrefixGRPOTrainer(model=None)
    monkeypatch.undo()
    monkeypatch.delattr(GRPOTrainer, "_compute_loss")
    with pytest.raises(RuntimeError, match="has _compute_loss missing: use GRPOTrainer"):
        SharedPrefixGRPOTrainer(model=None)


@pytest.mark.gpu
def test_shared_prefix_trainer_logprobs_and_gradients_equal_trls_own_pass(hf_tiny, tmp_path, monkeypatch):
    """SharedPrefixGRPOTrainer's log-prob pass against GRPOTrainer's own on the same TRL-shaped batch:
    groups of different prompts with kept paths (RPO) and ragged suffixes, a group of one, a group whose
    suffixes are all empty but one, a row whose completion is masked out, rows shuffled. Log-probs,
    entropies and every parameter's gradient equal (fp32), chunked or not. On a GPU (RPO_TEST_DEVICE=cuda):
    the masked SDPA path and the Triton fused log-probs against TRL's CUDA pass."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    hf, tok = hf_tiny
    trainer = shared_prefix_trainer(hf, tok, tmp_path, monkeypatch)
    kept = tok("3 carry 1, 4+1")["input_ids"]
    input_ids, mask, C, prompts = trl_batch(tok, [("12+34=", kept, [5, 1, 9, 3]), ("7*8=", [], [4, 7, 2, 6]),
                                         ("100-1=", kept[:3], [6]), ("5+5=", kept[:2], [0, 0, 3, 0])], width=10)
    mask[3, 10:] = 0  # TRL's mask_truncated_completions: a truncated row's completion masked whole
    input_ids, mask = input_ids.to(trainer.model.device), mask.to(trainer.model.device)
    completion_mask = mask[:, 10:].bool()
    weights = torch.randn(input_ids.shape[0], C).to(trainer.model.device)

    def run(method, **kw):
        hf.zero_grad(set_to_none=True)
        logps, entropies, _ = method(trainer, trainer.model, input_ids, mask, C, compute_entropy=True, **kw)
        ((logps * weights)[completion_mask].sum() + entropies[completion_mask].sum()).backward()
        return (logps.detach()[completion_mask], entropies.detach()[completion_mask],
                {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None})

    ours = run(type(trainer)._get_per_token_logps_and_entropies)
    theirs = run(GRPOTrainer._get_per_token_logps_and_entropies)
    tol = 1e-5 if DEVICE.type == "cpu" else 1e-3  # a GPU's kernels (TF32 dots in Triton) on both sides
    torch.testing.assert_close(ours[0], theirs[0], rtol=tol, atol=tol)
    torch.testing.assert_close(ours[1], theirs[1], rtol=tol, atol=tol)
    assert sorted(ours[2]) == sorted(theirs[2]) and len(ours[2]) == len(list(hf.parameters()))
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=10 * tol, atol=tol, msg=name)
    with torch.no_grad():  # TRL's chunked passes (the old policy's, the reference's): the same numbers
        chunked, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, C, batch_size=3)
    torch.testing.assert_close(chunked[completion_mask], theirs[0], rtol=tol, atol=tol)


def test_prefix_groups_from_a_trl_batch(hf_tiny):
    from rpo_engine.integrations.trl import trl_prefix_groups

    _, tok = hf_tiny
    kept = tok("3 carry 1")["input_ids"]
    input_ids, mask, C, prompts = trl_batch(tok, [("12+34=", kept, [5, 1, 2]), ("7*8=", [], [4, 7])], width=8)
    groups, members = trl_prefix_groups(input_ids, mask, C)
    prompt = tok("12+34=")["input_ids"]
    first = next(g for g in groups if g.prefix_ids[:len(prompt)] == prompt)
    assert first.loss_start == len(prompt) and first.prefix_ids[len(prompt):][:len(kept)] == kept
    assert sorted(r for rows in members for r in rows) == list(range(5)) and sum(len(g.suffix_ids) for g in groups) == 5
    for g, rows in zip(groups, members, strict=True):
        assert len(rows) == len(g.suffix_ids)
        for r, suffix in zip(rows, g.suffix_ids):
            row = input_ids[r][mask[r].bool()].tolist()
            assert g.prefix_ids + suffix == row
    right_padded = mask.clone()
    right_padded[0, :8] = torch.tensor([1] * 8)  # a prompt mask with a hole (padding inside): not ours to share
    right_padded[0, 0] = 0
    right_padded[0, 1] = 1
    right_padded[0, 7] = 0
    assert trl_prefix_groups(input_ids, right_padded, C) is None


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft"])
def test_shared_prefix_trainer_trains_as_grpo_trainer(hf_tiny, tiny_model_dir, tmp_path, monkeypatch, use_peft):
    """The same RPO run (RPORollout, seeded) under GRPOTrainer and under SharedPrefixGRPOTrainer: the same
    samples, rewards, losses and gradient norms step after step, and no fallback to TRL's own pass. With
    TRL's peft_config too (its LoRA adapters trained, the reference pass inside disable_adapter())."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rpo_engine.integrations.trl import RPORollout, SharedPrefixGRPOTrainer

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    _, tok = hf_tiny
    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "7*8=", "answer": "56"}]

    def longer(prompts, completions, **kwargs):  # one prompt's group without signal: left out of the gradient
        return [1.0 if p == "7*8=" else len(c) / 10.0 for p, c in zip(prompts, completions)]

    def run(trainer_class):
        rpo = RPORollout(seed=1, rpo_cache_policy="epsilon-greedy", rpo_unverified_cut_fraction=0.5)
        samples = []

        def recorded(prompts, trainer):
            out = rpo(prompts, trainer)
            samples.append(out["completion_ids"])
            return out

        config = GRPOConfig(output_dir=str(tmp_path / trainer_class.__name__), max_steps=3, num_generations=4,
                            per_device_train_batch_size=8, max_completion_length=24, learning_rate=0.01, use_cpu=True,
                            bf16=False, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no",
                            seed=3, beta=0.04 if use_peft else 0.0)
        peft_config = None
        if use_peft:
            peft = pytest.importorskip("peft")
            peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                reward_funcs=rpo.tracked(longer), args=config, train_dataset=Dataset.from_list(rows),
                                processing_class=tok, rollout_func=recorded, peft_config=peft_config)
        trainer.train()
        if trainer_class is SharedPrefixGRPOTrainer:  # the last step's pass: with a KL term every row has a gradient
            assert trainer.last_logprob_pass["rows_with_gradient"] == (8 if use_peft else 4)
        return samples, [e for e in trainer.state.log_history if "loss" in e]

    import warnings
    theirs = run(GRPOTrainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SharedPrefixGRPOTrainer")  # no fallback to TRL's pass
        ours = run(SharedPrefixGRPOTrainer)
    assert ours[0] == theirs[0] and len(ours[0]) == 3  # the same samples
    for mine, trl_log in zip(ours[1], theirs[1], strict=True):
        for key in ("loss", "grad_norm", "reward", "entropy") + (("kl",) if use_peft else ()):
            assert mine[key] == pytest.approx(trl_log[key], rel=1e-4, abs=1e-6), key
    assert any(e["grad_norm"] > 0 for e in ours[1])


@pytest.mark.parametrize("split", [True, False], ids=["split-attention", "masked-sdpa"])
def test_shared_prefix_trainer_under_autocast(hf_tiny, tmp_path, monkeypatch, split):
    """TRL's bf16 mixed precision (an fp32 model under autocast): the layers compute in bf16, our LM head in
    fp32 outside autocast (TRL's cast_lm_head_to_fp32); within bf16's rounding of TRL's own pass, and nearer
    the fp32 truth than it. Both attention paths: the CPU's split flash calls and the masked SDPA a GPU runs."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    import rpo_engine.model.shared_prefix as shared_prefix

    if not split:
        monkeypatch.setattr(shared_prefix, "split_attention_available", lambda: False)
    hf, tok = hf_tiny
    trainer = shared_prefix_trainer(hf, tok, tmp_path, monkeypatch)
    kept = tok("3 carry 1, 4+1")["input_ids"]
    input_ids, mask, C, prompts = trl_batch(tok, [("12+34=", kept, [5, 1, 9, 3]), ("7*8=", [], [4, 7, 2, 6])], width=8)
    completion_mask = mask[:, 8:].bool()
    with torch.no_grad():
        truth = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, mask, C)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, C)[0]
            theirs = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, mask, C)[0]
    assert ours.dtype == torch.float32
    ours, theirs, truth = (t[completion_mask] for t in (ours, theirs, truth))
    assert (ours - theirs).abs().max() < 0.01
    assert (ours - truth).abs().mean() <= (theirs - truth).abs().mean()


def test_shared_prefix_trainer_leaves_groups_without_signal_out_of_the_gradient(hf_tiny, tmp_path, monkeypatch):
    """In the loss's pass (no KL term, no entropy bonus) a group whose advantages are all zero adds exactly zero
    to the gradient: its values are computed for TRL's metrics without one. Gradients of a loss proportional to
    the advantages, log-probs and entropies: TRL's own pass's."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    hf, tok = hf_tiny
    trainer = shared_prefix_trainer(hf, tok, tmp_path, monkeypatch)
    kept = tok("3 carry 1, 4+1")["input_ids"]
    input_ids, mask, C, prompts = trl_batch(tok, [("12+34=", kept, [5, 1, 9, 3]), ("7*8=", [], [4, 7, 2, 6]),
                                         ("5+5=", kept[:2], [2, 0, 3])], width=10)
    without_signal = torch.tensor([p == "7*8=" for p in prompts])
    advantages = torch.randn(len(without_signal)).masked_fill(without_signal, 0.0)
    completion_mask = mask[:, 10:].bool()

    def run(method):
        hf.zero_grad(set_to_none=True)
        trainer._loss_advantages = advantages  # as _compute_loss sets it for its pass
        logps, entropies, _ = method(trainer, trainer.model, input_ids, mask, C, compute_entropy=True)
        trainer._loss_advantages = None
        (logps * advantages[:, None])[completion_mask].sum().backward()
        return (logps.detach()[completion_mask], entropies.detach()[completion_mask],
                {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None})

    ours = run(type(trainer)._get_per_token_logps_and_entropies)
    assert trainer.last_logprob_pass["rows_with_gradient"] == len(without_signal) - int(without_signal.sum()) > 0
    theirs = run(GRPOTrainer._get_per_token_logps_and_entropies)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-4, atol=1e-5, msg=name)
    # a batch without signal: one group still runs with a gradient (all zero, as TRL's), so backward works and
    # AdamW steps every parameter by its moments as it would after TRL's pass
    advantages = torch.zeros_like(advantages)
    ours = run(type(trainer)._get_per_token_logps_and_entropies)
    theirs = run(GRPOTrainer._get_per_token_logps_and_entropies)
    assert 0 < trainer.last_logprob_pass["rows_with_gradient"] < len(without_signal)
    assert sorted(ours[2]) == sorted(theirs[2]) and all(not g.any() for g in ours[2].values())
    trainer.beta = 0.04  # a KL term has a gradient at advantage 0: every row runs with one
    trainer._loss_advantages = advantages
    trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, C)
    assert trainer.last_logprob_pass["rows_with_gradient"] == len(without_signal)


def test_shared_prefix_trainer_dropout(hf_tiny, tmp_path, monkeypatch):
    """PEFT's lora_dropout: our pass applies it in train mode, as TRL's does (each call another draw), and in
    eval mode equals TRL's pass. A config's attention_dropout, which our decoder does not compute, sends the
    train-mode passes to TRL's own, with a warning."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    hf, tok = hf_tiny
    model = with_adapters(hf, std=0.5, lora_dropout=0.3, target_modules="all-linear")
    trainer = shared_prefix_trainer(model, tok, tmp_path, monkeypatch)
    input_ids, mask, C, _ = trl_batch(tok, [("12+34=", [], [5, 1, 9, 3]), ("7*8=", [], [4, 7, 2, 6])], width=8)
    completion_mask = mask[:, 8:].bool()

    def ours():
        with torch.no_grad():
            return trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, C)[0][completion_mask]

    trainer.model.train()
    assert (ours() - ours()).abs().max() > 1e-3  # another dropout draw each call
    trainer.model.eval()
    with torch.no_grad():
        theirs = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, mask, C)[0]
    torch.testing.assert_close(ours(), theirs[completion_mask], rtol=1e-5, atol=1e-5)

    trainer.model.train()
    model.config.attention_dropout = 0.1
    with pytest.warns(UserWarning, match="attention_dropout"):
        trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, C)


def test_shared_prefix_trainer_follows_replaced_parameters(hf_tiny, tmp_path, monkeypatch):
    """Parameters resized (resize_token_embeddings) or replaced after a pass: the next pass runs on them, equal
    to TRL's, and the decoder on the old ones is let go (it would keep them alive)."""
    from trl import GRPOTrainer

    hf, tok = hf_tiny
    trainer = shared_prefix_trainer(hf, tok, tmp_path, monkeypatch)
    input_ids, mask, C, _ = trl_batch(tok, [("12+34=", [], [5, 1, 9]), ("7*8=", [], [4, 7])], width=8)
    completion_mask = mask[:, 8:].bool()
    mlp = hf.model.layers[0].mlp
    for change in (lambda: hf.resize_token_embeddings(hf.config.vocab_size + 8),
                   lambda: setattr(mlp, "up_proj", torch.nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features,
                                                                   bias=False))):
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, C)
            change()
            ours = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, C)[0]
            theirs = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, input_ids, mask, C)[0]
        torch.testing.assert_close(ours[completion_mask], theirs[completion_mask], rtol=1e-5, atol=1e-5)
        (decoder,) = trainer._shared_models.values()
        assert decoder.config.vocab_size == hf.config.vocab_size
        assert decoder.model.layers[0].mlp.up_proj.weight is mlp.up_proj.weight
