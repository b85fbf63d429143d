"""Terminal output, the only place that prints: one rich console on stderr for progress and messages, one on
stdout for tables and results, and `RichEvents`, which renders what the library reports (upcycle.core.events)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from upcycle.core.events import Events, Task

# Progress and messages go to stderr so that stdout stays clean for tables and JSON a user may pipe.
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A progress bar in the house style; extra columns (e.g. loss) go after the bar."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def error(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def info(message: str) -> None:
    console.print(message, soft_wrap=True)


class _RichTask(Task):
    def __init__(self, prog: Progress, task_id):
        self._prog, self._id = prog, task_id

    def advance(self, amount: float = 1) -> None:
        self._prog.advance(self._id, amount)

    def update(self, *, completed: float | None = None, description: str | None = None, **fields) -> None:
        kw = {k: v for k, v in (("completed", completed), ("description", description)) if v is not None}
        self._prog.update(self._id, **kw, **fields)


class RichEvents(Events):
    """Events rendered on the terminal; `on_result` shows a finished stage's result (the demo's stages)."""

    def __init__(self, on_result: Callable[[object], None] | None = None):
        self._on_result = on_result

    def info(self, message: str) -> None:
        info(message)

    def warn(self, message: str) -> None:
        warn(message)

    def stage(self, title: str) -> None:
        console.rule(f"[bold]{title}")

    def result(self, value: object) -> None:
        if self._on_result is not None:
            self._on_result(value)

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        with console.status(message):
            yield

    @contextmanager
    def task(self, description: str, total: float | None, *, completed: float = 0, unit: str = "items",
             fields: tuple[str, ...] = (), transient: bool = True) -> Iterator[Task]:
        extra = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else []
        extra += [TextColumn(f"{{task.fields[{f}]}}") for f in fields]
        with progress(*extra, transient=transient) as prog:
            task_id = prog.add_task(description, total=total, completed=completed, **{f: "" for f in fields})
            yield _RichTask(prog, task_id)
