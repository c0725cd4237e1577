#!/usr/bin/env python
"""Core benchmark: fedgrain's estimators against statsmodels, mord and scikit-learn.

One run measures every tool on the same synthetic data (``fedgrain.datasets.make_ordinal``,
K = 5 classes, AR(1) features with rho = 0.5, sparse truth, one seed) and writes the tables to
``docs/benchmarks.md`` together with the command that produced them, and the raw records to
``benchmarks/results/`` (git-ignored). The page's inference and adaptive sections belong to
``bench_inference.py`` and ``bench_adaptive.py``: their marked blocks are kept when this script
rewrites the page.

Every tool runs in its own fresh subprocess (pinned to ``--cpus`` CPUs) that generates the data
itself, measures its baseline memory, fits, and returns the fit's wall time, the peak memory of
its whole process tree above the baseline (see ``_measure.py`` for exactly what is counted) and
its estimates as JSON. A child that runs longer than ``--timeout`` seconds is killed with its
process group and reported as "> timeout".

    python benchmarks/bench_core.py              # the full run: sizes 1e5x20, 1e6x20, 1e6x100
    python benchmarks/bench_core.py --quick      # tiny sizes, under a minute, docs untouched
    python benchmarks/bench_core.py --sizes 1e5x20 --tools ordinal,statsmodels
    python benchmarks/bench_core.py --selftest            # checks the memory accounting
    python benchmarks/bench_core.py --views --out docs/benchmarks.md   # copied vs views

Tools (``--tools``): ``ordinal`` (fedgrain OrdinalRegression, exact MLE; also the reference for
the distance columns), ``dc2``/``dc4``/``dc8`` (fedgrain DivideConquerOrdinal with M subsets,
processes backend), ``dc2v``/``dc4v``/``dc8v`` (the same on X copied first, untimed, into a
``/dev/shm`` file with ``fedgrain.backends.shared_rows``: the subsets are views of it, not
copies), ``statsmodels`` (OrderedModel, logit, BFGS), ``mord`` (LogisticAT,
alpha = 0), ``sklearn`` (LogisticRegression, lbfgs, on the materialised expanded data),
``floors`` (one X'WX and one Newton iteration of the composite likelihood).

This file runs the children and merges their records; what a child does for each tool is in
``_tools.py``, its memory accounting in ``_measure.py``, and the page in ``_report.py`` (with
its tables in ``_tables.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _config import DEFAULT_SIZES, K, parse_sizes  # noqa: E402
from _report import (  # noqa: E402
    MARKED,
    derive,
    git_rev,
    inference_blocks,
    marked_blocks,
    marked_section,
    render,
)
from _tables import views_block  # noqa: E402
from _tools import SELF_MB, child_main  # noqa: E402

QUICK_SIZES = "5e3x10,3e4x40"  # the second is big enough for fedgrain to use its workers
ALL_TOOLS = ("ordinal", "dc2", "dc4", "dc8", "dc2v", "dc4v", "dc8v", "statsmodels", "mord",
             "sklearn", "floors")
#: What a run measures unless ``--tools`` says otherwise (the views rows come with ``--views``).
DEFAULT_TOOLS = tuple(t for t in ALL_TOOLS if not t.endswith("v"))
#: ``--views``: DivideConquerOrdinal on a private X (copied subsets) and on X in a shared buffer
#: (subsets as views), side by side; the page's views block only.
VIEW_TOOLS = ("dc2", "dc4", "dc8", "dc2v", "dc4v", "dc8v")
VIEW_SIZES = "1e6x20,1e6x100"
SELFTESTS = ("_idle", "_alloc", "_shm", "_fork")


def size_key(n, p) -> str:
    return f"{n}x{p}"


def _cleanup_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(spec: dict, timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-core-"))
    spec = dict(spec, out=str(tmp / "out.json"), status=str(tmp / "status.json"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _cleanup_group(proc.pid)
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    _cleanup_group(proc.pid)  # stray workers of this child, if any
    status = {}
    try:
        status = json.loads((tmp / "status.json").read_text())
    except (OSError, ValueError):
        pass
    # shm entries of a killed child are not removed by its atexit hooks: remove them here.
    for e in status.get("shm_entries", []):
        if e.startswith(("fedgrain-", "joblib_memmapping_folder_")):
            shutil.rmtree(Path("/dev/shm") / e, ignore_errors=True)
    rec = {"tool": spec["tool"], "n": spec["n"], "p": spec["p"], "seed": spec["seed"],
           "cold": bool(spec.get("cold")), "child_wall": wall}
    if timed_out:
        rec["status"] = "timeout"
        rec["timeout"] = timeout
        if "fit_start" in status:
            rec["fit_started_after"] = timeout - max(0.0, time.time() - status["fit_start"])
            rec["fit_ran_at_least"] = timeout - rec["fit_started_after"]
            if "peak_so_far" in status and "baseline" in status:
                rec["peak_above_baseline_so_far"] = status["peak_so_far"] - status["baseline"]
        rec["phase"] = status.get("phase")
    elif proc.returncode != 0 or not (tmp / "out.json").exists():
        rec["status"] = "error"
        rec["error"] = (err or out or "").strip().splitlines()[-15:]
    else:
        rec.update(json.loads((tmp / "out.json").read_text()))
        rec["status"] = "ok"
    shutil.rmtree(tmp, ignore_errors=True)
    return rec


def selftest(args) -> int:
    cpus = pick_cpus(args.cpus)
    ok = True
    print(f"Memory accounting self-test: {SELF_MB} MB should be counted once, on top of the "
          "interpreters of the two helper processes (measured first, with nothing allocated).")
    overhead = 0.0
    for tool in SELFTESTS:
        spec = {"tool": tool, "n": 1000, "p": 5, "seed": 0, "cpus": cpus,
                "sample_ms": args.sample_ms, "max_iter": 1, "repeats": 1}
        r = run_child(spec, 120)
        if r["status"] != "ok":
            print(f"  {tool}: {r['status']} {r.get('error')}")
            ok = False
            continue
        pk = r["peak"]
        got = r["peak_above_baseline"] / 2**20
        if tool == "_idle":
            overhead = got
            print(f"  {tool:7s}: two idle helper interpreters: {got:.1f} MB")
            continue
        got -= overhead if tool in ("_shm", "_fork") else 0.0
        good = abs(got - SELF_MB) < 0.03 * SELF_MB
        ok &= good
        print(f"  {tool:7s}: counted {got:7.1f} MB ({'ok' if good else 'WRONG'}); at the peak: "
              f"{pk['n_procs']} processes, anon {pk['anon'] / 2**20:.0f} MB, file-backed PSS "
              f"{pk['file'] / 2**20:.0f} MB, run's shm files {pk['shm_files'] / 2**20:.0f} MB; "
              f"{r['samples']} samples, {r['sampler_cost_ms']:.2f} ms per sample")
    return 0 if ok else 1


def parallel_floor() -> float:
    """fedgrain's ``MIN_PARALLEL_WORK`` (rows * d^2 below which subsets run in-process)."""
    try:
        from fedgrain.backends import processes
    except ImportError:
        return 0.0
    return float(getattr(processes, "MIN_PARALLEL_WORK", 0.0))


def pick_cpus(k: int) -> list[int]:
    try:
        avail = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return []
    return avail[: max(1, k)]


def machine_info() -> dict:
    """CPU model, cores, RAM, OS, Python and library versions, BLAS."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpus_total"] = os.cpu_count()
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpus_usable"] = os.cpu_count()
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    versions = {}
    for mod in ("fedgrain", "numpy", "scipy", "sklearn", "statsmodels", "mord", "joblib",
                "threadpoolctl", "psutil", "pandas"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", None)
            if versions[mod] is None:
                from importlib.metadata import version

                versions[mod] = version(mod)
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            versions[mod] = "not installed"
    info["versions"] = versions
    try:
        import numpy  # noqa: F401
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for d in threadpool_info()
        ]
    except Exception:  # noqa: BLE001
        pass
    info["loadavg"] = os.getloadavg()
    return info


def write_page(doc: dict, path: Path) -> None:
    """Write the page, keeping the blocks the other benchmark scripts wrote between markers."""
    old = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(doc, inference_blocks(old),
                           {name: marked_blocks(old, name) for name in MARKED}))


def write_views(block: str, path: Path) -> None:
    """Replace the page's views block (or add its section at the end)."""
    page = path.read_text()
    start, end = "<!-- views:start -->", "<!-- views:end -->"
    if start in page:
        head, rest = page.split(start, 1)
        page = head + block + rest.split(end, 1)[1]
    else:
        page = page.rstrip("\n") + "\n\n" + "\n".join(marked_section("views", [block]))
    path.write_text(page)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help=f"comma-separated NxP (default {DEFAULT_SIZES})")
    ap.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                    help=f"comma-separated subset of {','.join(ALL_TOOLS)}")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per child process (default 600; 60 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs each child is pinned to (n_jobs)")
    ap.add_argument("--max-iter", type=int, default=1000,
                    help="max_iter / maxiter of statsmodels, mord and scikit-learn")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of the floors")
    ap.add_argument("--sample-ms", type=float, default=10.0, help="memory sampling interval")
    ap.add_argument("--statsmodels-max-n", type=float, default=1e5,
                    help="run statsmodels only up to this N (default 1e5; 1e4 with --quick)")
    ap.add_argument("--no-cold", action="store_true",
                    help="skip the cold-start DivideConquerOrdinal processes")
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny sizes ({QUICK_SIZES}), no cold-start runs, short timeout; "
                    "writes the page only with --out")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only re-render the page from a results file (to --out or stdout)")
    ap.add_argument("--out", default=None, help="markdown page (default docs/benchmarks.md)")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/...)")
    ap.add_argument("--merge", default=None,
                    help="earlier results JSON whose records fill in (size, tool) pairs not rerun")
    ap.add_argument("--selftest", action="store_true", help="check the memory accounting")
    ap.add_argument("--fit-repeats", type=int, default=None,
                    help="DivideConquerOrdinal fits per child: the first is measured (time and "
                    "memory), the others timed (default 1; 3 with --views)")
    ap.add_argument("--views", action="store_true",
                    help=f"DivideConquerOrdinal with copied subsets against subsets as views "
                    f"(tools {','.join(VIEW_TOOLS)}, sizes {VIEW_SIZES} unless given, no cold "
                    "runs); writes only the page's views block")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    if args.selftest:
        return selftest(args)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        derive(doc["records"])
        if args.out:
            write_page(doc, Path(args.out))
        else:
            print(render(doc))
        return 0

    if args.fit_repeats is None:
        args.fit_repeats = 3 if args.views else 1
    if args.views:
        args.no_cold = True
        if args.tools == ",".join(DEFAULT_TOOLS):
            args.tools = ",".join(VIEW_TOOLS)
        args.sizes = args.sizes or VIEW_SIZES
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    if args.quick:
        args.statsmodels_max_n = min(args.statsmodels_max_n, 1e4)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in ALL_TOOLS]
    if bad:
        ap.error(f"unknown tools {bad}; choose from {','.join(ALL_TOOLS)}")
    tools = [t for t in ALL_TOOLS if t in tools]  # the reference (ordinal) first
    timeout = args.timeout or (60.0 if args.quick else 600.0)
    out_md = args.out or (None if args.quick else str(ROOT / "docs" / "benchmarks.md"))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"bench_core-{stamp}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    cpus = pick_cpus(args.cpus)

    info = machine_info()
    info["pinned"] = f"CPUs {cpus} ({len(cpus)} cores)" if cpus else "no pinning"
    info["loadavg_start"] = tuple(round(x, 2) for x in os.getloadavg())
    py = Path(sys.executable)
    try:
        py_text = str(py.relative_to(ROOT)) if not py.is_absolute() or ROOT in py.parents \
            else "python"
    except ValueError:
        py_text = "python"
    command = f"{py_text} benchmarks/bench_core.py" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv)
        if (sys.argv[1:] if argv is None else argv) else "")
    try:
        rel_json = str(json_path.resolve().relative_to(ROOT))
    except ValueError:
        rel_json = str(json_path)
    doc = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git": git_rev(), "seed": args.seed, "timeout": timeout, "max_iter": args.max_iter,
           "sample_ms": args.sample_ms, "repeats": args.repeats, "cpus": cpus,
           "sizes": [list(s) for s in sizes], "tools": tools, "machine": info,
           "json_path": rel_json, "records": []}
    if args.merge:
        old = json.loads(Path(args.merge).read_text())
        doc["merged_from"] = {"path": args.merge, "command": old.get("command"),
                              "started": old.get("started")}
    t_start = time.perf_counter()

    def save():
        doc["duration"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(doc, indent=1))

    for n, p in sizes:
        for tool in tools:
            if tool == "statsmodels" and n > args.statsmodels_max_n:
                continue
            cold_too = tool.startswith("dc") and not (args.no_cold or args.quick)
            if cold_too and float(n) * (p + K - 1) ** 2 < parallel_floor():
                cold_too = False  # fedgrain runs this in-process: no workers, nothing cold
            variants = [False, True] if cold_too else [False]
            for cold in variants:
                spec = {"tool": tool, "n": n, "p": p, "seed": args.seed, "cpus": cpus,
                        "cold": cold, "sample_ms": args.sample_ms, "max_iter": args.max_iter,
                        "repeats": args.repeats, "fit_repeats": args.fit_repeats}
                label = f"{tool}{' (cold)' if cold else ''} at {size_key(n, p)}"
                print(f"[{time.strftime('%H:%M:%S')}] {label} ...", end=" ", flush=True,
                      file=sys.stderr)
                rec = run_child(spec, timeout)
                rec["run"] = doc["started"]
                doc["records"].append(rec)
                if rec["status"] == "ok":
                    extra = (f"peak +{rec['peak_above_baseline'] / 2**20:.0f} MB"
                             if "peak_above_baseline" in rec else "")
                    print(f"{rec['time']:.3f} s {extra}", file=sys.stderr)
                elif rec["status"] == "timeout":
                    print(f"timeout ({timeout:.0f} s, phase {rec.get('phase')})", file=sys.stderr)
                else:
                    print("error:", (rec.get("error") or [""])[-1], file=sys.stderr)
                save()
    if args.merge:
        have = {(r["tool"], r["n"], r["p"], r.get("cold", False)) for r in doc["records"]}
        for r in old.get("records", []):
            key = (r["tool"], r["n"], r["p"], r.get("cold", False))
            if key not in have and r.get("seed") == args.seed:
                r.setdefault("run", old.get("started"))
                doc["records"].append(r)
                if [r["n"], r["p"]] not in doc["sizes"]:
                    doc["sizes"].append([r["n"], r["p"]])
    derive(doc["records"])
    info["loadavg_end"] = tuple(round(x, 2) for x in os.getloadavg())
    save()
    latest = json_path.parent / "latest.json"
    if json_path.resolve() != latest.resolve():
        shutil.copyfile(json_path, latest)
    if args.views:
        block = views_block(doc)
        if out_md and not args.quick:
            write_views(block, Path(out_md))
            print(f"wrote the views block of {out_md}", file=sys.stderr)
        else:
            print(block)
    elif out_md:
        write_page(doc, Path(out_md))
        print(f"wrote {out_md}", file=sys.stderr)
    else:
        print(render(doc))
    print(f"results in {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
