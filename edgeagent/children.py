"""Child processes that die with the agent.

Owns `die_with_parent`, the `preexec_fn` of every child the agent starts (the
spool's schema child, journalctl): between fork and exec it asks the kernel to
SIGKILL the child when its parent dies (PR_SET_PDEATHSIG), so a kill -9 of the
agent leaves no journalctl following the journal and no schema child holding
the spool. That request only covers a parent alive when it is made: a parent
killed after the fork and before it is seen by the child's parent pid no
longer being the agent's, and the child exits there, before exec.

Where ctypes or prctl is missing (a stripped Python, another C library) there
is nothing to run: a child then ends on its own (journalctl at its next write
to the closed pipe, the schema child when its migration is done).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """The `preexec_fn` that makes a child die with this process, or None where
    that cannot be had. prctl is looked up here, in the parent: the child, a
    fork of a process with threads, loads nothing between fork and exec."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between the fork and the line above
            os._exit(1)

    return in_child
