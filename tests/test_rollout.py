"""RolloutEngine on tiny random checkpoints: greedy parity with transformers, exact log-probs, sampling
distributions, block accounting, prefix reuse, preemption, seeds, live weights, bad input.

Our models live on tests.helpers.DEVICE: with RPO_TEST_DEVICE=cuda every test here runs the engine's CUDA
path (Triton decode attention, CUDA graphs) against transformers on the CPU."""
import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import rpo_engine
from rpo_engine.rollout import RolloutEngine, SamplingParams
from rpo_engine.rollout.sampler import (CANDIDATES, CHUNK, inverse_cdf, request_key, sample, sample_reference,
                                        stream_uniform, stream_uniforms, uniform)
from tests.helpers import DEVICE, ON_CUDA, SCALED_ROPES, check_tables, save_hf_checkpoint


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.gpu]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        directory = tmp_path_factory.mktemp(family)
        out[family] = (save_hf_checkpoint(family, directory), rpo_engine.load_model(directory, device=DEVICE))
    return out


def random_prompts(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                      min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_hf_logprobs(hf, prompt, completion, atol=1e-4):
    """The completion's log-probs (T = 1) are what one transformers forward over prompt + completion gives: a
    position or logit error that leaves the greedy tokens of a tiny random model alone shows here."""
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(completion.logprobs), want, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers(checkpoints, family):
    hf, model = checkpoints[family]
    prompts = random_prompts(hf.config.vocab_size, [5, 13, 8, 3, 16])
    budgets = [12, 6, 15, 9, 4]  # a different budget per prompt, as RPO asks for
    engine = RolloutEngine(model, block_size=4)  # small blocks: many blocks, forks, copy-on-write
    engine.runner.cascade_min_saved_tokens = 1  # group samples by prompt blocks even for these short prompts
    params = [SamplingParams(n=3, max_new_tokens=b, temperature=0, stop_token_ids=[]) for b in budgets]
    outs = engine.generate(prompts, params)
    assert [len(o) for o in outs] == [3] * len(prompts)
    for prompt, budget, samples in zip(prompts, budgets, outs):
        expected = hf_greedy(hf, prompt, budget)
        for c in samples:
            assert c.token_ids == expected and c.finish_reason == "length" and len(c.logprobs) == budget
            assert_hf_logprobs(hf, prompt, c)
    stats = engine.last_stats
    assert stats.prefill_tokens == sum(map(len, prompts))  # each prompt prefilled once
    assert stats.forked_tokens == 2 * sum(map(len, prompts))
    assert stats.blocks_used == 0  # nothing leaks
    # Same results with sharing off (each sample prefills its own prompt).
    plain = RolloutEngine(model, block_size=4, enable_prefix_sharing=False).generate(prompts, params)
    assert [[c.token_ids for c in o] for o in plain] == [[c.token_ids for c in o] for o in outs]


@pytest.mark.parametrize("family,rope", [("llama", "yarn-mscale"), ("qwen2", "yarn-attention-factor"),
                                         ("qwen3", "yarn"), ("qwen2", "linear")])
def test_greedy_with_scaled_rope_matches_transformers(tmp_path, family, rope):
    """YaRN / linear RoPE through the paged path (prefill, cached keys, decode) past the original 16-token
    context: token for token what transformers' generate gives."""
    hf = save_hf_checkpoint(family, tmp_path, rope_scaling=dict(SCALED_ROPES[rope]))
    model = rpo_engine.load_model(tmp_path, device=DEVICE)
    prompts, budgets = random_prompts(hf.config.vocab_size, [11, 20]), [30, 24]
    params = [SamplingParams(max_new_tokens=b, temperature=0, stop_token_ids=[]) for b in budgets]
    outs = RolloutEngine(model, block_size=4).generate(prompts, params)
    for prompt, budget, (completion,) in zip(prompts, budgets, outs):
        assert completion.token_ids == hf_greedy(hf, prompt, budget)
        assert_hf_logprobs(hf, prompt, completion)


def test_scaled_rope_context_is_vllms(tmp_path):
    """A YaRN config's sequences reach its factor times its original context (vLLM's max_model_len), past a
    max_position_embeddings left at the original, as Qwen's model cards leave it; no further."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    hf = save_hf_checkpoint("qwen2", tmp_path, rope_scaling=scaling, max_position_embeddings=16)
    model = rpo_engine.load_model(tmp_path, device=DEVICE)
    assert model.config.max_model_len == 64
    prompt = random_prompts(hf.config.vocab_size, [20])[0]
    engine = RolloutEngine(model, block_size=4)
    (completion,), = engine.generate([prompt], SamplingParams(max_new_tokens=44, temperature=0, stop_token_ids=[]))
    assert completion.token_ids == hf_greedy(hf, prompt, 44)
    assert_hf_logprobs(hf, prompt, completion)
    with pytest.raises(ValueError, match=r"exceed the model's context of 64 tokens \(max_position_embeddings, with "
                                         r"its rope_scaling\)"):
        engine.generate([prompt], SamplingParams(max_new_tokens=45))


def test_stop_tokens(checkpoints):
    hf, model = checkpoints["qwen2"]
    prompt = random_prompts(hf.config.vocab_size, [7])[0]
    free = RolloutEngine(model, block_size=4).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0,
                                                                                stop_token_ids=[]))[0][0]
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    got = RolloutEngine(model).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0,
                                                                  stop_token_ids=[stop]))[0][0]
    assert got.token_ids == free.token_ids[:first + 1] and got.finish_reason == "stop"  # stop token included
    original = model.config
    model.config = dataclasses.replace(original, eos_token_ids=(stop,))  # None means the model's eos ids
    try:
        got = RolloutEngine(model).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0))[0][0]
    finally:
        model.config = original
    assert got.token_ids == free.token_ids[:first + 1] and got.finish_reason == "stop"


@pytest.fixture(scope="module")
def worded_checkpoints(tmp_path_factory):
    """The three families with the task tokenizer's byte-level vocabulary (random weights write any of its
    bytes, so a stop string is met across token boundaries, inside a token and within a multi-byte character)."""
    from rpo_engine.data.tokenizer import build_task_tokenizer

    tok, out = build_task_tokenizer(), {}
    for family in ("llama", "qwen2", "qwen3"):
        directory = tmp_path_factory.mktemp(f"worded_{family}")
        out[family] = (save_hf_checkpoint(family, directory, vocab_size=len(tok)),
                       rpo_engine.load_model(directory, device=DEVICE))
    return tok, out


def first_stop(tok, tokens, prompt_len, strings, count_from=0):
    """The index (among the completion's tokens) of the first token that completes one of `strings` in the
    text of the prompt and completion, decoded whole each time, counting the text of tokens[count_from:]
    (0: all of it, transformers' rule; prompt_len: the generated text, vLLM's); None where none does (the
    rule, by brute force)."""
    import os

    counted = len(tok.decode(tokens[:count_from], skip_special_tokens=True)) if count_from else 0
    for i in range(prompt_len, len(tokens)):
        before, after = (tok.decode(tokens[:j], skip_special_tokens=True) for j in (i, i + 1))
        new_from = len(os.path.commonprefix([before, after]))
        if any(after.find(x, max(counted, new_from - len(x) + 1)) != -1 for x in strings):
            return i - prompt_len
    return None


@pytest.mark.parametrize("streaming", [True, False])
def test_stop_strings_reading_equals_the_brute_force_on_random_token_streams(streaming):
    """StopStrings fed a sequence's tokens one by one, as the engine feeds it, stops where the text decoded whole
    each time says, on random byte-level tokens: a prompt that ends inside a character, characters cut in
    two inside the completion, strings of one and of several characters, the counted text starting anywhere
    in the prompt or with the completion."""
    import random

    from rpo_engine.data.tokenizer import build_task_tokenizer
    from rpo_engine.rollout.stop import StopStrings

    tok, rng = build_task_tokenizer(), random.Random(0)
    partial = [i for i in range(len(tok)) if tok.decode([i]) == "\ufffd"]  # a lone byte of a cut character
    for trial in range(120):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))]
        if trial % 2:
            prompt.append(rng.choice(partial))
        completion = [rng.choice(partial) if rng.random() < 0.2 else rng.randrange(len(tok)) for _ in range(24)]
        text = tok.decode(completion, skip_special_tokens=True).replace("\ufffd", "")
        strings = [text[5:6] or "x", text[9:11] or "yz", "q"]
        start = rng.randrange(len(prompt) + 1)  # the counted text begins in the prompt, or with the completion
        stop, state, at = StopStrings(strings, tok, streaming=streaming), None, None
        for i in range(len(completion)):
            completed, state = stop.completed_by_last(prompt + completion[:i + 1], state, start)
            if completed:
                at = i
                break
        assert at == first_stop(tok, prompt + completion, len(prompt), strings, start), (prompt, completion, start)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_stop_strings_match_transformers(worded_checkpoints, family):
    """SamplingParams.stop (vLLM's name) ends each greedy sample at the token transformers' generate(stop_strings=)
    ends it at, token for token; several prompts with their own stop strings in one call, n = 2."""
    tok, checkpoints = worded_checkpoints
    hf, model = checkpoints[family]
    prompts = random_prompts(len(tok), [5, 13, 8, 3])
    engine = RolloutEngine(model, block_size=4, tokenizer=tok)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[]))
    stops = []  # for each prompt, two 3-character pieces of its free completion's text (not a cut character)
    for (c,) in free:
        text = tok.decode(c.token_ids, skip_special_tokens=True)
        stops.append([p for p in (text[3:6], text[14:17]) if p and "\ufffd" not in p] or ["no such text"])
    params = [SamplingParams(n=2, max_new_tokens=40, temperature=0, stop_token_ids=[], stop=s,
                             stop_prompt_tokens=len(prompt)) for s, prompt in zip(stops, prompts)]  # transformers' text
    outs = engine.generate(prompts, params)
    stopped = 0
    for prompt, strings, samples in zip(prompts, stops, outs):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                               eos_token_id=None, pad_token_id=0, stop_strings=strings, tokenizer=tok)
        expected = expected[0, len(prompt):].tolist()
        for c in samples:
            assert c.token_ids == expected
            assert c.finish_reason == ("stop" if len(expected) < 40 else "length")
        stopped += len(expected) < 40
    assert stopped >= 3  # the strings were met, mostly before the budget
    assert engine.last_stats.blocks_used == 0


@pytest.mark.parametrize("streaming", [True, False])
def test_stop_strings_by_brute_force_with_sampling_async_steps_and_preemption(worded_checkpoints, streaming, monkeypatch):
    """Sampled completions end at the first token that completes a stop string, by the text decoded whole
    each step (the engine reads it a token at a time from a DecodeStream, or decodes a window: both ways),
    the prompt's tail included: one begun in a kept RPO path and completed by the suffix stops it. The same
    completions with async scheduling and a K/V budget that preempts."""
    import functools

    from rpo_engine.rollout import engine as engine_module
    from rpo_engine.rollout.stop import StopStrings

    monkeypatch.setattr(engine_module, "StopStrings", functools.partial(StopStrings, streaming=streaming))
    tok, checkpoints = worded_checkpoints
    _, model = checkpoints["qwen2"]
    prompts = random_prompts(len(tok), [6, 11, 4, 9], seed=3)
    free_params = [SamplingParams(n=4, max_new_tokens=30, temperature=1.0, stop_token_ids=[], seed=i)
                   for i in range(len(prompts))]
    engine = RolloutEngine(model, block_size=4, tokenizer=tok)
    free = engine.generate(prompts, free_params)
    # stop strings from the first sample's text: a pair, two characters, and one that never occurs
    stops = []
    for samples in free:
        text = tok.decode(samples[0].token_ids, skip_special_tokens=True).replace("\ufffd", "")
        stops.append([text[6:8] or "zz", text[15:16] or "z", text[4:5] or "z", "never in this text \u20ac"])
    params = [dataclasses.replace(p, stop=s) for p, s in zip(free_params, stops)]
    outs = engine.generate(prompts, params)
    ended = 0
    for prompt, strings, samples, free_samples in zip(prompts, stops, outs, free):
        for c, f in zip(samples, free_samples):
            at = first_stop(tok, prompt + f.token_ids, len(prompt), strings, len(prompt))  # the same draws, cut
            assert c.token_ids == (f.token_ids if at is None else f.token_ids[:at + 1])
            assert c.finish_reason == ("length" if at is None else "stop")
            ended += at is not None
    assert ended >= 6  # of 16 (and the others ran to their budget)
    small = RolloutEngine(model, block_size=4, num_blocks=12, async_scheduling=True, tokenizer=tok)
    assert [[c.token_ids for c in o] for o in small.generate(prompts, params)] == [[c.token_ids for c in o] for o in outs]
    assert small.stats.preemptions > 0
    # a stop string that a kept path began (the text of its last token and the next): with the kept path counted
    # (stop_prompt_tokens, as the trainer asks), the suffix's first token completes it, and ends it; without, the
    # text before the suffix is the prompt's and does not count (vLLM's rule)
    path = engine.generate([prompts[0]], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[]))[0][0].token_ids
    k = next(k for k in range(1, 30) if all(tok.decode([t]) and "\ufffd" not in tok.decode([t]) for t in path[k - 1:k + 1])
             and tok.decode(path[k - 1:k + 1]) not in tok.decode(path[k:]))
    spanning = tok.decode(path[k - 1:k + 1])
    for counted in (k, 1, 0):
        (suffix,), = engine.generate([prompts[0] + path[:k]], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[],
                                                                             stop=spanning, stop_prompt_tokens=counted))
        assert (suffix.token_ids == [path[k]] and suffix.finish_reason == "stop") == (counted > 0), counted


def test_text_prompts_and_completion_text_with_the_tokenizer(worded_checkpoints):
    """With its tokenizer the engine takes text prompts (encoded as the tokenizer encodes them, special tokens
    and all, as vLLM does) beside token ids, and each Completion has its `text` (vLLM's name): the same samples
    as from the ids, decoded as the rewards read them. Without the tokenizer, either is a one-line error."""
    tok, checkpoints = worded_checkpoints
    _, model = checkpoints["qwen2"]
    engine = RolloutEngine(model, block_size=4, tokenizer=tok)
    texts = ["Q: 12+30=\nA:", "héllo"]
    params = SamplingParams(n=2, max_new_tokens=10, temperature=1.0, seed=3, stop_token_ids=[])
    from_text = engine.generate([texts[0], tok.encode(texts[1])], params)
    from_ids = engine.generate([tok.encode(t) for t in texts], params)
    assert from_text == from_ids  # the same samples (Completion's equality leaves the tokenizer out)
    for samples in from_text:
        for c in samples:
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    import pickle

    c = from_text[0][0]
    assert dataclasses.asdict(c) == {"token_ids": c.token_ids, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
    assert pickle.loads(pickle.dumps(c)) == c and len(pickle.dumps(c)) < 1000  # no tokenizer inside
    bare = RolloutEngine(model, block_size=4)
    with pytest.raises(ValueError, match=r"prompt 0 is text: pass token ids, or build the engine with the model's "
                                         r"tokenizer"):
        bare.generate(["2+2="], params)
    (c, _), = bare.generate([tok.encode(texts[0])], params)
    with pytest.raises(ValueError, match="Completion.text needs the tokenizer"):
        c.text
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty list of token ids"):
        engine.generate([""], params)


def test_a_copied_completion_keeps_its_text():
    """copy.copy / copy.deepcopy of a Completion (a caller keeping a rollout's results) read the text as the original
    does: they share the engine's tokenizer (not copied). Only pickling leaves it out."""
    import copy
    import pickle

    from rpo_engine.rollout.sequence import Completion, with_tokenizer

    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + t) for t in ids)

    tokenizer = Letters()
    c = with_tokenizer(Completion([0, 1, 2], [-0.5, -0.25, -1.0], "length"), tokenizer)
    shallow, deep = copy.copy(c), copy.deepcopy(c)
    assert shallow.text == deep.text == c.text == "abc"
    assert deep == c and deep.token_ids is not c.token_ids and deep._tokenizer is tokenizer
    assert [x.text for x in copy.deepcopy([c, c])] == ["abc", "abc"]
    assert "_tokenizer" not in pickle.loads(pickle.dumps(c)).__dict__


def test_stop_strings_need_the_tokenizer_and_are_strings(checkpoints):
    _, model = checkpoints["qwen2"]
    assert SamplingParams(stop="</answer>").stop == ["</answer>"]  # one string, as vLLM takes it
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    for bad in ([""], [1], ["a", None], b"x", {"a": 1}):
        with pytest.raises(ValueError, match="SamplingParams.stop must be a string or a list of non-empty strings"):
            SamplingParams(stop=bad)
    with pytest.raises(ValueError, match=r"SamplingParams.stop \['x'\] needs the text: build the engine with the "
                                         r"model's tokenizer, RolloutEngine\(model, tokenizer=...\)"):
        RolloutEngine(model).generate([[5, 6]], SamplingParams(max_new_tokens=2, stop=["x"]))
    with pytest.raises(ValueError, match="tokenizer must be a tokenizer"):
        RolloutEngine(model, tokenizer="gpt2")


def test_progress_bar_changes_nothing(checkpoints, capsys):
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [5, 9])
    params = [SamplingParams(n=3, max_new_tokens=6, seed=1), SamplingParams(n=2, max_new_tokens=0)]
    plain = RolloutEngine(model).generate(prompts, params)
    shown = RolloutEngine(model).generate(prompts, params, progress=True)
    assert [[c.token_ids for c in o] for o in shown] == [[c.token_ids for c in o] for o in plain]
    bar = capsys.readouterr().err
    assert "5/5" in bar and bar.lstrip("\r").startswith("generate")  # every sample counted, the budget-0 ones too
    RolloutEngine(model).generate(prompts, params, progress="eval")  # a string names the bar
    assert capsys.readouterr().err.lstrip("\r").startswith("eval")


def test_a_progress_bar_that_fails_to_open_queues_nothing_for_the_next_call(checkpoints, monkeypatch):
    """tqdm raises where there is no stderr to write to (sys.stderr None: pythonw, some daemons). The requests of
    that call must not stay queued: the next call would run them too and write their samples over its own."""
    import rpo_engine.progress

    hf, model = checkpoints["qwen2"]
    first, second = random_prompts(hf.config.vocab_size, [5, 9])
    params = SamplingParams(n=2, max_new_tokens=4, temperature=0, stop_token_ids=[])
    engine = RolloutEngine(model, block_size=4, num_blocks=40)
    want = engine.generate([second], params)

    def no_stderr(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'write'")

    monkeypatch.setattr(rpo_engine.progress, "progress_bar", no_stderr)
    with pytest.raises(AttributeError):
        engine.generate([first], params, progress=True)
    monkeypatch.undo()
    assert engine.scheduler.is_finished() and engine.block_manager.num_used_blocks == 0
    got = engine.generate([second], params)
    assert [c.token_ids for c in got[0]] == [c.token_ids for c in want[0]]


def test_default_stop_includes_the_engines_tokenizer_eos():
    """With stop_token_ids=None an engine built with a tokenizer also stops at the tokenizer's eos token, as vLLM
    stops and as the trainer's stop_ids do: a fine-tuned tokenizer's end of turn that config.json does not name
    (here: a token the model emits greedily) must not run the completion on to its budget."""
    from rpo_engine.data.starter import tiny_task_model

    model, tok = tiny_task_model(hidden_size=32, seed=0)
    prompt = tok.encode("12+30=", add_special_tokens=False)
    free = RolloutEngine(model).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0,
                                                                  stop_token_ids=[]))[0][0].token_ids
    end = next(t for t in free if t not in model.config.stop_token_ids)
    tok = copy.deepcopy(tok)
    tok.eos_token = tok.convert_ids_to_tokens(end)
    assert tok.eos_token_id == end and end not in model.config.stop_token_ids
    got = RolloutEngine(model, tokenizer=tok).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0))[0][0]
    assert got.token_ids == free[:free.index(end) + 1] and got.finish_reason == "stop"
    # an explicit list is the whole set; [] never stops; without a tokenizer the model's eos ids alone
    assert RolloutEngine(model, tokenizer=tok).generate([prompt], SamplingParams(
        max_new_tokens=12, temperature=0, stop_token_ids=[]))[0][0].token_ids == free
    assert RolloutEngine(model).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0))[0][0].token_ids \
        == RolloutEngine(model).generate([prompt], SamplingParams(
            max_new_tokens=12, temperature=0, stop_token_ids=list(model.config.stop_token_ids)))[0][0].token_ids


def test_generation_config_eos_stops_like_transformers(tmp_path):
    """Llama-3-Instruct names its end of turn (<|eot_id|>) only in generation_config.json's eos list: by
    default the engine stops where transformers' generate, which reads that file, stops."""
    import json

    from transformers import AutoModelForCausalLM

    hf = save_hf_checkpoint("llama", tmp_path / "src")
    prompt = random_prompts(hf.config.vocab_size, [7])[0]
    free = hf_greedy(hf, prompt, 12)
    end_of_turn = free[5]
    assert end_of_turn not in free[:5] and end_of_turn != hf.config.eos_token_id
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [hf.config.eos_token_id, end_of_turn], "bos_token_id": hf.config.bos_token_id}))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "src")).eval()
    ids = torch.tensor([prompt])
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                  pad_token_id=0)[0, len(prompt):].tolist()
    assert expected == free[:6]  # transformers stopped at the end of turn, which it emits
    model = rpo_engine.load_model(tmp_path / "src", device=DEVICE)
    assert model.config.stop_token_ids == (hf.config.eos_token_id, end_of_turn)
    got = RolloutEngine(model).generate([prompt], SamplingParams(max_new_tokens=12, temperature=0))[0][0]
    assert got.token_ids == expected and got.finish_reason == "stop"
    model.save_pretrained(tmp_path / "out", tokenizer=None)  # the file travels with the saved model
    assert rpo_engine.load_model(tmp_path / "out").config.stop_token_ids == model.config.stop_token_ids


def teacher_forced_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1].float().cpu()  # [len(completion), V]
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 0, 1.0, 0.0), (1.3, 5, 0.9, 0.0), (0.0, 0, 1.0, 0.0),
                                                           (1.0, 0, 1.0, 0.2)])
def test_logprobs_equal_teacher_forcing(checkpoints, temperature, top_k, top_p, min_p):
    hf, model = checkpoints["llama"]
    prompts = random_prompts(hf.config.vocab_size, [6, 11])
    params = SamplingParams(n=4, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=[], seed=3, min_p=min_p)
    engine = RolloutEngine(model, block_size=4)
    engine.runner.cascade_min_saved_tokens = 1  # the grouped (cascade) decode path, as for long prefixes
    outs = engine.generate(prompts, params)
    for prompt, samples in zip(prompts, outs):
        for c in samples:
            expected = teacher_forced_logprobs(model, prompt, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


def test_each_token_is_drawn_with_the_uniform_of_its_sample_and_position(checkpoints):
    """The module's promise, end to end: token t of sample j is what the teacher-forced logits give with
    uniform(request_key(seed, prompt), j, len(prompt) + t): a fresh draw at every position (not one u reused
    along a sample), its own for each of the n samples."""
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [6, 11])
    params = SamplingParams(n=3, max_new_tokens=12, temperature=1.3, top_p=0.95, stop_token_ids=[], seed=9)
    outs = RolloutEngine(model, block_size=4).generate(prompts, params)
    for prompt, samples in zip(prompts, outs):
        key = request_key(params.seed, prompt)
        for j, c in enumerate(samples):
            ids = torch.tensor([prompt + c.token_ids], device=model.device)
            with torch.no_grad():
                logits = model(ids)[0, len(prompt) - 1:-1].float().cpu()  # [12, V]
            L = len(c.token_ids)
            u = torch.tensor([uniform(key, j, len(prompt) + t) for t in range(L)], dtype=torch.float64)
            want, _ = sample_reference(logits, torch.full((L,), 1.3), torch.zeros(L, dtype=torch.long),
                                       torch.full((L,), 0.95), u)
            assert c.token_ids == want.tolist(), (j, c.token_ids, want.tolist())
        assert len({tuple(c.token_ids) for c in samples}) == len(samples)


def exact_distribution(logits, temperature, top_k, top_p, min_p=0.0):
    p = torch.softmax(logits.double() / temperature, -1)
    low = p < min_p * p.max()  # min-p: relative to the most likely token, whatever top-k/top-p keep
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    kept_k = p >= p[order[top_k - 1]] if top_k > 0 else order  # ties with the k-th kept, as in transformers
    q = torch.zeros_like(p)
    q[kept_k] = p[kept_k]
    q /= q.sum()
    mass = 0.0
    for i in order.tolist():  # nucleus: the smallest prefix whose mass reaches top_p
        if q[i] == 0 or mass >= top_p:
            break
        keep[i] = True
        mass += q[i].item()
    q = torch.where(keep & ~low, q, 0.0)
    return q / q.sum()


def test_head_logits_keep_cublas_fp32_accumulator_on_cuda():
    """The sampler's logits: on CUDA a bf16 model's come from cuBLAS in fp32, never rounded to bf16 (up to
    0.12 at a logit of 32), as the Triton fused log-prob of the training forward keeps them; elsewhere the model dtype's
    product, as the torch fused log-prob rounds it."""
    from rpo_engine.rollout.model_runner import head_logits

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 256, generator=g).bfloat16().to(DEVICE)
    weight = torch.randn(1000, 256, generator=g).bfloat16().to(DEVICE)
    got = head_logits(hidden, weight)
    assert got.dtype == torch.float32 and got.shape == (5, 1000)
    if ON_CUDA:
        exact = hidden.double() @ weight.double().T
        assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    else:
        assert torch.equal(got, (hidden @ weight.T).float())


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1.0, 4, 1.0, 0.0),
                                                           (1.0, 0, 0.7, 0.0), (1.5, 6, 0.8, 0.0), (1.0, 0, 1.0, 0.15),
                                                           (1.5, 8, 0.9, 0.3)])
def test_sampler_draws_from_the_truncated_distribution(temperature, top_k, top_p, min_p):
    V, N = 12, 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(7)) * 1.5
    key = request_key(11, [1, 2, 3])
    u = torch.tensor([uniform(key, i, 5) for i in range(N)], dtype=torch.float64)
    rows = logits.expand(N, V)
    tokens, logp = sample(rows, torch.full((N,), temperature), torch.full((N,), top_k),
                          torch.full((N,), top_p), u, min_p=torch.full((N,), min_p) if min_p else None)
    expected = exact_distribution(logits, temperature, top_k, top_p, min_p)
    if min_p:  # it cuts something the other settings keep
        assert (expected == 0).sum() > (exact_distribution(logits, temperature, top_k, top_p) == 0).sum()
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[expected == 0].sum() == 0  # never a truncated token
    kept = expected > 0
    chi2 = ((counts[kept] - N * expected[kept]) ** 2 / (N * expected[kept])).sum().item()
    df = int(kept.sum()) - 1
    if df > 0:  # Wilson-Hilferty critical value at p = 1e-4
        crit = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3
        assert chi2 < crit, (chi2, crit)
    assert 0.5 * (counts / N - expected).abs().sum() < 0.02  # total variation
    # Log-probs are those of the untruncated tempered distribution.
    torch.testing.assert_close(logp, torch.log_softmax(logits / temperature, -1)[tokens], atol=1e-6, rtol=0)


def test_stream_uniforms_equal_the_scalar_draws():
    """The decode step's draws, made for all sequences at once in uint64 arrays, are the scalar splitmix64
    draws bit for bit, at the edges of the 64-bit range too."""
    g = torch.Generator().manual_seed(0)
    streams = [int(x) for x in torch.randint(0, 2 ** 62, (500,), generator=g)] + [0, 2 ** 64 - 1, 2 ** 63]
    streams = [s * 3 % 2 ** 64 for s in streams]  # spread over all 64 bits
    positions = [int(x) for x in torch.randint(0, 2 ** 31, (len(streams),), generator=g)]
    assert stream_uniforms(streams, positions).tolist() == [stream_uniform(s, p) for s, p in zip(streams, positions)]


def test_uniforms_are_uniform_and_independent_along_a_sample_and_across_samples():
    """What the engine draws with: along one sample's positions (each token a fresh u), and between two
    samples of one request or two seeds at the same positions, 20-bin chi-square and correlations."""
    N = 5000
    key = request_key(3, [4, 5, 6])
    draws = {name: torch.tensor([uniform(k, j, 7 + t) for t in range(N)], dtype=torch.float64)
             for name, k, j in (("a", key, 0), ("b", key, 1), ("c", request_key(4, [4, 5, 6]), 0))}
    for u in draws.values():
        counts = torch.bincount((u * 20).long(), minlength=20).double()
        assert ((counts - N / 20) ** 2 / (N / 20)).sum() < 50  # chi-square, 19 df: p ~ 1e-4
        assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 4 / math.sqrt(N)  # lag 1
    a = draws["a"]
    for other in ("b", "c"):
        assert abs(torch.corrcoef(torch.stack([a, draws[other]]))[0, 1]) < 4 / math.sqrt(N)


def test_inverse_cdf_draws_like_a_full_fp64_cumsum_and_never_a_zero_weight():
    """The two-level search against one fp64 cumulative sum over the row, with zero-weight tokens and chunks,
    a vocabulary that is not a multiple of the chunk, and u at 0, just below 1 and exactly on token and chunk
    boundaries."""
    g = torch.Generator().manual_seed(3)
    V = 3 * CHUNK + 37
    weights = torch.rand(6, V, generator=g) ** 8  # some tiny, many near zero
    weights[:, CHUNK:2 * CHUNK] = 0  # a whole empty chunk
    weights[weights < 0.05] = 0
    weights[1, :] = 0
    # four tokens, one in the tail, of total 8: u = k/8 puts u * total exactly on the boundary between two
    # tokens (1/8), two chunks (4/8) and a chunk and an empty one (3/8), where a draw takes the token below
    weights[1, [5, CHUNK - 1, 2 * CHUNK + 3, 3 * CHUNK + 36]] = torch.tensor([1.0, 2.0, 1.0, 4.0])
    cdf = weights.double().cumsum(-1)
    u = torch.cat([torch.tensor([0.0, 1 - 2 ** -53, 1 / 8, 3 / 8, 4 / 8]),
                   torch.rand(195, generator=g, dtype=torch.float64)])
    for row in range(weights.shape[0]):
        w = weights[row].expand(len(u), V).to(DEVICE)
        got = inverse_cdf(w, u.to(DEVICE)).cpu()
        want = torch.searchsorted(cdf[row].expand(len(u), V).contiguous(),
                                  (u * cdf[row, -1]).clamp_min(torch.finfo(torch.float64).tiny)[:, None])[:, 0]
        assert (weights[row, got] > 0).all()
        assert torch.equal(got, want), row


def test_sample_equals_the_reference_on_a_large_vocabulary():
    """Every path of the fast sampler (untruncated, top-k, top-p found among the candidates, top-p of a flat
    row that falls back to the whole sort, top-k + top-p, greedy) draws what sample_reference draws, with
    the same log-probs, at a vocabulary where the candidate search is taken."""
    g = torch.Generator().manual_seed(5)
    V = 4 * CANDIDATES + 301
    kinds = [(1.0, 0, 1.0, 4.0, 0.0), (0.7, 50, 1.0, 4.0, 0.0), (1.3, 0, 0.9, 6.0, 0.0), (1.0, 0, 0.9, 0.5, 0.0),
             (0.9, 20, 0.5, 3.0, 0.0), (0.0, 0, 1.0, 4.0, 0.0), (0.0, 7, 0.8, 4.0, 0.0), (1.0, 0, 1.0, 4.0, 0.05),
             (1.2, 0, 0.9, 2.0, 0.1), (1.0, 30, 1.0, 4.0, 0.2), (1.0, 0, 0.9, 0.5, 0.9)]
    rows = [kind for kind in kinds for _ in range(24)]
    logits = torch.stack([torch.randn(V, generator=g) * kind[3] for kind in rows])
    temperature = torch.tensor([r[0] for r in rows])
    top_k = torch.tensor([r[1] for r in rows])
    top_p = torch.tensor([r[2] for r in rows])
    min_p = torch.tensor([r[4] for r in rows])
    u = torch.rand(len(rows), generator=g, dtype=torch.float64)
    u[:2] = torch.tensor([0.0, 1 - 2 ** -53])
    args = [t.to(DEVICE) for t in (logits, temperature, top_k, top_p, u)]
    want, want_logp = sample_reference(*args, min_p=min_p.to(DEVICE))
    for flags in [dict(), dict(truncate=True, any_greedy=True)]:
        got, got_logp = sample(*args, **flags, min_p=min_p.to(DEVICE))
        assert torch.equal(got, want)
        torch.testing.assert_close(got_logp, want_logp, atol=2e-5, rtol=0)
    # a whole batch of one kind, as the engine runs it (flags from its Python lists)
    for i, (t, k, p, _, m) in enumerate(kinds):
        part = slice(24 * i, 24 * (i + 1))
        got, got_logp = sample(*[a[part] for a in args], truncate=t > 0 and (k > 0 or p < 1),
                               any_greedy=t == 0, all_greedy=t == 0, min_p=min_p[part].to(DEVICE) if m else None)
        assert torch.equal(got, want[part]), kinds[i]
        torch.testing.assert_close(got_logp, want_logp[part], atol=2e-5, rtol=0)


@pytest.mark.parametrize("V", [50, 4 * CANDIDATES + 301])
def test_top_k_keeps_the_tokens_tied_with_its_kth_as_transformers_does(V):
    """transformers and vLLM keep every token whose logit equals the k-th largest (bf16 logits often tie
    there). A tie run inside the candidates, one past them, one past the 8x wider look (then the whole sort);
    V = 50 is drawn by sample_reference."""
    from transformers.generation.logits_process import TopKLogitsWarper

    k, N = 5, 1000
    runs = [4, 100, 2000] if V > 2 * CHUNK else [4, 20]
    rows = []
    for length in runs:  # three tokens at 2, then `length` tied at 1, the rest far below
        row = torch.full((V,), -10.0) - torch.arange(V) * 1e-3
        row[:3], row[3:3 + length] = 2.0, 1.0
        rows.append(row[torch.randperm(V, generator=torch.Generator().manual_seed(length))])
    for row, length in zip(rows, runs):
        kept = TopKLogitsWarper(k)(None, row[None])[0] > float("-inf")
        assert int(kept.sum()) == 3 + length
        u = ((torch.arange(N, dtype=torch.float64) + 0.5) / N).to(DEVICE)
        tokens, _ = sample(row.expand(N, V).to(DEVICE), torch.ones(N, device=DEVICE),
                           torch.full((N,), k, device=DEVICE), torch.ones(N, device=DEVICE), u)
        tokens = tokens.cpu()
        assert kept[tokens].all()
        tied = (row[tokens] == 1.0).double().mean().item()
        expected = length * math.e / (3 * math.e ** 2 + length * math.e)  # k = 5 by rank would give 0.08
        assert abs(tied - expected) < 0.01, (length, tied, expected)


@pytest.mark.parametrize("V", [50, 4 * CANDIDATES + 301])
def test_top_p_and_min_p_at_their_exact_boundaries_keep_what_transformers_keeps(V):
    """Equal logits make the boundaries exact: four tokens of 1/4 at top_p 0.5, the third token's mass before it is
    exactly 0.5, so the nucleus is two tokens (transformers drops a token whose mass before it reaches top_p);
    min_p 1 keeps the tokens tied with the most likely one (it drops only those less likely), with top-k on or off.
    V = 50 is drawn by sample_reference, the larger vocabulary by the candidate search."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopPLogitsWarper

    N = 400
    u = ((torch.arange(N, dtype=torch.float64) + 0.5) / N).to(DEVICE)
    ones, no_k = torch.ones(N, device=DEVICE), torch.zeros(N, dtype=torch.long, device=DEVICE)
    flat = torch.full((V,), -1e4)  # exp(-1e4) is 0 in fp32: outside every distribution
    flat[[3, 8, 20, 41]] = 0.0
    assert int((TopPLogitsWarper(0.5)(None, flat[None])[0] > float("-inf")).sum()) == 2
    tokens, _ = sample(flat.expand(N, V).to(DEVICE), ones, no_k, torch.full((N,), 0.5, device=DEVICE), u)
    assert len(set(tokens.tolist())) == 2 and set(tokens.tolist()) <= {3, 8, 20, 41}
    tied = torch.full((V,), -1e4)
    tied[[5, 30]], tied[[7, 12]] = 0.0, torch.tensor([-0.5, -1.0])
    kept = MinPLogitsWarper(1.0)(None, tied[None])[0] > float("-inf")
    assert kept.nonzero().flatten().tolist() == [5, 30]
    for top_k in (0, 3):
        tokens, _ = sample(tied.expand(N, V).to(DEVICE), ones, torch.full((N,), top_k, device=DEVICE), ones, u,
                           min_p=ones)
        assert set(tokens.tolist()) == {5, 30}, top_k


def test_top_p_looks_among_more_candidates_before_sorting_the_vocabulary(monkeypatch):
    """A nucleus past the first CANDIDATES tokens is found among 8x as many; only a flat row sorts the whole
    vocabulary (sample_reference). The draws are the reference's either way."""
    import rpo_engine.rollout.sampler as sampler

    g = torch.Generator().manual_seed(9)
    V = 32 * CANDIDATES + 11
    scales = [4.0] * 6 + [2.5] * 6 + [1.0] * 4  # nucleus of ~10-300, ~3.5k, ~20k tokens
    logits = torch.stack([torch.randn(V, generator=g) * scale for scale in scales]).to(DEVICE)
    R = len(scales)
    args = (logits, torch.ones(R, device=DEVICE), torch.zeros(R, dtype=torch.long, device=DEVICE),
            torch.full((R,), 0.9, device=DEVICE), torch.rand(R, generator=g, dtype=torch.float64).to(DEVICE))
    want = sample_reference(*args)[0]
    sorted_rows = []
    reference = sampler.sample_reference
    monkeypatch.setattr(sampler, "sample_reference", lambda *a, **k: sorted_rows.append(len(a[0])) or reference(*a, **k))
    assert torch.equal(sample(*args, truncate=True, any_greedy=False)[0], want)
    assert sorted_rows == [4]
    # At the edge: the top CANDIDATES tokens hold 0.85 of the mass, top_p = 0.9 needs more of the rest.
    V, R = 4 * CANDIDATES + 301, 16
    probs = torch.cat([torch.linspace(2, 1, CANDIDATES), torch.linspace(0.1, 0.09, V - CANDIDATES)])
    head, tail = probs[:CANDIDATES], probs[CANDIDATES:]
    probs = torch.cat([0.85 * head / head.sum(), 0.15 * tail / tail.sum()])
    args = (probs.log().expand(R, V).to(DEVICE), torch.ones(R, device=DEVICE),
            torch.zeros(R, dtype=torch.long, device=DEVICE), torch.full((R,), 0.9, device=DEVICE),
            ((torch.arange(R, dtype=torch.float64) + 0.5) / R).to(DEVICE))
    sorted_rows.clear()
    got = sample(*args, truncate=True, any_greedy=False)[0]
    assert torch.equal(got, reference(*args)[0]) and (got >= CANDIDATES).any()
    assert sorted_rows == [R]


def test_forks_share_prefix_blocks_and_accounting_holds_every_step(checkpoints):
    hf, model = checkpoints["qwen3"]
    G, bs = 6, 4
    prompt = random_prompts(hf.config.vocab_size, [10])[0]  # 2 full blocks + a partial one
    engine = RolloutEngine(model, block_size=bs, num_blocks=64)
    bm, seen = engine.block_manager, []
    assert bm.tables is engine.runner.block_tables
    step = engine.step

    def checked_step():
        finished = step()
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        check_tables(bm, [*engine.scheduler.running, *finished])  # the decode step reads these rows
        if not seen:  # right after the prefill: G samples, the prompt's full blocks held once each
            running = list(engine.scheduler.running)
            assert len(running) == G
            table = running[0].block_table
            assert all(s.block_table == table for s in running)
            assert [bm.blocks[b].ref_count for b in table] == [G] * 3
            assert bm.num_used_blocks == 3
        seen.append(bm.num_used_blocks)
        return finished

    engine.step = checked_step
    outs = engine.generate([prompt], SamplingParams(n=G, max_new_tokens=6, seed=0, stop_token_ids=[]))
    assert len(outs[0]) == G and len({tuple(c.token_ids) for c in outs[0]}) > 1
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks  # nothing leaks
    # K/V written for positions 0..14: 2 shared full blocks + per sample its copy of block 2 and block 3.
    assert engine.last_stats.peak_blocks_used == max(seen) == 2 + 2 * G


def test_prefix_cache_hit_on_repeated_prompt(checkpoints):
    hf, model = checkpoints["llama"]
    prompt = random_prompts(hf.config.vocab_size, [13])[0]
    engine = RolloutEngine(model, block_size=4)
    params = SamplingParams(n=2, max_new_tokens=5, temperature=0, stop_token_ids=[])
    a, b = engine.generate([prompt, prompt], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # the same log-probs too: the hit's last prompt token runs at its own position (12), not at 0 (greedy tokens
    # of this tiny model do not tell)
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), rtol=0, atol=1e-4)
    stats = engine.last_stats
    assert stats.cached_tokens == 12  # 3 full blocks; the last token's block is computed
    assert stats.prefill_tokens == 13 + 1
    assert stats.reused_tokens == 12 + 2 * 13
    assert engine.stats.cached_tokens == 12  # cumulative


def test_more_samples_than_max_num_seqs_go_in_parts_with_the_same_samples(checkpoints):
    """n = 7 with max_num_seqs = 3: the request goes in as parts of 3, 3 and 1 samples, never more than 3 decoded
    at once; the later parts read the prompt's full blocks from the prefix cache. The samples and log-probs are
    those of one engine that holds all 7 (each sample's draws depend on its index, not on its part)."""
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [9, 5])
    params = SamplingParams(n=7, max_new_tokens=6, temperature=1.0, stop_token_ids=[], seed=3)
    expected = RolloutEngine(model, block_size=4).generate(prompts, params)
    narrow = RolloutEngine(model, block_size=4, max_num_seqs=3)
    widths, step = [], narrow.step

    def counted_step():
        widths.append(len(narrow.scheduler.running))
        return step()

    narrow.step = counted_step
    got = narrow.generate(prompts, params)
    assert max(widths) <= 3 and len({tuple(c.token_ids) for c in got[0]}) > 1
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in expected]
    for o, e in zip(got, expected):
        for c, d in zip(o, e):
            torch.testing.assert_close(c.logprobs, d.logprobs, atol=1e-5, rtol=0)
    assert narrow.last_stats.cached_tokens == 2 * 8 + 2 * 4  # the 9-token prompt's 2 full blocks, the 5's one
    assert narrow.block_manager.num_used_blocks == 0


def test_preemption_under_a_small_kv_budget_gives_same_results(checkpoints):
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [9, 14, 6, 11])
    greedy = [SamplingParams(n=3, max_new_tokens=b, temperature=0, stop_token_ids=[]) for b in (20, 14, 24, 18)]
    sampled = SamplingParams(n=3, max_new_tokens=16, temperature=1.0, top_p=0.9, stop_token_ids=[], seed=5)
    roomy = RolloutEngine(model, block_size=4)
    tight = RolloutEngine(model, block_size=4, num_blocks=12)  # 48 tokens for 12 sequences of up to 38
    for params in (greedy, sampled):
        expected, got = roomy.generate(prompts, params), tight.generate(prompts, params)
        assert tight.last_stats.preemptions > 0 and roomy.last_stats.preemptions == 0
        assert tight.block_manager.num_used_blocks == 0
        # Counter-based random streams: even sampled tokens do not depend on preemption.
        assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in expected]
        for o, e in zip(got, expected):
            for c, d in zip(o, e):
                torch.testing.assert_close(c.logprobs, d.logprobs, atol=1e-5, rtol=0)
    assert tight.stats.preemptions >= tight.last_stats.preemptions


def test_seeds_reproduce_regardless_of_batch(checkpoints):
    hf, model = checkpoints["qwen3"]
    a, b, c = random_prompts(hf.config.vocab_size, [7, 12, 4])
    engine = RolloutEngine(model, block_size=4)
    p = SamplingParams(n=3, max_new_tokens=8, seed=42, stop_token_ids=[])
    alone = engine.generate([a], p)[0]
    again = engine.generate([a], p)[0]
    mixed = engine.generate([b, a, c], [SamplingParams(n=2, max_new_tokens=5, seed=1), p,
                                        SamplingParams(n=4, max_new_tokens=9)])[1]
    assert [x.token_ids for x in alone] == [x.token_ids for x in again] == [x.token_ids for x in mixed]
    for x, y in zip(alone, mixed):  # batched beside other lengths: the same positions and logits
        torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-5, rtol=0)
    other = engine.generate([a], SamplingParams(n=3, max_new_tokens=8, seed=43, stop_token_ids=[]))[0]
    assert [x.token_ids for x in other] != [x.token_ids for x in alone]
    torch.manual_seed(0)
    x = engine.generate([a], SamplingParams(n=2, max_new_tokens=8))[0]
    torch.manual_seed(0)
    y = engine.generate([a], SamplingParams(n=2, max_new_tokens=8))[0]  # seed=None follows torch's seed
    assert [s.token_ids for s in x] == [s.token_ids for s in y]


def test_reads_live_weights(checkpoints):
    hf, model = checkpoints["llama"]
    prompt = random_prompts(hf.config.vocab_size, [12])[0]
    engine = RolloutEngine(model, block_size=4)
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])
    before = engine.generate([prompt], params)[0][0].token_ids
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        with torch.no_grad():  # an optimizer step, in place
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        after = engine.generate([prompt], params)[0][0].token_ids  # the prompt's cached blocks are stale now
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids], device=model.device))[0, -1].argmax()))
        assert after == ids[len(prompt):] and after != before
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)


def test_default_kv_budget_is_capped_at_what_the_batch_can_use(checkpoints):
    """Uncapped, a tiny model on CUDA would get half the GPU: millions of blocks, and a second engine
    alive beside it (several tests here hold two) would find no memory left."""
    _, model = checkpoints["qwen2"]
    per_seq = model.config.max_position_embeddings // 4  # blocks of 4 tokens
    assert RolloutEngine(model, block_size=4, max_num_seqs=3).runner.num_blocks == 3 * per_seq
    assert RolloutEngine(model, block_size=4, max_num_seqs=3, num_blocks=5000).runner.num_blocks == 5000  # asked for


def test_edge_cases_and_bad_input(checkpoints):
    hf, model = checkpoints["qwen2"]
    engine = RolloutEngine(model, block_size=4, num_blocks=40)
    assert engine.generate([], SamplingParams()) == []
    empty = engine.generate([[5, 6]], SamplingParams(n=2, max_new_tokens=0))
    assert [(c.token_ids, c.finish_reason) for c in empty[0]] == [([], "length")] * 2
    V, max_len = model.config.vocab_size, model.config.max_position_embeddings
    bad = [
        ([[]], SamplingParams()),  # empty prompt
        ([[1, V]], SamplingParams()),  # token out of vocab
        ([[1, -1]], SamplingParams()),
        ([[1] * (max_len + 1)], SamplingParams(max_new_tokens=0)),  # prompt too long
        ([[1] * 100], SamplingParams(max_new_tokens=max_len - 99)),  # prompt + budget too long
        ([[1] * 100], SamplingParams(max_new_tokens=80)),  # more than the KV cache holds (160 tokens)
        ([[1, 2], [3]], [SamplingParams()]),  # one params per prompt
        ("not a list", SamplingParams()),
    ]
    for prompts, params in bad:
        with pytest.raises(ValueError):
            engine.generate(prompts, params)
    with pytest.raises(ValueError):
        SamplingParams(n=0)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=-1)
    # each mistake is named: the field, the token, the argument
    for kwargs, message in (({"temperature": float("inf")}, "temperature must be 0 \\(greedy\\) or a finite number"),
                            ({"temperature": True}, "temperature must be 0 \\(greedy\\) or a finite number"),
                            ({"temperature": 1e-39}, "temperature must be 0 \\(greedy\\) or a finite number >= 1e-05"),
                            ({"repetition_penalty": 1e-40}, "repetition_penalty must be a finite number >= 1e-05"),
                            ({"stop_token_ids": 2}, "stop_token_ids must be a list of ints or None"),
                            ({"top_p": float("nan")}, "top_p must be in")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="prompt 0: token id True is not an integer"):
        engine.generate([[5, True]], SamplingParams(max_new_tokens=2))
    changed = SamplingParams(max_new_tokens=3)
    for field, value in (("n", 0), ("temperature", -1.0)):  # changed after it was checked: checked again
        setattr(changed, field, value)
        with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
            engine.generate([[5, 6]], changed)
        setattr(changed, field, SamplingParams.__dataclass_fields__[field].default)
    assert engine.block_manager.num_used_blocks == 0 and engine.stats.prefill_tokens == 0  # no work was done
    with pytest.raises(TypeError, match="needs a model from rpo_engine.load_model"):
        RolloutEngine(hf)
    with pytest.raises(ValueError, match="block_size and max_num_seqs must be integers >= 1"):
        RolloutEngine(model, block_size=16.0)
    for name, value in (("num_blocks", 2.5), ("num_blocks", "8"), ("max_num_batched_tokens", 0),
                        ("max_num_batched_tokens", -5), ("kv_cache_bytes", 0)):
        with pytest.raises(ValueError, match=f"{name} must be None or an integer >= 1"):
            RolloutEngine(model, **{name: value})
    with pytest.raises(ValueError, match="params must be one SamplingParams or a list of 1"):
        engine.generate([[3, 4]], 5)


def test_gpu_memory_utilization_and_seed_bounds(checkpoints):
    """gpu_memory_utilization outside (0, 1] (5 for 0.5) is named at once, on the CPU too, not a CUDA cache sized past
    the GPU; a seed is any integer, negative or not, of any size (the sampler keeps its low 64 bits)."""
    _, model = checkpoints["qwen2"]
    for value in (0, 5.0, -0.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in \\(0, 1\\]"):
            RolloutEngine(model, num_blocks=8, gpu_memory_utilization=value)
    assert RolloutEngine(model, num_blocks=8, gpu_memory_utilization=1.0).num_blocks == 8
    assert SamplingParams(seed=-2 ** 70).seed == -2 ** 70 and SamplingParams(seed=2 ** 70).seed == 2 ** 70


def test_stop_ids_outside_the_vocabulary_and_switches_that_are_not_bools(checkpoints):
    """A stop id no logit row has (another tokenizer's) could never stop anything: named, before any work. A
    switch given as "false" or 0 would be read as truthy or silently: named too."""
    _, model = checkpoints["qwen2"]
    engine = RolloutEngine(model, block_size=4, num_blocks=40)
    V = model.config.vocab_size
    for ids in ([V], [3, -1], [V + 100]):
        with pytest.raises(ValueError, match=f"stop_token_ids \\[{ids[-1]}\\] are not in the vocabulary \\[0, {V}\\)"):
            engine.generate([[5, 6]], SamplingParams(max_new_tokens=2, stop_token_ids=ids))
    assert engine.stats.prefill_tokens == 0
    assert len(engine.generate([[5, 6]], SamplingParams(max_new_tokens=2, stop_token_ids=[V - 1]))[0][0].token_ids) >= 1
    for name in ("enable_prefix_sharing", "triton_cascade", "async_scheduling", "merge_lora", "use_cuda_graphs"):
        for value in ("false", 0, 1):
            with pytest.raises(ValueError, match=f"{name} must be (None, )?True or False"):
                RolloutEngine(model, num_blocks=8, **{name: value})


def test_stop_tokens_from_an_iterator_and_the_cache_fit_bound(checkpoints):
    """stop_token_ids from a generator are read once, not used up by the check; a completion's last token
    gets no K/V, so a prompt and budget fit when all but that token do, and a budget of 0 needs none."""
    hf, model = checkpoints["qwen2"]
    engine = RolloutEngine(model, block_size=4, num_blocks=3)  # 12 tokens of K/V
    greedy = SamplingParams(max_new_tokens=2, temperature=0.0, stop_token_ids=[])
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 11 + 2 tokens: 12 of them cached
    first = engine.generate([prompt], greedy)[0][0]
    assert first.finish_reason == "length" and len(first.token_ids) == 2
    assert first.token_ids == hf_greedy(hf, prompt, 2)
    assert engine.block_manager.num_used_blocks == 0
    stop = SamplingParams(max_new_tokens=2, temperature=0.0, stop_token_ids=(t for t in [first.token_ids[0]]))
    assert stop.stop_token_ids == [first.token_ids[0]]
    assert engine.generate([prompt], stop)[0][0].finish_reason == "stop"
    assert engine.generate([prompt + [16, 17]], SamplingParams(max_new_tokens=0))[0][0].token_ids == []
    with pytest.raises(ValueError, match="prompt 0: 13 tokens of K/V do not fit the KV cache"):
        engine.generate([prompt + [16]], greedy)


def test_numpy_token_ids_and_params_sample_as_ints(checkpoints):
    """Token ids and counts from numpy (a dataset's arrays) are integers like any other: the same samples."""
    import numpy as np

    _, model = checkpoints["qwen2"]
    engine = RolloutEngine(model, block_size=4, num_blocks=80)
    want = engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=5, seed=3, stop_token_ids=[]))
    got = engine.generate([list(np.array([5, 6, 7]))], SamplingParams(n=np.int64(2), max_new_tokens=np.int32(5),
                                                                     seed=np.int64(3), stop_token_ids=np.array([], int)))
    assert [c.token_ids for c in got[0]] == [c.token_ids for c in want[0]]


def test_engine_made_in_inference_mode_and_a_changed_dtype(checkpoints):
    """An engine made inside torch.inference_mode() generates outside it (its cache is a normal tensor); a
    model whose dtype changed under the engine is named, not an index_copy_ error deep in a layer."""
    _, model = checkpoints["qwen2"]
    with torch.inference_mode():
        engine = RolloutEngine(model, block_size=4, num_blocks=40)
    assert len(engine.generate([[5, 6]], SamplingParams(n=2, max_new_tokens=3))[0]) == 2
    twin = copy.deepcopy(model)
    engine = RolloutEngine(twin, block_size=4, num_blocks=40)
    twin.to(torch.float64)
    with pytest.raises(RuntimeError, match="make a new RolloutEngine"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=3))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_triton_backend_end_to_end(checkpoints, family):
    """The engine with the Triton decode kernel (the interpreter on CPU; compiled, under CUDA graphs, on
    CUDA) matches the torch backend."""
    hf, model = checkpoints[family]
    prompts = random_prompts(hf.config.vocab_size, [6, 9])
    params = SamplingParams(n=2, max_new_tokens=5, temperature=0.8, seed=1, stop_token_ids=[])
    want = RolloutEngine(model, block_size=4, attention_backend="torch").generate(prompts, params)
    engine = RolloutEngine(model, block_size=4, attention_backend="triton")
    assert bool(engine.runner.graphs) == ON_CUDA  # graphs by default wherever they exist
    got = engine.generate(prompts, params)
    assert_same_samples(got, want)


def test_triton_cascade_end_to_end(checkpoints, monkeypatch):
    """With triton_cascade on, samples of a prompt read its shared blocks once (one more launch, merged
    by lse) and the engine still matches the torch backend; those decode steps skip the CUDA graphs."""
    from rpo_engine.rollout import attention

    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [13, 22, 3])  # 3 and 5 full blocks of 4; one with none
    params = SamplingParams(n=3, max_new_tokens=6, temperature=0.8, seed=2, stop_token_ids=[])
    want = RolloutEngine(model, block_size=4, attention_backend="torch").generate(prompts, params)
    engine = RolloutEngine(model, block_size=4, attention_backend="triton", triton_cascade=True)
    engine.runner.cascade_min_saved_tokens = 1  # group even these short prompts
    groups = []
    build = attention.decode_metadata
    monkeypatch.setattr("rpo_engine.rollout.model_runner.decode_metadata", lambda *a, **k: groups.append(
        build(*a, **k)) or groups[-1])
    got = engine.generate(prompts, params)
    assert_same_samples(got, want)
    assert groups and all(m.group_tables is not None and m.group_tables.shape[0] == 2 for m in groups)


def assert_same_samples(got, want, atol=1e-5):
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in want]
    for o, w in zip(got, want):
        for c, d in zip(o, w):
            torch.testing.assert_close(c.logprobs, d.logprobs, atol=atol, rtol=0)


class EagerGraph:
    """Stands in for torch.cuda.CUDAGraph where there is none: replay() reruns the captured forward into
    the same output tensor, reading the same static input buffers, which is what a graph replay does."""
    replays: list[int] = []

    def __init__(self, forward, output):
        self.forward, self.output = forward, output

    def replay(self):
        self.replays.append(self.output.shape[0])
        self.output.copy_(self.forward())

    def pool(self):
        return None


def test_graph_replay_pads_batches_and_recaptures_replaced_weights(checkpoints, monkeypatch):
    """The CUDA-graph bookkeeping (static buffers, batches padded up the size ladder onto the spare block,
    recapture when a parameter's storage is replaced) on any device, with EagerGraph for the capture."""
    from rpo_engine.rollout.model_runner import ModelRunner

    def capture_eagerly(forward, pool):
        output = forward()
        return EagerGraph(forward, output), output

    monkeypatch.setattr(ModelRunner, "_capture_graph", staticmethod(capture_eagerly))
    monkeypatch.setattr(EagerGraph, "replays", [])
    hf, model = checkpoints["qwen2"]  # one K/V head: the fewest interpreted decode programs
    prompts = random_prompts(hf.config.vocab_size, [5, 11, 7])
    # 9 samples finishing at different steps: decode batches of 9, 6, 3 run in graphs of 16, 8, 4.
    params = [SamplingParams(n=3, max_new_tokens=b, temperature=1.0, seed=2, stop_token_ids=[]) for b in (4, 9, 6)]
    eager = RolloutEngine(model, block_size=4, attention_backend="triton", use_cuda_graphs=False, max_num_seqs=16)
    graphed = RolloutEngine(model, block_size=4, attention_backend="triton", use_cuda_graphs=False, max_num_seqs=16)
    graphed.runner.capture()
    assert sorted(graphed.runner.graphs) == [1, 2, 4, 8, 16]
    # every graph writes its rows of one logits buffer: a graph's own output stays allocated in the pool
    assert {logits.data_ptr() for _, logits in graphed.runner.graphs.values()} == {graphed.runner.g_logits.data_ptr()}
    assert_same_samples(graphed.generate(prompts, params), eager.generate(prompts, params))
    assert set(EagerGraph.replays) == {16, 8, 4} and graphed.block_manager.num_used_blocks == 0

    # With triton_cascade every graph also holds the cascade launch over fixed program buffers: steps with
    # groups fill them (tails in the main tables), steps without leave them empty.
    cascaded = RolloutEngine(model, block_size=4, attention_backend="triton", use_cuda_graphs=False, max_num_seqs=16,
                             triton_cascade=True)
    cascaded.runner.cascade_min_saved_tokens = 1
    cascaded.runner.capture()
    programs, replay = [], cascaded.runner._replay

    def counted(ids, pos, meta):
        logits = replay(ids, pos, meta)
        programs.append(int((cascaded.runner.g_program_lens > 0).sum()))
        return logits

    cascaded.runner._replay = counted
    assert_same_samples(cascaded.generate(prompts, params), eager.generate(prompts, params))
    assert sorted(set(programs)) == [1, 2, 3]  # a group per prompt whose samples are still running

    # A sleep drops the K/V cache the graphs read: the next call makes it again and, as it lies elsewhere,
    # captures the graphs again (here the old graphs still hold the old cache, so it cannot lie in the same place)
    graphs_before = dict(graphed.runner.graphs)
    graphed.sleep()
    assert_same_samples(graphed.generate(prompts, params), eager.generate(prompts, params))
    assert all(graphed.runner.graphs[s] is not graphs_before[s] for s in graphs_before)

    graphs_before = dict(graphed.runner.graphs)
    weight = model.model.layers[0].mlp.down_proj.weight
    original = weight.data
    try:
        weight.data = original * 1.5  # new storage: the captured graphs would read the old one
        assert_same_samples(graphed.generate(prompts, params), eager.generate(prompts, params))
        assert all(graphed.runner.graphs[s] is not graphs_before[s] for s in graphs_before)  # recaptured
    finally:
        weight.data = original


def test_graphs_are_captured_again_when_the_adapters_switch_branch(checkpoints, monkeypatch):
    """A CUDA graph replays the adapter branch it captured (live adapters, the merged copy, or the base): a generate
    call under adapters_disabled captures the graphs again, and the next one outside it too; unchanged switches
    keep them (EagerGraph standing in for the capture, which on its own would read the switches live)."""
    from rpo_engine.model.lora import adapters_disabled, apply_lora, lora_modules
    from rpo_engine.rollout.model_runner import ModelRunner

    def capture_eagerly(forward, pool):
        output = forward()
        return EagerGraph(forward, output), output

    monkeypatch.setattr(ModelRunner, "_capture_graph", staticmethod(capture_eagerly))
    _, base = checkpoints["qwen2"]
    model = apply_lora(copy.deepcopy(base), r=2, alpha=4.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0.0, 1.0)
    prompts, params = [[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0)
    for merge_lora in (False, True):
        engine = RolloutEngine(model, block_size=4, attention_backend="triton", use_cuda_graphs=False,
                               max_num_seqs=2, merge_lora=merge_lora)
        engine.runner.capture()
        engine.generate(prompts, params)
        graphs = dict(engine.runner.graphs)
        engine.generate(prompts, params)
        assert all(engine.runner.graphs[s] is graphs[s] for s in graphs)  # nothing changed: the same graphs
        with adapters_disabled(model):
            engine.generate(prompts, params)
        inside = dict(engine.runner.graphs)
        assert all(inside[s] is not graphs[s] for s in graphs), merge_lora
        engine.generate(prompts, params)
        assert all(engine.runner.graphs[s] is not inside[s] for s in graphs), merge_lora


def async_twin(model, **kwargs):
    """(sync engine, async engine) with the same settings; the async one records which decode steps ran
    on tokens still on the device (scheduled before the previous step's tokens were read)."""
    sync = RolloutEngine(model, **kwargs)
    engine = RolloutEngine(model, async_scheduling=True, **kwargs)
    engine.ahead_steps, run = [], engine.runner.run

    def recorded(seqs, is_prefill, copies, input_ids=None):
        engine.ahead_steps.append(input_ids is not None)
        return run(seqs, is_prefill, copies, input_ids)

    engine.runner.run = recorded
    return sync, engine


def test_async_scheduling_gives_the_same_completions(checkpoints):
    """Decode steps scheduled ahead of their input tokens draw what synchronous steps draw: mixed prompt
    lengths and budgets, n > 1, stop tokens that fire (a stopped sample runs one void step), greedy and
    sampled, prefix sharing on and off; the same blocks get hashed for the prefix cache, nothing leaks."""
    hf, model = checkpoints["llama"]
    V = hf.config.vocab_size
    prompts = random_prompts(V, [9, 14, 6, 11])
    stops = list(range(3, V, 9))  # ~1 token in 9: most samples stop early, at different steps
    cases = [[SamplingParams(n=3, max_new_tokens=b, temperature=1.0, seed=3, stop_token_ids=stops)
              for b in (20, 7, 24, 13)],
             SamplingParams(n=2, max_new_tokens=12, temperature=0, stop_token_ids=[]),
             SamplingParams(n=3, max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=4, stop_token_ids=stops)]
    for sharing in (True, False):
        sync, engine = async_twin(model, block_size=4, enable_prefix_sharing=sharing)
        for params in cases:
            engine.ahead_steps.clear()
            want, got = sync.generate(prompts, params), engine.generate(prompts, params)
            assert_same_samples(got, want)
            assert [[c.finish_reason for c in o] for o in got] == [[c.finish_reason for c in o] for o in want]
            assert sum(engine.ahead_steps) > len(engine.ahead_steps) // 2  # most decode steps ran ahead
            a, s = engine.last_stats, sync.last_stats
            assert a.sampled_tokens == s.sampled_tokens == sum(len(c.token_ids) for o in got for c in o)
            stopped = sum(c.finish_reason == "stop" for o in got for c in o)
            assert s.decode_tokens <= a.decode_tokens <= s.decode_tokens + stopped  # one void row per stop at most
            if params is cases[0]:
                assert stopped > 3 and a.decode_tokens > s.decode_tokens
            assert engine.block_manager.num_used_blocks == 0 and engine._inflight is None
            assert all(seq.num_pending == 0 for seq in engine.scheduler.running)
            if sharing:  # every block the sync run hashed (prompts and filled decode blocks), and no other
                assert set(engine.block_manager.hash_to_block_id) == set(sync.block_manager.hash_to_block_id)


def test_async_scheduling_falls_back_to_sync_steps_for_preemption(checkpoints):
    """Under a KV budget too small for the batch, a step that would preempt reads the in-flight tokens
    first; the completions still equal a roomy synchronous run."""
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [9, 14, 6, 11])
    roomy = RolloutEngine(model, block_size=4)
    # 12 blocks: most requests wait while others decode. 14 blocks for one prompt's 6 samples: all are
    # admitted, and decode runs out of blocks with nothing waiting (26 needed: 2 shared + 4 each).
    for prompts, num_blocks, n in ((prompts, 12, 3), ([prompts[0][:8]], 14, 6)):
        params = SamplingParams(n=n, max_new_tokens=16, temperature=1.0, seed=5, stop_token_ids=[])
        tight = RolloutEngine(model, block_size=4, num_blocks=num_blocks, async_scheduling=True)
        preempted_in_flight, preempt = [], tight.scheduler.preempt
        tight.scheduler.preempt = lambda seq: preempted_in_flight.append(tight._inflight is not None) or preempt(seq)
        want, got = roomy.generate(prompts, params), tight.generate(prompts, params)
        assert tight.last_stats.preemptions > 0 and not any(preempted_in_flight)
        assert_same_samples(got, want)
        assert tight.block_manager.num_used_blocks == 0


def test_async_scheduling_under_graph_replay(checkpoints, monkeypatch):
    """The CUDA-graph path (EagerGraph standing in) with input ids taken from the previous step's tokens
    on the device, batches shrinking down the graph ladder as samples stop."""
    from rpo_engine.rollout.model_runner import ModelRunner

    def capture_eagerly(forward, pool):
        output = forward()
        return EagerGraph(forward, output), output

    monkeypatch.setattr(ModelRunner, "_capture_graph", staticmethod(capture_eagerly))
    monkeypatch.setattr(EagerGraph, "replays", [])
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [5, 11, 7])
    params = [SamplingParams(n=3, max_new_tokens=b, temperature=1.0, seed=2, stop_token_ids=[]) for b in (4, 9, 6)]
    eager, graphed = async_twin(model, block_size=4, attention_backend="triton", use_cuda_graphs=False,
                                max_num_seqs=16)
    graphed.runner.capture()
    assert_same_samples(graphed.generate(prompts, params), eager.generate(prompts, params))
    assert set(EagerGraph.replays) == {16, 8, 4} and any(graphed.ahead_steps)


@pytest.mark.skipif(ON_CUDA, reason="the kept K/V copies are the CPU torch path's")
def test_decode_keeps_gathered_kv_across_steps(checkpoints, monkeypatch):
    """The torch decode path keeps each batch's gathered K/V and appends one token a step, instead of
    gathering every block again: the same samples as gathering each step, with and without cascade groups,
    as rows outgrow their copies and the batch shrinks; far fewer gathers; none kept above max_bytes."""
    from rpo_engine.rollout import attention

    hf, model = checkpoints["qwen3"]
    prompts = random_prompts(hf.config.vocab_size, [9, 21, 5])
    params = [SamplingParams(n=3, max_new_tokens=b, temperature=1.0, seed=7, stop_token_ids=[]) for b in (30, 12, 22)]
    gathers, gather = [], attention.gather
    monkeypatch.setattr(attention, "gather", lambda *a: gathers.append(1) or gather(*a))
    for min_saved in (1, 10 ** 9):  # cascade groups on every step, or never
        counts = {}
        for name in ("kept", "gathered", "over budget"):
            engine = RolloutEngine(model, block_size=4)
            engine.runner.cascade_min_saved_tokens = min_saved
            if name == "gathered":
                engine.runner.decode_kv = None
            elif name == "over budget":
                engine.runner.decode_kv.max_bytes = 0
            gathers.clear()
            out = engine.generate(prompts, params)
            counts[name] = len(gathers)
            if name == "kept":
                want = out
                assert engine.runner.decode_kv.key is None  # released after the call
            else:
                assert_same_samples(out, want)
        # per layer and step: 2 (K, V) or 4 (cascade) gathers without; with, only where a copy is rebuilt
        assert counts["kept"] < counts["gathered"] // 4 and counts["over budget"] == counts["gathered"]


def test_steps_run_in_inference_mode_and_sample_as_under_no_grad(checkpoints, monkeypatch):
    """ModelRunner.run makes its metadata and runs the forward under torch.inference_mode: the same completions as
    under no_grad (sync and async steps, preemption, a prefix-cache hit, a repetition penalty, cascade groups, the
    kept K/V copies), and the model still trains with autograd between and after the calls."""
    import contextlib

    from rpo_engine.rollout.model_runner import ModelRunner

    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [9, 14, 6])
    prompts.append(list(prompts[0]))  # a prefix-cache hit
    params = [SamplingParams(n=3, max_new_tokens=b, temperature=1.0, seed=5, stop_token_ids=[],
                             repetition_penalty=1.3 if b == 11 else 1.0) for b in (16, 11, 20, 9)]
    settings = [dict(), dict(num_blocks=14), dict(async_scheduling=True), dict(cascade=True)]

    def generate_all():
        outs = []
        for kwargs in settings:
            kwargs = dict(kwargs)
            cascade = kwargs.pop("cascade", False)
            engine = RolloutEngine(model, block_size=4, **kwargs)
            if cascade:
                engine.runner.cascade_min_saved_tokens = 1
            outs.append(engine.generate(prompts, params))
            if kwargs.get("num_blocks"):
                assert engine.last_stats.preemptions > 0
        return outs

    modes, forward = [], ModelRunner._decode_forward
    monkeypatch.setattr(ModelRunner, "_decode_forward",
                        lambda self, *a: modes.append(torch.is_inference_mode_enabled()) or forward(self, *a))
    got = generate_all()
    assert modes and all(modes)
    with monkeypatch.context() as m:  # the same steps under no_grad
        m.setattr(torch, "inference_mode", lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext())
        modes.clear()
        want = generate_all()
        assert not any(modes)
    for g, w in zip(got, want):
        assert_same_samples(g, w, atol=0)

    ids = torch.tensor([prompts[1]], device=model.device)
    model.zero_grad(set_to_none=True)
    model(ids).logsumexp(-1).mean().backward()  # the weights the engine read train with autograd
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    assert_same_samples(generate_all()[0], got[0], atol=0)


def test_request_key_mixes_in_the_prompt():
    """Two prompts under one seed (one seed per generate call is the usual case) draw independent noise."""
    N = 4000
    k1, k2 = request_key(7, [4, 5, 6]), request_key(7, [4, 5, 7])
    assert k1 != k2
    a = torch.tensor([uniform(k1, 0, 3 + t) for t in range(N)], dtype=torch.float64)
    b = torch.tensor([uniform(k2, 0, 3 + t) for t in range(N)], dtype=torch.float64)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 4 / math.sqrt(N)


@pytest.mark.parametrize("V", [6, 4 * CANDIDATES + 301])
def test_a_zero_probability_token_is_never_drawn_even_at_u_zero(V):
    """u = 0 (one draw in 2**53) takes the first token WITH weight: a -inf logit (or one cut by min-p or
    top-k) at the front of the row is never drawn, by the plain and the reference sampler alike."""
    logits = -0.01 * torch.arange(V, dtype=torch.float32).expand(4, V).clone()  # no ties: one order
    logits[:, 0] = float("-inf")
    logits[2:, 1] = -30.0  # cut by min-p
    u = torch.zeros(4, dtype=torch.float64)
    ones, no_p = torch.ones(4), torch.ones(4)
    min_p = torch.tensor([0.0, 0.0, 0.5, 0.5])
    top_k = torch.tensor([0, 3, 0, 3])
    for fn in (sample, sample_reference):
        tokens, logp = fn(logits, ones, top_k, no_p, u, min_p=min_p)
        assert tokens[:2].tolist() == [1, 1] and tokens[2:].tolist() == [2, 2], fn.__name__
        assert torch.isfinite(logp).all()


def test_stats_count_each_call_exactly(checkpoints):
    """The counters a run logs, against hand counts: prefill tokens computed and reused, decode tokens (one
    per sample and step: all but each sample's first token), preemptions and peak blocks of THIS call,
    the peak including a block taken by a step whose sample then finished."""
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [9, 14, 6, 11])
    params = SamplingParams(n=3, max_new_tokens=16, temperature=0, stop_token_ids=[])
    tight = RolloutEngine(model, block_size=4, num_blocks=12)
    tight.generate(prompts, params)
    before = tight.scheduler.num_preemptions  # the second call's preemptions only
    tight.generate(prompts, params)
    s = tight.last_stats
    assert s.preemptions == tight.scheduler.num_preemptions - before > 0
    assert s.sampled_tokens == 4 * 3 * 16 and s.blocks_used == 0
    engine = RolloutEngine(model, block_size=4)
    engine.generate(prompts, params)
    s = engine.last_stats
    assert s.preemptions == 0 and s.sampled_tokens == 4 * 3 * 16
    assert s.decode_tokens == 4 * 3 * 15  # the first token of each sample comes from its prompt's prefill
    assert s.prefill_tokens == 9 + 14 + 6 + 11 and s.forked_tokens == 2 * (9 + 14 + 6 + 11)
    big = engine.stats.peak_blocks_used
    # one prompt of 2 blocks, 2 tokens: the decode step writes token 8's K/V into a 3rd block, then finishes
    engine.generate([prompts[1][:8]], SamplingParams(max_new_tokens=2, temperature=0, stop_token_ids=[]))
    s = engine.last_stats
    assert s.peak_blocks_used == 3 < big == engine.stats.peak_blocks_used
    assert (s.prefill_tokens, s.decode_tokens, s.sampled_tokens, s.blocks_used) == (8, 1, 2, 0)


def penalized_reference(logits, seen_ids, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor written out token by token."""
    out = logits.clone()
    for t in set(seen_ids):
        out[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
    return out


@pytest.mark.parametrize("path", ["dense", "sparse"])  # CUDA's and the CPU's
def test_apply_repetition_penalty_equals_the_token_by_token_rule(path):
    from rpo_engine.rollout import penalty as module

    apply_repetition_penalty = getattr(module, f"_penalized_{path}")

    g = torch.Generator().manual_seed(4)
    R, V = 5, 37
    logits = torch.randn(R, V, generator=g) * 3
    logits[0, :4] = 0.0  # a zero logit stays zero
    seen_ids = [torch.randint(0, V, (n,), generator=g).tolist() for n in (0, 1, 9, 30, 80)]
    penalty = torch.tensor([1.3, 0.7, 1.0, 2.5, 1.1])
    seen = torch.zeros(R, V, dtype=torch.bool)
    for r, ids in enumerate(seen_ids):
        seen[r, ids] = True
    got = apply_repetition_penalty(logits, seen, penalty)
    for r in range(R):
        torch.testing.assert_close(got[r], penalized_reference(logits[r], seen_ids[r], penalty[r].item()),
                                   atol=0, rtol=0)
    assert not torch.equal(got[3], logits[3]) and torch.equal(got[2], logits[2])


def test_seen_tokens_rows_are_filled_marked_released_and_reused():
    from rpo_engine.rollout.penalty import SeenTokens

    seqs = [SimpleNamespace(uid=100 + i, token_ids=ids) for i, ids in
            enumerate([[1, 2, 2, 5], [1, 2, 2, 5], [7], list(range(3, 40))])]
    seen = SeenTokens(50, torch.device("cpu"))
    rows = seen.rows(seqs[:3])
    assert rows.tolist() == [0, 1, 2] and len(seen.mask) == 16
    seen.mark(rows, torch.tensor([9, 5, 7]))
    assert [seen.mask[r].nonzero().flatten().tolist() for r in rows.tolist()] == [[1, 2, 5, 9], [1, 2, 5], [7]]
    seen.release(seqs[:1])
    more = [SimpleNamespace(uid=200 + i, token_ids=[i]) for i in range(20)]  # past the capacity: it grows
    new_rows = seen.rows(seqs[3:] + more)
    got = set(new_rows.tolist())  # 21 rows: the released row 0 among them, never a live one's (1, 2)
    assert len(got) == 21 and 0 in got and not {1, 2} & got and max(got) < len(seen.mask) == 32
    assert seen.mask[new_rows[0]].nonzero().flatten().tolist() == list(range(3, 40))  # each zeroed, then filled
    assert seen.mask[1].nonzero().flatten().tolist() == [1, 2, 5]  # kept through the growth
    assert [seen.mask[r].nonzero().flatten().tolist() for r in new_rows[1:].tolist()] == [[i] for i in range(20)]
    assert torch.equal(seen.rows(seqs[1:3]), rows[1:])  # a known sequence keeps its row


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_with_repetition_penalty_matches_transformers(checkpoints, family):
    hf, model = checkpoints[family]
    prompts = random_prompts(hf.config.vocab_size, [5, 13, 8, 3])
    budgets = [14, 6, 18, 9]
    for penalty in (1.3, 0.8):
        params = [SamplingParams(n=2, max_new_tokens=b, temperature=0, stop_token_ids=[], repetition_penalty=penalty)
                  for b in budgets]
        plain = [dataclasses.replace(p, repetition_penalty=1.0) for p in params]
        for sharing in (True, False):
            engine = RolloutEngine(model, block_size=4, enable_prefix_sharing=sharing)
            outs = engine.generate(prompts, params)
            for prompt, budget, samples in zip(prompts, budgets, outs):
                ids = torch.tensor([prompt])
                expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=budget, min_new_tokens=budget, eos_token_id=None,
                                       pad_token_id=0, repetition_penalty=penalty)[0, len(prompt):].tolist()
                assert all(c.token_ids == expected for c in samples), (penalty, sharing)
            assert engine._seen is None and engine.block_manager.num_used_blocks == 0
        unpenalized = RolloutEngine(model, block_size=4).generate(prompts, plain)
        assert [o[0].token_ids for o in outs] != [o[0].token_ids for o in unpenalized]  # it changed something


def test_repetition_penalty_draws_from_the_penalized_distribution_with_policy_logprobs(checkpoints):
    """Each sampled token is the one `sample_reference` draws, with its uniform, from the teacher-forced logits
    penalized over the prompt and the tokens before it; its log-prob is the unpenalized policy's. The same
    completions under preemption and async scheduling (whose pending token must count as seen), and a prompt
    without a penalty in the same call samples as in a call without one."""
    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [6, 11, 9])
    T, penalty = 0.9, 1.8
    params = [SamplingParams(n=3, max_new_tokens=14, temperature=T, top_p=0.95, stop_token_ids=[], seed=7,
                             repetition_penalty=penalty) for _ in prompts]
    params[2] = dataclasses.replace(params[2], repetition_penalty=1.0)
    outs = RolloutEngine(model, block_size=4).generate(prompts, params)
    for prompt, p, samples in zip(prompts[:2], params, outs):
        key = request_key(p.seed, prompt)
        for j, c in enumerate(samples):
            ids = torch.tensor([prompt + c.token_ids], device=model.device)
            with torch.no_grad():
                logits = model(ids)[0, len(prompt) - 1:-1].float().cpu()  # [14, V]
            for t, token in enumerate(c.token_ids):
                row = penalized_reference(logits[t], prompt + c.token_ids[:t], penalty)[None]
                u = torch.tensor([uniform(key, j, len(prompt) + t)], dtype=torch.float64)
                want, _ = sample_reference(row, torch.tensor([T]), torch.tensor([0]), torch.tensor([0.95]), u)
                assert token == want.item(), (j, t)
            torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced_logprobs(model, prompt, c.token_ids, T),
                                       atol=1e-5, rtol=0)
    alone = RolloutEngine(model, block_size=4).generate(prompts[2:], params[2:])
    assert_same_samples(outs[2:], alone)
    tight = RolloutEngine(model, block_size=4, num_blocks=10)
    assert_same_samples(tight.generate(prompts, params), outs)
    assert tight.last_stats.preemptions > 0
    sync, ahead = async_twin(model, block_size=4)
    assert_same_samples(ahead.generate(prompts, params), outs)
    assert sum(ahead.ahead_steps) > len(ahead.ahead_steps) // 2


def test_policy_logprobs_with_and_without_temperatures():
    from rpo_engine.rollout.sampler import policy_logprobs

    g = torch.Generator().manual_seed(2)
    logits, tokens = torch.randn(4, 30, generator=g) * 3, torch.tensor([0, 7, 29, 3])
    temperature = torch.tensor([0.0, 0.5, 1.0, 1.7])  # greedy rows count T = 1
    want = torch.log_softmax(logits / torch.tensor([1.0, 0.5, 1.0, 1.7])[:, None], -1)[torch.arange(4), tokens]
    torch.testing.assert_close(policy_logprobs(logits, temperature, tokens), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(policy_logprobs(logits, None, tokens), logits.log_softmax(-1)[torch.arange(4), tokens],
                               atol=1e-6, rtol=0)


def every_row_sample_sequences(logits, seqs, seen=None):
    """sample_sequences as it was written before it read the distinct SamplingParams: every row's temperature,
    top-p and top-k (and min-p and penalty where a row has one) made into tensors, the flags counted over rows."""
    import numpy as np

    from rpo_engine.rollout.penalty import apply_repetition_penalty
    from rpo_engine.rollout.sampler import policy_logprobs

    params = [seq.params for seq in seqs]
    temperature = [p.temperature for p in params]
    any_min_p = any(p.min_p > 0 for p in params)
    penalized = any(p.repetition_penalty != 1 for p in params)
    rows = np.empty((4 + any_min_p + penalized, len(seqs)))
    rows[0], rows[1], rows[2] = temperature, [p.top_p for p in params], [p.top_k for p in params]
    rows[3] = stream_uniforms([seq.stream for seq in seqs], [len(seq.token_ids) + seq.num_pending for seq in seqs])
    if any_min_p:
        rows[4] = [p.min_p for p in params]
    if penalized:
        rows[-1] = [p.repetition_penalty for p in params]
    truncate = any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params)
    num_greedy = sum(t == 0 for t in temperature)
    rows = torch.from_numpy(rows).to(logits.device)
    drawn_from = logits.float()
    if penalized:
        seen_rows = seen.rows(seqs)
        drawn_from = apply_repetition_penalty(drawn_from, seen.mask[seen_rows], rows[-1].float())
    tokens, logprobs = sample(drawn_from, rows[0].float(), rows[2].long(), rows[1].float(), rows[3], truncate,
                              num_greedy > 0, num_greedy == len(seqs), rows[4].float() if any_min_p else None)
    if penalized:
        logprobs = policy_logprobs(logits, None if all(t in (0, 1) for t in temperature) else rows[0].float(), tokens)
        seen.mark(seen_rows, tokens)
    return tokens, logprobs


@pytest.mark.parametrize("V", [50, 3 * CHUNK + 7])  # sample_reference's vocabulary, and `sample`'s own path
@pytest.mark.parametrize("settings", [
    [{}], [{}, {"temperature": 0.7}], [{}, {"temperature": 0.0}], [{"temperature": 0.0}],
    [{}, {"top_k": 5}, {"temperature": 1.3, "top_p": 0.8}], [{"temperature": 0.0, "top_k": 3}, {}],
    [{}, {"min_p": 0.1}], [{"temperature": 0.6}, {"repetition_penalty": 1.4}, {"temperature": 0.0}],
    [{"repetition_penalty": 0.8}]], ids=lambda s: "+".join("-".join(f"{k}{v}" for k, v in d.items()) or "T1" for d in s))
def test_sample_sequences_makes_only_the_rows_it_needs_and_draws_as_with_every_row(V, settings):
    """sample_sequences reads its flags from the step's distinct SamplingParams and makes only the per-row
    inputs some row needs (at T = 1 and nothing else, the uniforms alone, the logits not divided): the same
    tokens and log-probs, bit for bit, as with every row's settings given (the way it was written before)."""
    from rpo_engine.rollout.penalty import SeenTokens
    from rpo_engine.rollout.sampler import sample_sequences
    from rpo_engine.rollout.sequence import Sequence

    g = torch.Generator().manual_seed(V + len(settings))
    seqs = []
    for i in range(12):  # requests of a few samples each, their settings taken in turn; every request its own seed
        params = SamplingParams(n=3, seed=i, **settings[i % len(settings)])
        prompt = torch.randint(0, V, (int(torch.randint(1, 9, (), generator=g)),), generator=g).tolist()
        for j in range(3):
            seq = Sequence(prompt, params, 4, [], request_key(i, prompt), i, sample_index=j)
            seq.token_ids += torch.randint(0, V, (int(torch.randint(0, 6, (), generator=g)),), generator=g).tolist()
            seqs.append(seq)
    logits = (torch.randn(len(seqs), V, generator=g) * 3).to(DEVICE)
    logits[::5, :V // 3] = 0.0  # ties
    seen, seen_before = SeenTokens(V, logits.device), SeenTokens(V, logits.device)
    for _ in range(2):  # the penalty's second step reads the tokens the first one marked
        tokens, logprobs = sample_sequences(logits, seqs, seen)
        want_tokens, want_logprobs = every_row_sample_sequences(logits, seqs, seen_before)
        assert torch.equal(tokens, want_tokens)
        assert torch.equal(logprobs, want_logprobs)
        for seq, token in zip(seqs, tokens.tolist()):
            seq.token_ids.append(token)


def test_sleep_frees_the_kv_cache_and_the_next_call_makes_it_again(checkpoints):
    """RolloutEngine.sleep (vLLM's, TRL's sleep mode): the cache's memory is given back (no reference to it is
    left), the next generate call makes it again and samples what an engine that never slept samples."""
    import weakref

    hf, model = checkpoints["llama"]
    prompts = random_prompts(hf.config.vocab_size, [6, 13])
    engine, twin = RolloutEngine(model, block_size=4), RolloutEngine(model, block_size=4)
    engine.runner.cascade_min_saved_tokens = twin.runner.cascade_min_saved_tokens = 1  # the kept-K/V decode path too
    for params in (SamplingParams(n=3, max_new_tokens=9, temperature=0, stop_token_ids=[]),
                   SamplingParams(n=3, max_new_tokens=9, temperature=1.0, top_p=0.9, seed=4, stop_token_ids=[])):
        want = twin.generate(prompts, params)
        caches = [weakref.ref(engine.runner.k_cache), weakref.ref(engine.runner.v_cache)]
        engine.sleep()
        assert engine.is_sleeping and all(ref() is None for ref in caches)  # freed, not merely unnamed
        engine.sleep()  # twice: nothing more to free
        assert_same_samples(engine.generate(prompts, params), want)
        assert not engine.is_sleeping and engine.runner.k_cache.shape == twin.runner.k_cache.shape
    engine.sleep()
    engine.wake_up()
    assert not engine.is_sleeping and not engine.runner.k_cache.any()  # made again as zeros (finite padding reads)
    # made again by a call inside inference_mode (an eval's), the cache is still one a later call outside it writes
    engine.sleep()
    with torch.inference_mode():
        assert_same_samples(engine.generate(prompts, params), want)
    assert not engine.runner.k_cache.is_inference()
    assert_same_samples(engine.generate(prompts, params), want)


def test_repetition_penalty_beside_other_temperatures_and_min_p_in_one_call(checkpoints):
    """One call mixing what the sampler keeps per row: T = 1, T = 0.7 and greedy rows, top-k, top-p and min-p, each
    with a penalty. Every token is the reference draw from its penalized teacher-forced logits, and every log-prob
    the unpenalized policy's at that row's own temperature (only an all-T=1 call may skip the division)."""
    hf, model = checkpoints["llama"]
    prompts = random_prompts(hf.config.vocab_size, [7, 4, 10, 6], seed=5)
    params = [SamplingParams(n=2, max_new_tokens=10, temperature=1.0, min_p=0.05, stop_token_ids=[], seed=3,
                             repetition_penalty=1.6),
              SamplingParams(n=2, max_new_tokens=10, temperature=0.7, top_k=20, min_p=0.1, stop_token_ids=[], seed=4,
                             repetition_penalty=0.8),
              SamplingParams(n=1, max_new_tokens=10, temperature=0, stop_token_ids=[], repetition_penalty=1.4),
              SamplingParams(n=2, max_new_tokens=10, temperature=1.0, top_p=0.8, stop_token_ids=[], seed=6,
                             repetition_penalty=1.0)]
    outs = RolloutEngine(model, block_size=4).generate(prompts, params)
    for prompt, p, samples in zip(prompts, params, outs):
        key = request_key(p.seed or 0, prompt)
        for j, c in enumerate(samples):
            ids = torch.tensor([prompt + c.token_ids], device=model.device)
            with torch.no_grad():
                logits = model(ids)[0, len(prompt) - 1:-1].float().cpu()
            for t, token in enumerate(c.token_ids):
                row = penalized_reference(logits[t], prompt + c.token_ids[:t], p.repetition_penalty)[None]
                u = torch.tensor([uniform(key, j, len(prompt) + t)], dtype=torch.float64)
                want, _ = sample_reference(row, torch.tensor([p.temperature]), torch.tensor([p.top_k]),
                                           torch.tensor([p.top_p]), u, min_p=torch.tensor([p.min_p]))
                assert token == want.item(), (p, j, t)
            torch.testing.assert_close(torch.tensor(c.logprobs),
                                       teacher_forced_logprobs(model, prompt, c.token_ids, p.temperature),
                                       atol=1e-5, rtol=0)


def test_repetition_penalty_rows_of_finished_sequences_are_reused(checkpoints, monkeypatch):
    """A finished sequence's row of seen tokens goes back to the call's pool: 24 sequences, at most 4 live at once,
    never hold more than the first 16 rows (one bool per vocabulary token each: a large call would otherwise hold
    one row per sequence it ever ran)."""
    from rpo_engine.rollout import penalty

    hf, model = checkpoints["qwen2"]
    prompts = random_prompts(hf.config.vocab_size, [3 + i % 5 for i in range(12)], seed=2)
    params = SamplingParams(n=2, max_new_tokens=6, temperature=1.0, stop_token_ids=[], seed=1, repetition_penalty=1.3)
    capacities, grow = [], penalty.SeenTokens._grow

    def recorded(self, needed):
        grow(self, needed)
        capacities.append(len(self.mask))

    monkeypatch.setattr(penalty.SeenTokens, "_grow", recorded)
    for async_scheduling in (False, True):
        capacities.clear()
        RolloutEngine(model, block_size=4, max_num_seqs=4, async_scheduling=async_scheduling).generate(prompts, params)
        assert capacities and max(capacities) == 16, (async_scheduling, capacities)


def sentencepiece_like_tokenizer():
    """A Llama-2 / Mistral style tokenizer, built offline: a Unigram vocabulary with byte fallback (<0xNN>
    pieces), "▁" for a space, and their decoder (the leading space stripped); plus an added (non-special)
    token and an added special token."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "a", "b", "c", "é", "€", "中", "文", "▁a", "▁b", "ab", "▁ab", "▁é", "é▁", "c▁", "▁▁", "▁中",
             "ba", "x", "<", ">", "/", "an", "er", "▁</", "wer>"]
    backend = Tokenizer(models.Unigram([(p, 0.0) for p in pieces] + [(w, -1.0 - i) for i, w in enumerate(words)],
                                       unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(["<tool>"])
    tok.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    return tok


def first_stop_by_steps(stop_strings, tokens, prompt_len):
    """The completion index at which StopStrings says a stop string is completed, calling it token by token."""
    state = None
    for i in range(prompt_len, len(tokens)):
        completed, state = stop_strings.completed_by_last(tokens[:i + 1], state)
        if completed:
            return i - prompt_len
    return None


@pytest.mark.parametrize("streaming", [True, False])
def test_stop_strings_with_a_byte_fallback_tokenizer_by_brute_force(streaming):
    """Random token streams of a byte-fallback (SentencePiece-like) tokenizer, lone and cut UTF-8 bytes, special
    and added tokens among them: both readings stop where the text decoded whole says (a DecodeStream raises
    "Invalid prefix" on bytes that decode non-monotonically, and holds back a cut character's text)."""
    import random

    from rpo_engine.rollout.stop import StopStrings

    tok = sentencepiece_like_tokenizer()
    byte_tokens = [tok.convert_tokens_to_ids(f"<0x{b:02X}>")
                   for b in (0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xE4, 0xB8, 0x20)]
    others = [i for i in range(len(tok)) if i not in range(3, 259)]
    rng, disagreements = random.Random(0), []
    for _ in range(400):
        tokens = [rng.choice(byte_tokens) if rng.random() < 0.3 else rng.choice(others)
                  for _ in range(rng.randint(1, 24))]
        prompt_len = rng.randint(0, min(5, len(tokens) - 1))
        text = tok.decode(tokens, skip_special_tokens=True)
        start = rng.randrange(max(1, len(text) - 1))
        candidates = [" a", "a ", "é", "€", "中", " ", "é a", "中文", "<tool>", "r>",
                      text[start:start + rng.randint(1, 3)]]
        strings = [s for s in rng.sample(candidates, 2) if s and "\ufffd" not in s] or ["ab"]
        expected = first_stop(tok, tokens, prompt_len, strings)
        try:
            got = first_stop_by_steps(StopStrings(strings, tok, streaming=streaming), tokens, prompt_len)
        except Exception as e:  # noqa: BLE001
            got = repr(e)
        if got != expected:
            disagreements.append((strings, tokens, prompt_len, expected, got))
    assert disagreements == []


@pytest.mark.parametrize("streaming", [True, False])
def test_stop_strings_at_a_cut_character_and_past_special_tokens(streaming):
    """The task tokenizer (byte-level): a prompt that ends in a character's first byte holds a stop string that
    the token completing the character does not take part in (no stop); a stop string's two parts with more
    special tokens between them than the window holds (special tokens have no text: a stop)."""
    from rpo_engine.data.tokenizer import build_task_tokenizer
    from rpo_engine.rollout.stop import StopStrings

    tok = build_task_tokenizer()
    e_acute, ab = tok.encode("é"), tok.encode("ab")
    assert len(e_acute) == 2
    stop = StopStrings(["ab"], tok, streaming=streaming)
    assert first_stop(tok, ab + e_acute, len(ab) + 1, ["ab"]) is None
    assert first_stop_by_steps(stop, ab + e_acute, len(ab) + 1) is None
    tokens = tok.encode("a") + [tok.eos_token_id] * 40 + tok.encode("b")
    assert first_stop(tok, tokens, 1, ["ab"]) == 40
    assert first_stop_by_steps(stop, tokens, 1) == 40  # the sequence token by token
    assert first_stop_by_steps(stop, tokens, len(tokens) - 1) == 0  # the prompt's tail


@pytest.mark.parametrize("streaming", [True, False])
def test_stop_strings_completed_by_a_token_that_ends_in_a_cut_character(streaming):
    """A byte-level token holding a space and the first byte of "é" (as Qwen's and GPT-2's vocabularies hold
    such tokens) completes "x " itself, as transformers' StopStringCriteria says, not the token after it (a
    DecodeStream gives its text only once the character is whole)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.generation.stopping_criteria import StopStringCriteria

    from rpo_engine.rollout.stop import StopStrings

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĠÃ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [("Ġ", "Ã")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokens = tok.encode("x é")
    assert tokens[1] == vocab["ĠÃ"] and len(tokens) == 3
    criteria = StopStringCriteria(tok, ["x "])
    assert [bool(criteria(torch.tensor([tokens[:i]]), None)) for i in (2, 3)] == [True, False]
    assert first_stop(tok, tokens, 1, ["x "]) == 0
    assert first_stop_by_steps(StopStrings(["x "], tok, streaming=streaming), tokens, 1) == 0


@pytest.mark.parametrize("settings", [dict(enable_prefix_sharing=False),
                                      dict(attention_backend="triton", use_cuda_graphs=False),
                                      dict(async_scheduling=True, num_blocks=10, enable_prefix_sharing=False)],
                         ids=["unshared", "triton", "async-preempting-unshared"])
def test_stop_strings_with_stop_tokens_and_engine_settings(worded_checkpoints, settings):
    """Stop strings and stop_token_ids together end a sample at whichever comes first, n = 3, under other engine
    settings; a budget reached by the token that completes a stop string is a "stop" (vLLM's precedence)."""
    tok, checkpoints = worded_checkpoints
    _, model = checkpoints["qwen2"]
    prompts = random_prompts(len(tok), [6, 11, 4, 9], seed=3)
    free_params = [SamplingParams(n=3, max_new_tokens=20, temperature=1.0, stop_token_ids=[], seed=i) for i in range(4)]
    engine = RolloutEngine(model, block_size=4, tokenizer=tok, **settings)
    free = engine.generate(prompts, free_params)
    params = []
    for p, samples in zip(free_params, free):
        text = tok.decode(samples[0].token_ids, skip_special_tokens=True).replace("\ufffd", "")
        params.append(dataclasses.replace(p, stop=[text[6:8] or "zz", text[12:13] or "z"],
                                          stop_token_ids=[samples[1].token_ids[3]]))
    outs = engine.generate(prompts, params)
    budget_checks = 0
    for prompt, p, samples, free_samples in zip(prompts, params, outs, free):
        for c, f in zip(samples, free_samples):
            at_string = first_stop(tok, prompt + f.token_ids, len(prompt), p.stop, len(prompt))
            at_token = next((i for i, t in enumerate(f.token_ids) if t in p.stop_token_ids), None)
            at = min((a for a in (at_string, at_token) if a is not None), default=None)
            assert c.token_ids == (f.token_ids if at is None else f.token_ids[:at + 1])
            assert c.finish_reason == ("length" if at is None else "stop")
        at = first_stop(tok, prompt + free_samples[0].token_ids, len(prompt), p.stop, len(prompt))
        if at is not None:
            budget = dataclasses.replace(p, n=1, max_new_tokens=at + 1, stop_token_ids=[])
            (c,), = engine.generate([prompt], budget)
            assert c.token_ids == free_samples[0].token_ids[:at + 1] and c.finish_reason == "stop"
            budget_checks += 1
    assert budget_checks >= 2 and engine.last_stats.blocks_used == 0
