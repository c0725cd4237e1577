"""Growing the partition tree from the data profile (docs/method.md, "Adaptive partitions").

The tree is grown best-first on a sample of at most :data:`SAMPLE_ROWS` rows, then every row is
routed once; so beyond that one routing pass the cost does not grow with the number of rows.

**Candidates.** At each node, from its profile (on at most
:data:`fedgrain.inference.split_tests.QUICK_ROWS` of its rows): the 2-means boundary (best of
:data:`KMEANS_STARTS` k-means++ starts) in the importance-weighted standardised space and in the
plain standardised space (regions may differ in features that matter little for the outcome); a
threshold on every feature with a density valley between its 10% and 90% quantiles, at the
valley; and thresholds on the two most important features at their quartiles and median (where a
model's change need not be at a feature's median). Each candidate is judged by the robust score
test of :func:`fedgrain.inference.split_tests.split_test` on *all* the node's rows in the sample
(at most :data:`fedgrain.inference.split_tests.TEST_ROWS`), at the node's quick fit refined by
one Newton step on those rows (:func:`fedgrain.inference.split_tests.refine`): the Lagrange
multiplier form of the heterogeneity ``Q`` of docs/method.md, a chi-square with ``df`` degrees
of freedom when one model holds on both sides. A node costs two passes over its rows and one
masked Gram matrix per candidate, so the test's power grows with the data.

**Which cut.** The candidate with the largest expected gain (below), unless another one that is
clearly significant (``p < 5e-8`` after the Bonferroni correction below) and promises at least
half that gain cuts through much sparser data: at most half as many rows within
:data:`BOUNDARY_BAND` standard deviations of its boundary, and at least :data:`SPARSER_BY` of
the node's rows fewer (a gap between clusters, so fewer rows on the fence and fewer
misrouted). Values many rows share (:data:`POINT_MASS`: a 0/1 feature, the zeros of a
mostly-zero one) are not on the fence: a cut between distinct values keeps each of them on one
side. Between well separated regions that prefers the clean
cut to one through a cluster's edge; without a gap, gain decides.

**Which node first.** The split that promises most goes first: the expected gain in held-out
log-likelihood, ``(Q n_node / n_quick - 2 df) / 2`` (``Q`` grows with the rows behind it, and a
split costs ``df`` parameters). It grows with the node's size and its heterogeneity; importance
picks the candidate features and clusters, density the cuts.

**Granularity** ``g`` (monotone in both parts, so the number of leaves never decreases as ``g``
grows):

- a node is split only when its best candidate's ``Q`` is significant at level
  ``alpha(g) = 0.05 * 10^(-6 (1 - g))`` after a Bonferroni correction for the candidates tried
  at the node *and* for the nodes the search may test, ``2 (n / min_size)^g``
  (:func:`node_level`): so where one model holds, the whole search splits with probability at
  most ``alpha(g)`` (``g = 1``: 5%; ``g = 0.5``: ``5e-5``);
- at most ``(n / min_subset_size)^g`` regions (``g = 1``: down to the minimum size);
- ``g = 0``: no region at all, only the static division.

Every node's choices are seeded by its position in the tree (``Node.key``), not by the order of
growth, so the same seed gives the same tree. A node's evaluation does not depend on ``g``, so
the nodes eligible at ``g`` stay eligible at any larger ``g`` and the number of regions,
``min(budget, eligible closure)``, never decreases (the trees nest as well while the budget does
not bind; when it binds, a larger ``g`` may spend it on another node). Exactly so when the tree
is grown on all rows, up to :data:`SAMPLE_ROWS`; on a sample, a split whose leaf turns out
smaller than ``min_subset_size`` once every row is routed is merged back,
which can, rarely, undo a split at one granularity and not at another.

Tests use every row of a node in the sample the tree is grown on (:data:`SAMPLE_ROWS`), so on
larger data a difference too small to see in that many rows is not split even at ``g = 1``;
the expected gain of a split is scaled to the node's full size. How stable the result is
across resamples of the rows is measured by :func:`stability` (or
:func:`measure_stability`), never by ``fit``.
When there are fewer regions than workers, the largest regions are dealt out at random into
pieces (at least ``min_subset_size`` rows each), so every worker has a subset; with ``g = 0`` this
is exactly the patent's static division. (With more than two workers, regions near a multiple
of ``min_subset_size`` can hold fewer pieces than the undivided data, so the number of *regions*
is monotone in ``g`` always, the number of leaves with up to two workers.)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..core.blocks import take_rows
from ..core.linalg import chi2_sf
from ..core.standardize import Standardizer
from ..federation.shards import leaf_ranges, route_rows
from ..inference import split_tests
from . import profile as prof
from .tree import PartitionTree, Stability

#: Rows the tree is grown on at most.
SAMPLE_ROWS = 50_000
#: Each side of a cut needs this many rows per parameter outside its largest class (among the
#: rows it is tested on): a side of one class plus a few stragglers has no finite fit.
MIN_MINORITY_PER_PARAM = 2
#: Split level at g = 1, and how many decades it falls to g -> 0.
ALPHA_AT_ONE = 0.05
ALPHA_DECADES = 6.0
#: Largest base of the node count in the correction across nodes (:func:`search_size`).
SEARCH_BASE_CAP = 1e5
#: k-means++ starts of a node's 2-means candidates (the best by inertia): one start's local
#: optimum varies with the seed and the rows, and so would the cut.
KMEANS_STARTS = 3
#: Features whose thresholds are tried at each node at these quantiles.
N_FEATURE_CANDIDATES = 2
QUANTILES = (0.25, 0.5, 0.75)
#: Half-width (standard deviations along the cut's normal) of the band whose share of rows
#: measures how crowded a cut is.
BOUNDARY_BAND = 0.5
#: Share of the rows one value must hold to count as a point mass, not as rows near a cut.
POINT_MASS = 0.01
#: Candidates this significant (after the Bonferroni correction) and with at least this share
#: of the best expected gain compete on how crowded their boundary is.
CLEAR_LEVEL = 5e-8
NEAR_BEST_GAIN = 0.5
#: ... when at most this share of the best candidate's rows lie near their boundary, and at
#: least this share of the node's rows fewer.
SPARSER = 0.5
SPARSER_BY = 0.05
#: Grid of cut points searched for the density valley of a feature.
VALLEY_GRID = 41
#: A valley must be this many times less dense than the densest points on both of its sides.
VALLEY_DEPTH = 2.0


def split_level(granularity: float) -> float:
    """Significance level a split must reach at this granularity (0 when ``g = 0``)."""
    if granularity <= 0:
        return 0.0
    return ALPHA_AT_ONE * 10.0 ** (-ALPHA_DECADES * (1.0 - granularity))


def search_size(granularity: float, n_rows: int, min_size: int) -> float:
    """Nodes a search at this granularity may test, for the Bonferroni correction across them.

    A search that ends with ``R`` regions has tested ``2 R - 1`` nodes (the root and both
    children of every split), and ``R`` is at most the region budget ``(n / min_size)^g``; so
    ``2 (n / min_size)^g`` (not rounded, so the level below changes smoothly with ``g``). The
    base is capped at :data:`SEARCH_BASE_CAP` so that the level per node still rises with
    ``g`` (``alpha(g)`` gains 6 decades from 0 to 1, the count at most 5).
    """
    if granularity <= 0:
        return 1.0
    base = min(max(n_rows / max(min_size, 1), 1.0), SEARCH_BASE_CAP)
    return 2.0 * base**granularity


def node_level(granularity: float, n_rows: int, min_size: int) -> float:
    """The level one node's best candidate must reach: :func:`split_level` over
    :func:`search_size`, so that the whole search (every node it tests, every candidate at
    each, Bonferroni) splits where one model holds with probability at most ``alpha(g)``."""
    return split_level(granularity) / search_size(granularity, n_rows, min_size)


def region_budget(granularity: float, n_rows: int, min_size: int) -> int:
    """Most regions at this granularity: ``floor((n / min_size)^g)``, at least one."""
    return max(1, int(np.floor((n_rows / min_size) ** granularity + 1e-9)))


@dataclass
class _Candidate:
    label: str
    a: np.ndarray  # in standardised units
    b: float
    left: np.ndarray | None  # mask over the node's sample rows, once chosen
    q: float
    df: int
    gain: float
    crowding: float  # share of rows within BOUNDARY_BAND of the cut


@dataclass
class Grown:
    """The grown tree, the leaf of every training row, and the profile of every leaf."""

    tree: PartitionTree
    leaf: np.ndarray
    profile: prof.DataProfile


class _Grower:
    def __init__(self, X, codes, w, std: Standardizer, n_classes: int, min_size: int,
                 seed: int):
        n = X.shape[0]
        self.n, self.p, self.K = n, X.shape[1], n_classes
        self.seed, self.min_size, self.std = seed, min_size, std
        rng = np.random.default_rng([seed, 0])
        self.sample = (np.arange(n) if n <= SAMPLE_ROWS
                       else np.sort(rng.choice(n, SAMPLE_ROWS, replace=False)))
        self.Xs = std.transform(take_rows(X, self.sample))
        self.ys = codes[self.sample]
        self.ws = None if w is None else w[self.sample]
        self.factor = n / self.sample.shape[0]
        self.min_sample = min_size / self.factor
        self.centres: dict[int, np.ndarray | None] = {}

    def rng(self, key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, key])

    def profile(self, rows, fit, key) -> prof.LeafProfile:
        ws = None if self.ws is None else self.ws[rows]
        return prof.profile_rows(self.Xs[rows], self.ys[rows], ws, self.std, self.K,
                                 rows.shape[0] / self.sample.shape[0], fit, self.rng(key),
                                 self.centres.get(key, False))

    @staticmethod
    def spaced(rows: np.ndarray, at_most: int) -> np.ndarray:
        """``at_most`` evenly spaced ones of ``rows`` (all of them if fewer)."""
        if rows.shape[0] <= at_most:
            return rows
        keep = np.linspace(0, rows.shape[0] - 1, at_most)
        return rows[keep.round().astype(np.intp)]

    def subsample(self, rows: np.ndarray) -> np.ndarray:
        """The evenly spaced rows a region's quick fit uses."""
        return self.spaced(rows, split_tests.QUICK_ROWS)

    def test_rows(self, rows: np.ndarray) -> np.ndarray:
        """The evenly spaced rows a region's split tests use: all of them up to
        :data:`fedgrain.inference.split_tests.TEST_ROWS`."""
        return self.spaced(rows, split_tests.TEST_ROWS)

    def quick(self, rows, start=None):
        sub = self.subsample(rows)
        ws = None if self.ws is None else self.ws[sub]
        return split_tests.quick_fit(self.Xs[sub], self.ys[sub], ws, self.K, start)

    def evaluate(self, rows: np.ndarray, fit, key: int) -> tuple[_Candidate | None, int]:
        """The node's best split candidate (by expected gain) and how many were tried."""
        if fit is None or rows.shape[0] < 2 * self.min_sample:
            return None, 0
        sub = self.subsample(rows)
        Xq, yq = self.Xs[sub], self.ys[sub]
        proposals = self.proposals(Xq, prof.importance(fit, self.p), key)
        # The tests use all the node's rows in the sample (up to TEST_ROWS), at the quick fit
        # refined by a Newton step on them: power grows with the data, at two passes per node
        # and one masked Gram matrix per candidate.
        tr = self.test_rows(rows)
        Xt, yt = (Xq, yq) if tr is sub else (self.Xs[tr], self.ys[tr])
        wt = None if self.ws is None else self.ws[tr]
        fit, terms = split_tests.refine(Xt, yt, wt, fit)
        node_counts = np.bincount(yt, minlength=self.K)
        scale = rows.shape[0] * self.factor / tr.shape[0]
        cands = []
        for label, a, b in proposals:
            z = Xt @ a
            left_t = z <= b
            share = float(left_t.mean())
            if min(share, 1.0 - share) * rows.shape[0] < self.min_sample:
                continue
            counts = np.bincount(yt[left_t], minlength=self.K)
            minority = min(counts.sum() - counts.max(),
                           (node_counts - counts).sum() - (node_counts - counts).max())
            if minority < MIN_MINORITY_PER_PARAM * (self.p + self.K - 1):
                # a side of (nearly) one class has no model of its own: its few other rows
                # are as good as separated
                continue
            q, df = split_tests.split_test(Xt, yt, wt, fit, left_t, terms)
            if df > 0:
                crowd = _crowding(z, b, BOUNDARY_BAND * np.linalg.norm(a))
                cands.append(_Candidate(label, a, b, None, q, df, 0.5 * (q * scale - 2 * df),
                                        crowd))
        # Where to cut: by gain, unless a clearly significant candidate with at least half the
        # best gain cuts through much sparser data (at most half as many rows near its
        # boundary: a gap, so fewer rows misrouted). Neither choice depends on the granularity,
        # which only decides whether to split.
        by_gain = sorted(cands, key=lambda c: -c.gain)
        ranked = by_gain
        if by_gain:
            best = by_gain[0]
            cleaner = [c for c in by_gain if c.gain >= NEAR_BEST_GAIN * best.gain
                       and c.crowding <= SPARSER * best.crowding
                       and c.crowding <= best.crowding - SPARSER_BY
                       and chi2_sf(c.q, c.df) * len(proposals) < CLEAR_LEVEL]
            if cleaner:
                pick = min(cleaner, key=lambda c: c.crowding)
                ranked = [pick] + [c for c in by_gain if c is not pick]
        for cand in ranked:  # the sizes above were estimated on the test rows: check them
            if tr.shape[0] == rows.shape[0]:
                cand.left = Xt @ cand.a <= cand.b
            else:  # one product over the whole sample beats gathering the node's rows
                cand.left = (self.Xs @ cand.a)[rows] <= cand.b
            nl = int(cand.left.sum())
            if min(nl, rows.shape[0] - nl) >= self.min_sample:
                return cand, len(proposals)
        return None, len(proposals)

    def proposals(self, Xq: np.ndarray, imp: np.ndarray, key: int) -> list:
        """The candidate cuts of a node from its subsample ``Xq`` (standardised): the 2-means
        boundaries in the importance-weighted and the plain space, every feature's density
        valley, and the most important features' medians. ``(label, a, b)``: ``x @ a <= b``."""
        proposals = []
        rng = self.rng(key)
        for label, fw in (("cluster boundary (2-means)", prof.feature_weights(imp)),
                          ("cluster boundary (2-means, unweighted)", np.ones(self.p))):
            centres = prof.two_means(Xq * fw, rng, n_init=KMEANS_STARTS)
            self.centres.setdefault(key, centres)  # the weighted ones, for the profile
            if centres is not None:
                c1, c2 = centres / fw
                a = 2.0 * fw**2 * (c2 - c1)
                b = float(c2 @ (fw**2 * c2) - c1 @ (fw**2 * c1))
                proposals.append((label, a, b))
            if imp.sum() == 0:
                break  # without importance the weighted space is the plain one
        order = np.argsort(-imp, kind="stable")[:N_FEATURE_CANDIDATES]
        top = set(order[imp[order] > 0].tolist())
        sorted_q = np.sort(Xq, axis=0)
        for j in range(self.p):
            # every feature with a density valley; the most important ones at their median and
            # quartiles too (a change of model need not sit at a feature's median)
            cuts = [_valley_cut(sorted_q[:, j], median=False)]
            if j in top:
                cuts += [_quantile_cut(sorted_q[:, j], q) for q in QUANTILES]
            a = np.zeros(self.p)
            a[j] = 1.0
            for cut in dict.fromkeys(c for c in cuts if c is not None):
                proposals.append((f"feature {j}", a, cut))
        return proposals

    def raw_rule(self, a_std: np.ndarray, b_std: float) -> tuple[np.ndarray, float]:
        """The rule ``x_std @ a <= b`` in original feature units, scaled to max |a| = 1."""
        a = a_std / self.std.scale
        b = b_std + float(a @ self.std.mean)
        top = np.abs(a).max()
        return a / top, b / top


def _crowding(z: np.ndarray, b: float, band: float) -> float:
    """Share of the rows on the fence of the cut ``z <= b``: within ``band`` of it, leaving out
    values that at least :data:`POINT_MASS` of the rows share (a cut between distinct values
    never divides those: a 0/1 feature, or the zeros of a mostly-zero one, are on one side of
    it wherever in the gap the cut falls)."""
    near = z[np.abs(z - b) < band]
    if near.shape[0] == 0:
        return 0.0
    values, counts = np.unique(near, return_counts=True)
    return float(counts[counts < POINT_MASS * z.shape[0]].sum()) / z.shape[0]


def _quantile_cut(sv: np.ndarray, q: float) -> float | None:
    """A cut at the ``q`` quantile of the sorted values ``sv``: between the distinct values
    nearest to it, None when all the values lie on one side."""
    last = sv.shape[0] - 1
    v = sv[int(round(q * last))]
    above = sv[np.searchsorted(sv, v, side="right"):]
    if above.shape[0] == 0:
        below = sv[:np.searchsorted(sv, v, side="left")]
        return None if below.shape[0] == 0 else float(0.5 * (below[-1] + v))
    return float(0.5 * (v + above[0]))


def _valley_cut(sv: np.ndarray, median: bool = True) -> float | None:
    """Where to cut a feature (``sv``: its sorted values): in a density valley, if any.

    The density at a cut is the number of values within half a grid step of it (a grid of
    :data:`VALLEY_GRID` points, or the midpoints between distinct values for a discrete
    feature). A valley is the lowest such point with at least :data:`VALLEY_DEPTH` times its
    density on both sides; without one (a unimodal feature) the cut goes at the median, the
    midpoint of distinct values nearest to it for a discrete feature, or None when ``median``
    is False. A feature with two values (0/1) is cut between them when each holds at least
    10% of the rows: no data lie between, the deepest valley there is.
    """
    last = sv.shape[0] - 1
    lo, med, hi = sv[int(0.1 * last)], sv[last // 2], sv[int(np.ceil(0.9 * last))]
    new_value = np.flatnonzero(sv[1:] != sv[:-1])
    if new_value.shape[0] == 0:
        return None
    if new_value.shape[0] < VALLEY_GRID:
        uniq = np.concatenate([sv[:1], sv[new_value + 1]])
        cuts = 0.5 * (uniq[1:] + uniq[:-1])
    else:
        cuts = np.linspace(lo, hi, VALLEY_GRID)
    inside = (cuts >= lo) & (cuts <= hi)
    if new_value.shape[0] == 1:  # two values (a 0/1 feature): nothing lies between them
        return float(cuts[0]) if lo < cuts[0] < hi else None
    median_cut = float(cuts[np.argmin(np.abs(cuts - med))]) if median else None
    if inside.sum() < 3:
        return median_cut
    cuts = cuts[inside]
    step = (cuts[-1] - cuts[0]) / (cuts.shape[0] - 1)
    near = (np.searchsorted(sv, cuts + 0.5 * step, side="right")
            - np.searchsorted(sv, cuts - 0.5 * step, side="left"))
    i = int(np.argmin(near))
    if 0 < i < cuts.shape[0] - 1 and min(near[:i].max(), near[i + 1:].max()) >= \
            VALLEY_DEPTH * max(near[i], 1):
        return float(cuts[i])
    return median_cut


def grow(X: np.ndarray, codes: np.ndarray, w: np.ndarray | None, *, std: Standardizer,
         n_classes: int, granularity: float, min_size: int, n_pieces: int, seed: int,
         feature_names: list[str]) -> Grown:
    """Grow the partition tree of the rows ``X`` (encoded features, original units).

    Parameters
    ----------
    X, codes, w : the training rows, their class codes and optional weights.
    std : the global standardisation.
    granularity : float in [0, 1]
    min_size : int
        No leaf gets fewer training rows.
    n_pieces : int
        The number of workers: regions are dealt out at random into pieces until there are at
        least this many leaves (as far as ``min_size`` allows).
    seed : int
    feature_names : names for the split descriptions and the profile.
    """
    n, p = X.shape
    g = _Grower(X, codes, w, std, n_classes, min_size, seed)
    tree = PartitionTree(p, n_classes, std, seed)
    tree.growth = {"granularity": float(granularity), "min_size": int(min_size)}
    fits = {0: g.quick(np.arange(g.sample.shape[0]))}
    rows = {0: np.arange(g.sample.shape[0])}
    if granularity > 0:
        alpha = node_level(granularity, n, min_size)
        budget = region_budget(granularity, n, min_size)
        heap: list = []

        def consider(nid: int, start) -> None:
            if nid not in fits:
                fits[nid] = g.quick(rows[nid], start)
            cand, tried = g.evaluate(rows[nid], fits[nid], tree.nodes[nid].key)
            if cand is None:
                return
            pval = min(1.0, chi2_sf(cand.q, cand.df) * tried)
            if pval < alpha:
                heapq.heappush(heap, (-cand.gain, tree.nodes[nid].key, nid, cand, pval))

        consider(0, None)
        while heap and tree.n_leaves < budget:
            _, _, nid, cand, pval = heapq.heappop(heap)
            a, b = g.raw_rule(cand.a, cand.b)
            label = cand.label
            if label.startswith("feature "):
                j = int(label.split()[1])
                label = f"{feature_names[j]} <= {b / a[j]:.4g}"
            evidence = {"candidate": label, "q": cand.q, "df": cand.df, "p_value": pval,
                        "level": alpha, "gain": cand.gain}
            left_id, right_id = tree.split(nid, a, b, evidence)
            rows[left_id], rows[right_id] = rows[nid][cand.left], rows[nid][~cand.left]
            consider(left_id, fits[nid].estimate)
            consider(right_id, fits[nid].estimate)
        leaf = route_rows(tree, X)
        tree.count(leaf)
        leaf = _enforce_min_size(tree, X, leaf, min_size)
    else:
        leaf = np.zeros(n, dtype=np.int64)
        tree.count(leaf)
    if _deal_out(tree, n_pieces, min_size, X, codes, leaf):
        leaf = route_rows(tree, X, codes)
        tree.count(leaf)
    profile = profile_leaves(tree, X, codes, w, leaf, seed=seed, feature_names=feature_names,
                             fits=fits, grower=g)
    return Grown(tree, leaf, profile)


def stability(X: np.ndarray, codes: np.ndarray, w: np.ndarray | None = None, *,
              granularity: float, min_size: int, std: Standardizer | None = None,
              n_classes: int | None = None, n_resamples: int = 5, fraction: float = 0.7,
              seed: int = 0, tree: PartitionTree | None = None) -> Stability:
    """Grow the partition on ``n_resamples`` random ``fraction``s of the rows (without
    replacement, the same granularity and minimum size) and compare the regions they give
    all the rows, pair by pair, by the adjusted Rand index (and each with ``tree``, if given).

    ``X`` are encoded features in original units (``model.encode(X)``), ``codes`` class codes
    (``model.target_.encode(y)``). Costs ``n_resamples`` tree growths (no leaf fits); a fit
    never runs it: call it, or :func:`measure_stability`, when the figure is wanted.
    """
    from sklearn.metrics import adjusted_rand_score

    X = np.asarray(X, dtype=float)
    codes = np.asarray(codes)
    n, p = X.shape
    if n_resamples < 2:
        raise ValueError(f"stability needs at least 2 resamples; got {n_resamples}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}.")
    std = std if std is not None else Standardizer.fit(X, w)
    K = int(n_classes if n_classes is not None else codes.max() + 1)
    names = [f"x{j}" for j in range(p)]
    m = max(2, int(round(fraction * n)))
    labels, regions = [], []
    for r in range(n_resamples):
        rows = np.sort(np.random.default_rng([seed, r, 99]).choice(n, m, replace=False))
        grown = grow(X[rows], codes[rows], None if w is None else w[rows], std=std,
                     n_classes=K, granularity=granularity, min_size=min(min_size, m),
                     n_pieces=1, seed=int(np.random.SeedSequence([seed, r]).generate_state(1)[0]
                                          >> 1), feature_names=names)
        labels.append(grown.tree.region_of()[grown.tree.route(X)])
        regions.append(int(np.unique(grown.tree.region_of()).shape[0]))
    pairs = tuple(float(adjusted_rand_score(labels[i], labels[j]))
                  for i in range(n_resamples) for j in range(i + 1, n_resamples))
    to_tree = None
    if tree is not None:
        own = tree.region_of()[tree.route(X)]
        to_tree = float(np.mean([adjusted_rand_score(own, lab) for lab in labels]))
    return Stability(float(np.mean(pairs)), pairs, to_tree, tuple(regions), float(fraction))


def profile_leaves(tree: PartitionTree, X, codes, w, leaf, *, seed: int,
                   feature_names: list[str], fits: dict | None = None,
                   grower: _Grower | None = None) -> prof.DataProfile:
    """Profile every leaf of ``tree`` from a sample of its training rows.

    ``leaf`` gives each training row's leaf position; ``fits`` holds quick fits already made
    (by node id) during growth. Pieces of one region share the region's quick fit.
    """
    g = grower or _Grower(X, codes, w, tree.standardizer, tree.n_classes, 1, seed)
    fits = dict(fits or {})
    region_of = tree.region_of()
    sample_leaf = leaf[g.sample]
    sample_region = region_of[sample_leaf]
    profiles: dict[int, prof.LeafProfile] = {}
    K = tree.n_classes
    counts = np.bincount(leaf * K + codes, weights=w, minlength=tree.n_leaves * K).reshape(
        tree.n_leaves, K).astype(float)
    for pos, nid in enumerate(tree.leaves):
        region = int(region_of[pos])
        in_region = np.flatnonzero(sample_region == region)
        if region not in fits:
            fits[region] = g.quick(in_region)
        r = np.flatnonzero(sample_leaf == pos)
        if r.shape[0] < 2:  # a leaf the sample barely reaches: profile its region instead
            r = in_region if in_region.shape[0] >= 2 else np.arange(g.sample.shape[0])
        lp = g.profile(r, fits[region], tree.nodes[nid].key)
        profiles[nid] = prof.LeafProfile(tree.nodes[nid].n_rows, counts[pos], lp.mean,
                                         lp.log_density, lp.importance, lp.importance_source,
                                         lp.centres, lp.low, lp.high, lp.edges, lp.cdf,
                                         lp.n_ref)
    return prof.DataProfile(profiles, feature_names)


def _enforce_min_size(tree: PartitionTree, X, leaf, min_size: int) -> np.ndarray:
    """Merge splits whose leaves fell below ``min_size`` once all rows were routed.

    Only possible when the tree was grown on a sample: the sample's proportions estimate the
    sizes. (No leaf can hold one class: every side of a split had two classes among the
    sample rows it was tested on, and routing all rows only adds rows.)
    """
    while True:
        small = [nid for nid, s in zip(tree.leaves, tree.sizes, strict=True) if s < min_size]
        if not small or tree.n_leaves == 1:
            return leaf
        tree.merge(tree.nodes[small[0]].parent)
        leaf = route_rows(tree, X)
        tree.count(leaf)


def _deal_out(tree: PartitionTree, n_pieces: int, min_size: int, X, codes, leaf) -> bool:
    """Divide the largest regions at random until there are ``n_pieces`` leaves, if sizes allow.

    A region with a constant feature or an absent class is not divided: its pieces would all
    lack the same parameter, so their pooled model would not identify it (one leaf identifies
    what it can, and the leaf model fills in the rest). Returns whether any region was divided.
    """
    regions = tree.leaves
    sizes = tree.sizes.astype(float)
    if len(regions) >= n_pieces:
        return False
    whole = np.ones(len(regions), dtype=bool)
    if len(regions) > 1:  # the whole data have no constant column and every class
        K = tree.n_classes
        counts = np.bincount(leaf * K + codes, minlength=len(regions) * K).reshape(-1, K)
        lo, hi = leaf_ranges(X, leaf, len(regions))
        whole = (counts > 0).all(axis=1) & (hi > lo).all(axis=1)
    k = np.ones(len(regions), dtype=np.int64)
    while k.sum() < n_pieces:
        room = (sizes / (k + 1) >= min_size) & whole
        if not room.any():
            break
        j = int(np.argmax(np.where(room, sizes / k, -1.0)))
        k[j] += 1
    for nid, kj in zip(regions, k, strict=True):
        if kj > 1:
            tree.split_random(nid, int(kj))
    return bool((k > 1).any())


def leaf_seeds(tree: PartitionTree, seed: int, tag: int = 0) -> list[int]:
    """A seed per leaf from its position in the tree (the same however the tree was grown).

    A random piece's key (``1000 key + i``) could equal a deep hyperplane node's, so pieces
    are told apart in the seed's entropy; ``tag`` gives another use its own stream.
    """
    region = tree.region_of()
    return [int(np.random.SeedSequence([seed, tree.nodes[nid].key, int(region[i] != nid), tag])
                .generate_state(1)[0] >> 1) for i, nid in enumerate(tree.leaves)]


def measure_stability(tree: PartitionTree, X, codes: np.ndarray,
                      sample_weight: np.ndarray | None = None, *, n_resamples: int = 5,
                      fraction: float | None = None, random_state: int = 0) -> Stability:
    """How stable a grown partition is: :func:`stability` at the granularity and minimum size
    ``tree`` was grown with, compared with ``tree``; the result is kept as
    ``tree.stability_`` (saved with the tree, shown in the HTML report).

    ``fraction`` defaults to the share of the rows the tree was grown on when it was grown
    honestly on part of them (each resample then repeats that procedure with another random
    part), else 0.7. ``X`` are encoded features and ``codes`` class codes (a fitted model's
    :meth:`~fedgrain.AdaptiveFederatedOrdinal.stability` passes them). Costs ``n_resamples``
    tree growths, no leaf fits.
    """
    if tree.growth is None:
        raise ValueError("This partition was not grown by fedgrain (it was made by hand "
                         "or loaded from an older file), so there is no granularity to "
                         "grow it again at; call fedgrain.partition.growth.stability with "
                         "granularity= and min_size=.")
    tree.stability_ = stability(
        X, codes, sample_weight, granularity=tree.growth["granularity"],
        min_size=tree.growth["min_size"], std=tree.standardizer, n_classes=tree.n_classes,
        n_resamples=n_resamples,
        fraction=fraction if fraction is not None else tree.growth.get("fraction", 0.7),
        seed=random_state, tree=tree)
    return tree.stability_
