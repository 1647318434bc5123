"""The same bytes for any thread count, -j and executor; the lock says what each node ran with.

A quickstart-sized recipe with every kind of computing node: the quickstart's 128-hidden Llama
trained in the build, a GPT-2 teacher of another tokenizer trained in the build, its answers
(teach), SFT and DPO on them, packs with the default profile, a static fuse, a routed bundle
(router fitted in the build) and an eval. It is built by the command line in separate caches:
with torch's default thread count, with one OpenMP thread and ``-j 2``. The Ray executor's
builds are compared in tests/test_ray.py. Without the pinned kernels
(``ATEN_CPU_CAPABILITY=default``, the scalar ones) the trained models' bytes change: the pins
are what makes the bytes the same.

MKL picks its code paths by CPU vendor as well as by instruction set: a build is also made with
MKL told the CPU is the other vendor's (Intel on an AMD machine, not Intel on an Intel one;
``mkl_serv_intel_cpu`` interposed through ``LD_PRELOAD``, the function MKL asks), which gives
a CI machine of one vendor the other vendor's MKL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from graftbuild.weights.determinism import PINNED_ENV

QS = REPO / "recipes" / "quickstart"
TR = REPO / "recipes" / "transfer"
RECIPE = f"""
[project]
name = "repro"
cache = "cache"

[base]
config = "{QS / "base_config.json"}"
tokenizer = "{QS / "tokenizer"}"

[base.finetune]
data = "{QS / "data" / "general.train.txt"}"
steps = 12
batch_size = 8
seq_len = 32

[sources.arith.finetune]
data = "{QS / "data" / "arith.train.txt"}"
steps = 12
batch_size = 8
seq_len = 32
seed = 1

[teachers.t]
config = "{TR / "teacher_config.json"}"
tokenizer = "{TR / "teacher_tokenizer"}"

[teachers.t.finetune]
data = "{TR / "data" / "teacher.train.txt"}"
steps = 8
batch_size = 8
seq_len = 32

[sources.dates.transfer]
teacher = "t"
prompts = "prompts.jsonl"
generation = {{ max_new_tokens = 6, chat_template = true, batch_size = 8 }}
sft = {{ steps = 4, batch_size = 4, max_len = 32, seed = 1 }}
dpo = {{ steps = 2, batch_size = 4, seed = 1 }}

[[fuse]]
name = "release"
packs = ["arith", "dates"]

[[fuse]]
name = "routed"
packs = ["arith"]
strategy = "routed"
options = {{ base_prompts = "{QS / "data" / "general.heldout.txt"}" }}

[[eval]]
name = "e"
models = ["base", "fuse:release"]
data = {{ general = "{QS / "data" / "general.heldout.txt"}" }}
seq_len = 32
"""
# The teacher answers a few of the transfer example's prompts (all 400 would take minutes).
PROMPTS = "".join(
    (TR / "data" / "prompts.jsonl").read_text().splitlines(keepends=True)[:12]
)


# One node of each computing kind: init, sft (finetune and transfer), teach, dpo, pack, fuse,
# routed bundle, eval.
EVERY_KIND = {
    "base", "source:arith", "teacher:t", "teach:dates", "sft:dates", "dpo:dates",
    "pack:arith", "pack:dates", "fuse:release", "fuse:routed", "eval:e",
}


def write_project(root: Path) -> Path:
    """The recipe and its prompts in ``root``; returns the recipe's path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.jsonl").write_text(PROMPTS)
    recipe = root / "graftbuild.toml"
    recipe.write_text(RECIPE)
    return recipe


def build(root: Path, *args: str, **env: str) -> dict[str, dict]:
    write_project(root)
    unset = {*PINNED_ENV, "OMP_NUM_THREADS"}  # as a user's shell has it: the build pins them
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    run = subprocess.run(
        [sys.executable, "-m", "graftbuild", "make", "graftbuild.toml", "-q", *args],
        cwd=root,
        env=environ | {"PYTHONPATH": str(REPO)} | env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return json.loads((root / "graftbuild.lock").read_text())


@pytest.fixture(scope="module")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return build(tmp_path_factory.mktemp("repro") / "default")


def outputs(lock: dict[str, dict]) -> dict[str, str]:
    return {k: v["output"] for k, v in lock["nodes"].items()}


def test_one_thread_and_j2_give_the_bytes_of_the_default_build(
    default_build: dict, tmp_path: Path
) -> None:
    other = build(tmp_path / "one", "-j", "2", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    assert outputs(other) == outputs(default_build)
    assert set(outputs(other)) >= EVERY_KIND


def test_the_kernel_pins_are_what_keeps_the_bytes(default_build: dict, tmp_path: Path) -> None:
    other = build(tmp_path / "scalar", ATEN_CPU_CAPABILITY="default")
    differ = {k for k, v in outputs(other).items() if outputs(default_build)[k] != v}
    assert {"base", "source:arith"} <= differ  # training reduces in another order
    envs = other["environments"]
    assert {envs[e["env"]]["cpu_capability"] for e in other["nodes"].values() if "env" in e} == {
        "DEFAULT"
    }  # and the lock says so


def test_the_lock_names_each_nodes_threads_kernels_and_instruction_set(
    default_build: dict,
) -> None:
    envs = default_build["environments"]
    for node, entry in default_build["nodes"].items():
        if entry["step"] == "input":
            continue
        env = envs[entry["env"]]
        assert env["threads"] == 1, node
        assert env["cpu_capability"] == "AVX2" and env["MKL_CBWR"] == "COMPATIBLE", node
        assert env["mkl_branch"] == "COMPATIBLE", node
        assert "avx2" in env["cpu_flags"], node


@pytest.fixture(scope="module")
def other_vendor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment under which torch's MKL sees the other CPU vendor than this one."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the MKL vendor shim")
    intel = "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    folder = tmp_path_factory.mktemp("vendor")
    source = folder / "vendor.c"
    source.write_text(
        f"int mkl_serv_intel_cpu_true(void) {{ return {int(not intel)}; }}\n"
        f"int mkl_serv_intel_cpu(void) {{ return {int(not intel)}; }}\n"
    )
    shim = folder / "libvendor.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", shim, source], check=True)
    return {"LD_PRELOAD": str(shim)}


def branch_taken(**env: str) -> str:
    """The MKL branch a fresh process takes under ``env`` (and the user's MKL_CBWR=AVX2)."""
    code = (
        "from graftbuild.weights.determinism import mkl_branch, pin_environment\n"
        "pin_environment()\nimport torch\nprint(mkl_branch())"
    )
    environ = os.environ | {"MKL_CBWR": "AVX2", "PYTHONPATH": str(REPO)} | env
    run = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


def test_the_vendor_shim_changes_the_branch_mkl_takes(other_vendor: dict[str, str]) -> None:
    # MKL honours an ISA branch only on Intel CPUs and falls back to AUTO elsewhere: the shim
    # really gives this process the other vendor's MKL, so the next test can fail.
    intel = "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    here, there = branch_taken(), branch_taken(**other_vendor)
    assert (here, there) == (("AVX2", "AUTO") if intel else ("AUTO", "AVX2"))


def test_the_other_vendors_mkl_gives_the_same_bytes(
    default_build: dict, other_vendor: dict[str, str], tmp_path: Path
) -> None:
    other = build(tmp_path / "vendor", **other_vendor)
    assert outputs(other) == outputs(default_build)
    assert set(outputs(other)) >= EVERY_KIND
