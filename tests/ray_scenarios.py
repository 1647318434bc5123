"""The Ray executor's scenarios, run once by tests/test_ray.py inside a network namespace that has
only a loopback interface (``unshare -n``), so the local Ray cluster can listen on, and talk to,
nothing but 127.0.0.1. Ray 2.x turns ``_node_ip_address="127.0.0.1"`` into the machine's own
address, which is why the isolation comes from the namespace.

    python tests/ray_scenarios.py WORKDIR   # writes WORKDIR/results.json

Each scenario records what happened; the assertions live in tests/test_ray.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from graftbuild.build.engine import Engine, cache_dir  # noqa: E402
from graftbuild.build.runners.ray import RayRunner  # noqa: E402
from graftbuild.cache.hashing import hash_file  # noqa: E402
from graftbuild.cache.store import Store  # noqa: E402
from graftbuild.errors import GraftbuildError  # noqa: E402
from graftbuild.recipe import load_recipe  # noqa: E402
from tests.conftest import PATH_RECIPE, make_base, make_nan_source, make_source  # noqa: E402

FINETUNE = """
[sources.z]
finetune = { data = "z.txt", steps = 120, batch_size = 8, seq_len = 32, seed = 3 }
"""
BAD = """
[sources.bad]
path = "models/bad"
"""


def project(root: Path, models: Path, extra: str = "", packs: str = '["x", "y"]') -> Path:
    shutil.copytree(models, root / "models")
    (root / "z.txt").write_text("".join(f"{i} + {i} = {2 * i}\n" for i in range(400)))
    text = PATH_RECIPE.replace('packs = ["x", "y"]', f"packs = {packs}")
    text = text.replace("weights = { x = 1.0, y = 0.5 }", "weights = { x = 1.0 }") + extra
    (root / "graftbuild.toml").write_text(text)
    return root / "graftbuild.toml"


def engine(recipe: Path) -> Engine:
    r = load_recipe(recipe)
    return Engine(r, Store(cache_dir(r)))


def outputs(recipe: Path) -> dict[str, str]:
    out = recipe.parent / "out"
    return {
        p.relative_to(out).as_posix(): hash_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".graftbuild.json"
    }


def kill_first(name: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first worker process whose title says it runs task ``name``."""
    title = f"ray::{name}".encode()
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(title):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.005)


def main(work: Path) -> None:
    import ray

    results: dict[str, object] = {}
    models = work / "models"
    make_base(models / "base")
    make_source(models / "x", models / "base", seed=1)
    make_source(models / "y", models / "base", seed=2)
    make_nan_source(models / "bad", models / "x")  # passes pre-flight, fails in its pack

    from graftbuild.weights.determinism import pinned_env_vars

    ray.init(
        runtime_env={"env_vars": pinned_env_vars()},
        _node_ip_address="127.0.0.1",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 1024 * 1024,
        log_to_driver=False,
    )
    try:
        # 1. Ray vs local: same outputs; the two packs run at the same time.
        local = project(work / "local", models)
        engine(local).make()
        remote = project(work / "ray", models)
        ex = RayRunner()
        res = engine(remote).make(runner=ex)
        results["identical"] = {
            "local": outputs(local),
            "ray": outputs(remote),
            "built": res.built,
            "timings": ex.timings,
        }
        # 1a. The engine's visit is the one plan and local make use: a rule changed there (the
        # words of a restore) shows in a Ray build too.
        import graftbuild.build.engine as engine_module

        rule = engine_module.restore_reason
        engine_module.restore_reason = lambda node, why: f"RULE {node.id} {why}"
        try:
            shutil.rmtree(remote.parent / "out" / "fused")
            restored = engine(remote).make(runner=RayRunner()).node("fuse:release")
        finally:
            engine_module.restore_reason = rule
        results["rule"] = {"action": restored.action, "reasons": restored.reasons}
        results["listening"] = subprocess.run(
            ["ss", "-ltnH"], capture_output=True, text=True, check=True
        ).stdout
        results["interfaces"] = subprocess.run(
            ["ip", "-o", "addr"], capture_output=True, text=True, check=True
        ).stdout

        # 1c. A quickstart-sized recipe (training, SVD-based packs): Ray workers build the same
        # bytes as the local runner, and report the environment they built in.
        from tests.test_reproducibility import write_project

        sizes = {}
        for name in ("repro-local", "repro-ray"):
            runner = RayRunner() if name == "repro-ray" else None
            res = engine(write_project(work / name)).make(runner=runner)
            sizes[name] = {n.id: n.output_hash for n in res.nodes}
            if runner is not None:
                results["repro_env"] = {n.id: n.env for n in res.nodes if n.action == "built"}
        results["repro"] = sizes

        # 1b. The CLI, with a remote cache: Ray workers upload, another machine pulls it all.
        from click.testing import CliRunner

        from graftbuild.cli.app import main as cli

        remote_url = (work / "remote").as_uri()
        c1 = project(work / "cli", models)
        c2 = project(work / "cli2", models)
        for c in (c1, c2):
            text = c.read_text().replace(
                'cache = "cache"', f'cache = "cache"\nremote = "{remote_url}"'
            )
            c.write_text(text)
        events = work / "cli-events.jsonl"
        run = CliRunner().invoke(
            cli, ["make", str(c1), "--executor", "ray", "--json", "--events", str(events)]
        )
        second = engine(c2)
        from graftbuild.cache.remote import Remote

        second.remote = Remote(remote_url)
        res2 = second.make()
        results["cli"] = {
            "exit": run.exit_code,
            "stdout": run.stdout,
            "stderr": run.stderr,
            "second_pulled": res2.ids("pulled"),
            "same": outputs(c1) == outputs(c2),
            "events": [json.loads(line) for line in events.read_text().splitlines()],
        }

        # 2. A worker killed in the middle of a task: Ray retries it, the build completes.
        killed: list[int] = []
        stop = threading.Event()
        killer = threading.Thread(
            target=kill_first, args=("graftbuild:source:z", killed, stop), daemon=True
        )
        killer.start()
        kp = project(work / "kill", models, FINETUNE, packs='["x", "y", "z"]')
        ex = RayRunner()
        res = engine(kp).make(runner=ex)
        stop.set()
        results["kill"] = {"killed": killed, "built": res.built, "timings": ex.timings}

        # 3. A failing pack: without --keep-going the build stops; with it, the others finish.
        for keep_going in (False, True):
            gp = project(work / f"fail{int(keep_going)}", models, BAD, packs='["x", "bad"]')
            ex = RayRunner()
            try:
                engine(gp).make(runner=ex, keep_going=keep_going)
                error = None
            except GraftbuildError as e:
                error = str(e)
            plan = {n.id: n.state for n in engine(gp).plan()}
            results[f"fail_keep_going={keep_going}"] = {
                "error": error,
                "timings": ex.timings,
                "plan": plan,
            }
    finally:
        ray.shutdown()
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
