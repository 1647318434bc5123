"""mergekit-style merge parameters: values, gradients over layers, name filters, per-pack values.

A setting is one of (mergekit's syntax, in TOML or YAML):

- a scalar: ``0.5``, ``true``, ``"x"``;
- a gradient: a list of scalars. For a tensor of layer ``i`` of ``N`` (``t = i / (N - 1)``,
  tensors outside the layers ``t = 0``) numbers are interpolated linearly between the list's
  points; booleans and strings pick ``values[int(t · (len - 1))]``;
- a list of ``{ filter = "mlp", value = ... }``: the first entry whose filter is a substring of
  the tensor's name (or that has no filter, or ``"*"``) gives the value, itself a scalar or a
  gradient; no match falls through to the next scope.

A parameter is looked up in the pack's own settings first (``[fuse.pack_options.NAME]``), then
in the fuse's ``options`` (a global value also serves as every pack's default), then the method's
default. ``shared`` parameters (``normalize``, ``lambda``…) are read from ``options`` only, as
mergekit does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ConfigDict, model_validator

from graftbuild.errors import UserError
from graftbuild.fusion.base import StrategyParams

if TYPE_CHECKING:
    import torch

Kind = Literal["float", "int", "bool", "str"]
Scope = Literal["shared", "pack", "input"]
"""``shared``: one value per tensor; ``pack``: one per pack (mergekit's non-base inputs);
``input``: one per input model (the same in graftbuild, where the base is never an input of
those methods)."""

DTYPES = ("float32", "float16", "bfloat16")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    scope: Scope
    default: Any = None
    required: bool = False


def _scalar_ok(v: Any, kind: Kind) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if isinstance(v, bool):
        return False
    if kind == "int":
        return isinstance(v, int)
    return isinstance(v, int | float)


def check_setting(name: str, value: Any, kind: Kind) -> None:
    """Raise ValueError unless ``value`` is a valid setting of a ``kind`` parameter."""
    if _scalar_ok(value, kind):
        return
    if isinstance(value, list) and value:
        if all(not isinstance(e, dict) for e in value):
            if not all(_scalar_ok(e, kind) for e in value):
                raise ValueError(f"{name}: every point of the gradient must be a {kind}")
            return
        if isinstance(value, list) and all(isinstance(e, dict) for e in value):
            for e in value:
                extra = sorted(set(e) - {"filter", "value"})
                if extra or "value" not in e:
                    raise ValueError(
                        f"{name}: a filtered value is {{ filter = ..., value = ... }}"
                        + (f"; unknown keys {extra}" if extra else "; `value` is missing")
                    )
                if e.get("filter") is not None and not isinstance(e["filter"], str):
                    raise ValueError(f"{name}: `filter` must be a string")
                if isinstance(e["value"], list) and any(isinstance(x, dict) for x in e["value"]):
                    raise ValueError(f"{name}: a filtered value cannot hold filters")
                check_setting(name, e["value"], kind)
            return
    if isinstance(value, dict):
        check_setting(name, [value], kind)
        return
    raise ValueError(
        f"{name}: expected a {kind}, a list of them (a gradient over layers) or a list of "
        f"{{ filter, value }} tables (got {value!r})"
    )


def evaluate(value: Any, tensor_name: str, t: float, kind: Kind) -> Any:
    """A setting's value for one tensor at layer position ``t`` (None: no filter matched)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return float(value) if kind == "float" else value
    if not value:
        return None
    if all(not isinstance(e, dict) for e in value):
        if kind in ("bool", "str"):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        out = (1 - frac) * value[i0] + frac * value[i1]
        return int(out) if kind == "int" else float(out)
    for e in value:
        f = e.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(e["value"], tensor_name, t, kind)
    return None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's ``t``: ``i / (N - 1)`` for layer ``i`` (1 when N = 1); 0 outside the layers."""
    m = _LAYER.search(tensor_name)
    if m is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(m.group(1)) / (num_layers - 1)


def num_layers_of(config: dict[str, Any]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    text = config.get("text_config")
    return num_layers_of(text) if isinstance(text, dict) else 0


class MergeParams(StrategyParams):
    """Options of a mergekit-style strategy: its parameters by mergekit's names (each a
    setting, above), checked against ``SPEC``; ``seed`` for random methods; ``dtype``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    SPEC: ClassVar[tuple[Param, ...]] = ()
    RANDOM: ClassVar[bool] = False

    @model_validator(mode="after")
    def _check(self) -> MergeParams:
        known = {p.name: p for p in self.SPEC}
        for key, value in (self.model_extra or {}).items():
            if key == "seed":
                if not self.RANDOM:
                    raise ValueError("unknown option 'seed': this method is not random")
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"seed: expected an integer (got {value!r})")
                continue
            if key in ("dtype", "out_dtype"):
                if value not in DTYPES:
                    raise ValueError(f"{key}: expected one of {list(DTYPES)} (got {value!r})")
                continue
            if key not in known:
                names = sorted([*known, *(["seed"] if self.RANDOM else []), "dtype", "out_dtype"])
                raise ValueError(f"unknown option {key!r}; this method takes {names}")
            check_setting(key, value, known[key].kind)
        for p in self.SPEC:
            if p.required and p.scope == "shared" and p.name not in (self.model_extra or {}):
                raise ValueError(f"`{p.name}` is required")
        return self

    def setting(self, name: str) -> Any:
        return (self.model_extra or {}).get(name)


def check_pack_options(params_cls: type[MergeParams], pack: str, opts: dict[str, Any]) -> None:
    """Per-pack settings may only set per-pack (``pack``/``input``) parameters."""
    known = {p.name: p for p in params_cls.SPEC}
    for key, value in opts.items():
        p = known.get(key)
        if p is None:
            names = sorted(n for n, q in known.items() if q.scope != "shared")
            raise ValueError(f"pack_options.{pack}: unknown parameter {key!r}; per pack: {names}")
        if p.scope == "shared":
            raise ValueError(
                f"pack_options.{pack}.{key}: {key!r} is one value for all packs; set it in "
                "`options`"
            )
        check_setting(f"pack_options.{pack}.{key}", value, p.kind)


@dataclass
class Bound:
    """A strategy's options bound to one fuse: its packs' own settings and the layer count."""

    params: MergeParams
    packs: list[dict[str, Any]]
    num_layers: int
    weights: list[float] = field(default_factory=list)
    t: dict[str, float] | None = None
    """Gradient positions by tensor name, where they are not the tensor's layer (slices)."""

    def _lookup(self, p: Param, scopes: list[dict[str, Any] | None], name: str, t: float) -> Any:
        for scope in scopes:
            if scope is not None and p.name in scope:
                v = evaluate(scope[p.name], name, t, p.kind)
                if v is not None:
                    return v
        return None

    def resolve(self, tensor_name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(shared values, one dict of per-pack values per pack) for one tensor."""
        if self.t is not None and tensor_name in self.t:
            t = self.t[tensor_name]
        else:
            t = layer_position(tensor_name, self.num_layers)
        glob = self.params.model_extra or {}
        shared: dict[str, Any] = {}
        per: list[dict[str, Any]] = [{} for _ in self.packs]
        for p in self.params.SPEC:
            if p.scope == "shared":
                v = self._lookup(p, [glob], tensor_name, t)
                if v is None and p.required:
                    raise UserError(
                        f"parameter {p.name!r}: no value (no filter matched) for "
                        f"tensor {tensor_name}"
                    )
                shared[p.name] = p.default if v is None else v
                continue
            for i, own in enumerate(self.packs):
                v = self._lookup(p, [own, glob], tensor_name, t)
                if v is None and p.name == "weight" and self.weights:
                    v = self.weights[i]  # the fuse's `weights` table (default 1.0)
                if v is None and p.required:
                    raise UserError(f"parameter {p.name!r}: no value for tensor {tensor_name}")
                per[i][p.name] = p.default if v is None else v
        return shared, per

    @property
    def seed(self) -> int:
        return int((self.params.model_extra or {}).get("seed", 0))


def tensor_seed(seed: int, tensor_name: str, pack_index: int) -> int:
    """A 63-bit seed from the recipe seed, the tensor name and the pack's position: the same
    bytes whatever order tensors are visited in."""
    import xxhash

    return xxhash.xxh3_64_intdigest(f"mk\0{seed}\0{pack_index}\0{tensor_name}".encode()) >> 1


def generator(seed: int, tensor_name: str, pack_index: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(tensor_seed(seed, tensor_name, pack_index))
