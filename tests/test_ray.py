"""The Ray executor on a real local Ray cluster (2 CPUs).

All scenarios run once, in one process that holds one cluster (tests/ray_scenarios.py), inside a
network namespace whose only interface is loopback: Ray then can neither listen on nor send to
anything but 127.0.0.1. The tests below check what that run recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ray_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("ray")
    script = f"ip link set lo up && exec {sys.executable} {HERE / 'ray_scenarios.py'} {work}"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((work / "results.json").read_text())


def test_ray_outputs_are_byte_identical_to_local(ray_run: dict) -> None:
    r = ray_run["identical"]
    assert r["ray"] == r["local"]
    assert "fused/release/model.safetensors" in r["ray"]
    assert set(r["timings"]) == {"pack:x", "pack:y", "fuse:release"}  # each step ran as a task


def test_ray_builds_go_through_the_engines_one_visit(ray_run: dict) -> None:
    """A restore reason patched in graftbuild.build.engine shows in a Ray make (the same patch
    shows in plan and local make: tests/test_engine.py)."""
    assert ray_run["rule"] == {"action": "restored", "reasons": ["RULE fuse:release missing"]}


def test_ray_builds_a_trained_and_packed_recipe_to_the_local_bytes(ray_run: dict) -> None:
    """Ray workers run with the driver's pinned kernels and one intra-op thread, so even the
    thread-sensitive SVD of a 128-hidden model's packs gives the local runner's bytes."""
    from test_reproducibility import EVERY_KIND

    r = ray_run["repro"]
    assert r["repro-ray"] == r["repro-local"]
    assert set(r["repro-ray"]) >= EVERY_KIND  # teach, sft, dpo, routed bundle and eval too
    envs = ray_run["repro_env"]
    assert set(envs) >= EVERY_KIND
    for env in envs.values():  # measured on the worker, reported back
        assert env["threads"] == 1 and env["cpu_capability"] == "AVX2"
        assert env["mkl_branch"] == "COMPATIBLE"


def test_independent_packs_run_concurrently(ray_run: dict) -> None:
    t = ray_run["identical"]["timings"]
    x, y, fuse = t["pack:x"], t["pack:y"], t["fuse:release"]
    assert x["start"] < y["end"] and y["start"] < x["end"], "the two packs' tasks overlap"
    assert x["pid"] != y["pid"]
    assert fuse["start"] >= max(x["end"], y["end"]), "the fuse waits for both packs"


def test_ray_listens_only_on_loopback(ray_run: dict) -> None:
    listening = [line.split()[3] for line in ray_run["listening"].splitlines()]
    assert listening, "the cluster was up while this was recorded"
    for addr in listening:
        host = addr.rsplit(":", 1)[0]
        assert host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), addr
    interfaces = {line.split()[1] for line in ray_run["interfaces"].splitlines()}
    assert interfaces == {"lo"}


def test_killed_worker_is_retried_and_the_build_completes(ray_run: dict) -> None:
    r = ray_run["kill"]
    assert len(r["killed"]) == 1, "a worker was killed while running source:z's finetune"
    assert {"source:z", "pack:z", "fuse:release"} <= set(r["built"])
    assert r["timings"]["source:z"]["pid"] != r["killed"][0], "the retry ran on another worker"


def test_failing_pack_stops_the_build(ray_run: dict) -> None:
    r = ray_run["fail_keep_going=False"]
    assert r["error"].startswith("pack:bad: ") and "NaN or Inf in the delta" in r["error"]
    assert r["plan"]["fuse:release"] == "stale"


def test_keep_going_builds_everything_not_below_the_failure(ray_run: dict) -> None:
    r = ray_run["fail_keep_going=True"]
    assert r["error"].startswith("pack:bad: ")
    assert set(r["timings"]) == {"pack:x", "pack:y"}
    assert r["plan"]["pack:x"] == r["plan"]["pack:y"] == "fresh"
    assert r["plan"]["pack:bad"] == r["plan"]["fuse:release"] == "stale"


def test_cli_ray_executor_shares_artifacts_through_the_remote(ray_run: dict) -> None:
    r = ray_run["cli"]
    assert r["exit"] == 0, r["stderr"]
    last = json.loads(r["stdout"].strip().splitlines()[-1])
    assert {"pack:x", "pack:y", "fuse:release"} <= set(last["built"])
    assert r["second_pulled"] == ["pack:x", "pack:y", "fuse:release"]
    assert r["same"]


def test_ray_workers_report_progress_through_the_drivers_channel(ray_run: dict) -> None:
    """Packing on a Ray worker shows as the local build's would: a progress line on the driver's
    (captured) stderr and progress events of the node in the --events file."""
    r = ray_run["cli"]
    progress = [e for e in r["events"] if e["event"] == "progress"]
    packs = {e["node"] for e in progress if e["task"].startswith("pack ")}
    assert packs == {"pack:x", "pack:y"}
    last = [e for e in progress if e["node"] == "pack:x"][-1]
    assert last["done"] == last["total"] > 0 and last["bytes"] > 0
    assert "pack pack:x: tensor " in r["stderr"]
    finished = {e["node"] for e in r["events"] if e["event"] == "finished"}
    assert {"pack:x", "pack:y", "fuse:release"} <= finished
