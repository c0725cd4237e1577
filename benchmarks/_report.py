"""The core benchmark's page: comparisons derived from the JSON records, and the markdown."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from _config import DEFAULT_SIZES, parse_sizes
from _tables import (
    LABEL,
    floors_table,
    size_table,
    size_title,
    targets_table,
)

#: A block that ``bench_inference.py`` writes into the page; ``bench_core.py`` keeps it.
INFERENCE_BLOCK = re.compile(r"<!-- inference:start -->.*?<!-- inference:end -->", re.S)
INFERENCE_NOT_RUN = "<!-- inference:start -->\nNot run yet.\n<!-- inference:end -->"
#: Sections other scripts write between their own markers; ``bench_core.py`` keeps them, in
#: this order: name -> (heading, script).
MARKED = {
    "adaptive": ("Adaptive partitions: cost, balance and accuracy by granularity",
                 "bench_adaptive.py"),
    "meta": ("Federated meta-learning: personalised models against the alternatives",
             "bench_meta.py"),
    "stream": ("Monitoring on streams: detection, false alarms, recovery, throughput",
               "bench_stream.py"),
    "scale": ("Scale out and beyond memory: Dask, out-of-core Parquet, scaling",
              "bench_scale.py"),
    "splits": ("Split search: power, size and stability", "bench_splits.py"),
    "honest": ("Honest inference on adaptive partitions: coverage, selection, the global model",
               "bench_honest.py"),
    "qcal": ("Heterogeneity Q under the class-stratified division", "bench_q_calibration.py"),
    "drift": ("Streams that drift: gradual, recurring, wrong from the start, and a real one",
              "bench_drift.py"),
    "sites": ("Many federated sites: the cost of a leaf, 100 to 1,000 sites", "bench_sites.py"),
    "passes": ("Speed: one pass against the Gram-matrix floor", "bench_passes.py"),
    "views": ("Memory with the rows in a shared buffer: subsets as views",
              "bench_core.py --views"),
}


def git_rev() -> str:
    """The repository's short commit, noting uncommitted changes in src/ ("?" without git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def marked_blocks(page: str, name: str) -> list[str]:
    """The blocks between ``name``'s markers in an existing page, markers included."""
    return re.findall(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", page, flags=re.S)


def marked_section(name: str, blocks: list[str]) -> list[str]:
    """A marked section: its heading, how to rerun it, and its blocks (or "Not run yet")."""
    heading, script = MARKED[name]
    return [
        f"## {heading}",
        "",
        f"These tables come from `benchmarks/{script}`: `.venv/bin/python benchmarks/{script} "
        f"--out docs/benchmarks.md` rewrites them between the {name} markers and leaves the "
        "rest of this page alone.",
        "",
        "\n\n".join(blocks or [f"<!-- {name}:start -->\nNot run yet.\n<!-- {name}:end -->"]),
        "",
    ]


def write_marked(path, name: str, parts: list[str]) -> None:
    """Write ``parts`` between ``name``'s markers of the page at ``path`` (adding the section)."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = f"<!-- {name}:start -->\n" + "\n\n".join(parts) + f"\n<!-- {name}:end -->"
    if f"<!-- {name}:start -->" in text:
        text = re.sub(rf"<!-- {name}:start -->.*<!-- {name}:end -->", lambda _: block, text,
                      flags=re.S)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + "\n".join(
            marked_section(name, [block]))
    path.write_text(text)

def derive(records: list[dict]) -> None:
    """Errors to the truth and distances to the exact MLE / composite optimum, per size."""
    import numpy as np

    by_size: dict = {}
    for r in records:
        by_size.setdefault((r["n"], r["p"], r["seed"]), []).append(r)
    for recs in by_size.values():
        ref = next((r for r in recs if r["tool"] == "ordinal" and r["status"] == "ok"), None)
        for r in recs:
            e = r.get("estimate")
            if r["status"] != "ok" or e is None:
                continue
            x = np.concatenate([e["coef"], e["thresholds"]])
            t = np.concatenate([r["truth"]["coef"], r["truth"]["thresholds"]])
            r["err_truth"] = float(np.max(np.abs(x - t)))
            if ref is not None:
                m = np.concatenate([ref["estimate"]["coef"], ref["estimate"]["thresholds"]])
                se = np.asarray(ref["estimate"]["bse"])
                r["dist_mle"] = float(np.max(np.abs(x - m)))
                r["dist_mle_se"] = float(np.max(np.abs(x - m) / se))
                c = np.concatenate([ref["composite_opt"]["coef"],
                                    ref["composite_opt"]["thresholds"]])
                r["dist_cl_se"] = float(np.max(np.abs(x - c) / se))
            r["x_multiple"] = (r["x_bytes"] + r["peak_above_baseline"]) / r["x_bytes"]



def _machine_lines(info: dict) -> list[str]:
    v = info.get("versions", {})
    def lib(b):
        kind = b.get("architecture") or b.get("prefix") or "?"
        return (f"{b.get('internal_api')} {b.get('version') or ''} "
                f"({kind}, {b.get('num_threads')} threads)").replace("  ", " ")

    blas = "; ".join(lib(b) for b in info.get("blas", []))
    # The JSON file turns the run's load-average tuples into lists: print them as the run did.
    load = [tuple(a) if isinstance(a, list) else a
            for a in (info.get("loadavg_start"), info.get("loadavg_end"))]
    return [
        f"- CPU: {info.get('cpu', '?')}; {info.get('cpus_total')} logical CPUs on the machine, "
        f"children pinned to {info.get('pinned')}",
        f"- RAM: {info.get('ram_gb', '?')} GB; OS: {info.get('platform')}",
        f"- Python {info.get('python')}; " + ", ".join(f"{k} {v[k]}" for k in v),
        f"- BLAS: {blas or '?'}",
        f"- Load average at start / end: {load[0]} / {load[1]}"
        " (other work on the machine slows every tool alike only if it is steady)",
    ]


def inference_blocks(page: str) -> list[str]:
    """The inference blocks of an existing page, markers included, in order."""
    return INFERENCE_BLOCK.findall(page)


def inference_section(blocks: list[str]) -> list[str]:
    """The page's last section: ``bench_inference.py``'s blocks under a heading of their own."""
    return [
        "## Inference: bias, MSE and coverage",
        "",
        "These tables come from `benchmarks/bench_inference.py`, not from the run above: "
        "`.venv/bin/python benchmarks/bench_inference.py --out docs/benchmarks.md` rewrites "
        "them between the inference markers and leaves the rest of this page alone.",
        "",
        "\n\n".join(blocks or [INFERENCE_NOT_RUN]),
        "",
    ]


def render(doc: dict, inference: list[str] | None = None,
           marked: dict[str, list[str]] | None = None) -> str:
    """The markdown page; ``inference``, ``marked``: blocks kept from the page it replaces."""
    records = doc["records"]
    sizes = [tuple(s) for s in doc["sizes"]]
    info = doc["machine"]
    default = doc["sizes"] == [list(s) for s in parse_sizes(DEFAULT_SIZES)]
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/bench_core.py, and between their markers by "
        "benchmarks/bench_inference.py, bench_adaptive.py, bench_meta.py, bench_stream.py and "
        "bench_scale.py; "
        "rerun them "
        "rather than editing this page. -->",
        "",
        "fedgrain's estimators against the peer tools, measured in **one run on the same "
        "synthetic data**. Ratios are within the run, so they do not depend on how fast the "
        "machine is, but they do depend on its number of cores: the target figures are for "
        "2 cores.",
        "",
    ]
    if not default:
        out += [
            "> **This page is not the full benchmark.** It was produced with sizes "
            + ", ".join(size_title(n, p) for n, p in sizes)
            + f" instead of the default ({DEFAULT_SIZES}); the targets are judged only at "
            "those sizes and are *not measured* unless they appear. At small sizes fixed costs "
            "(process and worker overheads, fedgrain's row blocks) dominate both time and "
            "memory, and other work on a shared machine moves the timings between runs, so "
            "these figures say that the harness works, not whether fedgrain meets its targets. "
            "Run the full command to produce the real figures.",
            "",
        ]
    out += [
        "## How to reproduce",
        "",
        "From the repository root, after `make bench` has installed the `bench` extras "
        "(`pip install -e '.[dev]'`):",
        "",
        "```",
        doc["command"],
        "```",
        "",
        "The full run (the default sizes) is `python benchmarks/bench_core.py`; `make bench` "
        "runs it and then `benchmarks/bench_inference.py`, `bench_adaptive.py`, "
        "`bench_meta.py`, `bench_stream.py` and `bench_scale.py`, each with `--out "
        "docs/benchmarks.md` (the sections after this run's). On 2 cores the full core run "
        "takes about 3 minutes, the inference run about 10-15 minutes, the scale run (which "
        "writes 7 GB of temporary files) about 6 minutes and the other three a minute or two "
        "each. "
        "`--sizes 1e5x20 --tools ordinal,statsmodels` reruns a part; "
        "`--quick` runs tiny sizes in under a minute without touching this page; `--selftest` "
        "checks the memory accounting. Raw records: `" + doc["json_path"] + "` (git-ignored).",
        "",
        *([f"Records for the (size, tool) pairs not rerun come from an earlier run: "
           f"`{doc['merged_from'].get('command')}` started {doc['merged_from'].get('started')} "
           "(each record's `run` field in the JSON says which).", ""]
          if doc.get("merged_from") else []),
        f"Run {doc['started']} (took {doc['duration'] / 60:.1f} min), git commit "
        f"`{doc.get('git', '?')}`, seed {doc['seed']}, child timeout {doc['timeout']:.0f} s, "
        f"`max_iter` {doc['max_iter']} for the peer tools, memory sampled every "
        f"{doc['sample_ms']} ms.",
        "",
        "Machine:",
        "",
        *_machine_lines(info),
        "",
        "## What is measured",
        "",
        "Data: `fedgrain.datasets.make_ordinal(N, p, 5, rho=0.5, random_state=seed)`: K = 5 "
        "classes, Gaussian features with AR(1) correlation 0.5, the first quarter of the slopes "
        "non-zero, logistic noise; it returns X, y, the true slopes and thresholds.",
        "",
        "Each tool at each size runs in its **own fresh Python process**, pinned to the CPUs "
        "listed above. The process generates the data itself (same seed, so every tool sees "
        "the same X and y), measures its baseline memory, fits, and returns the wall time of "
        "the fit, the peak memory during the fit and its estimates.",
        "",
        "- **Time** is the wall time of the fit call only (data generation, imports and, for "
        "DivideConquerOrdinal, the start of the worker processes excluded). For statsmodels it "
        "includes building the `OrderedModel` (its input checks, like fedgrain's inside `fit`) "
        "and the numerical Hessian it computes for standard errors at the end of `fit`; "
        "statsmodels' `OrderedModel` has no analytic score, so BFGS runs on numerical "
        "gradients. For scikit-learn it is building the expanded matrix plus fitting "
        "(both in the notes).",
        "- **Cold first fit** (DivideConquerOrdinal): the same fit in a fresh process with no "
        "warm-up, i.e. including the one-off start of the loky workers, as a user's first "
        "fit in a session sees it. The main time column is measured after a warm-up fit in "
        "the same process (on other data, just big enough for fedgrain to use its workers), so "
        "it is the cost of every later fit. fedgrain runs small work (N d^2 below "
        "`fedgrain.backends.processes.MIN_PARALLEL_WORK`) in the calling process, starting no "
        "workers; such rows say so and have no cold column.",
        "- **Peak above baseline** (MB): the memory of the child's whole process tree (the "
        "child, its loky workers and their helper processes), sampled every "
        f"{doc['sample_ms']} ms by a thread in the child; the largest sample during the fit "
        "minus the baseline taken just before it (after imports and data generation; for "
        "DivideConquerOrdinal with its workers already started and idle). One sample is "
        "*the sum over the tree of PSS without its shmem part, plus the allocated size of the "
        "/dev/shm files this run created*. PSS splits a page shared by several processes among "
        "them, so libraries and other shared pages count once over the tree. "
        "DivideConquerOrdinal's subsets live in memory-mapped files in /dev/shm; their pages "
        "count exactly once, as file size, whether the parent, one or both workers, or nobody "
        "maps them at that moment (tmpfs files stay in RAM while they exist). Reading "
        "`smaps_rollup` costs 1-4 ms per process, so the anonymous part of PSS is read every "
        "sample from the kernel's `RssAnon` counter (equal to `Pss_Anon` here: the tree's "
        "processes are started by fork + exec and share no anonymous pages; checked), and the "
        "file-backed part is each process's PSS from `smaps_rollup` at the baseline (read again "
        "when a process starts or ends, or maps more than 8 MB of new file pages) plus any "
        "growth of its `RssFile`: library PSS is not re-read at every sample because it also "
        "moves when unrelated processes on the machine start or stop using the same "
        "libraries. Other processes' files in /dev/shm are never counted: the run's entries are "
        "the folders the child creates with `tempfile.mkdtemp` (fedgrain's shard folder; "
        "recorded by an observing wrapper) and new entries that a process of the tree maps. "
        "`python benchmarks/bench_core.py --selftest` checks that a deliberate 400 MB "
        "allocation is counted once: private in the child, private in two helper processes, "
        "and a /dev/shm file mapped by the child and two helpers at once and then by nobody. "
        "The JSON also has the child's own kernel-tracked peak RSS (`VmHWM`) above baseline "
        "as a cross-check of the sampling.",
        "- **(X + peak) / X** is the total memory of the fit relative to the data: X itself "
        "(N * p * 8 bytes, float64, already in memory at baseline) plus the peak above "
        "baseline, divided by the size of X; minus 1 it is **peak / X**, the memory the fit "
        "adds above its input. The memory target has a reading for each (see Targets); "
        "building the expanded binary data needs about 5x.",
        "- **Error to truth** is the largest absolute difference over (slopes, thresholds) to "
        "the values that generated the data. **To MLE** is the same against fedgrain's "
        "`OrdinalRegression` (the exact maximum likelihood estimate) on the same data, also "
        "divided by its standard errors (largest ratio over parameters). DivideConquerOrdinal, "
        "mord's `LogisticAT` (its all-threshold logistic loss with alpha = 0 *is* the composite "
        "likelihood) and scikit-learn's expanded fit all estimate the *composite* (expanded "
        "binary) likelihood, a different (slightly less efficient) estimator than the exact "
        "MLE, so their distance to the MLE is of the order of a standard error and does not "
        "shrink with N in SE units; **To composite opt. / SE** is the distance to the exact "
        "optimum of the composite likelihood on the same data (damped Newton to a Newton "
        "decrement < 1e-12, computed after the timed fit in the OrdinalRegression process), "
        "again in units of the MLE's standard errors: it is what says whether a composite "
        "solver converged.",
        "- **Time / best DC** and **Time / OrdinalRegression**: the tool's time divided by the "
        "fastest DivideConquerOrdinal (over M) and by OrdinalRegression at the same size: how "
        "many times slower than fedgrain.",
        "",
        "Peer tool settings: statsmodels "
        "`OrderedModel(y, X, distr=\"logit\").fit(method=\"bfgs\", disp=False, maxiter=...)`, "
        "thresholds converted from its increment parameterisation with "
        "`model.transform_threshold_params`; mord `LogisticAT(alpha=0.0, max_iter=...)` "
        "(`coef_` and `theta_` are the slopes and thresholds as in fedgrain: it predicts with "
        "theta - X coef; the sign is checked against the truth in every run, see the notes); "
        "scikit-learn `LogisticRegression(C=np.inf, solver=\"lbfgs\", fit_intercept=False, "
        "max_iter=...)` (C = inf is the unpenalised fit; `penalty=None` is deprecated since "
        "scikit-learn 1.8) on the materialised rows (x_i, -e_k) with label 1{y_i > k}, "
        "k = 0..3, whose coefficients are (slopes, thresholds). fedgrain: "
        "`DivideConquerOrdinal(n_subsets=M, backend=\"processes\", n_jobs=2)` with its default "
        "L1 rate penalty, de-biasing, cluster sandwich and one refinement round; "
        "`OrdinalRegression()` with defaults.",
        "",
        "## Targets",
        "",
        "Status is judged only at the size a target names (the speed ratios) or at the sizes "
        f"of the full benchmark ({DEFAULT_SIZES}: the Newton / X'WX and memory targets); other "
        "sizes are shown for information. The memory target, *peak memory at most 2x the size "
        "of X in float64 (the expanded approach needs about 5x)*, has two readings, and each "
        "row shows both with a status for each: **total**, X plus the peak above baseline, "
        "(X + peak) / X <= 2; and **added**, the memory the fit adds above the input X, "
        "peak / X <= 2. The \"about 5x\" fits the added reading best: the expanded matrix "
        "alone is (K - 1)(p + K - 1) / p times X, 4.8x at p = 20.",
        "",
        *targets_table(records, sizes),
        "",
        "fedgrain's DivideConquerOrdinal cannot meet the total reading with a private "
        "in-memory X and worker processes: a worker process cannot read the fitting process's "
        "private memory, so the processes backend places one standardised copy of the rows "
        "in shared memory (/dev/shm) so that each worker can keep its subset across the "
        "rounds without copying it again (about 1.05x X), and that copy alone makes the total "
        "about 2x. The remaining 0.05-0.2x of X is the parent's labels and codes and its "
        "per-block buffers. With X already in a buffer the workers can map (a memory-mapped "
        "file, shared memory, `fedgrain.shared_rows`), the subsets are views of it, not "
        "copies, and the total is 1.1-1.4x X: see \"Memory with the rows in a shared buffer: "
        "subsets as views\" below.",
        "",
        "The Newton target is shown against both floors (plain and blocked X'WX, see Floors): "
        "at p = 20 the N(K - 1) sigmoid terms, one pass for x'beta and one thin product cost "
        "about as much as the Gram matrix itself, while at p = 100 the Gram matrix dominates.",
        "",
        "### What the profiles showed",
        "",
        "- **OrdinalRegression against statsmodels at 1e5 x 20.** The timed fit is the first "
        "fit in a fresh process. It makes two or three Newton passes over the data after a "
        "start from an evenly spaced 20,000-row subsample (each pass about 10 ms: one "
        "exponential and one log1p per cut point and row, one symmetric rank-k update for the "
        "Gram matrix), and it pays once per process for threadpoolctl's scan of the loaded "
        "libraries (about 14 ms), used to keep BLAS to one thread. A second fit in the same "
        "process takes about 65 ms. statsmodels' `OrderedModel` has no analytic score, so its "
        "BFGS runs on numerical gradients, and its time for the same fit varies two to three "
        "fold between runs on this machine (7.6 s to 24 s seen). The ratio therefore lands "
        "between about 90x and 300x from run to run, around the 100x target.",
        "- **Fresh memory on this machine.** Writing into memory that the (virtual) machine "
        "has not touched before costs about 10 microseconds per 4 KB page, against about 0.1 "
        "into recycled pages: copying the 800 MB of subsets at N = 1,000,000, p = 100 takes "
        "about 1 s of DivideConquerOrdinal's time there, 0.1 s when repeated. The expanded "
        "approach pays the same for its 3.2 GB matrix. On machines whose memory is backed up "
        "front these first-touch costs are a small fraction of what is shown.",
        "",
    ]
    for n, p in sizes:
        if not any(r["n"] == n and r["p"] == p and r["tool"] in LABEL for r in records):
            continue
        x_mb = n * p * 8 / 2**20
        small = (" At this size fixed costs (interpreter-level buffers, fedgrain's row blocks) "
                 "are a large part of the memory columns, so the multiples of X are not "
                 "representative of large data.") if x_mb < 100 else ""
        out += [
            f"## {size_title(n, p)}",
            "",
            f"X is {x_mb:,.1f} MB in float64. One process per row (two for "
            "DivideConquerOrdinal: warm and cold). Time is the fit only; memory is the peak of "
            "the process tree above its pre-fit baseline; errors are max-abs over "
            "(slopes, thresholds); SE are OrdinalRegression's model-based standard errors."
            + small,
            "",
            *size_table(records, n, p),
            "",
        ]
    fl = floors_table(records, sizes)
    if len(fl) > 2:
        out += [
            "## Floors: one X'WX and one Newton iteration",
            "",
            "The cost of one weighted Gram matrix X'WX on the same (standardised) X is the "
            "floor of any Newton-type method for this model; fedgrain's implicit expansion "
            "promises that one Newton iteration of the composite likelihood costs about that "
            "much. Measured in one process per size, all three with BLAS limited to one thread "
            "(`threadpoolctl.threadpool_limits(1)`), minimum of "
            f"{doc['repeats']} repetitions. *Plain* is `X.T @ (X * w[:, None])` (a general "
            "matrix product with an N x p temporary); *blocked* is `Z = X_b * sqrt(w_b); "
            "Z.T @ Z` over row blocks of `fedgrain.core.blocks.block_rows(p)` rows (a symmetric "
            "rank-k update on cached blocks); *one Newton iteration* is one call "
            "`composite_pass(X_std, y, None, beta, theta)` (loss, gradient and Hessian at the "
            "true parameters) plus the d x d solve.",
            "",
            *fl,
            "",
        ]
    notes = _run_notes(records)
    if notes:
        out += ["## Notes from this run", "", *notes, ""]
    out += inference_section(inference or [])
    for name in MARKED:
        out += marked_section(name, (marked or {}).get(name, []))
    return "\n".join(out)


def _run_notes(records) -> list[str]:
    notes = []
    warned: dict = {}
    for r in records:
        if r["status"] != "ok":
            continue
        where = f"{LABEL.get(r['tool'], r['tool'])}, {size_title(r['n'], r['p'])}"
        if r["tool"] == "mord" and "sign_check" in r:
            s = r["sign_check"]
            which = ("as is (theta - X coef, like fedgrain)" if s["err_as_is"] <
                     s["err_coef_flipped"] else "with the slopes' sign flipped")
            notes.append(f"- {where}: the estimates match the truth {which}: max error "
                         f"{s['err_as_is']:.3g} as is, {s['err_coef_flipped']:.3g} flipped.")
        for w in r.get("warnings", []):
            warned.setdefault((LABEL.get(r["tool"], r["tool"]), w), []).append(
                size_title(r["n"], r["p"]) + (" (cold)" if r.get("cold") else ""))
        if r.get("converged") is False:
            notes.append(f"- {where}: did not converge within max_iter.")
    for (tool, w), where in warned.items():
        notes.append(f"- {tool} warned `{w}` ({'; '.join(dict.fromkeys(where))}).")
    return notes

