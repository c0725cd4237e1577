"""The child side of the core benchmark: one tool, one size, in a fresh process.

``child_main`` generates the data, starts the memory sampler of ``_measure.py`` and calls the
tool's runner, which fits inside a measurement window (``_timed``) and returns the wall time,
the peak memory above the baseline and the estimates; the parent (``bench_core.py``) reads the
JSON it writes. The ``_``-prefixed runners are the self-tests of the memory accounting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _config import RHO, K


def _pin(cpus):
    if cpus:
        try:
            os.sched_setaffinity(0, set(cpus))
        except (AttributeError, OSError):
            pass


def _est(coef, thresholds, bse=None) -> dict:
    import numpy as np

    out = {"coef": np.asarray(coef, float).tolist(),
           "thresholds": np.asarray(thresholds, float).tolist()}
    if bse is not None:
        out["bse"] = np.asarray(bse, float).tolist()
    return out


def _warn_list(caught) -> list[str]:
    seen = []
    for w in caught:
        msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
        if msg not in seen:
            seen.append(msg)
    return seen


def _timed(sampler, fn, **status):
    """Baseline, then ``fn()`` inside a measurement window; returns ``(value, measurements)``."""
    from _measure import reset_hwm, rss_status, trim_heap

    trim_heap()
    base = sampler.baseline()
    reset_hwm()
    rss0 = rss_status().get("VmRSS", 0)
    sampler.set_status(phase="fit", fit_start=time.time(), baseline=base["total"], **status)
    sampler.start_window()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
    win = sampler.end_window()
    sampler.set_status(phase="done")
    hwm = rss_status().get("VmHWM", 0)
    peak = win["peak"] or base
    return value, {
        "time": dt,
        "baseline": base,
        "peak": peak,
        "peak_above_baseline": peak["total"] - base["total"],
        "samples": win["samples"],
        "main_rss_hwm_above_baseline": hwm - rss0,
        "warnings": _warn_list(caught),
    }


def _dc(spec, X, y, sampler, M, shared=False):
    """DivideConquerOrdinal with M subsets; ``shared``: X copied first (untimed) into a
    ``/dev/shm`` file (``fedgrain.backends.shared_rows``), so the subsets are views of it."""
    import numpy as np

    from fedgrain import DivideConquerOrdinal
    from fedgrain.backends import processes
    from fedgrain.datasets import make_ordinal

    n_jobs = len(spec["cpus"]) if spec["cpus"] else 2
    res: dict = {"n_jobs": n_jobs, "cold": bool(spec.get("cold"))}
    n, p = X.shape
    d = p + K - 1
    # fedgrain runs small work (rows * d^2 below MIN_PARALLEL_WORK) in the calling process,
    # starting no workers; then there is nothing to warm up.
    floor = getattr(processes, "MIN_PARALLEL_WORK", 0.0)
    res["in_process"] = bool(float(n) * d * d < floor)
    if not spec.get("cold") and not res["in_process"]:
        # A warm-up fit (big enough to use the workers) starts them: a one-off per session.
        n_w = int(max(4000, 20 * d * M, 2 * floor / d**2))
        Xw, yw, _, _ = make_ordinal(n_w, p, K, rho=RHO, random_state=spec["seed"] + 1)
        t0 = time.perf_counter()
        DivideConquerOrdinal(n_subsets=M, backend="processes", n_jobs=n_jobs).fit(Xw, yw)
        res["warmup_n"] = n_w
        res["warmup_time"] = time.perf_counter() - t0
        del Xw, yw
        sampler.mem.refresh_tree()
        res["workers_after_warmup"] = len(sampler.mem.pids) - 1
    if shared:  # X in a file of /dev/shm, in the baseline like a private X
        from fedgrain.backends import shared_rows

        X = shared_rows(X)
        res["shared"] = True
        sampler.mem.refresh_tree()
    est = DivideConquerOrdinal(n_subsets=M, backend="processes", n_jobs=n_jobs)
    _, meas = _timed(sampler, lambda: est.fit(X, y))
    res.update(meas)
    times = [meas["time"]]
    for _ in range(int(spec.get("fit_repeats", 1)) - 1):  # after the window: time only
        t0 = time.perf_counter()
        DivideConquerOrdinal(n_subsets=M, backend="processes", n_jobs=n_jobs).fit(X, y)
        times.append(time.perf_counter() - t0)
    res["fit_times"] = times
    res["estimate"] = _est(est.coef_, est.thresholds_, est.bse_)
    n_iter = getattr(est, "n_iter_", None)
    if n_iter is not None:
        res["n_iter"] = np.asarray(n_iter).tolist()
    res["shm_entries"] = sorted(sampler.mem.seen_entries)
    return res


def composite_optimum(X, y, x0, p, tol=1e-12, max_iter=50):
    """The optimum of the composite (expanded binary) likelihood by damped Newton from ``x0``."""
    import numpy as np

    from fedgrain.core.likelihood import composite_pass

    x = np.array(x0, float)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        r = composite_pass(X, y, None, x[:p], x[p:], loss=True, order=2)
        step = np.linalg.solve(r.hess, -r.grad)
        dec = float(-r.grad @ step)
        t = 1.0
        while t > 1e-6:
            new = x + t * step
            if composite_pass(X, y, None, new[:p], new[p:], order=0).loss <= r.loss + 1e-12:
                break
            t *= 0.5
        x = new
        if dec < tol:
            break
    return x, it


def _ordinal(spec, X, y, sampler):
    import numpy as np

    from fedgrain import OrdinalRegression

    est = OrdinalRegression()
    _, res = _timed(sampler, lambda: est.fit(X, y))
    res["estimate"] = _est(est.coef_, est.thresholds_, est.bse_)
    res["n_iter"] = int(est.n_iter_)
    # Reference for the composite-likelihood tools (not timed, after the window).
    p = X.shape[1]
    t0 = time.perf_counter()
    x, it = composite_optimum(X, y, np.concatenate([est.coef_, est.thresholds_]), p)
    res["composite_opt"] = _est(x[:p], x[p:])
    res["composite_opt_iter"] = it
    res["composite_opt_time"] = time.perf_counter() - t0
    return res


def _statsmodels(spec, X, y, sampler):
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    box = {}

    def fit():
        model = OrderedModel(y, X, distr="logit")
        box["model"] = model
        return model.fit(method="bfgs", disp=False, maxiter=spec["max_iter"])

    r, res = _timed(sampler, fit)
    p = X.shape[1]
    th = box["model"].transform_threshold_params(r.params)[1:-1]
    res["estimate"] = _est(r.params[:p], th)
    ret = getattr(r, "mle_retvals", {}) or {}
    res["converged"] = bool(ret.get("converged", False))
    res["n_iter"] = ret.get("iterations")
    res["fcalls"], res["gcalls"] = ret.get("fcalls"), ret.get("gcalls")
    return res


def _mord(spec, X, y, sampler):
    import numpy as np
    from mord import LogisticAT

    est = LogisticAT(alpha=0.0, max_iter=spec["max_iter"])
    _, res = _timed(sampler, lambda: est.fit(X, y))
    res["estimate"] = _est(est.coef_, est.theta_)
    # Sign convention: mord predicts with theta - X coef (like fedgrain); check against truth.
    truth = np.concatenate([spec["truth_coef"], spec["truth_thresholds"]])
    as_is = np.concatenate([est.coef_, est.theta_])
    flipped = np.concatenate([-est.coef_, est.theta_])
    res["sign_check"] = {"err_as_is": float(np.max(np.abs(as_is - truth))),
                         "err_coef_flipped": float(np.max(np.abs(flipped - truth)))}
    return res


def _sklearn(spec, X, y, sampler):
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    n, p = X.shape
    K1 = K - 1
    d = p + K1
    box: dict = {}

    def build_and_fit():
        t0 = time.perf_counter()
        # Expanded rows (x_i, -e_k) with label 1{y_i > k}: logit = x_i'beta - theta_k.
        Xe = np.empty((n * K1, d))
        view = Xe.reshape(n, K1, d)
        view[:, :, :p] = X[:, None, :]
        view[:, :, p:] = -np.eye(K1)
        ye = (y[:, None] > np.arange(K1)[None, :]).reshape(-1).astype(np.int8)
        t1 = time.perf_counter()
        # C = inf is scikit-learn's spelling of penalty=None since 1.8 (penalty is deprecated).
        lr = LogisticRegression(C=np.inf, solver="lbfgs", fit_intercept=False,
                                max_iter=spec["max_iter"])
        lr.fit(Xe, ye)
        box.update(build=t1 - t0, fit=time.perf_counter() - t1, lr=lr, bytes=Xe.nbytes)
        return lr

    lr, res = _timed(sampler, build_and_fit)
    res["build_time"] = box["build"]
    res["fit_time"] = box["fit"]
    res["expanded_bytes"] = box["bytes"]
    res["estimate"] = _est(lr.coef_[0, :p], lr.coef_[0, p:])
    res["n_iter"] = int(np.max(lr.n_iter_))
    res["converged"] = res["n_iter"] < spec["max_iter"]
    return res


def _floors(spec, X, y, sampler):
    import numpy as np
    from threadpoolctl import threadpool_limits

    from fedgrain.core.blocks import block_rows
    from fedgrain.core.likelihood import composite_pass

    n, p = X.shape
    mean = X.mean(axis=0)
    sd = X.std(axis=0)
    Xs = (X - mean) / sd
    beta = np.asarray(spec["truth_coef"]) * sd
    theta = np.asarray(spec["truth_thresholds"]) - mean @ np.asarray(spec["truth_coef"])
    w = np.random.default_rng(spec["seed"]).uniform(0.05, 0.25, n)
    B = block_rows(p)

    def plain():
        return Xs.T @ (Xs * w[:, None])

    Zbuf = np.empty((min(B, n), p))
    sw = np.sqrt(w)

    def blocked():
        G = np.zeros((p, p))
        for s in range(0, n, B):
            Xb = Xs[s : s + B]
            Zb = np.multiply(Xb, sw[s : s + B, None], out=Zbuf[: Xb.shape[0]])
            G += Zb.T @ Zb
        return G

    def newton():
        r = composite_pass(Xs, y, None, beta, theta)
        return np.linalg.solve(r.hess, -r.grad)

    out: dict = {"block_rows": B, "repeats": spec["repeats"]}
    with threadpool_limits(limits=1, user_api="blas"):
        G1, G2 = plain(), blocked()
        out["blocked_matches_plain"] = bool(np.allclose(G1, G2, rtol=1e-8, atol=1e-6))
        for name, fn in (("xwx_plain", plain), ("xwx_blocked", blocked), ("newton", newton)):
            ts = []
            for _ in range(spec["repeats"]):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[name] = {"min": min(ts), "median": sorted(ts)[len(ts) // 2], "all": ts}
    out["time"] = out["newton"]["min"]
    return out


# ---- self-tests of the memory accounting -------------------------------------------------
SELF_MB = 400


def _self_alloc(spec, X, y, sampler):
    import numpy as np

    def fn():
        a = np.ones(SELF_MB * 1024 * 1024 // 8)
        time.sleep(0.3)
        del a

    _, res = _timed(sampler, fn)
    return res


_WORKER = """
import sys, time, numpy as np
mode, arg = sys.argv[1], sys.argv[2]
if mode == "map":
    a = np.load(arg, mmap_mode="r"); float(a.sum())   # touch every page of the shared file
else:
    a = np.ones(int(arg) // 8)
time.sleep(1.0)
"""


def _self_shm(spec, X, y, sampler):
    """A 400 MB /dev/shm file written by the child, mapped by it and two workers at once."""
    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="fedgrain-selftest-", dir="/dev/shm"))
    path = str(folder / "a.npy")

    def fn():
        a = np.lib.format.open_memmap(path, mode="w+", dtype=float,
                                      shape=(SELF_MB * 1024 * 1024 // 8,))
        a[:] = 1.0
        a.flush()
        time.sleep(0.3)  # mapped by the child only
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, "map", path])
                 for _ in range(2)]
        for pr in procs:
            pr.wait()
        del a
        time.sleep(0.3)  # mapped by nobody: still in RAM as a tmpfs file
        shutil.rmtree(folder)

    try:
        _, res = _timed(sampler, fn)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return res


def _self_fork(spec, X, y, sampler, nbytes=SELF_MB // 2 * 1024 * 1024):
    """Two worker processes allocating 200 MB each (private memory of descendants)."""

    def fn():
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, "alloc", str(nbytes)])
                 for _ in range(2)]
        for pr in procs:
            pr.wait()

    _, res = _timed(sampler, fn)
    return res


RUNNERS = {
    "ordinal": _ordinal, "statsmodels": _statsmodels, "mord": _mord, "sklearn": _sklearn,
    "floors": _floors, "_alloc": _self_alloc, "_shm": _self_shm, "_fork": _self_fork,
    "_idle": lambda s, X, y, m: _self_fork(s, X, y, m, nbytes=0),
    "dc2": lambda s, X, y, m: _dc(s, X, y, m, 2),
    "dc4": lambda s, X, y, m: _dc(s, X, y, m, 4),
    "dc8": lambda s, X, y, m: _dc(s, X, y, m, 8),
    "dc2v": lambda s, X, y, m: _dc(s, X, y, m, 2, shared=True),
    "dc4v": lambda s, X, y, m: _dc(s, X, y, m, 4, shared=True),
    "dc8v": lambda s, X, y, m: _dc(s, X, y, m, 8, shared=True),
}


def child_main(spec: dict) -> None:
    _pin(spec.get("cpus"))
    t_start = time.perf_counter()
    from _measure import Sampler, TreeMemory
    from fedgrain.datasets import make_ordinal

    mem = TreeMemory()
    mem.watch_mkdtemp()
    sampler = Sampler(mem, interval=spec["sample_ms"] / 1000.0, status_path=spec["status"])
    sampler.start()
    sampler.set_status(phase="setup", pid=os.getpid())
    t0 = time.perf_counter()
    X, y, coef, th = make_ordinal(spec["n"], spec["p"], K, rho=RHO,
                                  random_state=spec["seed"])
    gen = time.perf_counter() - t0
    spec["truth_coef"], spec["truth_thresholds"] = coef.tolist(), th.tolist()
    res = RUNNERS[spec["tool"]](spec, X, y, sampler)
    res.update(tool=spec["tool"], n=spec["n"], p=spec["p"], seed=spec["seed"],
               x_bytes=int(X.nbytes), gen_time=gen, truth=_est(coef, th),
               sampler_cost_ms=1000 * sampler.mean_cost(),
               anon_vs_pss_anon_max_bytes=mem.anon_mismatch, maps_scans=mem.maps_scans,
               foreign_shm_entries=len(mem.foreign),
               child_time=time.perf_counter() - t_start,
               class_counts=[int(c) for c in __import__("numpy").bincount(y, minlength=K)])
    sampler.stop()
    with open(spec["out"], "w") as f:
        json.dump(res, f)
