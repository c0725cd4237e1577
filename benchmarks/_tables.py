"""The tables of the core benchmark's page, from the JSON records (after ``derive``)."""

from __future__ import annotations

from _config import DEFAULT_SIZES, K, parse_sizes

LABEL = {
    "ordinal": "fedgrain OrdinalRegression (exact MLE)",
    "dc2": "fedgrain DivideConquerOrdinal, M = 2",
    "dc4": "fedgrain DivideConquerOrdinal, M = 4",
    "dc8": "fedgrain DivideConquerOrdinal, M = 8",
    "dc2v": "fedgrain DivideConquerOrdinal, M = 2, X in /dev/shm (views)",
    "dc4v": "fedgrain DivideConquerOrdinal, M = 4, X in /dev/shm (views)",
    "dc8v": "fedgrain DivideConquerOrdinal, M = 8, X in /dev/shm (views)",
    "statsmodels": "statsmodels OrderedModel (BFGS)",
    "mord": "mord LogisticAT (alpha = 0)",
    "sklearn": "scikit-learn LogisticRegression, expanded",
}
#: Warnings about the peers' own deprecated internals: listed under the notes, not in the tables.
QUIET_WARNINGS = ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning")
INCONCLUSIVE = "inconclusive (timed out)"
TARGET_SIZES = {"speed": (1_000_000, 20), "statsmodels": (100_000, 20)}


def fmt_t(s) -> str:
    if s is None:
        return ""
    if s < 0.01:
        return f"{s:.2g}"
    if s >= 100:
        return f"{s:.0f}"
    if s >= 10:
        return f"{s:.1f}"
    if s >= 1:
        return f"{s:.2f}"
    return f"{s:.3f}"


def fmt_g(v, digits=2) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}g}" if abs(v) < 0.01 else f"{v:.{digits}f}"


def fmt_ratio(v) -> str:
    if v is None:
        return ""
    return f"{v:.0f}x" if v >= 100 else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def timeout_text(r) -> str:
    """'> T (timeout)' with T the time the fit had run when the child was killed."""
    ran = r.get("fit_ran_at_least")
    if ran is None:
        return f"> {fmt_t(r['timeout'])} (timeout, before the fit)"
    return f"> {fmt_t(ran)} (timeout)"


def tool_time(r) -> float | None:
    if r is None or r["status"] != "ok":
        return None
    return r["time"]


def find(records, tool, n, p, cold=False):
    for r in records:
        if r["tool"] == tool and r["n"] == n and r["p"] == p and r.get("cold", False) == cold:
            return r
    return None


def best_dc(records, n, p):
    rs = [r for r in records if r["tool"].startswith("dc") and r["n"] == n and r["p"] == p
          and not r.get("cold") and r["status"] == "ok"]
    return min(rs, key=lambda r: r["time"]) if rs else None


def size_title(n, p) -> str:
    return f"N = {n:,}, p = {p}"


def _notes(r, records) -> str:
    notes = []
    t = r["tool"]
    if t.startswith("dc"):
        cold = find(records, t, r["n"], r["p"], cold=True)
        if cold is not None and cold["status"] == "ok":
            notes.append(f"cold fit peak +{cold['peak_above_baseline'] / 2**20:,.0f} MB "
                         "(includes starting the workers)")
        if r.get("in_process"):
            notes.append("small work: fedgrain ran the subsets in-process, no workers")
        if "warmup_time" in r:
            notes.append(f"warm-up fit ({r['warmup_n']:,} rows, starts the workers) "
                         f"{fmt_t(r['warmup_time'])} s")
    if t == "sklearn":
        notes.append(f"build {fmt_t(r['build_time'])} s + fit {fmt_t(r['fit_time'])} s; "
                     f"expanded matrix {r['expanded_bytes'] / 2**20:,.0f} MB")
    if r.get("n_iter") is not None and not t.startswith("dc"):
        notes.append(f"{r['n_iter']} iterations")
    if r.get("gcalls") is not None:
        notes.append(f"{r['gcalls']} (numerical) gradients")
    if t.startswith("dc") and r.get("n_iter") is not None:
        notes.append(f"subset iterations {r['n_iter']}")
    if r.get("converged") is False:
        notes.append("**not converged**")
    for w in r.get("warnings", []):
        if not w.startswith(QUIET_WARNINGS):
            notes.append(w.split(":")[0])
    if r.get("samples", 99) < 5:
        notes.append(f"only {r['samples']} memory samples")
    return "; ".join(notes)


def size_table(records, n, p) -> list[str]:
    dc = best_dc(records, n, p)
    orr = find(records, "ordinal", n, p)
    t_dc, t_or = tool_time(dc), tool_time(orr)
    lines = [
        "| Tool | Time (s) | Cold first fit (s) | Peak above baseline (MB) | (X + peak) / X "
        "| Error to truth | To MLE | To MLE / SE | To composite opt. / SE | Time / best DC "
        "| Time / OrdinalRegression | Notes |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for tool in ("ordinal", "dc2", "dc4", "dc8", "dc2v", "dc4v", "dc8v", "statsmodels", "mord",
                 "sklearn"):
        r = find(records, tool, n, p)
        if r is None:
            continue
        cold = find(records, tool, n, p, cold=True)
        cold_s = ""
        if cold is not None:
            cold_s = fmt_t(cold["time"]) if cold["status"] == "ok" else (
                timeout_text(cold) if cold["status"] == "timeout" else "error")
        if r["status"] == "timeout":
            so_far = r.get("peak_above_baseline_so_far")
            mem = f">= {so_far / 2**20:,.0f}" if so_far is not None else ""
            lines.append(f"| {LABEL[tool]} | {timeout_text(r)} | {cold_s} | {mem} "
                         f"| | | | | | | | child killed at the {r['timeout']:.0f} s timeout "
                         f"(phase: {r.get('phase')}) |")
            continue
        if r["status"] != "ok":
            msg = (r.get("error") or ["?"])[-1][:120].replace("|", "/")
            lines.append(f"| {LABEL[tool]} | error | | | | | | | | | | {msg} |")
            continue
        t = r["time"]
        lines.append(
            f"| {LABEL[tool]} | {fmt_t(t)} | {cold_s} "
            f"| {r['peak_above_baseline'] / 2**20:,.0f} | {r['x_multiple']:.2f} "
            f"| {fmt_g(r.get('err_truth'), 3)} "
            + ("| (reference) | (reference) " if tool == "ordinal" else
               f"| {fmt_g(r.get('dist_mle'), 2)} | {fmt_g(r.get('dist_mle_se'), 2)} ")
            + f"| {fmt_g(r.get('dist_cl_se'), 2)} "
            f"| {fmt_ratio(t / t_dc) if t_dc else ''} | {fmt_ratio(t / t_or) if t_or else ''} "
            f"| {_notes(r, records)} |"
        )
    return lines


def floors_table(records, sizes) -> list[str]:
    lines = [
        "| Size | One X'WX, plain (s) | One X'WX, blocked syrk (s) | One Newton iteration (s) "
        "| Newton / plain X'WX | Newton / blocked X'WX | Rows per block |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for n, p in sizes:
        r = find(records, "floors", n, p)
        if r is None:
            continue
        if r["status"] != "ok":
            lines.append(f"| {size_title(n, p)} | {r['status']} | | | | | |")
            continue
        a, b, c = r["xwx_plain"]["min"], r["xwx_blocked"]["min"], r["newton"]["min"]
        lines.append(f"| {size_title(n, p)} | {fmt_t(a)} | {fmt_t(b)} | {fmt_t(c)} "
                     f"| {c / a:.2f} | {c / b:.2f} | {r['block_rows']} |")
    return lines


def _memory(x_multiple) -> str:
    """Both readings of the memory target: total (X + peak) / X and added peak / X."""
    return f"(X + peak) / X = {x_multiple:.2f}x; peak / X = {x_multiple - 1:.2f}x"


def targets_table(records, sizes) -> list[str]:
    rows = []

    def status(ok, judged):
        if ok is None:
            return "not measured"
        if isinstance(ok, str):
            return ok
        if not judged:
            return "(for information)"
        return "**met**" if ok else "**not met**"

    full = set(parse_sizes(DEFAULT_SIZES))
    for n, p in sizes:
        judged = (n, p) == TARGET_SIZES["speed"]
        dc = best_dc(records, n, p)
        for tool, need in (("sklearn", 3.0), ("mord", 10.0)):
            r = find(records, tool, n, p)
            if r is None or dc is None:
                continue
            if r["status"] == "timeout" and r.get("fit_ran_at_least") is not None:
                ratio = r["fit_ran_at_least"] / dc["time"]
                meas, ok = f"> {fmt_ratio(ratio)} (timed out)", (True if ratio >= need
                                                                 else INCONCLUSIVE)
            elif r["status"] == "ok":
                ratio = r["time"] / dc["time"]
                meas, ok = fmt_ratio(ratio), ratio >= need
            else:
                meas, ok = "error", None
            rows.append(f"| DivideConquerOrdinal (best M: {dc['tool'][2:]}) >= {need:.0f}x faster "
                        f"than {LABEL[tool]} | {size_title(n, p)} | {meas} "
                        f"| {status(ok, judged)} |")
        judged = (n, p) == TARGET_SIZES["statsmodels"]
        r, orr = find(records, "statsmodels", n, p), find(records, "ordinal", n, p)
        if r is not None and orr is not None and orr["status"] == "ok":
            if r["status"] == "timeout" and r.get("fit_ran_at_least") is not None:
                ratio = r["fit_ran_at_least"] / orr["time"]
                meas, ok = f"> {fmt_ratio(ratio)} (timed out)", (True if ratio >= 100
                                                                 else INCONCLUSIVE)
            elif r["status"] == "ok":
                ratio = r["time"] / orr["time"]
                meas, ok = fmt_ratio(ratio), ratio >= 100
            else:
                meas, ok = "error", None
            rows.append(f"| OrdinalRegression >= 100x faster than statsmodels OrderedModel "
                        f"| {size_title(n, p)} | {meas} | {status(ok, judged)} |")
        f = find(records, "floors", n, p)
        if f is not None and f["status"] == "ok":
            c = f["newton"]["min"]
            for kind, lab in (("xwx_plain", "plain"), ("xwx_blocked", "blocked")):
                ratio = c / f[kind]["min"]
                rows.append(f"| One Newton iteration <= 3x one X'WX ({lab}) | {size_title(n, p)} "
                            f"| {ratio:.2f}x | {status(ratio <= 3, (n, p) in full)} |")
        for tool in ("ordinal", "dc2", "dc4", "dc8"):
            r = find(records, tool, n, p)
            if r is None or r["status"] != "ok":
                continue
            m = r["x_multiple"]
            judged = (n, p) in full
            met = (f"{status(m <= 2.0, True)} (total); {status(m - 1 <= 2.0, True)} (added)"
                   if judged else "(for information)")
            rows.append(f"| Peak memory <= 2x X: {LABEL[tool]} | {size_title(n, p)} "
                        f"| {_memory(m)} | {met} |")
        r = find(records, "sklearn", n, p)
        if r is not None and r["status"] == "ok":
            rows.append(f"| (reference) the expanded approach: {LABEL['sklearn']} "
                        f"| {size_title(n, p)} | {_memory(r['x_multiple'])} "
                        f"| about 5x expected; the expanded matrix alone is "
                        f"{(K - 1) * (p + K - 1) / p:.2f}x X |")
    head = ["| Target | Size | Measured | Status |", "|---|---|--:|---|"]
    return head + rows



def views_block(doc: dict) -> str:
    """The views block: DivideConquerOrdinal's time and memory with copied subsets (a private
    X) and with subsets as views (X in a /dev/shm file), per size and M."""
    records = doc["records"]
    info = doc.get("machine", {})
    load = [tuple(a) if isinstance(a, list) else a
            for a in (info.get("loadavg_start"), info.get("loadavg_end"))]
    out = ["<!-- views:start -->", "",
           f"`{doc['command']}`, run {doc['started']} (took {doc.get('duration', 0) / 60:.1f} "
           f"min), git commit `{doc['git']}`, children pinned to {info.get('pinned')}, load "
           f"average at start / end {load[0]} / {load[1]}. Each row is a fresh process with "
           "warm workers (a warm-up fit first); time is the fit only (the measured first "
           "fit, and the best of it and the fits after it, `--fit-repeats`, in the same "
           "process); memory as in the tables "
           "above (the process tree, /dev/shm files of the run counted once); X in the views "
           "rows is a file in /dev/shm made before the baseline (`fedgrain.shared_rows`), so "
           "it is part of the baseline as a private X is."]
    for n, p in doc["sizes"]:
        rows = []
        for M in (2, 4, 8):
            c, v = find(records, f"dc{M}", n, p), find(records, f"dc{M}v", n, p)
            if c is None and v is None:
                continue

            def cells(r):
                if r is None or r["status"] != "ok":
                    return ["", "", "", ""] if r is None else [r["status"], "", "", ""]
                return [fmt_t(r["time"]), fmt_t(min(r.get("fit_times") or [r["time"]])),
                        f"{r['peak_above_baseline'] / 2**20:,.0f}", f"{r['x_multiple']:.2f}"]

            same = ""
            if c is not None and v is not None and c["status"] == v["status"] == "ok":
                a = [*c["estimate"]["coef"], *c["estimate"]["thresholds"],
                     *c["estimate"]["bse"]]
                b = [*v["estimate"]["coef"], *v["estimate"]["thresholds"],
                     *v["estimate"]["bse"]]
                gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
                same = "yes" if a == b else f"no (max diff {gap:.1e})"
            ratio = ""
            if same and c["status"] == "ok":
                ratio = fmt_ratio(min(v.get("fit_times") or [v["time"]])
                                  / min(c.get("fit_times") or [c["time"]]))
            rows.append(f"| {M} | " + " | ".join(cells(c) + cells(v)) + f" | {ratio} | {same} |")
        if not rows:
            continue
        out += ["", f"**{size_title(n, p)}** (X is {n * p * 8 / 2**20:,.1f} MB):", "",
                "| M | Copied: time (s) | Copied: best time (s) "
                "| Copied: peak above baseline (MB) | Copied: (X + peak) / X "
                "| Views: time (s) | Views: best time (s) | Views: peak above baseline (MB) "
                "| Views: (X + peak) / X | Best time views / copied "
                "| Same model (coef, thresholds, SE to the bit) |",
                "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|", *rows]
    out += ["", "What is left above X with views: the parent's labels, class codes and routing of "
            "the rows, the subsets' row numbers (4 bytes a row), codes and weights in /dev/shm, "
            "and each worker's per-task vectors of its subset's length: bytes a row that do "
            "not grow with p, so the multiple falls as p grows. What the views cost in time: "
            "every pass gathers its blocks' rows from the shared file and standardises them "
            "(`(x - mean) / scale`, the copied shard's arithmetic), about half a pass's work at "
            "p = 20 and less beside the p^2 work of a pass at p = 100; the copied path pays "
            "instead once, for writing the copy. With a private in-memory X the copy stays: a "
            "worker process started on its own cannot read the fitting process's private "
            "memory (and the fork that could share it copy-on-write is not how loky starts "
            "its workers), so the floor there is about 2 X.",
            "", "<!-- views:end -->"]
    return "\n".join(out)
