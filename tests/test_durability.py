"""Deferred durability: ``make`` does not fsync object data by default, and after a reboot that
may have lost unsynced bytes, every file written since the window opened is read and checked
again before it is trusted (graftbuild/durability.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make

from graftbuild.build import noop
from graftbuild.cache import durability
from graftbuild.cache.hashing import signature
from graftbuild.cache.store import Store
from graftbuild.cli.app import main

BOOT = "11111111-boot-this"
OTHER_BOOT = "22222222-boot-before"


@pytest.fixture(autouse=True)
def this_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A known boot id (a reboot is simulated by changing it) and no GRAFTBUILD_FSYNC."""
    monkeypatch.setattr(durability, "boot_id", lambda: BOOT)
    monkeypatch.delenv("GRAFTBUILD_FSYNC", raising=False)


@pytest.fixture
def deferred() -> Iterator[None]:
    with durability.using(durability.DEFERRED) as mode:
        assert mode == durability.DEFERRED
        yield


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path os.fsync is called on, in order."""
    calls: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def cache_of(recipe: Path) -> Path:
    return recipe.parent / "cache"


def state(recipe: Path) -> dict:
    return json.loads((cache_of(recipe) / durability.STATE).read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def test_deferred_make_fsyncs_only_the_state_file(
    path_project: Path, fsynced: list[str], deferred: None
) -> None:
    start = time.time()
    make(path_project)
    cache = cache_of(path_project)
    s = state(path_project)
    assert s["boot"] == BOOT
    assert start - durability.MARGIN_S - 1 <= s["unsynced_since"] <= start
    # one small durable write: the state (a temp file renamed over it) and the cache folder
    assert fsynced and all(
        p == str(cache) or Path(p).name.startswith(f".{durability.STATE}.") for p in fsynced
    ), fsynced
    # the window stays open for the rest of the boot: the next build writes no state
    fsynced.clear()
    make(path_project, targets=["pack:x"])
    assert fsynced == [] and state(path_project) == s


def test_fsync_option_and_env_fsync_every_object(
    path_project: Path, fsynced: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = cache_of(path_project)
    cli("make", str(path_project), "--fsync", "--cache", str(cache))
    objects = [p for p in fsynced if p.startswith(str(cache / "tmp"))]  # before the rename
    assert any(p.endswith("skillpack.safetensors") for p in objects)
    assert any(p.endswith("model.safetensors") for p in objects)
    assert not (cache / durability.STATE).exists()  # nothing was ever unsynced
    assert durability.mode() == durability.IMMEDIATE  # restored after the command

    fsynced.clear()
    monkeypatch.setenv("GRAFTBUILD_FSYNC", "1")
    cli("make", str(path_project), "--cache", str(path_project.parent / "c2"))
    assert any(p.endswith("model.safetensors") for p in fsynced)

    fsynced.clear()
    monkeypatch.delenv("GRAFTBUILD_FSYNC")
    cli("make", str(path_project), "--cache", str(path_project.parent / "c3"))
    assert not any(p.endswith(".safetensors") for p in fsynced)  # the default: deferred
    assert json.loads((path_project.parent / "c3" / durability.STATE).read_text())["boot"] == BOOT


def test_without_a_boot_id_deferred_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durability, "boot_id", lambda: None)
    with durability.using(durability.DEFERRED) as mode:
        assert mode == durability.IMMEDIATE and durability.fsync_objects()


def lose_bytes_keeping_stat(path: Path, stat_json: Path) -> None:
    """What a crash can leave: the file's size and mtime as written, its bytes gone (zeros).
    The inode's ctime moves when we write it here, which a crash would not do, so the stat
    cache's entries for it are moved along: its stat looks unchanged since it was hashed."""
    st = path.stat()
    mode = st.st_mode
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(bytes(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.chmod(mode)
    now = signature(path)
    entries = json.loads(stat_json.read_text())
    for entry in entries.values():
        if entry[0][3] == st.st_ino:
            entry[0] = now
    stat_json.write_text(json.dumps(entries))


def crash_setup(recipe: Path) -> tuple[dict[str, bytes], Path, bytes]:
    first = make(recipe)
    before = snapshot(recipe.parent / "out")
    h = first.node("pack:x").output_hash
    assert h is not None
    pack = cache_of(recipe) / "objects" / h[:2] / h / "skillpack.safetensors"
    good = pack.read_bytes()
    lose_bytes_keeping_stat(pack, cache_of(recipe) / "stat.json")
    return before, pack, good


def reboot(recipe: Path) -> None:
    """The state as the last build of the previous boot left it."""
    s = state(recipe)
    assert s["boot"] == BOOT and s["unsynced_since"] is not None
    path = cache_of(recipe) / durability.STATE
    path.write_text(json.dumps({**s, "boot": OTHER_BOOT}))


def test_after_a_reboot_lost_bytes_are_found_and_rebuilt(path_project: Path, deferred: None):
    before, pack, good = crash_setup(path_project)
    reboot(path_project)
    result = make(path_project)
    assert pack in result.hashed_files  # read again instead of trusting its stat
    assert result.built == ["pack:x"]  # found damaged, discarded, rebuilt
    assert result.node("fuse:release").action == "reused"  # the same bytes: early cutoff
    assert pack.read_bytes() == good
    assert snapshot(path_project.parent / "out") == before
    s = state(path_project)  # recovered, then this build opened a new window
    assert s["boot"] == BOOT and s["unsynced_since"] is not None


def test_without_a_reboot_the_same_damage_is_trusted(path_project: Path, deferred: None):
    """The control: the stat-unchanged damage is invisible to the cheap check, so it is the
    recovery (the boot change) that catches it above."""
    _, pack, good = crash_setup(path_project)
    result = make(path_project)
    assert result.built == [] and pack not in result.hashed_files
    assert pack.read_bytes() != good


def test_recovery_keeps_entries_written_before_the_window(path_project: Path, deferred: None):
    models = path_project.parent / "models"
    old = time.time() - 1000
    for p in models.rglob("*"):
        os.utime(p, (old, old))  # the inputs were written long before this boot's first build
    make(path_project)
    stat_json = cache_of(path_project) / "stat.json"
    entries = json.loads(stat_json.read_text())
    inputs = {k for k in entries if k.startswith(str(models))}
    objects = {k for k in entries if k.startswith(str(cache_of(path_project) / "objects"))}
    assert inputs and objects

    reboot(path_project)
    (cache_of(path_project) / "noop").mkdir(exist_ok=True)
    (cache_of(path_project) / "noop" / "r.json").write_text("{}")
    Store(cache_of(path_project))  # opening the store recovers
    kept = json.loads(stat_json.read_text())
    assert set(kept) == set(entries) - objects  # every input entry kept, every object dropped
    assert not list((cache_of(path_project) / "noop").iterdir())  # fast-path records voided
    assert state(path_project) == {"boot": BOOT, "unsynced_since": None}

    result = make(path_project)  # re-checks the objects it uses, not the inputs
    assert result.built == []
    assert result.hashed_files and not any(
        str(p).startswith(str(models)) for p in result.hashed_files
    )


def test_no_op_fast_path_falls_back_after_a_reboot(path_project: Path) -> None:
    cli("make", str(path_project))  # deferred by default
    assert noop.check(path_project, [], None) is not None
    reboot(path_project)
    assert noop.check(path_project, [], None) is None  # stat alone is not to be trusted
    cli("plan", str(path_project))  # the full planner recovers...
    assert state(path_project)["unsynced_since"] is None
    assert noop.check(path_project, [], None) is None  # ...and the old record is gone
    cli("make", str(path_project))
    assert noop.check(path_project, [], None) is not None


def test_an_unreadable_state_recovers_everything(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "stat.json").write_text(json.dumps({"/x": [[1, 5, 5, 7], "ab"]}))
    (root / durability.STATE).write_text("")  # damage: it is always written with fsync
    Store(root)
    assert json.loads((root / "stat.json").read_text()) == {}
    assert json.loads((root / durability.STATE).read_text()) == {
        "boot": BOOT,
        "unsynced_since": None,
    }


def test_copied_outputs_are_fsynced_and_dated_now(
    path_project: Path, fsynced: list[str], deferred: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make(path_project)
    out = first.node("fuse:release").output
    assert out is not None
    weights = out / "model.safetensors"
    old = time.time() - 1000
    os.utime(weights, (old, old))  # the object (same inode) last written long ago
    for p in out.iterdir():
        p.unlink()
    out.rmdir()

    def no_link(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    fsynced.clear()
    start = time.time()
    result = make(path_project)
    assert result.node("fuse:release").action == "restored"
    assert str(weights) not in fsynced  # the fsync is done before the rename into place
    assert any(p.endswith("model.safetensors") for p in fsynced)
    assert weights.stat().st_mtime >= start - 1  # not the object's mtime: copy2 would keep it
    assert weights.stat().st_mode & 0o222 == 0  # read-only, like the object
    assert make(path_project).built == []


def test_other_processes_stay_immediate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ``make``'s own process selects deferred: a fresh interpreter (a Ray worker, a
    library user) fsyncs objects."""
    code = "from graftbuild.cache import durability; print(durability.mode())"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == durability.IMMEDIATE
    assert durability.requested() == durability.DEFERRED
    for value, mode in (("0", durability.DEFERRED), ("1", durability.IMMEDIATE)):
        monkeypatch.setenv("GRAFTBUILD_FSYNC", value)
        assert durability.requested() == mode
    assert durability.requested(fsync=True) == durability.IMMEDIATE
