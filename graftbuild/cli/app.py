"""Command line entry point: the ``graftbuild`` group and its commands.

User errors exit with code 2, build failures with 1, each as one line on stderr; ``--debug``
shows the traceback instead. Each command lives in ``graftbuild/commands/``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import click

from graftbuild import __version__
from graftbuild.cli.clean import clean
from graftbuild.cli.export import export
from graftbuild.cli.fsck import fsck
from graftbuild.cli.gc import gc
from graftbuild.cli.graph import graph
from graftbuild.cli.import_mergekit import import_
from graftbuild.cli.init import init
from graftbuild.cli.inspect import inspect
from graftbuild.cli.make import make
from graftbuild.cli.plan import plan
from graftbuild.cli.pull import pull
from graftbuild.cli.push import push
from graftbuild.cli.report import report
from graftbuild.cli.status import status
from graftbuild.cli.verify import verify
from graftbuild.errors import GraftbuildError, describe_os_error

# OpenMP threads that spin while waiting slow an SVD several-fold on a loaded machine; must be
# set before torch loads (it is imported lazily, after this).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def one_line(message: str) -> str:
    """A message as one line (a wrapped library error, a list of drifted nodes): every error
    ends as exactly one line on stderr, whatever raised it."""
    out = ""
    for part in (p.strip() for p in message.splitlines()):
        if part:
            out += (" " if not out or out.endswith(":") else "; ") + part
    return out.strip()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (staging folders removed,
    the lock released, no half-written object or output); exit code 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


class _Group(click.Group):
    """Turns our errors into one line and an exit code (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GraftbuildError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except OSError as e:  # outside a step: the cache or an output folder
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {describe_os_error(e)}", err=True)
            sys.exit(1)
        except Terminated:
            click.echo("error: terminated (SIGTERM); nothing half-written was kept", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing half-written was kept", err=True)
            sys.exit(130)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(
                f"error: internal error: {type(e).__name__}: {one_line(str(e))} "
                "(rerun with --debug)",
                err=True,
            )
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="graftbuild")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """graftbuild: a declarative, incremental build system for LLM weights."""
    ctx.obj = {"debug": debug}
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


main.add_command(make)
main.add_command(export)
main.add_command(plan)
main.add_command(verify)
main.add_command(status)
main.add_command(graph)
main.add_command(gc)
main.add_command(import_)
main.add_command(clean)
main.add_command(fsck)
main.add_command(push)
main.add_command(pull)
main.add_command(inspect)
main.add_command(report)
main.add_command(init)
