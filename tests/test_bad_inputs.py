"""A catalogue of bad inputs. Each: exit code 2 (the user's to fix) or 1 (the build failed), one
line saying what is wrong and where, no traceback, and nothing built before lost or half-written.

Cases already in test_cli.py (malformed TOML with line and column, unknown key with a
suggestion, an energy out of range, empty fusion order, an unknown pack, a missing path, pickle
``.bin`` weights) are not repeated here.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PATH_RECIPE, TINY_LLAMA, make_base, save_model, write_recipe
from forkserver import ForkServer
from helpers import make

from graftbuild.cache.fsck import run_fsck
from graftbuild.cache.hashing import hash_file
from graftbuild.cache.store import Store
from graftbuild.cli.app import main

RECIPE = "graftbuild.toml"


@pytest.fixture(scope="session")
def built_template(tmp_path_factory: pytest.TempPathFactory, model_folders: Path) -> Path:
    root = tmp_path_factory.mktemp("built")
    shutil.copytree(model_folders, root / "models")
    write_recipe(root / RECIPE, PATH_RECIPE)
    make(root / RECIPE)
    return root


@pytest.fixture
def built(tmp_path: Path, built_template: Path) -> Path:
    """A project built once: recipe, model folders, cache and outputs (a private copy)."""
    root = tmp_path / "project"
    shutil.copytree(built_template, root)
    return root


def state(root: Path) -> dict[str, str]:
    """Every output and cached object file -> its hash."""
    return {
        p.relative_to(root).as_posix(): hash_file(p)
        for top in ("out", "cache/objects")
        for p in sorted((root / top).rglob("*"))
        if p.is_file()
    }


def assert_intact(root: Path, before: dict[str, str]) -> None:
    assert state(root) == before
    assert list((root / "cache" / "tmp").iterdir()) == []
    store = Store(root / "cache")
    assert run_fsck(store).problems == []


def one_line_error(err: str) -> str:
    """stderr may carry progress lines ("build pack:x: ..."), then exactly one error line."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def fails(root: Path, code: int, *args: str) -> str:
    """Run ``make`` (with ``args`` after the recipe): the exit code, one line, nothing lost."""
    before = state(root)
    result = CliRunner().invoke(main, ["make", str(root / RECIPE), *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    line = one_line_error(result.stderr)
    assert_intact(root, before)
    return line


def edit(root: Path, old: str, new: str) -> None:
    text = (root / RECIPE).read_text()
    assert old in text
    (root / RECIPE).write_text(text.replace(old, new))


EXTRA_FUSE = '\n[[fuse]]\nname = "{name}"\npacks = ["x"]\n{extra}\n'


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # wrong type
        ("weights = {", 'shard_size = "big"\nweights = {', "fuse.0.shard_size"),
        # out of range: keep > 1, bits = 5, negative rank
        (
            'attn = { method = "lowrank", energy = 0.9 }',
            'attn = { method = "prune", keep = 1.5 }',
            "less than or equal to 1",
        ),
        (
            'attn = { method = "lowrank", energy = 0.9 }',
            'attn = { method = "mixed", bands = [{ rank = 2, bits = 5 }] }',
            "bits",
        ),
        (
            'attn = { method = "lowrank", energy = 0.9 }',
            'attn = { method = "lowrank", rank = -1 }',
            "greater than or equal to 1",
        ),
        (
            'attn = { method = "lowrank", energy = 0.9 }',
            'attn = { method = "lowrank2" }',
            "lowrank",
        ),
        # duplicates: a TOML table twice, a fuse name twice, a pack twice
        ('[sources.y]\npath = "models/y"', '[sources.x]\npath = "models/y"', "invalid TOML"),
        ('packs = ["x", "y"]', 'packs = ["x", "y", "x"]', "lists a pack twice"),
        ("[[fuse]]", EXTRA_FUSE.format(name="release", extra="") + "[[fuse]]", "duplicate"),
        # names that would write outside the output folder
        ('name = "release"', 'name = "../../escape"', "cannot be used as a folder name"),
        (
            '[sources.x]\npath = "models/x"',
            '[sources."a/b"]\npath = "models/x"\n[sources.x]\npath = "models/x"',
            "source name 'a/b' cannot be used as a folder name",
        ),
        # unknown names: a compression profile, an evaluated model
        ('compression = "exact"', 'compression = "exakt"', "did you mean 'exact'"),
    ],
)
def test_recipe_values(built: Path, old: str, new: str, expected: str) -> None:
    edit(built, old, new)
    assert expected in fails(built, 2)


def test_unknown_model_in_eval_is_named_with_a_suggestion(built: Path) -> None:
    with open(built / RECIPE, "a") as f:
        f.write('\n[[eval]]\nname = "e"\nmodels = ["fuse:relase"]\ndata = { a = "a.txt" }\n')
    line = fails(built, 2)
    assert "'fuse:relase' is not a model node (did you mean 'fuse:release'?)" in line


def test_unknown_target_is_named_with_a_suggestion(built: Path) -> None:
    assert "unknown target(s) ['pack:xx'] (did you mean 'pack:x'?)" in fails(built, 2, "pack:xx")


def test_missing_recipe(built: Path) -> None:
    result = CliRunner().invoke(main, ["make", str(built / "nope.toml")])
    assert result.exit_code == 2 and "recipe not found" in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("output", "overlaps"),
    [
        ("models/base", "the input folder of base"),
        ("models", "the input folder of base"),
        (".", "the recipe"),
        ("cache/release", "the cache folder"),
        ("out/packs/x/inner", "the outputs of pack:x"),
    ],
)
def test_output_overlapping_an_input_the_cache_or_another_output(
    built: Path, output: str, overlaps: str
) -> None:
    edit(built, "weights = {", f'output = "{output}"\nweights = {{')
    assert overlaps in fails(built, 2)


def test_two_fuses_with_one_output_folder(built: Path) -> None:
    edit(built, "weights = {", 'output = "shared"\nweights = {')
    with open(built / RECIPE, "a") as f:
        f.write(EXTRA_FUSE.format(name="other", extra='output = "shared"'))
    line = fails(built, 2)
    assert "the outputs of fuse:other" in line and "and fuse:release" in line


def test_existing_folder_not_ours_is_never_overwritten(built: Path) -> None:
    mine = built / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my work\n")
    edit(built, "weights = {", 'output = "mine"\nweights = {')
    assert "was not written by graftbuild" in fails(built, 2)
    assert (mine / "notes.txt").read_text() == "my work\n"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# -- model folders ------------------------------------------------------------------------------


def weights(root: Path) -> Path:
    return root / "models" / "x" / "model.safetensors"


def test_empty_model_folder(built: Path) -> None:
    folder = built / "models" / "x"
    shutil.rmtree(folder)
    folder.mkdir()
    assert "no safetensors weights" in fails(built, 2)


def test_corrupt_safetensors(built: Path) -> None:
    weights(built).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    line = fails(built, 2)
    assert str(weights(built)) in line and "not a valid safetensors file" in line


def test_truncated_safetensors(built: Path) -> None:
    data = weights(built).read_bytes()
    weights(built).write_bytes(data[:-1000])
    line = fails(built, 2)
    assert str(weights(built)) in line and "truncated" in line


class _Trap:
    """Unpickling this creates a file: proof that a loader ran code from the weights."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.ckpt", "weights.pkl"])
def test_pickle_weights_are_refused_and_never_unpickled(built: Path, name: str) -> None:
    trap = built / "unpickled"
    weights(built).unlink()
    (built / "models" / "x" / name).write_bytes(pickle.dumps(_Trap(trap)))
    line = fails(built, 2)
    assert "pickle" in line and name in line and "never unpickles" in line
    assert not trap.exists()


def test_other_architecture_names_the_tensors_and_asks_for_a_transfer(built: Path) -> None:
    shutil.rmtree(built / "models" / "x")
    make_base(built / "models" / "x", seed=5, config=TINY_LLAMA | {"intermediate_size": 48})
    line = fails(built, 2)
    assert "model.layers.0.mlp.down_proj.weight [32, 64] vs [32, 48]" in line
    assert "transfer step" in line


def test_missing_and_extra_tensors_are_named(built: Path) -> None:
    from safetensors.torch import load_file

    state_dict = load_file(str(weights(built)))
    state_dict["extra.bias"] = state_dict.pop("model.norm.weight")
    save_model(built / "models" / "x", state_dict, config_from=built / "models" / "base")
    line = fails(built, 2)
    assert "missing from source: ['model.norm.weight']" in line
    assert "not in base: ['extra.bias']" in line


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_or_inf_in_a_delta_names_the_tensor(built: Path, bad: str) -> None:
    from safetensors.torch import load_file

    state_dict = load_file(str(weights(built)))
    state_dict["model.layers.1.self_attn.v_proj.weight"][3, 4] = float(bad)
    save_model(built / "models" / "x", state_dict, config_from=built / "models" / "base")
    line = fails(built, 2)
    assert "'model.layers.1.self_attn.v_proj.weight': NaN or Inf in the delta" in line


def test_non_float_source_tensor_is_refused(built: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state_dict = load_file(str(weights(built)))
    state_dict["model.norm.weight"] = state_dict["model.norm.weight"].to(torch.int32)
    save_model(built / "models" / "x", state_dict, config_from=built / "models" / "base")
    assert "'model.norm.weight' has non-float dtype I32 where the base has F32" in fails(built, 2)


def test_a_source_in_another_float_dtype_is_packed_in_float32_and_said_so(built: Path) -> None:
    import torch
    from safetensors.torch import load_file

    full = load_file(str(weights(built)))
    half = {k: v.to(torch.bfloat16) for k, v in full.items()}
    save_model(built / "models" / "x", half, config_from=built / "models" / "base")
    result = CliRunner().invoke(main, ["make", str(built / RECIPE)])
    assert result.exit_code == 0, result.stderr
    assert "stored as BF16 where the base has F32" in result.stderr
    fused = load_file(str(built / "out" / "fused" / "release" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in fused.values())


# -- where it writes: permissions, a full disk --------------------------------------------------


def test_unwritable_output_folder(built_template: Path, fork_server: ForkServer) -> None:
    # As root every folder is writable: the build then runs as "nobody" in a folder it owns.
    root = Path(tempfile.mkdtemp(prefix="graftbuild-ro-"))
    try:
        root.chmod(0o777)
        project = root / "project"
        shutil.copytree(built_template, project)
        for p in [project, *project.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
        (project / "locked").mkdir(mode=0o555)
        (project / "locked").chmod(0o555)
        edit(project, "weights = {", 'output = "locked/release"\nweights = {')
        before = state(project)
        uid = {"uid": 65534} if os.geteuid() == 0 else {}
        result = fork_server.run(["make", RECIPE], project, root / "log", **uid)
        err = (root / "log").read_text()
        assert result["exit"] == 2, err
        line = one_line_error(err)
        assert f"{project / 'locked'} is not writable" in line
        assert_intact(project, before)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_full_disk_fails_cleanly_and_keeps_the_cache(built: Path, fork_server: ForkServer) -> None:
    edit(built, "y = 0.5", "y = 0.3")  # the fuse must be rebuilt: ~200 kB of weights
    before = state(built)
    log = built.parent / "log"
    result = fork_server.run(["make", RECIPE], built, log, fsize=64 * 1024)
    err = log.read_text()
    assert result["exit"] == 1, err
    line = one_line_error(err)
    assert "fuse:release: no space left to write" in line
    assert_intact(built, before)
    # With room again, the same make completes.
    assert fork_server.run(["make", RECIPE], built, log)["exit"] == 0, log.read_text()
    assert state(built) != before
    assert run_fsck(Store(built / "cache")).problems == []
