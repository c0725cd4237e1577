"""The HTML report of a fitted model: one self-contained file that answers "which leaf
differs, and on what".

:func:`write_report` (also ``model.report(path)`` and ``fedgrain report MODEL --out FILE``)
writes, with a table of contents:

- **Overview**: the fedgrain version, the date, the data source, the rows (one count of the
  training rows used everywhere), and a banner when the global model lies outside its leaves
  or the leaves differ beyond chance (I^2);
- **Coefficients**: the global model's table, the random-effects summary of the leaves
  (per-parameter mean, tau, I^2 and prediction interval) or the subsets' per-parameter I^2,
  and Cochran's Q;
- **Leaves against the others** (adaptive models): each leaf's coefficients with intervals and
  a Wald test of the leaf against the other leaves pooled, per coefficient and jointly (Holm's
  adjustment over the leaves);
- **Forest plots**: small multiples, one panel per parameter, on a standardised scale (a slope
  per standard deviation of its feature, a threshold at the features' means), every leaf or
  subset with its interval beside the global model and the leaves' prediction interval;
- **Partition**: the rows drawn on the directions the tree splits on, with the split lines,
  the tree with each node's rows, and its description;
- **Evaluation** (with labelled rows ``X, y``): scores per leaf beside the null model's
  (every row given the levels' shares), confusion matrices and calibration curves per leaf;
  without data, the meta-learner's held-out losses;
- **Meta-learning**: the curve per round and the learned pull;
- **Drift**: each leaf's loss over the stream, each detector's statistic against its bound,
  the refit windows, every event, and per-feature Kolmogorov-Smirnov and PSI against each
  leaf's training profile.

Plots are PNG images drawn with matplotlib (Agg) and embedded as base64; with plotly installed
(``fedgrain[report]``) the forest plot and the stream also come as interactive plots (choose a
parameter, hover for a leaf's numbers, zoom), its library embedded in the page. The tables sort
when their header is clicked. The file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.groups import split_groups_column

__all__ = ["write_report"]

#: Leaves drawn with their own colour; more share the colour cycle.
_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
            "#8C8C8C", "#CCB974", "#64B5CD"]
_SAMPLE = 3_000
#: Units (leaves, subsets, groups) drawn with their names in a forest panel; beyond, unnamed.
_NAMED_UNITS = 40
#: Leaves given their own confusion matrix and calibration panel (the rest: "all rows").
_PANEL_LEAVES = 12
#: I^2 above this is called large in the banner (as the random-effects summary does).
_LARGE_I2 = 0.5
#: PSI at and above this marks a feature's shift as practically relevant.
_PSI_LARGE = 0.1


def _colour(i: int) -> str:
    return _COLOURS[i % len(_COLOURS)]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, png: str, caption: str) -> str:
    return (f'<figure class="plot"><img alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{png}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


def _plotly():
    """plotly's graph objects, or None where it is not installed (``fedgrain[report]``)."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        return None
    return go


def _interactive(fig, caption: str, name: str) -> str:
    """A plotly figure as a ``<div>`` (its library is embedded once, by :func:`_write_page`)."""
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{name}",
                      config={"displaylogo": False, "responsive": True})
    return (f'<figure class="plot interactive" data-name="{html.escape(name)}">{div}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: list[str] | None, rows: list[list[Any]], cls: str = "",
           marks: list[list[bool]] | None = None) -> str:
    """A sortable table; ``marks[i][j]`` highlights a cell."""
    head = "" if header is None else \
        "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + \
        "</tr></thead>"
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, c in enumerate(r):
            mark = marks is not None and j < len(marks[i]) and marks[i][j]
            cls_ = (["mark"] if mark else []) + (["text"] if isinstance(c, str) and j > 0
                                                 and len(c) > 30 else [])
            attr = f' class="{" ".join(cls_)}"' if cls_ else ""
            cells.append(f"<td{attr}>{html.escape(_fmt(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table class="sortable {cls}">{head}'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not np.isfinite(v):
            return "n/a"
        if v == 0:
            return "0"
        if abs(v) >= 1e4 and v == round(v):
            return f"{v:,.0f}"
        if abs(v) < 1e-3 or abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) >= 1 else f"{v:.4f}"
    return "" if v is None else str(v)


def _pvalue(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return "< 1e-16" if p < 1e-16 else f"{p:.3g}"


# ---- what the report compares: the global model and its units ---------------------------------
@dataclass
class Units:
    """The models beside the global one: leaves (one per region: random pieces share it),
    subsets or groups. ``params`` on the original scale, NaN where a unit does not identify
    the parameter; ``covs`` their covariances (None where not kept); ``rows`` their training
    rows."""

    kind: str
    labels: list[str]
    ids: list[int]
    params: np.ndarray
    covs: np.ndarray | None
    rows: np.ndarray | None
    #: the parameters as the units' models use them: where a unit does not identify one, the
    #: value filled in (the global model's slope, a threshold placed by the leaf's rows)
    filled: np.ndarray | None = None

    def __post_init__(self):
        if self.filled is None:
            self.filled = self.params

    @property
    def plural(self) -> str:
        return {"leaf": "leaves", "subset": "subsets", "group": "groups"}[self.kind]

    def __len__(self) -> int:
        return len(self.labels)


def _units(model, adaptive: bool) -> Units | None:
    if adaptive:
        tree = model.partition_
        region = tree.region_of()
        _, first, counts = np.unique(region, return_index=True, return_counts=True)
        order = np.argsort(first)
        first, counts = first[order], counts[order]
        labels = leaf_labels(model)
        names = list(model.results_.param_names)
        est = model._leaves.params[first].copy()
        for row, pos in enumerate(first):  # filled in from the global model: not the leaf's
            est[row, [names.index(n) for n in model._leaves.notes[pos] if n in names]] = np.nan
        lab = [labels[pos] + (f" (+{c - 1} random pieces)" if c > 1 else "")
               for pos, c in zip(first, counts, strict=True)]
        rows = np.array([int(tree.sizes[region == region[pos]].sum()) for pos in first])
        return Units("leaf", lab, [int(tree.leaves[pos]) for pos in first], est,
                     model._leaves.covs[first], rows, model._leaves.params[first])
    if hasattr(model, "subset_estimates_") and model.subset_estimates_.shape[0] > 1:
        k = model.subset_estimates_.shape[0]
        return Units("subset", [f"subset {i + 1}" for i in range(k)], list(range(1, k + 1)),
                     model.subset_estimates_, None, np.asarray(model.subset_sizes_))
    if hasattr(model, "random_effects_") and hasattr(model, "group_params"):
        return Units("group", [f"group {g}" for g in model.groups_],
                     list(range(len(model.groups_))), model.group_params(), None, None)
    return None


def leaf_labels(model) -> list[str]:
    """"leaf N" for each leaf, or "site G (leaf N)" for the leaves of groups."""
    sites = model.partition_.group_of_leaf()
    return [f"leaf {nid}" if g is None else f"site {g} (leaf {nid})"
            for nid, g in zip(model.partition_.leaves, sites, strict=True)]


@dataclass
class Scale:
    """The standardised scale of the forest plots: a slope per standard deviation of its
    feature, a threshold at the features' means (``mean``, ``sd`` of the features; None: the
    original scale)."""

    mean: np.ndarray | None
    sd: np.ndarray | None
    source: str

    def params(self, params: np.ndarray, p: int) -> np.ndarray:
        if self.sd is None:
            return params
        out = np.array(params, dtype=float)
        beta = out[..., :p]
        out[..., p:] = out[..., p:] - (np.nan_to_num(beta) @ self.mean)[..., None]
        out[..., :p] = beta * self.sd
        return out

    def cov(self, cov: np.ndarray, p: int) -> np.ndarray:
        if self.sd is None:
            return cov
        d = cov.shape[-1]
        A = np.eye(d)
        A[:p, :p] = np.diag(self.sd)
        A[p:, :p] = -self.mean[None, :]
        return A @ cov @ A.T


def _scale(model, Xe: np.ndarray | None, adaptive: bool) -> Scale:
    if adaptive:
        std = model.partition_.standardizer
        return Scale(std.mean, std.scale, "the training rows")
    if Xe is not None and Xe.shape[0] > 1:
        sd = Xe.std(axis=0)
        return Scale(Xe.mean(axis=0), np.where(sd > 0, sd, 1.0), "the given rows")
    return Scale(None, None, "")


def _differences(units: Units, p: int) -> list[dict]:
    """Each leaf against the others pooled: per coefficient a z and its p-value, and the
    joint Wald test over the coefficients it identifies (the leaves' rows are disjoint, so
    the covariances of the leaf and of the others' inverse-variance pool add)."""
    from scipy import stats

    k = len(units)
    out = []
    for i in range(k):
        free = np.isfinite(units.params[i, :p])
        others = [m for m in range(k) if m != i and np.all(np.isfinite(units.params[m, :p])
                                                           [free])]
        if not others or not free.any():
            out.append({"z": np.full(p, np.nan), "chi2": np.nan, "df": 0, "p": np.nan})
            continue
        idx = np.flatnonzero(free)
        infos = [np.linalg.pinv(units.covs[m][np.ix_(idx, idx)]) for m in others]
        V_rest = np.linalg.pinv(sum(infos))
        b_rest = V_rest @ sum(W @ units.params[m, idx] for W, m in zip(infos, others,
                                                                        strict=True))
        V = units.covs[i][np.ix_(idx, idx)] + V_rest
        diff = units.params[i, idx] - b_rest
        z = np.full(p, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            z[idx] = diff / np.sqrt(np.diag(V))
        chi2 = float(diff @ np.linalg.pinv(V) @ diff)
        df = int(np.linalg.matrix_rank(V))
        out.append({"z": z, "chi2": chi2, "df": df, "p": float(stats.chi2.sf(chi2, df))})
    ps = np.array([d["p"] for d in out])
    holm = _holm(ps)
    for d, h in zip(out, holm, strict=True):
        d["p_holm"] = h
    return out


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's adjusted p-values (NaN stays NaN)."""
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok])]
    m, run = order.size, 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (m - rank) * p[i]))
        out[i] = run
    return out


# ---- plots ------------------------------------------------------------------------------------
def forest_grid(names: list[str], p: int, est: np.ndarray, ci: np.ndarray,
                unit_est: np.ndarray | None, unit_ci: np.ndarray | None, labels: list[str],
                pred: np.ndarray | None, i2: np.ndarray | None, level: str, scale: str):
    """Small multiples, one panel per parameter: each unit's estimate (with its interval where
    known), the global model (black diamond, bottom row) and the units' prediction interval
    (grey band). Each panel has its own axis, so no parameter flattens the others."""
    plt = _plt()
    n_par = len(names)
    ncol = min(4, n_par)
    nrow = -(-n_par // ncol)
    k = 0 if unit_est is None else unit_est.shape[0]
    named = k <= _NAMED_UNITS
    height = 0.18 * min(k, _NAMED_UNITS) + 1.5
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, height * nrow), squeeze=False)
    ypos = np.arange(k, 0, -1, dtype=float)
    colours = np.array([_colour(i) if k <= len(_COLOURS) else "#4C72B0" for i in range(k)])
    for j, ax in enumerate(axes.flat):
        if j >= n_par:
            ax.axis("off")
            continue
        span = [est[j], ci[j, 0], ci[j, 1]] + ([0.0] if j < p else [])
        if unit_est is not None:
            span += list(unit_est[:, j])
            if unit_ci is not None:
                span += list(unit_ci[:, j].ravel())
        span = np.asarray(span, dtype=float)
        span = span[np.isfinite(span)]
        lo, hi = float(span.min()), float(span.max())
        pad = 0.08 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.1
        if pred is not None and np.all(np.isfinite(pred[j])):  # never widens the axis
            ax.axvspan(max(pred[j, 0], lo - pad), min(pred[j, 1], hi + pad), color="#999999",
                       alpha=0.18, lw=0)
        if k:  # one call per panel, however many units
            e = unit_est[:, j]
            ok = np.isfinite(e)
            if unit_ci is not None:
                lo_, hi_ = unit_ci[:, j, 0], unit_ci[:, j, 1]
                okc = ok & np.isfinite(lo_) & np.isfinite(hi_)
                ax.hlines(ypos[okc], lo_[okc], hi_[okc], colors=colours[okc], lw=1.1)
            ax.scatter(e[ok], ypos[ok], s=13, c=colours[ok], zorder=3)
        ax.errorbar([est[j]], [0.0], xerr=[[est[j] - ci[j, 0]], [ci[j, 1] - est[j]]], fmt="D",
                    color="black", ms=5, capsize=3)
        if j < p:
            ax.axvline(0.0, color="grey", lw=0.7, ls="--")
        title = names[j] if len(names[j]) <= 28 else names[j][:26] + "..."
        if i2 is not None and np.isfinite(i2[j]):
            title += f"  (I²={i2[j]:.2f})"
        ax.set_title(title, fontsize=8.5, color="#C44E52" if i2 is not None and
                     np.isfinite(i2[j]) and i2[j] > _LARGE_I2 else "black")
        ax.set_ylim(-0.8, k + 0.8)
        ax.set_xlim(lo - pad, hi + pad)
        if j % ncol == 0:
            ticks = [0.0] + (list(ypos) if named else [])
            ax.set_yticks(ticks, ["global"] + (labels if named else []), fontsize=7)
        else:
            ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{scale}; black: global model with {level} interval; grey band: "
                 "where a new unit's parameter is expected", fontsize=8.5, y=1.0)
    fig.tight_layout()
    return fig


def _split_nodes(tree) -> list:
    """The tree's hyperplane splits, the ones with the most rows first."""
    nodes = [n for n in tree.nodes.values() if n.kind == "hyperplane" and n.a is not None]
    rows = tree.node_rows()
    return sorted(nodes, key=lambda n: (-rows[n.id], n.id))


def split_label(a: np.ndarray, names: list[str]) -> str:
    """A split direction for people: the feature, or its three largest terms."""
    a = np.asarray(a, dtype=float)
    nz = np.flatnonzero(a)
    if nz.size == 1:
        return names[nz[0]] + ("" if a[nz[0]] == 1 else f" (x {a[nz[0]]:.3g})")
    top = nz[np.argsort(-np.abs(a[nz]))][:3]
    text = " ".join(f"{'+' if a[j] >= 0 else '-'} {abs(a[j]):.2g}·{names[j]}" for j in top)
    return text.lstrip("+ ") + (" ..." if nz.size > 3 else "")


def _side(tree, ancestor: int, nid: int) -> int | None:
    """0 or 1: which child of ``ancestor`` ``nid`` lies under (None: not under it)."""
    while nid >= 0:
        parent = tree.nodes[nid].parent
        if parent == ancestor:
            return tree.nodes[ancestor].children.index(nid)
        nid = parent
    return None


def partition_plot(X: np.ndarray, leaf: np.ndarray, tree, names: list[str]):
    """The rows on the directions of the tree's two largest splits (a feature where the split
    is on one), coloured by leaf, with both split lines. None without a split."""
    splits = _split_nodes(tree)
    if not splits:
        return None
    plt = _plt()
    first = splits[0]
    second = next((s for s in splits[1:] if abs(np.dot(s.a, first.a)) <
                   0.99 * np.linalg.norm(s.a) * np.linalg.norm(first.a)), None)
    sx = X @ first.a
    rng = np.random.default_rng(0)
    if second is not None:
        sy = X @ second.a
        ylabel = split_label(second.a, names)
    else:
        sy = rng.uniform(-1, 1, X.shape[0])
        ylabel = "(spread at random: one split direction)"
    fig, ax = plt.subplots(figsize=(6.8, 5.2))
    for pos, nid in enumerate(tree.leaves):
        m = leaf == pos
        if m.any():
            ax.scatter(sx[m], sy[m], s=6, alpha=0.55, color=_colour(pos), label=f"leaf {nid}")
    ax.axvline(first.b, color="black", lw=1.5)
    if second is not None:
        side = _side(tree, first.id, second.id)
        lo, hi = ax.get_xlim()
        x0, x1 = (lo, first.b) if side == 0 else (first.b, hi) if side == 1 else (lo, hi)
        ax.plot([x0, x1], [second.b, second.b], color="black", lw=1.5, ls="--")
        ax.set_xlim(lo, hi)
    ax.set_xlabel(split_label(first.a, names) + f"  (split at {first.b:.4g})")
    ax.set_ylabel(ylabel + (f"  (split at {second.b:.4g})" if second is not None else ""))
    ax.legend(fontsize=7, markerscale=2.5, loc="best", framealpha=0.85)
    return fig


def tree_plot(tree):
    """The partition tree: every node with its training rows; splits labelled by their rule."""
    plt = _plt()
    nodes = tree.nodes
    xs: dict[int, float] = {}
    depth: dict[int, int] = {}
    order = [0]

    def place(nid: int, d: int) -> None:
        depth[nid] = d
        node = nodes[nid]
        if not node.children:
            xs[nid] = float(len(order) - 1)
            order.append(nid)
            return
        for c in node.children:
            place(c, d + 1)
        xs[nid] = float(np.mean([xs[c] for c in node.children]))

    place(0, 0)
    max_depth = max(depth.values())
    n_leaves = max(1, len(order) - 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * n_leaves), 1.3 * max_depth + 1.6))
    for nid, node in nodes.items():
        for c in node.children:
            ax.plot([xs[nid], xs[c]], [-depth[nid], -depth[c]], color="grey", lw=1, zorder=1)
    leaf_pos = {nid: i for i, nid in enumerate(tree.leaves)}
    n_rows = tree.node_rows()
    for nid, node in nodes.items():
        if node.kind == "leaf":
            colour = _colour(leaf_pos[nid])
            text = f"leaf {nid}\n{n_rows[nid]:,} rows"
        elif node.kind == "random":
            colour = "#eeeeee"
            text = f"{len(node.children)} random pieces\n{n_rows[nid]:,} rows"
        else:
            colour = "#f5f5f5"
            rule = (node.evidence or {}).get("candidate", "split")
            text = f"[{nid}] {rule}\n{n_rows[nid]:,} rows"
        ax.text(xs[nid], -depth[nid], text, ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.35", "fc": colour, "ec": "#555555",
                      "alpha": 0.9}, zorder=2,
                color="white" if node.kind == "leaf" else "black")
    ax.set_xlim(-0.8, n_leaves - 0.2)
    ax.set_ylim(-max_depth - 0.6, 0.6)
    ax.axis("off")
    return fig


def confusion_grid(panels: list[tuple[str, np.ndarray, np.ndarray]], levels: list[str]):
    """One confusion matrix per panel (rows: the true level, shares of the row; counts
    written in the cells)."""
    plt = _plt()
    K = len(levels)
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    size = 0.42 * K + 1.3
    fig, axes = plt.subplots(nrow, ncol, figsize=(size * ncol, size * nrow), squeeze=False)
    for ax, (title, codes, pred) in zip(axes.flat, panels, strict=False):
        M = np.zeros((K, K))
        np.add.at(M, (codes, pred), 1)
        share = M / np.maximum(M.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if K <= 8:
            for r in range(K):
                for c in range(K):
                    ax.text(c, r, f"{int(M[r, c]):,}", ha="center", va="center", fontsize=6.5,
                            color="white" if share[r, c] > 0.6 else "black")
        ax.set_xticks(range(K), levels, fontsize=6.5, rotation=45 if K > 5 else 0)
        ax.set_yticks(range(K), levels, fontsize=6.5)
        ax.set_title(title, fontsize=8.5)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def calibration_grid(panels: list[tuple[str, np.ndarray, np.ndarray]], levels: list[str]):
    """Per panel and cut point k: the predicted P(y above level k) against the observed share,
    in up to ten bins of equal rows."""
    plt = _plt()
    K = len(levels)
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol, 3.0 * nrow), squeeze=False)
    for ax, (title, codes, proba) in zip(axes.flat, panels, strict=False):
        above = 1.0 - np.cumsum(proba, axis=1)[:, :-1]
        for k in range(K - 1):
            pr, ob = _binned(above[:, k], (codes > k).astype(float))
            ax.plot(pr, ob, "o-", ms=3, lw=1, color=_colour(k), label=f"> {levels[k]}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=8.5)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("observed", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _binned(pred: np.ndarray, obs: np.ndarray, bins: int = 10, min_rows: int = 20):
    """Mean prediction and observed share in bins of equal rows (at least ``min_rows``)."""
    n = pred.shape[0]
    b = max(1, min(bins, n // min_rows))
    order = np.argsort(pred, kind="stable")
    parts = np.array_split(order, b)
    return (np.array([pred[i].mean() for i in parts if i.size]),
            np.array([obs[i].mean() for i in parts if i.size]))


def meta_curve(history: list[dict]):
    """Validation log-loss per round: the global model and each leaf."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    rounds = [h["round"] for h in history]
    leaves = sorted({k for h in history for k in h.get("leaf_val_loss", {})}, key=int)
    for i, leaf in enumerate(leaves):
        ax.plot(rounds, [h.get("leaf_val_loss", {}).get(leaf, np.nan) for h in history],
                lw=1, alpha=0.6, color=_colour(i), label=f"leaf {leaf}" if len(leaves) <= 12
                else None)
    ax.plot(rounds, [h["val_loss"] for h in history], "o-", color="black", lw=2,
            label="all leaves (personalised)")
    ax.plot(rounds, [h.get("no_adaptation_loss", np.nan) for h in history], "s--",
            color="grey", lw=1.2, label="global model, no adaptation")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("meta round")
    ax.set_ylabel("validation log-loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


_EVENT_MARKERS = {"concept drift": ("X", "#C44E52"), "covariate shift": ("D", "#DD8452"),
                  "refit": ("o", "#4C72B0"), "split": ("^", "#55A868"),
                  "merge": ("v", "#8172B3"), "meta rounds": ("s", "#000000"),
                  "profile refreshed": ("P", "#937860"), "granularity": ("*", "#DA8BC3")}


def _trace_series(trace: list[dict], nid: int, column: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for e in trace:
        v = e["leaf"].get(str(nid))
        if v is not None:
            xs.append(e["rows_seen"])
            ys.append(np.nan if v[column] is None else v[column])
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def refit_windows(events: list[dict]) -> list[tuple[int, int, int]]:
    """``(leaf, from, to)``: from each concept drift to the leaf's next refit (the rows the
    leaf waited for before it was refitted on its new regime)."""
    out, open_ = [], {}
    for e in sorted(events, key=lambda e: e.get("rows_seen", 0)):
        leaf, kind = e.get("leaf"), e.get("kind")
        if kind == "concept drift" and leaf not in open_:
            open_[leaf] = int(e["rows_seen"])
        elif kind == "refit" and leaf in open_:
            out.append((int(leaf), open_.pop(leaf), int(e["rows_seen"])))
    return out


def stream_loss_plot(trace: list[dict], leaves: list[int], events: list[dict]):
    """Each leaf's mean log-loss per batch over the stream; its refit windows shaded; the
    events marked along the top."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    at = {nid: i for i, nid in enumerate(leaves)}
    seen = sorted({int(k) for e in trace for k in e["leaf"]})
    for nid in seen:
        x, y = _trace_series(trace, nid, 1)
        i = at.get(nid, len(at) + seen.index(nid))
        ax.plot(x, y, lw=1.2, color=_colour(i),
                label=f"leaf {nid}" + ("" if nid in at else " (since replaced)"))
    for leaf, a, b in refit_windows(events):
        ax.axvspan(a, b, color=_colour(at.get(leaf, 0)), alpha=0.12, lw=0)
    top = ax.get_ylim()[1]
    kinds = set()
    for e in events:
        marker, colour = _EVENT_MARKERS.get(str(e.get("kind")), ("o", "#8C8C8C"))
        kind = str(e.get("kind"))
        ax.scatter([e.get("rows_seen", 0)], [top], marker=marker, color=colour, s=40,
                   clip_on=False, zorder=3, label=None if kind in kinds else kind)
        kinds.add(kind)
    ax.set_xlabel("rows seen on the stream")
    ax.set_ylabel("mean log-loss of the batch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              frameon=False)
    return fig


def detector_grid(trace: list[dict], leaves: list[int], events: list[dict]):
    """Per leaf: each detector's statistic over its bound after every batch (an alarm at 1)."""
    plt = _plt()
    seen = [nid for nid in leaves if any(str(nid) in e["leaf"] for e in trace)]
    seen = seen[:_PANEL_LEAVES]
    ncol = min(3, max(1, len(seen)))
    nrow = -(-max(1, len(seen)) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.6 * nrow), squeeze=False)
    for ax, nid in zip(axes.flat, seen, strict=False):
        for col, name, colour in ((2, "loss detector", "#4C72B0"),
                                  (4, "reference CUSUM", "#DD8452")):
            x, s = _trace_series(trace, nid, col)
            _, b = _trace_series(trace, nid, col + 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(b > 0, s / b, np.nan)
            ax.plot(x, ratio, lw=1.1, color=colour, label=name)
        for e in events:
            if e.get("kind") == "concept drift" and e.get("leaf") == nid:
                ax.axvline(e["rows_seen"], color="#C44E52", lw=1, ls=":")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_title(f"leaf {nid}", fontsize=8.5)
        ax.tick_params(labelsize=7)
        ax.set_ylabel("statistic / bound", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(seen):]:
        ax.axis("off")
    if seen:
        axes.flat[0].legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    return fig


# ---- the page ---------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1150px;color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}.sub{color:#666}table{border-collapse:collapse;margin:.8em 0;font-size:.86em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f3f3f3;cursor:pointer}td:first-child,th:first-child{text-align:left}
td.mark{background:#fde2e1;font-weight:600}
td.text{text-align:left;white-space:normal;min-width:14em}div.wide{overflow-x:auto}
figure.plot{margin:1em 0}figure.plot img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.88em}
pre{background:#f7f7f7;padding:.7em;overflow-x:auto;font-size:.85em}
.grid{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.banner{border-left:5px solid #C44E52;background:#fdf1f0;padding:.6em 1em;margin:1em 0}
.note{border-left:5px solid #4C72B0;background:#f0f4fa;padding:.6em 1em;margin:1em 0}
nav.toc{background:#fafafa;border:1px solid #eee;padding:.4em 1.2em;display:inline-block}
nav.toc ol{margin:.3em 0;padding-left:1.2em}
"""

#: Sorts a table by the column whose header is clicked (numbers as numbers), and marks the
#: page once loaded with how many of its images failed to decode (for checks).
_SCRIPT = """<script>
(function(){
function key(td){const t=td.textContent.replace(/,/g,'').replace(/^< /,'');
const v=parseFloat(t);return isNaN(v)?t:v;}
document.querySelectorAll('table.sortable th').forEach(function(th,i){
th.addEventListener('click',function(){const tb=th.closest('table').tBodies[0];
const rows=Array.from(tb.rows);const asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
rows.sort(function(a,b){const x=key(a.cells[i]),y=key(b.cells[i]);
if(typeof x===typeof y){return (x<y?-1:x>y?1:0)*(asc?1:-1);}
return (typeof x==='number'?-1:1)*(asc?1:-1);});rows.forEach(function(r){tb.appendChild(r);});});});
window.addEventListener('load',function(){const imgs=Array.from(document.images);
document.body.dataset.images=String(imgs.length);document.body.dataset.imagesBad=
String(imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);}).length);});
})();
</script>"""


@dataclass
class Given:
    """The rows given to the report: encoded features, class codes and the model's
    probabilities (with ``y``), each row's leaf position (adaptive; -1: none)."""

    Xe: np.ndarray | None = None
    codes: np.ndarray | None = None
    proba: np.ndarray | None = None
    leaf: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        return self.codes is not None


def write_report(model, path: str | os.PathLike, X=None, y=None, *, alpha: float = 0.05,
                 title: str | None = None, groups=None, source=None) -> Path:
    """Write the HTML report of a fitted fedgrain model to ``path``; returns the path.

    Parameters
    ----------
    model : fitted DivideConquerOrdinal, AdaptiveFederatedOrdinal, OrdinalRegression or
        MixedOrdinalRegression
    path : str or path-like
        The ``.html`` file to write (replaced atomically: never half-written).
    X, y : optional
        Rows (for example held-out data): the partition plot draws them, the forest plots of a
        model without a partition are standardised by them, and with labels ``y`` the report
        scores the model on them (per leaf, beside the null model), with confusion matrices
        and calibration curves, and compares their features with each leaf's training profile.
    alpha : float
        1 - the confidence level of the intervals and the level of the tests.
    title : str, optional
    groups : optional
        The group of each row of ``X`` (a model fitted with groups): each row goes to its
        group's leaf (without them, every row is the global model's).
    source : str, optional
        Where ``X`` and ``y`` come from, for the report's header (the command line gives the
        file's path).

    Examples
    --------
    >>> from fedgrain import AdaptiveFederatedOrdinal
    >>> from fedgrain.datasets import make_regions
    >>> X, y, *_ = make_regions(4000, n_regions=2, random_state=0)
    >>> model = AdaptiveFederatedOrdinal(backend="serial").fit(X, y)
    >>> import tempfile, os
    >>> out = write_report(model, os.path.join(tempfile.mkdtemp(), "report.html"))
    >>> out.read_text().startswith("<!DOCTYPE html>")
    True
    """
    if not hasattr(model, "results_"):
        raise ValueError("The model is not fitted; fit it (or load a saved one) first.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} must lie strictly between 0 and 1 (0.05 gives 95% "
                         "intervals).")
    path = Path(path)
    adaptive = hasattr(model, "partition_")
    heading = title or f"fedgrain report: {type(model).__name__}"
    with _plt().rc_context({"text.parse_math": False}):  # "$" in a name is a dollar sign
        sections = _sections(model, X, y, adaptive, groups, source, alpha)
    _write_page(path, heading, sections)
    return path


def _sections(model, X, y, adaptive: bool, groups, source, alpha: float):
    """The page's sections: ``(id, title, parts)``."""
    given = _given_rows(model, X, y, adaptive, groups)
    units = _units(model, adaptive)
    scale = _scale(model, given.Xe, adaptive)
    diffs = (_differences(units, model.schema_.n_features)
             if units is not None and units.covs is not None and len(units) > 1 else None)
    sections = [("overview", "Overview",
                 _overview(model, adaptive, units, diffs, given, source, X is not None, alpha)),
                ("coefficients", "Coefficients", _coefficients(model, alpha, adaptive))]
    if diffs is not None:
        sections.append(("leaves", "Leaves against the others",
                         _comparison(model, units, diffs, alpha)))
    sections.append(("forest", "Forest plots", _forest(model, units, scale, alpha)))
    if hasattr(model, "random_effects_") and not adaptive:
        sections.append(("random-effects", "Random effects", _random_effects(model)))
    if adaptive:
        sections.append(("partition", "Partition", _partition(model, given)))
    sections.append(("evaluation", "Evaluation", _evaluation(model, given, adaptive)))
    if adaptive:
        sections.append(("meta-learning", "Meta-learning", _meta_learning(model)))
        sections.append(("drift", "Drift", _drift(model, given)))
    return sections


def _given_rows(model, X, y, adaptive: bool, groups=None) -> Given:
    """The given rows encoded, with their codes, probabilities and leaves where given."""
    out = Given()
    if X is None:
        if y is not None:
            raise ValueError("y was given without X; give the rows' features too.")
        return out
    by_group = {}
    if groups is not None:
        if adaptive:
            X, groups = model._groups_of(X, groups)
        else:  # a mixed model: its groups' own random effects
            X, groups = split_groups_column(X, groups)
        by_group = {"groups": groups}
    out.Xe = model.encode(X)
    if y is not None:
        out.codes = model.target_.encode(y)
        if out.codes.shape[0] != out.Xe.shape[0]:
            from .exceptions import DataError

            raise DataError(f"X has {out.Xe.shape[0]:,} rows and y {out.codes.shape[0]:,}; "
                            "give one label per row.")
        out.proba = model.predict_proba(X, order="levels", **by_group)
    if adaptive:
        out.leaf = model._leaf_positions(X, **by_group)
    return out


def _version() -> str:
    from ._version import __version__

    return __version__


def _overview(model, adaptive: bool, units: Units | None, diffs, given: Given,
              source: str | None, has_rows: bool, alpha: float) -> list[str]:
    """When, what and on which rows; the banners that say what to read first."""
    res = model.results_
    info = res.info or {}
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    link = getattr(res, "link", "logit")
    names = list(res.feature_names)
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    if has_rows:
        data = (str(source) if source is not None else "rows given in memory") + \
            f": {given.Xe.shape[0]:,} rows" + (
            ", labelled" if given.labelled else ", without labels")
    else:
        data = "none: the report shows the fitted model alone (pass data and labels to score it)"
    rows = [["fedgrain", _version()], ["Written", now],
            ["Model", f"{type(model).__name__} (cumulative {link})"],
            ["Training rows", info.get("Rows", "n/a")], ["Features", shown],
            ["Levels", " < ".join(str(c) for c in res.classes)]]
    stream = getattr(model, "stream_", None)
    if stream is not None and stream.rows_seen:
        rows.append(["Rows since, on the stream", f"{int(stream.rows_seen):,}"])
    if adaptive:
        fitted = int(model.partition_.sizes.sum())
        rows.append(["Rows fitted (the leaves' models)", f"{fitted:,}" + (
            "" if str(fitted) == str(_rows_number(model)) else
            " (a leaf refitted on a stream counts the recent rows it was refitted on)")])
    if units is not None:
        rows.append([units.plural.capitalize(), f"{len(units):,}" + (
            f" regions in {model.n_leaves_:,} leaves" if adaptive and
            len(units) != model.n_leaves_ else "")])
    rows.append(["Data in this report", data])
    parts = [f'<p class="sub">fedgrain {html.escape(_version())} · {now} · '
             f"{html.escape(type(model).__name__)}</p>",
             _table(None, rows, cls="about")]
    parts += _banners(model, adaptive, units, diffs, alpha)
    return parts


def _banners(model, adaptive: bool, units: Units | None, diffs, alpha: float) -> list[str]:
    out = []
    p = model.schema_.n_features
    names = list(model.results_.param_names)
    if units is not None and len(units) > 1 and units.covs is not None:
        # beyond every unit's interval on the same side: not a chance of estimation
        est, zc = model.results_.params, _z(alpha)
        outside = []
        for j in range(p):
            ok = np.isfinite(units.params[:, j])
            col = units.params[ok, j]
            se = np.sqrt(np.maximum(units.covs[ok, j, j], 0.0))
            if col.size >= 2 and (est[j] < (col - zc * se).min() or
                                  est[j] > (col + zc * se).max()):
                outside.append(f"'{names[j]}' ({est[j]:+.3g}; the {units.plural} "
                               f"{col.min():+.3g} to {col.max():+.3g})")
        if outside:
            out.append(
                '<div class="banner"><b>The global model lies outside its '
                f"{units.plural}</b> (beyond every {units.kind}'s interval) on "
                f"{html.escape('; '.join(outside[:6]))}"
                + (f" and {len(outside) - 6} more" if len(outside) > 6 else "") + ". "
                "The global model is fitted on every row: where the features' distributions "
                f"differ between the {units.plural}, it also absorbs those differences, so it "
                f"is not the model of any of them. Read each {units.kind}'s coefficients "
                "(the sections below) before the global ones.</div>")
    het = _large_i2(model, adaptive)
    if het:
        out.append(f'<div class="banner">{html.escape(het)}</div>')
    if diffs is not None:
        found = [(units.labels[i], d) for i, d in enumerate(diffs)
                 if np.isfinite(d["p_holm"]) and d["p_holm"] < alpha]
        if found:
            items = []
            for label, d in found:
                z = d["z"]
                top = [j for j in np.argsort(-np.nan_to_num(np.abs(z))) if np.isfinite(z[j])
                       and abs(z[j]) > _z(alpha)][:4]
                on = ", ".join(f"{names[j]} (z = {z[j]:+.1f})" for j in top) or \
                    "the coefficients jointly"
                items.append(f"<li><b>{html.escape(label)}</b> on {html.escape(on)}</li>")
            out.append(f'<div class="note"><b>{len(found)} of {len(units)} {units.plural} '
                       "differ from the others</b> (joint Wald test, Holm-adjusted p &lt; "
                       f"{alpha:g}):<ul>{''.join(items)}</ul></div>")
        elif not any(np.isfinite(d["p_holm"]) for d in diffs):
            out.append(f'<div class="note">The {units.plural} could not be tested against '
                       "each other: none identifies a coefficient that the others do too "
                       "(see the table of leaves).</div>")
        else:
            tested = sum(np.isfinite(d["p_holm"]) for d in diffs)
            out.append(f'<div class="note">No {units.kind} differs from the others at level '
                       f"{alpha:g} (joint Wald tests of {tested} {units.plural}, "
                       "Holm-adjusted).</div>")
    return out


def _z(alpha: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(1 - alpha / 2))


def _large_i2(model, adaptive: bool) -> str:
    """The sentence on large heterogeneity, or ''."""
    p = model.schema_.n_features
    if adaptive:
        re = model.random_effects_
        return re.statement() if re.differ else ""
    het = getattr(model.results_, "heterogeneity", None)
    if het is None:
        return ""
    i2 = np.asarray(het["i2_param"], dtype=float)[:p]
    if i2.size and np.nanmax(i2, initial=0.0) > _LARGE_I2:
        j = int(np.nanargmax(i2))
        return (f"The random subsets differ more than chance allows (I^2 up to {i2[j]:.2f}, on "
                f"'{model.results_.param_names[j]}'). Random subsets of exchangeable rows "
                "agree: rows ordered by time or site, or a misspecified model, can cause it.")
    return ""


def _coefficients(model, alpha: float, adaptive: bool) -> list[str]:
    """The coefficient table (with the random-effects summary of the regions for an adaptive
    model, per-parameter I^2 for pooled ones) and Cochran's Q between the subsets."""
    parts = [model.summary(alpha).as_html()]
    het_model = model.global_model_ if adaptive else model
    if hasattr(het_model, "q_"):
        parts.append("<h3>Heterogeneity between the subsets of the global fit</h3>")
        parts.append(_table(
            ["Cochran's Q", "df", "p-value", "I^2"],
            [[het_model.q_, het_model.q_df_, _pvalue(het_model.q_pvalue_), het_model.i2_]]))
        parts.append("<p>Q tests whether the subsets' de-biased estimates differ by more than "
                     "their standard errors allow; I^2 is the share of their spread that is "
                     "not chance.</p>")
    return parts


def _comparison(model, units: Units, diffs: list[dict], alpha: float) -> list[str]:
    """Each leaf's coefficients with intervals, marked where they differ from the others."""
    from scipy import stats

    p = model.schema_.n_features
    names = list(model.results_.param_names)[:p]
    zc = float(stats.norm.ppf(1 - alpha / 2))
    header = [units.kind.capitalize(), "Rows fitted"] + names + ["Wald chi2", "df", "p",
                                                                   "Holm p"]
    rows, marks = [], []
    glob = model.results_
    gci = glob.conf_int(alpha)
    rows.append(["global (all rows)", _rows_number(model)] +
                [f"{glob.params[j]:.3g} [{gci[j, 0]:.3g}, {gci[j, 1]:.3g}]" for j in range(p)]
                + ["", "", "", ""])
    marks.append([False] * len(header))
    for i, d in enumerate(diffs):
        cells, mk = [], [False, False]
        for j in range(p):
            e = units.params[i, j]
            if not np.isfinite(e):
                cells.append("not identified")
                mk.append(False)
                continue
            se = float(np.sqrt(max(units.covs[i][j, j], 0.0)))
            cells.append(f"{e:.3g} [{e - zc * se:.3g}, {e + zc * se:.3g}]")
            mk.append(bool(np.isfinite(d["z"][j]) and abs(d["z"][j]) > zc))
        rows.append([units.labels[i], int(units.rows[i])] + cells +
                    [d["chi2"], d["df"], _pvalue(d["p"]), _pvalue(d["p_holm"])])
        marks.append(mk + [False, False, False,
                           bool(np.isfinite(d["p_holm"]) and d["p_holm"] < alpha)])
    level = f"{100 * (1 - alpha):.0f}%"
    return [f"<p>Each {units.kind}'s coefficients (original scale) with {level} intervals. A "
            f"{units.kind} is tested against the other {units.plural} pooled (inverse-variance "
            f"weights): the {units.plural} are fitted on disjoint rows, so the two covariances "
            "add. Shaded: a coefficient whose difference is significant on its own (|z| &gt; "
            f"{zc:.2f}), and a Holm-adjusted joint p-value below {alpha:g}. The global model "
            f"is fitted on every row, this {units.kind}'s included, and is shown for "
            "reference only: where the features' distributions differ between the "
            f"{units.plural}, it can lie on either side of them (see the banner above)."
            + (" With a meta-learner the leaves' models are personalised: each is pulled "
               "toward the global model by the same learned prior, so their differences are "
               "shrunk and the test is conservative (it can miss a difference, not invent "
               "one)." if _personalised(model) else "") + "</p>",
            _table(header, rows, marks=marks)]


def _personalised(model) -> bool:
    """Whether the leaves' models were pulled toward a meta-learned global model."""
    state = getattr(model, "meta_state_", None)
    return bool(getattr(model, "history_", None)) and state is not None and \
        np.isfinite(getattr(state, "rho", np.inf))


def _rows_number(model) -> int | str:
    text = str((model.results_.info or {}).get("Rows", "")).replace(",", "")
    return int(text) if text.isdigit() else ""


def _forest(model, units: Units | None, scale: Scale, alpha: float) -> list[str]:
    """Small multiples on the standardised scale."""
    from .inference.random_effects import random_effects

    res = model.results_
    p = res.n_features
    names = list(res.param_names)
    zc = _z(alpha)
    est = scale.params(res.params, p)
    se = np.sqrt(np.maximum(np.diag(scale.cov(res.cov, p)), 0.0))
    ci = np.column_stack([est - zc * se, est + zc * se])
    unit_est = unit_ci = pred = i2 = None
    labels: list[str] = []
    if units is not None:
        # the models as used (filled-in values and all) on the scale, then what a unit does
        # not identify left out
        unit_est = scale.params(units.filled, p)
        unit_est[~np.isfinite(units.params)] = np.nan
        labels = units.labels
        if units.covs is not None:
            covs = np.array([scale.cov(c, p) for c in units.covs])
            use = np.sqrt(np.maximum(np.einsum("kii->ki", covs), 0.0))
            unit_ci = np.stack([unit_est - zc * use, unit_est + zc * use], axis=-1)
            re = random_effects(unit_est, covs, names, p, level=1 - alpha)  # the dots' scale
            pred = np.column_stack([re.pred_low, re.pred_high])
            i2 = random_effects(units.params, units.covs, names, p).i2  # as in the tables
        elif getattr(res, "heterogeneity", None) is not None:
            i2 = np.asarray(res.heterogeneity["i2_param"], dtype=float)
    level = f"{100 * (1 - alpha):.0f}%"
    where = ("a slope per standard deviation of its feature, a threshold at the features' "
             f"means (both from {scale.source})" if scale.sd is not None else
             "the original scale (pass rows to standardise it)")
    shown = len(names) if len(names) <= 60 else 60
    fig = forest_grid(names[:shown], p, est[:shown], ci[:shown],
                      None if unit_est is None else unit_est[:, :shown],
                      None if unit_ci is None else unit_ci[:, :shown], labels,
                      None if pred is None else pred[:shown],
                      None if i2 is None else i2[:shown], level, where.capitalize())
    unit = units.kind if units is not None else ""
    caption = (f"One panel per parameter, each on its own axis: {where}. Black diamond: the "
               f"global model with its {level} interval."
               + (f" Dots: each {unit}'s estimate" + (f" with its {level} interval" if
                  unit_ci is not None else " (its interval is not kept)") + "." if units else "")
               + (" Grey band: the prediction interval of the random-effects summary, where a "
                  f"new {unit}'s parameter is expected." if pred is not None else "")
               + (" Titles in red: I^2 above 0.5." if i2 is not None else "")
               + (f" The first {shown} of {len(names)} parameters." if shown < len(names)
                  else ""))
    parts = [_figure("forest plots", _png(fig), caption)]
    go = _plotly()
    if go is not None and units is not None:
        parts.append(_interactive(
            forest_explorer(go, names, est, ci, unit_est, unit_ci, units, level),
            f"The same, one parameter at a time (choose it above the plot): hover over a "
            f"{unit} for its estimate, interval and rows; drag to zoom, double-click to "
            "reset.", "forest"))
    return parts


def forest_explorer(go, names, est, ci, unit_est, unit_ci, units: Units, level: str):
    """An interactive forest plot: every unit with its interval, one parameter at a time."""
    k = len(units)
    labels = [html.escape(str(lab)) for lab in units.labels]  # plotly reads text as HTML
    names = [html.escape(str(n)) for n in names]
    rows = ["" if units.rows is None else f"<br>{int(r):,} rows fitted" for r in
            (units.rows if units.rows is not None else [None] * k)]
    fig = go.Figure()
    for j, name in enumerate(names):
        e = unit_est[:, j]
        text = []
        for i in range(k):
            interval = (f" [{unit_ci[i, j, 0]:.4g}, {unit_ci[i, j, 1]:.4g}]"
                        if unit_ci is not None and np.isfinite(e[i]) else "")
            text.append(f"{labels[i]}<br>{name}: {e[i]:.4g}{interval}{rows[i]}"
                        if np.isfinite(e[i]) else f"{labels[i]}: not identified")
        err = None
        if unit_ci is not None:
            err = {"type": "data", "symmetric": False, "array": unit_ci[:, j, 1] - e,
                   "arrayminus": e - unit_ci[:, j, 0], "thickness": 1.2, "width": 3}
        fig.add_trace(go.Scatter(x=e, y=labels, mode="markers", error_x=err, text=text,
                                 hoverinfo="text", name=units.plural, visible=j == 0,
                                 marker={"size": 7, "color": "#4C72B0"}))
        fig.add_trace(go.Scatter(
            x=[est[j]], y=["global"], mode="markers", name="global model", visible=j == 0,
            error_x={"type": "data", "symmetric": False, "array": [ci[j, 1] - est[j]],
                     "arrayminus": [est[j] - ci[j, 0]], "thickness": 2, "width": 5},
            marker={"size": 11, "symbol": "diamond", "color": "black"},
            text=[f"global<br>{name}: {est[j]:.4g} [{ci[j, 0]:.4g}, {ci[j, 1]:.4g}]"],
            hoverinfo="text"))
    buttons = [{"label": name, "method": "update",
                "args": [{"visible": [t // 2 == j for t in range(2 * len(names))]},
                         {"xaxis.title.text": f"{name} ({level} intervals)"}]}
               for j, name in enumerate(names)]
    fig.update_layout(
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "xanchor": "left",
                      "y": 1.12, "yanchor": "bottom", "showactive": True}],
        height=int(min(1400, max(360, 22 * (k + 1) + 150))), template="plotly_white",
        margin={"l": 10, "r": 10, "t": 60, "b": 40}, showlegend=False,
        xaxis={"title": {"text": f"{names[0]} ({level} intervals)"}, "zeroline": True},
        yaxis={"categoryorder": "array", "categoryarray": ["global"] + labels[::-1],
               "automargin": True})
    return fig


def stream_explorer(go, trace: list[dict], leaves: list[int], events: list[dict]):
    """An interactive view of the stream: each leaf's mean loss per batch (hover: its rows
    and its detectors' statistics over their bounds), refit windows, and the events."""
    fig = go.Figure()
    at = {nid: i for i, nid in enumerate(leaves)}
    seen = sorted({int(k) for e in trace for k in e["leaf"]})
    for nid in seen:
        xs, ys, text = [], [], []
        for e in trace:
            v = e["leaf"].get(str(nid))
            if v is None or v[0] is None or v[1] is None:
                continue
            ratios = [("n/a" if v[c] is None or not v[c + 1] else f"{v[c] / v[c + 1]:.2f}")
                      for c in (2, 4)]
            xs.append(e["rows_seen"])
            ys.append(v[1])
            text.append(f"leaf {nid}, after row {e['rows_seen']:,}<br>{int(v[0]):,} rows, "
                        f"mean log-loss {v[1]:.4f}<br>loss detector {ratios[0]} of its bound, "
                        f"reference CUSUM {ratios[1]}")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"leaf {nid}",
                                 text=text, hoverinfo="text",
                                 line={"color": _colour(at.get(nid, len(at) + seen.index(nid)))}))
    for leaf, a, b in refit_windows(events):
        fig.add_vrect(x0=a, x1=b, fillcolor=_colour(at.get(leaf, 0)), opacity=0.12,
                      line_width=0)
    if events:
        fig.add_trace(go.Scatter(
            x=[e.get("rows_seen", 0) for e in events], y=[1.02] * len(events), yaxis="y2",
            mode="markers", name="events", hoverinfo="text",
            marker={"symbol": "triangle-down", "size": 10,
                    "color": [_EVENT_MARKERS.get(str(e.get("kind")), ("o", "#8C8C8C"))[1]
                              for e in events]},
            text=[f"row {e.get('rows_seen', 0):,}: {_leaf_name(e.get('leaf'))}, "
                  f"{html.escape(str(e.get('kind')))}<br>"
                  f"{html.escape(str(e.get('detail', ''))[:160])}"
                  for e in events]))
    fig.update_layout(
        template="plotly_white", height=420, margin={"l": 10, "r": 10, "t": 30, "b": 40},
        xaxis={"title": {"text": "rows seen on the stream"}},
        yaxis={"title": {"text": "mean log-loss of the batch"}, "automargin": True},
        yaxis2={"overlaying": "y", "range": [0, 1.05], "visible": False},
        legend={"orientation": "h", "y": -0.2})
    return fig


def _random_effects(model) -> list[str]:
    """A mixed model's random effects: their standard deviations and correlations."""
    sd = model.random_sd_
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = model.random_cov_ / np.outer(sd, sd)
    names = model.random_names_
    rows = [[n, sd[i], *[corr[i, j] if sd[i] > 0 and sd[j] > 0 else float("nan")
                         for j in range(i)]] for i, n in enumerate(names)]
    return [_table(["effect", "sd", *[f"corr. with {n}" for n in names[:-1]]],
                   [r + [""] * (len(names) + 1 - len(r)) for r in rows]),
            f"<p>{model.n_groups_:,} groups. Each group's model is the fixed effects plus its "
            "conditional modes (empirical Bayes); a group the model was not fitted on gets "
            "the probabilities averaged over this normal distribution.</p>"]


def _leaf_sample(model, rng: np.random.Generator):
    """Rows drawn from each leaf's stored feature distributions, kept where they route back."""
    prof, tree = model.profile_, model.partition_
    rows, labels = [], []
    per_leaf = max(50, _SAMPLE // max(1, tree.n_leaves))
    for pos, nid in enumerate(tree.leaves):
        lp = prof.leaves.get(nid) if hasattr(prof, "leaves") else None
        if lp is None or lp.edges is None:
            continue
        draws = np.empty((per_leaf * 4, len(lp.edges)))
        for j, (e, c) in enumerate(zip(lp.edges, lp.cdf, strict=True)):
            e, c = np.asarray(e, float), np.asarray(c, float)
            if e.size < 2:
                draws[:, j] = e[0] if e.size else 0.0
            else:
                draws[:, j] = np.interp(rng.uniform(c[0], c[-1], draws.shape[0]), c, e)
        keep = tree.route(draws) == pos
        rows.append(draws[keep][:per_leaf])
        labels.append(np.full(min(per_leaf, int(keep.sum())), pos))
    if not rows:
        return None, None
    return np.vstack(rows), np.concatenate(labels)


def _partition(model, given: Given) -> list[str]:
    """The rows on the split directions, the tree plot and the tree's description."""
    tree = model.partition_
    names = list(model.schema_.output_names)
    figs = []
    if tree.group_labels is None:
        rng = np.random.default_rng(0)
        Xe, leaf = given.Xe, given.leaf
        if Xe is not None and Xe.shape[0]:
            take = rng.choice(Xe.shape[0], min(_SAMPLE, Xe.shape[0]), replace=False)
            Xe, leaf = Xe[take], leaf[take]
            caption = (f"A sample of {Xe.shape[0]:,} of the given rows on the directions of "
                       "the tree's two largest splits (the feature itself where a split is on "
                       "one), coloured by their leaf; solid line: the first split, dashed: the "
                       "second (drawn on its side of the first).")
        else:
            Xe, leaf = _leaf_sample(model, rng)
            caption = ("Rows drawn from each leaf's stored feature distributions (the model "
                       "keeps no training rows), kept where the tree routes them back to that "
                       "leaf, on the directions of the tree's two largest splits. Pass data "
                       "(--data) to show real rows.")
        fig = None if Xe is None else partition_plot(Xe, leaf, tree, names)
        if fig is not None:
            figs.append(_figure("partition on its splits", _png(fig), caption))
        figs.append(_figure("partition tree", _png(tree_plot(tree)),
                            "The partition tree: each split's rule and the training rows of "
                            "every node (a node's rows are the sum of its leaves')."))
    else:
        figs.append(f"<p>The leaves are the {len(tree.leaves):,} sites (groups), not regions "
                    "of feature space.</p>")
    st = getattr(tree, "stability_", None)
    stable = ("Stability: " + html.escape(st.describe()) + "." if st is not None else
              "Stability not measured: <code>model.stability(X, y)</code> grows the partition "
              "again on resamples and reports the adjusted Rand index between them.")
    return ['<div class="grid">' + "".join(figs) + "</div>",
            "<pre>" + html.escape(str(tree.describe())) + "</pre>", f"<p>{stable}</p>"]


def _evaluation(model, given: Given, adaptive: bool) -> list[str]:
    """Scores on the given labelled rows beside the null model, per leaf; confusion matrices
    and calibration curves. Without labels: the meta-learner's held-out losses."""
    from .metrics import baseline_scores, ordinal_scores

    levels = [str(c) for c in model.results_.classes]
    K = len(levels)
    if not given.labelled:
        parts = []
        if adaptive:
            parts += _held_out_losses(model)
        parts.append("<p>No labelled rows given: pass data with labels (<code>report(path, X, "
                     "y)</code>, or <code>--data FILE --target COLUMN</code>) to score the "
                     "model beside the null model, with confusion matrices and calibration "
                     "curves.</p>")
        return parts
    codes, proba = given.codes, given.proba
    header = ["Leaf" if adaptive else "Rows", "Rows fitted", "Given rows", "Log-loss",
              "(null)", "RPS", "(null)", "Accuracy", "(null)", "Mean abs. class error",
              "(null)", "Log-loss skill"]

    def row(name, training, m):
        s, b = ordinal_scores(codes[m], proba[m]), baseline_scores(codes[m], K)
        skill = 1 - s["log_loss"] / b["log_loss"] if b["log_loss"] > 0 else float("nan")
        return [name, training, s["rows"], s["log_loss"], b["log_loss"], s["rps"], b["rps"],
                s["accuracy"], b["accuracy"], s["mae"], b["mae"],
                f"{100 * skill:+.1f}%" if np.isfinite(skill) else "n/a"]

    rows, panels = [], []
    everything = np.ones(codes.shape[0], dtype=bool)
    if adaptive:
        tree = model.partition_
        order = np.argsort(-np.bincount(given.leaf[given.leaf >= 0], minlength=tree.n_leaves))
        for pos, nid in enumerate(tree.leaves):
            m = given.leaf == pos
            if m.any():
                rows.append(row(f"leaf {nid}", int(tree.sizes[pos]), m))
        panels = [(f"leaf {tree.leaves[pos]} ({int((given.leaf == pos).sum()):,} rows)",
                   given.leaf == pos) for pos in order[:_PANEL_LEAVES]
                  if (given.leaf == pos).any()]
        unrouted = int((given.leaf < 0).sum())
    else:
        unrouted = 0
    rows.append(row("all", _rows_number(model), everything))
    parts = [_table(header, rows),
             "<p>(null): the null model, every row given the levels' shares in the same rows "
             "(the best prediction without features). Lower log-loss, RPS and mean absolute "
             "class error and higher accuracy are better; skill is the share of the null "
             "model's log-loss the model removes."
             + (f" {unrouted:,} given rows have no leaf (rows of sites the model was not "
                f"fitted on, or rows given without their sites)." if unrouted else "")
             + "</p>"]
    panels = [("all rows", everything)] + panels
    pred = np.argmax(proba, axis=1)
    parts.append(_figure("confusion matrices", _png(confusion_grid(
        [(t, codes[m], pred[m]) for t, m in panels], levels)),
        "Confusion matrices: rows are the true levels (shaded by the share of the row, "
        "counts written), columns the most probable level."
        + (f" The {len(panels) - 1} largest leaves." if len(panels) > 1 else "")))
    if K > 1:
        parts.append(_figure("calibration", _png(calibration_grid(
            [(t, codes[m], proba[m]) for t, m in panels], levels)),
            "Calibration: for each cut point, the predicted probability of a level above it "
            "against the observed share, in up to ten bins of equal rows; on the diagonal "
            "the probabilities mean what they say."))
    return parts


def _held_out_losses(model) -> list[str]:
    last = model.history_[-1] if getattr(model, "history_", None) else None
    if last is None:
        return ["<p>No held-out scores: the model was fitted without a meta-learner.</p>"]
    rows = [[f"leaf {nid}", int(model.partition_.sizes[pos]),
             last.get("leaf_val_loss", {}).get(str(nid))]
            for pos, nid in enumerate(model.partition_.leaves)]
    return [_table(["Leaf", "Rows fitted", "Selection rows' log-loss (last meta round)"],
                   rows),
            "<p>The log-loss on each leaf's selection rows (held out from its fit) in the "
            "last meta round.</p>"]


def _meta_learning(model) -> list[str]:
    """The meta-learning curve and the table of rounds."""
    parts = []
    if getattr(model, "history_", None):
        parts.append(_figure("meta-learning curve", _png(meta_curve(model.history_)),
                             f"Validation log-loss per round ({model.meta}). Grey: the "
                             "global model used as it is; black: each leaf adapted from "
                             "it, as the personalised models are."))
        parts.append(_table(
            ["Round", "Validation log-loss", "Without adaptation", "Pull (pseudo-rows)",
             "Bytes moved", "Seconds"],
            [[h["round"], h["val_loss"], h.get("no_adaptation_loss"), h.get("rho"),
              h.get("bytes"), h.get("seconds")] for h in model.history_]))
        parts += _prior_spread(model) + _site_gain(model)
    else:
        why = [e for e in getattr(model, "events_", [])
               if e.get("kind") == "no meta-learning rounds"]
        parts.append(f"<p>No meta-learning rounds (meta={html.escape(str(model.meta))!s}): "
                     + (html.escape(why[0]["error"]) if why else "each leaf keeps its own fit")
                     + ".</p>")
    return parts


def _prior_spread(model) -> list[str]:
    """How far each parameter of a leaf may differ from the global model under the learned
    pull: the prior's standard deviations (the square roots of the diagonal of ``(rho P)^-1``),
    on the original scale."""
    from .federation.strategies import get_strategy

    state = model.meta_state_
    if get_strategy(model.meta).global_model:
        return [f"<p>{html.escape(str(model.meta))} keeps one global model: every leaf uses "
                "it.</p>"]
    if not np.isfinite(state.rho):
        return ["<p>The learned pull is infinite: adapting did not beat the global model on "
                "the selection rows, so every leaf uses it.</p>"]
    std = model.partition_.standardizer
    prior = np.linalg.pinv(state.rho * state.P)
    _, cov = std.to_raw_model(state.theta, 0.5 * (prior + prior.T))
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    names = list(model.results_.param_names)
    p = model.schema_.n_features
    rows = [[n, float(model.meta_model_.results_.params[j]), float(sd[j])]
            for j, n in enumerate(names)]
    slopes, thresholds = np.mean(sd[:p]), np.mean(sd[p:])
    return ["<h3>How far a leaf may differ: the learned pull, per parameter</h3>",
            f"<p>The pull toward the global model is a prior on each leaf's parameters, shaped "
            f"by the leaves' spread: its standard deviation per parameter (mean over the "
            f"slopes {slopes:.3g}, over the thresholds {thresholds:.3g}). Small: the leaves "
            "share the parameter and are held to it; large: each leaf follows its rows.</p>",
            _table(["Parameter", "Global (meta-learned)", "Prior sd"], rows)]


def _site_gain(model) -> list[str]:
    """Each leaf's selection log-loss, personalised and with the global model, in the last
    round: the per-leaf (per-site) gain."""
    last = model.history_[-1]
    own, glob = last.get("leaf_val_loss", {}), last.get("leaf_global_loss", {})
    if not glob:
        return []
    rows = []
    for nid, label in zip(model.partition_.leaves, leaf_labels(model), strict=True):
        a, b = own.get(str(nid)), glob.get(str(nid))
        if a is None or b is None:
            continue
        rows.append([label, a, b, f"{100 * (b - a) / b:+.1f}%" if b > 0 else ""])
    return ["<h3>Gain per leaf</h3>",
            "<p>Log-loss on each leaf's selection rows (held out from the fits and the outer "
            "step) in the last round: its personalised model against the global one.</p>",
            _table(["Leaf", "Personalised", "Global model", "Gain"], rows)]


def _drift(model, given: Given) -> list[str]:
    """The stream: losses, detectors against their bounds, refit windows, events; each
    leaf's features against its training profile; failed leaf tasks."""
    parts = []
    events = [e for e in getattr(model, "events_", []) if "rows_seen" in e]
    stream = getattr(model, "stream_", None)
    seen = 0 if stream is None else int(stream.rows_seen)
    trace = [] if stream is None else list(getattr(stream, "trace", []))
    leaves = list(model.partition_.leaves)
    if seen or events:
        from .monitor.state import TRACE_BATCHES

        kept = (f"the plots show the latest {len(trace):,} batches" if len(trace) >=
                TRACE_BATCHES else f"in {len(trace):,} batches")
        parts.append(f"<p>{seen:,} rows seen on the stream ({kept}); {len(events)} "
                     "event(s).</p>")
    else:
        parts.append("<p>No stream yet: <code>partial_fit</code> or <code>fedgrain "
                     "stream</code> records each leaf's loss, its drift detectors, refits, "
                     "splits and merges here.</p>")
    if trace:
        parts.append(_figure("loss over the stream", _png(stream_loss_plot(trace, leaves,
                                                                            events)),
                             "Each leaf's mean log-loss per batch. Shaded: a refit window, "
                             "from the drift found in a leaf to its refit on the rows since. "
                             "Marks along the top: the events, by kind."))
        go = _plotly()
        if go is not None:
            parts.append(_interactive(stream_explorer(go, trace, leaves, events),
                                      "The same, interactive: hover over a batch for the "
                                      "leaf's rows, loss and detectors, over a triangle for "
                                      "an event; drag to zoom, double-click to reset.",
                                      "stream"))
        parts.append(_figure("detectors", _png(detector_grid(trace, leaves, events)),
                             "Each leaf's two detectors after every batch: the loss detector "
                             "(the leaf's loss against its own past) and the reference CUSUM "
                             "(its loss against what its model expects), as the statistic "
                             "over its bound; an alarm is raised above 1 (dashed). Dotted: "
                             "concept drift found."))
    windows = refit_windows(events)
    if windows:
        parts.append("<h3>Refit windows</h3>")
        parts.append(_table(["Leaf", "Drift found at row", "Refitted at row",
                             "Rows waited"], [[leaf, a, b, b - a] for leaf, a, b in windows]))
    if events:
        parts.append("<h3>Events</h3>")
        parts.append(_table(
            ["Rows seen", "Leaf", "Event", "Statistic", "Bound", "Detail"],
            [[e.get("rows_seen"), _leaf_name(e.get("leaf")), e.get("kind"),
              e.get("statistic"), e.get("threshold") or None, e.get("detail", "")]
             for e in events]))
    parts += _feature_shift(model, given)
    failures = [e for e in getattr(model, "events_", [])
                if "rows_seen" not in e and e.get("kind") != "no meta-learning rounds"]
    if failures:
        parts.append("<h3>Failed leaf tasks during meta-learning</h3>")
        parts.append(_table(["Round", "Leaf", "Error"],
                            [[e.get("round"), _leaf_name(e.get("leaf")), e.get("error")]
                             for e in failures]))
    return parts


def _leaf_name(leaf) -> str:
    return "whole model" if leaf is None or leaf == -1 else f"leaf {leaf}"


def _feature_shift(model, given: Given) -> list[str]:
    """Per leaf and feature: KS and PSI of the given rows (or else the stream's recent rows)
    against the leaf's training profile."""
    from .monitor.features import profile_shift, rows_below

    tree, prof = model.partition_, model.profile_
    names = list(model.schema_.output_names)
    stream = getattr(model, "stream_", None)
    if given.Xe is not None:
        what = "the given rows"
        chunks = {nid: given.Xe[given.leaf == pos] for pos, nid in enumerate(tree.leaves)}
    elif stream is not None and stream.rows_seen:
        what = "the stream's recent rows kept with the model"
        chunks = {nid: stream.windows[nid].since(np.iinfo(np.int64).min).X
                  for nid in tree.leaves if nid in stream.windows}
    else:
        return []
    tests = []
    for nid, X in chunks.items():
        lp = prof.leaves.get(nid) if hasattr(prof, "leaves") else None
        if lp is None or lp.edges is None or X.shape[0] < 50:
            continue
        for t in profile_shift(lp, rows_below(lp, X), X.shape[0], names):
            tests.append(dict(t, leaf=nid, rows=int(X.shape[0])))
    if not tests:
        return []
    holm = _holm(np.array([t["p_value"] for t in tests]))
    rows, marks = [], []
    order = sorted(range(len(tests)), key=lambda i: -tests[i]["psi"])
    shown = order[:40]
    for i in shown:
        t = tests[i]
        shifted = bool(holm[i] < 1e-3 and t["psi"] >= _PSI_LARGE)
        rows.append([f"leaf {t['leaf']}", t["feature"], t["rows"], t["ks"], _pvalue(holm[i]),
                     t["psi"], shifted])
        marks.append([False] * 6 + [shifted])
    n_shift = sum(bool(holm[i] < 1e-3 and t["psi"] >= _PSI_LARGE) for i, t in enumerate(tests))
    return ["<h3>Features against each leaf's training profile</h3>",
            f"<p>{what.capitalize()} per leaf against the leaf's training distribution, per "
            "feature: the Kolmogorov-Smirnov statistic (at the profile's quantiles), its "
            "Holm-adjusted p-value over all the tests, and the population stability index. "
            f"Shifted: p below 0.001 and PSI at least {_PSI_LARGE:g} (as the stream monitor "
            f"decides). {n_shift} shifted; the {len(shown)} largest PSI of {len(tests)} "
            "tests.</p>",
            _table(["Leaf", "Feature", "Rows", "KS", "Holm p", "PSI", "Shifted"], rows,
                   marks=marks)]


def _write_page(path: Path, heading: str, sections: list[tuple[str, str, list[str]]]) -> None:
    """Write the page atomically: a temporary file beside ``path``, renamed into place."""
    toc = "".join(f'<li><a href="#{sid}">{html.escape(name)}</a></li>'
                  for sid, name, _ in sections)
    body = [f"<h1>{html.escape(heading)}</h1>",
            f'<nav class="toc"><b>Contents</b><ol>{toc}</ol></nav>']
    for sid, name, parts in sections:
        body.append(f'<section id="{sid}"><h2>{html.escape(name)}</h2>' + "\n".join(parts)
                    + "</section>")
    library = ""
    if any('class="plot interactive"' in part for _, _, parts in sections for part in parts):
        from plotly.offline import get_plotlyjs

        library = f"<script>{get_plotlyjs()}</script>"  # embedded: the page stays offline
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(heading)}</title><style>{_STYLE}</style>{library}"
            "</head><body>"
            + "\n".join(body) + _SCRIPT + "</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        from .persist import public_mode

        os.chmod(tmp, public_mode())  # mkstemp makes it private; the umask decides
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
