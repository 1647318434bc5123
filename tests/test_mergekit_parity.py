"""Parity with mergekit 0.1.5 on tiny Llama models: every mergekit-named method and mergekit's
example configs, merged by both tools from the same YAML (tests/mergekit_oracle.py).

mergekit runs from its own venv (never a dependency). Without it these tests skip, except in CI
(``CI`` set), where a missing oracle is a failure: .ci/run creates the venv.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import mergekit_oracle as oracle

if not oracle.MERGEKIT_PY.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs the mergekit oracle at {oracle.MERGEKIT_VENV} (.ci/run)")
    pytest.skip(f"no mergekit venv at {oracle.MERGEKIT_VENV}", allow_module_level=True)

METHODS = [
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "nuslerp",
    "multislerp", "karcher", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
    "model_stock", "nearswap", "arcee_fusion", "passthrough",
]  # fmt: skip
EXAMPLES = ["example-linear", "example-ties", "example-bio-merge", "example-gradient-slerp"]
STACKS = ["stack-passthrough", "stack-slerp"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, Path]]:
    """Every config merged by mergekit (one process) and built by graftbuild (one cache)."""
    work = tmp_path_factory.mktemp("mergekit")
    models = oracle.make_models(work / "models")
    configs = oracle.cases(models) | oracle.stacks(models) | oracle.examples(models)
    paths = oracle.write_configs(work / "configs", configs)
    oracle.run_mergekit([(p, work / "mk" / n) for n, p in paths.items()])
    ours = {n: oracle.graftbuild_build(p, work / "gb") for n, p in paths.items()}
    return work, configs, ours


def test_every_method_is_covered() -> None:
    from graftbuild.fusion import STRATEGIES
    from graftbuild.fusion.schedule import MergeParams

    mk = {n for n, s in STRATEGIES.items() if issubclass(s.Params, MergeParams)}
    assert mk == set(METHODS)


@pytest.mark.parametrize("name", METHODS + EXAMPLES + STACKS)
def test_matches_mergekit(name: str, merged: tuple[Path, dict, dict[str, Path]]) -> None:
    work, configs, ours = merged
    method = configs[name]["merge_method"]
    res = oracle.check(method, ours[name], work / "mk" / name, work / "models" / "base")
    assert oracle.passes(method, res), res
    if name in STACKS:  # layers from ranges of the inputs: 6 from 4, and 5
        n = json.loads((ours[name] / "config.json").read_text())["num_hidden_layers"]
        assert n == {"stack-passthrough": 6, "stack-slerp": 5}[name]
        return
    # Not vacuous: the merge moved the model away from the base (passthrough/linear included).
    frac, norm = oracle.delta_stats(oracle.load(ours[name]), oracle.load(work / "models/base"))
    assert frac > 0.05 and norm > 0.1, (frac, norm)


def test_random_methods_repeat_their_bytes_and_follow_the_seed(
    merged: tuple[Path, dict, dict[str, Path]],
) -> None:
    """Same recipe, same bytes (a fresh cache); another seed, other bytes."""
    import shutil

    import torch

    work, _configs, ours = merged
    first = oracle.load(ours["dare_ties"])
    again = work / "again"
    again.mkdir()
    shutil.copy(work / "configs" / "dare_ties.yml", again / "dare_ties.yml")
    second = oracle.load(oracle.graftbuild_build(again / "dare_ties.yml", again))
    assert all(torch.equal(first[n], second[n]) for n in first)
    other = oracle.load(oracle.graftbuild_build(again / "dare_ties.yml", again, seed=99))
    assert any(not torch.equal(first[n], other[n]) for n in first)
