"""Inference-time use of a routed bundle: ``GraftedModel`` (base + packs switched in place), the
router, and the bundle folder format."""

from graftbuild.runtime.grafted import GraftedModel

__all__ = ["GraftedModel"]
