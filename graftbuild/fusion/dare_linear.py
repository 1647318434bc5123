"""``dare_linear``: DARE (Yu et al. 2023, arXiv 2311.03099) without sign election: each Δᵢ keeps
each entry with probability `density` (seeded), rescaled to its L1 norm (`rescale`), then a
weighted sum.
"""

from __future__ import annotations

from typing import ClassVar

from graftbuild.fusion.schedule import MergeParams
from graftbuild.fusion.task_arithmetic import GeneralizedTaskArithmetic, gta_spec


class DareLinearParams(MergeParams):
    SPEC = gta_spec(normalize=False, rescale=True, extra=())
    RANDOM = True


class DareLinearStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "dare_linear"
    Params = DareLinearParams
    sparsification = "random"
    consensus = False
