"""Faults of the process itself: a fit stopped by SIGTERM cleans up before it exits; one killed
by SIGKILL leaves no worker behind, and its temporary folders go with the next run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, /proc")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    n, p = 2_000_000, 10
    X = rng.standard_normal((n, p))
    y = np.digitize(X[:, 0] + rng.logistic(size=n), [-1, 0, 1])
    pd.DataFrame(X, columns=[f"x{i}" for i in range(p)]).assign(g=y).to_parquet(d / "d.parquet")
    return d


def _ours(pid: int) -> list[str]:
    """The temporary folders of process ``pid`` (shared memory and the temporary folder)."""
    return [f for base in ("/dev/shm", tempfile.gettempdir())
            for f in glob.glob(f"{base}/fedgrain-*{pid}-*")]


def _fit_until_working(big: Path, out: str):
    """Start ``fedgrain fit`` (processes backend, streamed Parquet) and wait until its workers
    run and its temporary folder exists."""
    proc = subprocess.Popen([sys.executable, "-m", "fedgrain.cli", "--quiet", "fit",
                             str(big / "d.parquet"), "--target", "g", "--workers", "2",
                             "--out", str(big / out)], stderr=subprocess.PIPE, text=True)
    end = time.time() + 60
    while time.time() < end and proc.poll() is None:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if _ours(proc.pid) and len(kids) >= 2:
            return proc, kids
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the fit did not start its workers within 60 s")


def _alive(kids) -> list[int]:
    out = []
    for k in kids:
        try:
            if k.is_running() and k.status() != psutil.STATUS_ZOMBIE:
                out.append(k.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_in_the_middle_of_a_fit_leaves_no_files_and_no_processes(big):
    proc, kids = _fit_until_working(big, "m_term")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    end = time.time() + 10
    while time.time() < end and (_alive(kids) or _ours(proc.pid)):
        time.sleep(0.2)
    assert _alive(kids) == [] and _ours(proc.pid) == []
    assert not (big / "m_term").exists()  # no half-written model either


def test_sigkill_leaves_no_worker_and_the_next_run_removes_its_folders(big):
    from fedgrain.backends.base import private_folder

    proc, kids = _fit_until_working(big, "m_kill")
    time.sleep(1.5)  # the workers are busy with their first tasks (they watch from then on)
    kids = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # not reaped yet: a zombie parent must not keep its workers alive
    end = time.time() + 10  # workers notice their parent is gone
    while time.time() < end and _alive(kids):
        time.sleep(0.2)
    assert _alive(kids) == [], [(k.pid, k.cmdline()[-2:]) for k in kids if k.pid in _alive(kids)]
    proc.wait(timeout=10)
    # SIGKILL cannot be caught: the folders stay until the next run, which removes them (one
    # made here in the dead process's name too, in case the fit had ended its spilling)
    from fedgrain._process import host_tag

    made = Path(tempfile.gettempdir()) / f"fedgrain-spill-{host_tag()}-{proc.pid}-abcdefgh"
    made.mkdir()
    past = time.time() - 120  # a later run: a dead process's folders go once a minute old
    for f in _ours(proc.pid):
        os.utime(f, (past, past))
    for base in {str(Path(f).parent) for f in _ours(proc.pid)}:
        private_folder("spill", base).rmdir()  # what a new run does first
    assert _ours(proc.pid) == []
    assert not (big / "m_kill").exists()
    # a live process's folders are never swept: this one's survive a sweep
    base = Path(tempfile.gettempdir())
    own = base / f"fedgrain-spill-{host_tag()}-{os.getpid()}-selftest"
    young = base / f"fedgrain-spill-{host_tag()}-{proc.pid}-youngone"  # dead, but just made
    own.mkdir()
    young.mkdir()
    os.utime(own, (past, past))
    try:
        private_folder("spill", base).rmdir()
        assert own.is_dir() and young.is_dir()
    finally:
        own.rmdir()
        young.rmdir()
