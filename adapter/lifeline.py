"""A worker process of `homeward serve` ends when serve does, so an orphan never runs beside a new serve."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """In a worker: get SIGTERM when the serve process dies, and stop at once if it is already gone.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a worker outlives a SIGKILLed serve. The signal
    comes when the *thread* that started the worker ends, so serve starts workers from threads that
    live as long as it does.
    """
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent == 1 or os.getppid() != parent:
        sys.exit(0)
