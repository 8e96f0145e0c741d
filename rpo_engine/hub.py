"""Hugging Face Hub ids (`org/name`) where a local path is expected, resolved as transformers' from_pretrained
and `datasets`' load_dataset resolve them: the repository's snapshot in the local cache (HF_HOME /
HF_HUB_CACHE), brought up to date or downloaded first where the network allows (HF_HUB_OFFLINE=1: the cache
alone). A local path of the same relative name wins, as in from_pretrained."""
from __future__ import annotations

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


def hub_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: tuple[str, ...] | None = None,
                 cached_only: bool = False) -> Path:
    """The directory of `repo_id`'s snapshot in the cache (downloaded first where needed and possible, unless
    `cached_only`); a UserError naming the id, the cache and why when there is none."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=cached_only,
                                      allow_patterns=None if allow_patterns is None else list(allow_patterns)))
    except (OSError, ValueError, HfHubHTTPError) as e:
        cause = e.__cause__ or e  # the request's own error (a ConnectError, a 404) where the cache was tried after it
        reason = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
                  f"{type(cause).__name__}: {(str(cause).strip() or '-').splitlines()[0]}")
        raise UserError(f"{repo_id}: no such {'directory' if repo_type == 'model' else 'file'}, and no Hugging Face "
                        f"Hub {repo_type} of that name in the local cache ({constants.HF_HUB_CACHE}) or to download "
                        f"({reason})") from None
