"""Progress reporting that fits where a build runs, and the build's machine-readable events.

- On a terminal: rich bars (step i/n, elapsed, ETA; training's loss with a sparkline of its
  curve, packing's bytes written).
- Captured (a log file, CI, a cluster's job output): plain lines, one per node event and one
  every ``interval`` seconds for a long step (``GRAFTBUILD_PROGRESS_INTERVAL``, default 10), plus
  one when the step ends: ``train source:arith: step 120/150 (80%), loss 1.234, 3.1s elapsed,
  ETA 0.8s``.
- Quiet (``-q``): nothing but errors (which the command line prints itself).

Events (``make --events FILE|-``) are JSON lines written to an ``EventSink``: ``started``,
``progress``, ``finished``, ``failed``, ``skipped``, ``pulled``, ``pushed`` per node, and one
``summary`` at the end. A Ray worker reports through a ``RelayReporter`` whose events the driver
hands to ``Reporter.relay``: the same lines and events as a local build.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

DEFAULT_INTERVAL = 10.0
EVENTS_INTERVAL = 1.0
"""Seconds between two progress events of one step (the first and the last always go)."""
_SPARK = "▁▂▃▄▅▆▇█"


def default_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("GRAFTBUILD_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def sparkline(values: list[float], width: int = 24) -> str:
    """The last ``width`` values as block characters, low to high."""
    vals = [v for v in values[-width:] if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(7, int((v - lo) / span * 7.999))] for v in vals)


class EventSink:
    """JSON lines, one event per line, flushed as written (a dashboard tails the file)."""

    def __init__(self, stream: IO[str], owned: bool = False) -> None:
        self.stream = stream
        self.owned = owned
        self._lock = threading.Lock()

    @classmethod
    def open(cls, target: str) -> EventSink:
        """``-``: stdout; else a file (truncated)."""
        if target == "-":
            return cls(sys.stdout)
        return cls(open(target, "w", encoding="utf-8"), owned=True)

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3), **event}, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.owned:
            self.stream.close()


class _Task:
    """One step's progress: counts, the latest loss and bytes, when a line last went out."""

    def __init__(self, description: str, total: int, unit: str, node: str | None) -> None:
        self.description, self.total, self.unit, self.node = description, max(total, 0), unit, node
        self.done = 0
        self.start = time.monotonic()
        self.losses: list[float] = []
        self.bytes: int | None = None
        self.last_line = self.start
        self.printed: int | None = None
        """``done`` when the last line was printed (the closing line is not repeated)."""
        self.last_event = -math.inf

    def update(self, n: int, loss: float | None, nbytes: int | None) -> None:
        self.done += n
        if loss is not None:
            self.losses.append(float(loss))
        if nbytes is not None:
            self.bytes = (self.bytes or 0) + int(nbytes)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self) -> float | None:
        if self.done <= 0 or self.total <= 0 or self.done >= self.total:
            return None
        return self.elapsed() / self.done * (self.total - self.done)

    def info(self) -> str:
        """The extra column: loss (with its curve) or bytes written."""
        parts = []
        if self.losses:
            parts.append(f"loss {self.losses[-1]:.4g} {sparkline(self.losses)}")
        if self.bytes is not None:
            parts.append(f"{human_bytes(self.bytes)} written")
        return "  ".join(parts)

    def line(self) -> str:
        unit = f"{self.unit} " if self.unit else ""
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        parts = [f"{self.description}: {unit}{self.done}/{self.total}{pct}"]
        if self.losses:
            first = f" (first {self.losses[0]:.4g})" if len(self.losses) > 1 else ""
            parts.append(f"loss {self.losses[-1]:.4g}{first}")
        if self.bytes is not None:
            parts.append(f"{human_bytes(self.bytes)} written")
        parts.append(f"{seconds(self.elapsed())} elapsed")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {seconds(eta)}")
        return ", ".join(parts)

    def event(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "progress",
            "node": self.node,
            "task": self.description,
            "unit": self.unit,
            "done": self.done,
            "total": self.total,
            "elapsed": round(self.elapsed(), 3),
            "eta": None if self.eta() is None else round(self.eta() or 0.0, 3),
        }
        if self.losses:
            out["loss"] = self.losses[-1]
        if self.bytes is not None:
            out["bytes"] = self.bytes
        return out


class Reporter:
    """Where a build's words go: bars or lines on the console, events to a sink."""

    def __init__(
        self,
        console: Console | None = None,
        enabled: bool = True,
        events: EventSink | None = None,
        interval: float | None = None,
    ) -> None:
        self.console = console or Console(stderr=True, emoji=False, highlight=False)
        shown = enabled and not self.console.quiet
        self.bars = shown and self.console.is_terminal
        self.lines = shown and not self.console.is_terminal
        self.enabled = self.bars  # kept for callers that ask whether bars are drawn
        self.events = events
        self.interval = default_interval() if interval is None else interval
        self.node: str | None = None
        """The node being built in this process (set by the runner around a step)."""

    @contextlib.contextmanager
    def building(self, node_id: str) -> Iterator[None]:
        previous, self.node = self.node, node_id
        try:
            yield
        finally:
            self.node = previous

    def event(self, kind: str, **fields: Any) -> None:
        """One machine-readable event (nothing when no sink is configured)."""
        if self.events is not None:
            self.events.write({"event": kind, **fields})

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str = "") -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, loss=None, bytes=None)``: ``n`` more of ``total`` done, the
        latest training loss, bytes just written. Draws a bar, prints timed lines or emits
        progress events, as configured."""
        task = _Task(description, total, unit, self.node)
        if not (self.bars or self.lines or self.events is not None):
            yield lambda n=1, loss=None, bytes=None: None
            return
        bar: Progress | None = None
        tid: Any = None
        if self.bars:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            bar = Progress(*columns, console=self.console, transient=True)
            bar.start()
            tid = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, loss: float | None = None, bytes: int | None = None) -> None:
            task.update(n, loss, bytes)
            now = time.monotonic()
            if bar is not None:
                bar.update(tid, advance=n, info=task.info())
            elif self.lines and now - task.last_line >= self.interval:
                task.last_line, task.printed = now, task.done
                self._print(task.line())
            if self.events is not None and now - task.last_event >= EVENTS_INTERVAL:
                task.last_event = now
                self.events.write(task.event())

        try:
            yield advance
        finally:
            if bar is not None:
                bar.stop()
            if self.lines and task.printed != task.done:
                self._print(task.line())
            if self.events is not None:
                self.events.write(task.event())

    def relay(self, event: dict[str, Any]) -> None:
        """An event from a worker elsewhere (``RelayReporter``): shown and passed on as if it
        happened here."""
        if event.get("event") == "log":
            self.log(str(event.get("message", "")))
            return
        if event.get("event") == "progress" and (self.lines or self.bars) and self._due(event):
            unit = f"{event.get('unit')} " if event.get("unit") else ""
            parts = [f"{event.get('task')}: {unit}{event.get('done')}/{event.get('total')}"]
            if event.get("loss") is not None:
                parts.append(f"loss {event['loss']:.4g}")
            if event.get("bytes") is not None:
                parts.append(f"{human_bytes(event['bytes'])} written")
            parts.append(f"{seconds(event.get('elapsed') or 0.0)} elapsed")
            if event.get("eta") is not None:
                parts.append(f"ETA {seconds(event['eta'])}")
            self._print(", ".join(parts))
        if self.events is not None:
            self.events.write(event)

    def _due(self, event: dict[str, Any]) -> bool:
        """Whether a relayed progress event is due as a line (every ``interval``, and the last)."""
        if event.get("done") == event.get("total"):
            return True
        seen = self.__dict__.setdefault("_relayed", {})
        key, now = (event.get("node"), event.get("task")), time.monotonic()
        if now - seen.get(key, -math.inf) < self.interval:
            return False
        seen[key] = now
        return True

    def _print(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True, markup=False)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)  # paths stay whole


class RelayReporter(Reporter):
    """A worker's reporter: its progress and log lines become events handed to ``send`` (a Ray
    queue's ``put``); the driver shows them (``Reporter.relay``)."""

    def __init__(self, send: Callable[[dict[str, Any]], None], interval: float) -> None:
        super().__init__(Console(stderr=True, quiet=True), enabled=False, interval=interval)
        self.events = _SendSink(send, interval)

    def log(self, message: str) -> None:
        assert self.events is not None
        self.events.write({"event": "log", "node": self.node, "message": message})


class _SendSink(EventSink):
    """Hands events to a function instead of a stream; progress at most every ``interval``."""

    def __init__(self, send: Callable[[dict[str, Any]], None], interval: float) -> None:
        super().__init__(sys.stderr)
        self.send, self.interval = send, interval
        self._last: dict[Any, float] = {}

    def write(self, event: dict[str, Any]) -> None:
        if event.get("event") == "progress" and event.get("done") != event.get("total"):
            key = (event.get("node"), event.get("task"))
            now = time.monotonic()
            if now - self._last.get(key, -math.inf) < self.interval:
                return
            self._last[key] = now
        with contextlib.suppress(Exception):  # a lost progress line must not fail the build
            self.send({"time": round(time.time(), 3), **event})


class NullReporter(Reporter):
    def __init__(self) -> None:
        super().__init__(Console(stderr=True, quiet=True), enabled=False)
