"""The dry runner: builds nothing. ``plan`` is the engine's loop over it: every node is visited
as ``make`` would visit it, and what would be built is reported, with its reasons."""

from __future__ import annotations

from typing import Any, ClassVar

from graftbuild.build.runners.base import Job, Outcome


class DryRunner:
    name: ClassVar[str] = "dry"
    dry: ClassVar[bool] = True

    def __init__(self) -> None:
        self._queue: list[Job] = []

    def open(self, store: Any, settings: Any, reporter: Any, remote: Any) -> None:
        pass

    def full(self) -> bool:
        return False

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self) -> list[tuple[Job, Outcome]]:
        done, self._queue = self._queue, []
        return [(job, Outcome()) for job in done]

    def cancel(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._queue.clear()
