"""Node kinds by step name: each module holds one Step, its ``nodes(recipe, out)`` factory and its
pure ``run(ctx)`` (the contract: ``steps/base.py``).

Add a node kind: a module here with a Step class, and one line in ``STEPS``. Planning asks every
step for its nodes; the engine runs a node's step by name.
"""

from __future__ import annotations

from graftbuild.steps.base import Step
from graftbuild.steps.bundle import BundleStep
from graftbuild.steps.dpo import DpoStep
from graftbuild.steps.evaluate import EvalStep
from graftbuild.steps.export import ExportStep
from graftbuild.steps.fuse import FuseStep
from graftbuild.steps.init import InitStep
from graftbuild.steps.input import InputStep
from graftbuild.steps.pack import PackStep
from graftbuild.steps.release import ReleaseStep
from graftbuild.steps.sft import SftStep
from graftbuild.steps.teach import TeachStep

STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        InputStep(),
        InitStep(),
        SftStep(),
        TeachStep(),
        DpoStep(),
        PackStep(),
        FuseStep(),
        BundleStep(),
        EvalStep(),
        ReleaseStep(),
        ExportStep(),
    )
}
