"""Release gates: thresholds on an eval's held-out losses that fail the build when violated.

A gate names a model and a dataset of its ``[[eval]]`` and one or more thresholds:
``max_loss`` (absolute), ``max_increase`` (at most this much above the eval's reference model:
"do not forget general data") and ``min_improvement`` (at least this much below the reference:
"the skill must have been learned"). Gates read only ``metrics.json``; they are checked by
``make`` after the build (exit code 1 when one fails) and by the release step, which refuses to
write a release whose gates fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METRICS_FILE = "metrics.json"
"""What an eval node's object holds: the metrics below, as JSON."""

Metrics = dict[str, dict[str, dict[str, float]]]
"""model id -> dataset -> {"loss", "perplexity", "tokens"} (the eval step's metrics.json)."""


@dataclass(frozen=True)
class GateResult:
    eval: str
    model: str
    data: str
    rule: str
    """"max_loss", "max_increase" or "min_improvement"."""
    threshold: float
    value: float
    """The loss (max_loss) or its difference from the reference (the other two)."""
    reference: str
    passed: bool

    def describe(self) -> str:
        what = {
            "max_loss": f"loss {self.value:.4f} <= {self.threshold:g}",
            "max_increase": f"loss increase vs {self.reference} {self.value:+.4f} <= "
            f"{self.threshold:g}",
            "min_improvement": f"loss improvement vs {self.reference} {self.value:+.4f} >= "
            f"{self.threshold:g}",
        }[self.rule]
        return f"eval:{self.eval} {self.model} on '{self.data}': {what}"

    def to_json(self) -> dict[str, Any]:
        return {
            "eval": self.eval,
            "model": self.model,
            "data": self.data,
            "rule": self.rule,
            "threshold": self.threshold,
            "value": round(self.value, 6),
            "reference": self.reference,
            "passed": self.passed,
        }


def check(
    eval_name: str, gates: list[dict[str, Any]], reference: str, metrics: Metrics
) -> list[GateResult]:
    """Evaluate ``gates`` (GateSpec dumps) against one eval's metrics."""
    out: list[GateResult] = []
    for g in gates:
        loss = metrics[g["model"]][g["data"]]["loss"]
        ref = metrics[reference][g["data"]]["loss"]
        rules = (
            ("max_loss", loss, lambda v, t: v <= t),
            ("max_increase", loss - ref, lambda v, t: v <= t),
            ("min_improvement", ref - loss, lambda v, t: v >= t),
        )
        for rule, value, ok in rules:
            threshold = g.get(rule)
            if threshold is None:
                continue
            out.append(
                GateResult(
                    eval_name,
                    g["model"],
                    g["data"],
                    rule,
                    float(threshold),
                    float(value),
                    reference,
                    bool(ok(value, threshold)),
                )
            )
    return out


def gate_config(spec: Any) -> dict[str, Any]:
    """The part of an EvalSpec that gates depend on, as plain JSON (for node configs)."""
    return {
        "reference": spec.reference,
        "gates": [g.model_dump(mode="json") for g in spec.gates],
    }


def evaluate(engine: Any, result: Any) -> list[GateResult]:
    """Every gate of the evals ``make`` just built or reused, against their metrics."""
    import json

    out: list[GateResult] = []
    for spec in engine.recipe.eval:
        node = next((n for n in result.nodes if n.id == f"eval:{spec.name}"), None)
        if not spec.gates or node is None or node.output_hash is None:
            continue
        folder = engine.store.object_path(node.output_hash)
        metrics = json.loads((folder / METRICS_FILE).read_text())
        cfg = gate_config(spec)
        out += check(spec.name, cfg["gates"], cfg["reference"], metrics)
    return out
