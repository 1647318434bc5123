# ruff: noqa: F811  (the fixtures imported from test_bad_inputs are parameters here)
"""Issue 15, "never silently wrong": one section per principle of docs/SECURITY.md's table.

Each hostile case asserts the exit code and the one error line, and that no output or cached
object changed (``fails``, from test_bad_inputs.py, also runs a full fsck). Cases where the build
recovers assert that its outputs are byte-identical to the build before (a clean build of the
same recipe: the ``built`` fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_bad_inputs import (  # noqa: F401  (fixtures)
    RECIPE,
    built,
    built_template,
    edit,
    fails,
    one_line_error,
    state,
)

from graftbuild.build import noop
from graftbuild.cache.fsck import run_fsck
from graftbuild.cache.hashing import StatCache
from graftbuild.cache.store import Store
from graftbuild.cli.app import main


def make_ok(root: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["make", str(root / RECIPE), *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout + result.stderr


def outputs(root: Path) -> dict[str, str]:
    return {k: v for k, v in state(root).items() if k.startswith("out/")}


def fsck(root: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["fsck", str(root / RECIPE), *args])
    return result.exit_code, result.stdout + result.stderr


def fuse_object(root: Path) -> Path:
    marker = json.loads((root / "out" / "fused" / "release" / ".graftbuild.json").read_text())
    return root / "cache" / "objects" / marker["object"][:2] / marker["object"]


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging: a blocking open of a FIFO is interrupted."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# -- 1. everything a node reads is in its key ---------------------------------------------------


def test_index_naming_a_weight_file_outside_the_folder_is_refused(built: Path) -> None:
    folder = built / "models" / "x"
    index = {"weight_map": {"w": "../y/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    line = fails(built, 2)
    assert "model.safetensors.index.json" in line and "outside the model folder" in line


def test_index_naming_a_hidden_weight_file_is_refused(built: Path) -> None:
    folder = built / "models" / "x"
    os.rename(folder / "model.safetensors", folder / ".w.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": ".w.safetensors"}})
    )
    assert "'.w.safetensors' is outside the model folder, hidden or linked" in fails(built, 2)


def test_index_naming_a_file_in_a_subfolder_is_hashed(built: Path) -> None:
    """A weight file in a sub-folder is covered by the folder's hash: scaling it rebuilds."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = built / "models" / "x"
    (folder / "shards").mkdir()
    os.rename(folder / "model.safetensors", folder / "shards" / "model.safetensors")
    tensors = load_file(str(folder / "shards" / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(tensors, "shards/model.safetensors")})
    )
    make_ok(built)
    before = outputs(built)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name] * torch.tensor(1.5)
    save_file(tensors, str(folder / "shards" / "model.safetensors"), metadata={"format": "pt"})
    out = make_ok(built)
    assert "pack:x" in out and "source:x" in out
    after = outputs(built)
    assert (
        after["out/fused/release/model.safetensors"]
        != before["out/fused/release/model.safetensors"]
    )


def test_retargeted_symlink_in_a_recipe_path_is_a_change(built: Path) -> None:
    """The no-op fast path re-resolves every recipe path: a link moved to another folder sends
    ``make`` to the planner, which rebuilds; moved back, the outputs are the first build's."""
    first = outputs(built)
    (built / "models" / "link").symlink_to("x")
    edit(built, 'path = "models/x"', 'path = "models/link"')
    make_ok(built)
    assert outputs(built) == first  # the same folder through a link: the same bytes
    recipe = (built / RECIPE).resolve()
    assert noop.check(recipe, [], None) is not None  # recorded: nothing changed
    (built / "models" / "link").unlink()
    (built / "models" / "link").symlink_to("y")
    assert noop.check(recipe, [], None) is None
    out = make_ok(built)
    assert "build" in out and outputs(built) != first
    (built / "models" / "link").unlink()
    (built / "models" / "link").symlink_to("x")
    make_ok(built)
    assert outputs(built) == first


# -- 2. everything in an object is covered by its manifest and content hash ---------------------


@pytest.mark.parametrize("injected", [".injected", "NOTES.md", ".hidden/payload.json"])
def test_a_file_injected_into_an_object_is_caught_and_rebuilt(built: Path, injected: str) -> None:
    before = state(built)
    obj = fuse_object(built)
    (obj / injected).parent.mkdir(exist_ok=True)
    (obj / injected).write_text("not from the build\n")
    code, text = fsck(built)
    assert code == 1 and f"{injected}: not part of the object" in text
    out = make_ok(built)
    assert "cached object corrupt" in out or "corrupt" in out
    assert state(built) == before  # rebuilt to the same bytes, injected file gone
    assert not (built / "out" / "fused" / "release" / Path(injected).name).exists()


def test_release_card_is_covered_by_the_object_hash(tmp_path: Path) -> None:
    """A model card (``README.md``) is part of a release object: its hash covers it, so a
    changed card is a different object (remote archives are checked against that hash)."""
    from graftbuild.cache.hashing import tree_hash_uncached

    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "README.md").write_text("card\n")
    one = tree_hash_uncached(tmp_path)
    (tmp_path / "README.md").write_text("a different card\n")
    two = tree_hash_uncached(tmp_path)
    (tmp_path / ".graftbuild-object.json").write_text("{}")  # our own marker: not content
    assert one.digest != two.digest and tree_hash_uncached(tmp_path) == two
    assert "README.md" in two.files


@pytest.mark.parametrize("injected", ["README.md", ".payload", "link"])
def test_remote_object_carrying_an_injected_file_is_rejected(
    path_project: Path, tmp_path: Path, injected: str
) -> None:
    """An archive on the remote with an extra model card, dotfile or symlink: not the object
    its name claims, so it is refused and built here; the outputs are the clean build's."""
    import tarfile

    from test_remote import built as built_ids
    from test_remote import machine, outputs
    from test_remote import make as make_remote

    url = (tmp_path / "remote").as_uri()
    a = machine(path_project, "a", url)
    first, _ = make_remote(a)
    fused = first.node("fuse:release").output_hash
    archive = tmp_path / "remote" / "objects" / fused[:2] / f"{fused}.tar"
    extra = tmp_path / "extra"
    extra.write_text("injected\n")
    with tarfile.open(archive, "a") as tar:
        if injected == "link":
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, "model.safetensors"
            tar.addfile(info)
        else:
            tar.add(extra, arcname=injected)
    b = machine(path_project, "b", url)
    second, rb = make_remote(b)
    assert built_ids(second) == ["fuse:release"] and rb.stats["bad"] == 1, rb.logs
    assert outputs(b) == outputs(a)
    assert not (b.parent / "out" / "fused" / "release" / injected).exists()


def test_object_flipped_in_place_with_mtime_restored_is_caught(built: Path) -> None:
    make_ok(built)  # the stat cache now knows this copy's object files
    before = state(built)
    weights = fuse_object(built) / "model.safetensors"
    st = weights.stat()
    weights.chmod(0o644)
    with open(weights, "r+b") as f:
        f.seek(st.st_size - 3)
        b = f.read(1)
        f.seek(st.st_size - 3)
        f.write(bytes([b[0] ^ 0x40]))
    weights.chmod(stat.S_IMODE(st.st_mode))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns
    out = make_ok(built)
    assert "corrupt" in out and "model.safetensors: content changed" in out
    assert state(built) == before


def test_object_check_trusts_a_link_count_change_but_not_ctime_alone(tmp_path: Path) -> None:
    f = tmp_path / "obj"
    f.write_bytes(b"hello")
    cache = StatCache()
    digest = cache.file(f)
    cache.hashed.clear()
    os.link(f, tmp_path / "out")  # an output linked to the object: ctime and nlink move
    assert cache.object_file(f) == digest and cache.hashed == []
    os.chmod(f, 0o600)  # ctime alone moves (a write with the mtime restored does the same)
    assert cache.object_file(f) == digest and cache.hashed == [f]


# -- 3. never move, replace or delete a path graftbuild did not create --------------------------


@pytest.mark.parametrize("kind", ["file", "symlink", "device", "fifo"])
def test_output_path_that_is_not_our_folder_is_refused(built: Path, kind: str) -> None:
    target = built / "mine"
    if kind == "file":
        target.write_text("my notes\n")
    elif kind == "symlink":
        (built / "elsewhere").mkdir()
        target.symlink_to("elsewhere")
    elif kind == "device":
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a null device
    else:
        os.mkfifo(target)
    before_mode = os.lstat(target)
    edit(built, "weights = {", 'output = "mine"\nweights = {')
    with deadline(60):  # an output FIFO used to be opened (and waited on)
        line = fails(built, 2)
    what = {"file": "a file", "symlink": "a symbolic link", "device": "a character device"}
    # a link in a recipe path is resolved (and watched): its target is what is refused
    shown = built / "elsewhere" if kind == "symlink" else target
    assert f"{shown} is" in line and "not written by graftbuild" in line
    assert what.get(kind, "a FIFO") in line or kind == "symlink"
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before_mode.st_ino, before_mode.st_mode)
    assert sorted(p.name for p in built.iterdir() if p.name.startswith(".mine")) == []


def test_refused_before_any_work(built: Path) -> None:
    """A foreign output path is refused before anything is built (the cache stays as it was,
    with nothing new in it)."""
    shutil.rmtree(built / "cache")
    shutil.rmtree(built / "out")
    (built / "mine").write_text("mine\n")
    edit(built, "weights = {", 'output = "mine"\nweights = {')
    result = CliRunner().invoke(main, ["make", str(built / RECIPE)])
    assert result.exit_code == 2 and "not written by graftbuild" in one_line_error(result.stderr)
    assert list((built / "cache" / "objects").rglob("*")) == []


def test_clean_and_materialise_leave_lookalike_user_files_alone(built: Path) -> None:
    mine = built / "out" / "fused" / ".release.graftbuild-old-notes"
    mine.write_text("a user's file with an unlucky name\n")
    shutil.rmtree(built / "out" / "fused" / "release")
    make_ok(built)  # re-materialises beside it
    assert mine.read_text().startswith("a user's")
    (built / "out" / "packs" / "x").rename(built / "moved")
    (built / "out" / "packs" / "x").write_text("user file\n")
    result = CliRunner().invoke(main, ["clean", str(built / RECIPE)])
    assert result.exit_code == 0 and "kept" in result.stdout
    assert (built / "out" / "packs" / "x").read_text() == "user file\n"


def test_cache_inside_an_input_folder_is_refused(built: Path) -> None:
    edit(built, 'cache = "cache"', 'cache = "models/base/cache"')
    line = fails(built, 2)
    assert "the cache folder" in line and "overlaps the input folder of base" in line
    assert not (built / "models" / "base" / "cache").exists()


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_input_that_is_a_fifo_socket_or_device_is_refused_not_read(built: Path, kind: str) -> None:
    """A FIFO used to hang ``make`` (opening it blocks): now exit 2 at once, naming it."""
    target = built / "models" / "x" / "special_tokens_map.json"
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless bytes
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
    with deadline(60):  # a regression hangs: fail instead of blocking the suite
        line = fails(built, 2)
    what = {"fifo": "a FIFO", "socket": "a socket", "device": "a character device"}[kind]
    assert str(target) in line and what in line


def test_weight_file_that_is_a_fifo_is_refused(built: Path) -> None:
    target = built / "models" / "x" / "model.safetensors"
    target.unlink()
    os.mkfifo(target)
    with deadline(60):
        line = fails(built, 2)
    assert "source:x" in line and "found a FIFO" in line


@pytest.mark.parametrize("which", ["recipe", "lockfile"])
def test_recipe_or_lockfile_that_is_a_fifo_is_refused(built: Path, which: str) -> None:
    if which == "recipe":
        target = built / "fifo.toml"
        os.mkfifo(target)
        args = ["make", str(target)]
    else:
        target = built / "graftbuild.lock"
        target.unlink()
        os.mkfifo(target)
        args = ["make", str(built / RECIPE), "--locked"]
    before = state(built)
    with deadline(60):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.stderr
    assert f"{target}: expected a regular file, found a FIFO" in one_line_error(result.stderr)
    assert state(built) == before


def test_data_file_that_is_a_fifo_is_refused(built: Path) -> None:
    """An eval's data file that is a FIFO: refused naming it, not waited on."""
    os.mkfifo(built / "heldout.txt")
    with open(built / RECIPE, "a") as f:
        f.write('\n[[eval]]\nname = "e"\nmodels = ["base"]\ndata = { a = "heldout.txt" }\n')
    with deadline(60):
        line = fails(built, 2)
    assert "heldout.txt: expected a regular file, found a FIFO" in line and "eval:e" in line


# -- 4. every number is finite and in range, and so is every output -----------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("nan", "fuse.0.weights.x: nan is not a finite number"),
        ("inf", "fuse.0.weights.x: inf is not a finite number"),
        ("-inf", "fuse.0.weights.x: -inf is not a finite number"),
        ("1e39", "fuse.0.weights.x: Input should be less than or equal to 1000"),
        ("-2e3", "fuse.0.weights.x: Input should be greater than or equal to -1000"),
    ],
)
def test_fusion_weights_must_be_finite_and_in_range(built: Path, value: str, expected: str) -> None:
    edit(built, "weights = { x = 1.0", f"weights = {{ x = {value}")
    assert expected in fails(built, 2)


def test_any_non_finite_number_in_the_recipe_is_refused(built: Path) -> None:
    edit(built, "energy = 0.9", "energy = nan")
    assert "compression.default.attn.energy: nan is not a finite number" in fails(built, 2)


def _overflowing_project(root: Path, base_dtype: str, delta: float, weight: float) -> Path:
    """A base (``base_dtype``) and one source whose embedding differs by ``delta``."""
    import torch
    from conftest import make_base, save_model

    state_ = make_base(root / "models" / "base")
    dtype = getattr(torch, base_dtype)
    state_ = {k: v.to(dtype) for k, v in state_.items()}
    save_model(root / "models" / "base", state_)
    src = dict(state_)
    src["model.embed_tokens.weight"] = (state_["model.embed_tokens.weight"].float() + delta).to(
        dtype
    )
    save_model(root / "models" / "x", src, config_from=root / "models" / "base")
    (root / RECIPE).write_text(
        '[project]\nname = "t"\ncache = "cache"\n[base]\npath = "models/base"\n'
        '[compression.default]\nembed = "exact"\nhead = "exact"\nattn = "exact"\n'
        'mlp = "exact"\n[sources.x]\npath = "models/x"\n'
        f'[[fuse]]\nname = "release"\npacks = ["x"]\nweights = {{ x = {weight} }}\n'
    )
    return root


def test_fp16_overflow_when_cast_back_to_the_base_fails_naming_tensor_and_node(
    tmp_path: Path,
) -> None:
    root = _overflowing_project(tmp_path, "float16", 100.0, 1000.0)
    result = CliRunner().invoke(main, ["make", str(root / RECIPE)])
    assert result.exit_code == 1, result.stderr
    line = one_line_error(result.stderr)
    assert "fuse:release" in line and "'model.embed_tokens.weight' is not finite" in line
    assert "overflow float16" in line
    assert not (root / "out" / "fused" / "release").exists()
    assert list((root / "cache" / "tmp").iterdir()) == []


def test_fp16_pack_part_overflow_fails_naming_tensor_and_node(tmp_path: Path) -> None:
    """A delta finite in float32 (1e5) overflows the float16 values of a prune codec."""
    root = _overflowing_project(tmp_path, "float32", 1e5, 1.0)
    text = (
        (root / RECIPE)
        .read_text()
        .replace('embed = "exact"', 'embed = { method = "prune", keep = 0.5 }')
    )
    (root / RECIPE).write_text(text)
    result = CliRunner().invoke(main, ["make", str(root / RECIPE)])
    assert result.exit_code == 1, result.stderr
    line = one_line_error(result.stderr)
    assert "pack:x" in line and "of tensor 'model.embed_tokens.weight' is not finite" in line
    assert "overflow float16" in line
    assert not (root / "out" / "packs" / "x").exists()


def test_config_refused_by_transformers_is_one_line_exit_2(tmp_path: Path) -> None:
    """A base built from a config that transformers refuses (initializer_range 1e39): exit 2 in
    one line naming the config file and the base node, nothing cached (it was a multi-line
    "step failed", exit 1)."""
    from conftest import TINY_LLAMA, TOKENIZER

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA | {"initializer_range": 1e39}))
    (tmp_path / "models").mkdir()
    (tmp_path / RECIPE).write_text(
        '[project]\nname = "t"\ncache = "cache"\n'
        f'[base]\nconfig = "config.json"\ntokenizer = "{TOKENIZER}"\nseed = 0\n'
        '[sources.x]\npath = "models/x"\n'
    )
    result = CliRunner().invoke(main, ["make", str(tmp_path / RECIPE), "base"])
    assert result.exit_code == 2, result.stderr
    line = one_line_error(result.stderr)
    assert line.startswith("error: base: ") and "config.json: not a valid llama config" in line
    assert "initializer_range" in line
    assert list((tmp_path / "cache" / "objects").rglob("*")) == []


# -- 5. every on-disk state file is validated; malformed is absent, fsck --repair mends ---------


def _stat_bad(root: Path) -> None:
    p = root / "cache" / "stat.json"
    data = json.loads(p.read_text())
    keys = sorted(k for k in data if k.startswith(str(root)))  # this copy's own files
    data[keys[0]] = 5  # not a pair: a TypeError before
    data[keys[1]] = [[1, 2], 3]  # a short signature and a number for a hash
    data[keys[2]] = {"sig": 1}
    p.write_text(json.dumps(data))


def _trace_bad(root: Path) -> None:
    recipe = str((root / RECIPE).resolve())
    (p,) = [
        t
        for t in (root / "cache" / "traces").glob("*.json")
        if json.loads(t.read_text())["recipe"] == recipe
    ]
    data = json.loads(p.read_text())
    data["nodes"]["pack:x"] = ["not", "a", "trace"]
    data["nodes"]["fuse:release"] = {"key": 3, "parts": None, "output": "x"}
    p.write_text(json.dumps(data))


def _action_bad(root: Path) -> None:
    for i, p in enumerate(sorted((root / "cache" / "actions").glob("*/*.json"))):
        p.write_text(json.dumps([1, 2]) if i % 2 else json.dumps({"output": 7}))


def _registry_bad(root: Path) -> None:
    (root / "cache" / "locks.json").write_text(json.dumps({"locks": ["a", "b"]}))


def _durability_bad(root: Path) -> None:
    (root / "cache" / "durability.json").write_text('{"boot": ["x"], "unsynced_since": NaN}')


def _lock_bad(root: Path) -> None:
    p = root / "graftbuild.lock"
    data = json.loads(p.read_text())
    data["nodes"]["pack:x"] = "not a node"
    p.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage",
    [_stat_bad, _trace_bad, _action_bad, _registry_bad, _lock_bad, _durability_bad],
    ids=lambda f: f.__name__,
)
def test_malformed_state_file_is_treated_as_absent_and_mended(built: Path, damage) -> None:
    make_ok(built)  # state files now name this copy's paths
    before = outputs(built)
    damage(built)
    plan = CliRunner().invoke(main, ["plan", str(built / RECIPE)])
    assert plan.exit_code == 0 and "internal error" not in plan.stderr, plan.stderr
    if damage not in (_stat_bad, _durability_bad):  # these two are mended by any run
        code, text = fsck(built)
        assert code == 1 and "internal error" not in text, text
        assert "malformed" in text or "not a valid lockfile" in text
    if damage is not _lock_bad:
        code, text = fsck(built, "--repair")
        assert code == 0 and "internal error" not in text, text
        code, text = fsck(built)
        assert code == 0 and "0 problems" in text, text
    make_ok(built)
    assert outputs(built) == before
    code, text = fsck(built)
    assert code == 0 and "0 problems" in text, text


def test_gc_survives_malformed_registry_and_actions(built: Path) -> None:
    _registry_bad(built)
    _action_bad(built)
    result = CliRunner().invoke(main, ["gc", "--cache", str(built / "cache"), "--dry-run"])
    assert "internal error" not in result.stderr and result.exit_code in (0, 2), result.stderr


# -- 6. safetensors parsed at least as strictly as the safetensors library ----------------------

F32 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        (
            {"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [4, 12]}},
            12,
            "overlaps the tensor before it",
        ),
        (
            {"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [12, 20]}},
            20,
            "leaves a hole of 4 bytes",
        ),
        ({"a": {**F32, "data_offsets": [4, 12]}}, 12, "leaves a hole of 4 bytes"),
        (
            {"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [0, 8]}},
            8,
            "overlaps",
        ),
        (
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
            8,
            "key 'a' appears twice",
        ),
        (b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0, "nested too deep"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": 1}},
            8,
            "__metadata__ is not strings",
        ),
        (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', 8, "NaN is not JSON"),
        (
            {"a": {"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}},
            8,
            "is not a list of sizes",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "trailing bytes"),
        (b'   {"a": 1}', 0, "does not start with '{'"),
        (
            {"a": {"dtype": "U17", "shape": [2], "data_offsets": [0, 8]}},
            8,
            "unsupported dtype 'U17'",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, 8, "is not [begin, end]"),
    ],
    ids=[
        "overlap",
        "hole-between",
        "hole-before",
        "same-span",
        "duplicate-name",
        "deep-nesting",
        "metadata-not-strings",
        "nan-in-header",
        "bool-in-shape",
        "trailing",
        "leading-space",
        "unknown-dtype",
        "float-offset",
    ],
)
def test_malformed_safetensors_is_refused_naming_the_file(
    built: Path, header: dict | bytes, data: int, expected: str
) -> None:
    target = built / "models" / "x" / "model.safetensors"
    write_safetensors(target, header, bytes(data))
    line = fails(built, 2)
    assert str(target) in line and expected in line and "source:x" in line


def test_parser_accepts_what_the_library_writes(tmp_path: Path) -> None:
    """The strict parser agrees with safetensors on its own files (zero-size tensors too)."""
    import torch
    from safetensors.torch import save_file

    from graftbuild.weights.tensors import TensorFile

    tensors = {
        "a": torch.ones(3),
        "b": torch.zeros(0, 4),
        "c": torch.ones(2, 2, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    tf = TensorFile(tmp_path / "m.safetensors")
    try:
        for name, t in tensors.items():
            assert torch.equal(tf.read(name), t)
    finally:
        tf.close()


# -- 7. every destructive operation is crash-safe -----------------------------------------------


def test_gc_killed_mid_delete_leaves_no_half_object(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc renames an object out of ``objects/`` before deleting it: a kill mid-delete leaves
    garbage in ``tmp/`` only (cleared by the next build), never a half object that fsck flags."""
    from graftbuild.cache import store as store_mod

    (built / "graftbuild.lock").unlink()  # nothing pinned: every object is garbage
    (built / "cache" / "locks.json").unlink()
    real = shutil.rmtree
    calls: list[str] = []

    def killed(path, *args, **kwargs):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()  # part of the object deleted, then the process "dies"
        calls.append(str(path))
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.shutil, "rmtree", killed)
    result = CliRunner().invoke(main, ["gc", "--cache", str(built / "cache")])
    assert result.exit_code == 130 and calls
    monkeypatch.setattr(store_mod.shutil, "rmtree", real)
    assert all("/cache/tmp/" in c for c in calls)  # deleted only after the rename
    report = run_fsck(Store(built / "cache"))
    assert report.problems == [] and report.leftovers >= 1
    make_ok(built)  # rebuilds what gc took; tmp/ cleared
    assert list((built / "cache" / "tmp").iterdir()) == []
    code, text = fsck(built)
    assert code == 0, text


def test_clean_killed_mid_delete_leaves_no_half_output(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``clean`` renames an output aside (marker first) before deleting it: a kill mid-delete
    never leaves a marked folder missing files, and the next make restores it from the cache."""
    from graftbuild.cache import store as store_mod

    before = outputs(built)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.shutil, "rmtree", killed)
    result = CliRunner().invoke(main, ["clean", str(built / RECIPE), "pack:x"])
    assert result.exit_code == 130
    monkeypatch.undo()
    assert not (built / "out" / "packs" / "x").exists()
    (aside,) = (built / "out" / "packs").glob(".x.graftbuild-old-*")
    assert not (aside / ".graftbuild.json").exists()  # no longer claims to be an output
    out = make_ok(built)
    assert "restored" in out or "pack:x" in out
    assert outputs(built) == before and not aside.exists()


def test_sigterm_cleans_up_and_exits_like_sigint(built: Path, fork_server) -> None:
    before_out = outputs(built)
    shutil.rmtree(built / "cache")
    shutil.rmtree(built / "out")
    log = built / "make.log"
    pid = fork_server.spawn(["make", str(built / RECIPE)], cwd=built, log=log)
    tmp = built / "cache" / "tmp"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp.is_dir() and any(tmp.iterdir())):
        time.sleep(0.005)
    os.kill(pid, signal.SIGTERM)
    code = fork_server.wait(pid)
    text = log.read_text()
    assert code == 143, text
    assert "Traceback" not in text and text.rstrip().splitlines()[-1].startswith(
        "error: terminated (SIGTERM)"
    ), text
    assert list(tmp.iterdir()) == []
    assert run_fsck(Store(built / "cache")).problems == []
    make_ok(built)
    assert outputs(built) == before_out


# -- 8. one line, the right exit code, before any heavy work ------------------------------------


def test_over_long_name_is_refused_before_any_pack_is_built(built: Path) -> None:
    long = "n" * 10_000
    edit(built, 'name = "release"', f'name = "{long}"')
    line = fails(built, 2)  # nothing new in the cache: refused before packing
    assert "is 10000 bytes long" in line and len(line) < 400


def test_over_long_output_folder_is_refused_before_any_work(built: Path) -> None:
    edit(built, "weights = {", f'output = "out/{"d" * 300}"\nweights = {{')
    line = fails(built, 2)
    assert "fuse:release" in line and "folder name" in line and len(line) < 400


@pytest.mark.parametrize("name", ["model.safetensors", "extra.safetensors"])
def test_a_folder_named_like_a_weight_file_is_refused(built: Path, name: str) -> None:
    folder = built / "models" / "x"
    if name == "model.safetensors":  # the weights under another name, a folder in their place
        os.rename(folder / name, folder / "weights.safetensors")
    (folder / name).mkdir()
    line = fails(built, 2)
    assert f"{name}: expected a safetensors weight file, found a folder" in line
    assert "source:x" in line


@pytest.mark.parametrize("text", ["", "\n\n# only a comment\n"])
def test_empty_recipe_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / RECIPE).write_text(text)
    result = CliRunner().invoke(main, ["make", str(tmp_path / RECIPE)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "the recipe is empty" in one_line_error(result.stderr)


def test_deeply_nested_recipe_is_one_line(tmp_path: Path) -> None:
    (tmp_path / RECIPE).write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    result = CliRunner().invoke(main, ["make", str(tmp_path / RECIPE)])
    assert result.exit_code == 2
    assert "invalid TOML: nested too deep" in one_line_error(result.stderr)


def test_several_recipe_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / RECIPE).write_text('[project]\nname = "t"\n')
    result = CliRunner().invoke(main, ["make", str(tmp_path / RECIPE)])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert "base: Field required (and 1 more)" in one_line_error(result.stderr)


def test_errors_in_an_input_name_the_node_and_the_file(built: Path) -> None:
    target = built / "models" / "y" / "model.safetensors"
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size - 4)
    line = fails(built, 2)
    assert line.startswith("error: source:y: ") and str(target) in line and "truncated" in line
