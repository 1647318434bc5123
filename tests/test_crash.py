"""Crash safety: ``graftbuild make`` SIGKILLed at seeded random moments never leaves a corrupt
object or output behind, the next make completes, and the result is byte-identical to an
uninterrupted build.

The builds run in children forked from a server that has already imported torch (see
``forkserver.py``), so three dozen interrupted builds fit in a couple of minutes on two cores;
the reference build is a plain ``python -m graftbuild make`` process.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, TINY_LLAMA, TOKENIZER, make_base
from forkserver import ForkServer

from graftbuild.cache.hashing import hash_file
from graftbuild.cache.integrity import check_copy, check_object

SEED = 20261129
KILLS = 32

RECIPE = """
[project]
name = "crash"

[base]
config = "base_config.json"
tokenizer = "tokenizer"
seed = 3

[sources.a]
finetune = {{ data = "a.txt", steps = 4, lr = 1e-3, batch_size = 4, seq_len = 16, seed = 1 }}

[sources.b]
path = "models/b"

[[fuse]]
name = "release"
packs = ["a", "b"]
weights = {{ b = {weight} }}
"""


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too: markers, leftovers) -> its hash."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): hash_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def objects(cache: Path) -> set[str]:
    return {p.name for p in (cache / "objects").glob("*/*")}


def assert_nothing_corrupt(root: Path) -> None:
    """What a killed build left: every object whole, every marked output a true copy of its
    object, every action entry pointing at an object."""
    cache = root / "cache"
    for obj in (cache / "objects").glob("*/*"):
        assert check_object(obj, obj.name, hash_file) is None, obj
    for entry in (cache / "actions").glob("*/*.json"):
        digest = json.loads(entry.read_text())["output"]
        assert digest in objects(cache), entry
    for marker in (root / "out").rglob(".graftbuild.json"):
        digest = json.loads(marker.read_text())["object"]
        obj = cache / "objects" / digest[:2] / digest
        assert check_copy(obj, marker.parent, hash_file) is None, marker.parent


def phase(log: Path) -> str:
    """The node a build was working on when it died, from its log."""
    if not log.exists():
        return "startup"
    building = re.findall(r"^build (\S+):\s", log.read_text(), flags=re.M)
    return building[-1] if building else "planning/hashing"


@pytest.fixture
def crash_project(tmp_path: Path) -> Path:
    (tmp_path / "base_config.json").write_text(json.dumps(TINY_LLAMA))
    shutil.copytree(TOKENIZER, tmp_path / "tokenizer")
    (tmp_path / "a.txt").write_text("".join(f"{i} + {i} = {2 * i}\n" for i in range(60)))
    make_base(tmp_path / "models" / "b", seed=11)
    return tmp_path


def write_recipe(root: Path, weight: float) -> None:
    (root / "graftbuild.toml").write_text(RECIPE.format(weight=weight))


def reset(root: Path) -> None:
    shutil.rmtree(root / "cache", ignore_errors=True)
    shutil.rmtree(root / "out", ignore_errors=True)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_wrong_artifact(
    crash_project: Path, fork_server: ForkServer
) -> None:
    root = crash_project
    args = ["make", "graftbuild.toml", "-j", "1"]
    logs = root / "logs"
    logs.mkdir()

    # References: uninterrupted builds of both recipe variants, the first by a plain process.
    write_recipe(root, 1.0)
    plain = subprocess.run(
        [sys.executable, "-m", "graftbuild", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert plain.returncode == 0, plain.stderr
    ref_a, objs_a = snapshot(root / "out"), objects(root / "cache")

    server = fork_server
    reset(root)
    cold = server.run(args, root, logs / "cold.log")
    assert cold["exit"] == 0, (logs / "cold.log").read_text()
    assert snapshot(root / "out") == ref_a  # forked builds give the plain process's bytes
    saved = root / "saved"
    shutil.copytree(root / "cache", saved / "cache")
    shutil.copytree(root / "out", saved / "out")
    write_recipe(root, 0.5)
    warm = server.run(args, root, logs / "warm.log")
    assert warm["exit"] == 0, (logs / "warm.log").read_text()
    ref_b, objs_b = snapshot(root / "out"), objects(root / "cache")
    assert ref_b != ref_a

    rng = random.Random(SEED)
    kills: Counter[str] = Counter()
    i = 0
    while sum(kills.values()) < KILLS:
        assert i < 3 * KILLS, f"builds keep finishing before their kill time: {kills}"
        kind = "warm" if i % 3 == 2 else "cold"
        if kind == "cold":  # from nothing: init, hashing, finetune, packs, fuse
            reset(root)
            write_recipe(root, 1.0)
            ref, objs, duration = ref_a, objs_a, cold["elapsed"]
        else:  # all built for weight 1.0; 0.5 rebuilds the fuse and replaces its output
            reset(root)
            shutil.copytree(saved / "cache", root / "cache")
            shutil.copytree(saved / "out", root / "out")
            write_recipe(root, 0.5)
            ref, objs, duration = ref_b, objs_a | objs_b, warm["elapsed"]
        log = logs / f"{i}.log"
        # Killed once, or (every other time) the recovering build is killed as well.
        for _ in range(1 if i % 2 else 2):
            result = server.run(args, root, log, kill_after=rng.uniform(0.02, duration))
            if result["exit"] != -9:  # it finished before its kill time
                assert result["exit"] == 0, log.read_text()
                break
            kills[phase(log)] += 1
            assert_nothing_corrupt(root)
        done = server.run(args, root, log)
        assert done["exit"] == 0, log.read_text()
        assert snapshot(root / "out") == ref
        assert objects(root / "cache") <= objs
        assert list((root / "cache" / "tmp").iterdir()) == []
        i += 1

    print(f"kills survived: {sum(kills.values())} in {i} builds, by phase {dict(kills)}")
    assert len(kills) >= 4, kills  # the kills landed in several different phases
