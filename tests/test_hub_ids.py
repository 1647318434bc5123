"""``model = "org/name"``: resolved offline through the local Hugging Face cache, pinned in the
lock by snapshot commit; a model the cache does not hold is exit 2 with the download command."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_base, make_source, read_json
from helpers import engine, make

from graftbuild.cli.app import main
from graftbuild.errors import UserError
from graftbuild.recipe import load_recipe

RECIPE = """
[project]
name = "hub"

[base]
model = "tiny-org/base"

[sources.x]
model = "tiny-org/x"

[[fuse]]
name = "release"
packs = ["x"]

[[release]]
name = "release"
"""


def cache_snapshot(cache: Path, repo_id: str, folder: Path, commit: str | None = None) -> str:
    """Put ``folder`` into a Hugging Face cache as huggingface_hub lays it out (blobs named by
    hash, a snapshot of symlinks, refs/main), with huggingface_hub's own helpers; returns the
    commit."""
    from huggingface_hub.file_download import _create_symlink, repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst = repo / "snapshots" / commit / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(dst), new_blob=False)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, str]]:
    import huggingface_hub.constants as c

    cache = tmp_path / "hf"
    make_base(tmp_path / "m" / "base")
    make_source(tmp_path / "m" / "x", tmp_path / "m" / "base", seed=1)
    commits = {n: cache_snapshot(cache, f"tiny-org/{n}", tmp_path / "m" / n) for n in ("base", "x")}
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))  # read when huggingface_hub was imported
    return cache, commits


def test_a_hub_id_resolves_from_the_local_cache_and_is_pinned(
    tmp_path: Path, hub_cache: tuple[Path, dict[str, str]]
) -> None:
    from huggingface_hub import scan_cache_dir

    cache, commits = hub_cache
    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {"tiny-org/base", "tiny-org/x"}
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(RECIPE)
    r = load_recipe(recipe)
    assert r.base.path == cache / "models--tiny-org--base" / "snapshots" / commits["base"]
    assert r.base.revision == commits["base"]
    make(recipe)
    lock = read_json(recipe.with_suffix(".lock"))["nodes"]
    assert lock["base"]["hub"] == "tiny-org/base"
    assert lock["base"]["revision"] == commits["base"]
    assert lock["source:x"] == lock["source:x"] | {"hub": "tiny-org/x", "revision": commits["x"]}
    assert "path" not in lock["base"]  # not this machine's cache path
    card = (tmp_path / "out" / "release" / "release" / "README.md").read_text()
    assert "base_model: tiny-org/base" in card
    # the no-op fast path answers while nothing moved, and not once the cache's main moved
    runner = CliRunner()
    assert runner.invoke(main, ["make", str(recipe)]).exit_code == 0
    assert "fresh" in runner.invoke(main, ["plan", str(recipe)]).stdout
    from graftbuild.build.noop import check

    assert check(recipe, [], None) is not None  # a record the fast path would answer from
    # the cache's main moves to another snapshot: --locked names both commits
    moved = cache_snapshot(cache, "tiny-org/x", tmp_path / "m" / "x", commit="1" * 40)
    with pytest.raises(UserError, match=f"tiny-org/x resolves to revision {moved}, the lock pins"):
        engine(recipe).make(locked=True)
    assert check(recipe, [], None) is None  # the record is void: the planner decides
    # a pinned revision that the cache does not hold is refused like a missing model
    recipe.write_text(RECIPE.replace('"tiny-org/x"', f'"tiny-org/x"\nrevision = "{"0" * 40}"'))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_recipe(recipe)


def test_a_model_not_in_the_cache_is_exit_2_naming_the_download(
    tmp_path: Path, hub_cache: tuple[Path, dict[str, str]]
) -> None:
    cache, _ = hub_cache
    recipe = tmp_path / "graftbuild.toml"
    recipe.write_text(RECIPE.replace("tiny-org/x", "tiny-org/missing"))
    result = CliRunner().invoke(main, ["plan", str(recipe)])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "sources.x.model: 'tiny-org/missing' is not in the local Hugging Face cache" in err
    assert "`hf download tiny-org/missing`" in err
    assert "`huggingface-cli download tiny-org/missing`" in err
    assert not list(cache.glob("models--tiny-org--missing*"))  # nothing was fetched
