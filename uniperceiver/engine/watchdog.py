"""A watchdog thread for the run's life: stop signals and collectives that never complete.

Python runs signal handlers only when the main thread returns to the interpreter, which it never
does while blocked in a gloo/NCCL collective whose peer stopped. So the handler's C half is
pointed at a pipe (`signal.set_wakeup_fd`) that this thread reads:
- first SIGTERM/SIGUSR1: the trainer is asked to stop (it saves at the end of its step and
  exits); if the process is still alive `stop_grace_s` later, it exits without saving;
- a second signal: the process exits at once (exit code 128 + signal, as if killed by it).
And while the trainer is inside a phase that waits on peers (`with watchdog.phase(...)`), a
phase that lasts longer than `collective_timeout_s` plus a margin ends the process with an error
naming the collective and the step. The process group's own timeout normally fires first (the
trainer then reports the same); the watchdog covers collectives that never return.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("uniperceiver.train")
EXIT_RUN_FAILED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _hard_exit(code: int, message: str) -> None:
    log.error(message)
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(code)


class Watchdog:
    def __init__(self, collective_timeout_s: float, stop_grace_s: float,
                 on_stop: Callable[[int], None], watch_collectives: bool = True) -> None:
        self.collective_timeout_s = collective_timeout_s
        self.stop_grace_s = stop_grace_s
        # The process group's own timeout gets the first chance to raise (a clearer error).
        self.margin_s = max(5.0, 0.1 * collective_timeout_s)
        self.on_stop = on_stop
        self.watch_collectives = watch_collectives
        self._phase: tuple[str, int, float] | None = None
        self._signals: list[tuple[int, float]] = []
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._old: dict[int, object] = {}
        self._old_wakeup = -1

    # ------------------------------------------------------------ main thread
    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: stop signals are not handled")
        else:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._pipe = (r, w)

            def handler(signum, _frame):  # runs later, in the main thread, between bytecodes
                self.on_stop(signum)

            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, handler)
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="uniperceiver-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pipe is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_wakeup)
            for sig, old in self._old.items():
                signal.signal(sig, old)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    @contextlib.contextmanager
    def phase(self, label: str, step: int) -> Iterator[None]:
        """Mark a stretch of the main thread that waits on every peer (a collective)."""
        self._phase = (label, step, time.monotonic())
        try:
            yield
        finally:
            self._phase = None

    def describe_phase(self) -> str:
        phase = self._phase
        return "no collective" if phase is None else f"collective '{phase[0]}' at step {phase[1]}"

    # ------------------------------------------------------------ watchdog thread
    def _run(self) -> None:
        while not self._closing.is_set():
            if self._pipe is not None:
                ready, _, _ = select.select([self._pipe[0]], [], [], 0.5)
                if ready:
                    with contextlib.suppress(OSError):
                        for signum in os.read(self._pipe[0], 64):
                            self._on_signal(signum)
            else:
                self._closing.wait(0.5)
            self._check()

    def _on_signal(self, signum: int) -> None:
        if signum not in STOP_SIGNALS:
            return
        self._signals.append((signum, time.monotonic()))
        if len(self._signals) >= 2:
            _hard_exit(128 + signum, f"second stop signal ({signal.Signals(signum).name}): exiting at once "
                                     f"({self.describe_phase()}; no checkpoint written)")
        log.warning("signal %s received: stopping after this step (exiting without a checkpoint if not done in "
                    "train.stop_grace_s=%g s)", signal.Signals(signum).name, self.stop_grace_s)

    def _check(self) -> None:
        now = time.monotonic()
        if self._signals:
            signum, since = self._signals[0]
            if now - since > self.stop_grace_s:
                _hard_exit(128 + signum, f"still running {now - since:.0f} s after {signal.Signals(signum).name} "
                                         f"(train.stop_grace_s={self.stop_grace_s:g}; blocked in "
                                         f"{self.describe_phase()}): exiting without a checkpoint")
        phase = self._phase
        if self.watch_collectives and phase is not None:
            label, step, since = phase
            if now - since > self.collective_timeout_s + self.margin_s:
                _hard_exit(EXIT_RUN_FAILED, f"collective '{label}' at step {step} has not completed in "
                                            f"{now - since:.0f} s (train.collective_timeout_s="
                                            f"{self.collective_timeout_s:g}): a peer stopped responding")
