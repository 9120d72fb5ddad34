"""Child processes that do not outlive the process that started them.

A process that starts long-lived children (the demo's broker and agents, ``LocalFleet``)
may itself be killed with SIGKILL, which runs none of its cleanup. So each child is the
leader of a process group of its own (a stop can signal the whole group, and a Ctrl-C at the
terminal reaches only the parent, which stops its children in order), and on Linux it asks
the kernel, between fork and exec, for a signal when its parent dies
(``prctl(PR_SET_PDEATHSIG)``). A parent that died before the child could ask is noticed
too: the child exits at once.

    proc = subprocess.Popen(cmd, **child_options())

Linux sends the signal when the *thread* that started the child ends: start children from a
thread that lives as long as they should (the main thread, say).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """What the child runs before exec: ask for ``sig`` when the parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # it died before we asked: do not outlive it
            os._exit(1)

    return preexec


def child_options(sig: int = signal.SIGKILL) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a child in its own process group that gets
    ``sig`` when this process dies (SIGKILL by default: nobody is left to hear from it)."""
    options: dict[str, Any] = {"start_new_session": True}
    preexec = _die_with_parent(sig)
    if preexec is not None:
        options["preexec_fn"] = preexec
    return options
