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


def leftovers(folder, pattern):
    """The entries of ``folder`` whose names match ``pattern`` whole, as ``(path, match,
    age)`` (seconds since last modified): what the sweeps of dead processes' leftovers look
    at. An unreadable folder yields nothing; an entry gone meanwhile is skipped."""
    import time
    from pathlib import Path

    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        path = folder / name
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        yield path, m, age


def left_by_dead(host: str, pid: str) -> bool:
    """Whether a name tagged ``HOST-PID`` was left by a process of this machine that no longer
    runs."""
    return host == host_tag() and not pid_alive(int(pid))


#: Python's ``-W`` option that silences the resource trackers' report of what a dead process
#: left registered ("There appear to be N leaked semaphore objects ...").
_TRACKER_QUIET = "ignore:resource_tracker:UserWarning"


def quiet_resource_trackers(loky: bool = False) -> None:
    """Start multiprocessing's resource tracker (and loky's) if it does not run yet, without
    its report of leaked resources.

    Worker pools register their semaphores (and loky its memory-mapping folders) with a
    tracker process, which removes whatever is still registered when every process using it
    is gone: after a SIGKILL of the fitting process, it cleans up as it should, but then
    prints a multi-line warning per kind of resource on the terminal the process was killed
    from. The trackers read their warning filters from the command line they are started
    with, copied from ``sys.warnoptions``; the filter is added there only while they start.
    A tracker already running (started by the application) is left as it is.
    """
    import sys
    from multiprocessing import resource_tracker

    trackers = [resource_tracker]
    if loky:
        from joblib.externals.loky.backend import resource_tracker as loky_tracker

        trackers.append(loky_tracker)
    sys.warnoptions.append(_TRACKER_QUIET)
    try:
        for tracker in trackers:
            tracker.ensure_running()
    finally:
        sys.warnoptions.remove(_TRACKER_QUIET)
