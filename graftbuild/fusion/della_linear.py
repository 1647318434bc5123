"""``della_linear``: DELLA's MagPrune (arXiv 2406.11617) without sign election: a weighted sum of
the pruned deltas.
"""

from __future__ import annotations

from typing import ClassVar

from graftbuild.fusion.schedule import MergeParams, Param
from graftbuild.fusion.task_arithmetic import GeneralizedTaskArithmetic, gta_spec


class DellaLinearParams(MergeParams):
    SPEC = gta_spec(normalize=False, rescale=True, extra=(Param("epsilon", "float", "pack", 0.15),))
    RANDOM = True


class DellaLinearStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "della_linear"
    Params = DellaLinearParams
    sparsification = "della_magprune"
    consensus = False
