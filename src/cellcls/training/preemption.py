"""Graceful stops: SIGTERM (schedulers, ``kill``), SIGINT (Ctrl+C) and SIGUSR1 (SLURM's ``--signal``) end training
after the current step with a resumable checkpoint, instead of losing the epoch.

Under SLURM through submitit (``hydra/launcher=slurm``) preemption and time-outs arrive as SIGUSR2, whose submitit
handler requeues the job and exits at once. cellcls takes SIGUSR2 first, finishes the step, writes the checkpoint
and the run's status, then hands the signal to submitit's handler (:attr:`StopRequest.chain`), which requeues; with
``trainer.resume=auto`` the requeued job continues from that checkpoint.

A second signal of the same kind while the first is handled stops at once, as the default handler would.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from cellcls.infra import distributed

log = logging.getLogger(__name__)
SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)
CHAINED = getattr(signal, "SIGUSR2", None)  # taken only when someone (submitit) already handles it


class StopRequest:
    """Set by a signal; read by the training loop after each step (agreed among torchrun processes)."""

    def __init__(self, check_every: int = 1) -> None:
        self.signum: int | None = None
        self.chain: Callable[[int, FrameType | None], object] | None = None  # submitit's requeue, for SIGUSR2
        self.check_every = check_every
        self.phase: str | None = None  # a phase without steps (setup): check() stops at its safe points
        self.defer = False  # the final test: it finishes, then the run ends as it would have
        self._calls = 0

    def __call__(self) -> bool:
        self._calls += 1
        if self.check_every > 1:  # DDP: every process must stop after the same step
            if self._calls % self.check_every:
                return False
            return distributed.broadcast_flag(self.signum is not None)
        return self.signum is not None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        # no raising here: a signal lands anywhere (inside logging's lock, an at-fork hook) and an exception
        # there can be swallowed or leave a lock held; the loop and check() act on the flag at safe points
        if self.signum == signum:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        log.warning("%s received: %s (send it again to stop at once)", signal.Signals(signum).name, self.on_signal)

    @property
    def on_signal(self) -> str:
        if self.phase is not None:
            return f"stopping {self.phase.split(';')[0]}"
        if self.defer:
            return "finishing the test of best.pt first"
        return "stopping after the current step and writing a resumable checkpoint"

    def check(self) -> None:
        """At a safe point of a phase without steps (setup): raise TrainingInterrupted if a signal came."""
        if self.phase is not None and self.signum is not None:
            from cellcls.errors import TrainingInterrupted

            raise TrainingInterrupted(f"interrupted by {signal.Signals(self.signum).name} {self.phase}", self.signum,
                                      self.chain if self.signum == CHAINED else None)


@contextmanager
def stop_on_signals(check_every: int = 1) -> Iterator[StopRequest]:
    """Install the handlers for the duration of training (only possible in the main thread; elsewhere, e.g. a
    notebook's worker thread, signals keep their default behaviour)."""
    request = StopRequest(check_every)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in SIGNALS}
    if CHAINED is not None and callable(signal.getsignal(CHAINED)):
        request.chain = signal.getsignal(CHAINED)  # type: ignore[assignment]
        previous[CHAINED] = signal.signal(CHAINED, request.handle)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
