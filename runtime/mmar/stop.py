"""Stop signals: SIGTERM (Kubernetes stopping a pod, `kill`) and SIGINT (Ctrl-C) end a command with a message
and exit status 128 + the signal's number, after the atomic writes in flight have been undone.

`StopSignals` (one instance, `STOP`, installed by `mmar.cli` for the commands that write an MMAR) turns a
signal into `Stopped` where it lands, or, while a loop that can stop cleanly runs (`graceful()`, the
training loop), into a request that loop honours at its next safe point; a second signal stops at once.

A `Stopped` raised inside a library's write callback (a second SIGTERM during `torch.save`) can come out of
the library as another exception that only carries it as its context (`RuntimeError: [enforce fail at
inline_container.cc:672]`). `stop_in_chain` finds it, and `STOP.raised` remembers the last one raised, so
the command still ends as the signal's (143 / 130, "stopped"), never as a crash.

No torch, no engine: `mmar.engine` imports this, and `mmar.io` reads it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class Stopped(BaseException):
    """A stop signal ended the command. A BaseException, as KeyboardInterrupt: no `except Exception` of a
    library swallows it, and every `finally` (the atomic writes' clean-up) runs on the way out."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(detail or f"stopped by {signal.Signals(signum).name}")
        self.signum, self.detail = signum, detail

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """SIGTERM and SIGINT raise `Stopped` where they land, unless a loop that can stop cleanly is running
    (`graceful()`, the training loop): that loop is asked to stop (`requested`) and stops at its next safe
    point, within a training or validation step. A second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self.raised: Stopped | None = None  # the last Stopped a signal raised (see stop_in_chain)
        self._graceful = 0

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self._graceful and self.requested is None:
            self.requested = signum
            with contextlib.suppress(OSError):  # stderr gone (the `mmar run` reading it was killed): stop anyway
                print(f"{signal.Signals(signum).name} received: stopping at the end of the current step "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        self.raised = Stopped(signum)
        raise self.raised

    @contextlib.contextmanager
    def graceful(self) -> Iterator[StopSignals]:
        self._graceful += 1
        try:
            yield self
        finally:
            self._graceful -= 1

    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""


STOP = StopSignals()


def stop_in_chain(error: BaseException | None) -> BaseException | None:
    """The stop (`Stopped`, KeyboardInterrupt) that `error` hides in its chain (__cause__ / __context__), or
    None: a library that called back into Python while the signal landed reports its own failure instead."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (Stopped, KeyboardInterrupt)):
            return error
        error = error.__cause__ or error.__context__
    return None
