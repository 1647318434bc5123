"""``breadcrumbs_ties``: Model Breadcrumbs (arXiv 2312.06795) with TIES's sign election."""

from __future__ import annotations

from typing import ClassVar

from graftbuild.fusion.schedule import MergeParams, Param
from graftbuild.fusion.task_arithmetic import GeneralizedTaskArithmetic, gta_spec


class BreadcrumbsTiesParams(MergeParams):
    SPEC = gta_spec(normalize=False, rescale=False, extra=(Param("gamma", "float", "pack", 0.01),))
    RANDOM = False


class BreadcrumbsTiesStrategy(GeneralizedTaskArithmetic):
    name: ClassVar[str] = "breadcrumbs_ties"
    Params = BreadcrumbsTiesParams
    sparsification = "magnitude_outliers"
    consensus = True
