"""SIGTERM (a cluster's preemption notice) and SIGINT (Ctrl-C): stop at a step boundary, resumable.

The first signal only sets a flag: the recipe finishes the optimizer step in progress, writes a
complete checkpoint, says so in one line and exits 143 (SIGTERM) or 130 (SIGINT), so that
`--resume latest` continues from exactly that step. Before training has started there is nothing
to save: the signal raises `Interrupted` at once. A second signal exits at once, whatever is going on.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + signum


class Interrupted(BaseException):
    """A signal arrived; `code` is the exit code the process should end with. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way turns it into another error."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.code = signum, exit_code(signum)


class StopFlag:
    """Installs the handlers (main thread only); `requested` is the first signal's number, or None."""

    def __init__(self, prog: str = "gkd-learner"):
        self.prog = prog
        self.requested: int | None = None
        self.armed = False  # True while training: a signal then waits for the step boundary
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            sys.stderr.write(f"\n{self.prog}: second signal ({name}): exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(exit_code(signum))
        self.requested = signum
        if not self.armed:
            raise Interrupted(signum, f"{name} before training started: nothing to save")
        sys.stderr.write(
            f"\n{self.prog}: {name}: finishing the current optimizer step, then writing a checkpoint "
            "(a second signal exits at once)\n"
        )
        sys.stderr.flush()
