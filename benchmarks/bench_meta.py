"""Federated meta-learning: personalised models against the centralized, static and local fits.

Held-out log-loss, ranked probability score and mean absolute class error of:
``OrdinalRegression`` (centralized), ``DivideConquerOrdinal`` (static), the adaptive
partition's leaf fits (``meta="none"``: each leaf's own fit; pieces of one region share its
pooled fit), FedAvg, FedProx, Ditto, Reptile and FO-MAML on the same partition (granularity
0.5), and
the oracle (each row's true regional model) where it exists, on

- synthetic heterogeneous data (``make_regions``: 4 regions with their own slopes and
  thresholds), homogeneous data (4 regions of feature space, one model), and
- the RAND Health Insurance Experiment (20,190 people, self-rated health in 4 levels), 70% /
  30% split: once with the partition grown from the data, once with the experiment's natural
  groups, its insurance plans (deductible or not, free care or coinsurance) as leaves.

Then **a new region from 50 labelled rows**: trained on 4 of 5 regions, ``adapt`` on 50 rows of
the fifth, against the global models and a local fit of those 50 rows, over 5 seeds.

Then **federated sites** (``fit(X, y, groups=site)``): 40 x 150, 100 x 80 and 200 x 50 rows, and
60 sites of 40-400 rows, with the sites' slopes and thresholds spread around common ones (none,
moderate, large); one global model, local-only fits, FedAvg, FedProx, Ditto, Reptile and FO-MAML
against the true site models and the central hierarchical model (``MixedOrdinalRegression``),
on 400 held-out rows per site, 2 seeds. And ``adapt`` to a new site from 20, 50 and 200 of its
rows against its local fit, the global model and the hierarchical model refitted with them.

    .venv/bin/python benchmarks/bench_meta.py --out docs/benchmarks.md   # about 10 minutes
    .venv/bin/python benchmarks/bench_meta.py --quick
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from _report import write_marked
from fedgrain import (
    AdaptiveFederatedOrdinal,
    DivideConquerOrdinal,
    MixedOrdinalRegression,
    OrdinalRegression,
)
from fedgrain.core.likelihood import class_proba
from fedgrain.datasets import load_randhie, make_regions
from fedgrain.metrics import ordinal_scores

STRATEGIES = ("none", "fedavg", "fedprox", "ditto", "reptile", "fomaml")
LABEL = {"none": "leaf fits (meta='none')", "fedavg": "FedAvg", "fedprox": "FedProx",
         "ditto": "Ditto", "reptile": "Reptile", "fomaml": "FO-MAML"}


def compare(Xa, ya, Xt, yt, oracle_proba=None, partition=None):
    rows = []

    def add(name, model_or_proba, seconds, extra=""):
        proba = model_or_proba if isinstance(model_or_proba, np.ndarray) else \
            model_or_proba.predict_proba(Xt)
        codes = np.searchsorted(np.unique(ya), yt) if yt.dtype.kind in "iu" else yt
        s = ordinal_scores(np.asarray(codes), proba)
        rows.append((name, s["log_loss"], s["rps"], s["mae"], seconds, extra))

    t0 = time.perf_counter()
    add("OrdinalRegression (centralized)", OrdinalRegression().fit(Xa, ya),
        time.perf_counter() - t0)
    t0 = time.perf_counter()
    add("DivideConquerOrdinal (static)", DivideConquerOrdinal(n_jobs=2).fit(Xa, ya),
        time.perf_counter() - t0)
    for m in STRATEGIES:
        t0 = time.perf_counter()
        af = AdaptiveFederatedOrdinal(granularity=0.5, meta=m, n_jobs=2).fit(
            Xa, ya, partition=partition)
        sec = time.perf_counter() - t0
        h = af.history_
        extra = f"{af.n_leaves_} leaves"
        if h:
            best = min(h, key=lambda r: r["val_loss"])
            rho = "inf" if best["rho"] is None else f"{best['rho']:.3g}"
            extra += (f"; {len(h)} rounds, pull {rho}, "
                      f"{np.mean([r['bytes'] for r in h]) / 1e3:.0f} kB a round")
        add(f"Adaptive + {LABEL[m]}", af, sec, extra)
    if oracle_proba is not None:
        add("oracle (true model of each region)", oracle_proba, 0.0)
    return rows


def table(title, rows, target=None):
    ref = rows[0][1]
    out = [f"**{title}**", "", "| model | log-loss | vs centralized | RPS | MAE | fit (s) | "
           "notes |", "|---|---|---|---|---|---|---|"]
    for name, ll, rps, mae, sec, extra in rows:
        out.append(f"| {name} | {ll:.4f} | {ll / ref - 1:+.1%} | {rps:.4f} | {mae:.3f} | "
                   f"{sec:.2f} | {extra} |")
    if target:
        out += ["", target(rows)]
    return "\n".join(out)


def _by(rows, name):
    return next(r[1] for r in rows if r[0] == name)


def synthetic(het, n_train, n_test, seed=1):
    X, y, region, coef, thr = make_regions(n_train + n_test, n_features=10, n_classes=5,
                                           n_regions=4, heterogeneity=het, random_state=seed)
    Xa, ya, Xt, yt, rt = X[:n_train], y[:n_train], X[n_train:], y[n_train:], region[n_train:]
    oracle = class_proba(np.einsum("ij,ij->i", Xt, coef[rt]), thr[rt])
    return compare(Xa, ya, Xt, yt, oracle)


def heterogeneous_target(rows):
    oracle = rows[-1][1]
    central = rows[0][1]
    parts = []
    for m in ("fomaml", "reptile"):
        ll = _by(rows, f"Adaptive + {LABEL[m]}")
        ok = ll <= 1.03 * oracle and ll <= 0.9 * central
        parts.append(f"{LABEL[m]} {ll / oracle - 1:+.1%} from the oracle and "
                     f"{ll / central - 1:+.1%} from the centralized fit "
                     f"({'met' if ok else '**not met**'})")
    return ("Targets: within 3% of the oracle and at least 10% below the centralized fit: "
            + "; ".join(parts) + ".")


def homogeneous_target(rows):
    central = rows[0][1]
    parts = []
    for m in ("fomaml", "reptile"):
        ll = _by(rows, f"Adaptive + {LABEL[m]}")
        parts.append(f"{LABEL[m]} {ll / central - 1:+.2%} "
                     f"({'met' if ll <= 1.01 * central else '**not met**'})")
    return "Target: within 1% of the centralized fit: " + "; ".join(parts) + "."


def randhie(seed=0):
    df = load_randhie()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(df), dtype=bool)
    for level in df["health"].cat.categories:
        idx = np.flatnonzero(df["health"].to_numpy() == level)
        test[rng.choice(idx, int(0.3 * idx.size), replace=False)] = True
    X = df.drop(columns="health")
    codes = df["health"].cat.codes.to_numpy()
    grown = compare(X[~test], codes[~test], X[test], codes[test])
    # the experiment's own groups: insurance plans, by deductible (idp) and whether care was
    # free (lncoins = 0) or had coinsurance
    from fedgrain.core.standardize import Standardizer
    from fedgrain.partition.tree import PartitionTree

    Xa = X[~test].to_numpy(dtype=float)
    tree = PartitionTree(Xa.shape[1], 4, Standardizer.fit(Xa))
    e = np.eye(Xa.shape[1])
    idp, lncoins = list(X.columns).index("idp"), list(X.columns).index("lncoins")
    for leaf in tree.split(tree.root, e[idp], 0.5):
        tree.split(leaf, e[lncoins], 0.1)
    plans = compare(X[~test], codes[~test], X[test], codes[test], partition=tree)
    return grown, plans


def new_region(seeds, n_labelled=50):
    res = {k: [] for k in ("adapt", "meta global", "pooled global", "local fit", "oracle")}
    for seed in seeds:
        X, y, region, coef, thr = make_regions(60_000, n_features=10, n_classes=5,
                                               n_regions=5, heterogeneity=1.0,
                                               random_state=100 + seed)
        seen = region < 4
        af = AdaptiveFederatedOrdinal(granularity=0.5, meta="fomaml", n_jobs=2).fit(
            X[seen], y[seen])
        new = np.flatnonzero(region == 4)
        lab = np.random.default_rng(seed).choice(new, n_labelled, replace=False)
        test = np.setdiff1d(new, lab)
        codes = y[test]

        def ll(proba, codes=codes):
            return ordinal_scores(codes, proba)["log_loss"]

        res["adapt"].append(ll(af.adapt(X[lab], y[lab]).predict_proba(X[test])))
        res["meta global"].append(ll(af.meta_model_.predict_proba(X[test])))
        res.setdefault("pull", []).append(af.adapt_pull_)
        res["pooled global"].append(ll(af.global_model_.predict_proba(X[test])))
        res["local fit"].append(ll(OrdinalRegression(alpha=1.0).fit(X[lab], y[lab])
                                   .predict_proba(X[test])))
        res["oracle"].append(ll(class_proba(X[test] @ coef[4], thr[4])))
    lines = [f"**A new region from {n_labelled} labelled rows** (trained on 4 of 5 regions; "
             f"mean held-out log-loss on the fifth over {len(seeds)} seeds)", "",
             "| model | log-loss |", "|---|---|"]
    for k, v in res.items():
        if k == "pull":
            continue
        name = {"adapt": "`adapt(50 rows)` from the meta-learned model",
                "meta global": "meta-learned global model", "pooled global": "pooled global model",
                "local fit": "OrdinalRegression(alpha=1) on the 50 rows"}.get(k, k)
        lines.append(f"| {name} | {np.mean(v):.4f} |")
    a = np.mean(res["adapt"])
    ok = a < min(np.mean(res["meta global"]), np.mean(res["pooled global"]),
                 np.mean(res["local fit"]))
    lines += ["", f"`adapt` pulls toward the meta-learned model with the empirical-Bayes pull "
              f"of the training leaves' spread (median {np.median(res['pull']):.3g} "
              "pseudo-rows). Target: `adapt` beats the global models and the local fit: "
              f"{'met' if ok else '**not met**'}."]
    return "\n".join(lines)


# ---- federated sites: fit(X, y, groups=site) -------------------------------------------------
SITE_P, SITE_K, SITE_TEST = 4, 4, 400
#: (sites, rows per site) and the spread of the sites' slopes and thresholds around common ones.
SITE_SHAPES = ((40, 150), (100, 80), (200, 50))
SPREADS = {"none": (0.0, 0.0), "moderate": (0.3, 0.3), "large": (0.6, 0.8)}
SITE_METHODS = ("global", "local", "fedavg", "fedprox", "ditto", "reptile", "fomaml",
                "hierarchical")
SITE_LABEL = {"global": "one global model (pooled)", "local": "local only (each site's fit)",
              "hierarchical": "hierarchical, central (REML)",
              "fedavg": "FedAvg", "fedprox": "FedProx", "ditto": "Ditto", "reptile": "Reptile",
              "fomaml": "FO-MAML"}


def site_world(sizes, slope_sd, thr_sd, seed, n_test=SITE_TEST):
    """Sites with related models: common slopes and thresholds, each site's moved by normal
    noise (sd ``slope_sd`` per slope; ``thr_sd`` for a shift of all its thresholds). Returns
    training and held-out rows with their sites, and the held-out rows' true probabilities."""
    rng = np.random.default_rng([seed, 11])
    beta = rng.normal(0.0, 0.7, SITE_P)
    cuts = np.sort(rng.normal(0.0, 1.2, SITE_K - 1))
    out = {k: [] for k in ("X", "y", "g", "Xt", "yt", "gt", "Pt")}
    for s, n in enumerate(sizes):
        b = beta + slope_sd * rng.standard_normal(SITE_P)
        c = cuts + thr_sd * rng.standard_normal()
        for pre, m in (("", n), ("t", n_test)):
            x = rng.standard_normal((m, SITE_P))
            out["X" + pre].append(x)
            out["y" + pre].append(np.digitize(x @ b + rng.logistic(size=m), c))
            out["g" + pre].append(np.full(m, s))
        out["Pt"].append(class_proba(out["Xt"][-1] @ b, c))
    return {k: np.concatenate(v) for k, v in out.items()}


def site_losses(w, seed):
    """Held-out log-loss of each method on one world, and the meta fits' rounds and bytes."""
    def ll(proba):
        return ordinal_scores(w["yt"], proba)["log_loss"]

    res = {"truth": ll(w["Pt"])}
    info = {}
    for m in ("none", "fedavg", "fedprox", "ditto", "reptile", "fomaml"):
        af = AdaptiveFederatedOrdinal(meta=m, n_jobs=2, random_state=seed).fit(
            w["X"], w["y"], groups=w["g"])
        if m == "none":
            res["global"] = ll(af.predict_proba(w["Xt"]))
            res["local"] = ll(af.predict_proba(w["Xt"], groups=w["gt"]))
            continue
        res[m] = ll(af.predict_proba(w["Xt"], groups=w["gt"]))
        h = af.history_
        info[m] = (len(h), float(np.mean([r["bytes"] for r in h])) if h else 0.0)
    # the statistical anchor: random intercepts and slopes, all rows in one place
    mixed = MixedOrdinalRegression().fit(w["X"], w["y"], groups=w["g"])
    res["hierarchical"] = ll(mixed.predict_proba(w["Xt"], groups=w["gt"]))
    return res, info


def sites(seeds):
    """The sites settings (shapes x spreads, and unequal sizes) over ``seeds``."""
    cases = [(f"{m} x {n}", [n] * m, sp) for m, n in SITE_SHAPES for sp in SPREADS]
    rng = np.random.default_rng(7)
    unequal = np.round(np.exp(rng.uniform(np.log(40), np.log(400), 60))).astype(int).tolist()
    cases.append(("60 sites of 40-400 rows", unequal, "moderate"))
    results = []
    for name, sizes, sp in cases:
        per_seed = [site_losses(site_world(sizes, *SPREADS[sp], seed), seed) for seed in seeds]
        mean = {k: float(np.mean([r[0][k] for r in per_seed])) for k in per_seed[0][0]}
        info = {k: (np.mean([r[1][k][0] for r in per_seed]),
                    np.mean([r[1][k][1] for r in per_seed])) for k in per_seed[0][1]}
        results.append((name, min(sizes), sp, mean, info, per_seed))
        print(name, sp, {k: round(v, 4) for k, v in mean.items()}, flush=True)
    return results


def sites_report(results, seeds):
    lines = [f"**Federated sites** (`fit(X, y, groups=site)`; {SITE_P} features, K = "
             f"{SITE_K}; held-out log-loss on {SITE_TEST} new rows of every site, mean over "
             f"{len(seeds)} seeds; spread: sd of each slope / of each site's threshold shift "
             "around the common model, none 0 / 0, moderate 0.3 / 0.3, large 0.6 / 0.8)", "",
             "| sites | spread | truth | " + " | ".join(SITE_LABEL[m] for m in SITE_METHODS)
             + " | best fedgrain: gap to the truth recovered | best fedgrain vs the hierarchical "
             "anchor | rounds, kB a round (FO-MAML) |",
             "|---|---|---|" + "---|" * len(SITE_METHODS) + "---|---|---|"]
    checks = {"best fedgrain strategy no worse than any baseline (0.1% tolerance)": True,
              "beats local-only and the global model wherever the sites differ": True,
              "recovers at least 60% of the gap where sites have 150 rows or more": True,
              "within 0.5% of the global model where the sites do not differ": True}
    anchor = []
    for name, smallest, sp, mean, info, _ in results:
        best = min(mean["fomaml"], mean["reptile"])
        gap = mean["global"] - mean["truth"]
        rec = (mean["global"] - best) / gap if gap > 1e-3 else None
        rounds, kb = info["fomaml"]
        anchor.append(best / mean["hierarchical"] - 1)
        lines.append(f"| {name} | {sp} | {mean['truth']:.4f} | "
                     + " | ".join(f"{mean[m]:.4f}" for m in SITE_METHODS)
                     + f" | {'n/a' if rec is None else f'{rec:.0%}'} | {anchor[-1]:+.2%} | "
                     f"{rounds:.1f}, {kb / 1e3:.0f} |")
        if best > 1.001 * min(mean[m] for m in ("global", "local", "fedavg", "fedprox",
                                                 "ditto")):
            checks["best fedgrain strategy no worse than any baseline (0.1% tolerance)"] = False
        if sp != "none" and not best < min(mean["global"], mean["local"]):
            checks["beats local-only and the global model wherever the sites differ"] = False
        if sp != "none" and smallest >= 150 and (rec is None or rec < 0.6):
            checks["recovers at least 60% of the gap where sites have 150 rows or more"] = \
                False
        if sp == "none" and best > 1.005 * mean["global"]:
            checks["within 0.5% of the global model where the sites do not differ"] = False
    lines += ["", "FedAvg and FedProx run in the same loop from the model without features "
              "(no slopes, thresholds from the class shares), average the sites' local Newton "
              "steps by rows (FedProx with its proximal pull) round after round until a round "
              "no longer lowers the validation loss, and keep one global model. Ditto "
              "personalises every site from FedAvg's model with a Euclidean pull whose "
              "strength is chosen on the held-out rows. The hierarchical anchor is "
              "`MixedOrdinalRegression`: random intercepts and slopes with a full covariance by "
              "Laplace-approximate REML on all rows in one place, each site predicted with its "
              "conditional modes. It is the model the data were drawn from (sites differ by "
              "their slopes and one shift of the thresholds), so it marks what a central "
              "statistician would get; it is not a federated method and not among the "
              "baselines of the first target.",
              "", "Targets:"]
    lines += [f"- {k}: {'met' if ok else '**not met**'}" for k, ok in checks.items()]
    lines.append(f"- against the central hierarchical anchor (reported, no target): best "
                 f"fedgrain strategy from {min(anchor):+.2%} to {max(anchor):+.2%}")
    return "\n".join(lines)


def new_site(seeds, labelled=(20, 50, 200)):
    """``adapt`` to a site the fit did not see, from a few of its labelled rows."""
    res = {n: {k: [] for k in ("adapt", "global", "local", "hierarchical")} for n in labelled}
    truth = []
    for seed in seeds:
        sizes = [150] * 41
        w = site_world(sizes, *SPREADS["moderate"], seed, n_test=600)
        train = w["g"] != 40
        af = AdaptiveFederatedOrdinal(meta="fomaml", n_jobs=2, random_state=seed).fit(
            w["X"][train], w["y"][train], groups=w["g"][train])
        rows = np.flatnonzero(w["gt"] == 40)
        lab, test = rows[:200], rows[200:]
        yt = w["yt"][test]
        truth.append(ordinal_scores(yt, w["Pt"][test])["log_loss"])
        for n in labelled:
            take = lab[:n]
            res[n]["adapt"].append(ordinal_scores(yt, af.adapt(
                w["Xt"][take], w["yt"][take]).predict_proba(w["Xt"][test]))["log_loss"])
            res[n]["global"].append(ordinal_scores(yt, af.predict_proba(w["Xt"][test]))[
                "log_loss"])
            local = OrdinalRegression(alpha=1.0).fit(w["Xt"][take], w["yt"][take])
            proba = np.zeros((test.shape[0], SITE_K))
            proba[:, np.unique(w["yt"][take])] = local.predict_proba(w["Xt"][test])
            proba = np.clip(proba, 1e-15, None)
            res[n]["local"].append(ordinal_scores(yt, proba / proba.sum(axis=1,
                                                                        keepdims=True))[
                "log_loss"])
            # the anchor: the hierarchical model refitted with the new site's rows as a group
            mixed = MixedOrdinalRegression().fit(
                np.vstack([w["X"][train], w["Xt"][take]]),
                np.r_[w["y"][train], w["yt"][take]], groups=np.r_[w["g"][train], w["gt"][take]])
            res[n]["hierarchical"].append(ordinal_scores(yt, mixed.predict_proba(
                w["Xt"][test], groups=w["gt"][test]))["log_loss"])
    lines = [f"**A new site from a few labelled rows** (40 sites of 150 rows, moderate spread; "
             f"a 41st site adapted from its first n rows, scored on 400 others; mean over "
             f"{len(seeds)} seeds; truth {np.mean(truth):.4f})", "",
             "| labelled rows | `adapt` from FO-MAML | global model | OrdinalRegression("
             "alpha=1) on the rows | hierarchical anchor refitted with the rows (central) |",
             "|---|---|---|---|---|"]
    ok = True
    for n in labelled:
        a, g, loc, hi = (np.mean(res[n][k]) for k in ("adapt", "global", "local",
                                                      "hierarchical"))
        lines.append(f"| {n} | {a:.4f} | {g:.4f} | {loc:.4f} | {hi:.4f} |")
        ok &= a <= min(g, loc) + 1e-9
    lines += ["", f"Target: `adapt` no worse than the global model and the local fit at every "
              f"size: {'met' if ok else '**not met**'}."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="markdown file to update between the meta markers")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    n_train, n_test = (20_000, 10_000) if args.quick else (60_000, 30_000)
    parts = []
    for het, title, target in ((1.0, "Heterogeneous: 4 regions with their own slopes and "
                                     "thresholds", heterogeneous_target),
                               (0.0, "Homogeneous: 4 regions of feature space, one model",
                                homogeneous_target)):
        rows = synthetic(het, n_train, n_test)
        parts.append(table(f"{title}; {n_train:,} training and {n_test:,} held-out rows, "
                           "10 features, K = 5", rows, target))
        print(parts[-1], "\n", flush=True)
    grown, plans = randhie()
    title = ("RAND Health Insurance Experiment: 20,190 people, self-rated health (4 levels), "
             "7 features; 70% / 30% split stratified by level")
    parts.append(table(f"{title}; the partition grown at granularity 0.5", grown))
    parts.append(table(f"{title}; leaves = the experiment's plans (deductible or not x free "
                       "care or coinsurance), given as `partition=`", plans))
    print(parts[-2], "\n\n", parts[-1], "\n", flush=True)
    parts.append(new_region(range(2 if args.quick else 5)))
    print(parts[-1], "\n", flush=True)
    seeds = range(1 if args.quick else 2)
    parts.append(sites_report(sites(seeds), seeds))
    print(parts[-1], "\n", flush=True)
    parts.append(new_site(range(2 if args.quick else 5)))
    print(parts[-1], "\n", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    cmd = ".venv/bin/python benchmarks/bench_meta.py" + (" --quick" if args.quick else "")
    parts.insert(0, f"Command: `{cmd}` ({minutes:.1f} minutes, 2 worker processes). Every "
                 "adaptive model uses granularity 0.5; the strategies share its partition.")
    if args.out:
        write_marked(args.out, "meta", parts)


if __name__ == "__main__":
    main()
