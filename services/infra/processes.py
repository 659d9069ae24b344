"""Child processes that do not outlive their parent: used by the gateway's workers, the dev
platform, the local cloud and the benches."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For Popen's preexec_fn: the child gets SIGKILL when its parent dies."""
    # Runs in the child between fork and exec (after any setuid, which would clear it).
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
