"""The data profiler: density, feature importance and clusters per region (docs/method.md,
"Adaptive partitions").

Everything here works on a *sample* of a region's rows in the globally standardised space (see
:mod:`fedgrain.federation.shards`), so its cost does not grow with the number of rows:

- **importance**: each feature's share of ``|standardised slope|`` in the region's quick fit
  (:func:`fedgrain.inference.split_tests.quick_fit`, on at most
  :data:`fedgrain.inference.split_tests.QUICK_ROWS` rows), the screening importance until the
  leaf's local model replaces it;
- **density**: the k-nearest-neighbour estimate ``log f = log(k / (n V_p r_k^p))`` on at most
  :data:`KNN_ROWS` rows, in the importance-weighted space, scaled by the region's share of all rows
  so that regions compare;
- **clusters**: 2-means in the importance-weighted standardised space (a feature's weight is half
  uniform, half its share of importance, so clusters follow the features that matter without
  ignoring the others). Repeated splitting at cluster boundaries is bisecting k-means.

A :class:`DataProfile` holds one :class:`LeafProfile` per leaf of the partition tree and can be
refreshed from new data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import special

from ..federation.shards import leaf_ranges
from ..inference.split_tests import QuickFit, quick_fit

#: Rows for the k-nearest-neighbour density, and its k.
KNN_ROWS = 500
KNN_K = 10
#: Rows for 2-means.
KMEANS_ROWS = 1_000
#: A leaf's range of a feature: from this lower to this upper quantile of its rows.
RANGE_QUANTILE = 0.999
#: Quantiles of each feature kept as the leaf's reference distribution.
REFERENCE_POINTS = 19
#: Relative slack of a range brought back from the standardised space (``1e-9 (|x| +
#: scale)``): a value of the data comes back a few ulps off itself, and a feature constant in
#: a leaf would otherwise have a range of round-off size (2.8e-17) that excludes its own value.
RANGE_SLACK = 1e-9


def importance(fit: QuickFit | None, n_features: int) -> np.ndarray:
    """Each feature's share of ``|standardised slope|`` (zeros when nothing is known)."""
    if fit is None:
        return np.zeros(n_features)
    beta = np.nan_to_num(np.abs(fit.estimate[:n_features]))
    total = beta.sum()
    return beta / total if total > 0 else beta


def feature_weights(imp: np.ndarray) -> np.ndarray:
    """Per-feature scaling of the standardised space for clustering and density."""
    p = imp.shape[0]
    return np.sqrt(0.5 / p + 0.5 * imp) if imp.sum() > 0 else np.full(p, np.sqrt(1.0 / p))


def log_density(Xw: np.ndarray, share: float, rng: np.random.Generator) -> float:
    """k-nearest-neighbour log density of a region, per unit volume of the weighted space.

    ``share`` is the region's fraction of all rows, so densities of regions compare.
    """
    n, p = Xw.shape
    if n <= KNN_K:
        return float("nan")
    if n > KNN_ROWS:
        Xw = Xw[np.sort(rng.choice(n, KNN_ROWS, replace=False))]
        n = KNN_ROWS
    # exact distances among at most KNN_ROWS rows: one product, no index structure needed
    sq = np.einsum("ij,ij->i", Xw, Xw)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (Xw @ Xw.T)
    kth = np.partition(d2, KNN_K, axis=1)[:, KNN_K]  # column 0 is the row itself
    r = np.sqrt(np.maximum(kth, 1e-24))
    log_unit_ball = 0.5 * p * np.log(np.pi) - special.gammaln(0.5 * p + 1)
    return float(np.log(share) + np.log(KNN_K / n) - log_unit_ball - p * np.mean(np.log(r)))


def two_means(Xw: np.ndarray, rng: np.random.Generator, n_init: int = 1,
              max_iter: int = 50) -> np.ndarray | None:
    """Centres of 2-means on (a sample of) the weighted rows, or None when all rows are equal.

    Lloyd's algorithm from k-means++ starts, the best of ``n_init`` by inertia. With two
    centres an assignment step is one product with the centres' difference, so this is a few
    hundred microseconds on :data:`KMEANS_ROWS` rows, where a general k-means library call
    spends milliseconds on set-up.
    """
    n = Xw.shape[0]
    if n > KMEANS_ROWS:
        Xw = Xw[np.sort(rng.choice(n, KMEANS_ROWS, replace=False))]
        n = KMEANS_ROWS
    if n < 2 or np.ptp(Xw, axis=0).max() == 0:
        return None
    sq = np.einsum("ij,ij->i", Xw, Xw)
    total = Xw.sum(axis=0)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        c1 = Xw[rng.integers(n)]
        d2 = np.maximum(sq - 2 * Xw @ c1 + c1 @ c1, 0.0)
        if d2.sum() <= 0:
            continue
        c2 = Xw[rng.choice(n, p=d2 / d2.sum())]
        side = None
        for _ in range(max_iter):
            new = Xw @ (c2 - c1) > 0.5 * (c2 @ c2 - c1 @ c1)  # True: nearer c2
            k = int(new.sum())
            if k in (0, n) or (side is not None and np.array_equal(new, side)):
                break
            side = new
            s2 = side @ Xw  # centres from one product: no row gathers
            c1, c2 = (total - s2) / (n - k), s2 / k
        if side is None:
            continue
        # inertia = sum |x|^2 - n1 |c1|^2 - n2 |c2|^2 at the centres of this assignment
        k = int(side.sum())
        inertia = sq.sum() - (n - k) * (c1 @ c1) - k * (c2 @ c2)
        if inertia < best_inertia:
            best, best_inertia = np.array([c1, c2]), inertia
    return best


@dataclass(frozen=True)
class LeafProfile:
    """What the profiler knows about one leaf.

    ``low`` and ``high`` are each feature's 0.1% and 99.9% quantiles among its rows: a row far
    outside them belongs to a region the leaf has not seen. ``seen_low`` and ``seen_high`` are
    the smallest and largest value of each feature among *all* the rows the leaf's model was
    fitted on (None when unknown): those rows are never unseen
    (:func:`fedgrain.federation.leaves.unseen_rows`). ``edges`` and ``cdf`` are each
    feature's reference distribution: its empirical CDF at up to 19 quantiles (original units),
    from ``n_ref`` rows.
    ``mean`` and ``centres`` are in the original (encoded) feature units; ``importance`` sums to
    one over the features (``importance_source`` says whether it comes from the screening fit
    or from the leaf's fitted local model); ``log_density`` compares between leaves.
    """

    n_rows: int
    class_counts: np.ndarray
    mean: np.ndarray
    log_density: float
    importance: np.ndarray
    importance_source: str
    centres: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    edges: list | None = None
    cdf: list | None = None
    n_ref: int | None = None
    seen_low: np.ndarray | None = None
    seen_high: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"n_rows": self.n_rows, "class_counts": self.class_counts.tolist(),
                "mean": self.mean.tolist(),
                "log_density": None if np.isnan(self.log_density) else self.log_density,
                "importance": self.importance.tolist(),
                "importance_source": self.importance_source, "centres": self.centres.tolist(),
                "low": None if self.low is None else self.low.tolist(),
                "high": None if self.high is None else self.high.tolist(),
                "edges": None if self.edges is None else [e.tolist() for e in self.edges],
                "cdf": None if self.cdf is None else [c.tolist() for c in self.cdf],
                "n_ref": self.n_ref,
                "seen_low": None if self.seen_low is None else self.seen_low.tolist(),
                "seen_high": None if self.seen_high is None else self.seen_high.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> LeafProfile:
        p = len(d["mean"])
        return cls(int(d["n_rows"]), np.asarray(d["class_counts"], dtype=float),
                   np.asarray(d["mean"], dtype=float),
                   float("nan") if d["log_density"] is None else float(d["log_density"]),
                   np.asarray(d["importance"], dtype=float), str(d["importance_source"]),
                   np.asarray(d["centres"], dtype=float).reshape(-1, p),
                   None if d.get("low") is None else np.asarray(d["low"], dtype=float),
                   None if d.get("high") is None else np.asarray(d["high"], dtype=float),
                   None if d.get("edges") is None else [np.asarray(e, dtype=float)
                                                        for e in d["edges"]],
                   None if d.get("cdf") is None else [np.asarray(c, dtype=float)
                                                      for c in d["cdf"]],
                   None if d.get("n_ref") is None else int(d["n_ref"]),
                   None if d.get("seen_low") is None else np.asarray(d["seen_low"], dtype=float),
                   None if d.get("seen_high") is None else np.asarray(d["seen_high"],
                                                                      dtype=float))


def profile_rows(Xs: np.ndarray, y: np.ndarray, w: np.ndarray | None, std, n_classes: int,
                 share: float, fit: QuickFit | None, rng: np.random.Generator,
                 centres=False) -> LeafProfile:
    """Profile one region from a sample of its standardised rows.

    ``fit`` is the region's quick fit (for the screening importance); ``share`` its fraction of
    all rows; ``centres`` its 2-means centres in the weighted space when already found (False:
    find them). ``n_rows`` and ``class_counts`` describe the sample; the caller replaces them
    with the counts of all rows once they are routed.
    """
    p = Xs.shape[1]
    imp = importance(fit, p)
    Xw = Xs * feature_weights(imp)
    if centres is False:
        centres = two_means(Xw, rng) if Xs.shape[0] >= 2 else None
    raw_centres = (np.empty((0, p)) if centres is None
                   else centres / feature_weights(imp) * std.scale + std.mean)
    counts = np.bincount(y, weights=w, minlength=n_classes).astype(float)
    mean = (Xs.mean(axis=0) if w is None else w @ Xs / w.sum()) * std.scale + std.mean
    low = high = None
    if Xs.shape[0]:
        S = np.sort(Xs, axis=0)
        last = S.shape[0] - 1
        low = S[int((1 - RANGE_QUANTILE) * last)]
        high = S[int(np.ceil(RANGE_QUANTILE * last))]
        # a discrete column (a one-hot level, a count with few values): its whole range, so
        # a rare level seen in training is not mistaken for an unseen region
        discrete = (np.diff(S, axis=0) != 0).sum(axis=0) < 10
        low = np.where(discrete, S[0], low) * std.scale + std.mean
        high = np.where(discrete, S[-1], high) * std.scale + std.mean
        # back in original units a value may come out a few ulps off itself (a feature
        # constant in the leaf had a range of 2.8e-17 excluding its own value): widen by a hair
        low = low - RANGE_SLACK * (np.abs(low) + std.scale)
        high = high + RANGE_SLACK * (np.abs(high) + std.scale)
        # the reference distribution of each feature: its CDF at up to 19 quantiles (distinct
        # ones; a discrete feature's values), for the drift tests of fedgrain.monitor
        edges, cdf = [], []
        picks = np.linspace(0, last, REFERENCE_POINTS + 2)[1:-1].round().astype(np.intp)
        for j in range(p):
            e = np.unique(S[picks, j])
            raw = e * std.scale[j] + std.mean[j]
            # back in original units a value of the data may come out a few ulps below
            # itself; raised by a hair, an edge still counts the rows equal to it (the CDF
            # is "at or below"): otherwise a discrete feature's new rows all seem to move
            edges.append(raw + 1e-9 * (np.abs(raw) + std.scale[j]))
            cdf.append(np.searchsorted(S[:, j], e, side="right") / S.shape[0])
    return LeafProfile(int(y.shape[0]), counts, mean, log_density(Xw, share, rng), imp,
                       "screening", raw_centres, low, high,
                       edges if Xs.shape[0] else None, cdf if Xs.shape[0] else None,
                       int(Xs.shape[0]))


class DataProfile:
    """The profile of every leaf of a partition tree, by leaf node id.

    Examples
    --------
    >>> af.profile_.frame()          # doctest: +SKIP
    >>> af.refresh_profile(X_new, y_new)  # doctest: +SKIP
    """

    def __init__(self, leaves: dict[int, LeafProfile], feature_names: list[str]):
        self.leaves = dict(leaves)
        self.feature_names = list(feature_names)

    def __getitem__(self, leaf_id: int) -> LeafProfile:
        return self.leaves[leaf_id]

    def with_importance(self, leaf_id: int, beta_std: np.ndarray,
                        scale: np.ndarray | None = None) -> None:
        """Replace a leaf's screening importance by that of its fitted local model.

        With ``scale`` (the features' global standard deviations, the units of ``beta_std``)
        a feature counts by how much it moves the linear predictor *within the leaf*:
        ``|slope| x`` its 0.1%-99.9% range among the leaf's rows. A feature constant in the leaf
        (a cut above it uses it; its slope is the global model's) then counts for nothing,
        where its global slope alone would call it the leaf's most important.
        """
        imp = np.nan_to_num(np.abs(beta_std))
        lp = self.leaves[leaf_id]
        if scale is not None and lp.low is not None and lp.high is not None:
            imp = imp * np.nan_to_num(np.maximum(lp.high - lp.low, 0.0) / scale)
        total = imp.sum()
        self.leaves[leaf_id] = replace(self.leaves[leaf_id],
                                       importance=imp / total if total > 0 else imp,
                                       importance_source="local model")

    def cover(self, partition, X, leaf: np.ndarray) -> None:
        """Record every leaf's whole range of the rows its model is fitted on (one pass).

        ``X`` are the encoded training rows (an array, or rows streamed from disk), ``leaf``
        their leaf positions. Pieces of one region share its range: a new row of the region
        may be routed to any of them. After this, no training row is unseen
        (:func:`fedgrain.federation.leaves.unseen_rows`), whatever its leaf's quantiles.
        """
        lo, hi = leaf_ranges(X, leaf, partition.n_leaves)
        region = partition.region_of()
        for pos, nid in enumerate(partition.leaves):
            same = region == region[pos]
            low, high = lo[same].min(axis=0), hi[same].max(axis=0)
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                continue
            self.leaves[nid] = replace(self.leaves[nid], seen_low=low, seen_high=high)

    def refresh(self, partition, X, y, sample_weight=None, *, random_state: int = 0) -> None:
        """Profile every leaf again from new data: encoded features and class *codes*.

        (``AdaptiveFederatedOrdinal.refresh_profile`` takes the user's columns and labels.)
        Leaves that receive no rows keep their profile. Importance comes from a quick fit on
        each leaf's new rows (the screening importance, replacing the local model's).
        """
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=np.intp)
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
        leaf = partition.route(X)
        std = partition.standardizer
        K = partition.n_classes
        for pos, node_id in enumerate(partition.leaves):
            rows = np.flatnonzero(leaf == pos)
            if rows.size == 0:
                continue
            rng = np.random.default_rng([random_state, node_id])
            Xs = std.transform(X[rows])
            ws = None if w is None else w[rows]
            fit = quick_fit(Xs, y[rows], ws, K)
            old = self.leaves.get(node_id)
            new = profile_rows(Xs, y[rows], ws, std, K, rows.size / X.shape[0], fit, rng)
            # the model was fitted on its rows, not on these: their range stays seen
            self.leaves[node_id] = new if old is None else replace(
                new, seen_low=old.seen_low, seen_high=old.seen_high)

    def frame(self):
        """One row per leaf: rows, log density and the three most important features."""
        import pandas as pd

        rows = []
        for node_id, lp in self.leaves.items():
            top = np.argsort(-lp.importance)[:3]
            rows.append({"leaf": node_id, "rows": lp.n_rows, "log_density": lp.log_density,
                         "top_features": ", ".join(self.feature_names[j] for j in top
                                                   if lp.importance[j] > 0),
                         "importance_from": lp.importance_source})
        return pd.DataFrame(rows).set_index("leaf")

    def to_dict(self) -> dict:
        return {"feature_names": self.feature_names,
                "leaves": {str(k): v.to_dict() for k, v in self.leaves.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> DataProfile:
        return cls({int(k): LeafProfile.from_dict(v) for k, v in d["leaves"].items()},
                   d["feature_names"])

    def to_state(self) -> tuple[dict, dict]:
        """The profile as a little JSON and one stacked array per field, every leaf a row
        (``profile_*`` arrays of a saved model): a thousand leaves load in milliseconds,
        where :meth:`to_dict`'s JSON took 9 KB and a third of a second per thousand. Missing
        values are NaN (``None`` of a leaf: a row of NaN; quantile lists shorter than the
        longest: NaN after their end)."""
        lps = list(self.leaves.values())
        L, p = len(lps), len(self.feature_names)
        K = max((lp.class_counts.shape[0] for lp in lps), default=0)
        C = max((lp.centres.shape[0] for lp in lps), default=0)
        R = max((e.shape[0] for lp in lps for e in (lp.edges or ())), default=0)
        a = {"ids": np.array(list(self.leaves), dtype=np.int64),
             "n_rows": np.array([lp.n_rows for lp in lps], dtype=np.int64),
             "class_counts": np.zeros((L, K)), "mean": np.full((L, p), np.nan),
             "log_density": np.array([lp.log_density for lp in lps], dtype=float),
             "importance": np.full((L, p), np.nan), "n_centres": np.zeros(L, dtype=np.int64),
             "centres": np.full((L, C, p), np.nan),
             "n_ref": np.array([-1 if lp.n_ref is None else lp.n_ref for lp in lps],
                               dtype=np.int64),
             "n_edges": np.full((L, p), -1, dtype=np.int64),
             "edges": np.full((L, p, R), np.nan), "cdf": np.full((L, p, R), np.nan),
             **{k: np.full((L, p), np.nan) for k in ("low", "high", "seen_low", "seen_high")}}
        for i, lp in enumerate(lps):
            a["class_counts"][i, : lp.class_counts.shape[0]] = lp.class_counts
            a["mean"][i], a["importance"][i] = lp.mean, lp.importance
            a["n_centres"][i] = lp.centres.shape[0]
            a["centres"][i, : lp.centres.shape[0]] = lp.centres
            for k in ("low", "high", "seen_low", "seen_high"):
                if getattr(lp, k) is not None:
                    a[k][i] = getattr(lp, k)
            if lp.edges is not None:
                for j, (e, c) in enumerate(zip(lp.edges, lp.cdf, strict=True)):
                    a["n_edges"][i, j] = e.shape[0]
                    a["edges"][i, j, : e.shape[0]], a["cdf"][i, j, : c.shape[0]] = e, c
        meta = {"feature_names": self.feature_names, "n_classes": [int(lp.class_counts.shape[0])
                                                                    for lp in lps],
                "importance_source": [lp.importance_source for lp in lps]}
        return meta, {f"profile_{k}": v for k, v in a.items()}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> DataProfile:
        """The inverse of :meth:`to_state` (``arrays`` with their ``profile_`` names)."""
        a = {k[len("profile_"):]: v for k, v in arrays.items() if k.startswith("profile_")}
        L = a["ids"].shape[0]
        p = len(meta["feature_names"])
        if len(meta["n_classes"]) != L or len(meta["importance_source"]) != L or any(
                v.shape[:1] != (L,) for v in a.values()) or a["mean"].shape != (L, p):
            raise ValueError("the profile's arrays do not match one another")
        R = a["edges"].shape[2] if a["edges"].ndim == 3 else -1
        C = a["centres"].shape[1] if a["centres"].ndim == 3 else -1
        shapes = {"n_rows": (L,), "log_density": (L,), "n_ref": (L,), "n_centres": (L,),
                  "importance": (L, p), "n_edges": (L, p), "edges": (L, p, R),
                  "cdf": (L, p, R), "centres": (L, C, p),
                  **{k: (L, p) for k in ("low", "high", "seen_low", "seen_high")}}
        if any(a[k].shape != shape for k, shape in shapes.items()) or \
                a["class_counts"].ndim != 2 or \
                not all(0 <= c <= a["class_counts"].shape[1] for c in meta["n_classes"]) or \
                not np.all((a["n_edges"] >= -1) & (a["n_edges"] <= R)) or \
                not np.all((a["n_centres"] >= 0) & (a["n_centres"] <= C)) or \
                np.unique(a["ids"]).shape[0] != L:
            raise ValueError("the profile's arrays do not have the shapes its leaves need")

        def row(name, i):
            v = a[name][i]
            return None if np.isnan(v).all() else v.copy()

        leaves = {}
        for i in range(L):
            k = a["n_edges"][i]
            edges = cdf = None
            if (k >= 0).all():
                edges = [a["edges"][i, j, : k[j]].copy() for j in range(p)]
                cdf = [a["cdf"][i, j, : k[j]].copy() for j in range(p)]
            leaves[int(a["ids"][i])] = LeafProfile(
                int(a["n_rows"][i]), a["class_counts"][i, : meta["n_classes"][i]].copy(),
                a["mean"][i].copy(), float(a["log_density"][i]), a["importance"][i].copy(),
                str(meta["importance_source"][i]),
                a["centres"][i, : a["n_centres"][i]].copy(), row("low", i), row("high", i),
                edges, cdf, None if a["n_ref"][i] < 0 else int(a["n_ref"][i]),
                row("seen_low", i), row("seen_high", i))
        return cls(leaves, meta["feature_names"])


