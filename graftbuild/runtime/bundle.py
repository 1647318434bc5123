"""The routed bundle folder: what a ``strategy = "routed"`` fuse writes and ``GraftedModel`` loads.

Layout (``bundle.json`` describes it)::

    bundle.json            {"format": "graftbuild.bundle", "version": 2, "base", "packs", "router"}
    base/                  the base model folder (config, tokenizer, safetensors weights)
    packs/NAME.safetensors each pack's SkillPack file, unchanged
    router.safetensors     the router's tensors (graftbuild/runtime/router.py)
    mixes/x+y.safetensors  a mix fused by a strategy other than ``sum``: its float32 delta per
                           tensor (``mixes`` in bundle.json; GraftedModel switches it in whole)

Version 2 added the router's options (no pack, packs, mixes), the domain -> option ``choice``
and the losses it was chosen by; a version 1 bundle still loads (each class its own option).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graftbuild.errors import UserError

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "graftbuild.bundle"
BUNDLE_VERSION = 2
READABLE_VERSIONS = (1, 2)


def write_bundle(
    folder: Path,
    packs: list[dict[str, Any]],
    router: dict[str, Any],
    mixes: list[dict[str, Any]] | None = None,
) -> None:
    """``bundle.json`` for a folder holding ``base/``, the pack files and the router's files."""
    doc = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "base": "base",
        "packs": packs,
        "router": router,
    }
    if mixes:
        doc["mixes"] = mixes
    (folder / BUNDLE_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_bundle(folder: Path) -> dict[str, Any]:
    """The bundle description of ``folder`` (a UserError when it is not a bundle we can read)."""
    try:
        doc = json.loads((folder / BUNDLE_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: not a graftbuild bundle (no {BUNDLE_FILE})") from None
    except ValueError as e:
        raise UserError(f"{folder / BUNDLE_FILE}: not valid JSON ({e})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != BUNDLE_FORMAT
        or doc.get("version") not in READABLE_VERSIONS
    ):
        raise UserError(f"{folder / BUNDLE_FILE}: unsupported bundle format or version")
    return doc


class StoredDelta:
    """A stored mix (``mixes/NAME.safetensors``): read like a pack (``names``, ``decode``)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._f = safe_open(str(path), framework="pt")
        self.header: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self._f.keys())

    def decode(self, name: str, device: str = "cpu") -> Any:
        return self._f.get_tensor(name).float().to(device)

    def close(self) -> None:
        self._f = None
