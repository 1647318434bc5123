"""Loading a recipe: TOML, validated by the schema, every error located by file and dotted key
(unknown keys get a suggestion)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from graftbuild.cache.hashing import open_regular
from graftbuild.errors import UserError
from graftbuild.recipe.schema import (
    BaseSpec,
    CalibrationSpec,
    CompressionProfile,
    DpoSpec,
    EvalSpec,
    ExportSpec,
    FinetuneSpec,
    FuseSpec,
    GateSpec,
    GenerationSpec,
    LoraSpec,
    ProjectSpec,
    Recipe,
    ReleaseSpec,
    SftSpec,
    SourceSpec,
    TransferSpec,
    suggest,
)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the table at ``loc`` (for suggesting a fix to an unknown key)."""
    children: dict[tuple[type, str], tuple[type, bool]] = {
        # (parent, key) -> (child model, whether a name or index comes between)
        (Recipe, "project"): (ProjectSpec, False),
        (Recipe, "base"): (BaseSpec, False),
        (Recipe, "compression"): (CompressionProfile, True),
        (CompressionProfile, "calibration"): (CalibrationSpec, False),
        (Recipe, "sources"): (SourceSpec, True),
        (Recipe, "fuse"): (FuseSpec, True),
        (Recipe, "eval"): (EvalSpec, True),
        (Recipe, "release"): (ReleaseSpec, True),
        (Recipe, "export"): (ExportSpec, True),
        (EvalSpec, "gates"): (GateSpec, True),
        (SourceSpec, "finetune"): (FinetuneSpec, False),
        (SourceSpec, "transfer"): (TransferSpec, False),
        (TransferSpec, "generation"): (GenerationSpec, False),
        (TransferSpec, "sft"): (SftSpec, False),
        (TransferSpec, "dpo"): (DpoSpec, False),
        (FinetuneSpec, "lora"): (LoraSpec, False),
        (SftSpec, "lora"): (LoraSpec, False),
        (DpoSpec, "lora"): (LoraSpec, False),
        (Recipe, "teachers"): (BaseSpec, True),
        (BaseSpec, "finetune"): (FinetuneSpec, False),
    }
    cls: type = Recipe
    parts = iter(loc)
    for part in parts:
        if (cls, part) not in children:
            return []
        cls, keyed = children[(cls, part)]
        if keyed:
            next(parts, None)
    return [f for f in cls.model_fields if not (cls is Recipe and f == "path")]


def _format_errors(file: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            msg = f"unknown key {key!r}{suggest(key, _fields_at(loc[:-1]))}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if (
                "input" in e
                and e["type"] not in ("missing",)
                and not isinstance(e["input"], dict | list)
            ):
                msg += f" (got {e['input']!r})"
        lines.append(f"{file}: {where}: {msg}")
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0] + more  # one line: the first problem; fixing it shows the next


def _check_numbers(file: Path, data: Any, where: str = "") -> None:
    """Every number of the recipe is finite: TOML allows ``nan`` and ``inf``, and no setting of
    graftbuild has a meaning for them (a NaN fusion weight would silently make a NaN model).
    The one check for all keys, present and future; ranges are each field's own."""
    if isinstance(data, float) and not math.isfinite(data):
        raise UserError(f"{file}: {where}: {data} is not a finite number")
    if isinstance(data, dict):
        for k, v in data.items():
            _check_numbers(file, v, f"{where}.{k}" if where else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _check_numbers(file, v, f"{where}.{i}")


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path).resolve()
    if path.suffix in (".yml", ".yaml"):  # a mergekit config, imported in memory (issue 18)
        from graftbuild.recipe.mergekit import convert

        data: Any = convert(path)
        try:
            recipe = Recipe.model_validate(data, context={"root": path.parent})
        except ValidationError as e:
            raise UserError(_format_errors(path, e)) from None
        recipe.path = path
        return recipe
    try:
        with open(open_regular(path), encoding="utf-8") as f:  # a FIFO is refused, not read
            data = tomllib.loads(f.read())
    except FileNotFoundError:
        hint = ""
        if path.name == "graftbuild.toml":  # the default: no recipe was named
            hint = " (the default recipe; name yours as the first argument)"
        raise UserError(f"recipe not found: {path}{hint}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; give the recipe's .toml file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid TOML: nested too deep") from None
    if not data:
        raise UserError(
            f"{path}: the recipe is empty; declare [project], [base] and at least one "
            "[sources.NAME] (see README.md, Recipe reference)"
        )
    try:
        _check_numbers(path, data)
    except RecursionError:
        raise UserError(f"{path}: invalid TOML: nested too deep") from None
    try:
        links: dict[str, str] = {}
        recipe = Recipe.model_validate(data, context={"root": path.parent, "links": links})
    except ValidationError as e:
        raise UserError(_format_errors(path, e)) from None
    recipe.path = path
    recipe._links = links
    return recipe
