"""The shared reader (``fedgrain.data.DatasetSource``, on ``pyarrow.dataset``) against the number
of files: the same rows written as 4, 64 and 512 Parquet files (and a Hive-partitioned folder),
read batch by batch.

For each layout, in a fresh process: the wall time of one pass over every column, pyarrow's
peak memory during it (a proxy memory pool), the process's peak resident memory above what it
held before the pass, and the same for ``pandas.read_parquet`` of the whole folder (the peer
that loads it). Prints a Markdown table.

    python benchmarks/bench_dataset.py --rows 2000000 --features 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CHILD = """
import json, sys, time
import pandas as pd
import pyarrow as pa
sys.path[:0] = {path!r}
from _measure import rss_status, reset_hwm, trim_heap
from fedgrain.data import DatasetSource
trim_heap()
reset_hwm()
before = rss_status()["VmRSS"]
t0 = time.perf_counter()
if {how!r} == "pandas":
    rows = len(pd.read_parquet({folder!r}))
    peak_pool = pa.default_memory_pool().max_memory()
else:
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    pa.set_memory_pool(pool)
    source = DatasetSource({folder!r}, filter={filter!r})
    rows = sum(len(f) for _, f in source.frames())
    peak_pool = pool.max_memory()
wall = time.perf_counter() - t0
print(json.dumps({{"rows": rows, "wall": wall, "pool": peak_pool,
                   "rss": rss_status()["VmHWM"] - before}}))
"""


def write(folder: Path, frame: pd.DataFrame, n_files: int) -> None:
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(frame)), n_files)):
        frame.iloc[part].to_parquet(folder / f"part-{i:04d}.parquet", index=False)


def measure(folder: Path, how: str, filter: str | None = None) -> dict:
    here = str(Path(__file__).resolve().parent)
    src = str(Path(__file__).resolve().parents[1] / "src")
    code = CHILD.format(path=[here, src], how=how, folder=str(folder), filter=filter)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=2e6)
    parser.add_argument("--features", type=int, default=20)
    args = parser.parse_args()
    n, p = int(args.rows), args.features
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.standard_normal((n, p)), columns=[f"x{j}" for j in range(p)])
    frame["y"] = rng.integers(0, 4, n)
    frame["region"] = rng.integers(0, 8, n)
    root = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    layouts = {}
    for n_files in (4, 64, 512):
        write(root / f"f{n_files}", frame.drop(columns="region"), n_files)
        layouts[f"{n_files} files"] = (root / f"f{n_files}", None)
    pq.write_to_dataset(pa.Table.from_pandas(frame, preserve_index=False), root / "hive",
                        partition_cols=["region"])
    layouts["Hive, 8 partitions"] = (root / "hive", None)
    layouts["Hive, filter region < 2"] = (root / "hive", "region < 2")
    size = sum(f.stat().st_size for f in (root / "f4").iterdir()) / 2**20
    print(f"{n:,} rows x {p} float features + target, {size:.0f} MB of Parquet; one pass "
          f"over every column.\n")
    print("| Layout | Reader | Rows | Wall (s) | pyarrow peak (MB) | Resident peak above "
          "start (MB) |")
    print("|---|---|---|---|---|---|")
    for name, (folder, flt) in layouts.items():
        hows = ["DatasetSource.frames"] + (["pandas.read_parquet"] if flt is None else [])
        for how in hows:
            r = measure(folder, "pandas" if how.startswith("pandas") else "fedgrain", flt)
            print(f"| {name} | {how} | {r['rows']:,} | {r['wall']:.2f} | "
                  f"{r['pool'] / 2**20:.1f} | {r['rss'] / 2**20:.0f} |")
    import shutil

    shutil.rmtree(root)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n(took {time.time() - t0:.0f} s)")
