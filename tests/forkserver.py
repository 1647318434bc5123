"""Runs ``graftbuild`` commands in forked children of one process that has already imported
torch and transformers, so that a test can start (and SIGKILL) dozens of builds on two cores.

Each child is a separate process running the real CLI entry point, exactly as
``python -m graftbuild`` would after its imports; SIGKILL gives it no chance to clean up.

Protocol, one JSON object per line: the test writes ``{"args": [...], "log": PATH,
"kill_after": SECONDS or null}``; the server answers ``{"exit": CODE, "killed": BOOL,
"elapsed": SECONDS}`` (CODE is -9 for a killed child).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import graftbuild.commands.make
import graftbuild.compress.codecs
import graftbuild.executors.local
import graftbuild.fusion
import graftbuild.modeling
import graftbuild.scheduler
import graftbuild.skillpack
import graftbuild.steps  # noqa: F401
from graftbuild.cli import main


def child(args: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        main(args, prog_name="graftbuild")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(req["args"], req["log"])
        killed = False
        deadline = req.get("kill_after")
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() - start >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        reply = {
            "exit": os.waitstatus_to_exitcode(status),
            "killed": killed,
            "elapsed": time.monotonic() - start,
        }
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
