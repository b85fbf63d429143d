"""Showing what the library returns: one function per result type, and `show` that picks it (the demo hands each
stage's result to the CLI through its events, and each command shows its own)."""

from __future__ import annotations

from upcycle.cli import ui


def show_train(result) -> None:
    """A finished run (TrainResult), or the plan of a --dry-run."""
    if result.plan is not None:
        ui.out.print("\n".join(result.plan.lines()))
        return
    ui.info(f"trained {result.trained_steps} steps ({result.tokens:,} tokens in all); model in {result.final}")
    if result.adapter is not None:
        ui.info(f"LoRA adapter (for {result.adapter_for}) in {result.adapter}; final/ has it merged{result.adapter_note}")


def show(value) -> None:
    from upcycle.cli.convert_report import print_plan, print_summary
    from upcycle.cli.eval_report import print_report
    from upcycle.convert import ConvertResult
    from upcycle.evaluate.report import Report
    from upcycle.train import TrainResult

    if isinstance(value, ConvertResult):
        (print_plan(value, ui.out) if value.options.dry_run else print_summary(value, ui.console))
    elif isinstance(value, TrainResult):
        show_train(value)
    elif isinstance(value, Report):
        print_report(value, ui.out)
    else:  # pragma: no cover - a result type without a view is a bug in the CLI
        raise TypeError(f"no view for {type(value).__name__}")


def events():
    """The terminal's events for a command: progress, warnings and (for the demo) each stage's result."""
    return ui.RichEvents(on_result=show)
