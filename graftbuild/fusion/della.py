"""``della``: DELLA-Merging (Deep et al. 2024, arXiv 2406.11617): MagPrune (keep probabilities
rising with magnitude rank, density ± epsilon, seeded), L1 rescale, sign election, normalised
sum.
"""

from __future__ import annotations

from typing import ClassVar

from graftbuild.fusion.schedule import MergeParams, Param
from graftbuild.fusion.task_arithmetic import GeneralizedTaskArithmetic, gta_spec


class DellaParams(MergeParams):
    SPEC = gta_spec(normalize=True, rescale=True, extra=(Param("epsilon", "float", "pack", 0.15),))
    RANDOM = True


class DellaStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "della"
    Params = DellaParams
    sparsification = "della_magprune"
    consensus = True
