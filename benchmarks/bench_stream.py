"""Monitoring on streams: detection delay, false alarms, recovery, throughput.

An ``AdaptiveFederatedOrdinal`` (granularity 0.5) is fitted on 30,000 rows of four regions with
their own models (``make_regions``, 10 features, K = 5), then fed a stream of 1,000,000 more
rows of the same world through ``partial_fit`` in batches of 10,000:

- **stationary**: nothing changes (false alarms per 1e6 rows);
- **abrupt**: at row 500,000 region 1's slopes flip, its thresholds following its new latent
  mean (detection delay in that region's rows; rows of the region until its batch log-loss,
  predicted before each batch is seen, is within 5% of the true post-change model's; leaves
  refitted);
- **covariate**: at row 500,000 region 0's rows move (one feature up by one standard
  deviation), the model unchanged (alarms by kind; log-loss on the moved rows against the
  unadapted model's: reacting must not cost accuracy).

Side by side: no adaptation, periodic full retraining (every 200,000 rows on the last 100,000),
and River's ADWIN on the global loss (``river.drift.ADWIN``, row by row; detection only).
Over 5 seeds. Run from the repository root, nothing else running:

    .venv/bin/python benchmarks/bench_stream.py --out docs/benchmarks.md   # about 2 minutes
    .venv/bin/python benchmarks/bench_stream.py --quick
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np

from _report import write_marked
from fedgrain import AdaptiveFederatedOrdinal
from fedgrain.core.likelihood import class_proba
from fedgrain.datasets import make_regions

BATCH = 10_000
TRAIN = 30_000
P, K, R = 10, 5, 4


def world(n_stream, seed):
    X, _, region, coef, thr = make_regions(TRAIN + n_stream, n_features=P, n_classes=K,
                                           n_regions=R, heterogeneity=1.0, random_state=seed)
    return X, region, coef, thr


def labels(X, region, coef, thr, rng):
    latent = np.einsum("ij,ij->i", X, coef[region]) + rng.logistic(size=X.shape[0])
    return (latent[:, None] > thr[region]).sum(axis=1)


def row_loss(proba, y):
    return -np.log(np.clip(proba[np.arange(y.shape[0]), y], 1e-15, 1.0))


def run_stream(model, X, y):
    """Feed the stream; per batch the model's predictions *before* it sees the batch."""
    losses = np.empty(y.shape[0])
    t0 = time.perf_counter()
    predict = 0.0
    for a in range(0, y.shape[0], BATCH):
        s = slice(a, a + BATCH)
        t1 = time.perf_counter()
        losses[s] = row_loss(model.predict_proba(X[s]), y[s])
        predict += time.perf_counter() - t1
        model.partial_fit(X[s], y[s])
    seconds = time.perf_counter() - t0 - predict
    return losses, seconds


def river_adwin(losses):
    from river import drift

    det = drift.ADWIN()
    found = []
    for i, v in enumerate(losses):
        det.update(float(v))
        if det.drift_detected:
            found.append(i)
    return found


def periodic(base_fit, X, y, every=200_000, last=100_000):
    """Losses of a model retrained from scratch every ``every`` rows on the last ``last``."""
    model = base_fit
    losses = np.empty(y.shape[0])
    for a in range(0, y.shape[0], BATCH):
        if a and a % every == 0:
            model = AdaptiveFederatedOrdinal(granularity=0.5, n_jobs=2).fit(
                X[a - last:a], y[a - last:a])
        s = slice(a, a + BATCH)
        losses[s] = row_loss(model.predict_proba(X[s]), y[s])
    return losses


def recovery(losses, reference, mask, change):
    """Rows of the region after the change that the model had seen when its log-loss on the
    next batch's rows of the region came within 5% of the reference model's (None: never).

    Losses are of predictions made before each batch is seen, so the count is what the model
    needed to recover (to batch resolution)."""
    for a in range(change, losses.shape[0], BATCH):
        s = slice(a, a + BATCH)
        m = mask[s]
        if m.sum() and losses[s][m].mean() <= 1.05 * reference[s][m].mean():
            return int(mask[change:a].sum())
    return None


def one_seed(seed, n_stream):
    X, region, coef, thr = world(n_stream, seed)
    rng = np.random.default_rng([seed, 1])  # not make_regions' own stream (seeded by seed)
    y0 = labels(X, region, coef, thr, rng)
    base = AdaptiveFederatedOrdinal(granularity=0.5, n_jobs=2).fit(X[:TRAIN], y0[:TRAIN])
    Xs, rs = X[TRAIN:], region[TRAIN:]
    out = {}
    change = n_stream // 2
    after = np.arange(n_stream) >= change
    # stationary
    ys = y0[TRAIN:]
    m = copy.deepcopy(base)
    loss, sec = run_stream(m, Xs, ys)
    alarms = [e for e in m.events_ if e["kind"] in ("concept drift", "covariate shift")]
    out["stationary"] = {"alarms": len(alarms), "rows_per_s": n_stream / sec,
                         "river": len(river_adwin(loss))}
    # abrupt concept change in region 1
    new, new_thr = coef.copy(), thr.copy()
    new[1] = -coef[1]
    # the thresholds follow the region's new latent mean, so its classes stay balanced
    r1 = Xs[rs == 1]
    new_thr[1] = thr[1] + (r1 @ new[1]).mean() - (r1 @ coef[1]).mean()
    ya = np.where(after, labels(Xs, rs, new, new_thr, rng), labels(Xs, rs, coef, thr, rng))
    truth = np.where(after[:, None],
                     class_proba(np.einsum("ij,ij->i", Xs, new[rs]), new_thr[rs]),
                     class_proba(np.einsum("ij,ij->i", Xs, coef[rs]), thr[rs]))
    ref = row_loss(truth, ya)
    m = copy.deepcopy(base)
    loss, _ = run_stream(m, Xs, ya)
    drift = [e for e in m.events_ if e["kind"] == "concept drift"]
    in_region = rs == 1
    delay = (int((in_region & after & (np.arange(n_stream) <= drift[0]["rows_seen"])).sum())
             if drift and drift[0]["rows_seen"] >= change else None)
    # the region's rows that the fitted tree routes to another leaf than most of them: their
    # leaves' models never learn the change (no refit of a leaf that did not drift)
    routed = base.apply(Xs)
    main_leaf = np.bincount(routed[in_region]).argmax()
    in_leaf = in_region & (routed == main_leaf)
    static_loss = row_loss(base.predict_proba(Xs), ya)
    per_loss = periodic(base, Xs, ya)
    rv = [i for i in river_adwin(loss) if i >= change]
    out["abrupt"] = {
        "delay": delay, "false": sum(e["rows_seen"] < change for e in drift),
        "recovery": recovery(loss, ref, in_region, change),
        "leaf_recovery": recovery(loss, ref, in_leaf, change),
        "outside": float((in_region & ~in_leaf).sum() / in_region.sum()),
        "refitted": sorted({e["leaf"] for e in m.events_ if e["kind"] == "refit"}),
        "leaves": m.n_leaves_,
        "static_recovery": recovery(static_loss, ref, in_region, change),
        "periodic_recovery": recovery(per_loss, ref, in_region, change),
        "river_delay": (int((in_region & after & (np.arange(n_stream) <= rv[0])).sum())
                        if rv else None),
    }
    # covariate shift in region 0
    Xc = Xs.copy()
    moved = after & (rs == 0)
    Xc[moved, 1] += 1.0
    yc = labels(Xc, rs, coef, thr, rng)
    m = copy.deepcopy(base)
    loss, _ = run_stream(m, Xc, yc)
    kinds = [e["kind"] for e in m.events_]
    static = row_loss(base.predict_proba(Xc), yc)
    out["covariate"] = {"shift_events": kinds.count("covariate shift"),
                        "concept_events": kinds.count("concept drift"),
                        "loss_ratio": float(loss[moved].mean() / static[moved].mean())}
    return out


def report(results, n_stream):
    seeds = len(results)
    st = [r["stationary"] for r in results]
    ab = [r["abrupt"] for r in results]
    cv = [r["covariate"] for r in results]

    def fmt(v):
        return "never" if v is None else f"{v:,}"

    lines = [
        f"**Streams of {n_stream:,} rows in batches of {BATCH:,} after a fit on {TRAIN:,} "
        f"(4 regions, 10 features, K = 5); {seeds} seeds**", "",
        "| seed | false alarms (stationary) | River ADWIN alarms (stationary, global loss) | "
        "throughput (rows/s) | delay (region rows) | River delay | recovery (region rows) | "
        "recovery on the rows in the region's leaf | region's rows in other leaves | "
        "static recovery | periodic retraining recovery | leaves refitted / leaves | "
        "covariate: shift / concept events | covariate: loss / unadapted model's |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (s, a, c) in enumerate(zip(st, ab, cv, strict=True)):
        lines.append(
            f"| {i} | {s['alarms']} | {s['river']} | {s['rows_per_s']:,.0f} | {fmt(a['delay'])} "
            f"| {fmt(a['river_delay'])} | {fmt(a['recovery'])} | {fmt(a['leaf_recovery'])} | "
            f"{100 * a['outside']:.2f}% | {fmt(a['static_recovery'])} | "
            f"{fmt(a['periodic_recovery'])} | {len(a['refitted'])} / {a['leaves']} | "
            f"{c['shift_events']} / {c['concept_events']} | {c['loss_ratio']:.4f} |")
    delays = [a["delay"] for a in ab]
    recs = [a["recovery"] for a in ab]
    checks = [
        ("no false alarm on the stationary streams",
         sum(s["alarms"] for s in st) == 0 and all(a["false"] == 0 for a in ab)),
        ("abrupt change detected within 2,000 of the region's rows",
         all(d is not None and d <= 2_000 for d in delays)),
        ("recovery within 5,000 of the region's rows",
         all(r is not None and r <= 5_000 for r in recs)),
        ("only the affected leaf refitted", all(len(a["refitted"]) == 1 for a in ab)),
        ("a covariate shift alone is reported as such in every seed and costs no accuracy "
         "(log-loss on the moved rows at most 1% above the unadapted model's)",
         all(c["shift_events"] > 0 and c["loss_ratio"] <= 1.01 for c in cv)),
        ("at least 200,000 rows per second through partial_fit (every batch updating the "
         "model)", min(s["rows_per_s"] for s in st) >= 200_000),
    ]
    lines += ["", "Targets:"] + [f"- {t}: {'met' if ok else '**not met**'}" for t, ok in checks]
    late = [i for i, a in enumerate(ab) if (a["recovery"] is None or a["recovery"] > 5_000)
            and a["leaf_recovery"] is not None and a["leaf_recovery"] <= 5_000]
    if late:
        lines += ["", f"Recovery after more than 5,000 rows in seed(s) {late}: the changed "
                  "leaf's model had recovered (the recovery on the region's rows in its leaf), "
                  "but the few of the region's rows that the fitted tree routes to other leaves "
                  "(the share above) meet models that never saw the change, and with the "
                  "region's slopes reversed each costs tens of nats: enough to keep a batch's "
                  "mean above 5% of the truth's."]
    extra = [i for i, c in enumerate(cv) if c["concept_events"]]
    if extra:
        lines += ["", f"Under the covariate shift, seed(s) {extra} also raised a concept-drift "
                  "alarm: the moved rows lie where the leaf's estimated model extrapolates, its "
                  "loss rose, and the refit that followed lowered the loss on them (the ratio "
                  "below 1)."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds of 200,000 rows")
    ap.add_argument("--out", help="markdown file to update between the stream markers")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    n_stream, seeds = (200_000, 2) if args.quick else (1_000_000, 5)
    results = [one_seed(s, n_stream) for s in range(seeds)]
    text = report(results, n_stream)
    cmd = ".venv/bin/python benchmarks/bench_stream.py" + (" --quick" if args.quick else "")
    parts = [f"Command: `{cmd}` ({(time.perf_counter() - t0) / 60:.1f} minutes). Delays and "
             "recoveries count the changed region's rows after the change; the throughput is "
             "partial_fit alone (scoring and monitoring every row, no prediction).", text]
    print("\n\n".join(parts))
    if args.out:
        write_marked(args.out, "stream", parts)


if __name__ == "__main__":
    main()
