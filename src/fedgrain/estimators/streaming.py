"""Streaming updates with drift monitoring, for the adaptive estimator (design.md 8).

A mixin of :class:`fedgrain.estimators.AdaptiveFederatedOrdinal`. ``partial_fit`` takes a
labelled batch, routes its rows to their leaves and

- feeds each leaf's per-row log-loss under its current model to the leaf's ADWIN detector:
  an increase is **concept drift** (the relationship changed there);
- counts each leaf's features against the leaf's reference profile
  (:class:`fedgrain.monitor.FeatureMonitor`): a shift in a leaf without concept drift is
  **covariate shift** (only the inputs moved);
- reacts: a leaf with concept drift is refitted on its rows since the change once there are
  enough of them, and again each time they double (until the window of recent rows is full),
  and the global model is pooled again from the leaf models; a covariate shift
  refreshes the leaf's reference profile and keeps its coefficients, which still fit. Other
  leaves and their data are not touched.

Every detection, refit and refresh is an entry of ``events_``.
"""

from __future__ import annotations

import copy
import datetime as _dt

import numpy as np

from ..core.likelihood import class_proba, monotonise
from ..exceptions import DataError
from ..inference import pooling
from ..inference.results import OrdinalResults
from ..monitor import ADWIN, FeatureMonitor, PageHinkley

#: Rows of each leaf kept for refits (the most recent).
WINDOW_ROWS = 20_000
#: Meta rounds run on the recent rows after a drift refit (with a meta-learner).
META_ROUNDS_AFTER_DRIFT = 3
#: Rows after a detected change before the leaf is refitted on them (at least 20 d as well).
REFIT_ROWS = 1_500
#: A covariate shift that moves a leaf's log density by more than this (a factor of 2) lets
#: the controller try to split the leaf on its recent rows.
DENSITY_CHANGE = float(np.log(2.0))
#: ADWIN on each leaf's loss: confidence of the cut test, rows per bucket.
ADWIN_DELTA = 1e-5
ADWIN_BUCKET = 100


class Streaming:
    """``partial_fit`` with monitoring (needs the adaptive estimator's fitted state)."""

    def _stream_state(self) -> dict:
        st = getattr(self, "_stream", None)
        if st is None:
            leaves = self.partition_.leaves
            st = self._stream = {
                "rows_seen": 0,
                "detectors": {nid: self._new_detector() for nid in leaves},
                "features": FeatureMonitor(self.profile_.leaves, leaves,
                                           list(self.schema_.output_names)),
                "windows": {nid: [] for nid in leaves},
                "pending": {},
                "followup": {},
            }
        return st

    def _new_detector(self):
        """A fresh detector for a leaf's loss stream (``drift_detector``)."""
        if self.drift_detector == "page_hinkley":
            return PageHinkley()
        return ADWIN(delta=ADWIN_DELTA, bucket=ADWIN_BUCKET)

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Update the model with a labelled batch, watching each leaf for drift.

        On a model not fitted yet, the first batch fits it. ``classes`` (as scikit-learn passes
        it) must then be the levels of the labels if given. A bad batch (other columns, an
        unknown label, no rows) raises before anything changes, and an error while reacting to
        drift restores the model as it was before the batch. Returns ``self``.
        """
        if not hasattr(self, "coef_"):
            self.fit(X, y, sample_weight=sample_weight)
            if classes is not None and not np.array_equal(np.asarray(classes),
                                                          self.classes_):
                raise DataError(f"classes={list(classes)} differs from the levels of the labels "
                                f"{list(self.classes_)}; give levels=[...] for their order.")
            return self
        Xe = self._encode(X)
        if Xe.shape[0] == 0:
            raise DataError("The batch is empty; pass at least one row.")
        codes = self.target_.encode(y, what="y")
        if codes.shape[0] != Xe.shape[0]:
            raise DataError(f"The batch has {Xe.shape[0]:,} rows of X and {codes.shape[0]:,} "
                            "labels; give one label per row.")
        if sample_weight is not None:
            raise DataError("partial_fit takes unweighted rows; repeat rows instead of "
                            "weighting them.")
        leaf = self._route(Xe)  # raises if the partition changed
        saved = self._snapshot()
        try:
            self._take_batch(Xe, codes, leaf)
        except BaseException:
            self.__dict__.update(saved)
            raise
        return self

    def _snapshot(self) -> dict:
        """What a batch may change, copied, to restore if reacting to it fails."""
        keep = {k: v for k, v in self.__dict__.items() if k != "_stream"}
        out = copy.copy(keep)
        out["partition_"] = copy.deepcopy(self.partition_)
        out["profile_"] = copy.deepcopy(self.profile_)
        out["events_"] = list(self.events_)
        out["global_model_"] = copy.copy(self.global_model_)
        out["_stream"] = copy.deepcopy(getattr(self, "_stream", None))
        return out

    def _take_batch(self, Xe: np.ndarray, codes: np.ndarray, leaf: np.ndarray) -> None:
        st = self._stream_state()
        eta, thr = self._routed_encoded(Xe, leaf)
        proba = class_proba(eta, thr)
        loss = -np.log(np.clip(proba[np.arange(codes.shape[0]), codes], 1e-15, 1.0))
        start = st["rows_seen"]
        st["rows_seen"] = start + Xe.shape[0]
        drifted = set()
        for pos, nid in enumerate(self.partition_.leaves):
            rows = np.flatnonzero(leaf == pos)
            if rows.size == 0:
                continue
            window = st["windows"][nid]
            window.append((Xe[rows], codes[rows], start + rows))
            self._trim(window)
            det = st["detectors"][nid]
            det.update(loss[rows])
            if det.drift_detected and nid not in st["pending"]:
                at = det.detection_index - (det.n_seen - rows.size)  # within this batch
                row = int(start + rows[min(max(at, 0), rows.size - 1)])
                drifted.add(nid)
                st["pending"][nid] = row
                st["followup"].pop(nid, None)
                self._event(st, "concept drift", nid, row, statistic=det.last_gap,
                            threshold=det.last_bound,
                            detail=f"the leaf's loss rose ({type(det).__name__}: its statistic "
                                   "crossed its bound)")
        shifted: dict[int, list] = {}
        for shift in st["features"].update(Xe, leaf, first_row=start):
            if shift["leaf"] not in drifted and shift["leaf"] not in st["pending"]:
                shifted.setdefault(shift["leaf"], []).append(shift)
        for nid, shifts in shifted.items():  # one event per leaf, naming its features
            worst = max(shifts, key=lambda t: t["psi"])
            names = ", ".join(f"'{t['feature']}' (KS {t['ks']:.3f}, PSI {t['psi']:.3f})"
                              for t in shifts)
            self._event(st, "covariate shift", nid, st["rows_seen"], statistic=worst["psi"],
                        threshold=st["features"].min_psi, detail=f"features {names}")
            before = self.profile_[nid].log_density
            self._refresh_reference(st, nid, since=worst["since"])
            after = self.profile_[nid].log_density
            if np.isfinite(before) and np.isfinite(after) and \
                    abs(after - before) > DENSITY_CHANGE:
                # the leaf's density moved: see whether its recent rows now form two regions
                Xw, cw = self._window_since(st["windows"][nid], worst["since"])
                self._try_split(st, nid, Xw, cw)
        d = self.cov_.shape[0]
        for nid, since in list(st["pending"].items()):
            if nid not in st["windows"]:  # merged away meanwhile
                del st["pending"][nid]
                continue
            Xw, cw = self._window_since(st["windows"][nid], since)
            if cw.shape[0] >= max(REFIT_ROWS, 20 * d) and np.unique(cw).shape[0] >= 2:
                del st["pending"][nid]
                # fit again as the new regime's rows double, until the window is full
                st["followup"][nid] = (since, 2 * cw.shape[0])
                self._refit_leaf(st, nid, Xw, cw, first=True)
        for nid, (since, due) in list(st["followup"].items()):
            if nid in st["pending"] or nid not in st["windows"]:
                st["followup"].pop(nid, None)
                continue
            Xw, cw = self._window_since(st["windows"][nid], since)
            if cw.shape[0] >= due:
                self._refit_leaf(st, nid, Xw, cw)
                st["followup"][nid] = (since, 2 * cw.shape[0])
                if 2 * cw.shape[0] > WINDOW_ROWS:
                    del st["followup"][nid]

    # ---- reactions -------------------------------------------------------------------------
    def _refit_leaf(self, st, nid: int, Xw: np.ndarray, cw: np.ndarray,
                    first: bool = False) -> None:
        """Fit the leaf again on its rows since the change (the global model follows); let
        the granularity controller merge it with its sibling, or on the first refit after the
        drift split it."""
        params, cov, filled = self._fit_rows(Xw, cw, seed=int(st["rows_seen"]))
        self.partition_.nodes[nid].n_rows = int(cw.shape[0])
        st["detectors"][nid] = self._new_detector()
        self._rebuild(st, {nid: (params, cov, filled)})
        self._event(st, "refit", nid, st["rows_seen"], statistic=float(cw.shape[0]),
                    threshold=float(REFIT_ROWS),
                    detail=f"refitted on the {cw.shape[0]:,} rows since the change was found")
        self._refresh_reference(st, nid, Xw, cw)
        # merge whenever both siblings are in the new regime and agree (each refit has more
        # rows to tell them apart); a split only on the first refit after the drift
        if self._try_merge(st, nid) is None and first:
            self._try_split(st, nid, Xw, cw)
        if first:
            self._meta_after_drift(st)

    def _meta_after_drift(self, st) -> None:
        """With a meta-learner: a few meta rounds on the leaves' recent rows, from the current
        global parameters, so the meta-learned model (what new subsets and unseen rows start
        from) follows the change. The leaves' own models are left as they are."""
        if self.meta not in ("fomaml", "reptile") or not np.isfinite(self._meta_state["rho"]):
            return
        from ..backends import SerialBackend
        from ..federation import meta as meta_module
        from ..federation.shards import build_shards

        leaves = [n for n in self.partition_.leaves if st["windows"].get(n)]
        if len(leaves) < 2:
            return
        parts = [self._window_since(st["windows"][n], -1) for n in leaves]
        X = np.concatenate([p_[0] for p_ in parts])
        c = np.concatenate([p_[1] for p_ in parts])
        labels = np.repeat(np.arange(len(leaves)), [p_[1].shape[0] for p_ in parts])
        p = self.schema_.n_features
        K = self.classes_.shape[0]
        backend = SerialBackend()
        refs = build_shards(backend, X, c, None, labels, len(leaves),
                            self.partition_.standardizer)
        try:
            settings = meta_module.MetaSettings(self.meta, p, K, int(self.inner_steps),
                                                float(self.validation_fraction))
            res = meta_module.run(backend, refs, [list(range(len(leaves)))], settings,
                                  self._meta_state["theta"], self._meta_state["P"],
                                  [int(st["rows_seen"]) + i for i in range(len(leaves))],
                                  leaves, rho0=self._meta_state["rho"],
                                  max_rounds=META_ROUNDS_AFTER_DRIFT,
                                  tol=float(self.meta_tol), fedprox_rho=1.0, work=None)
        finally:
            backend.release(refs)
        if np.isfinite(res.rho):
            self._meta_state = {**self._meta_state, "theta": res.theta, "rho": res.rho}
            self.meta_model_ = self._meta_model(res.theta, self._pooled_cov_std())
        self._event(st, "meta rounds", -1, st["rows_seen"],
                    statistic=float(res.history[-1]["val_loss"]) if res.history else 0.0,
                    threshold=float(self.meta_tol),
                    detail=f"{len(res.history)} round(s) on the leaves' recent rows; pull "
                           f"{res.rho:.3g} pseudo-rows")

    def _repool(self, removed: list, added: list) -> None:
        """The global model after leaf models were replaced: its information less the old
        models' plus the new ones' (inverse-variance, no refinement round: the old rows are
        gone). Nothing changes when nothing was replaced."""
        if not removed and not added:
            return
        info = pooling.inverse(self.cov_)
        rhs = info @ self.results_.params
        for sign, models in ((-1.0, removed), (1.0, added)):
            for params, cov in models:
                om = np.linalg.pinv(cov, rcond=1e-10, hermitian=True)
                info += sign * om
                rhs += sign * om @ params
        cov = pooling.inverse(info)
        params = cov @ rhs
        p = self.schema_.n_features
        params[p:] = monotonise(params[p:], np.diag(cov)[p:])
        r = self.results_
        results = OrdinalResults(params, cov, r.feature_names, r.classes,
                                 title="Adaptive federated ordinal regression: global model "
                                       "(leaves replaced after drift)", info=dict(r.info))
        self._set_fitted(self.schema_, self.target_, params, cov, results)
        self.global_model_._set_fitted(self.schema_, self.target_, params, cov, results)

    def _refresh_reference(self, st, nid: int, Xw=None, cw=None, since: int = -1) -> None:
        """The leaf's reference profile from its recent rows (those from row ``since`` on);
        coefficients untouched."""
        if Xw is None:
            Xw, cw = self._window_since(st["windows"][nid], since)
        if cw.shape[0] < 50:
            return
        old = self.profile_[nid]
        lp = self._profile(Xw, cw, nid)
        self.profile_.leaves[nid] = type(old)(
            old.n_rows, lp.class_counts, lp.mean, lp.log_density, old.importance,
            old.importance_source, old.centres, lp.low, lp.high, lp.edges, lp.cdf, lp.n_ref)
        st["features"].restart(nid)
        self._event(st, "profile refreshed", nid, st["rows_seen"], statistic=float(cw.shape[0]),
                    threshold=0.0, detail="reference distribution taken from the recent rows")

    # ---- persistence -----------------------------------------------------------------------
    def _stream_extra(self) -> tuple[dict | None, dict]:
        """The stream's state as JSON and arrays (None before the first ``partial_fit``)."""
        st = getattr(self, "_stream", None)
        if st is None:
            return None, {}
        meta = {"rows_seen": int(st["rows_seen"]),
                "pending": {str(k): int(v) for k, v in st["pending"].items()},
                "followup": {str(k): [int(a), int(b)] for k, (a, b) in st["followup"].items()},
                "detectors": {str(k): d.state() for k, d in st["detectors"].items()},
                "features": st["features"].state()}
        arrays = {}
        for nid, window in st["windows"].items():
            if window:
                arrays[f"stream_{nid}_X"] = np.concatenate([w[0] for w in window])
                arrays[f"stream_{nid}_y"] = np.concatenate([w[1] for w in window])
                arrays[f"stream_{nid}_rows"] = np.concatenate([w[2] for w in window])
        return meta, arrays

    def _restore_stream(self, meta: dict | None, arrays: dict) -> None:
        self._stream = None
        if meta is None:
            return
        st = self._stream_state()
        st["rows_seen"] = int(meta["rows_seen"])
        st["pending"] = {int(k): int(v) for k, v in meta["pending"].items()}
        st["followup"] = {int(k): (int(v[0]), int(v[1])) for k, v in meta["followup"].items()}
        for k, v in meta["detectors"].items():
            st["detectors"][int(k)].load_state(v)
        st["features"].load_state(meta["features"])
        for nid in st["windows"]:
            if f"stream_{nid}_X" in arrays:
                st["windows"][nid] = [(arrays[f"stream_{nid}_X"], arrays[f"stream_{nid}_y"],
                                       arrays[f"stream_{nid}_rows"])]

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _trim(window: list) -> None:
        total = sum(w[1].shape[0] for w in window)
        while window and total - window[0][1].shape[0] >= WINDOW_ROWS:
            total -= window[0][1].shape[0]
            window.pop(0)

    def _window_since(self, window: list, since: int):
        """The window's rows from stream row ``since`` on: features and class codes."""
        Xs = [w[0][w[2] >= since] for w in window]
        cs = [w[1][w[2] >= since] for w in window]
        if not cs:
            return np.empty((0, self.schema_.n_features)), np.empty(0, dtype=np.intp)
        return np.concatenate(Xs), np.concatenate(cs)

    def _event(self, st, kind: str, nid: int, row: int, *, statistic: float, threshold: float,
               detail: str) -> None:
        self.events_.append({
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "rows_seen": int(row), "leaf": int(nid), "kind": kind,
            "statistic": float(statistic), "threshold": float(threshold), "detail": detail,
        })
