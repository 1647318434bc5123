"""``[RECIPE] [TARGET...]``: how every command reads its positional arguments (shared by the
fast path, which must import nothing heavy, and the click commands)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_RECIPE = "graftbuild.toml"


def split_args(args: tuple[str, ...] | list[str]) -> tuple[Path, list[str]]:
    """The first argument is the recipe if it looks like one; the rest are targets."""
    if args and (args[0].endswith(".toml") or Path(args[0]).is_file()):
        return Path(args[0]), list(args[1:])
    return Path(DEFAULT_RECIPE), list(args)
