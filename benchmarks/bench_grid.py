"""Parameter grids must not slow alma down: dispatch with a grid, and a big grid state.

Run it with ``python benchmarks/bench_grid.py`` (about a minute and a half on 2 cores;
``--quick`` for a few seconds). benchmarks/README.md quotes a measured run.

(a) Throughput. 20,000 no-op runs on 3 workers, in interleaved rounds (the order
    rotates), medians over the rounds:

    * alma without ``"params"``: 100 files x 200 iterations;
    * alma with a 4-configuration grid: 100 files x 4 configurations x 50 iterations
      (the run declares the grid's two parameters and ``seed``, so each run gets them);
    * a bare ``concurrent.futures.ThreadPoolExecutor(3)`` making the same 20,000 calls.

    The grid must keep alma's ratio to the bare pool.

(b) Scale. A state of 1,000,000 finished runs over 10 configurations (100 files x 10
    configurations x 1,000 iterations), built by alma itself, then, in a fresh
    subprocess: ``alma.experiment.load()`` + ``.progress`` (target: about a second).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORKERS = 3
GRID = {"restarts": [1, 10], "cooling": [0.9, 0.99]}


def noop(instance: str, save_callback: Any, state: Any) -> None:
    return None


def noop_grid(
    instance: str, save_callback: Any, state: Any, restarts: int, cooling: float, seed: int
) -> None:
    return None


def bench_alma(files: list[str], iterations: int, state: Path, grid: bool) -> float:
    import alma

    t0 = time.perf_counter()
    d = alma.Experiment(
        run=noop_grid if grid else noop,
        instances=files,
        iterations=iterations,
        workers=WORKERS,
        state=str(state),
        params=GRID if grid else None,
    )
    d.start()
    finished = d.join()
    elapsed = time.perf_counter() - t0
    assert finished and d.progress.done == d.progress.total, d.progress
    d.close()
    return elapsed


def bench_tpe(files: list[str], runs: int) -> float:
    calls = list(itertools.islice(itertools.cycle(files), runs))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for _ in pool.map(noop, calls, itertools.repeat(None), itertools.repeat(None)):
            pass
    return time.perf_counter() - t0


def throughput(tmp: Path, runs: int, rounds: int) -> dict[str, float]:
    data = tmp / "small"
    data.mkdir()
    files = []
    for i in range(100):
        (data / f"f{i:03d}.txt").write_text(str(i))
        files.append(str(data / f"f{i:03d}.txt"))
    per_file = runs // len(files)
    configs = len(GRID["restarts"]) * len(GRID["cooling"])
    print(f"\n(a) {runs:,} no-op runs, {WORKERS} workers, {rounds} interleaved rounds")
    print(f"    {'round':<7}{'no grid':>12}{'4-config':>12}{'TPE':>12}   (runs/s)")
    contenders: dict[str, Callable[[int], float]] = {
        "plain": lambda r: bench_alma(files, per_file, tmp / f"p{r}.sqlite", grid=False),
        "grid": lambda r: bench_alma(files, per_file // configs, tmp / f"g{r}.sqlite", True),
        "tpe": lambda r: bench_tpe(files, runs),
    }
    names = list(contenders)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        rate = {}
        for name in names[r % 3 :] + names[: r % 3]:
            rate[name] = runs / contenders[name](r)
            rates[name].append(rate[name])
        print(f"    {r + 1:<7}" + "".join(f"{rate[k]:>12,.0f}" for k in names))
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"    {'median':<7}" + "".join(f"{median[k]:>12,.0f}" for k in names))
    print(
        f"    alma / TPE: no grid {median['plain'] / median['tpe']:.2f}, "
        f"4-configuration grid {median['grid'] / median['tpe']:.2f}"
    )
    return median


MEASURE = """
import json, sys, time
t0 = time.perf_counter()
import alma.experiment
t1 = time.perf_counter()
d = alma.experiment.load(sys.argv[1])
p = d.progress
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "done": p.done, "total": p.total}))
"""


def scale(tmp: Path, instances: int, iterations: int) -> None:
    folder = tmp / "big"
    (folder / "data").mkdir(parents=True)
    for i in range(instances):
        (folder / "data" / f"g{i:04d}.txt").write_text(str(i))
    (folder / "noop.py").write_text(
        "def run(instance, save_callback, state, k):\n    return None\n"
    )
    (folder / "big.batch").write_text(json.dumps({"instances": ["data/*.txt"]}))
    exp = folder / "big.experiment"
    fields = {
        "load": "noop.py",
        "batch": "big.batch",
        "iterations": iterations,
        "workers": WORKERS,
        "params": {"k": list(range(10))},
    }
    exp.write_text(json.dumps(fields))
    runs = instances * 10 * iterations
    print(f"\n(b) {runs:,} finished runs over 10 configurations")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alma", "run", "-q", str(exp)], check=True)
    build = time.perf_counter() - t0
    print(f"    built by alma run in {build:.1f} s ({runs / build:,.0f} runs/s, with startup)")
    loads = []
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(exp)], capture_output=True, text=True, check=True
        )
        loads.append(json.loads(out.stdout))
    assert all(m["done"] == runs for m in loads), loads
    best = min(m["load"] for m in loads)
    print(
        f"    load() + progress in a fresh process: best of 3 {best:.2f} s "
        f"(import alma {min(m['import'] for m in loads):.2f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"alma grid benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            throughput(Path(tmp), 4_000, 3)
            scale(Path(tmp), 10, 100)
        else:
            throughput(Path(tmp), 20_000, 7)
            scale(Path(tmp), 100, 1_000)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
