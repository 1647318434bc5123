"""Device placement has one owner: steps, readers and model loaders go through ``ctx.placement``.

No GPU here: a fake accelerator placement (it claims to be one, records every tensor and model
it is asked to move, and leaves them on the CPU so the math still runs) shows where the calls go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import engine, make

from graftbuild.cache.hashing import hash_file
from graftbuild.compress.codecs import CODECS
from graftbuild.skillpack import PACK_FILE, PackReader
from graftbuild.steps import STEPS
from graftbuild.steps.base import StepContext
from graftbuild.weights.modeling import load_causal_lm
from graftbuild.weights.placement import Placement, resolve_device


class FakeAccelerator(Placement):
    """Says it is an accelerator; moves nothing; remembers what it was given."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.put_tensors: list[torch.Tensor] = []
        self.hosted = 0
        self.models: list[Any] = []

    @property
    def on_accelerator(self) -> bool:  # type: ignore[override]
        return True

    def put(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = t if dtype is None else t.to(dtype)
        self.put_tensors.append(out)
        return out

    def host(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.hosted += 1
        return super().host(t, dtype)

    def model(self, model: Any) -> Any:
        self.models.append(model)
        return model

    def was_put(self, t: torch.Tensor) -> bool:
        return any(p.data_ptr() == t.data_ptr() and p.shape == t.shape for p in self.put_tensors)


def node_context(recipe: Path, node_id: str, out: Path, placement: Placement | None) -> StepContext:
    """The context the engine would give ``node_id`` (its inputs already built)."""
    e = engine(recipe)
    outputs = {n.id: n.output_hash for n in e.plan()}
    node = e.graph.node(node_id)
    hashes = {r: outputs[d] for r, d in node.deps.items()}
    inputs = {r: e.artifact_path(d, hashes[r]) for r, d in node.deps.items()}
    out.mkdir(parents=True)
    return StepContext(
        node_id, node.config, inputs, hashes, dict(node.files), out, placement_=placement
    )


def test_the_fuse_step_decodes_every_pack_part_on_the_device(
    path_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make(path_project)
    fake = FakeAccelerator()
    decoded: list[str] = []
    for name, codec in list(CODECS.items()):
        original = codec.decode

        def checked(parts, meta, shape, _original=original, _name=name):  # type: ignore[no-untyped-def]
            assert all(fake.was_put(t) for t in parts.values()), f"{_name}: a part stayed behind"
            decoded.append(_name)
            return _original(parts, meta, shape)

        monkeypatch.setattr(codec, "decode", checked)
    ctx = node_context(path_project, "fuse:release", tmp_path / "fake", fake)
    STEPS["fuse"].run(ctx)
    with (
        PackReader(ctx.inputs["pack.0"] / PACK_FILE) as x,
        PackReader(ctx.inputs["pack.1"] / PACK_FILE) as y,
    ):
        assert len(decoded) == len(x.names()) + len(y.names())  # every tensor of both packs
        assert {"lowrank", "mixed", "prune", "exact"} <= set(decoded)
    assert fake.hosted == len(x.names())  # every fused tensor came back to be written
    # the same bytes as the build's own (CPU) fuse
    built = path_project.parent / "out" / "fused" / "release" / "model.safetensors"
    assert hash_file(tmp_path / "fake" / "model.safetensors") == hash_file(built)


def test_the_pack_step_places_base_and_source_tensors(path_project: Path, tmp_path: Path) -> None:
    make(path_project)
    fake = FakeAccelerator()
    ctx = node_context(path_project, "pack:x", tmp_path / "fake", fake)
    STEPS["pack"].run(ctx)
    with PackReader(tmp_path / "fake" / PACK_FILE) as reader:
        n = len(reader.names())
    floats = [t for t in fake.put_tensors if t.dtype == torch.float32]
    assert len(floats) >= 2 * n  # a base and a source tensor for every pack entry
    built = path_project.parent / "out" / "packs" / "x" / PACK_FILE
    assert hash_file(tmp_path / "fake" / PACK_FILE) == hash_file(built)


def test_model_loaders_and_eval_go_through_the_placement(model_folders: Path) -> None:
    fake = FakeAccelerator()
    model = load_causal_lm(model_folders / "base", fake)
    assert fake.models == [model]
    from graftbuild.steps.evaluate import heldout_loss

    fake = FakeAccelerator()
    text = ["the cat sat on the mat and looked at the dog"] * 8
    loss, _ = heldout_loss(model_folders / "base", text, 8, 4, Path("x.txt"), fake)
    assert len(fake.models) == 1 and fake.put_tensors  # the model and every batch
    assert loss == heldout_loss(model_folders / "base", text, 8, 4, Path("x.txt"))[0]


def test_cpu_bytes_do_not_depend_on_how_the_device_is_named(path_project: Path) -> None:
    make(path_project)
    pack = path_project.parent / "out" / "packs" / "x" / PACK_FILE
    with PackReader(pack) as reader:
        for name in reader.names():
            plain = reader.decode(name)
            for where in ("cpu", Placement("cpu"), Placement()):
                assert torch.equal(reader.decode(name, where), plain), (name, where)


def test_cuda_without_a_gpu_falls_back_to_the_cpu_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said: list[str] = []
    assert resolve_device("cuda", said.append) == "cpu"
    assert "no CUDA device" in said[0]
    assert resolve_device("cpu", said.append) == "cpu" and len(said) == 1
    assert Placement("cpu").peak_memory() is None and not Placement().on_accelerator
