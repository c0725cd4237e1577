"""The state of a monitored stream, typed: what ``partial_fit`` keeps between batches.

Per leaf: its recent rows (:class:`RecentRows`, chunks of :class:`Window`), its loss detectors
(against its own past, and against what its model expects), a pending drift (the stream row
where the change was found, until the leaf has rows enough to refit) and a follow-up (its
merge tried again, or a failed refit retried, when the new regime's rows double); per region,
the models that follow every batch (:class:`fedgrain.monitor.online.LeafFollower`). Saved with
the model (:meth:`StreamState.to_dict` / :meth:`StreamState.load`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .base import Detector
from .detectors import ReferenceCUSUM
from .features import FeatureMonitor
from .online import LeafFollower

#: Rows of each leaf kept for refits (the most recent).
WINDOW_ROWS = 20_000
#: Batches kept in the stream's trace (the most recent): what the report draws; and at most
#: this many leaf entries over them (a model of many leaves keeps fewer batches).
TRACE_BATCHES = 2_000
TRACE_CELLS = 100_000
#: Records of streamed files kept (``StreamState.inputs``, the latest): about 250 bytes each
#: in ``model.json``, so at most about 5 MB; a file fed before the latest 20,000 is no longer
#: recognised.
INPUTS_KEPT = 20_000


@dataclass(frozen=True)
class Window:
    """A chunk of a leaf's recent rows: encoded features, class codes, stream row numbers."""

    X: np.ndarray
    codes: np.ndarray
    rows: np.ndarray

    def since(self, row: int) -> Window:
        keep = self.rows >= row
        return Window(self.X[keep], self.codes[keep], self.rows[keep])


@dataclass
class RecentRows:
    """A leaf's most recent rows (at most :data:`WINDOW_ROWS`), in chunks as they came."""

    n_features: int
    chunks: list[Window] = field(default_factory=list)

    def add(self, chunk: Window) -> None:
        """Append a chunk and drop the oldest chunks beyond :data:`WINDOW_ROWS` rows."""
        self.chunks.append(chunk)
        total = sum(c.codes.shape[0] for c in self.chunks)
        while self.chunks and total - self.chunks[0].codes.shape[0] >= WINDOW_ROWS:
            total -= self.chunks[0].codes.shape[0]
            self.chunks.pop(0)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def since(self, row: int) -> Window:
        """The rows from stream row ``row`` on, as one window."""
        parts = [c.since(row) for c in self.chunks]
        if not parts:
            return Window(np.empty((0, self.n_features)), np.empty(0, dtype=np.intp),
                          np.empty(0, dtype=np.int64))
        return Window(np.concatenate([c.X for c in parts]),
                      np.concatenate([c.codes for c in parts]),
                      np.concatenate([c.rows for c in parts]))


@dataclass(frozen=True)
class FollowUp:
    """A leaf in a new regime since stream row ``since`` is looked at again once it has ``due``
    rows since then: its merge with its sibling is tried, or, when its refit on them failed
    (``refit``), the refit is tried again."""

    since: int
    due: int
    refit: bool = False


@dataclass
class StreamState:
    """Everything ``partial_fit`` remembers, per leaf and for the stream.

    ``references`` are the leaves' :class:`fedgrain.monitor.detectors.ReferenceCUSUM` (their
    losses against what their own models expect); ``followers`` the regions'
    :class:`fedgrain.monitor.online.LeafFollower` (the models that follow every batch), keyed
    by the region's node id (pieces of a region share one); ``granularity`` the working
    granularity factor the controller splits at (None until it first moves: the model's).
    """

    rows_seen: int
    detectors: dict[int, Detector]
    features: FeatureMonitor
    windows: dict[int, RecentRows]
    pending: dict[int, int] = field(default_factory=dict)
    followup: dict[int, FollowUp] = field(default_factory=dict)
    references: dict[int, Detector] = field(default_factory=dict)
    followers: dict[int, LeafFollower] = field(default_factory=dict)
    granularity: float | None = None  # the working granularity factor (None: the model's)
    #: per batch: the rows seen after it and, per leaf with rows in it, ``[rows, mean
    #: log-loss, detector statistic, its bound, reference CUSUM, its bound]`` (None: NaN)
    trace: list[dict] = field(default_factory=list)
    #: the files fed to the stream by ``fedgrain stream``, the latest :data:`INPUTS_KEPT`: per
    #: file its name, size and time of last change when read, the filter and target it was
    #: read with, its rows, the rows seen before it and when. A command run again on files the
    #: model already took does not feed their rows twice.
    inputs: list[dict] = field(default_factory=list)

    def add_input(self, file: str, size: int | None, mtime_ns: int | None, filter: str | None,
                  target: str, rows: int, before: int, at: str) -> None:
        """Record that ``file`` (as it was: ``size``, ``mtime_ns``), read with ``filter`` and
        ``target``, fed ``rows`` rows after ``before`` rows of the stream, at ``at``."""
        self.inputs.append({"file": str(file), "size": size, "mtime_ns": mtime_ns,
                            "filter": filter, "target": str(target), "rows": int(rows),
                            "rows_before": int(before), "at": str(at)})
        del self.inputs[: max(0, len(self.inputs) - INPUTS_KEPT)]

    def files_fed(self, filter: str | None, target: str) -> dict[str, dict]:
        """The latest record of each file read with ``filter`` and ``target``, by file name
        (one pass over the records, however many files are looked up)."""
        return {e["file"]: e for e in self.inputs
                if e["filter"] == filter and e["target"] == target}

    def record(self, entry: dict) -> None:
        """Add a batch to the trace, forgetting the oldest beyond :data:`TRACE_BATCHES`."""
        self.trace.append(entry)
        del self.trace[: max(0, len(self.trace) - TRACE_BATCHES)]
        cells = sum(len(e["leaf"]) for e in self.trace)
        drop = 0
        while cells > TRACE_CELLS and drop < len(self.trace) - 1:
            cells -= len(self.trace[drop]["leaf"])
            drop += 1
        del self.trace[:drop]

    @classmethod
    def start(cls, leaves: list[int], profiles: dict, feature_names: list[str],
              new_detector: Callable[[], Detector]) -> StreamState:
        """A fresh stream over these leaves (their profiles are the features' references)."""
        p = len(feature_names)
        return cls(0, {nid: new_detector() for nid in leaves},
                   FeatureMonitor(profiles, leaves, list(feature_names)),
                   {nid: RecentRows(p) for nid in leaves},
                   references={nid: ReferenceCUSUM() for nid in leaves})

    def snapshot(self) -> StreamState:
        """A copy to restore if a batch fails: the containers copied, the arrays they hold
        shared (chunks of recent rows, and the followers' arrays, are replaced by a batch, never
        written in place), the small detectors copied whole."""
        return StreamState(
            self.rows_seen, {n: d.copy() for n, d in self.detectors.items()},
            copy.deepcopy(self.features),
            {n: RecentRows(w.n_features, list(w.chunks)) for n, w in self.windows.items()},
            dict(self.pending), dict(self.followup),
            {n: d.copy() for n, d in self.references.items()},
            {r: f.copy() for r, f in self.followers.items()}, self.granularity,
            list(self.trace), list(self.inputs))

    def add_leaves(self, leaves: list[int], new_detector: Callable[[], Detector]) -> None:
        """State for leaves new to the stream (after a split or merge)."""
        p = len(self.features.feature_names)
        for nid in leaves:
            self.detectors.setdefault(nid, new_detector())
            self.references.setdefault(nid, ReferenceCUSUM())
            self.windows.setdefault(nid, RecentRows(p))
        self.features.set_leaves(leaves)

    def drop_leaf(self, nid: int) -> None:
        """Forget a leaf that was split or merged away."""
        for table in (self.windows, self.detectors, self.pending, self.followup,
                      self.references, self.followers):
            table.pop(nid, None)

    # ---- persistence -----------------------------------------------------------------------
    def to_dict(self) -> tuple[dict, dict]:
        """The state as JSON and arrays (the keys of saved models: keep them)."""
        meta = {"rows_seen": int(self.rows_seen),
                "pending": {str(k): int(v) for k, v in self.pending.items()},
                "followup": {str(k): [int(f.since), int(f.due), bool(f.refit)]
                             for k, f in self.followup.items()},
                "detectors": {str(k): d.state() for k, d in self.detectors.items()},
                "references": {str(k): d.state() for k, d in self.references.items()},
                "features": self.features.state(), "followers": {},
                "granularity": self.granularity, "trace": self.trace, "inputs": self.inputs}
        arrays = {}
        for rid, follower in self.followers.items():
            f_meta, f_arrays = follower.to_dict(f"follow_{rid}")
            meta["followers"][str(rid)] = f_meta
            arrays.update(f_arrays)
        for nid, window in self.windows.items():
            if window:
                w = window.since(np.iinfo(np.int64).min)
                arrays[f"stream_{nid}_X"] = w.X
                arrays[f"stream_{nid}_y"] = w.codes
                arrays[f"stream_{nid}_rows"] = w.rows
        return meta, arrays

    def load(self, meta: dict, arrays: dict) -> None:
        """Restore what :meth:`to_dict` saved into this fresh state (same leaves)."""
        self.rows_seen = int(meta["rows_seen"])
        self.pending = {int(k): int(v) for k, v in meta["pending"].items()}
        self.followup = {int(k): FollowUp(int(v[0]), int(v[1]), bool(v[2]) if len(v) > 2
                                          else False)
                         for k, v in meta["followup"].items()}
        for k, v in meta["detectors"].items():
            self.detectors[int(k)].load_state(v)
        for k, v in meta.get("references", {}).items():  # absent from older files
            self.references.setdefault(int(k), ReferenceCUSUM()).load_state(v)
        g = meta.get("granularity")
        self.granularity = None if g is None else float(g)
        self.trace = [_trace_entry(e) for e in meta.get("trace", [])]  # absent from older files
        self.inputs = [_input_entry(e) for e in meta.get("inputs", [])]  # absent from older
        if "followers" in meta:
            self.followers = {int(k): LeafFollower.from_dict(v, arrays, f"follow_{k}")
                              for k, v in meta["followers"].items()}
        self.features.load_state(meta["features"])
        for nid, window in self.windows.items():
            if f"stream_{nid}_X" in arrays:
                window.chunks = [Window(arrays[f"stream_{nid}_X"], arrays[f"stream_{nid}_y"],
                                        arrays[f"stream_{nid}_rows"])]


def _input_entry(entry) -> dict:
    """A saved record of a streamed file, checked."""
    keys = {"file": (str,), "size": (int, type(None)), "mtime_ns": (int, type(None)),
            "filter": (str, type(None)), "target": (str,), "rows": (int,),
            "rows_before": (int,), "at": (str,)}
    if not isinstance(entry, dict) or set(entry) != set(keys) or not all(
            type(entry[k]) in t for k, t in keys.items()):
        raise ValueError("a record of a streamed file does not hold its name, size, time, "
                         "filter, target, rows, rows before and time fed")
    if entry["rows"] < 0 or entry["rows_before"] < 0 or (entry["size"] or 0) < 0:
        raise ValueError("a record of a streamed file has a negative count")
    return dict(entry)


def _trace_entry(entry) -> dict:
    """A saved trace entry, checked: the rows seen and six numbers (or None) per leaf."""
    if not isinstance(entry, dict) or not isinstance(entry.get("leaf"), dict):
        raise ValueError("a stream trace entry is not a mapping of leaves")
    leaves = {}
    for k, v in entry["leaf"].items():
        if not isinstance(v, list) or len(v) != 6:
            raise ValueError("a stream trace entry does not hold six numbers per leaf")
        values = [None if x is None else float(x) for x in v]
        if values[0] is None or not 0 <= values[0] < 2**62:
            raise ValueError("a stream trace entry's row count is not a count")
        leaves[str(int(k))] = values
    rows = int(entry["rows_seen"])
    if not 0 <= rows < 2**62:
        raise ValueError("a stream trace entry's rows seen is not a count")
    return {"rows_seen": rows, "leaf": leaves}
