"""The starter model's recipe plumbing: length-bucketed batches, the cache key, build once and reuse."""
import json
import os
import random
import shutil
from pathlib import Path

import torch

import rpo_engine
from rpo_engine.data import starter
from rpo_engine.data.starter import StarterRecipe, ensure_starter_model, length_bucketed_batches


def test_length_bucketed_batches_cover_random_pools_with_little_padding():
    rng = random.Random(0)
    examples = [([1] * rng.randint(1, 5), [2] * rng.randint(1, 300)) for _ in range(2000)]
    batches = length_bucketed_batches(examples, batch_size=16, rng=random.Random(1), pool_batches=8)
    drawn = [next(batches) for _ in range(64)]
    assert all(len(b) == 16 for b in drawn)
    ids = [id(e) for b in drawn[:8] for e in b]
    assert len(set(ids)) == 128  # one pool: 8 batches of distinct examples
    length = lambda e: len(e[0]) + len(e[1])
    padded = sum(16 * max(map(length, b)) for b in drawn)
    real = sum(length(e) for b in drawn for e in b)
    random_batches = [random.Random(2).sample(examples, 16) for _ in range(64)]
    padded_random = sum(16 * max(map(length, b)) for b in random_batches)
    assert real / padded > 0.85 and padded < 0.7 * padded_random
    # batches of a pool come in random order, not shortest first
    firsts = [max(map(length, b)) for b in drawn[:8]]
    assert firsts != sorted(firsts)


def test_cache_key_follows_recipe_and_architecture(monkeypatch):
    base = StarterRecipe().key()
    assert StarterRecipe(steps=5).key() != base
    assert StarterRecipe().key() == base
    monkeypatch.setitem(starter.STARTER_ARCH, "hidden_size", 64)
    assert StarterRecipe().key() != base


def test_built_once_then_reused(tmp_path):
    recipe = StarterRecipe(num_train_rows=64, steps=3, batch_size=4, warmup_steps=1)
    directory = ensure_starter_model(tmp_path, progress=False, recipe=recipe)
    assert directory.parent == tmp_path and directory.name == f"starter-{recipe.key()}"
    summary = json.loads((directory / "starter.json").read_text())
    assert summary["recipe"]["steps"] == 3 and summary["num_parameters"] > 0
    model, tok = rpo_engine.load_model(directory), rpo_engine.load_tokenizer(directory)
    assert model.config.hidden_size == starter.STARTER_ARCH["hidden_size"]
    assert tok.decode(tok.encode("Q: 12+34\nA:")) == "Q: 12+34\nA:"
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert ensure_starter_model(tmp_path, progress=False, recipe=recipe) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("Q: 12+34\nA:")]))
    assert torch.isfinite(logits).all()


def test_an_unusable_cache_is_named_before_the_build(tmp_path, monkeypatch):
    """A cache path that is a file, or a file where the starter's directory goes: a one-line error naming it,
    before minutes of training rather than at the save after them."""
    import pytest

    from rpo_engine.errors import UserError

    monkeypatch.setattr(starter, "train_starter_model", lambda *a, **k: pytest.fail("trained before the check"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"{tmp_path / 'file'}: cannot be made a directory .*RPO_ENGINE_CACHE"):
        ensure_starter_model(tmp_path / "file", progress=False)
    starter.starter_model_dir(tmp_path).write_text("x")
    with pytest.raises(UserError, match="starter-.*: exists and is not a directory; remove it"):
        ensure_starter_model(tmp_path, progress=False)


def test_the_cache_variables_are_read_as_huggingfaces_are(tmp_path, monkeypatch):
    """RPO_ENGINE_CACHE set but empty (`export RPO_ENGINE_CACHE=` in a job script, a CI variable that is not set)
    counts as unset, as XDG's rule has it: it was the current directory, which got a starter-*/ beside the user's
    files. XDG_CACHE_HOME moves the default as it moves Hugging Face's and torch's caches (a cluster whose home is
    read-only points it at scratch), and a leading ~ is the home directory in either."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("RPO_ENGINE_CACHE", "")
    assert starter.default_cache_dir() == tmp_path / "home" / ".cache" / "rpo_engine"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "scratch"))
    assert starter.default_cache_dir() == tmp_path / "scratch" / "rpo_engine"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert starter.default_cache_dir() == tmp_path / "home" / ".cache" / "rpo_engine"
    monkeypatch.setenv("RPO_ENGINE_CACHE", "~/models")
    assert starter.default_cache_dir() == tmp_path / "home" / "models"


def test_no_home_directory_asks_for_rpo_engine_cache(tmp_path, monkeypatch):
    """No HOME and no password entry for the user (a container run under an arbitrary uid): one line naming
    RPO_ENGINE_CACHE, not pathlib's RuntimeError."""
    import pytest

    from rpo_engine.errors import UserError

    monkeypatch.delenv("RPO_ENGINE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(
        RuntimeError("Could not determine home directory."))))
    with pytest.raises(UserError, match="^no home directory .*; set RPO_ENGINE_CACHE"):
        starter.default_cache_dir()


def test_concurrent_builds_never_show_a_half_written_starter(tmp_path, monkeypatch):
    """Two builders at once (two runs on one machine, or nodes sharing the cache through NFS): each builds in its
    own temporary directory, renamed into place whole; the one that finishes second keeps the first's and drops
    its own. A directory an interrupted build of an older version left (no starter.json) is replaced."""
    directory = starter.starter_model_dir(tmp_path)
    builds = []

    def build(target, recipe, progress):
        builds.append(Path(target))
        assert Path(target).parent == directory.parent and Path(target) != directory  # never where readers look
        (Path(target) / "model.safetensors").write_text("mine")
        (Path(target) / "starter.json").write_text("{}")
        if len(builds) == 2:  # another builder finishes first, while this one still trains
            directory.mkdir()
            (directory / "model.safetensors").write_text("theirs")
            (directory / "starter.json").write_text("{}")

    monkeypatch.setattr(starter, "train_starter_model", build)
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_text("half")  # an interrupted older build
    assert ensure_starter_model(tmp_path, progress=False) == directory
    assert (directory / "model.safetensors").read_text() == "mine"
    shutil.rmtree(directory)
    assert ensure_starter_model(tmp_path, progress=False) == directory
    assert (directory / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name]  # no temporary directory left


def test_a_starter_save_the_disk_refuses_is_one_line_and_leaves_nothing(tmp_path):
    """A full disk at the starter's save (here the file-size limit, which fails a write as ENOSPC does): one line
    naming the directory and the system's reason, not safetensors' traceback; no half-built directory left."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the 0.53M-parameter weights: ~2 MB

    code = ("import sys; from rpo_engine.data.starter import StarterRecipe, ensure_starter_model; "
            "from rpo_engine.errors import run_cli; "
            "recipe = StarterRecipe(num_train_rows=64, steps=2, batch_size=4, warmup_steps=1); "
            f"sys.exit(run_cli(lambda argv: ensure_starter_model({str(tmp_path)!r}, progress=False, recipe=recipe) "
            "and 0))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limited,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    directory = starter.starter_model_dir(tmp_path, StarterRecipe(num_train_rows=64, steps=2, batch_size=4,
                                                                  warmup_steps=1))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {directory}: could not be written (File too large)", proc.stderr
    assert list(tmp_path.iterdir()) == []
