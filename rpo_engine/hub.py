"""Hugging Face Hub ids (`org/name`) where a local path is expected, resolved as transformers' from_pretrained
and `datasets`' load_dataset resolve them: the repository's snapshot in the local cache (HF_HOME /
HF_HUB_CACHE), brought up to date or downloaded first where the network allows (HF_HUB_OFFLINE=1: the cache
alone). A local path of the same relative name wins, as in from_pretrained."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from rpo_engine.errors import UserError

# org/name as huggingface_hub's validate_repo_id takes it: each part 1 to 96 of \w . -, neither starting nor ending
# with . or -, no -- or .. and no .git at the end (a name it refuses was "no Hub model of that name" offline)
_HUB_ID = re.compile(r"\b[\w.-]{1,96}\b/\b[\w.-]{1,96}\b")
# a name ending like a data file is a path with a typo (data/train.jsonl), not a repository
_FILE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq", ".csv", ".txt", ".safetensors")


def is_hub_id(name) -> bool:
    """`name` is read as a Hub id: it has the form org/name, does not end like a data file, and no such local
    path exists."""
    if not isinstance(name, (str, os.PathLike)):
        return False
    name = os.fspath(name)
    return (bool(_HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".git")
            and not name.lower().endswith(_FILE_SUFFIXES) and not os.path.exists(name))


@contextlib.contextmanager
def download_bars_hidden():
    """--no-progress: huggingface_hub's download bars (a Hub model, dataset or reward model) hidden too while a run
    or an eval runs, and shown again after it where they were: hidden for the rest of the process, they stayed
    hidden for a notebook's or script's own downloads after train(config)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    shown = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            enable_progress_bars()


def hub_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: tuple[str, ...] | None = None,
                 cached_only: bool = False) -> Path:
    """The directory of `repo_id`'s snapshot in the cache (downloaded first where needed and possible, unless
    `cached_only`); a UserError naming the id, the cache and why when there is none."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    offline = offline_variable(repo_type)
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=cached_only or offline is not None,
                                      allow_patterns=None if allow_patterns is None else list(allow_patterns)))
    except (OSError, ValueError, HfHubHTTPError) as e:
        cause = e.__cause__ or e  # the request's own error (a ConnectError, a 404) where the cache was tried after it
        reason = (f"{offline} is set" if offline is not None else
                  f"{type(cause).__name__}: {(str(cause).strip() or '-').splitlines()[0]}")
        raise UserError(f"{repo_id}: no such {'directory' if repo_type == 'model' else 'file'}, and no Hugging Face "
                        f"Hub {repo_type} of that name in the local cache ({constants.HF_HUB_CACHE}) or to download "
                        f"({reason})") from None


def offline_variable(repo_type: str) -> str | None:
    """The variable that keeps a `repo_type` repository to the cache, as the Hugging Face libraries read them:
    HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE (huggingface_hub's), for a dataset also HF_DATASETS_OFFLINE, which
    `load_dataset` obeys; None where downloads are allowed."""
    from huggingface_hub import constants

    def true(name):
        return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")

    if constants.HF_HUB_OFFLINE:
        only_transformers = true("TRANSFORMERS_OFFLINE") and not true("HF_HUB_OFFLINE")
        return "TRANSFORMERS_OFFLINE" if only_transformers else "HF_HUB_OFFLINE"
    if repo_type == "dataset" and true("HF_DATASETS_OFFLINE"):
        return "HF_DATASETS_OFFLINE"
    return None


def _why(e: BaseException) -> str:
    cause = e.__cause__ or e
    return f"{type(cause).__name__}: {(str(cause).strip() or '-').splitlines()[0][:300]}"


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a Hub request raises: HTTP errors, the transport's own (a ConnectError is no OSError), a bad id."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, HfHubHTTPError)
    try:
        import httpx

        errors += (httpx.HTTPError,)
    except ImportError:  # huggingface_hub before 1.0 speaks requests, whose errors are OSErrors
        pass
    return errors


def create_push_repo(repo_id: str, private: bool | None) -> str:
    """--push-to-hub, at the start of a run (as transformers' Trainer does it): the model repository `repo_id`
    (`name` in the token's own namespace, or `org/name`) created, or found, now, so that a missing token, a name
    taken by someone else or no network is an error before the training, not after it -> its full id."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if constants.HF_HUB_OFFLINE:
        raise UserError("--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded")
    if get_token() is None:
        raise UserError("--push-to-hub needs a Hugging Face token that may write: set HF_TOKEN or run `hf auth login`")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--hub-model-id {repo_id!r}: not a Hub repository id ({' '.join(str(e).split())[:200]})") from None
    try:
        return HfApi().create_repo(repo_id, private=private, exist_ok=True).repo_id
    except _hub_errors() as e:
        raise UserError(f"--push-to-hub: cannot create or reach the model repository {repo_id} ({_why(e)})") from None


def push_folder(repo_id: str, folder: Path, message: str) -> str:
    """Upload `folder` as the content of the model repository `repo_id` (made by create_push_repo) -> its URL.
    A failure is one line that says the folder is kept and how to upload it by hand."""
    from huggingface_hub import HfApi, constants

    try:
        HfApi().upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except _hub_errors() as e:
        raise UserError(f"--push-to-hub: uploading {folder} to {repo_id} failed ({_why(e)}); it is kept: upload it "
                        f"with `hf upload {repo_id} {folder}`") from None
    return f"{constants.ENDPOINT}/{repo_id}"
