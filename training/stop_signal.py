"""The job's stop flag: SIGTERM and SIGUSR1 (Slurm's pre-emption signals) ask for a checkpoint at the
next step boundary, then exit 0.

A module of its own, importing nothing heavy, so that the entry point installs the handlers before it
imports torch and DeepSpeed (seconds): a signal that arrives during start-up is kept, not fatal.
"""

from __future__ import annotations

import signal
import threading

STOP = threading.Event()


def install_signal_handlers() -> None:
    """Route SIGTERM and SIGUSR1 to :data:`STOP` (idempotent)."""

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        STOP.set()

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, request_stop)


def stop_requested() -> bool:
    return STOP.is_set()
