"""The command line: thin typer commands that parse options and call plain library functions.

Only this layer turns an UpcycleError into a red one-line message and an exit code.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import typer

from upcycle import __version__
from upcycle.core.errors import UpcycleError

app = typer.Typer(
    name="upcycle",
    help="Turn a dense language model into a Mixture-of-Experts model (sparse upcycling), train it, evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def user_errors(fn: Callable) -> Callable:
    """Turn library errors into one red line and the error's exit code; no traceback for user errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from upcycle.cli import ui

        try:
            return fn(*args, **kwargs)
        except UpcycleError as exc:
            ui.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            ui.error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"upcycle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    # Fork-safety: tokenizers' thread pool and DataLoader workers do not mix.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Each command lives in its own upcycle/cli/<name>.py with only typer options at import time; heavy imports (torch,
# transformers, datasets) happen inside the command so that `upcycle --help` stays instant.
_COMMANDS = [
    ("convert", "upcycle.cli.convert", "convert_command"),
    ("eval", "upcycle.cli.eval", "eval_command"),
    ("train", "upcycle.cli.train", "train_command"),
    ("demo", "upcycle.cli.demo", "demo_command"),
]


def _register() -> None:
    import importlib

    for name, module, attr in _COMMANDS:
        fn = getattr(importlib.import_module(module), attr)
        app.command(name, no_args_is_help=True)(user_errors(fn))


_register()


def main() -> None:
    app(prog_name="upcycle")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
