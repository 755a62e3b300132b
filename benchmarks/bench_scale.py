"""alma at scale, in one command: the results frame, then every executor on tiny runs.

``python benchmarks/bench_scale.py`` (about 6 minutes on 2 cores; ``--quick``: under a minute)
runs, one after the other and each in its own processes, so that none measures
another's leftovers:

1. ``bench_results.py``: ``d.results`` of 1,000,000 finished runs against
   ``pandas.read_sql_query`` and a bare ``fetchall``, with peak memory, and the re-read
   after 1,000 more runs were committed;
2. ``bench_processes.py``: the processes executor against loky and
   ``ProcessPoolExecutor`` (chunksize 1, auto, and 1 on a forkserver) at 0, 0.1, 1
   and 10 ms per run, with peak memory;
3. ``bench_core.py``: threads against a bare ``ThreadPoolExecutor`` and joblib, and the
   1,000,000-run state's load and results;
4. ``bench_executors.py``: processes and Dask on CPU-bound work, with Dask at ~1 ms
   runs against a raw ``client.map``.

Each prints its own table and the load average before and after; this script adds the
time each took. The ratios to read are the ones each script prints, measured side by
side in one run: absolute numbers on a shared machine move from run to run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (script, its arguments, its arguments with --quick)
STEPS = [
    ("bench_results.py", [], ["--runs", "100000", "--rounds", "1"]),
    ("bench_processes.py", [], ["--quick"]),
    ("bench_core.py", [], ["--quick"]),
    ("bench_executors.py", [], ["--quick"]),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    args = parser.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    took = []
    for script, full, quick in STEPS:
        options = quick if args.quick else full
        print(f"\n==== {script} {' '.join(options)}".rstrip(), flush=True)
        t0 = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / script), *options])
        took.append((script, time.monotonic() - t0))
        if code:
            print(f"FAIL: {script} exited with {code}", file=sys.stderr)
            return code
    print("\n" + "  ".join(f"{s} {t:.0f} s" for s, t in took))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
