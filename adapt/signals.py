"""Stopping cleanly on SIGTERM (a preempted GPU rental, `kill`, Slurm, Kubernetes) or SIGINT (Ctrl-C).

During training (`GracefulStop`), the first signal lets the current step finish; the loop then
writes a checkpoint, says where, and the run exits non-zero (128 + the signal's number, what a
shell reports for a process the signal killed, so schedulers requeue it); `--resume latest`
continues it exactly. A second signal stops at once (`Interrupted`): every file is written
atomically, so what is already on disk stays whole. Signals within REPEAT_SECONDS of the first
count as the same request: a launcher forwarding a signal its workers also got directly is not
a second one. With several processes, all stop after the same step (they agree every step).

Outside the loop, SIGTERM raises `Interrupted` too (instead of an instant death), so partial
files are cleaned up on the way out. Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time

from .errors import AdaptError

log = logging.getLogger("adapt")
REPEAT_SECONDS = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """Stop now. A KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class Stopped(AdaptError):
    """The run stopped after a step because of a signal; its checkpoint is written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def interrupt_on_sigterm() -> None:
    """For a whole command: SIGTERM stops it like Ctrl-C does (cleanly, exit 143)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


class GracefulStop:
    """`with GracefulStop() as stop:` ... `stop.check(...)` after every step."""

    def __init__(self):
        self.signum: int | None = None
        self._first = 0.0
        self._old: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            log.warning("%s: stopping after this step, with a checkpoint (send it again to stop at once)",
                        signal.Signals(signum).name)
        elif time.monotonic() - self._first > REPEAT_SECONDS:
            raise Interrupted(signum)

    def requested(self, accelerator) -> bool:
        """Whether any process got a stop signal (every process gets the same answer)."""
        flag = self.signum is not None
        if accelerator.num_processes > 1:
            import torch  # lazy: LIGHT module (the CLI installs the SIGTERM handler first)

            flag = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item() > 0
        return flag

    def check(self, accelerator, step: int, steps: int, saved, checkpoint) -> None:
        """At the end of a step: if a stop was asked for, make sure a checkpoint of this step
        exists (`saved`, or write one with `checkpoint()`), then raise Stopped saying where."""
        if not self.requested(accelerator):
            return
        path = (saved or checkpoint()) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        signum = self.signum or signal.SIGTERM
        where = f"checkpoint {path}" if path else "the checkpoint is written by the main process"
        raise Stopped(f"stopped by {signal.Signals(signum).name} after step {step} of {steps}; {where}. "
                      "Continue with --resume latest (same --output)", signum)


def graceful_stop(fn):
    """Run `fn` (the training loop) with a GracefulStop, passed to it as `stop=`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with GracefulStop() as stop:
            return fn(*args, stop=stop, **kwargs)

    return wrapper


def wait_forwarding(proc) -> int:
    """Wait for a launcher process (torchrun / accelerate launch) we started; a SIGTERM sent to us
    is passed on to it, and it passes it on to its workers once. Ctrl-C needs no forwarding: the
    terminal sends it to the launcher too (it is in our process group)."""
    forward = {signal.SIGTERM: lambda signum, frame: proc.send_signal(signum), signal.SIGINT: signal.SIG_IGN}
    old = {s: signal.signal(s, h) for s, h in forward.items()} if threading.current_thread() is threading.main_thread() else {}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
