"""How a long-running library call tells its caller what it is doing, without printing anything itself.

Library functions take an `Events` object and report through it: a line of information or a warning, a status
while something slow happens, a task with a total that advances, and (for the demo, which chains the commands) each
finished stage's result. The base class ignores everything, so a call made from Python is silent; the command line
passes one that renders with rich (upcycle.cli.ui). Only the CLI prints.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class Task:
    """A unit of work with a known total (tokens, bytes, layers, steps); the base class ignores its updates."""

    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, *, completed: float | None = None, description: str | None = None, **fields) -> None:
        pass


class Events:
    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def stage(self, title: str) -> None:
        """A new stage of a longer job begins (the demo's parent, convert, train, eval)."""

    def result(self, value: object) -> None:
        """A stage finished with this result (a ConvertResult, TrainResult or Report) for the caller to show."""

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        """Something slow with no measurable progress is happening."""
        yield

    @contextmanager
    def task(self, description: str, total: float | None, *, completed: float = 0, unit: str = "items",
             fields: tuple[str, ...] = (), transient: bool = True) -> Iterator[Task]:
        """A task with a total; unit "bytes" asks for sizes and speed, `fields` for named values shown beside it."""
        yield Task()


SILENT = Events()


def events_or_silent(events: Events | None, quiet: bool = False) -> Events:
    """The events to report through: none when quiet or when the caller gave none."""
    return SILENT if quiet or events is None else events
