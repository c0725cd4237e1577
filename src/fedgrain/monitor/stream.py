"""The drift reaction: what ``partial_fit`` does with a labelled batch (docs/method.md 5).

:class:`DriftMonitor` works on a fitted :class:`fedgrain.AdaptiveFederatedOrdinal` and its
:class:`fedgrain.monitor.state.StreamState` (``stream_``). For a batch it routes the rows to
their leaves and

- feeds each leaf's per-row log-loss under its current model to the leaf's detector (ADWIN, or
  Page-Hinkley), and its excess over what the model expects to the leaf's reference CUSUM: an
  increase is **concept drift** (the relationship changed there);
- **updates the model** with every batch: each region's follower
  (:class:`fedgrain.monitor.online.LeafFollower`) learns from the region's rows and serves the
  forgetting rate that predicts best, and the global model is pooled again from the leaves'
  parts;
- counts each leaf's features against the leaf's reference profile
  (:class:`fedgrain.monitor.FeatureMonitor`): a shift in a leaf without concept drift is
  **covariate shift** (only the inputs moved);
- reacts: a leaf with concept drift is refitted on its rows since the change once there are
  enough of them (its region's follower then starts from the refit and keeps its memory), and
  the global model is pooled again from the leaf models; the granularity controller
  (:mod:`fedgrain.monitor.controller`) may then merge the leaf with its sibling or split it,
  and tries the merge again each time the rows since the change double (the follow-ups). A
  covariate shift refreshes the leaf's reference profile and keeps its coefficients, which
  still fit; when it moves the leaf's density, the controller may split the leaf. Other leaves
  and their data are not touched.

Every detection, refit and refresh is an entry of the model's ``events_``. The model provides
the leaf fits and the re-pooling (``_fit_rows``, ``_replace_leaves``); this module decides when.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace

import numpy as np

from .._warnings import warn
from ..backends import SerialBackend
from ..core.likelihood import class_proba, row_log_loss
from ..federation import meta
from ..federation.leaves import LeafSeparationError
from ..federation.personalise import learns_pull, with_theta
from ..federation.shards import build_shards
from ..inference import local
from ..inference.results import parameter_names
from .base import Detector
from .controller import GranularityController
from .detectors import ADWIN, PageHinkley, ReferenceCUSUM, standardised_excess
from .online import MEMORIES, SWITCH_Z, LeafFollower, follow_global
from .state import WINDOW_ROWS, FollowUp, StreamState, Window

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
#: Every row since the stream started.
ALL_ROWS = -1


class DriftMonitor:
    """Takes a batch for a fitted adaptive model: detection and the reactions to it."""

    def __init__(self, model):
        self.model = model
        if model.stream_ is None:
            model.stream_ = self.new_state(model)
        self.state: StreamState = model.stream_
        self.controller = GranularityController(self)

    @staticmethod
    def new_state(model) -> StreamState:
        """A fresh stream over the model's leaves."""
        return StreamState.start(model.partition_.leaves, model.profile_.leaves,
                                 list(model.schema_.output_names),
                                 lambda: new_detector(model.drift_detector))

    def new_detector(self) -> Detector:
        return new_detector(self.model.drift_detector)

    # ---- a batch ---------------------------------------------------------------------------
    def take_batch(self, Xe: np.ndarray, codes: np.ndarray, leaf: np.ndarray) -> None:
        st = self.state
        eta, thr = self.model._routed_encoded(Xe, leaf)
        proba = class_proba(eta, thr)
        loss = row_log_loss(proba, codes)
        excess = standardised_excess(proba, codes)
        start = st.rows_seen
        st.rows_seen = start + Xe.shape[0]
        drifted = self._detect_concept_drift(Xe, codes, leaf, loss, excess, start)
        self._record(leaf, loss)
        self._react_to_covariate_shift(Xe, leaf, start, drifted)
        self._follow(Xe, codes, leaf)
        self._refit_pending()
        self._follow_up()

    def _detect_concept_drift(self, Xe, codes, leaf, loss, excess, start: int) -> set:
        """Each leaf's losses to its detector (against the leaf's own past) and their excess
        over what its model expects to its reference CUSUM (against the fit); either one
        crossing its bound is concept drift."""
        st, model = self.state, self.model
        drifted = set()
        for pos, nid in enumerate(model.partition_.leaves):
            rows = np.flatnonzero(leaf == pos)
            if rows.size == 0:
                continue
            st.windows[nid].add(Window(Xe[rows], codes[rows], start + rows))
            found = []
            det = st.detectors[nid]
            det.update(loss[rows])
            if det.drift_detected:
                found.append((det, "the leaf's loss rose"))
            ref = st.references[nid]
            ref.update(excess[rows] - model.reference_excess_.get(nid, 0.0))
            if ref.drift_detected:
                found.append((ref, "the leaf's loss is above what its model expects"))
            if not found or nid in st.pending:
                continue
            first, why = min(found, key=lambda f: f[0].detection_index - f[0].n_seen)
            at = first.detection_index - (first.n_seen - rows.size)  # within this batch
            row = int(start + rows[min(max(at, 0), rows.size - 1)])
            drifted.add(nid)
            st.pending[nid] = row
            st.followup.pop(nid, None)
            self.event("concept drift", nid, row, statistic=first.last_gap,
                       threshold=first.last_bound,
                       detail=f"{why} ({type(first).__name__}: its statistic crossed its "
                              "bound)")
        return drifted

    def _record(self, leaf: np.ndarray, loss: np.ndarray) -> None:
        """The batch in the stream's trace: each leaf's rows, mean loss and its detectors'
        statistics against their bounds (after the batch, or where a detector alarmed in
        it, the statistic that crossed)."""
        st = self.state
        out = {}
        for pos, nid in enumerate(self.model.partition_.leaves):
            rows = leaf == pos
            if not rows.any():
                continue
            values = [float(rows.sum()), float(np.mean(loss[rows]))]
            for det in (st.detectors[nid], st.references[nid]):  # at its alarm, if it rang
                values += ([det.last_gap, det.last_bound] if det.drift_detected
                           else list(det.statistic()))
            out[str(nid)] = [round(v, 6) if np.isfinite(v) else None for v in values]
        st.record({"rows_seen": int(st.rows_seen), "leaf": out})

    def _follow(self, Xe, codes, leaf) -> None:
        """Every batch updates the model: each region's follower learns from the region's rows
        and serves its chosen candidate to the region's leaves, and each leaf's part of the
        global model takes the batch (forgetting at the region's chosen memory); the global
        model is pooled again from the parts."""
        st, model = self.state, self.model
        tree = model.partition_
        region_of = tree.region_of()
        Xs = tree.standardizer.transform(Xe)
        meat = local.meat_kind(model.variance)
        point = model._global_point()
        served, parts = {}, {}
        for rid in np.unique(region_of):
            positions = np.flatnonzero(region_of == rid)
            in_region = np.isin(leaf, positions)
            if not in_region.any():
                continue
            fol = self._follower(int(rid))
            switch = fol.take(Xs[in_region], codes[in_region], meat)
            if switch is not None:
                abrupt = any(tree.leaves[q] in st.pending or tree.leaves[q] in st.followup
                             for q in positions)
                self._switch_event(int(rid), switch, abrupt)
            memory = np.inf if fol.chosen == 0 else MEMORIES[fol.chosen - 1]
            for pos in positions:
                rows = np.flatnonzero(leaf == pos)
                served[int(pos)] = fol.served()
                if rows.size:
                    parts[int(pos)] = follow_global(model._contributions[pos], Xs[rows],
                                                    codes[rows], point, memory, meat)
        model._follow_leaves(served, parts)

    def _follower(self, rid: int) -> LeafFollower:
        """The region's follower, started from its current model when it has none."""
        st = self.state
        if rid not in st.followers:
            theta, cov, free = self.model._leaf_standardised(rid)
            st.followers[rid] = LeafFollower.start(theta, cov, free)
        return st.followers[rid]

    def _switch_event(self, rid: int, switch: dict, abrupt: bool) -> None:
        """The region's follower changed its served candidate: "gradual drift" when a
        forgetting track replaced the unforgetting or the fitted model with no abrupt change
        found in the region, "forgetting" otherwise."""
        before, after = LeafFollower.label(switch["from"]), LeafFollower.label(switch["to"])
        m = switch["losses"]
        kind = "gradual drift" if switch["from"] in (0, 1) and switch["to"] > 1 and \
            not abrupt else "forgetting"
        self.event(kind, rid, self.state.rows_seen, statistic=switch["z"], threshold=SWITCH_Z,
                   detail=f"the region's model now follows with {after} (prequential log-loss "
                          f"{m[switch['to']]:.4f} against {m[switch['from']]:.4f} with "
                          f"{before}, z = {switch['z']:.1f})")

    def _react_to_covariate_shift(self, Xe, leaf, start: int, drifted: set) -> None:
        st = self.state
        profile = self.model.profile_
        shifted: dict[int, list] = {}
        for shift in st.features.update(Xe, leaf, first_row=start):
            if shift["leaf"] not in drifted and shift["leaf"] not in st.pending:
                shifted.setdefault(shift["leaf"], []).append(shift)
        for nid, shifts in shifted.items():  # one event per leaf, naming its features
            worst = max(shifts, key=lambda t: t["psi"])
            names = ", ".join(f"'{t['feature']}' (KS {t['ks']:.3f}, PSI {t['psi']:.3f})"
                              for t in shifts)
            self.event("covariate shift", nid, st.rows_seen, statistic=worst["psi"],
                       threshold=st.features.min_psi, detail=f"features {names}")
            before = profile[nid].log_density
            recent = st.windows[nid].since(worst["since"])
            self.refresh_reference(nid, recent)
            after = profile[nid].log_density
            if np.isfinite(before) and np.isfinite(after) and \
                    abs(after - before) > DENSITY_CHANGE:
                # the leaf's density moved: see whether its recent rows now form two regions
                self.controller.try_split(nid, recent)

    def _refit_pending(self) -> None:
        st = self.state
        d = self.model.cov_.shape[0]
        for nid, since in list(st.pending.items()):
            if nid not in st.windows:  # merged away meanwhile
                del st.pending[nid]
                continue
            recent = st.windows[nid].since(since)
            n = recent.codes.shape[0]
            if n >= max(REFIT_ROWS, 20 * d) and np.unique(recent.codes).shape[0] >= 2:
                del st.pending[nid]
                # looked at again as the new regime's rows double, until the window is full
                st.followup[nid] = FollowUp(since, 2 * n)
                if not self.refit_leaf(nid, recent) and nid in st.followup:
                    st.followup[nid] = FollowUp(since, 2 * n, refit=True)

    def _follow_up(self) -> None:
        """A leaf in a new regime, each time its rows since the change have doubled: its
        merge with its sibling is tried (their models follow the new regime batch by batch,
        so they are compared as they stand), or its refit again when the last one failed.
        The region's unforgetting track already follows every row since the change: a refit
        on them would add nothing but a restart."""
        st = self.state
        for nid, f in list(st.followup.items()):
            if nid in st.pending or nid not in st.windows:
                st.followup.pop(nid, None)
                continue
            recent = st.windows[nid].since(f.since)
            n = recent.codes.shape[0]
            if n < f.due:
                continue
            retry = f.refit
            st.followup[nid] = FollowUp(f.since, 2 * n, refit=retry)
            if retry:
                ok = self.refit_leaf(nid, recent)
                if nid in st.followup:
                    st.followup[nid] = FollowUp(f.since, 2 * n, refit=not ok)
            else:
                self.controller.try_merge(nid)
            if nid in st.followup and 2 * n > WINDOW_ROWS:
                del st.followup[nid]

    # ---- reactions -------------------------------------------------------------------------
    def refit_leaf(self, nid: int, recent: Window) -> bool:
        """Fit the leaf again on its rows since the change (the global model follows); let
        the granularity controller merge it with its sibling, or split it. False when the
        rows allow no finite model (the leaf keeps its own)."""
        st, model = self.state, self.model
        n = recent.codes.shape[0]
        try:
            leaf_model = model._fit_rows(recent.X, recent.codes, seed=int(st.rows_seen))
        except LeafSeparationError as exc:
            # no finite model on these rows: the leaf keeps its model, and is tried again when
            # its rows since the change have doubled (its follow-up)
            names = parameter_names(model.schema_.output_names, model.target_.classes)
            along = ", ".join(names[j] for j in exc.indices)
            detail = (f"the {n:,} rows since the change are (quasi-)separated along {along}: "
                      "no finite model; the leaf keeps its previous model until more rows come")
            warn(f"Leaf {nid}: {detail}.", UserWarning)
            self.event("refit failed", nid, st.rows_seen, statistic=float(n),
                       threshold=float(REFIT_ROWS), detail=detail)
            return False
        model.partition_.nodes[nid].n_rows = int(n)
        st.detectors[nid] = self.new_detector()
        self.replace_leaves({nid: leaf_model}, refit=True)
        notes = list(leaf_model[2]) if len(leaf_model) > 2 else []
        missing = f"; not identified in the leaf: {', '.join(notes)}" if notes else ""
        self.event("refit", nid, st.rows_seen, statistic=float(n), threshold=float(REFIT_ROWS),
                   detail=f"refitted on the {n:,} rows since the change was found{missing}")
        self.refresh_reference(nid, recent, refit=True)
        # merge when both siblings are in the new regime and agree (tried again as their rows
        # double: the follow-ups), else see whether the new regime splits the leaf
        if self.controller.try_merge(nid) is None:
            self.controller.refine(nid)
            self.controller.try_split(nid, recent)
        self._meta_after_drift()
        return True

    def replace_leaves(self, models: dict, refit: bool = False) -> None:
        """New or changed leaf models into the model (which re-pools its global model), and
        stream state for leaves new to the stream; the leaves' reference excess is measured
        on their rows. The followers of their regions start again from the new models; after
        a ``refit`` of a leaf on its recent rows they keep their choice of memory and
        prequential history (:meth:`LeafFollower.reseed`)."""
        model, st = self.model, self.state
        model._replace_leaves(models, st.rows_seen)
        st.add_leaves(model.partition_.leaves, self.new_detector)
        region_of = model.partition_.region_of()
        leaves = model.partition_.leaves
        for nid, m in models.items():
            pos = leaves.index(nid)
            rid = int(region_of[pos])
            fol = st.followers.pop(rid, None)
            if refit and fol is not None:  # every candidate restarts from the refitted model
                st.followers[rid] = fol.reseed(*model._leaf_standardised_at(pos))
            st.references[nid] = ReferenceCUSUM()
            if len(m) > 4:  # the rows it was fitted on (standardised)
                model.reference_excess_[nid] = model._mean_excess(m.X, m.codes, nid)
        live = set(int(r) for r in region_of)
        for rid in [r for r in st.followers if r not in live]:
            del st.followers[rid]

    def _meta_after_drift(self) -> None:
        """With a meta-learner: a few meta rounds on the leaves' recent rows, from the current
        global parameters, so the meta-learned model (what new subsets and unseen rows start
        from) follows the change. The leaves' own models are left as they are."""
        model, st = self.model, self.state
        ms = model.meta_state_
        if not learns_pull(model.meta) or not np.isfinite(ms.rho):
            return
        leaves = [n for n in model.partition_.leaves if st.windows.get(n)]
        if len(leaves) < 2:
            return
        parts = [st.windows[n].since(ALL_ROWS) for n in leaves]
        X = np.concatenate([w.X for w in parts])
        c = np.concatenate([w.codes for w in parts])
        labels = np.repeat(np.arange(len(leaves)), [w.codes.shape[0] for w in parts])
        p = model.schema_.n_features
        backend = SerialBackend()
        refs = build_shards(backend, X, c, None, labels, len(leaves),
                            model.partition_.standardizer)
        try:
            settings = meta.MetaSettings(model.meta, p, model.classes_.shape[0],
                                         int(model.inner_steps),
                                         float(model.validation_fraction))
            res = meta.run(backend, refs, [list(range(len(leaves)))], settings, ms.theta, ms.P,
                           [int(st.rows_seen) + i for i in range(len(leaves))], leaves,
                           rho0=ms.rho, max_rounds=META_ROUNDS_AFTER_DRIFT,
                           tol=float(model.meta_tol), fedprox_rho=1.0, work=None)
        finally:
            backend.release(refs)
        if np.isfinite(res.rho):
            model.meta_state_ = with_theta(ms, res.theta, res.rho)
            model.meta_model_ = model._meta_model(res.theta, model._pooled_cov_std())
        self.event("meta rounds", -1, st.rows_seen,
                   statistic=float(res.history[-1]["val_loss"]) if res.history else 0.0,
                   threshold=float(model.meta_tol),
                   detail=f"{len(res.history)} round(s) on the leaves' recent rows; pull "
                          f"{res.rho:.3g} pseudo-rows")

    def refresh_reference(self, nid: int, recent: Window, refit: bool = False) -> None:
        """The leaf's reference profile from these recent rows; coefficients untouched.

        The range the leaf's model was fitted on (``seen_low``, ``seen_high``: rows in it are
        never unseen) becomes these rows' after a refit on them (``refit``); after a covariate
        shift the model is the old one, so its old range stays seen, widened by these rows'.
        """
        if recent.codes.shape[0] < 50:
            return
        profile = self.model.profile_
        old = profile[nid]
        lp = self.controller.profile(recent, nid)
        seen_low, seen_high = lp.seen_low, lp.seen_high
        if not refit and old.seen_low is not None and old.seen_high is not None:
            seen_low = np.minimum(old.seen_low, seen_low)
            seen_high = np.maximum(old.seen_high, seen_high)
        profile.leaves[nid] = replace(
            old, class_counts=lp.class_counts, mean=lp.mean, log_density=lp.log_density,
            low=lp.low, high=lp.high, edges=lp.edges, cdf=lp.cdf, n_ref=lp.n_ref,
            seen_low=seen_low, seen_high=seen_high)
        self.state.features.restart(nid)
        self.event("profile refreshed", nid, self.state.rows_seen,
                   statistic=float(recent.codes.shape[0]), threshold=0.0,
                   detail="reference distribution taken from the recent rows")

    def event(self, kind: str, nid: int, row: int, *, statistic: float, threshold: float,
              detail: str) -> None:
        """Record a decision in the model's ``events_``, with its evidence."""
        self.model.events_.append({
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "rows_seen": int(row), "leaf": int(nid), "kind": kind,
            "statistic": float(statistic), "threshold": float(threshold), "detail": detail,
        })


def new_detector(kind: str) -> Detector:
    """A fresh detector for a leaf's loss stream (the model's ``drift_detector``)."""
    if kind == "page_hinkley":
        return PageHinkley()
    return ADWIN(delta=ADWIN_DELTA, bucket=ADWIN_BUCKET)
