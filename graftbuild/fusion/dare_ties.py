"""``dare_ties``: DARE (arXiv 2311.03099) with TIES's sign election (arXiv 2306.01708): random
drop, L1 rescale, elect signs by mass, sum of the agreeing.
"""

from __future__ import annotations

from typing import ClassVar

from graftbuild.fusion.schedule import MergeParams
from graftbuild.fusion.task_arithmetic import GeneralizedTaskArithmetic, gta_spec


class DareTiesParams(MergeParams):
    SPEC = gta_spec(normalize=False, rescale=True, extra=())
    RANDOM = True


class DareTiesStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "dare_ties"
    Params = DareTiesParams
    sparsification = "random"
    consensus = True
