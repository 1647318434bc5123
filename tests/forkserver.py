"""Runs ``graftbuild`` commands in forked children of one process that has already imported
torch and transformers, so that tests can start (and SIGKILL) dozens of builds on two cores.

Each child is a separate process running the real CLI entry point, exactly as
``python -m graftbuild`` would after its imports; SIGKILL gives it no chance to clean up.

Protocol, one JSON object per line each way:
``{"op": "run", "args", "log", "cwd", "kill_after"}`` -> ``{"exit", "elapsed"}`` (exit -9: killed);
``{"op": "spawn", "args", "log", "cwd"}`` -> ``{"pid"}``; ``{"op": "wait", "pid"}`` -> ``{"exit"}``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class ForkServer:
    """The test side: starts the server and talks to it."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "fork server died"
        return json.loads(line)

    def run(
        self,
        args: list[str],
        cwd: Path,
        log: Path,
        kill_after: float | None = None,
        **limits: int,
    ) -> dict[str, Any]:
        """Run to the end (or SIGKILL after ``kill_after`` s). ``limits``: ``uid`` to run as,
        ``fsize`` the largest file it may write (RLIMIT_FSIZE: a full disk, simulated)."""
        req = {"op": "run", "args": args, "cwd": str(cwd), "log": str(log)}
        return self._ask(**req, kill_after=kill_after, **limits)

    def spawn(self, args: list[str], cwd: Path, log: Path) -> int:
        return self._ask(op="spawn", args=args, cwd=str(cwd), log=str(log))["pid"]

    def wait(self, pid: int) -> int:
        return self._ask(op="wait", pid=pid)["exit"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _child(req: dict[str, Any]) -> None:
    from graftbuild.cli.app import main

    os.chdir(req["cwd"])
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if req.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    if req.get("uid") is not None:
        os.setgroups([])
        os.setgid(req["uid"])
        os.setuid(req["uid"])
    code = 0
    try:
        main(req["args"], prog_name="graftbuild")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fork(req: dict[str, Any]) -> int:
    pid = os.fork()
    if pid == 0:
        _child(req)
    return pid


def serve() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # What a build imports, loaded once here so that each forked build starts at once.
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import graftbuild.build.engine
    import graftbuild.build.runners.local
    import graftbuild.cli.app
    import graftbuild.cli.make
    import graftbuild.compress.codecs
    import graftbuild.fusion
    import graftbuild.skillpack
    import graftbuild.steps
    import graftbuild.weights.modeling  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "spawn":
            reply: dict[str, Any] = {"pid": _fork(req)}
        elif req["op"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            reply = {"exit": os.waitstatus_to_exitcode(status)}
        else:
            start = time.monotonic()
            pid = _fork(req)
            deadline = req.get("kill_after")
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if deadline is not None and time.monotonic() - start >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.002)
            reply = {"exit": os.waitstatus_to_exitcode(status), "elapsed": time.monotonic() - start}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
