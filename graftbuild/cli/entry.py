"""The ``graftbuild`` console entry point: the no-op fast path first, then the full CLI.

``make`` and ``plan`` with only the plain options are first answered from the last build's
record (graftbuild/noop.py) when nothing changed; this module imports nothing heavy (no click,
rich, pydantic, networkx or torch) so that such a run costs little more than starting Python.
Anything else, or any doubt, goes to ``graftbuild.cli``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from graftbuild.cli.args import split_args

# Options the fast path understands: name -> takes a value. --device and --jobs only change how
# a build would run, and nothing runs on a no-op.
_OPTIONS = {
    "make": {"--json": False, "-q": False, "--quiet": False, "--cache": True, "--device": True,
             "-j": True, "--jobs": True, "--fsync": False},
    "plan": {"--json": False, "--cache": True},
}  # fmt: skip


def _parse(argv: list[str]) -> tuple[str, dict[str, Any], list[str]] | None:
    if not argv or argv[0] not in _OPTIONS:
        return None
    command, known = argv[0], _OPTIONS[argv[0]]
    opts: dict[str, Any] = {}
    args: list[str] = []
    it = iter(argv[1:])
    for a in it:
        if a.startswith("-"):
            name, eq, value = a.partition("=")
            if name not in known or (eq and not known[name]):
                return None
            if known[name]:
                value = value if eq else next(it, None)  # type: ignore[assignment]
                if value is None:
                    return None
                opts[name] = value
            else:
                opts[name] = True
        else:
            args.append(a)
    return command, opts, args


def fast_path(argv: list[str]) -> bool:
    """Print the answer and return True when the last build's record says nothing changed."""
    parsed = _parse(argv)
    if parsed is None:
        return False
    command, opts, args = parsed
    from graftbuild.build import noop

    recipe, targets = split_args(args)
    cache = Path(opts["--cache"]) if "--cache" in opts else None
    record = noop.check(recipe, targets, cache)
    if record is None:
        return False
    nodes = record["nodes"]
    as_json = "--json" in opts
    if command == "plan":
        if as_json:
            rows = [{"id": n["id"], "state": "fresh", "reasons": []} for n in nodes]
            print(json.dumps({"nodes": rows}))
        else:
            width = max(len(n["id"]) for n in nodes)
            for n in nodes:
                print(f"{n['id']:<{width}}  fresh")
        return True
    quiet = "-q" in opts or "--quiet" in opts
    out = sys.stderr if as_json else sys.stdout
    if not quiet:
        width = max(len(n["id"]) for n in nodes)
        for n in nodes:
            print(f"{n['id']:<{width}}  reused  {n.get('output') or ''}", file=out)
        for n in nodes:
            metrics = noop.read_metrics(n)
            if metrics:
                print(f"{n['id']} held-out loss:", file=out)
                for model, per_data in metrics.items():
                    losses = ", ".join(f"{d} {v['loss']:.3f}" for d, v in sorted(per_data.items()))
                    print(f"  {model}: {losses}", file=out)
        print(f"built 0, reused {len(nodes)} (nothing changed since the last build)", file=out)
    if as_json:
        print(json.dumps(_noop_json(nodes, record.get("gates", []))))
    return True


def _noop_json(nodes: list[dict[str, Any]], gates: list[Any]) -> dict[str, Any]:
    """``make --json``'s final object (graftbuild/cli/make.py), every node reused; wall times are
    not measured per node on this path (None)."""
    rows = [
        {"id": n["id"], "action": "reused", "seconds": None, "bytes": 0, "peak_rss": None,
         "peak_gpu": None, "host": None, "output": n.get("output")}
        for n in nodes
    ]  # fmt: skip
    totals = {"nodes": len(rows), "actions": {"reused": len(rows)}, "seconds": 0.0, "bytes": 0,
              "peak_rss": None, "peak_gpu": None}  # fmt: skip
    reused = [n["id"] for n in nodes]
    return {"ok": True, "built": [], "reused": reused, "pulled": [], "failed": [],
            "gates": gates, "nodes": rows, "totals": totals}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """The console entry; ``argv`` given: called in-process (tests), not as the program."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    from graftbuild.weights.determinism import pin_environment

    pin_environment()  # before anything loads torch: the numerical paths every build uses
    if fast_path(argv):
        return
    from graftbuild.cli.app import main as cli

    try:
        cli.main(args=argv, prog_name="graftbuild")
    finally:
        if program:
            # The interpreter's last full collection, at exit, walks every object torch and
            # transformers made at import: 0.2-0.3 s of every command that loaded torch
            # (docs/PERFORMANCE.md). Frozen objects are left out of it; the process ends.
            import gc

            gc.freeze()
