"""Tiny local models and recipes for tests (no downloads: seeded configs, the repo's tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from graftbuild.weights.determinism import pin_environment

# The suite must be deterministic: property tests draw the same examples on every run (a new
# counterexample is found by running with --hypothesis-seed=random, not by CI at random).
settings.register_profile("graftbuild", derandomize=True)
settings.load_profile("graftbuild")

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see graftbuild/cli/app.py
# The numerical code paths a build pins (graftbuild/weights/determinism.py), before torch loads:
# builds in this process then give the bytes the command line gives.
pin_environment()

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "recipes" / "quickstart" / "tokenizer"

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}


def save_model(
    folder: Path, state: dict, config_from: Path | None = None, config: dict | None = None
) -> None:
    """Write a HF model folder: safetensors weights, config and the tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if config_from is not None:
        shutil.copyfile(config_from / "config.json", folder / "config.json")
    else:
        from transformers import AutoConfig

        cfg = dict(config or TINY_LLAMA)
        AutoConfig.for_model(cfg.pop("model_type"), **cfg).save_pretrained(str(folder))
    for p in TOKENIZER.iterdir():
        shutil.copyfile(p, folder / p.name)


def make_base(folder: Path, seed: int = 0, config: dict | None = None) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config or TINY_LLAMA)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_model(folder, state, config=config)
    return state


def make_source(
    folder: Path, base_folder: Path, seed: int, rank: int = 2, scale: float = 0.05
) -> None:
    """A synthetic fine-tune: base + a low-rank component + small dense noise per matrix."""
    import torch
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    state = load_file(str(base_folder / "model.safetensors"))
    out = {}
    for name, t in sorted(state.items()):
        if t.ndim == 2:
            m, n = t.shape
            low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank
            out[name] = t + scale * low + 0.1 * scale * torch.randn(m, n, generator=g)
        else:
            out[name] = t + 0.01 * torch.randn(t.shape, generator=g)
    save_model(folder, out, config_from=base_folder)


def make_nan_source(folder: Path, like: Path) -> None:
    """A copy of the model folder ``like`` with one NaN in a norm weight: it has the base's
    architecture (pre-flight lets it through) and its pack step fails naming the tensor."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(like, folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(weights))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small matrices gain nothing from threads, and OpenMP spin-waits crawl on a busy box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


PATH_RECIPE = """
[project]
name = "t"
cache = "cache"

[base]
path = "models/base"

[compression.default]
attn = { method = "lowrank", energy = 0.9 }

[compression.exact]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"

[sources.x]
path = "models/x"

[sources.y]
path = "models/y"
compression = "exact"

[[fuse]]
name = "release"
packs = ["x", "y"]
weights = { x = 1.0, y = 0.5 }
"""


def exact_pair_recipe(wx: float | str, wy: float | str) -> str:
    """A recipe fusing two lossless packs, ``x`` and ``y`` (sources ``models/x``, ``models/y`` of
    the base ``models/base``), as ``release`` with weights ``wx`` and ``wy``."""
    return f"""
[project]
name = "t"
cache = "cache"

[base]
path = "models/base"

[compression.exact]
embed = "exact"
head = "exact"
attn = "exact"
mlp = "exact"

[sources.x]
path = "models/x"
compression = "exact"

[sources.y]
path = "models/y"
compression = "exact"

[[fuse]]
name = "release"
packs = ["x", "y"]
weights = {{ x = {wx}, y = {wy} }}
"""


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_base(root / "base")
    make_source(root / "x", root / "base", seed=1)
    make_source(root / "y", root / "base", seed=2)
    return root


@pytest.fixture
def path_project(tmp_path: Path, model_folders: Path) -> Path:
    """A project whose base and sources are model folders on disk; returns the recipe path."""
    shutil.copytree(model_folders, tmp_path / "models")
    return write_recipe(tmp_path / "graftbuild.toml", PATH_RECIPE)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def fork_server():
    """Runs graftbuild commands in forked children of a process with torch already imported
    (tests/forkserver.py): many short builds, each a separate process, without the import cost."""
    from forkserver import ForkServer

    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def quickstart_build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The quickstart built once for the session, as CI's logs capture it (stderr not a
    terminal), in a copy of the repository's recipes under git (the README's examples run in
    it). Returns the folder, the command's exit code, stdout, stderr and its --events lines."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(REPO / "recipes", root / "recipes", ignore=shutil.ignore_patterns("*.lock"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "recipes"], cwd=root, check=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), GRAFTBUILD_PROGRESS_INTERVAL="2", COLUMNS="200")
    env.pop("GRAFTBUILD_CACHE", None)
    events = root / "events.jsonl"
    cmd = [sys.executable, "-m", "graftbuild", "make", "recipes/quickstart.toml", "--json"]
    p = subprocess.run(
        [*cmd, "--events", str(events)], cwd=root, env=env, capture_output=True, text=True
    )
    lines = events.read_text().splitlines() if events.exists() else []
    return {
        "root": root,
        "env": env,
        "code": p.returncode,
        "stdout": p.stdout,
        "stderr": p.stderr,
        "events": lines,
    }
