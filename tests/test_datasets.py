"""Loading user datasets (JSONL / Parquet / `datasets` directories) and their one-line errors."""
import json
import re
import sys
from pathlib import Path

import pytest

from rpo_engine.data.datasets import load_dataset_rows
from rpo_engine.errors import UserError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _error(path, **kwargs):
    with pytest.raises(UserError) as e:
        load_dataset_rows(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_jsonl_rows(tmp_path):
    p = _write(tmp_path / "d.jsonl",
               '{"prompt": "Q: 1+1\\nA:", "answer": "2"}\n'
               "\n   \n"
               '{"prompt": "p2", "answer": 42, "solution": "s"}\n'
               '{"id": "x7", "prompt": "p3", "answer": "a3"}\n'
               '{"id": 9, "prompt": "p4", "answer": "2.5"}')  # no trailing newline
    rows = load_dataset_rows(p)
    assert rows == [
        {"id": "0", "prompt": "Q: 1+1\nA:", "answer": "2"},
        {"id": "1", "prompt": "p2", "answer": "42", "solution": "s"},  # numeric answer -> string, extras kept
        {"id": "x7", "prompt": "p3", "answer": "a3"},
        {"id": "9", "prompt": "p4", "answer": "2.5"},
    ]
    assert load_dataset_rows(str(p)) == rows


def test_json_suffix_lines_bom_and_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "p", "answer": "a"}\r\n{"prompt": "q", "answer": "b"}\r\n')
    assert [r["answer"] for r in load_dataset_rows(p)] == ["a", "b"]
    arr = _write(tmp_path / "arr.json", json.dumps([{"prompt": "p", "answer": "a"}, {"prompt": "q", "answer": 1}]))
    assert load_dataset_rows(arr) == [{"id": "0", "prompt": "p", "answer": "a"}, {"id": "1", "prompt": "q", "answer": "1"}]
    assert "row 1" in _error(_write(tmp_path / "arr2.json", json.dumps([{"prompt": "p", "answer": "a"}, {"prompt": "q"}])))


def test_missing_file_directory_and_extension(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.jsonl")
    # a directory that save_to_disk did not write is read as a dataset repository's (load_dataset's layouts)
    assert f"{tmp_path}: The directory at {tmp_path} doesn't contain any data files" in _error(tmp_path)
    assert "unknown dataset format" in _error(_write(tmp_path / "d.csv", "prompt,answer\n"))


@pytest.mark.parametrize("content, line, why", [
    ('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": \n', 2, "not valid JSON"),
    ('{"prompt": "p", "answer": "a"}\n\nnot json at all\n', 3, "not valid JSON"),
    ('{"prompt": "p", "answer": "a"}\n{"answer": "a"}\n', 2, "missing 'prompt'"),
    ('{"prompt": "p"}\n', 1, "missing 'answer'"),
    ('{"prompt": 5, "answer": "a"}\n', 1, "'prompt' must be a string or a list of"),
    ('{"prompt": [], "answer": "a"}\n', 1, "'prompt' must be a string or a list of"),
    ('{"prompt": ["p"], "answer": "a"}\n', 1, "prompt message 0 must have a non-empty 'role' and 'content'"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "user"}], "answer": "a"}\n', 1,
     "prompt message 1 must have"),
    ('{"prompt": [{"role": "user", "content": " \\n"}], "answer": "a"}\n', 1, "prompt message 0 must have"),  # blank
    ('{"prompt": "p", "answer": null}\n', 1, "'answer' must be a string"),
    ('{"prompt": "p", "answer": true}\n', 1, "'answer' must be a string"),
    ('{"prompt": "p", "answer": {"x": 1}}\n', 1, "'answer' must be a string"),
    ('{"prompt": "", "answer": "a"}\n', 1, "'prompt' is empty"),
    ('{"prompt": "p", "answer": "  "}\n', 1, "'answer' is empty"),
    ('["p", "a"]\n', 1, "expected a JSON object"),
    ('{"prompt": "p", "answer": "a", "id": [1]}\n', 1, "'id' must be a string"),
    ('{"id": "a", "prompt": "p", "answer": "a"}\n{"id": "b", "prompt": "p", "answer": "a"}\n'
     '{"id": "a", "prompt": "p", "answer": "a"}\n', 3, "duplicate id 'a'"),
    ('{"prompt": "p", "answer": "a"}\n{"id": "0", "prompt": "p", "answer": "a"}\n', 2, "duplicate id '0'"),
    # which answer is meant? json.loads took the last one silently
    ('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "1", "answer": "2"}\n', 2,
     "not valid JSON (key 'answer' given twice)"),
    ('{"prompt": [{"role": "user", "content": "q", "content": "r"}], "answer": "a"}\n', 1,
     "not valid JSON (key 'content' given twice)"),
    # json.loads' RecursionError was a traceback
    pytest.param('{"prompt": "p", "answer": "a"}\n{"prompt": ' + "[" * 100000 + "]" * 100000 + ', "answer": "a"}\n',
                 2, "not valid JSON (nested too deeply)", id="nested-too-deeply"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, why):
    p = _write(tmp_path / "bad.jsonl", content)
    msg = _error(p)
    assert f"{p}:{line}:" in msg and why in msg, msg


def test_json_array_with_a_duplicate_key_or_nested_too_deeply(tmp_path):
    p = _write(tmp_path / "dup.json", '[{"prompt": "p", "answer": "a"},\n {"prompt": "p", "prompt": "q", "answer": "a"}]')
    assert f"{p}: not valid JSON (key 'prompt' given twice)" in _error(p)
    p = _write(tmp_path / "deep.json", "[" * 100000 + "]" * 100000)
    assert f"{p}: not valid JSON (nested too deeply)" in _error(p)


def test_duplicate_id_names_first_line(tmp_path):
    p = _write(tmp_path / "dup.jsonl", '{"id": "a", "prompt": "p", "answer": "a"}\n{"id": "a", "prompt": "p", "answer": "a"}\n')
    assert f"first used at {p}:1" in _error(p)
    # a row without an id takes its row number, which may be another row's id: the message says so
    p = _write(tmp_path / "dup2.jsonl", '{"id": "1", "prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "a"}\n')
    assert "duplicate id '1' (this row has no id: its row number, counted from 0, stands in)" in _error(p)


def test_float_answers_are_written_out_and_math_columns_named(tmp_path):
    p = _write(tmp_path / "f.jsonl", '{"prompt": "p", "answer": 1e-05}\n{"prompt": "q", "answer": 1e20}\n'
                                     '{"prompt": "r", "answer": 0.5}\n{"prompt": "s", "answer": 18.0}\n')
    # 18.0: an integer column with a gap is float in pandas/Parquet; "18.0" failed --reward exact on "18"
    assert [r["answer"] for r in load_dataset_rows(p)] == ["0.00001", "100000000000000000000", "0.5", "18"]
    p = _write(tmp_path / "math.jsonl", '{"problem": "p", "solution": "s"}\n')  # MATH's columns
    assert "rename 'problem' to 'prompt', or pass --dataset-prompt-column problem?" in _error(p)
    p = _write(tmp_path / "gsm.jsonl", '{"prompt": "p", "solution": "s"}\n')
    assert "rename 'solution' to 'answer', or pass --dataset-answer-column solution?" in _error(p)


def test_empty_files(tmp_path):
    assert "empty" in _error(_write(tmp_path / "e.jsonl", ""))
    assert "empty" in _error(_write(tmp_path / "blank.jsonl", "\n  \n\n"))
    assert "empty" in _error(_write(tmp_path / "e.json", "[]"))


def test_invalid_utf8(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"prompt": "p", "answer": "a"}\n{"prompt": "\xff\xfe", "answer": "a"}\n')
    msg = _error(p)
    assert f"{p}:2:" in msg and "UTF-8" in msg


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1"], "answer": ["1", "2"], "id": ["a", "b"]}), p)
    assert load_dataset_rows(p) == [{"prompt": "p0", "answer": "1", "id": "a"}, {"prompt": "p1", "answer": "2", "id": "b"}]
    q = tmp_path / "noans.parquet"
    pq.write_table(pa.table({"prompt": ["p0"], "question": ["x"]}), q)
    assert "row 0" in _error(q) and "missing 'answer'" in _error(q)
    n = tmp_path / "null.parquet"
    pq.write_table(pa.table({"prompt": ["p0", None], "answer": ["1", "2"]}), n)
    assert "row 1" in _error(n) and "'prompt' must be a string" in _error(n)
    assert "not a readable Parquet file" in _error(_write(tmp_path / "junk.parquet", "not parquet"))
    assert "empty" in _error(_write_parquet(pq, pa, tmp_path / "empty.parquet"))


def _write_parquet(pq, pa, path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    return path


def test_parquet_without_pyarrow_or_pandas(tmp_path, monkeypatch):
    for mod in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import mod` raise ImportError
    msg = _error(_write(tmp_path / "d.parquet", "whatever"))
    assert "pip install pyarrow" in msg


def _save_arrow_dir(pa, path, table, files=("data-00000-of-00001.arrow",)):
    """What `Dataset.save_to_disk` writes (state.json naming Arrow stream files), made with pyarrow alone."""
    path.mkdir()
    for name in files:
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in files]}))
    return path


def test_datasets_directory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"prompt": ["p0", "p1"], "answer": [1, 2], "solution": ["s0", "s1"]})
    d = _save_arrow_dir(pa, tmp_path / "ds", table, files=("data-00000-of-00002.arrow", "data-00001-of-00002.arrow"))
    rows = load_dataset_rows(d)
    assert [r["prompt"] for r in rows] == ["p0", "p1", "p0", "p1"]
    assert rows[0]["answer"] == "1" and rows[1]["solution"] == "s1"
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    bad = _save_arrow_dir(pa, tmp_path / "noans", pa.table({"prompt": ["p0"]}))
    assert "row 0" in _error(bad) and "missing 'answer'" in _error(bad)
    (bad / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    assert "not a readable Arrow stream" in _error(bad)
    (bad / "data-00000-of-00001.arrow").unlink()
    assert "missing (listed in" in _error(bad)
    (bad / "state.json").write_text("{}")
    assert "not a `datasets` state file" in _error(bad)
    splits = tmp_path / "dd"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert _error(splits) == f"{splits / 'train'}: missing (a split listed in {splits}/dataset_dict.json)"
    assert _error(splits, split="dev") == (f"{splits}: a `datasets` DatasetDict without a split 'dev' (it has train, "
                                           f"test; --dataset-train-split and --dataset-test-split choose)")


def test_datasets_save_to_disk_roundtrip(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": f"p{i}", "answer": str(i), "id": i} for i in range(5)])
    ds.shuffle(seed=1).select([0, 3]).save_to_disk(tmp_path / "sub")  # indices are applied on save
    expected = [{**r, "id": str(r["id"])} for r in datasets.load_from_disk(tmp_path / "sub")]
    assert load_dataset_rows(tmp_path / "sub") == expected and len(expected) == 2
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(tmp_path / "dd")
    assert load_dataset_rows(tmp_path / "dd") == load_dataset_rows(tmp_path / "dd" / "train") and \
        len(load_dataset_rows(tmp_path / "dd")) == 5  # a DatasetDict's split chosen as a Hub dataset's is
    assert [r["prompt"] for r in load_dataset_rows(tmp_path / "dd", split="test")] == ["p1"]


# ---- prompt encoding -------------------------------------------------------------------------

QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(bos=False, eos=False, chat_template=None):
    """A word-level tokenizer with Qwen's chat markers; its post-processor adds BOS and/or EOS like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "what", "is", "1+1", "?", "system"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = " ".join((["<s>"] if bos else []) + ["$A"] + (["</s>"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    out.chat_template = chat_template
    return out


def test_prompt_through_the_chat_template():
    from rpo_engine.trainer import encode_prompt

    tok = word_tokenizer(chat_template=QWEN_CHAT_TEMPLATE)
    ids = encode_prompt(tok, {"id": "r", "prompt": "what is 1+1 ?"}, 100)
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "user", "what", "is", "1+1", "?", "<|im_end|>",
                                              "<|im_start|>", "assistant"]


def test_a_rendered_string_prompt_is_not_rendered_again():
    """A string prompt holding the template's own markers (a dataset rendered for vLLM, as verl's hold them) went
    into the template as a user turn: <|im_start|> user <|im_start|> user ... One line names the row and the token;
    --no-chat-template encodes it as it is. A plain question, and a conversation, are rendered as before."""
    from rpo_engine.errors import UserError
    from rpo_engine.trainer import encode_prompt

    tok = word_tokenizer(chat_template=QWEN_CHAT_TEMPLATE)
    rendered = "<|im_start|> user what is 1+1 ? <|im_end|> <|im_start|> assistant"
    for prompt, token in [(rendered, "<|im_start|>"), ("what is 1+1 ? </s>", "</s>")]:
        with pytest.raises(UserError, match=re.escape(f"prompt of row 'r' holds the special token {token!r}: a prompt "
                                                      f"a chat template rendered already")):
            encode_prompt(tok, {"id": "r", "prompt": prompt}, 100)
    assert tok.convert_ids_to_tokens(encode_prompt(tok, {"id": "r", "prompt": rendered}, 100, chat_template=False)) \
        == ["<|im_start|>", "user", "what", "is", "1+1", "?", "<|im_end|>", "<|im_start|>", "assistant"]
    conversation = [{"role": "user", "content": "what is 1+1 ?"}]
    assert encode_prompt(tok, {"id": "r", "prompt": conversation}, 100) == \
        encode_prompt(tok, {"id": "r", "prompt": "what is 1+1 ?"}, 100)


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (True, True)])
def test_text_prompt_keeps_bos_and_never_ends_in_eos(bos, eos):
    from rpo_engine.trainer import encode_prompt

    ids = encode_prompt(word_tokenizer(bos, eos), {"id": "r", "prompt": "what is 1+1 ?"}, 100)
    assert ids == [1] * bos + [7, 8, 9, 10]  # Llama's BOS kept (TRL and vLLM add it); an appended EOS is not


@pytest.mark.parametrize("bos", [False, True])
def test_text_prompt_that_opens_with_bos_gets_no_second_one(bos):
    """A prompt already rendered by a chat template ("<|begin_of_text|>..." as verl's and many datasets hold it),
    encoded as text (--no-chat-template): the tokenizer's BOS was added before the text's own, so Llama read
    two; one is kept. A text without BOS still gets it, and a tokenizer that adds none leaves the text's."""
    from rpo_engine.trainer import encode_prompt

    assert encode_prompt(word_tokenizer(bos), {"id": "r", "prompt": "<s> what is 1+1 ?"}, 100, chat_template=False) \
        == [1, 7, 8, 9, 10]
    assert encode_prompt(word_tokenizer(bos), {"id": "r", "prompt": "<s> <s> what"}, 100, chat_template=False) \
        == [1, 1, 7]  # the text's own two are the text's
    assert encode_prompt(word_tokenizer(bos), {"id": "r", "prompt": "what <s>"}, 100, chat_template=False) \
        == [1] * bos + [7, 1]


@pytest.mark.parametrize("bos", [False, True])
def test_text_prompt_that_ends_with_eos_gets_no_second_one(bos):
    """The mirror of the BOS rule above, with a tokenizer that appends EOS: a text ending in its own EOS kept it and
    the tokenizer's too (two EOS before the answer); the appended one goes, the text's stays, as does a text's EOS
    where the tokenizer appends none. A text opening with BOS and ending with EOS gets neither twice."""
    from rpo_engine.trainer import encode_prompt

    def encode(prompt, eos=True):
        return encode_prompt(word_tokenizer(bos, eos), {"id": "r", "prompt": prompt}, 100, chat_template=False)

    assert encode("what </s>") == [1] * bos + [7, 2]
    assert encode("what </s> </s>") == [1] * bos + [7, 2, 2]  # the text's own two are the text's
    assert encode("what </s>", eos=False) == [1] * bos + [7, 2]
    assert encode("<s> what </s>") == [1, 7, 2]
    assert encode("</s>") == [1] * bos + [2]


def test_prompt_empty_or_too_long():
    from rpo_engine.trainer import encode_prompt

    with pytest.raises(UserError, match="prompt of row 'r' is empty after tokenization"):
        encode_prompt(word_tokenizer(), {"id": "r", "prompt": " "}, 100)
    with pytest.raises(UserError, match="prompt of row 'r' has 5 tokens, more than the 4 allowed"):
        encode_prompt(word_tokenizer(bos=True), {"id": "r", "prompt": "what is 1+1 ?"}, 4)


def test_conversational_prompts(tmp_path):
    """TRL's conversational rows: a system message, then the user's; and an assistant turn to continue."""
    from rpo_engine.trainer import encode_prompt

    system = {"role": "system", "content": "what is"}
    p = _write(tmp_path / "chat.jsonl", json.dumps({"prompt": [system, {"role": "user", "content": "1+1 ?"}],
                                                    "answer": "2"}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "what"}], "answer": "2"}))
    rows = load_dataset_rows(p)
    assert rows[0]["prompt"] == [system, {"role": "user", "content": "1+1 ?"}]
    tok = word_tokenizer(chat_template=QWEN_CHAT_TEMPLATE)
    assert tok.convert_ids_to_tokens(encode_prompt(tok, rows[0], 100)) == [
        "<|im_start|>", "system", "what", "is", "<|im_end|>", "<|im_start|>", "user", "1+1", "?", "<|im_end|>",
        "<|im_start|>", "assistant"]
    assert tok.convert_ids_to_tokens(encode_prompt(tok, rows[1], 100)) == [  # the assistant's words continue
        "<|im_start|>", "user", "1+1", "<|im_end|>", "<|im_start|>", "assistant", "what"]
    with pytest.raises(UserError, match="prompt of row '0' is a conversation, and the tokenizer has no chat template"):
        encode_prompt(word_tokenizer(), rows[0], 100)


def test_conversational_prompts_from_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    pq.write_table(pa.Table.from_pylist([{"prompt": messages, "answer": "4"}]), tmp_path / "chat.parquet")
    assert load_dataset_rows(tmp_path / "chat.parquet")[0]["prompt"] == messages


def test_chat_template_kwargs_reach_the_template():
    """--chat-template-kwargs (TRL's name): e.g. Qwen3's enable_thinking switch."""
    from rpo_engine.config import parse_args
    from rpo_engine.trainer import chat_template_kwargs, encode_prompt

    template = QWEN_CHAT_TEMPLATE + "{% if enable_thinking is defined and not enable_thinking %}what{% endif %}"
    tok, row = word_tokenizer(chat_template=template), {"id": "r", "prompt": "1+1"}
    kwargs = chat_template_kwargs(parse_args(["--chat-template-kwargs", '{"enable_thinking": false}']))
    assert kwargs == {"enable_thinking": False}
    assert tok.convert_ids_to_tokens(encode_prompt(tok, row, 100, kwargs))[-3:] == ["<|im_start|>", "assistant", "what"]
    assert tok.convert_ids_to_tokens(encode_prompt(tok, row, 100))[-2:] == ["<|im_start|>", "assistant"]


def test_no_chat_template_encodes_the_text_as_it_is():
    """--no-chat-template: a string prompt goes in raw (TRL's way with a string), BOS and all, even where the
    tokenizer has a template; a conversation then has nothing to render it."""
    from rpo_engine.config import parse_args
    from rpo_engine.trainer import encode_prompts

    tok, row = word_tokenizer(bos=True, chat_template=QWEN_CHAT_TEMPLATE), {"id": "r", "prompt": "what is 1+1 ?"}
    config = parse_args(["--no-chat-template"])
    kept, ids = encode_prompts(tok, [row], 100, {}, "d.jsonl", config.chat_template)
    assert (kept, list(ids)) == ([row], [[1, 7, 8, 9, 10]])
    assert encode_prompts(tok, [row], 100, {}, "d.jsonl")[1][0][:2] == [3, 5]  # the template by default
    with pytest.raises(UserError, match="prompt of row 'c' is a conversation, and --no-chat-template is set"):
        encode_prompts(tok, [{"id": "c", "prompt": [{"role": "user", "content": "1+1"}]}], 100, {}, "d.jsonl", False)
    with pytest.raises(UserError, match="--chat-template-kwargs does nothing with --no-chat-template"):
        parse_args(["--no-chat-template", "--chat-template-kwargs", '{"enable_thinking": false}'])


def test_chat_template_kwargs_cannot_set_the_encodings_own_arguments():
    """apply_chat_template's arguments given again were a TypeError traceback (or tensors for ids)."""
    from rpo_engine.config import parse_args

    for kwargs in ('{"add_generation_prompt": false}', '{"tokenize": false, "enable_thinking": true}',
                   '{"return_tensors": "pt"}', '{"messages": []}'):
        with pytest.raises(UserError, match=r"--chat-template-kwargs cannot set '\w+'"):
            parse_args(["--chat-template-kwargs", kwargs])


def test_chat_template_refusing_a_row_is_a_one_line_error():
    """A template's raise_exception (Qwen3's "No user query found in messages.") and a final assistant message
    the template rewrites (DeepSeek-R1's cut at </think>, here </s>) name the dataset and row."""
    from rpo_engine.trainer import encode_prompts

    no_user = ("{% if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}"
               "{{ raise_exception('No user query found in messages.') }}{% endif %}" + QWEN_CHAT_TEMPLATE)
    row = {"id": "7", "prompt": [{"role": "system", "content": "what is"}]}
    with pytest.raises(UserError) as e:
        encode_prompts(word_tokenizer(chat_template=no_user), [row], 100, {}, "d.jsonl")
    assert str(e.value) == ("d.jsonl: prompt of row '7': the tokenizer's chat template cannot render it "
                            "(No user query found in messages.)")
    cut = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'].split('</s>')[-1] }} {% endfor %}"
           "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    row = {"id": "r", "prompt": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "what"}]}
    assert list(encode_prompts(word_tokenizer(chat_template=cut), [row], 100, {}, "d.jsonl")[1]) == [[3, 5, 9, 3, 6, 7]]
    row["prompt"][1]["content"] = "what </s>"
    with pytest.raises(UserError, match=r"^d.jsonl: prompt of row 'r': .*\(it rewrites the final assistant message"):
        encode_prompts(word_tokenizer(chat_template=cut), [row], 100, {}, "d.jsonl")


def _random_prompt_rows(n, seed, conversations=True):
    """Rows of the word tokenizer's words (and words it lacks), strings and conversations, some ending in an
    assistant message, with BOS/EOS written into some texts."""
    import random

    rng = random.Random(seed)
    words = ["what", "is", "1+1", "?", "x", "<s>", "</s>"]
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        if conversations and rng.random() < 0.4:
            roles = rng.choice([["user"], ["system", "user"], ["user", "assistant"]])
            text = [{"role": role, "content": text if j == 0 else "what is"} for j, role in enumerate(roles)]
        rows.append({"id": str(i), "prompt": text})
    return rows


def _counting_encodes(monkeypatch, tok):
    """Record each call of `tok`'s encoding (encode, __call__, apply_chat_template's): how many texts it was given."""
    calls = []
    encode_plus = tok._encode_plus

    def counted(text, *args, **kwargs):
        calls.append(len(text) if isinstance(text, (list, tuple)) else 1)
        return encode_plus(text, *args, **kwargs)

    monkeypatch.setattr(tok, "_encode_plus", counted)
    return calls


@pytest.mark.parametrize("bos,eos,template", [(False, False, False), (True, False, False), (True, True, False),
                                              (False, False, True), (True, False, True)])
def test_encode_prompts_gives_each_rows_own_encoding(bos, eos, template):
    """encode_prompts encodes a dataset's prompts in batches: the same ids as encode_prompt gives each row alone,
    in the same order, and with --filter-overlong-prompts the same rows kept."""
    from rpo_engine.trainer import encode_prompt, encode_prompts

    tok = word_tokenizer(bos, eos, QWEN_CHAT_TEMPLATE if template else None)
    rows = [row for row in _random_prompt_rows(300, seed=7, conversations=template)
            if not (template and isinstance(row["prompt"], str) and any(t in row["prompt"] for t in ("<s>", "</s>")))]
    for chat_template in (True, False) if not template else (True,):
        expected = [encode_prompt(tok, row, 100, {}, chat_template) for row in rows]
        kept, ids = encode_prompts(tok, rows, 100, {}, "d.jsonl", chat_template)
        assert kept == rows and list(ids) == expected and len(ids) == len(rows)
        limit = sorted(map(len, expected))[len(expected) // 2]
        kept, ids = encode_prompts(tok, rows, limit, {}, "d.jsonl", chat_template, drop_overlong=True, say=False)
        assert kept == [row for row, e in zip(rows, expected) if len(e) <= limit]
        assert list(ids) == [e for e in expected if len(e) <= limit]


def test_encode_prompts_names_the_first_row_that_fails():
    """Rows encoded in a batch still fail one by one, in order: the first bad row is named, with its own reason."""
    from rpo_engine.trainer import encode_prompts

    no_user = ("{% if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}"
               "{{ raise_exception('No user query found in messages.') }}{% endif %}" + QWEN_CHAT_TEMPLATE)
    tok = word_tokenizer(chat_template=no_user)
    good = [{"id": str(i), "prompt": "what is 1+1 ?"} for i in range(5)]
    too_long = {"id": "long", "prompt": "what " * 30}
    refused = {"id": "sys", "prompt": [{"role": "system", "content": "what is"}]}
    rendered = {"id": "rendered", "prompt": "<|im_start|> what"}
    for bad, reason in [([too_long, refused], "prompt of row 'long' has"),
                        ([refused, too_long], "prompt of row 'sys': "),
                        ([rendered, refused], "prompt of row 'rendered' holds the special token")]:
        with pytest.raises(UserError, match=re.escape(f"d.jsonl: {reason}")):
            encode_prompts(tok, good + bad + good, 20, {}, "d.jsonl")


@pytest.mark.parametrize("template", [False, True])
def test_encode_prompts_encodes_each_prompt_once_in_batches(monkeypatch, template):
    """A dataset's prompts went through the tokenizer one call each, twice for a string prompt without a chat
    template (with and without the special tokens, which this tokenizer does not add): 84 of a 20k-row run's 92 s
    to its first step. Now in batches (the tokenizer spreads a batch over the cores), each prompt once."""
    from rpo_engine.trainer import PROMPT_BATCH, encode_prompts

    tok = word_tokenizer(chat_template=QWEN_CHAT_TEMPLATE if template else None)
    calls = _counting_encodes(monkeypatch, tok)
    rows = [{"id": str(i), "prompt": "what is 1+1 ?"} for i in range(3 * PROMPT_BATCH - 1)]
    encode_prompts(tok, rows, 100, {}, "d.jsonl")
    assert calls == [PROMPT_BATCH, PROMPT_BATCH, PROMPT_BATCH - 1], calls[:5]


def test_encode_prompts_holds_the_ids_compactly():
    """A dataset's prompt ids were lists of Python ints, 8 bytes a token for the list and 28 for each id past 256
    (~14 GB at NuminaMath's 860k prompts of ~450 tokens, in every rank): now 4 bytes a token."""
    import tracemalloc

    from rpo_engine.data.starter import tiny_task_model
    from rpo_engine.trainer import encode_prompts

    _, tok = tiny_task_model()
    rows = [{"id": str(i), "prompt": f"Let $f(x) = \\frac{{{i}x^2 + 7}}{{x - {i % 97}}}$; find f({i})." * 8}
            for i in range(500)]
    tracemalloc.start()
    try:
        _, ids = encode_prompts(tok, rows, 10**6, {}, "d.jsonl")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    tokens = sum(map(len, ids))
    assert held < 6 * tokens, (held, tokens)


def test_stop_ids_include_the_tokenizers_eos():
    """As TRL (generation_config's eos ids and the tokenizer's) and vLLM stop: a tokenizer whose eos_token
    (<|im_end|> set by hand on a base model) the config does not name still ends a completion."""
    from types import SimpleNamespace

    from rpo_engine.trainer import stop_ids

    tok = word_tokenizer()
    tok.eos_token = "<|im_end|>"
    model = SimpleNamespace(config=SimpleNamespace(stop_token_ids=(2,), vocab_size=word_tokenizer().vocab_size))
    assert stop_ids(model, tok) == [2, 4]
    model.config.stop_token_ids = (4, 2)
    assert stop_ids(model, tok) == [4, 2]
    model.config.stop_token_ids = ()
    assert stop_ids(model, tok) == [4]


def test_eval_rows_keep_their_dataset_ids(tmp_path):
    """Eval rows were renamed 'eval:<id>': a TRL-style reward reading the `id` column (tests keyed by problem
    id) got a KeyError at eval only. The splits' ids may overlap; each keeps its own."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import load_rows

    p = _write(tmp_path / "d.jsonl", '{"id": "a", "prompt": "p", "answer": "1"}\n{"prompt": "q", "answer": "2"}\n')
    train, evals = load_rows(parse_args(["--dataset", str(p), "--eval-dataset", str(p)]))
    assert [r["id"] for r in train] == [r["id"] for r in evals] == ["a", "1"]


# ----------------------------------------------------------------------------- mutation-audit additions

def test_jsonl_is_read_a_line_at_a_time(tmp_path):
    """A JSONL file was read whole, then split into lines, both held while the rows were parsed: two copies of the
    file beside its rows (+0.3 GB of peak memory at 200k rows of 1.5 kB, 2.6 GB at NuminaMath's 860k, in every
    rank). Read a line at a time, the peak is the rows and little more."""
    import tracemalloc

    from rpo_engine.data import datasets

    lines = [json.dumps({"prompt": f"row {i}: " + "\\frac{x}{2} " * 150, "answer": str(i)}) for i in range(1000)]
    p = _write(tmp_path / "d.jsonl", "\ufeff" + "\n".join(lines) + "\n")
    size = p.stat().st_size
    tracemalloc.start()
    try:
        rows = load_dataset_rows(p)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["answer"] for r in rows] == [str(i) for i in range(1000)] and rows[0]["prompt"].startswith("row 0")
    assert peak - held < size / 4, (peak - held, size)
    cut = _write(tmp_path / "cut.jsonl", lines[0] + '\n{"prompt": "p", "answer":\n' + lines[1] + "\n")
    assert _error(cut) == f"{cut}:2: not valid JSON (Expecting value at column 26); {datasets._EXPECTED}"


def test_json_array_after_leading_blank_lines(tmp_path):
    """A .json file whose array starts after blank lines or spaces is still one array of rows (kills testing
    data[:1] instead of data.lstrip()[:1])."""
    p = _write(tmp_path / "lead.json", "\n  \n " + json.dumps([{"prompt": "p", "answer": "a"}, {"prompt": "q", "answer": "b"}]))
    assert load_dataset_rows(p) == [{"id": "0", "prompt": "p", "answer": "a"}, {"id": "1", "prompt": "q", "answer": "b"}]


def test_null_and_boolean_ids(tmp_path):
    """A null id (a Parquet column with gaps) stands for the row's index (kills dropping `is not None`); a
    boolean id is refused, not turned into "True" (kills dropping the bool check)."""
    p = _write(tmp_path / "ids.jsonl", '{"id": null, "prompt": "p", "answer": "a"}\n{"id": "k", "prompt": "q", "answer": "b"}\n')
    assert [r["id"] for r in load_dataset_rows(p)] == ["0", "k"]
    msg = _error(_write(tmp_path / "bool.jsonl", '{"prompt": "p", "answer": "a"}\n{"id": true, "prompt": "q", "answer": "b"}\n'))
    assert ":2:" in msg and "'id' must be a string or an integer, got a boolean" in msg, msg


def test_float_ids_of_an_integer_column_with_gaps(tmp_path):
    """pandas and Parquet make an integer id column with a gap float (3.0, and null or NaN): a whole float is the
    integer's id and a gap, NaN too, the row's index, as null is; a fraction, or a float past 2**53 (no longer the
    integer it was), is refused naming the row."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def ids(*values):
        path = tmp_path / "ids.parquet"
        pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(len(values))], "answer": ["1"] * len(values),
                                 "id": pa.array(values, pa.float64())}), path)
        return path

    assert [r["id"] for r in load_dataset_rows(ids(5.0, None, 7.0, float("nan")))] == ["5", "1", "7", "3"]
    assert "row 1: duplicate id '1' (this row has no id: its row number" in _error(ids(1.0, float("nan")))
    assert "row 1: 'id' must be a string or an integer, got a number 1.5" in _error(ids(1.0, 1.5))
    msg = _error(ids(1.0, 2.0 ** 60))
    assert "row 1: 'id' 1.152921504606847e+18 is a float past 2**53" in msg, msg


def test_non_finite_answers_are_refused(tmp_path):
    """Python's json reads NaN and Infinity: such an answer is refused, not written out as "NaN" (kills
    skipping the isfinite check)."""
    for token in ("NaN", "Infinity", "-Infinity"):
        msg = _error(_write(tmp_path / "nf.jsonl", '{"prompt": "p", "answer": "a"}\n{"prompt": "q", "answer": %s}\n' % token))
        assert ":2:" in msg and "'answer' must be a string" in msg, msg


def test_unpaired_surrogate_names_its_character(tmp_path):
    """The 1-based character of the lone surrogate is named (kills an off-by-one in the position)."""
    msg = _error(_write(tmp_path / "s.jsonl", '{"prompt": "ab\\ud800c", "answer": "a"}\n'))
    assert ":1:" in msg and "'prompt' holds '\\ud800' at character 3" in msg, msg


def test_chat_template_kwargs_without_a_chat_template_is_an_error():
    # the text was encoded as it is and the arguments dropped without a word (the starter model has no template)
    from types import SimpleNamespace

    from rpo_engine.config import parse_args
    from rpo_engine.trainer import encode_run_prompts

    tok, model = word_tokenizer(), SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    config = parse_args(["--max-completion-length", "8", "--chat-template-kwargs", '{"enable_thinking": false}'])
    with pytest.raises(UserError, match=r"^--chat-template-kwargs does nothing: the tokenizer of the starter model has no chat template$"):
        encode_run_prompts(tok, [{"id": "r", "prompt": "1+1"}], config, model, "d.jsonl")


# ---- Hugging Face Hub datasets and the columns read as prompt and answer ----------------------------

GSM8K_CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
---
"""


@pytest.fixture
def gsm8k_like_hub(tmp_path, monkeypatch):
    """openai/gsm8k's layout (a dataset card declaring two configurations, Parquet files per split, question
    and answer columns) as `org/gsm` in a Hugging Face cache, offline; `datasets` writes its cache in tmp_path."""
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import huggingface_hub
    import pyarrow.parquet as pq

    from tests.helpers import hub_snapshot

    repo = tmp_path / "repo"
    for config, split, n in (("main", "train", 5), ("main", "test", 3), ("socratic", "train", 2)):
        (repo / config).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"question": [f"{config} {split} {i}+1=?" for i in range(n)],
                                 "answer": [f"{i} plus one\n#### {i + 1}" for i in range(n)]}),
                       repo / config / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(GSM8K_CARD)
    hub_snapshot(tmp_path / "hub", "org/gsm", repo, repo_type="dataset")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path / "hub"


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_the_offline_variables_datasets_reads_keep_a_hub_dataset_to_the_cache(gsm8k_like_hub, monkeypatch, variable):
    """HF_DATASETS_OFFLINE=1, which `load_dataset` obeys, kept no download from happening here (HF_HUB_OFFLINE
    alone did); the cache's copy is read, and a dataset it lacks is one line naming the variable that is set."""
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", variable == "TRANSFORMERS_OFFLINE")
    assert len(load_dataset_rows("org/gsm", prompt_column="question", config_name="main", split="test")) == 3
    with pytest.raises(UserError, match=f"^org/other: no such file, and no Hugging Face Hub dataset of that name in "
                                        f"the local cache \\({gsm8k_like_hub}\\) or to download "
                                        f"\\({variable} is set\\)$"):
        load_dataset_rows("org/other")


def test_hub_dataset_split_and_configuration_as_load_dataset_reads_them(gsm8k_like_hub):
    """`org/gsm` is the split of the configuration asked for (TRL's dataset_config / dataset_*_split), its
    question column read as the prompt; a configuration or split the card does not declare, or a dataset in no
    cache, is one line listing what there is."""
    rows = load_dataset_rows("org/gsm", prompt_column="question", config_name="main", split="test")
    assert [(r["id"], r["prompt"], r["answer"]) for r in rows] == [
        (str(i), f"main test {i}+1=?", f"{i} plus one\n#### {i + 1}") for i in range(3)]
    assert rows[0]["question"] == rows[0]["prompt"]  # the column itself stays, for reward functions reading it
    assert len(load_dataset_rows("org/gsm", prompt_column="question", config_name="socratic")) == 2  # split train
    for kwargs, message in ((dict(config_name="nope"), "org/gsm: BuilderConfig 'nope' not found. Available: \\['main', 'socratic'\\]$"),
                            (dict(), "org/gsm: Config name is missing. Please pick one among the available configs: \\['main', 'socratic'\\]$"),
                            (dict(config_name="main", split="validation"), "org/gsm: Unknown split \"validation\". Should be one of \\['train', 'test'\\].$")):
        with pytest.raises(UserError, match=f"^{message}"):
            load_dataset_rows("org/gsm", prompt_column="question", **kwargs)
    with pytest.raises(UserError, match="^org/gsm \\(main, split test\\): row 0: missing 'prompt' .*"
                                        "rename 'question' to 'prompt', or pass --dataset-prompt-column question\\?\\)$"):
        load_dataset_rows("org/gsm", config_name="main", split="test")
    with pytest.raises(UserError, match=f"^org/other: no such file, and no Hugging Face Hub dataset of that name in the "
                                        f"local cache \\({gsm8k_like_hub}\\) or to download \\(HF_HUB_OFFLINE is set\\)$"):
        load_dataset_rows("org/other")
    with pytest.raises(UserError, match="^data/train.jsonl: no such file"):  # a path with a typo, not a repository
        load_dataset_rows("data/train.jsonl")


def test_a_name_ending_like_a_data_or_weights_file_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    """org/name (a str or a path) where no such path is, is a Hub id; a name ending like a data or weights file
    (any case) is a path with a typo, never looked up; so are deeper paths, bare names and what is no path."""
    from rpo_engine.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    for name in ("data/train.jsonl", "data/Train.JSONL", "data/t.json", "data/t.ndjson", "data/t.parquet", "data/t.pq",
                 "data/t.csv", "data/t.txt", "out/model.safetensors", "org/tiny/extra", "gsm", None, 3):
        assert not is_hub_id(name), name
    assert is_hub_id("org/gsm") and is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id(Path("org/gsm"))
    (tmp_path / "org" / "gsm").mkdir(parents=True)
    assert not is_hub_id("org/gsm")  # a local path of that name wins


def test_training_options_read_a_hub_dataset_and_its_columns(gsm8k_like_hub):
    """--dataset org/gsm --dataset-config main --dataset-prompt-column question --eval-dataset org/gsm: train
    on its train split, evaluate on its test split (TRL's defaults; --dataset-*-split name others)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import load_rows

    config = parse_args(["--dataset", "org/gsm", "--eval-dataset", "org/gsm", "--dataset-config", "main",
                         "--dataset-prompt-column", "question", "--eval-size", "2"])
    train, eval_rows = load_rows(config)
    assert [r["prompt"] for r in train] == [f"main train {i}+1=?" for i in range(5)]
    assert [r["prompt"] for r in eval_rows] == [f"main test {i}+1=?" for i in range(2)]
    config = parse_args(["--dataset", "org/gsm", "--dataset-config", "main", "--dataset-train-split", "test",
                         "--dataset-prompt-column", "question", "--eval-steps", "0"])
    assert len(load_rows(config)[0]) == 3


def test_dataset_options_that_read_nothing_are_named(tmp_path):
    from rpo_engine.config import parse_args

    data = _write(tmp_path / "d.jsonl", '{"question": "1+1=", "answer": "2"}\n')
    for args, message in (
            (["--dataset-config", "main"], "--dataset-config does nothing without a --dataset or --eval-dataset with "
                                           "configurations (a Hub id, org/name, or a dataset repository's directory)"),
            (["--dataset", str(data), "--eval-steps", "0", "--dataset-train-split", "test"],
             "--dataset-train-split does nothing without a --dataset with splits (a Hub id, org/name, a dataset "
             "repository's directory or a `datasets` DatasetDict's)"),
            (["--dataset", str(data), "--eval-steps", "0", "--dataset-test-split", "dev"],
             "--dataset-test-split does nothing without a --eval-dataset with splits"),
            (["--dataset-prompt-column", "question"], "--dataset-prompt-column does nothing without --dataset or "
                                                       "--eval-dataset (the built-in task has its own fields)")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            parse_args(args)


def test_split_options_go_with_their_own_dataset(tmp_path):
    """--dataset-train-split reads the Hub --dataset, --dataset-test-split the Hub --eval-dataset: each given
    where only the other one is a Hub id does nothing, and is named."""
    from rpo_engine.config import parse_args

    data = _write(tmp_path / "d.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    for args, message in (
            (["--dataset", "org/gsm", "--eval-dataset", str(data), "--dataset-test-split", "dev"],
             "--dataset-test-split does nothing without a --eval-dataset with splits"),
            (["--dataset", str(data), "--eval-dataset", "org/gsm", "--dataset-train-split", "test"],
             "--dataset-train-split does nothing without a --dataset with splits")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            parse_args(args)


def test_every_known_column_name_is_hinted(tmp_path):
    """A row without 'prompt' or 'answer' but with a column other datasets use for it (problem, question, query,
    input; solution, ground_truth, target) names that column and the option that reads it."""
    for key, other, aliases in (("prompt", "answer", ("problem", "question", "query", "input")),
                                ("answer", "prompt", ("solution", "ground_truth", "target"))):
        for alias in aliases:
            p = _write(tmp_path / f"{alias}.jsonl", json.dumps({other: "x", alias: "y"}) + "\n")
            assert f"rename '{alias}' to '{key}', or pass --dataset-{key}-column {alias}?" in _error(p)


def test_columns_read_as_prompt_and_answer_in_local_files(tmp_path):
    """GSM8K's question / MATH's problem and solution, named by the column options, in any format; a column
    that is not there is named with the keys that are."""
    data = _write(tmp_path / "d.jsonl", '{"question": "1+1=", "final": 2}\n{"question": "2+2=", "final": "4"}\n')
    rows = load_dataset_rows(data, prompt_column="question", answer_column="final")
    assert [(r["prompt"], r["answer"]) for r in rows] == [("1+1=", "2"), ("2+2=", "4")]
    with pytest.raises(UserError, match=f"^{data}:1: missing 'prompt' .*found keys \\['final', 'question'\\]; "
                                        f"rename 'question' to 'prompt', or pass --dataset-prompt-column question\\?\\)$"):
        load_dataset_rows(data, answer_column="final")
    with pytest.raises(UserError, match=f"^{data}:1: no column 'query' \\(--dataset-prompt-column\\); found keys "
                                        f"\\['final', 'question'\\]$"):
        load_dataset_rows(data, prompt_column="query", answer_column="final")
    from rpo_engine.config import parse_args

    with pytest.raises(UserError, match="^--dataset-prompt-column and --dataset-answer-column both name 'final'$"):
        parse_args(["--dataset", str(data), "--dataset-prompt-column", "final", "--dataset-answer-column", "final"])


def test_verl_parquet_reads_its_nested_ground_truth(tmp_path):
    """verl's layout (its examples/data_preprocess: a chat `prompt`, the answer in `reward_model.ground_truth`): the
    missing answer names that field, which --dataset-answer-column reads by its dotted path, in Parquet and JSONL; a
    dotted name that leads nowhere is named with the row's keys; a column whose own name has a dot comes first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"Q: {i}+1"}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(i + 1)}, "extra_info": {"split": "train", "index": i}}
            for i in range(3)]
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    with pytest.raises(UserError, match=re.escape("pass --dataset-answer-column reward_model.ground_truth (verl's "
                                                  "layout)?")):
        load_dataset_rows(data)
    for path in (data, _write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))):
        read = load_dataset_rows(path, answer_column="reward_model.ground_truth")
        assert [(r["prompt"], r["answer"]) for r in read] == [
            ([{"role": "user", "content": f"Q: {i}+1"}], str(i + 1)) for i in range(3)]
    with pytest.raises(UserError, match=re.escape("row 0: no column 'reward_model.answer' (--dataset-answer-column); "
                                                  "found keys ['ability', 'data_source'")):
        load_dataset_rows(data, answer_column="reward_model.answer")
    flat = _write(tmp_path / "flat.jsonl", json.dumps({"prompt": "p", "a.b": "1", "a": {"b": "2"}}) + "\n")
    assert load_dataset_rows(flat, answer_column="a.b")[0]["answer"] == "1"


def test_eval_steps_0_reads_no_eval_set(tmp_path):
    """--eval-steps 0: no eval set is read (a Hub one would be downloaded for nothing, a broken one stop the run)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import load_rows

    train = _write(tmp_path / "t.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    broken = _write(tmp_path / "e.jsonl", "{not json\n")
    assert load_rows(parse_args(["--dataset", str(train), "--eval-dataset", str(broken), "--eval-steps", "0"]))[1] == []
    assert load_rows(parse_args(["--eval-steps", "0"]))[1] == []  # nor the built-in task's split
    with pytest.raises(UserError, match=f"^{broken}:1"):
        load_rows(parse_args(["--dataset", str(train), "--eval-dataset", str(broken)]))


def test_eval_cli_reads_a_hub_datasets_test_split(gsm8k_like_hub, tiny_model_dir, tmp_path, capsys):
    from rpo_engine.eval import main

    out = tmp_path / "preds.jsonl"
    main(["--model", str(tiny_model_dir), "--dataset", "org/gsm", "--dataset-config", "main",
          "--dataset-prompt-column", "question", "--max-completion-length", "4", "--no-progress", "--output", str(out)])
    assert "on 3 rows" in capsys.readouterr().out
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["prompt"], p["answer"]) for p in preds] == [(f"main test {i}+1=?", f"{i} plus one\n#### {i + 1}")
                                                           for i in range(3)]
    with pytest.raises(UserError, match="^--dataset-test-split does nothing without a --dataset with splits "):
        main(["--model", str(tiny_model_dir), "--dataset", str(out), "--dataset-test-split", "dev"])


def test_a_hub_dataset_that_datasets_cannot_read_is_one_line(gsm8k_like_hub, tmp_path):
    """`datasets`' own errors besides ValueError (no data files, a file that does not read, a card whose YAML
    does not parse) are a UserError naming the dataset, not a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import hub_snapshot

    for name, files, message in (
            ("org/none", {"loader.py": "print()\n"}, "No \\(supported\\) data files found in "),
            ("org/card", {"README.md": "---\nconfigs: [\n---\n", "d.jsonl": '{"prompt": "a", "answer": "b"}\n'},
             "its dataset card \\(README.md\\) is not valid YAML \\(while parsing a flow node"),
            ("org/cast", {"data/train-0.parquet": {"prompt": ["a"], "answer": ["b"]}, "data/train-1.parquet": {"q": [1]}},
             "An error occurred while generating the dataset \\(.*Couldn't cast")):
        repo = tmp_path / name.replace("/", "_")
        for file, text in files.items():
            (repo / file).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, dict):  # Parquet; org/cast's second file has another dataset's columns
                pq.write_table(pa.table(text), repo / file)
            else:
                (repo / file).write_text(text)
        hub_snapshot(gsm8k_like_hub, name, repo, repo_type="dataset")
        with pytest.raises(UserError, match=f"^{name}: {message}[^\n]*$"):
            load_dataset_rows(name)


def test_system_prompt_opens_every_conversation(tmp_path, tiny_model_dir):
    """--system-prompt (open-r1's name): a string prompt becomes [system, user] through the chat template; a
    conversation gets the system message first unless it has its own; eval rows too. Without a chat template
    (or with --no-chat-template) it is an error naming why, not prompts encoded without it."""
    import rpo_engine
    from rpo_engine.config import parse_args
    from rpo_engine.train import load_rows
    from rpo_engine.trainer import encode_run_prompts
    from tests.helpers import with_chat_template

    model_dir = with_chat_template(tiny_model_dir, tmp_path / "chat_model",
                                   "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer = rpo_engine.load_tokenizer(model_dir)
    data = _write(tmp_path / "d.jsonl", '{"prompt": "1+1=", "answer": "2"}\n'
                  '{"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}\n'
                  '{"prompt": [{"role": "system", "content": "Own."}, {"role": "user", "content": "3+3="}], "answer": "6"}\n')
    config = parse_args(["--model", str(model_dir), "--dataset", str(data), "--eval-dataset", str(data),
                         "--system-prompt", "Box it."])
    train, eval_rows = load_rows(config)
    assert train == eval_rows and [r["answer"] for r in train] == ["2", "4", "6"]
    _, ids = encode_run_prompts(tokenizer, train, config, rpo_engine.load_model(model_dir), "d.jsonl")
    assert [tokenizer.decode(i) for i in ids] == ["[system] Box it.\n[user] 1+1=\n[assistant] ",
                                                  "[system] Box it.\n[user] 2+2=\n[assistant] ",
                                                  "[system] Own.\n[user] 3+3=\n[assistant] "]
    with pytest.raises(UserError, match="^--system-prompt does nothing with --no-chat-template$"):
        parse_args(["--system-prompt", "x", "--no-chat-template"])
    starter_like = parse_args(["--model", str(tiny_model_dir), "--dataset", str(data), "--eval-steps", "0",
                               "--system-prompt", "x"])
    with pytest.raises(UserError, match=f"^--system-prompt needs a chat template: the tokenizer of {tiny_model_dir} "
                                        f"has none$"):
        encode_run_prompts(rpo_engine.load_tokenizer(tiny_model_dir), load_rows(starter_like)[0], starter_like,
                           rpo_engine.load_model(tiny_model_dir), "d.jsonl")
    from rpo_engine.eval import main as eval_main

    with pytest.raises(UserError, match="^--system-prompt needs a chat template"):  # eval reads it as training does
        eval_main(["--model", str(tiny_model_dir), "--dataset", str(data), "--system-prompt", "x", "--no-progress"])


def test_a_hub_dataset_whose_files_are_not_where_its_card_says_is_one_line(gsm8k_like_hub, tmp_path):
    """A card's configuration whose data_dir holds no files (`datasets` raises a FileNotFoundError of its own, not
    one of its DatasetsErrors) is one line naming the dataset, with the error it stems from; an error with no
    other behind it is not repeated in parentheses."""
    from tests.helpers import hub_snapshot

    repo = tmp_path / "org_dir"
    (repo / "elsewhere").mkdir(parents=True)
    (repo / "elsewhere" / "d.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_dir: nothere\n---\n")
    hub_snapshot(gsm8k_like_hub, "org/dir", repo, repo_type="dataset")
    with pytest.raises(UserError, match="^org/dir: Dataset at .* doesn't contain data files matching the patterns for "
                                        "config 'main'.* \\(EmptyDatasetError: The directory at .*nothere doesn't "
                                        "contain any data files\\)$"):
        load_dataset_rows("org/dir", config_name="main")
    (tmp_path / "org_none").mkdir()
    (tmp_path / "org_none" / "loader.py").write_text("print()\n")
    snapshot = hub_snapshot(gsm8k_like_hub, "org/none", tmp_path / "org_none", repo_type="dataset")
    with pytest.raises(UserError, match=f"^org/none: No \\(supported\\) data files found in {re.escape(str(snapshot))}$"):
        load_dataset_rows("org/none")


def test_a_system_prompt_that_is_empty_or_not_text_is_refused(tmp_path):
    """--system-prompt "" (or blanks) put an empty system message before every prompt, where a dataset's own empty
    message is refused; one holding an unpaired surrogate (a YAML "\\ud800", or a command line's byte that is not
    UTF-8) failed in the tokenizer with a TypeError traceback. Both are one line naming the option."""
    from rpo_engine.config import parse_args

    for text in ("", "  \n"):
        with pytest.raises(UserError, match="^--system-prompt is empty; "):
            parse_args(["--system-prompt", text])
    config = _write(tmp_path / "c.yaml", 'system_prompt: "Box \\ud800"\n')
    with pytest.raises(UserError, match="^--system-prompt holds '\\\\ud800' at character 5, which UTF-8 cannot encode"):
        parse_args(["--config", str(config)])
    with pytest.raises(UserError, match="^--system-prompt holds '\\\\udcff' at character 1, "):
        parse_args(["--system-prompt", b"\xff".decode("utf-8", "surrogateescape")])


def test_a_hub_datasets_broken_file_is_named_in_one_line_and_nothing_else(gsm8k_like_hub, tmp_path, capfd):
    """`datasets` logs a file it cannot read (naming it) on stderr before raising: a second line beside the one-line
    error, which itself did not name the file (a Parquet file's error is pyarrow's alone). The logged line is the
    error's reason now, and nothing else is printed."""
    from tests.helpers import hub_snapshot

    for name, file, data in (("org/badpq", "data/train.parquet", b"PAR1 not parquet PAR1"),
                             ("org/badjson", "data/train.jsonl", b'{"prompt": "a", "answer": "b"}\n{not json\n')):
        repo = tmp_path / name.replace("/", "_")
        (repo / "data").mkdir(parents=True)
        (repo / file).write_bytes(data)
        snapshot = hub_snapshot(gsm8k_like_hub, name, repo, repo_type="dataset")
        capfd.readouterr()
        with pytest.raises(UserError) as e:
            load_dataset_rows(name)
        message = str(e.value)
        assert message.startswith(f"{name}: ") and str(snapshot / file) in message and "\n" not in message, message
        assert "Failed to" not in capfd.readouterr().err


def test_no_progress_hides_the_hub_datasets_bars(gsm8k_like_hub, tiny_model_dir, capfd):
    """--no-progress (train and eval) hid every bar but `datasets`' "Generating train split" ones, printed when a Hub
    dataset is first read; they go too now, and stay where progress is asked for (and are on again after)."""
    import datasets

    from rpo_engine.config import parse_args
    from rpo_engine.eval import main
    from rpo_engine.train import load_rows

    capfd.readouterr()
    config = parse_args(["--dataset", "org/gsm", "--dataset-config", "main", "--dataset-prompt-column", "question",
                         "--eval-steps", "0", "--no-progress"])
    assert len(load_rows(config)[0]) == 5 and "Generating" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()
    main(["--model", str(tiny_model_dir), "--dataset", "org/gsm", "--dataset-config", "socratic", "--dataset-test-split",
          "train", "--dataset-prompt-column", "question", "--max-completion-length", "2", "--no-progress"])
    assert "Generating" not in capfd.readouterr().err
    datasets.config.HF_DATASETS_CACHE = str(gsm8k_like_hub.parent / "datasets-again")  # generated again, shown
    assert len(load_dataset_rows("org/gsm", prompt_column="question", config_name="main")) == 5
    assert "Generating train split" in capfd.readouterr().err


def test_a_name_the_hub_refuses_as_an_id_is_a_path(tmp_path, monkeypatch):
    """org/name spellings huggingface_hub refuses as a repository id (-- or .., a name starting with . or -, past
    96 characters, ending in .git) were taken for Hub ids: offline, "no Hugging Face Hub model of that name ...
    (HF_HUB_OFFLINE is set)", as if going online could find one. They are paths, as for huggingface_hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from rpo_engine.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    for name in ("org/x--y", "org/a..b", "o--rg/x", "org/.x", "org/-x", "org/_x", "org/x_", "o/x", f"org/{'a' * 96}",
                 f"org/{'a' * 97}", f"{'a' * 97}/x", "org/x.git", "org/x.gitx", "Qwen/Qwen2.5-0.5B-Instruct", "a.b/c-d"):
        try:
            validate_repo_id(name)
            valid = True
        except HFValidationError:
            valid = False
        assert is_hub_id(name) == valid, name
    with pytest.raises(UserError, match="^org/x--y: no such file"):
        load_dataset_rows("org/x--y")


def test_a_dataset_repository_directory_reads_as_its_hub_id_does(gsm8k_like_hub, tmp_path):
    """A directory that save_to_disk did not write (a Hub dataset downloaded with `hf download --local-dir`, a git
    clone, or train.jsonl beside test.jsonl) is read as `datasets`' load_dataset reads it: its configurations and
    splits chosen by the same options as a Hub id's."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import load_rows

    repo = tmp_path / "repo"  # the fixture's files of org/gsm
    for config, split in (("main", "test"), ("socratic", "train")):
        assert load_dataset_rows(repo, prompt_column="question", config_name=config, split=split) == \
            load_dataset_rows("org/gsm", prompt_column="question", config_name=config, split=split)
    config = parse_args(["--dataset", str(repo), "--dataset-config", "main", "--eval-dataset", str(repo),
                         "--dataset-prompt-column", "question"])
    train, eval_rows = load_rows(config)
    assert (len(train), len(eval_rows)) == (5, 3) and eval_rows[0]["prompt"] == "main test 0+1=?"
    with pytest.raises(UserError, match=f"^{re.escape(str(repo))}: Unknown split \"dev\". Should be one of"):
        load_dataset_rows(repo, prompt_column="question", config_name="main", split="dev")
    files = tmp_path / "files"
    files.mkdir()
    _write(files / "train.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    _write(files / "test.jsonl", '{"prompt": "3+3=", "answer": "6"}\n')
    assert [r["prompt"] for r in load_dataset_rows(files)] == ["1+1=", "2+2="]
    assert [r["prompt"] for r in load_dataset_rows(files, split="test")] == ["3+3="]


def test_without_the_datasets_package_a_hub_or_repository_dataset_is_one_line(tmp_path, monkeypatch):
    import importlib.util
    import sys

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    with pytest.raises(UserError, match=r"^org/x: reading a Hub dataset needs the datasets package \(pip install"):
        load_dataset_rows("org/x")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets: ImportError
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path))}: reading a dataset repository directory needs "):
        load_dataset_rows(tmp_path)


def test_a_hub_dataset_fetches_only_its_configurations_files(gsm8k_like_hub, tmp_path, monkeypatch):
    """The card first, then the files its `configs:` give the configuration asked for (every split of it, as
    datasets resolves them all): never another configuration's, which may be many GB; the whole repository
    where the card does not say (no card or configs, a configuration it lacks: datasets' own error lists them)."""
    import huggingface_hub

    from rpo_engine.data.datasets import config_data_files

    asked, snapshot_download = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(kw["allow_patterns"]) or snapshot_download(repo_id, **kw))
    assert len(load_dataset_rows("org/gsm", prompt_column="question", config_name="main", split="test")) == 3
    assert asked == [["README.md"], ["README.md", "main/train-*", "main/test-*"]]
    asked.clear()
    with pytest.raises(UserError, match="BuilderConfig 'nope' not found"):
        load_dataset_rows("org/gsm", prompt_column="question", config_name="nope")
    assert asked == [["README.md"], None]
    card = tmp_path / "README.md"
    for text, name, want in (
            ("---\nconfigs:\n- config_name: default\n  data_files: data/*.parquet\n---\n", None, ("data/*.parquet",)),
            ("---\nconfigs:\n- config_name: a\n  data_files: [a/x.jsonl, a/y.jsonl]\n- config_name: b\n  default: true\n"
             "  data_files:\n  - split: train\n    path: [b/1.jsonl, b/2.jsonl]\n---\n", None, ("b/1.jsonl", "b/2.jsonl")),
            ("---\nconfigs:\n- config_name: a\n  data_files: a/*\n- config_name: b\n  data_files: b/*\n---\n", None, None),
            ("---\nlicense: mit\n---\n# no configs\n", None, None), ("# no front matter\n", "main", None),
            ("---\nconfigs: [\n---\n", None, None)):
        card.write_text(text)
        assert config_data_files(card, name) == want, text
    assert config_data_files(tmp_path / "missing.md", None) is None


def test_a_datasetdict_directory_takes_the_split_options_but_no_configuration(tmp_path):
    """A DatasetDict's directory has splits (--dataset-train-split / --dataset-test-split choose, through the config
    checks too) but no configurations; a broken dataset_dict.json still finds the splits by their directories."""
    import datasets

    from rpo_engine.config import parse_args
    from rpo_engine.train import load_rows

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]),
                          "dev": datasets.Dataset.from_list([{"prompt": "c", "answer": "3"}])}).save_to_disk(dd)
    config = parse_args(["--dataset", str(dd), "--dataset-train-split", "dev", "--eval-dataset", str(dd),
                         "--dataset-test-split", "train"])
    train, eval_rows = load_rows(config)
    assert [r["prompt"] for r in train] == ["c"] and [r["prompt"] for r in eval_rows] == ["a", "b"]
    with pytest.raises(UserError, match="^--dataset-config does nothing without a --dataset or --eval-dataset with "
                                        "configurations"):
        parse_args(["--dataset", str(dd), "--dataset-config", "main"])
    (dd / "dataset_dict.json").write_text("{not json")
    assert [r["prompt"] for r in load_dataset_rows(dd, split="dev")] == ["c"]
    assert _error(dd, split="test") == (f"{dd}: a `datasets` DatasetDict without a split 'test' (it has dev, train; "
                                        f"--dataset-train-split and --dataset-test-split choose)")


def test_the_eval_names_its_own_split_option_for_a_datasetdict_without_the_split(tmp_path, tiny_model_dir):
    """The eval has --dataset-test-split only: a DatasetDict without its split named training's two options,
    one of which the eval refuses as unknown."""
    import datasets

    from rpo_engine.eval import main as eval_main

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}])}).save_to_disk(dd)
    with pytest.raises(UserError) as e:
        eval_main(["--model", str(tiny_model_dir), "--dataset", str(dd), "--no-progress"])
    assert str(e.value) == f"{dd}: a `datasets` DatasetDict without a split 'test' (it has train; --dataset-test-split chooses)"


def test_a_repository_directory_with_a_prose_readme_reads_quietly(tmp_path, capfd):
    """A README without YAML metadata is a card with none: huggingface_hub's line saying so is not printed."""
    import logging

    pytest.importorskip("datasets")
    (tmp_path / "README.md").write_text("# notes on this data\n")
    _write(tmp_path / "train.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    level = logging.getLogger("huggingface_hub.repocard").level
    assert [r["answer"] for r in load_dataset_rows(tmp_path, progress=False)] == ["2"]
    assert "metadata" not in capfd.readouterr().err
    assert logging.getLogger("huggingface_hub.repocard").level == level  # as it was


def test_eval_output_that_is_a_broken_symlink_is_refused_before_decoding(tiny_model_dir, tmp_path, monkeypatch):
    """--output naming a dangling symbolic link: Path.exists() follows it and says no, so the check passed and the
    write ('x' mode) failed with "File exists" after every row was decoded; refused at the start now."""
    import rpo_engine.eval as eval_cli

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q: 1+2\\nA:", "answer": "3"}\n')
    link = tmp_path / "preds.jsonl"
    link.symlink_to(tmp_path / "gone" / "preds.jsonl")
    loaded = []
    monkeypatch.setattr("rpo_engine.load_model", lambda *a, **k: loaded.append(a) or pytest.fail("loaded the model"))
    with pytest.raises(UserError, match=f"^{link}: already exists"):
        eval_cli.main(["--model", str(tiny_model_dir), "--dataset", str(data), "--max-completion-length", "2",
                       "--no-progress", "--output", str(link)])
    assert link.is_symlink() and not loaded
