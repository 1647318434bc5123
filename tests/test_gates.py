"""Gate arithmetic: each rule against the eval's reference model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from graftbuild.release.gates import check

loss = st.floats(min_value=0.0, max_value=20.0, allow_nan=False)
threshold = st.floats(min_value=-5.0, max_value=5.0, allow_nan=False)


def metrics(base: float, fused: float) -> dict:
    return {
        "base": {"general": {"loss": base, "perplexity": 1.0, "tokens": 10}},
        "fuse:r": {"general": {"loss": fused, "perplexity": 1.0, "tokens": 10}},
    }


@given(base=loss, fused=loss, t=threshold)
def test_rules(base: float, fused: float, t: float) -> None:
    gates = [
        {"model": "fuse:r", "data": "general", "max_loss": abs(t)},
        {"model": "fuse:r", "data": "general", "max_increase": abs(t), "min_improvement": t},
    ]
    results = check("e", gates, "base", metrics(base, fused))
    assert [(g.rule, g.passed) for g in results] == [
        ("max_loss", fused <= abs(t)),
        ("max_increase", fused - base <= abs(t)),
        ("min_improvement", base - fused >= t),
    ]
    assert all(g.reference == "base" and g.eval == "e" for g in results)


def test_describe_names_model_data_and_threshold() -> None:
    (g,) = check(
        "skills",
        [{"model": "fuse:r", "data": "general", "max_increase": 0.05}],
        "base",
        metrics(2.0, 2.3),
    )
    assert not g.passed and round(g.value, 6) == 0.3
    assert g.describe() == (
        "eval:skills fuse:r on 'general': loss increase vs base +0.3000 <= 0.05"
    )
