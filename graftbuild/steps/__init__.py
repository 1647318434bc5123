"""Steps by name: the pure function that builds each kind of node.

Add a node kind: a module here with a class like ``PackStep`` (``name``, ``version``, ``run``),
one line in ``STEPS``, and its node in ``graftbuild/graph.py``.
"""

from __future__ import annotations

from graftbuild.steps.base import Step
from graftbuild.steps.bundle import BundleStep
from graftbuild.steps.dpo import DpoStep
from graftbuild.steps.evaluate import EvalStep
from graftbuild.steps.fuse import FuseStep
from graftbuild.steps.init import InitStep
from graftbuild.steps.pack import PackStep
from graftbuild.steps.release import ReleaseStep
from graftbuild.steps.sft import SftStep
from graftbuild.steps.teach import TeachStep

STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        InitStep(),
        SftStep(),
        TeachStep(),
        DpoStep(),
        PackStep(),
        FuseStep(),
        EvalStep(),
        BundleStep(),
        ReleaseStep(),
    )
}
