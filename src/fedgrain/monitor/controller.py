"""The granularity controller of a streaming adaptive model (docs/method.md 5).

Used by :class:`fedgrain.monitor.stream.DriftMonitor` each time a leaf has been refitted after
concept drift (and when a covariate shift moved a leaf's density), on the leaves' recent rows
only:

- **split** the leaf when a tree grown on its recent rows (at the model's granularity: the same
  score test and significance level as at fit time) finds a cut, *and* the two children's
  models predict held-out recent rows better than the leaf's single model;
- **merge** the leaf with its sibling leaf when both have been refitted since their drift and
  their models are indistinguishable: the Wald ``Q`` of their difference is not significant at
  :data:`MERGE_LEVEL`;
- never more regions than the granularity allows for the rows seen so far
  (``(n / min_subset_size)^g``). The model's ``effective_granularity_`` reports where the
  partition stands on that scale.

The granularity factor itself adapts (the *working* granularity, ``stream_.granularity``, which
splits use; it starts at the model's): it rises by :data:`GRANULARITY_STEP` when a leaf keeps
needing refits (:data:`REFINE_AFTER` concept drifts within :data:`REFINE_WINDOW` rows: its
region is not one model over time, so finer leaves may split off) and falls by the same step
when two siblings turn out indistinguishable and merge.

Each change is an event (``split``, ``merge``, ``granularity``) with its evidence.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import special

from ..core.likelihood import class_proba, row_log_loss
from ..core.linalg import chi2_sf, wald
from ..federation.leaves import LeafSeparationError
from ..partition.growth import grow, region_budget, split_level
from ..partition.profile import LeafProfile, profile_rows
from .state import FollowUp, RecentRows, Window

#: Siblings whose models differ at a p-value above this are merged.
MERGE_LEVEL = 0.05
#: Share of a leaf's recent rows held out to judge a split.
HOLDOUT = 0.2
#: The working granularity rises when one leaf has this many concept drifts within this many
#: stream rows, and moves by this step (up, or down after a merge).
REFINE_AFTER = 2
REFINE_WINDOW = 200_000
GRANULARITY_STEP = 0.1


class GranularityController:
    """Split and merge leaves of the model a :class:`DriftMonitor` watches."""

    def __init__(self, monitor):
        self.monitor = monitor

    @property
    def model(self):
        return self.monitor.model

    @property
    def granularity(self) -> float:
        """The working granularity factor (the model's until it first moves)."""
        g = self.monitor.state.granularity
        return float(self.model.granularity) if g is None else g

    def _move_granularity(self, nid: int, step: float, why: str) -> None:
        before = self.granularity
        after = float(np.clip(before + step, 0.0, 1.0))
        if after == before:
            return
        self.monitor.state.granularity = after
        self.monitor.event("granularity", nid, self.monitor.state.rows_seen, statistic=after,
                           threshold=before,
                           detail=f"granularity factor {before:.2f} -> {after:.2f}: {why}")

    def refine(self, nid: int) -> None:
        """Raise the working granularity when the leaf keeps needing refits."""
        st = self.monitor.state
        recent = [e for e in self.model.events_ if e["kind"] == "concept drift"
                  and e["leaf"] == nid and e["rows_seen"] >= st.rows_seen - REFINE_WINDOW]
        if len(recent) >= REFINE_AFTER:
            self._move_granularity(nid, GRANULARITY_STEP,
                                   f"leaf {nid} drifted {len(recent)} times in the last "
                                   f"{REFINE_WINDOW:,} rows: its region is not one model "
                                   "over time, so finer leaves may split off")

    def profile(self, recent: Window, nid: int) -> LeafProfile:
        """A leaf's profile from these rows (reference distribution included), with their
        whole range as the range its model was fitted on (``seen_low``, ``seen_high``)."""
        model = self.model
        std = model.partition_.standardizer
        lp = profile_rows(std.transform(recent.X), recent.codes, None, std,
                          model.classes_.shape[0], 1.0, None, np.random.default_rng(nid), None)
        if recent.codes.shape[0] == 0:
            return lp
        return replace(lp, seen_low=recent.X.min(axis=0), seen_high=recent.X.max(axis=0))

    def _fit(self, X, codes, seed: int):
        """A leaf model on these rows, or None when they are separated (no finite fit): the
        split or merge that needed it is not made."""
        try:
            return self.model._fit_rows(X, codes, seed)
        except LeafSeparationError:
            return None

    # ---- merge ---------------------------------------------------------------------------
    def try_merge(self, nid: int) -> int | None:
        """Merge the leaf with its sibling leaf when their models do not differ; the new leaf.

        Only when both have been refitted since their own drift: the merged leaf is fitted on
        the rows of the new regime of each, and followed up like any refitted leaf.
        """
        model, st = self.model, self.monitor.state
        tree = model.partition_
        node = tree.nodes[nid]
        parent = tree.nodes.get(node.parent)
        if parent is None or parent.kind != "hyperplane":
            return None
        sib = [c for c in parent.children if c != nid][0]
        if tree.nodes[sib].kind != "leaf" or sib not in st.followup or nid not in st.followup:
            return None
        a, b = (model.local_models_[tree.leaves.index(i)] for i in (nid, sib))
        q, df = wald(a.results_.params - b.results_.params, a.cov_ + b.cov_)
        pvalue = chi2_sf(q, df)
        if pvalue < MERGE_LEVEL:
            return None
        since = {n: st.followup[n].since for n in (nid, sib)}
        parts = [st.windows[n].since(since[n]) for n in (nid, sib)]
        merged = Window(*(np.concatenate([getattr(w, f) for w in parts])
                          for f in ("X", "codes", "rows")))
        leaf_model = self._fit(merged.X, merged.codes, int(st.rows_seen))
        if leaf_model is None:
            return None
        tree.merge(parent.id)
        tree.nodes[parent.id].n_rows = int(merged.codes.shape[0])
        for gone in (nid, sib):
            st.drop_leaf(gone)
            model.profile_.leaves.pop(gone, None)
        st.windows[parent.id] = RecentRows(merged.X.shape[1], [merged])
        st.followup[parent.id] = FollowUp(min(since.values()), 2 * merged.codes.shape[0])
        model.profile_.leaves[parent.id] = self.profile(merged, parent.id)
        self.monitor.replace_leaves({parent.id: leaf_model})
        self._move_granularity(parent.id, -GRANULARITY_STEP,
                               f"leaves {nid} and {sib} were indistinguishable (Q {q:.1f}, df "
                               f"{df}, p {pvalue:.3g}) and merged: coarser leaves suffice")
        self.monitor.event(
            "merge", parent.id, st.rows_seen, statistic=q,
            threshold=float(special.chdtri(df, MERGE_LEVEL)) if df > 0 else 0.0,
            detail=f"leaves {nid} and {sib} are indistinguishable (Q {q:.1f}, df {df}, "
                   f"p {pvalue:.3g}); merged into leaf {parent.id}")
        self._granularity_event(parent.id)
        return parent.id

    # ---- split ---------------------------------------------------------------------------
    def try_split(self, nid: int, recent: Window) -> bool:
        """Split the leaf when its recent rows show two regions that predict better apart."""
        model, st = self.model, self.monitor.state
        tree = model.partition_
        min_size = model._stream_min_size()
        Xw, cw = recent.X, recent.codes
        regions = np.unique(tree.region_of()).shape[0]
        rows = int(tree.nodes[0].n_rows) + st.rows_seen
        if cw.shape[0] < 2 * min_size / (1 - HOLDOUT) or \
                regions >= region_budget(self.granularity, rows, min_size):
            return False
        seed = int(st.rows_seen)
        hold = np.random.default_rng(seed).random(cw.shape[0]) < HOLDOUT
        fit = ~hold
        grown = grow(Xw[fit], cw[fit], None, std=tree.standardizer,
                     n_classes=model.classes_.shape[0], granularity=self.granularity,
                     min_size=int(min_size * (1 - HOLDOUT)), n_pieces=1, seed=seed,
                     feature_names=list(model.schema_.output_names))
        root = grown.tree.nodes[0]
        if root.kind != "hyperplane":
            return False
        left = Xw @ root.a <= root.b
        one = self._fit(Xw[fit], cw[fit], seed)
        parts = [self._fit(Xw[fit & side], cw[fit & side], seed) for side in (left, ~left)]
        if one is None or any(m is None for m in parts):
            return False
        p = model.schema_.n_features

        def loss(params, rows):
            proba = class_proba(Xw[rows] @ params[:p], params[p:])
            return row_log_loss(proba, cw[rows]).sum()

        single = loss(one[0], hold)
        split = loss(parts[0][0], hold & left) + loss(parts[1][0], hold & ~left)
        if not split < single:
            return False
        ev = dict(root.evidence)
        models = [self._fit(Xw[side], cw[side], seed) for side in (left, ~left)]
        if any(m is None for m in models):
            return False
        # the children start from the rows split here (since the drift, or since a covariate
        # shift), with their own stream row numbers; they are followed up from there
        first = int(recent.rows.min())
        since = min(st.followup[nid].since, first) if nid in st.followup else first
        kids = tree.split(nid, root.a, root.b, ev)
        for kid, side in zip(kids, (left, ~left), strict=True):
            chunk = Window(Xw[side], cw[side], recent.rows[side])
            tree.nodes[kid].n_rows = int(chunk.codes.shape[0])
            st.windows[kid] = RecentRows(Xw.shape[1], [chunk])
            st.followup[kid] = FollowUp(since, 2 * chunk.codes.shape[0])
            model.profile_.leaves[kid] = self.profile(chunk, kid)
        st.drop_leaf(nid)
        model.profile_.leaves.pop(nid, None)
        self.monitor.replace_leaves(dict(zip(kids, models, strict=True)))
        self.monitor.event(
            "split", nid, st.rows_seen, statistic=float(ev.get("q", 0.0)),
            threshold=float(split_level(self.granularity)),
            detail=f"{ev.get('candidate', 'a cut')}: children {list(kids)} predict held-out "
                   f"recent rows better ({split:.1f} against {single:.1f})")
        self._granularity_event(nid)
        return True

    def _granularity_event(self, nid: int) -> None:
        model = self.model
        self.monitor.event("granularity", nid, self.monitor.state.rows_seen,
                           statistic=model.effective_granularity_,
                           threshold=self.granularity,
                           detail=f"{model.n_leaves_} leaves: the partition now stands at "
                                  f"{model.effective_granularity_:.2f} on the granularity "
                                  f"scale (working factor {self.granularity:.2f})")
