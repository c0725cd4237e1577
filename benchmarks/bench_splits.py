"""Split search: power, size and stability of the adaptive partition (issue 12, item 6).

Three parts, every figure on held-out rows or over replications:

1. **Size under one model**: ``make_ordinal`` data (one proportional-odds model everywhere),
   n = 3,000, p = 3, K = 3; the share of grown trees that split at granularity 0.5 and 1, over
   ``--reps`` replications (the minimum leaf size the estimator uses, 20 rows per parameter).
2. **Weak heterogeneity**: ``make_regions`` (3 regions of feature space with slightly different
   models), 20,000 training and 10,000 held-out rows, p = 5, K = 4: the likelihood-ratio test
   of one model against one per true region (on the training rows), then the held-out
   log-loss of the single model, the adaptive model (granularity 0.5 and 1), the per-region
   models and the true models; the adaptive model's regions, their adjusted Rand index (ARI)
   with the true regions, and its stability: the mean ARI between partitions grown on five
   70% subsamples of the training rows.
3. **RAND HIE**: 20,190 people, self-rated health (4 levels), 7 features; a 70/30 split
   stratified by level, grouped by the experiment's plans (individual deductible or not x
   free care or coinsurance). The same comparison with the plans as the known grouping.

Run from the repository root (``PYTHONPATH`` picks the code measured)::

    .venv/bin/python benchmarks/bench_splits.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.metrics import adjusted_rand_score

from fedgrain import AdaptiveFederatedOrdinal, OrdinalRegression
from fedgrain.core.likelihood import class_proba
from fedgrain.core.linalg import chi2_sf
from fedgrain.core.standardize import Standardizer
from fedgrain.datasets import load_randhie, make_ordinal, make_regions
from fedgrain.metrics import ordinal_scores
from fedgrain.partition.growth import grow

GRANULARITIES = (0.5, 1.0)
ROWS_PER_PARAM = 20  # the estimator's default minimum leaf size per parameter


def _grow(X, codes, K, g, min_size, seed):
    return grow(X, codes, None, std=Standardizer.fit(X), n_classes=K, granularity=g,
                min_size=min_size, n_pieces=1, seed=seed,
                feature_names=[f"x{j}" for j in range(X.shape[1])])


def regions_of(tree, X):
    return tree.region_of()[tree.route(X)]


def stability(X, codes, K, g, min_size, n_resamples=5, fraction=0.7, seed=0):
    """Mean pairwise ARI (and regions) of trees grown on random subsamples of the rows: the
    procedure of ``fedgrain.partition.growth.stability``, here so the code before it can be
    measured the same way."""
    n = X.shape[0]
    m = int(round(fraction * n))
    labels, regions = [], []
    for r in range(n_resamples):
        rows = np.sort(np.random.default_rng([seed, r, 99]).choice(n, m, replace=False))
        tree = _grow(X[rows], codes[rows], K, g, min_size, seed=1000 * seed + r).tree
        labels.append(regions_of(tree, X))
        regions.append(len(np.unique(tree.region_of())))
    pairs = [adjusted_rand_score(labels[i], labels[j])
             for i in range(n_resamples) for j in range(i + 1, n_resamples)]
    return float(np.mean(pairs)), regions


def null_size(reps: int) -> str:
    n, p, K = 3000, 3, 3
    min_size = ROWS_PER_PARAM * (p + K - 1)
    split = {g: 0 for g in GRANULARITIES}
    t0 = time.perf_counter()
    for r in range(reps):
        X, y, _, _ = make_ordinal(n, p, K, random_state=5000 + r)
        for g in GRANULARITIES:
            split[g] += _grow(X, y, K, g, min_size, seed=r).tree.n_leaves > 1
    secs = time.perf_counter() - t0
    cells = ", ".join(f"granularity {g}: {split[g] / reps:.1%} ({split[g]} of {reps})"
                      for g in GRANULARITIES)
    return (f"**Size under one model** (`make_ordinal(3000, 3, 3)`, min_size {min_size}, "
            f"{reps} replications, {secs:.0f} s): share of grown trees that split: {cells}.")


def _loglik(model, X, codes):
    proba = model.predict_proba(X)
    return float(np.log(np.clip(proba[np.arange(codes.shape[0]), codes], 1e-300, None)).sum())


def _ll(codes, proba):
    return ordinal_scores(codes, proba)["log_loss"]


def compare(Xtr, ctr, gtr, Xte, cte, gte, K, seed, truth=None):
    """One data set: LRT of the true grouping, held-out log-loss of every model, the adaptive
    model's regions, ARI with the grouping and stability. ``truth`` is (coef, thresholds) per
    group, for simulations."""
    d = Xtr.shape[1] + K - 1
    out = {}
    single = OrdinalRegression().fit(Xtr, ctr)
    groups = np.unique(gtr)
    # each group's model on the features that vary in it (a plan fixes its insurance terms:
    # their effect goes into the group's thresholds)
    cols = {r: np.flatnonzero(np.ptp(Xtr[gtr == r], axis=0) > 0) for r in groups}
    per = {r: OrdinalRegression().fit(Xtr[gtr == r][:, cols[r]], ctr[gtr == r])
           for r in groups}
    lr = 2 * (sum(_loglik(per[r], Xtr[gtr == r][:, cols[r]], ctr[gtr == r]) for r in groups)
              - _loglik(single, Xtr, ctr))
    df = sum(cols[r].shape[0] + K - 1 for r in groups) - d
    out["lrt"] = (lr, df, chi2_sf(lr, df))
    out["single"] = _ll(cte, single.predict_proba(Xte))
    proba = np.empty((Xte.shape[0], K))
    for r in groups:
        proba[gte == r] = per[r].predict_proba(Xte[gte == r][:, cols[r]])
    out["per-group"] = _ll(cte, proba)
    if truth is not None:
        coef, thr = truth
        proba = np.empty((Xte.shape[0], K))
        for r in groups:
            proba[gte == r] = class_proba(Xte[gte == r] @ coef[r], thr[r])
        out["true"] = _ll(cte, proba)
    min_size = ROWS_PER_PARAM * d
    for g in GRANULARITIES:
        af = AdaptiveFederatedOrdinal(granularity=g, backend="serial", random_state=seed).fit(
            Xtr, ctr)
        reg = regions_of(af.partition_, Xte)
        ari, regions = stability(Xtr, ctr, K, g, min_size, seed=seed)
        out[g] = {"ll": _ll(cte, af.predict_proba(Xte)),
                  "regions": len(np.unique(af.partition_.region_of())),
                  "ari_truth": adjusted_rand_score(gte, reg), "stability": ari,
                  "resample_regions": regions}
    return out


def table(title, results, has_truth):
    """Mean over seeds of every figure (one row per seed when there are few)."""
    head = ["seed", "-log10 p (LRT, df)", "single", "per-group"] + (["true"] if has_truth
                                                                     else [])
    for g in GRANULARITIES:
        head += [f"adaptive g={g}", f"regions g={g}", f"ARI truth g={g}", f"stability g={g}"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, r in results:
        lr, df, pv = r["lrt"]
        cells = [str(seed), f"{-np.log10(max(pv, 1e-300)):.1f} ({df})", f"{r['single']:.4f}",
                 f"{r['per-group']:.4f}"] + ([f"{r['true']:.4f}"] if has_truth else [])
        for g in GRANULARITIES:
            a = r[g]
            cells += [f"{a['ll']:.4f}", str(a["regions"]), f"{a['ari_truth']:.2f}",
                      f"{a['stability']:.2f} ({'/'.join(map(str, a['resample_regions']))})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def simulations(seeds, heterogeneity):
    res = []
    for seed in seeds:
        X, y, region, coef, thr = make_regions(30_000, n_features=5, n_classes=4, n_regions=3,
                                               heterogeneity=heterogeneity,
                                               random_state=200 + seed)
        tr, te = slice(0, 20_000), slice(20_000, None)
        res.append((seed, compare(X[tr], y[tr], region[tr], X[te], y[te], region[te], 4, seed,
                                  truth=(coef, thr))))
    return table(f"**Weak heterogeneity** (`make_regions(30000, n_features=5, n_classes=4, "
                 f"n_regions=3, heterogeneity={heterogeneity})`, 20,000 training / 10,000 "
                 "held-out rows; log-loss on the held-out rows; stability: mean ARI between "
                 "trees grown on five 70% subsamples, with their numbers of regions)", res, True)


def randhie(seeds):
    df = load_randhie()
    codes = df["health"].cat.codes.to_numpy()
    X = df.drop(columns="health").to_numpy(dtype=float)
    cols = list(df.drop(columns="health").columns)
    plan = 2 * (X[:, cols.index("idp")] > 0.5) + (X[:, cols.index("lncoins")] > 0.1)
    res = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        test = np.zeros(len(df), dtype=bool)
        for level in range(4):
            idx = np.flatnonzero(codes == level)
            test[rng.choice(idx, int(0.3 * idx.size), replace=False)] = True
        res.append((seed, compare(X[~test], codes[~test], plan[~test], X[test], codes[test],
                                  plan[test], 4, seed)))
    return table("**RAND HIE** (20,190 people, 7 features, K = 4; 70/30 split stratified by "
                 "level; groups: the 4 plans, individual deductible x free care)", res, False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer replications and seeds")
    ap.add_argument("--reps", type=int, default=None, help="replications of part 1")
    ap.add_argument("--out", help="write the markdown here: between the splits markers as "
                    "its 'After' part for docs/benchmarks.md (the 'Before' part is kept), "
                    "else a file of its own")
    ap.add_argument("--only", choices=("size", "simulations", "randhie"),
                    help="run one part only")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    reps = args.reps or (100 if args.quick else 300)
    seeds = range(2 if args.quick else 3)
    parts = []
    if args.only in (None, "size"):
        parts.append(null_size(reps))
        print(parts[-1], "\n", flush=True)
    if args.only in (None, "simulations"):
        for h in (0.1, 0.2):
            parts.append(simulations(seeds, h))
            print(parts[-1], "\n", flush=True)
    if args.only in (None, "randhie"):
        parts.append(randhie(seeds))
        print(parts[-1], "\n", flush=True)
    parts.append(f"({(time.perf_counter() - t0) / 60:.1f} minutes)")
    if args.out and args.out.endswith("benchmarks.md"):
        _write_after(args.out, parts)
    elif args.out:
        with open(args.out, "w") as fh:
            fh.write("\n\n".join(parts) + "\n")


def _write_after(page: str, parts: list[str]) -> None:
    """Replace the 'After' part of the page's splits section, keeping its introduction and
    its 'Before' part (measured once on the older code)."""
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _report import marked_blocks, write_marked

    old = marked_blocks(Path(page).read_text(), "splits")
    body = old[0].split("\n", 1)[1].rsplit("\n", 1)[0] if old else ""
    intro, _, rest = body.partition("### After")
    _, sep, before = rest.partition("### Before")
    write_marked(page, "splits", [re.sub(r"\s+$", "", intro or ""), "### After",
                                  "\n\n".join(parts), *([sep + before] if sep else [])])


if __name__ == "__main__":
    main()
