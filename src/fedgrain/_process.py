"""Processes: whether one still runs (to clean what dead fedgrain processes left behind)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs; one we may not signal counts as running, and so
    does this process."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
