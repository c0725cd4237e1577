"""Adaptive partitions: cost of profiling, load balance, and accuracy by granularity.

Two parts, both on ``fedgrain.datasets.make_regions`` data (Gaussian regions of feature space,
each with its own cumulative-logit model; ``heterogeneity=0`` is one model everywhere):

1. **Cost and balance at 1e6 x 20** (K = 5, 8 regions): wall time of
   ``AdaptiveFederatedOrdinal(granularity=g).fit`` on ``processes`` with 2 workers, the share of
   it spent profiling and partitioning (``timings_``), the number of leaves, the scheduler's
   makespan imbalance and the bytes placed; the static ``DivideConquerOrdinal`` beside it.
2. **Held-out accuracy**: log-loss, ranked probability score and mean absolute class error on
   fresh rows of the same regions, for the centralized ``OrdinalRegression``, the static
   ``DivideConquerOrdinal``, the adaptive model at each granularity, and the oracle (the true
   model of each row's region), on heterogeneous and on homogeneous data.

Run from the repository root, with nothing else running:

    .venv/bin/python benchmarks/bench_adaptive.py --out docs/benchmarks.md   # about a minute
    .venv/bin/python benchmarks/bench_adaptive.py --quick                    # about 15 s

It prints markdown and, with ``--out``, writes it between the ``adaptive`` markers of the page.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
from sklearn.metrics import adjusted_rand_score

from _report import write_marked
from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal, OrdinalRegression
from fedgrain.core.likelihood import class_proba
from fedgrain.datasets import make_regions
from fedgrain.metrics import ordinal_scores

GRANULARITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
PHASE = "profile and partition"


def _timed(make, X, y, reps):
    """Median wall time of ``reps`` fits, and the last fitted model."""
    times, model = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        model = make().fit(X, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), model, times


def cost_part(N, p, K, reps):
    lines = [f"**Cost and balance: {N:,} rows x {p} features, K = {K}, 8 regions; processes "
             f"backend, 2 workers; median of {reps} fits after a warm-up**", "",
             "| data | model | fit (s) | profile + partition (s) | share of fit | leaves | "
             "imbalance | MB placed |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    unequal = (1, 1, 1, 1, 2, 2, 3, 5)
    for label, het, weights in (("8 regions, own models", 1.0, None),
                                ("8 regions of unequal sizes (1:1:1:1:2:2:3:5)", 1.0, unequal),
                                ("8 blobs, one model", 0.0, None)):
        X, y, region, *_ = make_regions(N, n_features=p, n_classes=K, n_regions=8,
                                        heterogeneity=het, weights=weights, random_state=0)
        AdaptiveFederatedOrdinal(granularity=0.5, n_jobs=2).fit(X[:50_000], y[:50_000])
        t_dc, _, _ = _timed(lambda: DivideConquerOrdinal(n_jobs=2), X, y, reps)
        lines.append(f"| {label} | DivideConquerOrdinal (static) | {t_dc:.2f} | | | 2 | | |")
        for g in (0.5, 1.0):
            totals, shares, phases = [], [], []
            for _ in range(reps):
                t, af, _ = _timed(lambda g=g: AdaptiveFederatedOrdinal(granularity=g, n_jobs=2),
                                  X, y, 1)
                totals.append(t)
                phases.append(af.timings_[PHASE])
                shares.append(af.timings_[PHASE] / t)
            share = statistics.median(shares)
            ari = adjusted_rand_score(region, af.apply(X))
            lines.append(
                f"| {label} | Adaptive, g = {g} | {statistics.median(totals):.2f} | "
                f"{statistics.median(phases):.3f} | {share:.0%} | {af.n_leaves_} (ARI {ari:.2f})"
                f" | {af.schedule_.imbalance:.3f} | {af.schedule_.bytes_to_move / 1e6:.0f} |")
            verdicts.append((label, g, share, af.n_leaves_, af.schedule_.imbalance))
    lines += ["", "Targets: profiling plus partitioning at most 20% of the fit; with 8 or more "
              "leaves on 2 workers a makespan imbalance of at most 1.10."]
    for label, g, share, leaves, imb in verdicts:
        ok_share = "met" if share <= 0.20 else "**not met**"
        balance = ("n/a (fewer than 8 leaves)" if leaves < 8 else
                   "met" if imb <= 1.10 else "**not met**")
        lines.append(f"- {label}, g = {g}: share {share:.0%} ({ok_share}); {leaves} leaves, "
                     f"imbalance {imb:.3f} ({balance})")
    return "\n".join(lines)


def _scores(codes, proba):
    s = ordinal_scores(codes, proba)
    return s["log_loss"], s["rps"], s["mae"]


def accuracy_part(n_train, n_test, p, K, n_regions, het, seed):
    X, y, region, coef, thr = make_regions(n_train + n_test, n_features=p, n_classes=K,
                                           n_regions=n_regions, heterogeneity=het,
                                           random_state=seed)
    Xa, ya, Xt, yt, rt = X[:n_train], y[:n_train], X[n_train:], y[n_train:], region[n_train:]
    rows = []

    def add(name, proba, seconds, extra=""):
        ll, rps, mae = _scores(yt, proba)
        rows.append((name, ll, rps, mae, seconds, extra))

    t0 = time.perf_counter()
    central = OrdinalRegression().fit(Xa, ya)
    add("OrdinalRegression (centralized)", central.predict_proba(Xt), time.perf_counter() - t0)
    t0 = time.perf_counter()
    dc = DivideConquerOrdinal(n_jobs=2).fit(Xa, ya)
    add("DivideConquerOrdinal (static)", dc.predict_proba(Xt), time.perf_counter() - t0)
    for g in GRANULARITIES:
        t0 = time.perf_counter()
        af = AdaptiveFederatedOrdinal(granularity=g, n_jobs=2).fit(Xa, ya)
        seconds = time.perf_counter() - t0
        ari = adjusted_rand_score(rt, af.apply(Xt))
        regions = np.unique(af.partition_.region_of()).shape[0]
        add(f"Adaptive, g = {g}", af.predict_proba(Xt), seconds,
            f"{af.n_leaves_} leaves, {regions} regions, ARI {ari:.2f}")
    eta = np.einsum("ij,ij->i", Xt, coef[rt])
    add("oracle (true model of each region)", class_proba(eta, thr[rt]), 0.0)
    return rows


def accuracy_markdown(title, rows, het):
    ref = rows[0][1]
    lines = [f"**{title}**", "", "| model | log-loss | vs centralized | RPS | MAE | fit (s) | "
             "partition |", "|---|---|---|---|---|---|---|"]
    for name, ll, rps, mae, sec, extra in rows:
        lines.append(f"| {name} | {ll:.4f} | {ll / ref - 1:+.1%} | {rps:.4f} | {mae:.3f} | "
                     f"{sec:.2f} | {extra} |")
    adaptive = [r for r in rows if r[0].startswith("Adaptive") and not r[0].endswith("= 0.0")]
    if het == 0:
        worst = max(r[1] / ref - 1 for r in adaptive)
        lines += ["", f"Target: the adaptive model at most 1% worse than the centralized fit: "
                  f"worst over g > 0 is {worst:+.2%} "
                  f"({'met' if worst <= 0.01 else '**not met**'})."]
    else:
        oracle = rows[-1][1]
        best = min(r[1] for r in adaptive)
        lines += ["", f"The best adaptive model is {best / oracle - 1:+.1%} from the oracle and "
                  f"{best / ref - 1:+.1%} from the centralized fit."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller data, one fit per timing")
    ap.add_argument("--out", help="markdown file to update between the adaptive markers")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    parts = []
    N = 200_000 if args.quick else 1_000_000
    parts.append(cost_part(N, 20, 5, 1 if args.quick else 3))
    print(parts[-1], "\n", flush=True)
    n_train, n_test = (20_000, 10_000) if args.quick else (60_000, 30_000)
    for het, title in ((1.0, "Heterogeneous: 4 regions with their own slopes and thresholds"),
                       (0.0, "Homogeneous: 4 regions of feature space, one model")):
        rows = accuracy_part(n_train, n_test, 10, 5, 4, het, seed=1)
        full = (f"{title}; {n_train:,} training and {n_test:,} held-out rows, 10 features, "
                "K = 5")
        parts.append(accuracy_markdown(full, rows, het))
        print(parts[-1], "\n", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    cmd = ".venv/bin/python benchmarks/bench_adaptive.py" + (" --quick" if args.quick else "")
    parts.insert(0, f"Command: `{cmd}` ({minutes:.1f} minutes).")
    if args.out:
        write_marked(args.out, "adaptive", parts)

if __name__ == "__main__":
    main()
