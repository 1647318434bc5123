"""Codec registry: method name -> codec, and parsing of a recipe's compression spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graftbuild.compress.codecs._common import svd_memo
from graftbuild.compress.codecs.base import Codec, CodecParams, Encoded
from graftbuild.compress.codecs.exact import ExactCodec
from graftbuild.compress.codecs.lowrank import LowRankCodec
from graftbuild.compress.codecs.mixed import MixedCodec
from graftbuild.compress.codecs.prune import PruneCodec
from graftbuild.compress.codecs.sparse import SparseCodec
from graftbuild.compress.codecs.zero import ZeroCodec

CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        ExactCodec(), PruneCodec(), LowRankCodec(), MixedCodec(), SparseCodec(), ZeroCodec()
    )
}


def get_codec(method: str) -> Codec:
    """The codec registered as ``method`` (ValueError listing the known methods otherwise)."""
    try:
        return CODECS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown compression method {method!r}; known methods: {', '.join(sorted(CODECS))}"
        ) from None


def parse_spec(spec: Mapping[str, Any]) -> tuple[Codec, CodecParams]:
    """Codec and validated params of a spec like ``{"method": "prune", "keep": 0.1}``.

    Invalid parameters raise pydantic's ``ValidationError`` (a ``ValueError``).
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"a compression spec must be a table, got {type(spec).__name__}")
    if "method" not in spec:
        raise ValueError(
            f"a compression spec needs a 'method' (one of: {', '.join(sorted(CODECS))})"
        )
    codec = get_codec(spec["method"])
    params = codec.Params.model_validate({k: v for k, v in spec.items() if k != "method"})
    return codec, params


__all__ = ["CODECS", "Codec", "CodecParams", "Encoded", "get_codec", "parse_spec", "svd_memo"]
