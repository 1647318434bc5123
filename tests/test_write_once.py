"""Outputs written once: packs with a known layout go straight to their file (same bytes as the
spilled way), files are hashed while written and the store does not read them back unless they
changed since, and the cheap finiteness test agrees with the entry-by-entry one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import graftbuild.cache.hashing as hashing
from graftbuild.cache.hashing import hash_file, hash_written
from graftbuild.cache.store import Store
from graftbuild.cache.writing import HashedWriter
from graftbuild.skillpack import PackReader, PackWriter, TensorLayout, encode_tensor, plan_layout
from graftbuild.weights.memory import HUGE_MIN, empty, empty_like
from graftbuild.weights.tensors import TensorInfo, all_finite, write_model_weights

HEADER = {"base": "xxh3:0123"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_contents() -> dict[str, tuple[str, str, torch.Tensor]]:
    """name -> (role, original dtype, delta): names whose sorted order differs from the file's
    (runs whose length is a multiple of 8 come first: ``model.norm``'s 252 bytes go after
    ``model.norm.weight``'s 256)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.norm": ("norm", "bfloat16", torch.randn(63, generator=gen)),
        "model.norm.weight": ("norm", "float32", torch.randn(64, generator=gen)),
        "lm_head.weight": ("head", "float16", torch.randn(48, 64, generator=gen)),
        "model.embed_tokens.weight": ("embed", "float32", torch.randn(96, 64, generator=gen)),
        "scalar": ("other", "float32", torch.tensor(0.25)),
    }


def write_spilled(path: Path, names: list[str]) -> None:
    contents = exact_contents()
    with PackWriter(path, HEADER) as writer:
        assert writer.order is None
        for name in names:
            role, dtype, delta = contents[name]
            codec, params, enc = encode_tensor(delta, {"method": "exact"})
            writer.add(name, role, codec, params, delta.shape, dtype, enc)


def layout_of(contents: dict[str, tuple[str, str, torch.Tensor]]) -> dict[str, TensorLayout]:
    out = {}
    for name, (role, dtype, delta) in contents.items():
        planned = plan_layout({"method": "exact"}, role, tuple(delta.shape), dtype)
        assert planned is not None
        out[name] = planned
    return out


def write_planned(path: Path) -> list[str]:
    contents = exact_contents()
    with PackWriter(path, HEADER, layout_of(contents)) as writer:
        assert writer.order is not None and sorted(writer.order) == sorted(contents)
        for name in writer.order:
            role, dtype, delta = contents[name]
            codec, params, enc = encode_tensor(delta, {"method": "exact"})
            writer.add(name, role, codec, params, delta.shape, dtype, enc)
        return list(writer.order)


def test_planned_pack_has_the_spilled_packs_bytes(tmp_path: Path) -> None:
    names = list(exact_contents())
    write_spilled(tmp_path / "spilled.safetensors", names[::-1])
    order = write_planned(tmp_path / "planned.safetensors")
    assert order != sorted(names)  # the file's order, not the names'
    planned = (tmp_path / "planned.safetensors").read_bytes()
    assert planned == (tmp_path / "spilled.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["planned.safetensors", "spilled.safetensors"]
    with PackReader(tmp_path / "planned.safetensors") as reader:
        for name, (_, _, delta) in exact_contents().items():
            assert torch.equal(reader.decode(name), delta)


def test_planned_writer_refuses_what_the_layout_did_not_promise(tmp_path: Path) -> None:
    contents = exact_contents()
    path = tmp_path / "p.safetensors"
    with PackWriter(path, HEADER, layout_of(contents)) as writer:
        assert writer.order is not None
        first, second = writer.order[0], writer.order[1]
        role, dtype, delta = contents[second]
        codec, params, enc = encode_tensor(delta, {"method": "exact"})
        with pytest.raises(ValueError, match="out of order"):
            writer.add(second, role, codec, params, delta.shape, dtype, enc)
        role, dtype, delta = contents[first]
        wrong = torch.zeros(delta.numel() + 1)
        codec, params, enc = encode_tensor(wrong, {"method": "exact"})
        with pytest.raises(ValueError, match="does not match the planned layout"):
            writer.add(first, role, codec, params, wrong.shape, dtype, enc)
        codec, params, enc = encode_tensor(delta, {"method": "exact"})
        with pytest.raises(ValueError, match="does not match the planned layout"):
            writer.add(first, "other", codec, params, delta.shape, dtype, enc)
        writer.add(first, role, codec, params, delta.shape, dtype, enc)
        with pytest.raises(ValueError, match="added twice"):
            writer.add(first, role, codec, params, delta.shape, dtype, enc)
        with pytest.raises(ValueError, match="tensors never added"):
            writer.close()
    assert os.listdir(tmp_path) == []  # nothing half-written is left


def test_a_layout_its_codec_does_not_describe_is_refused(tmp_path: Path) -> None:
    # a 3.0 reader finds the parts from the entry's metadata: a layout that says otherwise
    # could not be read back
    layout = {
        "a": TensorLayout("other", "exact", {}, (4,), "float32", {}, {"x": ("F32", [4]),
                                                                       "y": ("F16", [4])}),
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"tensor 'a': parts .* metadata describes"):
        PackWriter(tmp_path / "p.safetensors", HEADER, layout)
    assert os.listdir(tmp_path) == []


def test_only_codecs_that_know_their_layout_plan_one() -> None:
    assert plan_layout({"method": "exact"}, "mlp", (3, 5), "float32") == TensorLayout(
        "mlp", "exact", {}, (3, 5), "float32", {}, {"data": ("F32", [3, 5])}
    )
    assert plan_layout({"method": "lowrank", "rank": 2}, "mlp", (3, 5), "float32") is None
    assert plan_layout({"method": "prune", "keep": 0.5}, "mlp", (3, 5), "float32") is None


@pytest.mark.parametrize("piece", [None, 7, 4096])
def test_hashed_writer_hashes_exactly_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int | None
) -> None:
    import graftbuild.cache.writing as writing

    if piece is not None:  # buffers written in pieces that do not divide them
        monkeypatch.setattr(writing, "WRITE_PIECE", piece)
    path = tmp_path / "f.bin"
    writer = HashedWriter(path)
    big = torch.arange(300_000, dtype=torch.int32)  # more than one default piece
    chunks = [b"header", big.numpy(), bytearray(3)]
    for chunk in chunks:
        writer.write(chunk)
    writer.close()
    assert writer.size == path.stat().st_size == 6 + 1_200_000 + 3
    assert path.read_bytes() == b"header" + big.numpy().tobytes() + bytes(3)
    assert writer.digest == hash_file(path)


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    read: list[Path] = []

    def counting(path: Path) -> str:
        read.append(Path(path))
        return hash_file(path)

    monkeypatch.setattr(hashing, "hash_file", counting)
    return read


def test_reserved_writer_gives_the_same_file_and_frees_what_it_did_not_write(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 << 20)
    plain, reserved, short = tmp_path / "plain", tmp_path / "reserved", tmp_path / "short"
    for path, size in ((plain, None), (reserved, len(data))):
        w = HashedWriter(path, size=size)
        w.write(data)
        w.close()
        assert path.stat().st_size == len(data) and w.digest == hash_file(path)
    assert plain.read_bytes() == reserved.read_bytes()
    w = HashedWriter(short, size=len(data))
    w.write(data[:1000])
    w.close()
    assert short.read_bytes() == data[:1000]
    assert short.stat().st_blocks * 512 < 1 << 20  # the reserved blocks were given back


def test_commit_takes_the_writers_hashes_and_reads_a_file_changed_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "cache")
    infos = [TensorInfo("w", (256, 64), "F32", Path("w")), TensorInfo("v", (64,), "F32", Path())]
    tensors = {"w": torch.randn(256, 64), "v": torch.randn(64)}
    read = count_reads(monkeypatch)
    with store.staging("fuse:x") as out:
        write_pack_and_model(out, infos, tensors)
        (out / "config.json").write_text("{}")  # written by plain code: read to hash it
        digest = store.commit(out)
    obj = store.object_path(digest)
    assert sorted(p.name for p in read) == ["config.json"]
    assert store.verify(digest, full=True) is None  # the recorded hashes are the true ones

    read.clear()
    with store.staging("fuse:y") as out:
        write_pack_and_model(out, infos, tensors)
        pack = out / "skillpack.safetensors"
        data = bytearray(pack.read_bytes())
        data[-1] ^= 0xFF  # replaced after its writer hashed it: same size, another inode
        (out / "new").write_bytes(bytes(data))
        os.replace(out / "new", pack)
        digest2 = store.commit(out)
    assert [p.name for p in read] == ["skillpack.safetensors"]
    assert digest2 != digest and store.verify(digest2, full=True) is None
    assert obj.is_dir()


def write_pack_and_model(out: Path, infos: list[TensorInfo], tensors: dict) -> None:
    write_model_weights(out, infos, iter(tensors.items()), shard_size=2**40)
    contents = exact_contents()
    with PackWriter(out / "skillpack.safetensors", HEADER, layout_of(contents)) as writer:
        assert writer.order is not None
        for name in writer.order:
            role, dtype, delta = contents[name]
            codec, params, enc = encode_tensor(delta, {"method": "exact"})
            writer.add(name, role, codec, params, delta.shape, dtype, enc)


def test_hash_written_is_used_once_and_only_for_the_file_as_written(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    writer = HashedWriter(path)
    writer.write(b"abc")
    writer.close()
    hashing.note_written(path, "not-the-real-hash")  # as if a writer had recorded it
    assert hash_written(path) == "not-the-real-hash"
    assert hash_written(path) == hash_file(path)  # the record is taken once
    hashing.note_written(path, "not-the-real-hash")
    path.write_bytes(b"abcd")  # rewritten: another size
    assert hash_written(path) == hash_file(path)


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([1.0, -2.0, 3.5], torch.float32, True),
        ([1.0, float("nan"), 3.0], torch.float32, False),
        ([float("inf"), 1.0], torch.float32, False),
        ([float("-inf"), float("inf")], torch.float32, False),
        ([3e38, 3e38, 3e38, -1.0], torch.float32, True),  # the sum overflows; entries do not
        ([3e38, float("nan")], torch.float32, False),
        ([60000.0, 60000.0], torch.float16, True),
        ([60000.0, float("inf")], torch.float16, False),
        ([], torch.float32, True),
    ],
)
def test_all_finite(values: list[float], dtype: torch.dtype, expected: bool) -> None:
    t = torch.tensor(values, dtype=dtype)
    assert all_finite(t) is expected
    assert bool(torch.isfinite(t).all()) is expected


@pytest.mark.parametrize("nbytes", [0, 1000, HUGE_MIN, HUGE_MIN + 12])
def test_fresh_buffers_are_writable_tensors_of_their_size(nbytes: int) -> None:
    buf = empty(nbytes)
    assert buf.dtype == torch.uint8 and buf.numel() == nbytes
    buf.fill_(7)
    assert int(buf.sum()) == 7 * nbytes
    like = empty_like(torch.zeros(3, nbytes // 12 + 1), torch.float64)
    assert like.shape == (3, nbytes // 12 + 1) and like.dtype == torch.float64
    like.fill_(1.5)
    assert float(like.sum()) == 1.5 * like.numel()


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize("size", [0, 1, 4096, 100_003])
def test_pipelined_file_hash_equals_the_hash_of_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, mapped: bool
) -> None:
    import mmap

    import xxhash

    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    monkeypatch.setattr(hashing, "PIPELINE_MIN", 0)  # every file through the large-file paths
    monkeypatch.setattr(hashing, "CHUNK", 4096)  # many buffers in flight
    monkeypatch.setattr(hashing, "MAP_WINDOW", 2 * mmap.ALLOCATIONGRANULARITY)  # many windows
    maps: list[int] = []
    real_mmap = mmap.mmap

    def counting_mmap(*args: object, **kwargs: object) -> mmap.mmap:
        if not mapped:
            raise OSError(19, "this filesystem cannot map files")  # the reader thread instead
        m = real_mmap(*args, **kwargs)  # type: ignore[arg-type]
        maps.append(1)
        return m

    monkeypatch.setattr(mmap, "mmap", counting_mmap)
    assert hash_file(path) == xxhash.xxh3_128_hexdigest(data)
    expected_maps = -(-size // (2 * mmap.ALLOCATIONGRANULARITY)) if mapped else 0
    assert len(maps) == expected_maps  # every window of a non-empty file, each mapped once


def test_weights_are_checked_and_written_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer checks finiteness piece by piece as it writes: a tensor spanning many pieces
    is written as in one piece, and a NaN in a late piece fails naming the tensor, counted over
    the whole tensor."""
    import graftbuild.weights.tensors as tensors
    from graftbuild.errors import BuildError

    gen = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(37, 11, generator=gen), "b": torch.arange(5, dtype=torch.int64)}
    infos = [
        TensorInfo(k, tuple(v.shape), tensors.torch_dtype_to_st(v.dtype), Path())
        for k, v in state.items()
    ]
    for d in ("one", "many", "bad"):
        (tmp_path / d).mkdir()
    write_model_weights(tmp_path / "one", infos, iter(state.items()), 2**40)
    monkeypatch.setattr(tensors, "WRITE_PIECE", 64)  # 16 floats a piece, pieces cut mid-row
    write_model_weights(tmp_path / "many", infos, iter(state.items()), 2**40)
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert (tmp_path / "many" / "model.safetensors").read_bytes() == one
    assert load_weights_equal(tmp_path / "many", state)

    bad = state["a"].clone()
    bad[30, 3] = bad[36, 10] = float("nan")
    with pytest.raises(BuildError, match=r"tensor 'a' is not finite: 2 NaN value\(s\)"):
        write_model_weights(tmp_path / "bad", infos, iter([("a", bad), ("b", state["b"])]), 2**40)


def load_weights_equal(folder: Path, state: dict) -> bool:
    from safetensors.torch import load_file

    loaded = load_file(str(folder / "model.safetensors"))
    return loaded.keys() == state.keys() and all(loaded[k].equal(v) for k, v in state.items())


def test_forgotten_pages_of_a_mapped_tensor_read_back_from_the_file(tmp_path: Path) -> None:
    """``forget_pages`` drops whole pages of a range: a file-mapped tensor reads the file's
    values again afterwards; fresh memory's whole pages in the range read as zeros (it really
    let them go), and entries outside the range are untouched."""
    import mmap

    from safetensors.torch import save_file

    from graftbuild.weights.memory import forget_pages
    from graftbuild.weights.tensors import TensorFile

    values = torch.arange(3 * mmap.PAGESIZE, dtype=torch.float32)  # 12 pages of float32
    save_file({"t": values}, str(tmp_path / "m.safetensors"))
    f = TensorFile(tmp_path / "m.safetensors")
    try:
        mapped = f.map("t")
        assert mapped.sum() == values.sum()  # every page touched
        forget_pages(mapped, 100, values.numel() - 100)
        assert mapped.equal(values)
    finally:
        f.close()

    fresh = empty(values.numel() * 4).view(torch.float32)
    fresh.fill_(1.0)
    forget_pages(fresh, 100, values.numel() - 100)
    per_page = mmap.PAGESIZE // 4
    assert fresh[:100].eq(1).all() and fresh[-100:].eq(1).all()
    # all but the range's two partial pages are gone
    assert int(fresh.eq(0).sum()) >= values.numel() - 200 - 2 * per_page
