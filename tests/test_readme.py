"""Every command in README.md, run as written on a built quickstart.

Shell commands are read from the README's indented code blocks (a block whose first line is a
command; ``python -c "...`` spans lines up to its closing quote). Each runs in a copy of the
recipes where the quickstart was built (``quickstart_build``), in that order, with ``graftbuild``
and ``python`` on PATH. A command is run unless ``SKIP`` names it with the reason; an unknown
command fails the test, so a new README example is either run here or skipped with a reason. An
expected-output comment (``# [...]``) under a block must appear in what the block printed.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
COMMAND = re.compile(r"^(graftbuild|python|echo|git|bash|pip|\. )\b")

SKIP = {
    "bash scripts/quickstart.sh": "installs .venv and builds the quickstart (built here by make)",
    "bash scripts/test.sh": "runs this test suite",
    ". .venv/bin/activate": "PATH already holds graftbuild here",
    "pip install": "installs packages",
    "graftbuild make recipe.toml": "recipe.toml stands for a recipe with a remote or a Ray "
    "cluster (tests/test_remote.py, tests/test_ray.py)",
    "graftbuild push recipe.toml": "needs a remote (tests/test_remote.py)",
    "graftbuild pull recipe.toml": "needs a remote (tests/test_remote.py)",
    "graftbuild verify recipes/quickstart.toml": "rebuilds the whole quickstart aside "
    "(minutes; tests/test_verify.py)",
    "graftbuild make recipes/transfer.toml": "the transfer recipe takes minutes; CI builds it "
    "with --locked (.ci/run)",
    "python benchmarks/transfer.py": "needs the transfer recipe built",
}

INCREMENTAL = "echo \"5 + 5 = 10\" >> recipes/quickstart/data/arith.train.txt"
INIT = "graftbuild init --base models/base"


def readme_blocks() -> list[list[str]]:
    """The README's indented shell blocks, as lists of commands (with their trailing comments);
    an expected-output comment is kept as ``#> ...``."""
    blocks: list[list[str]] = []
    lines = README.read_text().splitlines()
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("    ") or (i and lines[i - 1].strip()):
            i += 1
            continue
        block: list[str] = []
        while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
            block.append(lines[i][4:])
            i += 1
        if not COMMAND.match(block[0]):
            continue  # an example of output, not of commands
        commands: list[str] = []
        it = iter(block)
        for text in it:
            if not text.strip():
                continue
            if text.startswith("# "):
                commands.append("#> " + text[2:])
                continue
            if text.startswith('python -c "'):
                while not text.rstrip().endswith('"') or text.rstrip() == 'python -c "':
                    text += "\n" + next(it)
            commands.append(text)
        blocks.append(commands)
    return blocks


def skipped(command: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if command.startswith(prefix)), None)


@pytest.fixture(scope="module")
def shell(quickstart_build: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    assert quickstart_build["code"] == 0, quickstart_build["stderr"][-3000:]
    bin_dir = tmp_path_factory.mktemp("bin")
    exe = bin_dir / "graftbuild"
    exe.write_text(f"#!{sys.executable}\nfrom graftbuild.cli.entry import main\nmain()\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    py = bin_dir / "python"  # not a symlink: a venv's python finds its venv beside itself
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    env = dict(quickstart_build["env"], PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return {"root": quickstart_build["root"], "env": env}


def run(shell: dict, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, shell=True, cwd=shell["root"], env=shell["env"], capture_output=True, text=True
    )


def test_every_readme_command_is_run_or_skipped_with_a_reason() -> None:
    commands = [c for b in readme_blocks() for c in b if not c.startswith("#>")]
    assert len(commands) >= 20
    assert any(c.startswith("graftbuild report ") for c in commands)
    for c in commands:
        assert COMMAND.match(c), f"not a command the README test knows how to run: {c!r}"


def test_readme_commands_hold_as_written(shell: dict) -> None:
    """Every README block but the incremental rebuild (its own test) runs, in order, exit 0; an
    expected-output comment appears in the block's output."""
    ran = 0
    for block in readme_blocks():
        if INCREMENTAL in [c.split("#")[0].strip() for c in block]:
            continue
        if block[0].startswith(INIT):
            continue  # run in a folder of the user's own models (its own test)
        printed = ""
        for command in block:
            if command.startswith("#> "):
                expected = command[3:]
                if expected.startswith(("[", "{")):
                    assert expected in printed, (block, printed[-2000:])
                continue
            if skipped(command):
                continue
            p = run(shell, command)
            assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
            printed += p.stdout
            ran += 1
    assert ran >= 12
    assert (shell["root"] / "out/quickstart/release/release/report.html").is_file()
    assert (shell["root"] / "arith.png").is_file() and (shell["root"] / "build.jsonl").is_file()


def test_readme_incremental_rebuild(shell: dict) -> None:
    block = next(b for b in readme_blocks() if INCREMENTAL in [c.split("#")[0].strip() for c in b])
    outputs = []
    try:
        for command in block:
            p = run(shell, command)
            assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
            outputs.append(p.stdout + p.stderr)
    finally:
        run(shell, "git checkout recipes/quickstart/data/arith.train.txt")
    plan, make = outputs[1], outputs[2]
    assert re.search(r"source:arith\s+stale.*training data changed", plan), plan
    built = {line.split()[0] for line in make.splitlines() if re.match(r"\S+\s+built\s", line)}
    assert {"source:arith", "pack:arith", "fuse:release", "eval:skills"} <= built, make


def test_readme_init_example(shell: dict, tmp_path: Path) -> None:
    """The `graftbuild init` block, as written, in a folder holding a user's own models: a base
    and two fine-tunes at the paths it names."""
    from tests.conftest import make_base, make_source

    block = next(b for b in readme_blocks() if b[0].startswith(INIT))
    make_base(tmp_path / "models" / "base")
    make_source(tmp_path / "ckpts" / "math", tmp_path / "models" / "base", seed=1)
    make_source(tmp_path / "ckpts" / "code", tmp_path / "models" / "base", seed=2)
    here = dict(shell, root=tmp_path)
    for command in block:
        if command.startswith("#> "):
            continue
        p = run(here, command)
        assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
    assert (tmp_path / "graftbuild.toml").is_file()
    assert any((tmp_path / "out").rglob("model.safetensors"))  # the fused model was written
