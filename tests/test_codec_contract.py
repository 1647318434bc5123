"""Codecs own their knowledge: a codec written in one module and registered with one line works
everywhere a codec is asked something (recipe validation, pack, budget, fuse, keys, inspect,
model card, PEFT export), and every registered codec answers the whole contract."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from helpers import load_weights, make, plan

from graftbuild.compress import codecs as registry
from graftbuild.compress.codecs import CODECS, CodecParams, Encoded
from graftbuild.compress.codecs.base import FixedRate, RateProfile, describe_entry, label_params
from graftbuild.errors import UserError
from graftbuild.release.card import codec_label
from graftbuild.release.peft import export_peft
from graftbuild.skillpack import PACK_FILE, PackReader
from graftbuild.skillpack.report import pack_report
from graftbuild.weights.tensors import torch_dtype_to_st


class RowInt8Params(CodecParams):
    pass


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    n = shape[-1] if shape else 1
    return (math.prod(shape) // n if n else 0), n


class RowInt8Codec:
    """Per-row symmetric int8: ``codes`` (int8, rows × last dim) and a float32 ``scale`` per
    row; |Δ − Δ̂| ≤ scale / 2 entrywise."""

    name: ClassVar[str] = "rowint8"
    version: ClassVar[int] = 1
    Params: ClassVar[type[CodecParams]] = RowInt8Params
    uses_calibration: ClassVar[bool] = False

    def encode(self, delta: torch.Tensor, params: CodecParams) -> Encoded:
        rows, n = _rows(tuple(delta.shape))
        x = delta.reshape(rows, n).to(torch.float32)
        scale = x.abs().amax(dim=1).clamp(min=1e-30) / 127
        codes = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return Encoded({"codes": codes.contiguous(), "scale": scale.contiguous()}, {})

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        return (parts["codes"].to(torch.float32) * parts["scale"][:, None]).reshape(shape)

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        rows, n = _rows(shape)
        return rows * n + 4 * rows

    def rate(
        self, name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None
    ) -> RateProfile:
        return FixedRate(name, spec, tuple(delta.shape), self.expected_nbytes({}, delta.shape))

    def describe(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {"quantizer": "rowint8"}

    def label(self, params: dict[str, Any]) -> str:
        return label_params(self.name, params) + "@8b"

    def lora_factors(self, reader: Any, name: str, entry: dict[str, Any]) -> str:
        return "rowint8 codes a dense int8 matrix, not a low-rank one"

    def stored_parts(
        self, meta: dict[str, Any], shape: tuple[int, ...]
    ) -> dict[str, tuple[str, list[int]]]:
        rows, n = _rows(shape)
        return {"codes": ("I8", [rows, n]), "scale": ("F32", [rows])}

    def layout(
        self, params: CodecParams, shape: tuple[int, ...]
    ) -> tuple[dict[str, Any], dict[str, tuple[str, list[int]]]]:
        return {}, self.stored_parts({}, shape)


@pytest.fixture
def rowint8(monkeypatch: pytest.MonkeyPatch) -> RowInt8Codec:
    codec = RowInt8Codec()
    monkeypatch.setitem(CODECS, codec.name, codec)  # the one registry line
    return codec


def test_a_new_codec_works_through_pack_fuse_keys_inspect_card_and_export(
    path_project: Path, rowint8: RowInt8Codec
) -> None:
    text = path_project.read_text().replace(
        '[compression.default]\nattn = { method = "lowrank", energy = 0.9 }',
        '[compression.default]\nattn = { method = "lowrank", energy = 0.9 }\nmlp = "rowint8"',
    )
    text += '\n[compression.tight]\nmlp = "rowint8"\nbudget = 0.3\n'
    text = text.replace(
        '[sources.y]\npath = "models/y"\ncompression = "exact"',
        '[sources.y]\npath = "models/y"\ncompression = "tight"',
    )
    path_project.write_text(text)
    result = make(path_project)
    assert {"pack:x", "pack:y", "fuse:release"} <= set(result.built)

    out = path_project.parent / "out"
    models = path_project.parent / "models"
    base, x = load_weights(models / "base"), load_weights(models / "x")
    with PackReader(out / "packs" / "x" / PACK_FILE) as reader:
        mlp = [n for n in reader.names() if ".mlp." in n]
        assert mlp and all(reader.entries[n]["codec"] == "rowint8" for n in mlp)
        for name in mlp:
            delta = x[name].float() - base[name].float()
            scale = delta.abs().amax(dim=-1, keepdim=True) / 127
            assert ((reader.decode(name) - delta).abs() <= scale / 2 + 1e-7).all(), name
    assert plan(path_project)["pack:x"].state == "fresh"

    # the codec's version is part of the pack's key
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RowInt8Codec, "version", 2)
        assert plan(path_project)["pack:x"].reasons == ["codec 'rowint8' changed (version 1 -> 2)"]

    report = pack_report(out / "packs" / "x" / PACK_FILE, models / "base", models / "x")
    rows = {t["name"]: t for t in report["tensors"]}
    assert {rows[n]["codec"] for n in mlp} == {"rowint8"}
    assert {rows[n]["quantizer"] for n in mlp} == {"rowint8"}
    assert all(
        rows[n]["bytes"] == rowint8.expected_nbytes({}, tuple(rows[n]["shape"])) for n in mlp
    )

    assert codec_label("rowint8", {}) == "rowint8@8b"

    # rowint8 has no LoRA factors of its own: the export factors its decoded delta by SVD
    exported = export_peft(out / "packs" / "x" / PACK_FILE, path_project.parent / "adapter")
    for name in mlp:
        assert exported.how[name.removesuffix(".weight")].startswith("SVD of the decoded delta")
    assert not exported.left_out


def test_a_codec_without_a_rate_model_is_refused_under_a_budget(
    path_project: Path, rowint8: RowInt8Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(RowInt8Codec, "rate")
    text = path_project.read_text().replace('mlp = "exact"\n', 'mlp = "rowint8"\nbudget = 0.1\n')
    path_project.write_text(text)
    with pytest.raises(UserError, match=r"codec 'rowint8' has no rate model.*`budget`"):
        make(path_project, ["pack:y"])


CONTRACT = ("encode", "decode", "expected_nbytes", "rate", "describe", "label",
            "lora_factors", "layout", "stored_parts")  # fmt: skip


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_registered_codec_answers_the_whole_contract(name: str) -> None:
    codec = registry.get_codec(name)
    assert codec.name == name and isinstance(codec.version, int)
    assert issubclass(codec.Params, CodecParams)
    assert isinstance(codec.uses_calibration, bool)
    for method in CONTRACT:
        assert callable(getattr(codec, method, None)), f"{name} lacks {method}"
    params = codec.Params.model_validate({"keep": 0.5} if name == "prune" else {})
    delta = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    if name == "zero":  # encodes an all-zero delta only, in no bytes
        delta = torch.zeros(24, 16)
    encoded = codec.encode(delta, params)
    assert codec.decode(encoded.parts, encoded.meta, (24, 16)).shape == (24, 16)
    assert codec.expected_nbytes(encoded.meta, (24, 16)) == encoded.nbytes
    stored = {p: (torch_dtype_to_st(t.dtype), list(t.shape)) for p, t in encoded.parts.items()}
    assert codec.stored_parts(encoded.meta, (24, 16)) == stored  # a 3.0 pack finds them so
    spec = {"method": name, **params.model_dump(mode="json")}
    nbytes, chosen = codec.rate("t", delta, spec, None).choose(1e-3)
    assert (nbytes > 0 or name == "zero") and chosen["method"] == name
    entry = {"codec": name, "shape": [24, 16], "meta": encoded.meta, "params": spec}
    assert describe_entry(codec, entry)["codec"].startswith(name)
    assert codec.label(params.model_dump(mode="json")).startswith(name)
