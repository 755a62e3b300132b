"""The results frame of 1,000,000 finished runs: alma against the naive reads of its file.

Run it with ``python benchmarks/bench_results.py`` (about 2 minutes and a half on 2 cores;
``--runs 100000`` for a quick one). A state of 1,000 files x 1,000 iterations with a
3-key dict result is written directly through alma's store, then each contender runs
in a fresh process (pandas and alma imported first, outside the timing), in interleaved
rounds, and the medians are printed with the peak memory above the import baseline:

* ``d.results`` (alma's frame: names, a column per result key, typed);
* ``d.results`` read again after 1,000 more runs were committed (the reader keeps the
  frame it read and merges in the runs committed since);
* the same once more after another 1,000 (what a notebook that keeps re-reading
  pays: the frame it extends is then a re-read's, not a whole read's);
* ``pandas.read_sql_query("SELECT * FROM runs", con)`` (raw rows, JSON not parsed);
* ``sqlite3`` ``fetchall()`` of the same (the floor of a row-by-row read).

Target (issue #12): alma at most 0.5x read_sql_query, at most 600 MB above baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = """
import json, sys, time
import pandas as pd, sqlite3
import pyarrow.csv, pyarrow.json  # imported by alma's first read of results: not timed
import alma.experiment

def peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0

what, exp = sys.argv[1], sys.argv[2]
d = alma.experiment.load(exp, readonly=True)
state = d.state_path
base = peak()
t = time.perf_counter()
if what == "alma":
    n = len(d.results)
elif what.startswith("alma, re-read"):  # on a copy of the state: the others read it as built
    from alma.store import Store

    first = len(d.results)  # the whole read, untimed; then 1,000 runs are committed
    spec = d.spec
    writer = Store(state, spec.name)
    ids, configs = writer.open_writer(
        spec.instances, spec.paths, spec.params, spec.iterations, spec.code_hash
    )
    for extra in range(2 if what.endswith("again") else 1):
        rows = [
            (ids[name], configs["{}"], spec.iterations + extra, "done",
             '{"cut": 1, "ratio": 0.5, "name": "x"}', None, None, 1, 0.1, time.time(),
             spec.code_hash, 1, 0)
            for name in spec.instances
        ]  # fmt: skip
        writer.write(rows, [], [])
        if extra == 0 and what.endswith("again"):  # the first re-read, untimed
            first = len(d.results)
    writer.close()
    base = peak()
    t = time.perf_counter()
    n = len(d.results) - first
elif what == "read_sql_query":
    n = len(pd.read_sql_query("SELECT * FROM runs", sqlite3.connect(state)))
else:
    n = len(sqlite3.connect(state).execute("SELECT * FROM runs").fetchall())
print(json.dumps({"s": time.perf_counter() - t, "mb": peak() - base, "rows": n}))
"""

CONTENDERS = ("alma", "alma, re-read", "alma, re-read again", "read_sql_query", "fetchall")


def build(folder: Path, files: int, iterations: int) -> Path:
    import alma.experiment
    from alma.records import seed_of
    from alma.store import Store

    (folder / "data").mkdir(parents=True)
    for i in range(files):
        (folder / "data" / f"g{i:04d}.txt").write_text(str(i))
    (folder / "noop.py").write_text("def run(instance, save_callback, state):\n    return None\n")
    (folder / "big.batch").write_text(json.dumps({"instances": ["data/*.txt"]}))
    exp = folder / "big.experiment"
    fields = {"load": "noop.py", "batch": "big.batch", "iterations": iterations}
    exp.write_text(json.dumps(fields))
    (folder / "copy").mkdir()  # the same experiment, for a copy of its state
    copy = {**fields, "load": "../noop.py", "batch": "../big.batch"}
    (folder / "copy" / "big.experiment").write_text(json.dumps(copy))
    spec = alma.experiment.load(exp).spec
    store = Store(spec.state_path, spec.name)
    ids, configs = store.open_writer(
        spec.instances, spec.paths, spec.params, spec.iterations, spec.code_hash
    )
    rng, now, rows = random.Random(0), time.time(), []
    for name in spec.instances:
        for it in range(iterations):
            result = {"cut": rng.randint(0, 500), "ratio": rng.random(), "name": name[-9:]}
            rows.append(
                (ids[name], configs["{}"], it, "done", json.dumps(result), None, None, 1,
                 rng.random(), now, spec.code_hash, seed_of(name, it, "{}", 0), 0)
            )  # fmt: skip
            if len(rows) == 100_000:
                store.write(rows, [], [])
                rows = []
    store.write(rows, [], [])
    store.close()
    return exp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"alma results benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        exp = build(Path(tmp), 1000, args.runs // 1000)
        seen: dict[str, list[dict[str, float]]] = {c: [] for c in CONTENDERS}
        for r in range(args.rounds):
            order = CONTENDERS[r % 5 :] + CONTENDERS[: r % 5]
            for what in order:
                target = exp
                if what.startswith("alma, re-read"):
                    target = exp.parent / "copy" / exp.name
                    shutil.copyfile(f"{exp}.sqlite", f"{target}.sqlite")
                out = subprocess.run(
                    [sys.executable, "-c", MEASURE, what, str(target)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                seen[what].append(json.loads(out.stdout.strip().splitlines()[-1]))
    sql = statistics.median(m["s"] for m in seen["read_sql_query"])
    print(f"\n{args.runs:,} finished runs, 3-key dict results, {args.rounds} rounds (medians)")
    print(f"  {'':<20}{'seconds':>9}{'/ read_sql':>12}{'peak MB':>10}{'rows':>10}")
    for what in CONTENDERS:
        s = statistics.median(m["s"] for m in seen[what])
        mb = statistics.median(m["mb"] for m in seen[what])
        rows = seen[what][0]["rows"]
        print(f"  {what:<20}{s:>9.3f}{s / sql:>12.3f}{mb:>10.0f}{rows:>10,}")
    print("  (re-read: d.results again after 1,000 runs were committed; rows = the new ones;")
    print("   again: after 1,000 more, the frame read last being itself a re-read's)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
