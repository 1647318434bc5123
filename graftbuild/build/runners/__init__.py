"""Runners by name (``make --executor NAME``): they build what the engine hands them.

Add a runner: a module here with a class like ``LocalRunner`` (``open``, ``full``, ``submit``,
``wait``, ``cancel``, ``close``; the contract is ``base.Runner``) and one line in ``RUNNERS``.
Options a runner takes (``--address``) are its constructor's keyword arguments.
"""

from __future__ import annotations

import inspect
from typing import Any

from graftbuild.build.runners.base import Job, Outcome, Runner
from graftbuild.build.runners.dry import DryRunner
from graftbuild.build.runners.local import LocalRunner
from graftbuild.build.runners.ray import RayRunner
from graftbuild.errors import UserError

RUNNERS: dict[str, type] = {"local": LocalRunner, "ray": RayRunner}
"""What ``--executor`` offers (the dry runner is ``plan``'s)."""


def make_runner(name: str, **options: Any) -> Runner:
    """The runner ``name`` with the options the user gave (None: not given)."""
    cls = RUNNERS[name]
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(given) - _options(cls))
    if wrong:
        flags = ", ".join(f"--{w.replace('_', '-')}" for w in wrong)
        users = [n for n, c in RUNNERS.items() if set(wrong) <= _options(c)]
        where = f"--executor {' or '.join(sorted(users))}" if users else "no executor"
        raise UserError(f"{flags}: an option of {where}, not of --executor {name}")
    return cls(**given)


def _options(cls: type) -> set[str]:
    return set(inspect.signature(cls).parameters)


__all__ = [
    "RUNNERS",
    "DryRunner",
    "Job",
    "LocalRunner",
    "Outcome",
    "RayRunner",
    "Runner",
    "make_runner",
]
