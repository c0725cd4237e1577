"""Processes: whether one still runs (to clean what dead fedgrain processes left behind)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs; one we may not signal counts as running, and so
    do this process and ids no process can have."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True
    return True


def host_tag() -> str:
    """Six hex digits of this machine's name: temporary names carry it with the process id,
    so that only this machine's dead processes' leftovers are ever removed (a folder shared
    with other machines or containers holds theirs too, whose process ids mean nothing here)."""
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def owner_tag() -> str:
    """``HOST-PID`` of this process, for the names of its temporary files and folders."""
    return f"{host_tag()}-{os.getpid()}"


def left_by_dead(host: str, pid: str) -> bool:
    """Whether a name tagged ``HOST-PID`` was left by a process of this machine that no longer
    runs."""
    return host == host_tag() and not pid_alive(int(pid))
