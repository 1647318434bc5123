"""Checks on where a build writes, made before anything is built.

Names (of sources, fuses, evals) become folder names under the output folder, so they may not
hold a path separator or be ``.``/``..``: a recipe cannot write outside the folders it names.

An output folder must not be, contain or sit inside one of the build's inputs (the recipe, a
model folder, a data file), the cache, or another output: materialising it would overwrite what
the build reads or what it has cached. Output and cache folders must be writable, checked up
front so that a long build does not fail at its last step.
"""

from __future__ import annotations

import os
from pathlib import Path

from graftbuild.build.graph import BuildGraph, Node
from graftbuild.errors import UserError


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _inputs(graph: BuildGraph) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    if graph.recipe.path is not None:
        found.append(("the recipe", graph.recipe.path))
    for n in graph.order():
        if n.path is not None:
            found.append((f"the input folder of {n.id}", n.path))
        found += [(f"the {role} file of {n.id}", p) for role, p in n.files.items()]
    return [(what, p.resolve()) for what, p in found]


def check_overlaps(graph: BuildGraph, cache: Path) -> None:
    """UserError if a name cannot be a folder name, or an output folder overlaps an input, the
    cache or another output."""
    where = graph.recipe.path
    for n in graph.order():
        if n.kind != "base" and (n.name in ("", ".", "..") or any(c in n.name for c in "/\\\0")):
            raise UserError(
                f"{where}: {n.kind} name {n.name!r} cannot be used as a folder name "
                "(no '/', '\\', '.' or '..')"
            )
        if len(n.name.encode()) > MAX_NAME:
            raise UserError(
                f"{where}: {n.kind} name {n.name[:40]!r}... is {len(n.name.encode())} bytes long; "
                f"names become folder and file names, at most {MAX_NAME} bytes"
            )
    cache = cache.resolve()
    for what, p in _inputs(graph):
        if _overlap(cache, p):
            raise UserError(
                f"{where}: the cache folder ({cache}) overlaps {what} ({p}); the cache would "
                "change the input it is built from: put the cache outside the build's inputs"
            )
    outputs = [(n.id, n.output.resolve()) for n in graph.order() if n.output is not None]
    inputs = _inputs(graph)
    for node_id, out in outputs:
        for what, p in inputs:
            if _overlap(out, p):
                raise UserError(
                    f"{where}: the output of {node_id} ({out}) overlaps {what} ({p}); "
                    "choose an output path outside the build's inputs"
                )
        if _overlap(out, cache):
            raise UserError(
                f"{where}: the output of {node_id} ({out}) overlaps the cache folder ({cache}); "
                "choose an output path outside the cache"
            )
    for node_id, out in outputs:
        _check_path_length(where, node_id, out)
    for i, (node_id, out) in enumerate(outputs):
        for other, p in outputs[i + 1 :]:
            if _overlap(out, p):
                raise UserError(
                    f"{where}: the outputs of {node_id} ({out}) and {other} ({p}) overlap; "
                    "give each an output folder of its own"
                )


MAX_NAME = 128
"""Longest node name, in bytes: it becomes a folder name, and with a prefix and a suffix the
names of staging folders, so it must stay well under the file system's 255."""
SPARE = 64  # what materialising adds to an output folder's name (".NAME.graftbuild-tmp-XXXX")


def _check_path_length(where: object, node_id: str, out: Path) -> None:
    """UserError unless every component of an output path, plus the suffix of the staging
    folder assembled beside it, fits the file system's limits: refused before anything is
    built, not after hours of packing."""
    try:
        name_max = os.pathconf(_existing(out), "PC_NAME_MAX")
        path_max = os.pathconf(_existing(out), "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in out.parts:
        if len(part.encode()) + SPARE > name_max:
            raise UserError(
                f"{where}: the output of {node_id}: folder name {part[:40]!r}... is "
                f"{len(part.encode())} bytes; at most {name_max - SPARE} fit this file system"
            )
    if len(str(out).encode()) + SPARE + 256 > path_max:
        raise UserError(
            f"{where}: the output path of {node_id} is {len(str(out).encode())} bytes long; "
            f"at most {path_max - SPARE - 256} fit this file system"
        )


def _existing(path: Path) -> Path:
    while path != path.parent:
        try:
            os.stat(path)
            return path
        except OSError:  # missing, or a name too long to exist
            path = path.parent
    return path


def check_writable(nodes: list[Node], cache: Path) -> None:
    """UserError if an output folder (or the cache) cannot be created or written."""
    for what, folder in [("cache folder", cache / "tmp")] + [
        (f"output folder of {n.id}", n.output.parent) for n in nodes if n.output is not None
    ]:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"cannot create the {what} {folder}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"the {what} {folder} is not writable (no write permission on {existing})"
            )
