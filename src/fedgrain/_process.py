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
    """Six hex digits of this machine's name and of this process's PID namespace: temporary
    names carry them with the process id, so that only leftovers whose process ids mean
    something here are ever removed (a folder shared with other machines, or with containers
    of this machine in other PID namespaces, holds theirs too)."""
    import hashlib
    import socket

    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return hashlib.sha256(f"{socket.gethostname()}/{ns}".encode()).hexdigest()[:6]


def owner_tag() -> str:
    """``HOST-PID`` of this process, for the names of its temporary files and folders."""
    return f"{host_tag()}-{os.getpid()}"


def left_by_dead(host: str, pid: str) -> bool:
    """Whether a name tagged ``HOST-PID`` was left by a process of this machine that no longer
    runs."""
    return host == host_tag() and not pid_alive(int(pid))
