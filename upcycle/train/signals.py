"""SIGTERM and SIGINT during training: save, then stop.

Schedulers send SIGTERM before they preempt a job (SLURM, then SIGKILL after its grace period; Kubernetes after
terminationGracePeriodSeconds, 30 s by default), and a user at a terminal sends SIGINT. Within `StopOnSignal` the
first of either only sets a flag; the training loop reads it once per optimizer step (agreed across processes),
writes a checkpoint after the step it is in and exits with 128 + the signal's number. A second signal means "now":
the default action is restored and the signal re-sent, so the process ends at once, as it would have without us.

Except within DUPLICATE_S of the first: launchers forward what they receive. Under SLURM every process of the job
step gets the SIGTERM, and torchrun (what `accelerate launch` runs for several processes) then sends its workers a
SIGTERM of its own; a Ctrl-C reaches the workers as SIGINT and, through torchrun, as SIGTERM. Those arrive
milliseconds apart and are the same request; torchrun then waits 30 s for its workers before it kills them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from upcycle.core.errors import TrainingError

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_S = 1.0  # a second signal sooner than this after the first is the same request, forwarded


class StoppedBySignal(TrainingError):
    """Training stopped on a signal after writing a checkpoint; exits 128 + the signal number (143, 130)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Within this context, the first SIGTERM or SIGINT sets `signum`; a second ends the process at once (unless it
    came within DUPLICATE_S of the first: see the module docstring).

    Outside the main thread Python cannot install handlers: the context then does nothing and the signals keep
    their usual effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            return
        if time.monotonic() - self._first < DUPLICATE_S:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            # None: the handler was set outside Python; the default is the closest we can restore
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> StopOnSignal:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
