"""The embedded runner: builds one node at a time, in this process (tensors in parallel inside a
node with ``-j``)."""

from __future__ import annotations

from typing import Any, ClassVar

from graftbuild.build.runners.base import Job, Outcome, execute


class LocalRunner:
    name: ClassVar[str] = "local"
    dry: ClassVar[bool] = False

    def __init__(self) -> None:
        self._queue: list[Job] = []

    def open(self, store: Any, settings: Any, reporter: Any, remote: Any) -> None:
        self.store, self.settings, self.reporter = store, settings, reporter

    def full(self) -> bool:
        return bool(self._queue)

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self) -> list[tuple[Job, Outcome]]:
        job = self._queue.pop(0)
        return [(job, execute(self.store, job, self.settings, self.reporter))]

    def cancel(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._queue.clear()
