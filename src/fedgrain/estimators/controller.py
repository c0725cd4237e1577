"""The granularity controller of a streaming adaptive model (design.md 8, method.md 5).

A mixin of :class:`fedgrain.estimators.AdaptiveFederatedOrdinal`, used by ``partial_fit`` each time
a leaf has been refitted after concept drift, on the leaves' recent rows only:

- **split** the leaf when a tree grown on its recent rows (at the model's granularity: the same
  score test and significance level as at fit time) finds a cut, *and* the two children's
  models predict held-out recent rows better than the leaf's single model;
- **merge** the leaf with its sibling leaf when both have been refitted since their drift and
  their models are indistinguishable: the Wald ``Q`` of their difference (method.md 5) is not
  significant at :data:`MERGE_LEVEL`;
- never more regions than the granularity allows for the rows seen so far
  (``(n / min_subset_size)^g``). ``effective_granularity_`` reports where the partition stands
  on that scale.

Each change is an event (``split``, ``merge``, ``granularity``).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from ..core.likelihood import class_proba
from ..federation import meta
from ..inference import local
from ..inference.results import parameter_names
from ..partition.growth import grow, region_budget, split_level
from ..partition.profile import profile_rows
from .leaves import leaf_view

#: Siblings whose models differ at a p-value above this are merged.
MERGE_LEVEL = 0.05
#: Share of a leaf's recent rows held out to judge a split.
HOLDOUT = 0.2


class GranularityControl:
    """Split and merge leaves on streams (needs the adaptive estimator's streaming state)."""

    def _stream_min_size(self) -> int:
        from .adaptive import MIN_LEAF_ROWS_PER_PARAM

        return int(self.min_subset_size or MIN_LEAF_ROWS_PER_PARAM * self.cov_.shape[0])

    def _fit_rows(self, Xw: np.ndarray, cw: np.ndarray, seed: int):
        """A leaf model fitted on these rows: raw parameters, covariance, filled names.

        With a meta-learner whose pull is finite, the leaf is personalised from the
        meta-learned model with that pull, as at fit time; otherwise it is the leaf's own fit.
        """
        p = self.schema_.n_features
        std = self.partition_.standardizer
        Xs = np.ascontiguousarray(std.transform(Xw))
        st = self._meta_state
        if self.meta in ("fomaml", "reptile") and np.isfinite(st["rho"]):
            task = {"settings": meta.MetaSettings(self.meta, p, self.classes_.shape[0]),
                    "theta": st["theta"], "rho": st["rho"], "P": st["P"],
                    "V_global": self._pooled_cov_std()}
            est, cov, _ = meta.personalise_rows(Xs, cw, None, task)
            params, cov = std.to_raw_model(est, cov)
            return params, 0.5 * (cov + cov.T), []
        settings = self._global_estimator()._settings(self.classes_.shape[0])
        with local.one_blas_thread():
            fit = local.fit_local(Xs, cw, None, settings, seed=seed)
        est, cov, filled = leaf_view(fit, st["theta"], self._pooled_cov_std(), p)
        params, cov = std.to_raw_model(est, cov)
        names = parameter_names(self.schema_.output_names, self.target_.classes)
        return params, 0.5 * (cov + cov.T), [names[j] for j in filled]

    def _rebuild(self, st, models: dict) -> None:
        """Leaf models in the tree's current leaf order: ``models`` for new or changed leaves,
        the current ones for the rest; streaming state for new leaves; the global model with
        the replaced leaves' information swapped for the new ones'."""
        old = {nid: (self._leaf_params[i], self.local_models_[i].cov_, self._leaf_notes[i])
               for i, nid in enumerate(self._leaf_ids)}
        leaves = self.partition_.leaves
        removed = [old[n][:2] for n in old if n not in leaves or n in models]
        added = [m[:2] for m in models.values()]
        old.update(models)
        self._set_leaf_models(np.array([old[n][0] for n in leaves]),
                              np.array([old[n][1] for n in leaves]),
                              [old[n][2] for n in leaves])
        self.n_leaves_ = len(leaves)
        for nid in leaves:
            st["detectors"].setdefault(nid, self._new_detector())
            st["windows"].setdefault(nid, [])
        st["features"].set_leaves(leaves)
        self._repool(removed, added)
        self.effective_granularity_ = self._effective_granularity(st)

    def _effective_granularity(self, st) -> float:
        regions = np.unique(self.partition_.region_of()).shape[0]
        rows = int(self.partition_.nodes[0].n_rows) + st["rows_seen"]
        scale = np.log(max(rows / self._stream_min_size(), 2.0))
        return float(np.clip(np.log(regions) / scale, 0.0, 1.0))

    def _profile(self, Xw, cw, nid):
        """A leaf's profile from these rows (reference distribution included)."""
        std = self.partition_.standardizer
        return profile_rows(std.transform(Xw), cw, None, std, self.classes_.shape[0], 1.0, None,
                            np.random.default_rng(nid), None)

    # ---- merge ---------------------------------------------------------------------------
    def _try_merge(self, st, nid: int) -> int | None:
        """Merge the leaf with its sibling leaf when their models do not differ; the new leaf.

        Only when both have been refitted since their own drift: the merged leaf is fitted on
        the rows of the new regime of each, and followed up like any refitted leaf.
        """
        tree = self.partition_
        node = tree.nodes[nid]
        parent = tree.nodes.get(node.parent)
        if parent is None or parent.kind != "hyperplane":
            return None
        sib = [c for c in parent.children if c != nid][0]
        if tree.nodes[sib].kind != "leaf" or sib not in st["followup"] \
                or nid not in st["followup"]:
            return None
        a, b = (self.local_models_[self._leaf_ids.index(i)] for i in (nid, sib))
        q, df = _wald(a.results_.params, a.cov_, b.results_.params, b.cov_)
        pvalue = float(special.chdtrc(df, q)) if df > 0 else 1.0
        if pvalue < MERGE_LEVEL:
            return None
        since = {n: st["followup"][n][0] for n in (nid, sib)}
        Xa, ca = self._window_since(st["windows"][nid], since[nid])
        Xb, cb = self._window_since(st["windows"][sib], since[sib])
        X, c = np.concatenate([Xa, Xb]), np.concatenate([ca, cb])
        model = self._fit_rows(X, c, seed=int(st["rows_seen"]))
        rows = np.concatenate([w[2][w[2] >= since[n]] for n in (nid, sib)
                               for w in st["windows"][n]])
        tree.merge(parent.id)
        tree.nodes[parent.id].n_rows = int(c.shape[0])
        st["windows"][parent.id] = [(X, c, rows)]
        st["followup"][parent.id] = (min(since.values()), 2 * c.shape[0])
        for gone in (nid, sib):
            for key in ("windows", "detectors", "pending", "followup"):
                st[key].pop(gone, None)
            self.profile_.leaves.pop(gone, None)
        self.profile_.leaves[parent.id] = self._profile(X, c, parent.id)
        self._rebuild(st, {parent.id: model})
        self._event(st, "merge", parent.id, st["rows_seen"], statistic=q,
                    threshold=float(special.chdtri(df, MERGE_LEVEL)) if df > 0 else 0.0,
                    detail=f"leaves {nid} and {sib} are indistinguishable (Q {q:.1f}, df {df}, "
                           f"p {pvalue:.3g}); merged into leaf {parent.id}")
        self._event(st, "granularity", parent.id, st["rows_seen"],
                    statistic=self.effective_granularity_, threshold=float(self.granularity),
                    detail=f"{self.n_leaves_} leaves")
        return parent.id

    # ---- split ---------------------------------------------------------------------------
    def _try_split(self, st, nid: int, Xw: np.ndarray, cw: np.ndarray) -> bool:
        """Split the leaf when its recent rows show two regions that predict better apart."""
        min_size = self._stream_min_size()
        regions = np.unique(self.partition_.region_of()).shape[0]
        rows = int(self.partition_.nodes[0].n_rows) + st["rows_seen"]
        if cw.shape[0] < 2 * min_size / (1 - HOLDOUT) or \
                regions >= region_budget(float(self.granularity), rows, min_size):
            return False
        seed = int(st["rows_seen"])
        hold = np.random.default_rng(seed).random(cw.shape[0]) < HOLDOUT
        fit = ~hold
        grown = grow(Xw[fit], cw[fit], None, std=self.partition_.standardizer,
                     n_classes=self.classes_.shape[0], granularity=float(self.granularity),
                     min_size=int(min_size * (1 - HOLDOUT)), n_pieces=1, seed=seed,
                     feature_names=list(self.schema_.output_names))
        root = grown.tree.nodes[0]
        if root.kind != "hyperplane":
            return False
        left = Xw @ root.a <= root.b
        one = self._fit_rows(Xw[fit], cw[fit], seed)
        parts = [self._fit_rows(Xw[fit & side], cw[fit & side], seed)
                 for side in (left, ~left)]
        p = self.schema_.n_features

        def loss(params, rows):
            proba = class_proba_rows(Xw[rows], params, p)
            return -np.log(np.clip(proba[np.arange(rows.sum()), cw[rows]], 1e-15, 1)).sum()

        single = loss(one[0], hold)
        split = loss(parts[0][0], hold & left) + loss(parts[1][0], hold & ~left)
        if not split < single:
            return False
        tree = self.partition_
        ev = dict(root.evidence)
        models = [self._fit_rows(Xw[side], cw[side], seed) for side in (left, ~left)]
        since = st["followup"].get(nid, (st["rows_seen"], 0))[0]
        rows = np.concatenate([w[2][w[2] >= since] for w in st["windows"][nid]])
        kids = tree.split(nid, root.a, root.b, ev)
        for kid, side in zip(kids, (left, ~left), strict=True):
            Xk, ck = Xw[side], cw[side]
            tree.nodes[kid].n_rows = int(ck.shape[0])
            st["windows"][kid] = [(Xk, ck, rows[side])]
            st["followup"][kid] = (since, 2 * ck.shape[0])
            self.profile_.leaves[kid] = self._profile(Xk, ck, kid)
        models = dict(zip(kids, models, strict=True))
        for key in ("windows", "detectors", "pending", "followup"):
            st[key].pop(nid, None)
        self.profile_.leaves.pop(nid, None)
        self._rebuild(st, models)
        self._event(st, "split", nid, st["rows_seen"], statistic=float(ev.get("q", 0.0)),
                    threshold=float(split_level(float(self.granularity))),
                    detail=f"{ev.get('candidate', 'a cut')}: children {list(kids)} predict "
                           f"held-out recent rows better ({split:.1f} against {single:.1f})")
        self._event(st, "granularity", nid, st["rows_seen"],
                    statistic=self.effective_granularity_, threshold=float(self.granularity),
                    detail=f"{self.n_leaves_} leaves")
        return True


def class_proba_rows(X: np.ndarray, params: np.ndarray, p: int) -> np.ndarray:
    return class_proba(X @ params[:p], params[p:])


def _wald(a, Va, b, Vb) -> tuple[float, int]:
    """Wald statistic of the difference of two independent estimates (pseudo-inverse)."""
    V = Va + Vb
    vals, vecs = np.linalg.eigh(0.5 * (V + V.T))
    keep = vals > 1e-10 * max(vals.max(initial=0.0), 1e-300)
    z = vecs[:, keep].T @ (a - b)
    return float(np.sum(z * z / vals[keep])), int(keep.sum())
