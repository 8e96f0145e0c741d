"""Loading user datasets: JSONL or Parquet rows, a `datasets` directory (``save_to_disk``), or a split of a
Hugging Face Hub dataset (`org/name`), with a ``prompt`` string and an ``answer`` string (or the columns named
to stand for them).

Every problem is reported as a `UserError` with a one-line message ``<file>:<line>: <what was expected>``
(``<file>: row <n>: ...`` for Parquet and `datasets` directories, whose rows have no line numbers), so
the command line prints it and exits with code 2.

Row rules:
- ``prompt``: a non-empty string, or a conversation as TRL takes it: a non-empty list of messages
  ``{"role": str, "content": str}`` (e.g. a system message, then the user's), which needs a tokenizer with
  a chat template.
- ``answer``: a non-empty string. An integer (``"answer": 42``) or a finite float is accepted and converted
  to its text (``"42"``, ``"0.5"``; ``1e-05`` written out, ``"0.00001"``; ``18.0``, ``"18"``), because numeric answers are common
  in math datasets and the rewards compare strings/expressions; booleans, lists, objects and null are rejected.
- ``id``: optional; a string or an integer (converted to a string); a whole float is its integer (``3.0``:
  an integer column with a gap is float in pandas and Parquet), and null or NaN (that gap) is no id.
  Default: the row's index (0-based, counting only non-blank lines) as a string. Ids must be unique.
- Other fields (e.g. ``solution``) are kept as they are.
- The strings above must be text: a JSON escape of half a UTF-16 surrogate pair (a lone ``"\\ud800"``) is
  rejected, as the tokenizer cannot encode it.
Blank lines are skipped; a UTF-8 byte-order mark is ignored; ``.json`` may also hold one JSON array of rows.
"""
from __future__ import annotations

import decimal
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

from rpo_engine.errors import UserError
from rpo_engine.hub import hub_snapshot, is_hub_id

__all__ = ["load_dataset_rows", "load_hub_dataset_rows", "validate_rows"]

_EXPECTED = "expected a JSON object with a 'prompt' string and an 'answer' string"
COLUMNS = ("prompt", "answer")
_ALIASES = {"prompt": ("problem", "question", "query", "input"), "answer": ("solution", "ground_truth", "target")}
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _short(value) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", str: "a string",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _check_text(value: str, where: str, what: str) -> None:
    """`value` encodable as UTF-8: json.loads turns a lone "\\ud800" escape into a surrogate that the loader
    would pass and the tokenizer fail on, steps later, with a TypeError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: {what} holds {value[e.start]!r} at character {e.start + 1}, an unpaired UTF-16 "
                        f"surrogate that UTF-8 cannot encode") from None


def _check_row(row, where: str, index: int, columns: tuple[str, str] = COLUMNS) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: {_EXPECTED}, got {_type_name(row)}")
    keys = sorted(map(str, row))
    if columns != COLUMNS:  # --dataset-prompt-column / --dataset-answer-column: read as prompt and answer
        picked = {}
        for key, column in zip(COLUMNS, columns):
            if column != key:
                try:
                    picked[key] = _field(row, column)
                except KeyError:
                    raise UserError(f"{where}: no column {column!r} (--dataset-{key}-column); found keys {keys}") from None
        row = {**row, **picked}
    out = dict(row)
    for key in ("prompt", "answer"):
        if key not in row:
            alias = next((k for k in _ALIASES[key] if k in row), None)  # MATH's problem/solution, GSM8K's question
            hint = f"; rename '{alias}' to '{key}', or pass --dataset-{key}-column {alias}?" if alias else ""
            if key == "answer" and isinstance(row.get("reward_model"), dict) and "ground_truth" in row["reward_model"]:
                hint = "; pass --dataset-answer-column reward_model.ground_truth (verl's layout)?"
            raise UserError(f"{where}: missing '{key}' ({_EXPECTED}; found keys {keys}{hint})")
        v = row[key]
        if key == "prompt" and not isinstance(v, str):
            out[key] = _check_messages(v, where)
            continue
        if key == "answer" and isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{where}: 'answer' must be a string, got {_short(v)}")
            # numeric answers are accepted and compared as their text (42 -> "42"), written out positionally:
            # str(1e-05) is "1e-05", which no completion writes; a whole float (18.0: an integer column with a
            # gap is float in pandas and Parquet) is the integer's text, which --reward exact compares
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            v = str(v) if isinstance(v, int) else format(decimal.Decimal(repr(v)), "f")
        if not isinstance(v, str):
            raise UserError(f"{where}: '{key}' must be a string, got {_type_name(v)} {_short(v)}")
        if not v.strip():
            raise UserError(f"{where}: '{key}' is empty (expected a non-empty string)")
        _check_text(v, where, f"'{key}'")
        out[key] = v
    if not _missing_id(row):
        rid = row["id"]
        if isinstance(rid, float) and rid.is_integer():  # an integer column with a gap, read as float
            if abs(rid) > 2 ** 53:  # past float's exact integers: another id than the one written
                raise UserError(f"{where}: 'id' {rid!r} is a float past 2**53, no longer the integer it was; write "
                                f"the ids as integers or strings")
            rid = int(rid)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise UserError(f"{where}: 'id' must be a string or an integer, got {_type_name(rid)} {_short(rid)}")
        _check_text(str(rid), where, "'id'")
        out["id"] = str(rid)
    else:
        out["id"] = str(index)
    return out


def _field(row: dict, column: str):
    """`row[column]`, or where no column has that name, the nested field a dotted one names (verl's
    reward_model.ground_truth); KeyError where neither is there."""
    if column in row:
        return row[column]
    value = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def _missing_id(row) -> bool:
    """No id: none given, null, or NaN (pandas' gap in a float column, and its JSON's NaN)."""
    rid = row.get("id")
    return rid is None or (isinstance(rid, float) and math.isnan(rid))


def _check_messages(messages, where: str) -> list[dict]:
    """A conversational prompt: [{"role", "content"}, ...], each a non-empty string."""
    if hasattr(messages, "tolist"):  # pandas reads a Parquet list column as a numpy array
        messages = messages.tolist()
    expected = "'prompt' must be a string or a list of {\"role\": str, \"content\": str} messages"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{where}: {expected}, got {_type_name(messages)} {_short(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) and m[k].strip() for k in ("role", "content")):
            raise UserError(f"{where}: prompt message {i} must have a non-empty 'role' and 'content' string, "
                            f"got {_short(m)}")
        for key in ("role", "content"):
            _check_text(m[key], where, f"prompt message {i}'s '{key}'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def validate_rows(rows, wheres, source: str, columns: tuple[str, str] = COLUMNS) -> list[dict]:
    """Check rows (see the module doc) and that ids are unique. `wheres[i]` names row i in messages;
    `columns`: the fields read as prompt and answer (copied to those names)."""
    out: list[dict] = []
    first_seen: dict[str, str] = {}
    for i, (row, where) in enumerate(zip(rows, wheres)):
        r = _check_row(row, where, i, columns)
        if r["id"] in first_seen:
            own = not _missing_id(row) if isinstance(row, dict) else True
            raise UserError(f"{where}: duplicate id {r['id']!r}" + ("" if own else " (this row has no id: its row number, "
                            "counted from 0, stands in)") + f" (first used at {first_seen[r['id']]}); ids must be unique")
        first_seen[r["id"]] = where
        out.append(r)
    if not out:
        raise UserError(f"{source}: the dataset is empty ({_EXPECTED} per line)")
    return out


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """An object with each key once: with a key twice json.loads keeps the last silently (which answer is meant?)."""
    row = dict(pairs)
    if len(row) != len(pairs):  # name the first key seen twice
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return row


def _parse_json(text: str):
    """json.loads, each object's keys once. -> the value, or a one-line reason it is not valid JSON (a duplicate key,
    nesting deeper than the parser's recursion limit: a RecursionError traceback before) with where it is, if known."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys), None
    except json.JSONDecodeError as e:
        return None, (f"{e.msg} at column {e.colno}", e.lineno)
    except _DuplicateKey as e:
        return None, (f"key {e.args[0]!r} given twice", None)
    except RecursionError:
        return None, ("nested too deeply", None)


def _read_jsonl(path: str, columns: tuple[str, str]) -> list[dict]:
    """A line at a time: the whole file and its lines, held beside the rows they parse to, were two more copies of
    the dataset (2.6 GB at NuminaMath's 860k rows, in every rank)."""
    rows, wheres = [], []
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        start = f.tell()
        if path.lower().endswith(".json"):
            while (chunk := f.read(1 << 16)) and not chunk.strip():
                pass
            if chunk.lstrip()[:1] == b"[":
                f.seek(start)
                return _read_json_array(path, f.read(), columns)
            f.seek(start)
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:  # without its newline: a JSON error at the line's end is at its last column, not the next line's first
                line = raw.removesuffix(b"\n").decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start + 1}); expected UTF-8 JSON lines") from None
            if not line.strip():
                continue
            row, invalid = _parse_json(line)
            if invalid:
                raise UserError(f"{where}: not valid JSON ({invalid[0]}); {_EXPECTED}")
            rows.append(row)
            wheres.append(where)
    return validate_rows(rows, wheres, path, columns)


def _read_json_array(path: str, data: bytes, columns: tuple[str, str]) -> list[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start + 1})") from None
    rows, invalid = _parse_json(text)
    if invalid:
        reason, lineno = invalid
        raise UserError(f"{path}{'' if lineno is None else f':{lineno}'}: not valid JSON ({reason}); "
                        f"expected a JSON array of rows or JSON lines")
    return validate_rows(rows, [f"{path}: row {i}" for i in range(len(rows))], path, columns)


def _read_parquet(path: str, columns: tuple[str, str]) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None
    else:
        try:
            import pandas as pd
        except ImportError:
            raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pd.read_parquet(path).to_dict(orient="records")
        except ImportError:
            raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None
    return validate_rows(rows, [f"{path}: row {i}" for i in range(len(rows))], path, columns)


def dataset_layout(path) -> str:
    """How load_dataset_rows reads `path`: "hub" (an org/name id, no such path), "saved" (a directory written by
    `datasets`' Dataset.save_to_disk), "splits" (a DatasetDict's: one split a directory), "repository" (any other
    directory: a Hub dataset repository's files, as `hf download --repo-type dataset --local-dir` or a git clone
    leave them, or data files such as train.jsonl beside test.jsonl; read as `datasets`' load_dataset reads it),
    "file", or "missing"."""
    if is_hub_id(path):
        return "hub"
    if path is None or not os.path.exists(path):
        return "missing"
    if not os.path.isdir(path):
        return "file"
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return "splits"
    return "saved" if os.path.isfile(os.path.join(path, "state.json")) else "repository"


def _split_dir(path: str, split: str) -> str:
    """The directory of `split` in a DatasetDict's `path` (its dataset_dict.json lists the splits)."""
    try:
        with open(os.path.join(path, "dataset_dict.json")) as f:
            names = [str(n) for n in json.load(f)["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    if split not in names:
        raise UserError(f"{path}: a `datasets` DatasetDict without a split {split!r} (it has {', '.join(names)}; "
                        f"--dataset-train-split and --dataset-test-split choose)")
    if not os.path.isdir(os.path.join(path, split)):
        raise UserError(f"{os.path.join(path, split)}: missing (a split listed in {path}/dataset_dict.json)")
    return os.path.join(path, split)


def _read_arrow_dir(path: str, columns: tuple[str, str]) -> list[dict]:
    """A directory written by `datasets`' ``Dataset.save_to_disk``: state.json names the Arrow stream files
    (indices are already applied on save). Read with pyarrow, which `datasets` itself is built on, so
    `datasets` need not be installed."""
    state = os.path.join(path, "state.json")
    try:
        with open(state) as f:
            files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except FileNotFoundError:
        raise UserError(f"{path}: is a directory without state.json (expected a directory written by `datasets`' "
                        f"save_to_disk)") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{state}: not a `datasets` state file (expected JSON with a '_data_files' list)") from None
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError(f"{path}: reading a `datasets` directory needs pyarrow (pip install pyarrow)") from None
    rows = []
    for name in files:
        file = os.path.join(path, name)
        try:
            with pa.memory_map(file) as source:
                rows += pa.ipc.open_stream(source).read_all().to_pylist()
        except FileNotFoundError:
            raise UserError(f"{file}: missing (listed in {state})") from None
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise UserError(f"{file}: not a readable Arrow stream ({' '.join(str(e).split())[:200]})") from None
    return validate_rows(rows, [f"{path}: row {i}" for i in range(len(rows))], path, columns)


def load_dataset_rows(path, prompt_column: str = "prompt", answer_column: str = "answer",
                      config_name: str | None = None, split: str = "train", progress: bool = True) -> list[dict]:
    """Rows of a JSONL (``.jsonl``/``.json``/``.ndjson``) or Parquet (``.parquet``) dataset, of a directory
    written by `datasets`' ``save_to_disk``, or of a Hugging Face Hub dataset (`org/name` where no such path is:
    its `split`, of its configuration `config_name`; load_hub_dataset_rows), each a dict with ``id``, ``prompt``
    and ``answer`` strings (plus any other fields of the row). `prompt_column` / `answer_column`: the fields read
    as the prompt and the answer (GSM8K's ``question``); `progress`: `datasets`' bars where it reads one. Raises UserError (one line, naming the file and line)
    for a missing file, an unknown extension, an unparsable line, a row without a ``prompt``/``answer`` string,
    a duplicate id, or an empty dataset."""
    columns = (prompt_column, answer_column)
    layout = dataset_layout(path)
    if layout == "hub":
        return load_hub_dataset_rows(os.fspath(path), config_name, split, columns, progress)
    path = os.fspath(path)
    if layout == "missing":
        raise UserError(f"{path}: no such file (expected a .jsonl or .parquet dataset)")
    if layout == "repository":
        return _read_repository(path, path, config_name, split, columns, progress)
    if layout in ("saved", "splits"):
        try:
            return _read_arrow_dir(_split_dir(path, split) if layout == "splits" else path, columns)
        except PermissionError:
            raise UserError(f"{path}: permission denied (cannot read the dataset)") from None
    lower = path.lower()
    try:
        if lower.endswith(_JSONL_SUFFIXES):
            return _read_jsonl(path, columns)
        if lower.endswith((".parquet", ".pq")):
            return _read_parquet(path, columns)
    except PermissionError:
        raise UserError(f"{path}: permission denied (cannot read the dataset)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory (expected a dataset file)") from None
    raise UserError(f"{path}: unknown dataset format (expected a .jsonl, .json or .parquet file)")


class _LoggedErrors(logging.Filter):
    """`datasets` logs a data file it cannot read (naming the file, which its exception does not) on stderr, then
    raises: kept as the one-line error's reason instead of printed as a line beside it."""

    def __init__(self):
        super().__init__()
        self.last = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.last = " ".join(record.getMessage().split())
        return False


def load_hub_dataset_rows(repo_id: str, config_name: str | None = None, split: str = "train",
                          columns: tuple[str, str] = COLUMNS, progress: bool = True) -> list[dict]:
    """The `split` of the Hub dataset `repo_id` (of its configuration `config_name`), as `datasets`'
    load_dataset(repo_id, config_name, split=split) gives it: the repository's snapshot from the Hugging Face
    cache (downloaded first where needed and possible: rpo_engine.hub), read by `datasets` as its dataset card
    declares its configurations and split files. Needs the `datasets` package."""
    if importlib.util.find_spec("datasets") is None:  # before any download
        raise UserError(f"{repo_id}: reading a Hub dataset needs the datasets package (pip install datasets)")
    # The card first: where it declares the configuration's files, only those are fetched (a repository may hold
    # other configurations of many GB); else the whole repository, for datasets to infer its layout.
    card = hub_snapshot(repo_id, "dataset", allow_patterns=("README.md",)) / "README.md"
    files = config_data_files(card, config_name)
    directory = hub_snapshot(repo_id, "dataset", allow_patterns=None if files is None else ("README.md", *files))
    return _read_repository(str(directory), repo_id, config_name, split, columns, progress)


def config_data_files(card: Path, config_name: str | None) -> tuple[str, ...] | None:
    """The data-file patterns (every split's) that a dataset card's YAML `configs:` gives the configuration
    `config_name` (None: its only one, or the one marked default, as `datasets` picks it); None where the card
    does not say (no card, no configs, a name it lacks: `datasets` then reads, or refuses, the whole
    repository)."""
    import yaml

    try:
        text = card.read_text(encoding="utf-8")
        meta = yaml.safe_load(text[3:text.index("\n---", 3)]) if text.startswith("---") else None
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        return None
    if config_name is not None:
        chosen = [c for c in configs if c.get("config_name") == config_name]
    else:
        chosen = configs if len(configs) == 1 else [c for c in configs if c.get("default")]
    if len(chosen) != 1:
        return None
    data_files = chosen[0].get("data_files")
    entries = data_files if isinstance(data_files, list) else [data_files]
    patterns = []
    for entry in entries:
        paths = entry.get("path") if isinstance(entry, dict) else entry
        for path in paths if isinstance(paths, list) else [paths]:
            if not isinstance(path, str):
                return None
            patterns.append(path)
    return tuple(patterns) or None


def _read_repository(directory: str, name: str, config_name: str | None, split: str, columns: tuple[str, str],
                     progress: bool) -> list[dict]:
    """`split` (of the configuration `config_name`) of the dataset repository in `directory`, as `datasets`'
    load_dataset reads it (its card's configurations and split files, or the layout of its data files); errors
    name the dataset `name` (a Hub id, or the directory itself)."""
    try:
        import datasets
        import yaml  # datasets reads a dataset card's YAML with it
    except ImportError:
        raise UserError(f"{name}: reading a dataset repository directory needs the datasets package (pip install "
                        f"datasets), or give a .jsonl or .parquet file") from None
    logged = _LoggedErrors()
    handlers = list(logging.getLogger("datasets").handlers)
    for handler in handlers:
        handler.addFilter(logged)
    bars = datasets.is_progress_bar_enabled()
    if not progress:  # --no-progress: its "Generating train split" bars too
        datasets.disable_progress_bars()
    # a card without YAML metadata (a README of prose) is read as one with none, but said so on stderr
    card_log = logging.getLogger("huggingface_hub.repocard")
    card_level = card_log.level
    card_log.setLevel(logging.ERROR)
    try:
        rows = datasets.load_dataset(directory, name=config_name, split=split).to_list()
    except ValueError as e:  # an unknown or missing configuration, an unknown split: it lists the ones there are
        message = " ".join(line.strip() for line in str(e).split("Example of usage")[0].splitlines() if line.strip())
        raise UserError(f"{name}: {logged.last or message}") from None  # pyarrow's ArrowInvalid is a ValueError
    except yaml.YAMLError as e:
        raise UserError(f"{name}: its dataset card (README.md) is not valid YAML "
                        f"({' '.join(str(e).split())[:200]})") from None
    except (OSError, datasets.exceptions.DatasetsError) as e:
        # no data files, a file that does not read (DatasetGenerationError: the reader's error is its cause): one
        # line, not a traceback
        cause = e.__cause__ or e
        reason = logged.last or (f"{type(cause).__name__}: {' '.join(str(cause).split())}" if cause is not e else "")
        raise UserError(f"{name}: {' '.join(str(e).split())}" + (f" ({reason[:400]})" if reason else "")) from None
    finally:
        for handler in handlers:
            handler.removeFilter(logged)
        card_log.setLevel(card_level)
        if bars:
            datasets.enable_progress_bars()
    source = f"{name} ({f'{config_name}, ' if config_name else ''}split {split})"
    return validate_rows(rows, [f"{source}: row {i}" for i in range(len(rows))], source, columns)
