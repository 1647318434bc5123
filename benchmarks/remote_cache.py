"""Remote cache: what a configured remote adds to a no-op ``make``, and pull vs build.

Peers measured side by side in one run, same project, same machine:
- a no-op ``graftbuild make`` (a fresh process each time, as a user runs it) without a remote
  and with ``remote = "s3://..."`` on a moto S3 server on 127.0.0.1; medians of interleaved runs;
- the same no-op with the remote's endpoint pointing at a closed port: if make contacted the
  remote at all, it would print a warning (and spend seconds in retries);
- a second "machine" (its own cache folder) that pulls everything vs one that builds everything.

    python benchmarks/remote_cache.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import PATH_RECIPE, make_base, make_source  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project(root: Path, models: Path, remote: str | None) -> Path:
    shutil.copytree(models, root / "models")
    text = PATH_RECIPE
    if remote:
        text = text.replace('cache = "cache"', f'cache = "cache"\nremote = "{remote}"')
    (root / "graftbuild.toml").write_text(text)
    return root / "graftbuild.toml"


def make(recipe: Path, env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "graftbuild", "make", str(recipe), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - t, p.stderr + p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", NO_PROXY="127.0.0.1")
    env |= {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    import boto3

    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    boto3.client("s3").create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_base(root / "models" / "base")
            make_source(root / "models" / "x", root / "models" / "base", seed=1)
            make_source(root / "models" / "y", root / "models" / "base", seed=2)
            local = project(root / "local", root / "models", None)
            a = project(root / "a", root / "models", "s3://bench/cache")
            b = project(root / "b", root / "models", "s3://bench/cache")

            t_build_local, _ = make(local, env)
            t_build_push, _ = make(a, env)
            t_pull, out = make(b, env)
            assert '"built": ["base", "source:x", "source:y"]' in out, out

            noop_local, noop_remote = [], []
            for _ in range(args.runs):
                noop_local.append(make(local, env)[0])
                noop_remote.append(make(b, env)[0])
            dead = dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
            t_dead, out_dead = make(b, dead)
            contacted = "warning" in out_dead

            ml, mr = statistics.median(noop_local), statistics.median(noop_remote)
            print("| measurement | seconds |")
            print("|---|---|")
            print(f"| no-op make, no remote (median of {args.runs}) | {ml:.3f} |")
            print(f"| no-op make, S3 remote configured (median of {args.runs}) | {mr:.3f} |")
            print(f"| added time | {mr - ml:+.3f} ({(mr / ml - 1) * 100:+.1f}%) |")
            print(f"| no-op make, remote endpoint dead | {t_dead:.3f} (warned: {contacted}) |")
            print(f"| first make, no remote (builds 3 nodes) | {t_build_local:.3f} |")
            print(f"| first make, builds and pushes to S3 | {t_build_push:.3f} |")
            print(f"| second machine: make pulls everything, builds nothing | {t_pull:.3f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
