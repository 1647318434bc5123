"""The SkillPack file: round trips, sizes, determinism, versioning and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from graftbuild.compress.codecs import get_codec
from graftbuild.errors import UserError
from graftbuild.skillpack import (
    FORMAT_VERSION,
    METADATA_KEY,
    PackReader,
    PackWriter,
    encode_tensor,
)

HEADER = {"base": "xxh3:0123", "source": "xxh3:4567", "profile": "default"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def delta_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 16, generator=gen) @ torch.randn(16, n, generator=gen) / 16
    return low + 0.05 * torch.randn(m, n, generator=gen)


# name -> (role, spec, weight dtype, delta)
def pack_contents() -> dict[str, tuple[str, dict[str, Any], torch.dtype, torch.Tensor]]:
    return {
        "model.embed_tokens.weight": (
            "embed",
            {"method": "prune", "keep": 0.1},
            torch.bfloat16,
            delta_matrix(256, 512, 0),
        ),
        "model.layers.0.self_attn.q_proj.weight": (
            "attn",
            {"method": "lowrank", "energy": 0.9},
            torch.float16,
            delta_matrix(256, 512, 1),
        ),
        "model.layers.0.mlp.up_proj.weight": (
            "mlp",
            {"method": "mixed"},
            torch.float32,
            delta_matrix(512, 256, 2),
        ),
        "model.layers.0.mlp.down_proj.weight": (
            "mlp",
            {"method": "mixed", "bands": [{"rank": 40, "bits": 3}]},
            torch.float32,
            delta_matrix(256, 512, 3),
        ),
        "lm_head.weight": (
            "head",
            {"method": "prune", "keep": 0.05, "dtype": "bfloat16"},
            torch.bfloat16,
            delta_matrix(256, 512, 5),
        ),
        "model.layers.0.self_attn.q_proj.bias": (  # 1-D: lowrank stores it exactly
            "other",
            {"method": "lowrank", "rank": 4},
            torch.float16,
            delta_matrix(1, 256, 6)[0],
        ),
        "model.layers.0.input_layernorm.weight": (
            "norm",
            {"method": "exact"},
            torch.bfloat16,
            delta_matrix(1, 256, 4)[0],
        ),
    }


def write_pack(path: Path, order: list[str] | None = None) -> int:
    contents = pack_contents()
    with PackWriter(path, HEADER) as writer:
        for name in order or list(contents):
            role, spec, dtype, delta = contents[name]
            weight_delta = delta.to(dtype).float()  # what a delta of dtype weights looks like
            codec, params, enc = encode_tensor(weight_delta, spec)
            writer.add(name, role, codec, params, weight_delta.shape, str(dtype), enc)
    return path.stat().st_size


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    size = write_pack(path)
    assert size == path.stat().st_size
    contents = pack_contents()
    with PackReader(path) as reader:
        assert reader.format_version == FORMAT_VERSION
        assert reader.header == HEADER
        assert reader.names() == sorted(contents)
        for name, (role, spec, dtype, delta) in contents.items():
            weight_delta = delta.to(dtype).float()
            entry = reader.entries[name]
            assert entry["role"] == role and entry["codec"] == spec["method"]
            assert entry["dtype"] == str(dtype).removeprefix("torch.")
            assert entry["shape"] == list(delta.shape)
            assert entry["codec_version"] == get_codec(spec["method"]).version
            out = reader.decode(name)
            assert out.dtype == torch.float32 and out.shape == delta.shape
            # The file decodes exactly as the codec does in memory.
            codec = get_codec(entry["codec"])
            _, params, enc = encode_tensor(weight_delta, spec)
            assert entry["params"] == params
            assert torch.equal(out, codec.decode(enc.parts, enc.meta, tuple(delta.shape)))
        norm = "model.layers.0.input_layernorm.weight"
        assert torch.equal(reader.decode(norm), contents[norm][3].to(torch.bfloat16).float())
        assert reader.entries["model.layers.0.self_attn.q_proj.weight"]["params"] == {
            "energy": 0.9,
            "rank": None,
            "max_rank": None,
            "dtype": "float16",
        }


def test_file_size_reflects_expected_nbytes(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    size = write_pack(path)
    with PackReader(path) as reader:
        expected = reader.expected_nbytes()
        assert reader.payload_nbytes() == expected
    assert abs(size - expected) <= 0.1 * expected
    # And the expectation is the codecs' own formula, not a sum over stored tensors.
    with PackReader(path) as reader:
        entries = reader.entries
    mixed = entries["model.layers.0.mlp.down_proj.weight"]
    assert mixed["meta"]["bands"] == [{"rank": 40, "bits": 3}]
    codes = (40 * 256 * 3 + 7) // 8 + (40 * 512 * 3 + 7) // 8
    scales = 2 * 2 * 40 * (2 + 4)
    assert get_codec("mixed").expected_nbytes(mixed["meta"], (256, 512)) == codes + scales + 4 * 40


def test_bytes_are_deterministic_and_order_free(tmp_path: Path) -> None:
    names = list(pack_contents())
    write_pack(tmp_path / "a.safetensors", names)
    write_pack(tmp_path / "b.safetensors", names[::-1])
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    write_pack(path)
    tensors = load_file(path)
    # one byte run per tensor, named after it, whatever the number of its codec's parts
    assert set(tensors) == set(pack_contents())
    assert all(t.dtype == torch.uint8 and t.ndim == 1 for t in tensors.values())
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    meta = json.loads(json.loads(raw[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
    assert meta["format_version"] == FORMAT_VERSION == "3.0"
    assert set(meta["tensors"]) == set(pack_contents())
    assert all("parts" not in e for e in meta["tensors"].values())  # they follow from meta
    with PackReader(path) as reader:
        for name, t in tensors.items():
            assert reader.entry_nbytes(name) == t.numel()
        mixed = reader.entries["model.layers.0.mlp.up_proj.weight"]
        assert len(mixed["meta"]["bands"]) == 3 and len(mixed["parts"]) == 19


def _as_legacy(path: Path, out: Path) -> None:
    """``path`` (a 3.0 pack) rewritten as a 1.1 pack: one safetensors entry per part, named
    ``tensor::part``, and the part names in each entry (the format before 3.0)."""
    with PackReader(path) as reader:
        doc = {"format_version": "1.1", "header": reader.header, "tensors": {}}
        tensors = {}
        for name, entry in reader.entries.items():
            doc["tensors"][name] = entry  # the reader lists the parts
            for p in entry["parts"]:
                tensors[f"{name}::{p}"] = reader.part(name, p)
    save_file(tensors, out, metadata={METADATA_KEY: json.dumps(doc)})


def test_a_format_1_pack_is_still_read(tmp_path: Path) -> None:
    path, old = tmp_path / "p.safetensors", tmp_path / "old.safetensors"
    write_pack(path)
    _as_legacy(path, old)
    assert old.stat().st_size > path.stat().st_size + 1000  # the per-part header entries
    with PackReader(path) as new, PackReader(old) as legacy:
        assert legacy.format_version == "1.1" and legacy.names() == new.names()
        assert legacy.payload_nbytes() == new.payload_nbytes() == new.expected_nbytes()
        for name in new.names():
            assert legacy.entry_nbytes(name) == new.entry_nbytes(name)
            assert torch.equal(legacy.decode(name), new.decode(name))
            for p in new.entries[name]["parts"]:
                assert torch.equal(legacy.part(name, p), new.part(name, p))


def test_parts_unaligned_in_the_file_decode_as_in_memory(tmp_path: Path) -> None:
    # two 25-byte runs (sigma, float16 scales, 3-bit codes): the second starts at byte 25 of
    # the data, so its float32 and float16 parts are copied before being viewed
    path = tmp_path / "p.safetensors"
    spec = {"method": "mixed", "bands": [{"rank": 1, "bits": 3}], "group_size": 4}
    encoded = {n: encode_tensor(delta_matrix(5, 7, i), spec) for i, n in enumerate("ab")}
    with PackWriter(path, HEADER) as writer:
        for name, (codec, params, enc) in encoded.items():
            writer.add(name, "mlp", codec, params, (5, 7), "float32", enc)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + n + load_file_header(path)["b"]["data_offsets"][0]) % 4 != 0
    with PackReader(path) as reader:
        for name, (codec, _, enc) in encoded.items():
            expected = get_codec(codec).decode(enc.parts, enc.meta, (5, 7))
            assert torch.equal(reader.decode(name), expected)
            assert torch.equal(reader.part(name, "sigma"), enc.parts["sigma"])


def load_file_header(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def test_a_run_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    write_pack(path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    st = json.loads(raw[8 : 8 + n])
    doc = json.loads(st["__metadata__"][METADATA_KEY])
    doc["tensors"]["model.layers.0.mlp.down_proj.weight"]["meta"]["bands"][0]["rank"] = 39
    tensors = load_file(path)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={METADATA_KEY: json.dumps(doc)})
    with pytest.raises(UserError, match=r"bad\.safetensors: tensor .*down_proj.* stores \d+ bytes"):
        PackReader(bad)


def _forge(path: Path, version: str, **extra: Any) -> None:
    doc = {
        "format_version": version,
        "header": {},
        "tensors": {
            "w": {
                "role": "other",
                "codec": "exact",
                "codec_version": 1,
                "params": {},
                "shape": [2],
                "dtype": "float32",
                "meta": {},
                "parts": ["data"],
            },
        },
        **extra,
    }
    save_file({"w::data": torch.tensor([1.0, 2.0])}, path, metadata={METADATA_KEY: json.dumps(doc)})


def test_refuses_newer_major_version(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    _forge(path, "4.0")  # 2.x is the reference pack (pack step 4), 3.x the stored pack (5)
    match = r"future\.safetensors.*version 4\.0.*1\.x, 2\.x, 3\.x"
    with pytest.raises(UserError, match=match) as info:
        PackReader(path)
    assert info.value.exit_code == 2


def test_a_2x_pack_that_stores_parts_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    _forge(path, "2.0")  # no header.reference, and a stored part
    with pytest.raises(UserError, match=r"odd\.safetensors: corrupt reference SkillPack"):
        PackReader(path)


def test_reads_newer_minor_version(tmp_path: Path) -> None:
    path = tmp_path / "minor.safetensors"
    _forge(path, "1.7", added_in_1_7={"anything": True})
    with PackReader(path) as reader:
        assert reader.format_version == "1.7"
        assert torch.equal(reader.decode("w"), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("plain", "not a SkillPack"),
        ("garbage", "not a readable safetensors"),
        ("missing", "no such SkillPack"),
        ("badversion", "malformed SkillPack format_version"),
        ("missingpart", "lacks parts"),
    ],
)
def test_refuses_what_is_not_a_pack(tmp_path: Path, setup: str, message: str) -> None:
    path = tmp_path / f"{setup}.safetensors"
    if setup == "plain":
        save_file({"w": torch.zeros(2)}, path)
    elif setup == "garbage":
        path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    elif setup == "badversion":
        _forge(path, "one")
    elif setup == "missingpart":
        doc = {"format_version": "1.0", "header": {}, "tensors": {"w": {"parts": ["data"]}}}
        save_file({"x": torch.zeros(1)}, path, metadata={METADATA_KEY: json.dumps(doc)})
    with pytest.raises(UserError, match=message) as info:
        PackReader(path)
    assert str(path) in str(info.value)


def test_unknown_codec_refused_at_decode(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    doc = {
        "format_version": "1.0",
        "header": {},
        "tensors": {
            "w": {
                "role": "other",
                "codec": "fancy",
                "codec_version": 1,
                "params": {},
                "shape": [2],
                "dtype": "float32",
                "meta": {},
                "parts": ["data"],
            }
        },
    }
    save_file({"w::data": torch.zeros(2)}, path, metadata={METADATA_KEY: json.dumps(doc)})
    with PackReader(path) as reader, pytest.raises(UserError, match="'fancy'"):
        reader.decode("w")
    with PackReader(path) as reader, pytest.raises(UserError, match="no tensor 'nope'"):
        reader.decode("nope")


def test_unknown_codec_in_a_3x_pack_is_refused_at_decode_only(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    entry = {"role": "other", "codec_version": 1, "params": {}, "shape": [2], "dtype": "float32"}
    doc = {
        "format_version": "3.1",
        "header": {},
        "tensors": {
            "w": {**entry, "codec": "fancy", "meta": {"new": 1}},
            "v": {**entry, "codec": "exact", "meta": {}},
        },
    }
    exact = torch.tensor([1.0, 2.0]).view(torch.uint8)
    runs = {"w": torch.arange(5, dtype=torch.uint8), "v": exact}
    save_file(runs, path, metadata={METADATA_KEY: json.dumps(doc)})
    with PackReader(path) as reader:
        assert torch.equal(reader.decode("v"), torch.tensor([1.0, 2.0]))
        with pytest.raises(UserError, match="'fancy'"):
            reader.decode("w")


def test_writer_is_atomic_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    with pytest.raises(RuntimeError, match="boom"), PackWriter(path, HEADER) as writer:
        codec, params, enc = encode_tensor(torch.ones(3), {"method": "exact"})
        writer.add("w", "other", codec, params, (3,), "float32", enc)
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    write_pack(path)
    assert os.listdir(tmp_path) == ["p.safetensors"]


def test_writer_rejects_bad_entries(tmp_path: Path) -> None:
    codec, params, enc = encode_tensor(torch.ones(3), {"method": "exact"})
    with PackWriter(tmp_path / "p.safetensors", HEADER) as writer:
        writer.add("w", "other", codec, params, (3,), "float32", enc)
        with pytest.raises(ValueError, match="added twice"):
            writer.add("w", "other", codec, params, (3,), "float32", enc)
        with pytest.raises(ValueError, match="unknown role"):
            writer.add("v", "weird", codec, params, (3,), "float32", enc)
        with pytest.raises(ValueError, match="must be non-empty, not __metadata__"):
            writer.add("a::b", "other", codec, params, (3,), "float32", enc)
        with pytest.raises(ValueError, match="metadata describes"):  # parts the meta disowns
            writer.add("v", "other", codec, params, (4,), "float32", enc)
        with pytest.raises(ValueError, match="unknown compression method"):
            writer.add("v", "other", "zip", params, (3,), "float32", enc)
    with PackReader(tmp_path / "p.safetensors") as reader:
        assert reader.names() == ["w"]


def test_encode_tensor_normalises_and_checks() -> None:
    codec, params, enc = encode_tensor(
        torch.ones(4, 4, dtype=torch.bfloat16), {"method": "prune", "keep": 0.5}
    )
    assert codec == "prune" and params == {"keep": 0.5, "dtype": "float16"}
    assert enc.meta["kept"] == 8
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_tensor(torch.tensor([1.0, float("nan")]), {"method": "exact"})


def test_empty_pack(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    with PackWriter(path, {}) as writer:
        assert writer.close() == path.stat().st_size
    with PackReader(path) as reader:
        assert reader.names() == [] and reader.payload_nbytes() == 0 == reader.expected_nbytes()


def _spec_decoder(path: Path) -> dict[str, np.ndarray]:
    """An independent decoder written from docs/SKILLPACK_FORMAT.md: numpy, json, no graftbuild."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    st_header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    doc = json.loads(st_header["__metadata__"]["graftbuild.skillpack"])
    assert doc["format_version"].split(".")[0] == "3"
    np_dtypes = {"F32": "<f4", "F16": "<f2", "I32": "<i4", "I64": "<i8", "U8": "u1"}
    tags = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32"}
    width = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1}

    def layout(e: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:  # section 4's tables
        shape, meta = e["shape"], e["meta"]
        if e["codec"] == "exact" or meta.get("fallback") == "exact":
            return {"data": ("F32", shape)}
        if e["codec"] == "prune":
            k = meta["kept"]
            index, value = tags[meta["index_dtype"]], tags[meta["dtype"]]
            return {"indices": (index, [k]), "values": (value, [k])}
        if e["codec"] == "lowrank":
            (m, n), k, tag = shape, meta["rank"], tags[meta["dtype"]]
            return {"a": (tag, [m, k]), "b": (tag, [k, n])}
        (m, n), g = shape, meta["group_size"]
        out = {"sigma": ("F32", [sum(b["rank"] for b in meta["bands"])])}
        for i, b in enumerate(meta["bands"]):
            for side, length in (("u", m), ("v", n)):
                groups = -(-length // min(g, length))
                out[f"b{i}.{side}.codes"] = ("U8", [-(-b["rank"] * length * b["bits"] // 8)])
                out[f"b{i}.{side}.scale"] = ("F16", [b["rank"], groups])
                out[f"b{i}.{side}.zero"] = ("F16", [b["rank"], groups])
        return out

    def part(name: str, p: str) -> np.ndarray:
        parts = layout(doc["tensors"][name])
        at = st_header[name]["data_offsets"][0]
        for q in sorted(parts, key=lambda q: (-width[parts[q][0]], q)):  # section 3
            tag, shape = parts[q]
            end = at + width[tag] * int(np.prod(shape))
            if q == p:
                break
            at = end
        if tag == "BF16":  # bfloat16 = the high half of a float32
            bits = np.frombuffer(data[at:end], "<u2").astype(np.uint32) << 16
            return bits.view("<f4").reshape(shape)
        return np.frombuffer(data[at:end], np_dtypes[tag]).reshape(shape)

    def dequant(name: str, prefix: str, rows: int, length: int, bits: int, g: int) -> np.ndarray:
        stream = np.unpackbits(part(name, f"{prefix}.codes"), bitorder="little")
        codes = stream[: rows * length * bits].reshape(-1, bits) @ (1 << np.arange(bits))
        cols = np.arange(length) // g
        scale = part(name, f"{prefix}.scale").astype(np.float32)[:, cols]
        zero = part(name, f"{prefix}.zero").astype(np.float32)[:, cols]
        return zero + codes.reshape(rows, length).astype(np.float32) * scale

    out = {}
    for name, e in doc["tensors"].items():
        shape, meta = e["shape"], e["meta"]
        if e["codec"] == "exact" or meta.get("fallback") == "exact":
            out[name] = part(name, "data").astype(np.float32)
        elif e["codec"] == "prune":
            flat = np.zeros(int(np.prod(shape)), np.float32)
            flat[part(name, "indices")] = part(name, "values").astype(np.float32)
            out[name] = flat.reshape(shape)
        elif e["codec"] == "lowrank":
            a, b = (part(name, p).astype(np.float32) for p in ("a", "b"))
            out[name] = a @ b
        else:
            m, n = shape
            sigma, acc, offset = part(name, "sigma"), np.zeros((m, n), np.float32), 0
            for i, band in enumerate(meta["bands"]):
                r, bits, g = band["rank"], band["bits"], meta["group_size"]
                ut = dequant(name, f"b{i}.u", r, m, bits, min(g, m))
                vt = dequant(name, f"b{i}.v", r, n, bits, min(g, n))
                acc += (ut.T * sigma[offset : offset + r]) @ vt
                offset += r
            out[name] = acc
    return out


def test_the_spec_is_enough_to_decode(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    write_pack(path)
    decoded = _spec_decoder(path)
    with PackReader(path) as reader:
        assert sorted(decoded) == reader.names()
        for name, array in decoded.items():
            torch.testing.assert_close(torch.from_numpy(array), reader.decode(name))
