"""The built-in compression profile: GraftLLM's module-aware defaults.

A recipe's ``[compression.NAME]`` table starts from these settings and overrides roles one by
one, so spelling out a default changes nothing (and does not change any key).
"""

from __future__ import annotations

from typing import Any

DEFAULT_PROFILE: dict[str, dict[str, Any]] = {
    "embed": {"method": "prune", "keep": 0.1},
    "head": {"method": "prune", "keep": 0.1},
    "attn": {"method": "lowrank", "energy": 0.9},
    "mlp": {
        "method": "mixed",
        "bands": [
            {"fraction": 0.01, "bits": 8},
            {"fraction": 0.05, "bits": 4},
            {"fraction": 0.30, "bits": 2},
        ],
    },
    # a router gate is a few rows that decide where every token goes: stored exactly
    "router": {"method": "exact"},
    "norm": {"method": "exact"},
    "other": {"method": "exact"},
}
