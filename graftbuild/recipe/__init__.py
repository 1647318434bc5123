"""The recipe: its pydantic schema (``schema``), loading with error locations (``load``) and the
names of the nodes it declares (``ids``, the one place node ids are spelled)."""

from graftbuild.recipe.load import load_recipe
from graftbuild.recipe.schema import (
    BaseSpec,
    CalibrationSpec,
    CompressionProfile,
    DpoSpec,
    EvalSpec,
    ExportSpec,
    FinetuneSpec,
    FuseSpec,
    GateSpec,
    GenerationSpec,
    LoraSpec,
    ProjectSpec,
    Recipe,
    ReleaseSpec,
    SftSpec,
    SourceSpec,
    TrainSpec,
    TransferSpec,
)

__all__ = [
    "BaseSpec",
    "CalibrationSpec",
    "CompressionProfile",
    "DpoSpec",
    "EvalSpec",
    "ExportSpec",
    "FinetuneSpec",
    "FuseSpec",
    "GateSpec",
    "GenerationSpec",
    "LoraSpec",
    "ProjectSpec",
    "Recipe",
    "ReleaseSpec",
    "SftSpec",
    "SourceSpec",
    "TrainSpec",
    "TransferSpec",
    "load_recipe",
]
