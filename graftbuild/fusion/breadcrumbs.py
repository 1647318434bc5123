"""``breadcrumbs``: Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): each Δᵢ loses
its `gamma` largest-magnitude outliers and its smallest entries, keeping `density`, then a
weighted sum.
"""

from __future__ import annotations

from typing import ClassVar

from graftbuild.fusion.schedule import MergeParams, Param
from graftbuild.fusion.task_arithmetic import GeneralizedTaskArithmetic, gta_spec


class BreadcrumbsParams(MergeParams):
    SPEC = gta_spec(normalize=False, rescale=False, extra=(Param("gamma", "float", "pack", 0.01),))
    RANDOM = False


class BreadcrumbsStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "breadcrumbs"
    Params = BreadcrumbsParams
    sparsification = "magnitude_outliers"
    consensus = False
