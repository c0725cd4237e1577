"""The passes and fits on a GPU (``device="cuda"``) against the same on the CPU, in one run.

For each size: one exact pass (loss, gradient, Hessian) and one composite pass on the CPU
(numpy, every core's BLAS) and on the device (PyTorch, float64, synchronised before the clock
stops), one plain Gram matrix ``X'X`` on the CPU for scale, and the whole ``OrdinalRegression``
fit and ``DivideConquerOrdinal(backend="serial")`` fit both ways, with the largest difference in
parameters. Writes a markdown table (``--out``) and prints it.

    python benchmarks/bench_gpu.py --out gpu.md               # on a machine with a GPU
    python benchmarks/bench_gpu.py --device cpu --sizes 2e4x5  # the same code, no GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from fedgrain import DivideConquerOrdinal, OrdinalRegression
from fedgrain.core.gpu import DeviceRows
from fedgrain.core.likelihood import composite_pass, exact_pass


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        n, p = item.lower().split("x")
        out.append((int(float(n)), int(p)))
    return out


def _data(n: int, p: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    beta = rng.normal(0, 0.5, p) / np.sqrt(p)
    y = np.digitize(X @ beta + rng.logistic(size=n), [-1.5, -0.5, 0.5, 1.5])
    return X, y, beta


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _pass_times(X, y, beta, theta, shift, device, sync):
    """Seconds: rows to the device, then the exact and composite passes on the CPU and on the
    device (best of three, after a warm-up there), and one X'X on the CPU."""
    t0 = time.perf_counter()
    dev = DeviceRows(X, y, None, device)
    sync()
    move = time.perf_counter() - t0

    def exact_on_device():
        dev.exact_pass(beta, theta, shift=shift)
        sync()

    def composite_on_device():
        dev.composite_pass(beta, theta)
        sync()

    exact_cpu = _best(lambda: exact_pass(X, y, None, beta, theta, shift=shift))
    comp_cpu = _best(lambda: composite_pass(X, y, None, beta, theta))
    exact_on_device()  # warm-up: kernels loaded, memory pooled
    return (move, exact_cpu, comp_cpu, _best(exact_on_device), _best(composite_on_device),
            _best(lambda: X.T @ X))


def run(sizes, device: str) -> list[dict]:
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for n, p in sizes:
        X, y, beta = _data(n, p)
        theta = np.array([-1.5, -0.5, 0.5, 1.5])
        shift = X.mean(axis=0)
        move, exact_cpu, comp_cpu, exact_dev, comp_dev, gram = _pass_times(
            X, y, beta, theta, shift, device, sync)
        t = time.perf_counter()
        cpu_fit = OrdinalRegression().fit(X, y)
        fit_cpu = time.perf_counter() - t
        t = time.perf_counter()
        dev_fit = OrdinalRegression(device=device).fit(X, y)
        sync()
        fit_dev = time.perf_counter() - t
        diff = float(np.max(np.abs(cpu_fit.results_.params - dev_fit.results_.params)))
        t = time.perf_counter()
        dc_cpu = DivideConquerOrdinal(n_subsets=4, backend="serial").fit(X, y)
        dc_cpu_s = time.perf_counter() - t
        t = time.perf_counter()
        dc_dev = DivideConquerOrdinal(n_subsets=4, backend="serial", device=device).fit(X, y)
        sync()
        dc_dev_s = time.perf_counter() - t
        dc_diff = float(np.max(np.abs(dc_cpu.results_.params - dc_dev.results_.params)))
        rows.append({"n": n, "p": p, "move_s": move, "gram_cpu_s": gram,
                     "exact_cpu_s": exact_cpu, "exact_dev_s": exact_dev,
                     "composite_cpu_s": comp_cpu, "composite_dev_s": comp_dev,
                     "fit_cpu_s": fit_cpu, "fit_dev_s": fit_dev, "fit_max_diff": diff,
                     "dc_cpu_s": dc_cpu_s, "dc_dev_s": dc_dev_s, "dc_max_diff": dc_diff})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], device: str) -> str:
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU (torch)"
    head = (f"Device: {name}; torch {torch.__version__}; numpy {np.__version__}; "
            f"{platform.processor() or platform.machine()}.\n\n"
            "| N x p | exact pass CPU / GPU (s) | speed-up | composite pass CPU / GPU (s) | "
            "speed-up | X'X on CPU (s) | OrdinalRegression fit CPU / GPU (s) | speed-up | "
            "max param diff | DivideConquerOrdinal (M = 4, serial) CPU / GPU (s) | speed-up | "
            "max param diff | rows to GPU (s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['n']:,} x {r['p']} | {r['exact_cpu_s']:.3f} / {r['exact_dev_s']:.4f} | "
            f"{r['exact_cpu_s'] / r['exact_dev_s']:.1f}x | {r['composite_cpu_s']:.3f} / "
            f"{r['composite_dev_s']:.4f} | {r['composite_cpu_s'] / r['composite_dev_s']:.1f}x | "
            f"{r['gram_cpu_s']:.3f} | {r['fit_cpu_s']:.2f} / {r['fit_dev_s']:.2f} | "
            f"{r['fit_cpu_s'] / r['fit_dev_s']:.1f}x | {r['fit_max_diff']:.1e} | "
            f"{r['dc_cpu_s']:.2f} / {r['dc_dev_s']:.2f} | {r['dc_cpu_s'] / r['dc_dev_s']:.1f}x | "
            f"{r['dc_max_diff']:.1e} | {r['move_s']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="1e6x20,1e6x100,1e7x20")
    ap.add_argument("--out", default=None, help="write the table (markdown) here")
    args = ap.parse_args()
    rows = run(_sizes(args.sizes), args.device)
    text = table(rows, args.device)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n" + json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
