"""The HTML report of a fitted model: one self-contained file, plots embedded.

:func:`write_report` (also ``model.report(path)`` and ``fedgrain report MODEL --out FILE``)
shows what the fit did:

- the coefficient table with confidence intervals, and heterogeneity between the subsets
  (Cochran's Q, its p-value and I^2);
- a forest plot of the global coefficients and their intervals beside each leaf's (or each
  subset's) coefficients;
- for an adaptive model: the partition (a 2-D projection of a sample coloured by leaf, and the
  tree with the size of every node), a table of leaves with their sizes and metrics, the
  meta-learning curve per round and the drift timeline of a stream, with every event listed.

With labelled data (``X`` and ``y``) the leaf table gives each leaf's held-out metrics (log-loss,
ranked probability score, accuracy, mean absolute class error) and the projection shows those
rows; without data it uses the meta-learner's validation losses, and the projection draws a
sample from each leaf's stored feature distributions (kept only where the tree routes it back
to that leaf), as the caption says. Plots are PNG images drawn with matplotlib (Agg) and
embedded as base64, so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .data.groups import split_groups_column

__all__ = ["write_report"]

#: Leaves drawn with their own colour; more share the colour cycle.
_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
            "#8C8C8C", "#CCB974", "#64B5CD"]
_SAMPLE = 3_000


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, png: str, caption: str) -> str:
    return (f'<figure class="plot"><img alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{png}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "n/a"
        return f"{v:,.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return "" if v is None else str(v)


# ---- plots ------------------------------------------------------------------------------------
def forest_plot(results, leaf_params: np.ndarray | None, leaf_labels: list[str], alpha: float):
    """Global coefficients with intervals; each leaf's (or subset's) coefficients beside them."""
    plt = _plt()
    p = results.n_features
    names = results.param_names[:p]
    est = results.params[:p]
    ci = results.conf_int(alpha)[:p]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * p + 1.4))
    ypos = np.arange(p)[::-1]
    if leaf_params is not None and leaf_params.shape[0] > 1:
        offsets = np.linspace(-0.28, 0.28, leaf_params.shape[0])
        for i, (row, lab) in enumerate(zip(leaf_params, leaf_labels, strict=True)):
            ax.scatter(row[:p], ypos + offsets[i], s=14, color=_COLOURS[i % len(_COLOURS)],
                       alpha=0.75, label=lab, zorder=2)
    ax.errorbar(est, ypos, xerr=[est - ci[:, 0], ci[:, 1] - est], fmt="D", color="black",
                ms=5, capsize=3, label=f"global, {100 * (1 - alpha):.0f}% CI", zorder=3)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(ypos, names)
    scale = ("log cumulative odds" if getattr(results, "link", "logit") == "logit" else
             f"{results.link} scale")
    ax.set_xlabel(f"coefficient ({scale} of a higher class per unit)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if leaf_params is not None and
              leaf_params.shape[0] > 6 else 1)
    return fig


def projection_plot(Xs: np.ndarray, leaf: np.ndarray, leaf_ids: list[int]):
    """The first two principal components of standardised rows, coloured by leaf."""
    plt = _plt()
    Z = Xs - Xs.mean(axis=0)
    if Z.shape[1] >= 2:
        _, _, Vt = np.linalg.svd(Z, full_matrices=False)
        P2 = Z @ Vt[:2].T
    else:
        P2 = np.column_stack([Z[:, 0], np.zeros(Z.shape[0])])
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for pos, nid in enumerate(leaf_ids):
        m = leaf == pos
        if m.any():
            ax.scatter(P2[m, 0], P2[m, 1], s=6, alpha=0.6, color=_COLOURS[pos % len(_COLOURS)],
                       label=f"leaf {nid} ({int(m.sum()):,})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.legend(fontsize=7, markerscale=2.5, loc="best")
    return fig


def tree_plot(tree):
    """The partition tree: every node with its rows; splits labelled by their rule."""
    plt = _plt()
    nodes = tree.nodes
    sizes = dict(zip(tree.leaves, tree.sizes, strict=True))

    def rows(nid: int) -> int:
        node = nodes[nid]
        return int(sizes.get(nid, 0)) if not node.children else sum(rows(c)
                                                                     for c in node.children)

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
    fig, ax = plt.subplots(figsize=(max(5.0, 1.25 * n_leaves), 1.3 * max_depth + 1.6))
    for nid, node in nodes.items():
        for c in node.children:
            ax.plot([xs[nid], xs[c]], [-depth[nid], -depth[c]], color="grey", lw=1, zorder=1)
    leaf_pos = {nid: i for i, nid in enumerate(tree.leaves)}
    for nid, node in nodes.items():
        if node.kind == "leaf":
            colour = _COLOURS[leaf_pos[nid] % len(_COLOURS)]
            text = f"leaf {nid}\n{rows(nid):,}"
        elif node.kind == "random":
            colour = "#eeeeee"
            text = f"{len(node.children)} random pieces\n{rows(nid):,}"
        else:
            colour = "#f5f5f5"
            rule = (node.evidence or {}).get("candidate", "split")
            text = f"{rule}\n{rows(nid):,}"
        ax.text(xs[nid], -depth[nid], text, ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.35", "fc": colour, "ec": "#555555",
                      "alpha": 0.9}, zorder=2,
                color="white" if node.kind == "leaf" else "black")
    ax.set_xlim(-0.8, n_leaves - 0.2)
    ax.set_ylim(-max_depth - 0.6, 0.6)
    ax.axis("off")
    return fig


def meta_curve(history: list[dict]):
    """Validation log-loss per round: the global model and each leaf."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    rounds = [h["round"] for h in history]
    leaves = sorted({k for h in history for k in h.get("leaf_val_loss", {})}, key=int)
    for i, leaf in enumerate(leaves):
        ax.plot(rounds, [h.get("leaf_val_loss", {}).get(leaf, np.nan) for h in history],
                lw=1, alpha=0.6, color=_COLOURS[i % len(_COLOURS)], label=f"leaf {leaf}")
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


def drift_timeline(events: list[dict], leaf_ids: list[int], rows_seen: int = 0):
    """Every stream event: rows seen (x) against the leaf (y), marked by kind; events at the
    same place are spread a little so that none hides another."""
    plt = _plt()
    rows = ["whole model"] + [f"leaf {nid}" for nid in leaf_ids]
    at = {-1: 0, **{int(nid): i + 1 for i, nid in enumerate(leaf_ids)}}
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.6))
    kinds: list[str] = []
    placed: dict[tuple, int] = {}
    for e in events:
        kind = str(e.get("kind"))
        marker, colour = _EVENT_MARKERS.get(kind, ("o", "#8C8C8C"))
        leaf = e.get("leaf", -1)
        yv = at.get(-1 if leaf is None else int(leaf), 0)
        x = float(e.get("rows_seen", 0))
        k = placed.get((x, yv), 0)
        placed[(x, yv)] = k + 1
        ax.scatter([x], [yv + 0.18 * k], marker=marker, s=60, color=colour,
                   label=None if kind in kinds else kind, zorder=2)
        kinds.append(kind)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, max([rows_seen] + [float(e.get("rows_seen", 0)) for e in events]) * 1.03
                + 1)
    ax.set_xlabel("rows seen on the stream")
    ax.grid(alpha=0.3)
    if kinds:
        ax.legend(fontsize=7, loc="best")
    return fig


# ---- the page ---------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}.sub{color:#666}table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}figure.plot{margin:1em 0}
figure.plot img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.88em}
pre{background:#f7f7f7;padding:.7em;overflow-x:auto;font-size:.85em}
.grid{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
"""


#: Marks the page once loaded with how many of its images failed to decode (for checks).
_CHECK = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
          "document.body.dataset.images=String(imgs.length);document.body.dataset.imagesBad="
          "String(imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length);});</script>")


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


def write_report(model, path: str | os.PathLike, X=None, y=None, *, alpha: float = 0.05,
                 title: str | None = None, groups=None) -> Path:
    """Write the HTML report of a fitted fedgrain model to ``path``; returns the path.

    Parameters
    ----------
    model : fitted DivideConquerOrdinal, AdaptiveFederatedOrdinal or OrdinalRegression
    path : str or path-like
        The ``.html`` file to write (replaced atomically: never half-written).
    X, y : optional
        Labelled rows (for example held-out data): the leaf table then shows each leaf's
        metrics on them, and the partition plot shows a sample of them.
    alpha : float
        1 - the confidence level of the intervals.
    title : str, optional
    groups : optional
        The group of each row of ``X`` (a model fitted with groups): each row goes to its
        group's leaf (without them, every row is the global model's).

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
    path = Path(path)
    adaptive = hasattr(model, "partition_")
    heading = title or f"fedgrain report: {type(model).__name__}"
    parts = _title(model, heading, adaptive)
    Xe, codes, proba, leaf = _given_rows(model, X, y, adaptive, groups)
    parts += _coefficients(model, alpha, adaptive)
    parts += _forest(model, alpha, adaptive)
    if hasattr(model, "random_effects_") and not adaptive:
        parts += _random_effects(model)
    if adaptive:
        parts += _partition(model, Xe, leaf)
        parts += _leaves(model, codes, proba, leaf)
        parts += _meta_learning(model)
        parts += _drift(model)
    _write_page(path, heading, parts)
    return path


def _title(model, heading: str, adaptive: bool) -> list[str]:
    """The heading, and a line with the features, classes, leaves and rows."""
    res = model.results_
    info = res.info or {}
    return [f"<h1>{html.escape(heading)}</h1>",
            f'<p class="sub">{len(res.feature_names)} features, classes '
            f"{html.escape(' < '.join(str(c) for c in res.classes))}"
            + (f", {model.n_leaves_} leaves" if adaptive else "")
            + (f", {info.get('Rows')} rows" if info.get("Rows") else "") + "</p>"]


def _given_rows(model, X, y, adaptive: bool, groups=None):
    """The encoded rows, the class codes and predicted probabilities (with ``y``), and the
    leaf of each row (adaptive); None for what is not given."""
    Xe = codes = proba = leaf = None
    if X is not None:
        by_group = {}
        if groups is not None:
            if adaptive:
                X, groups = model._groups_of(X, groups)
            else:  # a mixed model: its groups' own random effects
                X, groups = split_groups_column(X, groups)
            by_group = {"groups": groups}
        Xe = model.encode(X)
        if y is not None:
            codes = model.target_.encode(y)
            proba = model.predict_proba(X, order="levels", **by_group)
        if adaptive:
            leaf = model._leaf_positions(X, **by_group)  # positions, for the tables below
    return Xe, codes, proba, leaf


def _coefficients(model, alpha: float, adaptive: bool) -> list[str]:
    """The coefficient table, and Cochran's Q and I^2 between the subsets where pooled."""
    parts = ["<h2>Coefficients</h2>"]
    if adaptive and model.random_effects_.differ:  # say it before the table, plainly
        parts.append(f"<p class='warning'><b>{html.escape(model.random_effects_.statement())}"
                     "</b></p>")
    # an adaptive model's summary adds the random-effects summary of its regions
    parts.append(model.summary(alpha).as_html())
    het_model = model.global_model_ if adaptive else model
    if hasattr(het_model, "q_"):
        parts.append("<h2>Heterogeneity between the subsets</h2>")
        parts.append(_table(
            ["Cochran's Q", "df", "p-value", "I^2"],
            [[het_model.q_, het_model.q_df_, het_model.q_pvalue_, het_model.i2_]]))
        parts.append("<p>Q tests whether the subsets' de-biased estimates differ by more than "
                     "their standard errors allow; I^2 is the share of their spread that is "
                     "not chance.</p>")
    return parts


def _forest(model, alpha: float, adaptive: bool) -> list[str]:
    """The forest plot: global coefficients beside each leaf's or subset's."""
    if adaptive:
        leaf_params = np.array([m.results_.params for m in model.local_models_])
        labels = leaf_labels(model)
    elif hasattr(model, "subset_estimates_"):
        leaf_params = model.subset_estimates_
        labels = [f"subset {i + 1}" for i in range(leaf_params.shape[0])]
    elif hasattr(model, "random_effects_"):
        leaf_params = model.group_params()
        labels = [f"group {g}" for g in model.groups_]
    else:
        leaf_params, labels = None, []
    unit = "leaf" if adaptive else "group" if hasattr(model, "random_effects_") else "subset"
    plural = {"leaf": "leaves", "group": "groups", "subset": "subsets"}[unit]
    return [f"<h2>Global coefficients and the {plural}'</h2>",
            _figure("forest plot", _png(forest_plot(model.results_, leaf_params, labels, alpha)),
                    f"Black: the global coefficients with {100 * (1 - alpha):.0f}%"
                    f" confidence intervals. Dots: each {unit}'s own coefficients"
                    + (" (fixed effects plus its random effects)." if unit == "group" else "."))]


def _random_effects(model) -> list[str]:
    """A mixed model's random effects: their standard deviations and correlations."""
    sd = model.random_sd_
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = model.random_cov_ / np.outer(sd, sd)
    names = model.random_names_
    rows = [[n, sd[i], *[corr[i, j] if sd[i] > 0 and sd[j] > 0 else float("nan")
                         for j in range(i)]] for i, n in enumerate(names)]
    return ["<h2>Random effects</h2>",
            _table(["effect", "sd", *[f"corr. with {n}" for n in names[:-1]]],
                   [r + [""] * (len(names) + 1 - len(r)) for r in rows]),
            f"<p>{model.n_groups_:,} groups. Each group's model is the fixed effects plus its "
            "conditional modes (empirical Bayes); a group the model was not fitted on gets "
            "the probabilities averaged over this normal distribution.</p>"]


def leaf_labels(model) -> list[str]:
    """"leaf N" for each leaf, or "site G" for the leaves of groups."""
    sites = model.partition_.group_of_leaf()
    return [f"leaf {nid}" if g is None else f"site {g}"
            for nid, g in zip(model.partition_.leaves, sites, strict=True)]


def _partition(model, Xe: np.ndarray | None, leaf: np.ndarray | None) -> list[str]:
    """The projection of rows coloured by leaf, the tree plot and the tree's description."""
    tree = model.partition_
    proj, caption = _projection(model, Xe, leaf)
    figs = [] if tree.group_labels is not None else [  # sites: the table of leaves says it
        _figure("partition tree", _png(tree_plot(tree)),
                "The partition tree: each split's rule, and the training rows of every node.")]
    if proj is not None:
        figs.insert(0, _figure("partition projection", proj, caption))
    elif tree.group_labels is not None:
        figs.append(f"<p>{html.escape(caption)}</p>")
    st = getattr(tree, "stability_", None)
    stable = ("Stability: " + st.describe() + "." if st is not None else
              "Stability not measured: <code>model.stability(X, y)</code> grows the partition "
              "again on resamples and "
              "reports the adjusted Rand index between them.")
    return ["<h2>Partition</h2>", '<div class="grid">' + "".join(figs) + "</div>",
            "<pre>" + html.escape("\n".join(tree.describe())) + "</pre>",
            f"<p>{stable}</p>"]


def _projection(model, Xe: np.ndarray | None, leaf: np.ndarray | None) -> tuple[str | None, str]:
    """The projection plot (None without a sample to draw) and its caption: a sample of the
    given rows, or else of rows drawn from the leaves' stored feature distributions."""
    tree = model.partition_
    rng = np.random.default_rng(0)
    grouped = tree.group_labels is not None
    if Xe is not None and grouped:  # only the rows of known sites have a leaf
        Xe, leaf = Xe[leaf >= 0], leaf[leaf >= 0]
    if Xe is not None and Xe.shape[0]:
        take = rng.choice(Xe.shape[0], min(_SAMPLE, Xe.shape[0]), replace=False)
        Xs = tree.standardizer.transform(Xe[take])
        caption = (f"A sample of {take.shape[0]:,} of the given rows, projected on their "
                   "first two principal components, coloured by the leaf they route to.")
        return _png(projection_plot(Xs, leaf[take], tree.leaves)), caption
    if grouped:
        return None, ("The leaves are sites, not regions of feature space: pass rows with "
                      "their sites (--data, --groups) to show where they lie.")
    sample, lab = _leaf_sample(model, rng)
    if sample is None:
        proj = None
    else:
        proj = _png(projection_plot(tree.standardizer.transform(sample), lab, tree.leaves))
    caption = ("Rows drawn from each leaf's stored feature distributions (the model "
               "keeps no training rows) and kept where the tree routes them back to that "
               "leaf, projected on their first two principal components. Pass data "
               "(--data) to show real rows.")
    return proj, caption


def _leaves(model, codes: np.ndarray | None, proba: np.ndarray | None,
            leaf: np.ndarray | None) -> list[str]:
    """The table of leaves: sizes, the last meta round's validation loss, and scores on the
    given labelled rows."""
    from .metrics import ordinal_scores

    tree = model.partition_
    last = model.history_[-1] if getattr(model, "history_", None) else None
    sites = tree.group_of_leaf() if tree.group_labels is not None else None
    header = ["Leaf", "Training rows", "Region"] if sites is None else \
        ["Leaf", "Training rows", "Site"]
    rows = []
    region = tree.region_of()
    for pos, nid in enumerate(tree.leaves):
        row = [nid, int(tree.sizes[pos]), int(region[pos]) if sites is None else sites[pos]]
        if last is not None:
            row.append(last.get("leaf_val_loss", {}).get(str(nid)))
        if codes is not None:
            m = leaf == pos
            if m.any():
                s = ordinal_scores(codes[m], proba[m])
                row += [int(m.sum()), s["log_loss"], s["rps"], s["accuracy"], s["mae"]]
            else:
                row += [0, None, None, None, None]
        rows.append(row)
    if last is not None:
        header.append("Selection rows' log-loss (last meta round)")
    if codes is not None:
        header += ["Given rows", "Log-loss", "RPS", "Accuracy", "Mean abs. class error"]
        allm = ordinal_scores(codes, proba)
        rows.append(["all", int(tree.sizes.sum()), ""] + ([None] if last is not None else [])
                    + [allm["rows"], allm["log_loss"], allm["rps"], allm["accuracy"],
                       allm["mae"]])
    parts = ["<h2>Leaves</h2>", _table(header, rows)]
    if last is None and codes is None:
        parts.append("<p>No validation metrics: the model was fitted without a "
                     "meta-learner and no labelled data were given (pass --data and "
                     "--target to score the leaves).</p>")
    return parts


def _meta_learning(model) -> list[str]:
    """The meta-learning curve and the table of rounds."""
    parts = ["<h2>Meta-learning</h2>"]
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
        rows.append([f"{nid} ({label})", a, b,
                     f"{100 * (b - a) / b:+.1f}%" if b > 0 else ""])
    return ["<h3>Gain per leaf</h3>",
            "<p>Log-loss on each leaf's selection rows (held out from the fits and the outer "
            "step) in the last round: its personalised model against the global one.</p>",
            _table(["Leaf", "Personalised", "Global model", "Gain"], rows)]


def _drift(model) -> list[str]:
    """The drift timeline and table of the stream's events, and the failed leaf tasks."""
    parts = ["<h2>Drift timeline</h2>"]
    events = [e for e in getattr(model, "events_", []) if "rows_seen" in e]
    stream = getattr(model, "stream_", None)
    seen = 0 if stream is None else int(stream.rows_seen)
    if events:
        parts.append(_figure("drift timeline",
                             _png(drift_timeline(events, model.partition_.leaves, seen)),
                             "Every event of the stream, at the rows seen when it happened."))
        parts.append(_table(
            ["Rows seen", "Leaf", "Event", "Statistic", "Threshold"],
            [[e.get("rows_seen"), e.get("leaf"), e.get("kind"), e.get("statistic"),
              e.get("threshold")] for e in events]))
    if seen:
        parts.append(f"<p>{seen:,} rows seen on the stream; {len(events)} event(s).</p>")
    elif not events:
        parts.append("<p>No stream yet: <code>partial_fit</code> or <code>fedgrain "
                     "stream</code> records drift detections, refits, splits and merges "
                     "here.</p>")
    failures = [e for e in getattr(model, "events_", [])
                if "rows_seen" not in e and e.get("kind") != "no meta-learning rounds"]
    if failures:
        parts.append("<h3>Failed leaf tasks during meta-learning</h3>")
        parts.append(_table(["Round", "Leaf", "Error"],
                            [[e.get("round"), e.get("leaf"), e.get("error")]
                             for e in failures]))
    return parts


def _write_page(path: Path, heading: str, parts: list[str]) -> None:
    """Write the page atomically: a temporary file beside ``path``, renamed into place."""
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(heading)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + _CHECK + "</body></html>\n")
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
