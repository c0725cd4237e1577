"""Inference quality of the pooled estimator against its alternatives (method.md 4, 4b).

Over seeded replications of data with known truth, for each estimator: bias and root mean
squared error (in units of the centralized fit's standard error, averaged over parameters), MSE
relative to the centralized composite fit, distance to that fit, and coverage of nominal 95%
intervals. Run from the repository root:

    .venv/bin/python benchmarks/bench_inference.py            # 10-15 minutes on 2 cores
    .venv/bin/python benchmarks/bench_inference.py --quick    # a minute, fewer replications

It prints markdown tables and, with ``--out``, writes them between the ``inference`` markers
of ``docs/benchmarks.md`` (adding the page's inference section when it has none); the rest of
the page is ``bench_core.py``'s, which keeps these blocks when it rewrites the page.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from pathlib import Path

import numpy as np

from _report import inference_section
from fedgrain import DivideConquerOrdinal, OrdinalRegression
from fedgrain.datasets import make_ordinal

Z95 = 1.959964

SETTINGS = {
    # name: (N, p, K, subsets, informative slopes)
    "large subsets: N=40,000, p=20, K=5, 8 subsets of 5,000 rows": (40_000, 20, 5, 8, 5),
    "method.md 4b: N=20,000, p=50, K=4, 10 subsets of 2,000 rows": (20_000, 50, 4, 10, 5),
    "small subsets: N=20,000, p=50, K=4, 50 subsets of 400 rows": (20_000, 50, 4, 50, 5),
}


def _estimates(X, y, M, seed):
    """Estimate and standard errors of every estimator on one data set."""
    out = {}
    central = DivideConquerOrdinal(n_subsets=1, alpha=0.0, backend="serial").fit(X, y)
    out["centralized composite (reference)"] = (central.results_.params, central.bse_)
    mle = OrdinalRegression().fit(X, y)
    out["centralized exact MLE"] = (mle.results_.params, mle.bse_)
    kw = {"n_subsets": M, "backend": "serial", "random_state": seed}
    dc = DivideConquerOrdinal(**kw).fit(X, y)
    out["DC, refined (default)"] = (dc.results_.params, dc.bse_)
    out["DC, one-shot (patent)"] = (dc.oneshot_results_.params, dc.oneshot_results_.bse)
    dc2 = DivideConquerOrdinal(refine_rounds=2, **kw).fit(X, y)
    out["DC, two refinement rounds"] = (dc2.results_.params, dc2.bse_)
    dm = DivideConquerOrdinal(variance="model", **kw).fit(X, y)
    out["DC, model-based variance"] = (dm.results_.params, dm.bse_)
    dr = DivideConquerOrdinal(variance="sandwich", **kw).fit(X, y)
    out["DC, row-level sandwich"] = (dr.results_.params, dr.bse_)
    naive = dc.subset_lasso_estimates_.mean(axis=0)
    out["naive average of lasso fits"] = (naive, np.full_like(naive, np.nan))
    return out


def run_setting(N, p, K, M, k, reps):
    rows = {}
    for r in range(reps):
        X, y, coef, thr = make_ordinal(N, p, K, n_informative=k, random_state=10_000 + r)
        truth = np.r_[coef, thr]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = _estimates(X, y, M, r)
        ref, ref_se = est["centralized composite (reference)"]
        for name, (params, se) in est.items():
            rows.setdefault(name, []).append((params - truth, se, params - ref, ref_se))
    table = []
    ref_err = np.array([e for e, *_ in rows["centralized composite (reference)"]])
    ref_mse = np.mean(ref_err**2, axis=0)
    for name, recs in rows.items():
        err = np.array([e for e, *_ in recs])
        se = np.array([s for _, s, *_ in recs])
        dist = np.array([d for _, _, d, _ in recs])
        rse = np.array([s for *_, s in recs])
        scale = rse.mean(axis=0)
        cover = np.mean(np.abs(err) <= Z95 * se, axis=0) if np.isfinite(se).all() else None
        thr = slice(p, p + K - 1)
        table.append({
            "estimator": name,
            "bias/se": np.mean(np.abs(err.mean(axis=0)) / scale),
            "rmse/se": np.mean(np.sqrt(np.mean(err**2, axis=0)) / scale),
            "mse ratio": np.mean(np.mean(err**2, axis=0) / ref_mse),
            "dist/se": np.mean(np.abs(dist) / rse),
            "cover slopes": None if cover is None else cover[:p].mean(),
            "cover thresholds": None if cover is None else cover[thr].mean(),
            "cover extreme thr": None if cover is None else min(cover[p], cover[p + K - 2]),
        })
    return table


def to_markdown(title, table, reps, seconds):
    cols = list(table[0])
    lines = [f"**{title}** ({reps} replications, {seconds:.0f} s)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [row["estimator"]] + [
            "n/a" if v is None else f"{v:.3f}" for k, v in row.items() if k != "estimator"
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="30 replications, first two settings")
    ap.add_argument("--out", help="markdown file to update between the inference markers")
    args = ap.parse_args(argv)
    reps = 30 if args.quick else args.reps
    settings = list(SETTINGS.items())[:2] if args.quick else list(SETTINGS.items())
    parts = []
    for title, (N, p, K, M, k) in settings:
        t0 = time.perf_counter()
        table = run_setting(N, p, K, M, k, reps)
        parts.append(to_markdown(title, table, reps, time.perf_counter() - t0))
        print(parts[-1], "\n", flush=True)
    if args.out:
        path = Path(args.out)
        text = path.read_text() if path.exists() else ""
        block = "<!-- inference:start -->\n" + "\n\n".join(parts) + "\n<!-- inference:end -->"
        if "<!-- inference:start -->" in text:
            text = re.sub(r"<!-- inference:start -->.*<!-- inference:end -->", lambda _: block,
                          text, flags=re.S)
        else:  # a page without the section: add it, as bench_core.py writes it
            text = (text.rstrip() + "\n\n" if text.strip() else "") + "\n".join(
                inference_section([block]))
        path.write_text(text)


if __name__ == "__main__":
    main()
