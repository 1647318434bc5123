"""The codec contract.

A codec turns one float32 delta tensor into a handful of named *parts* (plain tensors stored in
the SkillPack file) plus JSON-able metadata, and back. Codecs are pure: the same delta and params
give the same bytes. Modules here import torch inside functions, not at import time: the
recipe validates codec parameters while planning, and a no-op plan must not pay for torch.
Each codec lives in one module of this package and is registered by name
in ``graftbuild/compress/codecs/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # torch is imported lazily so that planning a build never loads it
    import torch


class CodecParams(BaseModel):
    """Base class of a codec's parameters (strict: unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Encoded:
    """One tensor's encoding: named parts (stored as-is) and metadata needed to decode."""

    parts: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


class Codec(Protocol):
    """What every codec module provides (see exact.py for the smallest one)."""

    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type[CodecParams]]
    uses_calibration: ClassVar[bool]
    """``encode`` takes ``calibration=`` (statistics of the module's input, for GPTQ)."""

    def encode(self, delta: torch.Tensor, params: CodecParams) -> Encoded:
        """Encode a float32 delta (any shape). Parts may share memory with ``delta`` (``exact``
        stores it as is), so callers must not modify ``delta`` once it is encoded."""
        ...

    def decode(
        self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Reconstruct the float32 delta of ``shape`` from the stored parts and metadata."""
        ...

    def expected_nbytes(self, meta: dict[str, Any], shape: tuple[int, ...]) -> int:
        """Payload size computed from the encoding's ranks, bits and kept entries alone."""
        ...

    def rate(
        self, name: str, delta: torch.Tensor, spec: dict[str, Any], weight: torch.Tensor | None
    ) -> RateProfile:
        """The budget allocator's view of one float32 delta under ``spec``
        (compress/budget.py). ``weight``: the module's input second moment (n × n), per-row
        weights (m), or None for plain Frobenius error."""
        ...

    def describe(self, entry: dict[str, Any]) -> dict[str, Any]:
        """``rank``, ``bands``, ``keep`` (and ``quantizer``) of one pack entry, for ``inspect``
        (``describe_entry`` handles the exact fallback every codec shares)."""
        ...

    def label(self, params: dict[str, Any]) -> str:
        """The codec with its parameters in a few characters, for model cards."""
        ...

    def lora_factors(
        self, reader: Any, name: str, entry: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor] | str:
        """``(lora_A [k, n], lora_B [m, k])`` of a 2-D entry such that B·A is its delta, or why
        it has none (``graftbuild export peft``). ``reader`` is the pack's reader."""
        ...

    def stored_parts(
        self, meta: dict[str, Any], shape: tuple[int, ...]
    ) -> dict[str, tuple[str, list[int]]]:
        """part -> (safetensors dtype, shape) of an encoding with ``meta`` of a delta of
        ``shape``: what ``encode`` returns, known from the metadata alone. A stored pack keeps
        one tensor's parts in one byte run and finds each part from this (SkillPack 3.0)."""
        ...

    def layout(
        self, params: CodecParams, shape: tuple[int, ...]
    ) -> tuple[dict[str, Any], dict[str, tuple[str, list[int]]]] | None:
        """(meta, part -> (safetensors dtype, shape)) of any delta of ``shape`` when they follow
        from the shape alone, so the pack writer can write the header first; else None."""
        ...


class RateProfile:
    """What the budget allocator knows of one tensor under its codec (no copy of the tensor).

    ``choose(lam)`` gives (bytes, codec spec) minimising ``error + lam · bytes``, errors being
    shares of the tensor's own (weighted) energy."""

    def __init__(self, name: str, spec: dict[str, Any], shape: tuple[int, ...]) -> None:
        self.name, self.spec, self.shape = name, spec, shape

    def choose(self, lam: float) -> tuple[int, dict[str, Any]]:
        nbytes, _, spec = self.point(lam)
        return nbytes, spec

    def point(self, lam: float) -> tuple[int, float, dict[str, Any]]:
        """(bytes, error, codec spec) minimising ``error + lam · bytes``: the error lets the
        allocator compare codecs on one tensor and weigh tensors by their effect on the loss."""
        raise TypeError(f"{type(self).__name__} does not define point()")


class FixedRate(RateProfile):
    """A tensor whose size the allocator cannot change (stored exactly)."""

    def __init__(self, name: str, spec: dict[str, Any], shape: tuple[int, ...], nbytes: int):
        super().__init__(name, spec, shape)
        self.nbytes = nbytes

    def point(self, lam: float) -> tuple[int, float, dict[str, Any]]:
        return self.nbytes, 0.0, self.spec


class DiscreteRate(RateProfile):
    """A tensor offering a list of candidate encodings, candidate i costing ``cost[i]`` bytes and
    leaving ``err[i]`` error (``at(i)``: its bytes and spec). Besides the λ choice, the
    allocator spends what λ leaves unspent on the candidate steps that remove the most error
    per byte (compress/budget.py)."""

    cost: torch.Tensor
    err: torch.Tensor

    def index(self, lam: float) -> int:
        import numpy as np

        # numpy copies, refreshed when err is replaced (the allocator weighs it): called
        # thousands of times per tensor, where torch's per-call overhead dominated
        cached = getattr(self, "_np", None)
        if cached is None or cached[0] is not self.err:
            cached = (self.err, self.err.double().numpy(), self.cost.double().numpy())
            self._np = cached
        return int(np.argmin(cached[1] + lam * cached[2]))

    def point(self, lam: float) -> tuple[int, float, dict[str, Any]]:
        i = self.index(lam)
        nbytes, spec = self.at(i)
        return nbytes, float(self.err[i]), spec

    def at(self, index: int) -> tuple[int, dict[str, Any]]:
        raise TypeError(f"{type(self).__name__} does not define at()")


def label_params(codec: str, params: dict[str, Any]) -> str:
    """``codec(k=v, ...)`` of the scalar parameters that are set, sorted by name."""
    shown = {
        k: v for k, v in sorted(params.items()) if v is not None and not isinstance(v, dict | list)
    }
    inner = ", ".join(f"{k}={v}" for k, v in shown.items())
    return f"{codec}({inner})" if inner else codec


def describe_entry(codec: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """What ``inspect`` shows of one pack entry: the codec's own description, or, for a tensor
    its codec stored exactly (``meta["fallback"]``), ``codec→exact``."""
    out: dict[str, Any] = {"rank": None, "bands": None, "keep": None}
    if entry.get("meta", {}).get("fallback") == "exact":
        return out | {"codec": f"{entry['codec']}→exact"}
    return out | {"codec": entry["codec"]} | codec.describe(entry)
