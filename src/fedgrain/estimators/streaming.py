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

import datetime as _dt

import numpy as np

from .. import combine
from ..exceptions import DataError
from ..monitor import ADWIN, FeatureMonitor
from ..ordinal import class_proba
from ..profile import profile_rows
from ..results import OrdinalResults

#: Rows of each leaf kept for refits (the most recent).
WINDOW_ROWS = 20_000
#: Rows after a detected change before the leaf is refitted on them (at least 20 d as well).
REFIT_ROWS = 1_500
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
                "detectors": {nid: ADWIN(delta=ADWIN_DELTA, bucket=ADWIN_BUCKET)
                              for nid in leaves},
                "features": FeatureMonitor(self.profile_.leaves, leaves,
                                           list(self.schema_.output_names)),
                "windows": {nid: [] for nid in leaves},
                "pending": {},
                "followup": {},
                "adwin_delta": ADWIN_DELTA,
                "adwin_bucket": ADWIN_BUCKET,
            }
        return st

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Update the model with a labelled batch, watching each leaf for drift.

        On a model not fitted yet, the first batch fits it (``classes``, as scikit-learn passes
        it, is then only checked against the labels; give ``levels=`` for an order). The batch
        must have the columns the model was fitted on and only known labels; a bad batch raises
        before anything changes. Returns ``self``.
        """
        if not hasattr(self, "coef_"):
            return self.fit(X, y, sample_weight=sample_weight)
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
        st = self._stream_state()
        eta, thr = self._routed_encoded(Xe, leaf)
        proba = class_proba(eta, thr)
        loss = -np.log(np.clip(proba[np.arange(codes.shape[0]), codes], 1e-15, 1.0))
        start = st["rows_seen"]
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
                self._event(st, "concept drift", nid, row, statistic=float(loss[rows].mean()),
                            threshold=float(ADWIN_DELTA),
                            detail="the leaf's loss rose (ADWIN)")
        for shift in st["features"].update(Xe, leaf):
            nid = shift["leaf"]
            if nid in drifted or nid in st["pending"]:
                continue  # the relationship changed there: the refit takes care of it
            self._event(st, "covariate shift", nid, start + Xe.shape[0],
                        statistic=shift["psi"], threshold=st["features"].min_psi,
                        detail=f"feature '{shift['feature']}': KS {shift['ks']:.3f}, "
                               f"p {shift['p_value']:.2g}, PSI {shift['psi']:.3f}")
            self._refresh_reference(st, nid)
        st["rows_seen"] = start + Xe.shape[0]
        d = self.cov_.shape[0]
        for nid, since in list(st["pending"].items()):
            Xw, cw = self._window_since(st["windows"][nid], since)
            if cw.shape[0] >= max(REFIT_ROWS, 20 * d) and np.unique(cw).shape[0] >= 2:
                del st["pending"][nid]
                # fit again as the new regime's rows double, until the window is full
                st["followup"][nid] = (since, 2 * cw.shape[0])
                self._refit_leaf(st, nid, Xw, cw, first=True)
        for nid, (since, due) in list(st["followup"].items()):
            if nid in st["pending"] or nid not in st["windows"]:
                del st["followup"][nid]
                continue
            Xw, cw = self._window_since(st["windows"][nid], since)
            if cw.shape[0] >= due:
                self._refit_leaf(st, nid, Xw, cw)
                st["followup"][nid] = (since, 2 * cw.shape[0])
                if 2 * cw.shape[0] > WINDOW_ROWS:
                    del st["followup"][nid]
        return self

    # ---- reactions -------------------------------------------------------------------------
    def _refit_leaf(self, st, nid: int, Xw: np.ndarray, cw: np.ndarray,
                    first: bool = False) -> None:
        """Fit the leaf again on its rows since the change; on the first refit after a drift
        let the granularity controller merge or split it; pool the global model again."""
        params, cov, filled = self._fit_rows(Xw, cw, seed=int(st["rows_seen"]))
        self.partition_.nodes[nid].n_rows = int(cw.shape[0])
        st["detectors"][nid] = ADWIN(delta=ADWIN_DELTA, bucket=ADWIN_BUCKET)
        self._rebuild(st, {nid: (params, cov, filled)})
        self._event(st, "refit", nid, st["rows_seen"], statistic=float(cw.shape[0]),
                    threshold=float(REFIT_ROWS),
                    detail=f"refitted on the {cw.shape[0]:,} rows since the change")
        self._refresh_reference(st, nid, Xw, cw)
        if first and self._try_merge(st, nid) is None:
            self._try_split(st, nid, Xw, cw)
        self._repool(st)

    def _repool(self, st) -> None:
        """The global model again, by inverse-variance pooling of the leaf models."""
        d = self.cov_.shape[0]
        info = np.zeros((d, d))
        rhs = np.zeros(d)
        for m in self.local_models_:
            om = np.linalg.pinv(m.cov_, rcond=1e-10, hermitian=True)
            info += om
            rhs += om @ m.results_.params
        cov = combine.inverse(info)
        params = cov @ rhs
        p = self.schema_.n_features
        params[p:] = combine.monotonise(params[p:], np.diag(cov)[p:])
        r = self.results_
        results = OrdinalResults(params, cov, r.feature_names, r.classes,
                                 title="Adaptive federated ordinal regression: global model "
                                       "(pooled again from the leaf models after drift)",
                                 info={**r.info, "Rows seen in the stream":
                                       f"{st['rows_seen']:,}"})
        self._set_fitted(self.schema_, self.target_, params, cov, results)
        self.global_model_._set_fitted(self.schema_, self.target_, params, cov, results)

    def _refresh_reference(self, st, nid: int, Xw=None, cw=None) -> None:
        """The leaf's reference profile from its recent rows (coefficients untouched)."""
        if Xw is None:
            Xw, cw = self._window_since(st["windows"][nid], -1)
        if cw.shape[0] < 50:
            return
        std = self.partition_.standardizer
        old = self.profile_[nid]
        lp = profile_rows(std.transform(Xw), cw, None, std, self.classes_.shape[0],
                          old.n_rows / max(sum(v.n_rows for v in self.profile_.leaves.values()),
                                           1), None, np.random.default_rng(nid), None)
        self.profile_.leaves[nid] = type(old)(
            int(cw.shape[0]), lp.class_counts, lp.mean, lp.log_density, old.importance,
            old.importance_source, old.centres, lp.low, lp.high, lp.edges, lp.cdf)
        st["features"].profiles = self.profile_.leaves
        if nid in st["features"]._below:
            st["features"]._start(nid)
        self._event(st, "profile refreshed", nid, st["rows_seen"], statistic=float(cw.shape[0]),
                    threshold=0.0, detail="reference distribution taken from the recent rows")

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _trim(window: list) -> None:
        total = sum(w[1].shape[0] for w in window)
        while window and total - window[0][1].shape[0] >= WINDOW_ROWS:
            total -= window[0][1].shape[0]
            window.pop(0)

    @staticmethod
    def _window_since(window: list, since: int):
        Xs = [w[0][w[2] >= since] for w in window]
        cs = [w[1][w[2] >= since] for w in window]
        if not cs:
            return np.empty((0, 0)), np.empty(0, dtype=np.intp)
        return np.concatenate(Xs), np.concatenate(cs)

    def _event(self, st, kind: str, nid: int, row: int, *, statistic: float, threshold: float,
               detail: str) -> None:
        self.events_.append({
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "rows_seen": int(row), "leaf": int(nid), "kind": kind,
            "statistic": float(statistic), "threshold": float(threshold), "detail": detail,
        })
