"""Progress reporting for long steps (rich bars on stderr; silent when not a terminal)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True, emoji=False, highlight=False)
        self.enabled = enabled and self.console.is_terminal

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(n)``; draws a bar for the duration when enabled."""
        if not self.enabled:
            yield lambda n=1: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)  # paths stay whole


class NullReporter(Reporter):
    def __init__(self) -> None:
        super().__init__(Console(stderr=True, quiet=True), enabled=False)
