"""Two ``graftbuild make`` processes on the same recipe and cache at once: one waits for the
other, saying for which process; both end with identical outputs; no object is duplicated or
corrupt."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from forkserver import ForkServer

from graftbuild.cache.hashing import hash_file
from graftbuild.cache.integrity import check_copy, check_object

ARGS = ["make", "graftbuild.toml", "-j", "1", "--json"]


def outputs(root: Path) -> dict[str, str]:
    out = root / "out"
    return {p.relative_to(out).as_posix(): hash_file(p) for p in out.rglob("*") if p.is_file()}


def assert_cache_sound(root: Path) -> None:
    cache = root / "cache"
    objs = list((cache / "objects").glob("*/*"))
    for obj in objs:
        assert check_object(obj, obj.name, hash_file) is None, obj
    for marker in (root / "out").rglob(".graftbuild.json"):
        digest = json.loads(marker.read_text())["object"]
        assert check_copy(cache / "objects" / digest[:2] / digest, marker.parent, hash_file) is None
    assert list((cache / "tmp").iterdir()) == []
    assert not list((cache / "objects").glob("*/*.*"))  # no stray half-renamed copies


def built(log: Path) -> list[str]:
    return json.loads(log.read_text().strip().splitlines()[-1])["built"]


def waited_for(log: Path) -> str | None:
    if not log.exists():
        return None
    m = re.search(r"waiting for another graftbuild build \(pid (\d+)\)", log.read_text())
    return m.group(1) if m else None


def test_a_second_make_waits_for_the_first_and_says_for_whom(
    path_project: Path, fork_server: ForkServer
) -> None:
    root = path_project.parent
    first = fork_server.spawn(ARGS, root, root / "first.log")
    lock = root / "cache" / "lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip() == str(first)):
        assert time.monotonic() < deadline, "the first build never took the lock"
        time.sleep(0.01)
    # Pause the first while it holds the lock, however fast this machine builds, so that the
    # second one certainly finds it held; resume it once the second says it is waiting.
    os.kill(first, signal.SIGSTOP)
    try:
        second = fork_server.spawn(ARGS, root, root / "second.log")
        while waited_for(root / "second.log") is None:
            assert time.monotonic() < deadline, (root / "second.log").read_text()
            time.sleep(0.01)
    finally:
        os.kill(first, signal.SIGCONT)
    assert fork_server.wait(first) == 0, (root / "first.log").read_text()
    after_first = outputs(root)
    assert fork_server.wait(second) == 0, (root / "second.log").read_text()

    assert waited_for(root / "second.log") == str(first)
    assert len(built(root / "first.log")) == 6
    assert built(root / "second.log") == []  # it found everything the first one built
    assert outputs(root) == after_first
    assert len(list((root / "cache" / "objects").glob("*/*"))) == 3  # 2 packs and 1 fuse
    assert_cache_sound(root)


def test_simultaneous_makes_share_the_work_safely(
    path_project: Path, fork_server: ForkServer
) -> None:
    root = path_project.parent
    runs = 0
    for edit in (None, ("y = 0.5", "y = 0.25"), ('name = "release"', 'name = "release2"')):
        if edit is not None:
            path_project.write_text(path_project.read_text().replace(*edit))
        logs = [root / "a.log", root / "b.log"]
        pids = [fork_server.spawn(ARGS, root, log) for log in logs]
        codes = [fork_server.wait(pid) for pid in pids]
        runs += 2
        assert codes == [0, 0], [log.read_text() for log in logs]
        done = [built(log) for log in logs]
        assert [] in done  # one did the work, the other reused it
        waits = [waited_for(log) for log in logs]
        assert {w for w in waits if w is not None} <= {str(p) for p in pids}
        assert_cache_sound(root)
    assert runs == 6
    # Each distinct result exists once: packs x, y; the fuse for y = 0.5 and y = 0.25.
    assert len(list((root / "cache" / "objects").glob("*/*"))) == 4
