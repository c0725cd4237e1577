"""Time fits of a fedgrain source tree, to compare two versions back to back.

    python benchmarks/bench_fit_times.py SRC_DIR [--repeats 5] [--n 1000000] [--only CASES]

SRC_DIR is a tree's ``src`` folder; it is put first on sys.path (and on PYTHONPATH, so worker
processes import the same tree). One warm-up fit then ``--repeats`` timed fits per case.
Cases (p=20 features, K=5 classes):
  dc/ordinal        DivideConquerOrdinal(n_subsets=2, backend="processes", n_jobs=2, random_state=0)
                    on make_ordinal(n, 20, 5, random_state=0)
  adaptive/ordinal  AdaptiveFederatedOrdinal(granularity=0.5, backend="processes", n_jobs=2,
                    random_state=0) on the same data
  adaptive/regions  the same estimator on make_regions(n, 20, 5, random_state=0) (default
                    n_regions=3, separation, heterogeneity)
"""

import argparse
import os
import statistics
import sys
import time


def _where():
    import fedgrain

    return fedgrain.__file__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args()
    src = os.path.abspath(args.src)
    sys.path.insert(0, src)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

    from joblib import Parallel, delayed

    import fedgrain
    from fedgrain import AdaptiveFederatedOrdinal, DivideConquerOrdinal
    from fedgrain.datasets import make_ordinal, make_regions

    assert fedgrain.__file__.startswith(src), fedgrain.__file__
    workers = set(Parallel(n_jobs=2, backend="loky")(delayed(_where)() for _ in range(4)))
    print(f"fedgrain (parent): {fedgrain.__file__}")
    print(f"fedgrain (loky workers): {sorted(workers)}")
    assert all(w.startswith(src) for w in workers), workers
    print(f"load average at start: {os.getloadavg()}")

    n = args.n
    t = time.perf_counter()
    Xo, yo, *_ = make_ordinal(n, 20, 5, random_state=0)
    Xr, yr, *_ = make_regions(n, 20, 5, random_state=0)
    print(f"data made in {time.perf_counter() - t:.1f} s: ordinal {Xo.shape}, regions {Xr.shape}")

    cases = {
        "dc/ordinal": (lambda: DivideConquerOrdinal(n_subsets=2, backend="processes", n_jobs=2,
                                                    random_state=0), Xo, yo),
        "adaptive/ordinal": (lambda: AdaptiveFederatedOrdinal(
            granularity=0.5, backend="processes", n_jobs=2, random_state=0), Xo, yo),
        "adaptive/regions": (lambda: AdaptiveFederatedOrdinal(
            granularity=0.5, backend="processes", n_jobs=2, random_state=0), Xr, yr),
    }
    if args.only:
        keep = args.only.split(",")
        cases = {k: v for k, v in cases.items() if k in keep}
    rows = []
    for name, (make, X, y) in cases.items():
        make().fit(X, y)  # warm-up
        times = []
        for _ in range(args.repeats):
            est = make()
            t = time.perf_counter()
            est.fit(X, y)
            times.append(time.perf_counter() - t)
        extra = ""
        if hasattr(est, "n_leaves_"):
            extra = f" leaves={est.n_leaves_}"
        print(f"{name}: times={[round(x, 3) for x in times]}{extra} "
              f"load={os.getloadavg()[0]:.2f}", flush=True)
        rows.append((name, statistics.median(times), min(times)))
    print()
    print("| case | median s | min s |")
    print("| --- | ---: | ---: |")
    for name, med, mn in rows:
        print(f"| {name} | {med:.2f} | {mn:.2f} |")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
