"""The shared remote cache: two cache folders ("two machines") sharing one remote, on ``file://``
and on an S3-compatible server (moto) started by the tests on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from graftbuild.build.engine import Engine, MakeResult, cache_dir
from graftbuild.cache.remote import Remote
from graftbuild.cache.store import Store
from graftbuild.cli.app import main
from graftbuild.recipe import load_recipe

BUILT = ["pack:x", "pack:y", "fuse:release"]
INPUTS = {"base", "source:x", "source:y"}  # model folders: "built" means "seen for the first time"


def built(result: MakeResult) -> list[str]:
    """The nodes whose step ran."""
    return [n for n in result.built if n not in INPUTS]


def machine(project: Path, name: str, remote: str) -> Path:
    """A copy of the project (its own cache and out folders) using ``remote``."""
    dest = project.parent / name
    shutil.copytree(project.parent / "models", dest / "models")
    text = project.read_text().replace('cache = "cache"', f'cache = "cache"\nremote = "{remote}"')
    (dest / "graftbuild.toml").write_text(text)
    return dest / "graftbuild.toml"


def make(recipe: Path, **remote_opts: bool) -> tuple[MakeResult, Remote]:
    r = load_recipe(recipe)
    assert r.project.remote is not None
    logs: list[str] = []
    remote = Remote(r.project.remote, logs.append, **remote_opts)
    remote.logs = logs  # type: ignore[attr-defined]
    sched = Engine(r, Store(cache_dir(r)), remote=remote)
    return sched.make(), remote


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".graftbuild.json"
    }


def outputs(recipe: Path) -> dict[str, bytes]:
    return files(recipe.parent / "out")


# -- S3 (moto) ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket; credentials and endpoint come from the environment, as boto reads them."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    bucket = "gb-" + tmp_path.name.lower().replace("_", "-")[-40:].strip("-")
    boto3.client("s3").create_bucket(Bucket=bucket)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a fresh client picks up this test's environment
    return f"s3://{bucket}/team/cache"


# -- the two-machine story, on both backends ------------------------------------------------------


@pytest.fixture(params=["file", "s3"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "remote").as_uri()
    return request.getfixturevalue("s3_bucket")


def test_second_machine_downloads_everything_and_builds_nothing(
    path_project: Path, remote_url: str
) -> None:
    a = machine(path_project, "a", remote_url)
    b = machine(path_project, "b", remote_url)
    first, ra = make(a)
    assert built(first) == BUILT
    assert ra.stats["pushed"] == 3

    second, rb = make(b)
    assert built(second) == []
    assert second.ids("pulled") == BUILT
    assert rb.stats == {"pulled": 3, "pushed": 0, "bad": 0}
    assert outputs(b) == outputs(a) and outputs(a)

    third, rb2 = make(b)  # a no-op: everything is in the local cache
    assert built(third) == [] and third.ids("pulled") == []
    assert rb2._fs is None, "a no-op make must not even open the remote"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "swapped"])
def test_corrupt_or_partial_remote_object_is_rebuilt(
    path_project: Path, tmp_path: Path, damage: str
) -> None:
    url = (tmp_path / "remote").as_uri()
    a = machine(path_project, "a", url)
    first, _ = make(a)
    pack = first.node("pack:x").output_hash
    fused = first.node("fuse:release").output_hash
    assert pack and fused
    archive = tmp_path / "remote" / "objects" / pack[:2] / f"{pack}.tar"
    data = archive.read_bytes()
    if damage == "garbage":
        archive.write_bytes(b"\0" * 512 + data[512:])
    elif damage == "truncated":  # what a non-atomic uploader leaves behind
        archive.write_bytes(data[: len(data) // 2])
    elif damage == "missing":  # the action entry arrived, the object did not
        archive.unlink()
    else:  # a whole, valid archive, but of other bytes than its name claims
        other = tmp_path / "remote" / "objects" / fused[:2] / f"{fused}.tar"
        archive.write_bytes(other.read_bytes())

    b = machine(path_project, "b", url)
    second, rb = make(b)
    assert built(second) == ["pack:x"], rb.logs  # type: ignore[attr-defined]
    assert set(second.ids("pulled")) == {"pack:y", "fuse:release"}
    if damage != "missing":
        assert rb.stats["bad"] == 1
        assert any("corrupt or incomplete" in m for m in rb.logs)  # type: ignore[attr-defined]
    assert outputs(b) == outputs(a)
    assert not any((cache_dir(load_recipe(b)) / "tmp").iterdir()), "nothing half-pulled is left"

    c = machine(path_project, "c", url)  # the rebuild repaired the remote
    third, rc = make(c)
    assert built(third) == [] and rc.stats["bad"] == 0


def test_no_pull_and_no_push(path_project: Path, tmp_path: Path) -> None:
    url = (tmp_path / "remote").as_uri()
    a = machine(path_project, "a", url)
    first, _ = make(a, push=False)
    assert built(first) == BUILT
    assert not (tmp_path / "remote").exists()
    make(machine(path_project, "b", url))  # builds and pushes
    second, rc = make(machine(path_project, "c", url), pull=False)
    assert built(second) == BUILT and rc.stats["pulled"] == 0


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_push_and_pull_commands(path_project: Path, tmp_path: Path) -> None:
    url = (tmp_path / "remote").as_uri()
    a = machine(path_project, "a", url)
    code, out, err = run("make", str(a), "--no-push", "--json")
    assert code == 0, err
    assert not (tmp_path / "remote").exists()
    code, out, err = run("push", str(a), "--json")
    assert code == 0, err
    assert json.loads(out)["pushed"] == BUILT
    # pack:y (exact profile) is a reference pack: the remote has its source's hash, not weights
    (note,) = json.loads(out)["notes"]
    assert note.startswith("note: pack:y is a reference pack") and "models/y" in note

    b = machine(path_project, "b", url)
    code, out, err = run("pull", str(b), "--json")
    assert code == 0, err
    assert json.loads(out) == {"pulled": BUILT, "missing": []}
    code, out, err = run("make", str(b), "--no-pull", "--json")
    assert code == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert [n for n in last["built"] if n not in INPUTS] == [] and last["pulled"] == []
    assert outputs(b) == outputs(a)


def test_remote_errors_do_not_stop_a_build_and_push_needs_a_remote(
    path_project: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    a = machine(path_project, "a", (blocker / "remote").as_uri())
    code, _out, err = run("make", str(a), "--json")
    assert code == 0, err
    assert "going on without the remote" in err
    code, _, err = run("push", str(path_project))
    assert code == 2 and "no [project] remote" in err


def test_credentials_in_the_recipe_are_refused(path_project: Path) -> None:
    text = path_project.read_text().replace(
        'cache = "cache"', 'cache = "cache"\nremote = "s3://AKIA:secret@bucket/x"'
    )
    path_project.write_text(text)
    code, _, err = run("make", str(path_project))
    assert code == 2 and "project.remote" in err and "credentials" in err


def test_another_machine_fuses_from_a_pulled_reference_pack_with_its_own_source(
    path_project: Path, tmp_path: Path
) -> None:
    url = (tmp_path / "remote").as_uri()
    a = machine(path_project, "a", url)
    make(a)
    b = machine(path_project, "b", url)
    text = b.read_text().replace("y = 0.5", "y = 0.25")  # a fuse the remote does not have
    b.write_text(text)
    result, _ = make(b)
    assert built(result) == ["fuse:release"]  # both packs pulled, pack:y a reference
    assert result.node("pack:y").action == "pulled"
    a.write_text(a.read_text().replace("y = 0.5", "y = 0.25"))
    make(a)
    assert outputs(b) == outputs(a)
