"""Terminal output shared by all commands: one rich console on stderr and a progress-bar factory."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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
