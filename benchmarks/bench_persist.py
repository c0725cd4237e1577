"""Loads while another process replaces the model (``save(overwrite=True)``) again and again.

Every load must return one whole version (its arrays match its description) and never fail.
Runs the atomic exchange (Linux) and the two-rename path of other systems, each for
``--seconds``; prints loads, failures and saves.

    python benchmarks/bench_persist.py --seconds 25
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from fedgrain.persist import read_model_dir, write_model_dir


def run(mode: str, seconds: float) -> dict:
    model = Path(tempfile.mkdtemp()) / "m"
    write_model_dir(model, {"version": -1}, {"coef": np.full(500, -1.0)})
    code = textwrap.dedent(f"""
        import time
        import numpy as np
        import fedgrain.persist as P
        if {mode!r} == "two renames":
            P._exchange = lambda a, b: False
        end = time.time() + {seconds}
        i = 0
        while time.time() < end:
            P.write_model_dir({str(model)!r}, {{"version": i}}, {{"coef": np.full(500, i * 1.0)}},
                              overwrite=True)
            i += 1
        print(i)
    """)
    saver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    loads = fails = 0
    while saver.poll() is None:
        try:
            meta, arrays = read_model_dir(model)
            if not np.all(arrays["coef"] == meta["version"]):
                raise AssertionError("a mix of two versions")
            loads += 1
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            fails += 1
            print(f"  {type(exc).__name__}: {exc}", file=sys.stderr)
    return {"mode": mode, "loads": loads, "failures": fails,
            "saves": int(saver.communicate()[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=25.0)
    args = ap.parse_args()
    for mode in ("exchange", "two renames"):
        r = run(mode, args.seconds)
        print(f"{r['mode']}: {r['loads']:,} loads, {r['failures']} failures, "
              f"{r['saves']:,} saves in {args.seconds:g} s")


if __name__ == "__main__":
    main()
