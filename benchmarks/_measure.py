"""Memory measurement for the benchmarks (Linux only).

What is counted
---------------
The memory of a run is the RAM that the benchmark child and all its descendants (loky workers,
their resource tracker) hold, plus the RAM held by files that the run created under
``/dev/shm`` (tmpfs files live in RAM whether or not a process maps them):

    total = sum over the process tree of (Pss - Pss_Shmem)  +  allocated bytes of this run's
            /dev/shm files
          = sum of RssAnon (= Pss_Anon here)  +  sum of (Pss - Pss_Anon - Pss_Shmem)  +  files

``Pss`` (proportional set size, from ``/proc/PID/smaps_rollup``; the same number as
``psutil.Process.memory_full_info().pss``) counts every private page once and divides every
shared page among the processes that map it, so pages shared by the child and its workers
(libraries, copy-on-write pages) add up to one copy over the tree. ``Pss_Shmem`` is the part of
``Pss`` that comes from shmem/tmpfs pages, i.e. from mapped ``/dev/shm`` files. Those pages are
taken out of the PSS sum and counted instead, exactly once, as the allocated size
(``st_blocks * 512``) of the files: a shard mapped by the parent and two workers at once, or by
nobody (written, unmapped, waiting for a task), is counted once either way.

Reading ``smaps_rollup`` costs 1-4 ms per Python process (a page-table walk), too much to do
for three processes every 10 ms on a 2-core machine without disturbing the fit being measured.
So the anonymous part of PSS is sampled from the cheap ``RssAnon`` counter (equal to
``Pss_Anon`` for processes started by fork + exec, which share no anonymous pages; checked), and
the file-backed part is the PSS snapshot taken at the baseline (or when a process joins or
leaves the tree) plus any growth of the process's ``RssFile`` -- see :class:`TreeMemory`.

"This run's files" are the entries directly under ``/dev/shm`` that the child creates with
``tempfile.mkdtemp`` (recorded by an observing wrapper, :meth:`TreeMemory.watch_mkdtemp`: this is
how fedgrain's processes backend makes its ``fedgrain-XXXX`` shard folder), and any other entry
that did not exist when the :class:`TreeMemory` was created and that a process of the tree is
seen mapping (``/proc/PID/maps``, scanned every 100 ms while such unclassified entries exist)
within ``grace`` seconds of its appearance. The whole entry is counted from then on until it
disappears. Other people's ``fedgrain-*`` or ``joblib_memmapping_folder_*`` entries on the same
machine are therefore never counted. Caveats: a file unlinked while still mapped is no longer
counted (its pages leave the PSS sum as Pss_Shmem and have no file to stat); shmem mappings that
are not files of this run (POSIX semaphores of earlier runs, anonymous shared mappings) are also
left out -- the baseline sample carries the tree's ``Pss_Shmem`` so one can see it is small.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from pathlib import Path

SHM = Path("/dev/shm")
MB = 1024.0 * 1024.0
#: Re-read a process's file-backed PSS when its RssFile has grown this much since the last read.
RESNAP_FILE_GROWTH = 8 * 1024 * 1024


def read_rollup(pid: int) -> dict[str, int] | None:
    """``Pss``, ``Pss_Anon``, ``Pss_Shmem`` (bytes) of one process, or None when it has gone.

    Reading ``smaps_rollup`` walks the process's page tables: about 1-4 ms for a Python process
    with numpy / scipy loaded, too slow to do every 10 ms for several processes.
    """
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in data.split(b"\n"):
        if line.startswith((b"Pss:", b"Pss_Anon:", b"Pss_Shmem:")):
            k, v = line.split(b":")
            out[k.decode()] = int(v.split()[0]) * 1024
    return out if "Pss" in out else None


def read_rss(pid: int) -> tuple[int, int] | None:
    """``(RssAnon, RssFile)`` in bytes from ``/proc/PID/status``: counters, cheap (~0.02 ms)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = []
    for key in (b"RssAnon:", b"RssFile:"):
        i = data.find(key)
        if i < 0:
            return None
        out.append(int(data[i + len(key) : data.index(b"\n", i)].split()[0]) * 1024)
    return out[0], out[1]


def rss_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (bytes) of one process from ``/proc/PID/status``."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_hwm() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and give free heap memory back to the OS (glibc), before a baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _children(pid: int) -> list[int]:
    """All descendants of ``pid``, from ``/proc/*/stat`` (parent ids)."""
    parent: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: split after the last ')'
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        parent.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        kids = parent.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _entry_bytes(path: Path) -> int:
    """Allocated bytes of a file, or of all files below a folder (tmpfs: bytes in RAM)."""
    try:
        if path.is_dir():
            total = 0
            for root, _, files in os.walk(path):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_blocks * 512
                    except OSError:
                        pass
            return total
        return path.lstat().st_blocks * 512
    except OSError:
        return 0


class TreeMemory:
    """Memory of this process, its descendants and the ``/dev/shm`` files they create.

    One sample is ``anon + file + shm`` with

    - ``anon``: the sum of ``RssAnon`` over the tree, read from ``/proc/PID/status`` at every
      sample. The tree's processes are started by fork + exec (loky, subprocess), so they
      share no anonymous pages and ``RssAnon`` equals ``Pss_Anon`` (checked at the baseline and
      at the end of a window; the largest difference is kept in ``anon_mismatch``: a few MB at
      most, from the kernel's batched counters and the two files being read at different
      moments while memory changes).
    - ``file``: file-backed pages (libraries; no tmpfs). Per process: ``Pss - Pss_Anon -
      Pss_Shmem`` from ``/proc/PID/smaps_rollup`` at the last snapshot, plus the growth of
      ``RssFile`` since then. Snapshots are taken by :meth:`refresh_pss` at creation, at a
      baseline, and whenever a process joins or leaves the tree (the shared pages are then
      re-divided) or its ``RssFile`` has grown by more than 8 MB (a worker loading its
      libraries, mostly shared with the parent, would otherwise count them whole). Between
      snapshots the PSS of library pages is not re-read because it also
      moves when *unrelated* processes on the machine start or stop using the same libraries
      (measured: +-15 MB within a second on a busy machine), which is noise, not the fit's
      memory; pages the fit itself maps show up in ``RssFile``.
    - ``shm``: the allocated size of this run's ``/dev/shm`` entries (see the module docstring).

    So every sample is the tree's PSS without its shmem part, plus the run's shm files once.
    """

    def __init__(self, root: int | None = None, shm: Path = SHM, grace: float = 2.0):
        self.root = os.getpid() if root is None else root
        self.shm = shm
        self.grace = grace
        self.before = set(os.listdir(shm)) if shm.is_dir() else set()
        self.pids = [self.root]
        self.entries: set[str] = set()  # top-level /dev/shm entries of this run
        self.seen_entries: set[str] = set()
        self.pending: dict[str, float] = {}  # new entries not yet seen mapped by the tree
        self.foreign: set[str] = set()
        self.snap: dict[int, tuple[int, int]] = {}  # pid -> (file PSS, RssFile) at snapshot
        self.pss_shmem = 0
        self.anon_mismatch = 0
        self.maps_scans = 0
        self._lock = threading.RLock()
        self.refresh_pss()

    def watch_mkdtemp(self) -> None:
        """Record folders that this process creates under ``/dev/shm`` with ``tempfile.mkdtemp``.

        fedgrain's processes backend creates its shard folder that way; recording it at
        creation attributes it exactly, even when a fit is shorter than the 100 ms between
        two scans of ``/proc/PID/maps``. The wrapper only observes: it returns what
        ``mkdtemp`` returns.
        """
        import tempfile

        original = tempfile.mkdtemp
        if getattr(original, "_bench_watch", False):
            return

        def mkdtemp(*args, **kwargs):
            path = original(*args, **kwargs)
            p = Path(path)
            if p.parent == self.shm:
                with self._lock:
                    self.entries.add(p.name)
                    self.seen_entries.add(p.name)
                    self.pending.pop(p.name, None)
            return path

        mkdtemp._bench_watch = True
        tempfile.mkdtemp = mkdtemp

    def refresh_tree(self) -> None:
        """Re-read the process tree (and everyone's PSS when it has changed)."""
        with self._lock:
            pids = [self.root, *_children(self.root)]
            changed = set(pids) != set(self.pids)
            self.pids = pids
            if changed:
                # Shared library pages are re-divided when a process comes or goes: re-read all.
                self.refresh_pss()
            self._classify()

    def _classify(self) -> None:
        """Sort new /dev/shm entries into this run's (mapped by the tree) and others'."""
        try:
            names = set(os.listdir(self.shm))
        except OSError:
            return
        now = time.monotonic()
        for name in names - self.before - self.entries - self.foreign:
            self.pending.setdefault(name, now)
        for name in list(self.pending):
            if name not in names:
                del self.pending[name]
        if not self.pending:
            return
        prefix = str(self.shm) + "/"
        self.maps_scans += 1
        mapped = set()
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/maps") as f:
                    for line in f:
                        i = line.find(prefix)
                        if i >= 0:
                            mapped.add(line[i + len(prefix) :].split("/", 1)[0].split()[0])
            except OSError:
                continue
        for name, first in list(self.pending.items()):
            if name in mapped:
                self.entries.add(name)
                self.seen_entries.add(name)
                del self.pending[name]
            elif now - first > self.grace:
                self.foreign.add(name)
                del self.pending[name]

    def _rollup(self, pid: int, snapshot: bool) -> int:
        """Read one process's ``smaps_rollup``; returns its ``Pss_Shmem``."""
        r = read_rollup(pid)
        rss = read_rss(pid)
        if r is None or rss is None:
            if snapshot:
                self.snap.pop(pid, None)
            return 0
        if snapshot:
            self.snap[pid] = (r["Pss"] - r.get("Pss_Anon", 0) - r.get("Pss_Shmem", 0), rss[1])
        self.anon_mismatch = max(self.anon_mismatch, abs(r.get("Pss_Anon", rss[0]) - rss[0]))
        return r.get("Pss_Shmem", 0)

    def refresh_pss(self) -> None:
        """Snapshot every process's file-backed PSS (slow: ~1-4 ms per process)."""
        with self._lock:
            self.pss_shmem = sum(self._rollup(pid, True) for pid in self.pids)

    def check_anon(self) -> None:
        """Compare ``RssAnon`` with ``Pss_Anon`` now, without a new snapshot."""
        with self._lock:
            for pid in self.pids:
                self._rollup(pid, False)

    def sample(self) -> dict[str, int]:
        """One measurement (bytes): ``total`` = ``anon`` + ``file`` + ``shm_files``."""
        with self._lock:
            anon = file = anon_root = 0
            alive = []
            for pid in self.pids:
                rss = read_rss(pid)
                if rss is None:
                    self.snap.pop(pid, None)
                    continue
                alive.append(pid)
                anon += rss[0]
                if pid == self.root:
                    anon_root = rss[0]
                snap = self.snap.get(pid)
                if snap is None or rss[1] - snap[1] > RESNAP_FILE_GROWTH:
                    # New process, or one that maps many new file pages (a worker importing
                    # its libraries, mostly shared with the parent): take a fresh PSS.
                    self._rollup(pid, True)
                pss_file, rss_file = self.snap.get(pid, (0, rss[1]))
                file += pss_file + max(0, rss[1] - rss_file)
            self.pids = alive
            files = 0
            for e in list(self.entries):
                path = self.shm / e
                if not os.path.lexists(path):
                    self.entries.discard(e)
                    continue
                files += _entry_bytes(path)
            return {"total": anon + file + files, "anon": anon, "anon_root": anon_root,
                    "file": file, "shm_files": files, "pss_shmem": self.pss_shmem,
                    "n_procs": len(alive)}


class Sampler(threading.Thread):
    """Samples :class:`TreeMemory` every ``interval`` seconds in a daemon thread.

    The process tree and the new ``/dev/shm`` entries are re-read every ``tree_every``
    seconds. ``start_window()`` opens a
    measurement window (peak reset), ``end_window()`` closes it and returns the peak and the
    number of samples in it. ``status_path``, when given, receives a small JSON with the
    running peak every second (read by the parent after a timeout).
    """

    def __init__(self, mem: TreeMemory, interval: float = 0.01, tree_every: float = 0.1,
                 status_path: str | None = None):
        super().__init__(daemon=True)
        self.mem = mem
        self.interval = interval
        self.tree_every = tree_every
        self.status_path = status_path
        self.status: dict = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._peak: dict | None = None
        self._count = 0
        self._cost = 0.0
        self._n_cost = 0
        self._window = False

    def _record(self, s: dict) -> None:
        with self._lock:
            if self._window:
                self._count += 1
                if self._peak is None or s["total"] > self._peak["total"]:
                    self._peak = s

    def run(self) -> None:
        last_tree = last_status = time.perf_counter()
        while not self._halt.is_set():
            t0 = time.perf_counter()
            if t0 - last_tree >= self.tree_every:
                self.mem.refresh_tree()
                last_tree = t0
            s = self.mem.sample()
            self._record(s)
            t1 = time.perf_counter()
            self._cost += t1 - t0
            self._n_cost += 1
            if self.status_path and t1 - last_status >= 1.0:
                last_status = t1
                self._write_status()
            self._halt.wait(max(0.0, self.interval - (t1 - t0)))

    def _write_status(self) -> None:
        import json

        with self._lock:
            st = dict(self.status)
            if self._peak is not None:
                st["peak_so_far"] = self._peak["total"]
        st["shm_entries"] = sorted(self.mem.seen_entries)
        with self._write_lock:
            tmp = self.status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(st, f)
            os.replace(tmp, self.status_path)

    def set_status(self, **kw) -> None:
        with self._lock:
            self.status.update(kw)
        if self.status_path:
            self._write_status()

    def baseline(self, n: int = 5, gap: float = 0.02) -> dict:
        """Median of ``n`` samples taken now (after a tree and PSS refresh)."""
        self.mem.refresh_tree()
        self.mem.refresh_pss()
        xs = []
        for _ in range(n):
            xs.append(self.mem.sample())
            time.sleep(gap)
        xs.sort(key=lambda s: s["total"])
        return xs[len(xs) // 2]

    def start_window(self) -> None:
        with self._lock:
            self._peak = None
            self._count = 0
            self._window = True

    def end_window(self) -> dict:
        self.mem.refresh_tree()
        self.mem.check_anon()
        s = self.mem.sample()  # the state at the end counts too
        self._record(s)
        with self._lock:
            self._window = False
            peak, count = self._peak, self._count
        return {"peak": peak, "samples": count}

    def mean_cost(self) -> float:
        return self._cost / max(self._n_cost, 1)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2.0)

