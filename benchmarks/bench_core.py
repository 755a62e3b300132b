"""Core benchmarks of alma: dispatch throughput against peers, and a 1,000,000-run state.

Run it with ``python benchmarks/bench_core.py`` (about a minute on 2 cores) or add
``--quick`` for a smaller version (a few seconds). It prints everything it measures;
benchmarks/README.md explains each number and quotes a measured run.

(a) Throughput. The same no-op ``run(instance, save_callback, state)`` is called N times
    (100 files x N/100 iterations, 3 workers) by:

    * alma: ``alma.Experiment(...)`` on a fresh SQLite state file, ``start()``, ``join()``;
      every run is committed to the state file before it counts as done, and the script
      checks afterwards, from a freshly constructed dispatcher, that all N are there;
    * a bare ``concurrent.futures.ThreadPoolExecutor(3)`` (``map``; nothing persisted);
    * ``joblib.Parallel(n_jobs=3, prefer="threads")`` (nothing persisted).

    The three alternate within each round (the order rotates between rounds, so none
    always runs first); the ratios use each contender's median over the rounds, which
    neither rewards a lucky round nor punishes one that other processes slowed.

(b) Scale. A state with 1000 instances x 1000 iterations = 1,000,000 finished runs is built
    by running alma itself with a no-op run (so its build time is a second throughput
    figure). Then, each in a fresh subprocess so that timings and peak memory are clean:
    ``alma.experiment.load()`` + ``.progress``; ``start()`` + ``join()`` on the finished
    state (the time alma needs to find out that nothing is owed); ``.results`` (a
    DataFrame of 1,000,000 rows). Peak memory is the subprocess's ru_maxrss.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

TPE_TARGET = 0.9  # issue 12: at least 0.9x a bare ThreadPoolExecutor, committing every run
JOBLIB_TARGET = 1.0  # ... and at least joblib's (threads backend)
WORKERS = 3


def noop(instance: str, save_callback: Any, state: Any) -> None:
    """The run function every contender calls: it does nothing, so dispatch is measured."""
    return None


# -- (a) throughput ---------------------------------------------------------------------


def bench_alma(files: list[str], iterations: int, state: Path) -> float:
    """Seconds from building the Experiment to join() returning, all runs committed."""
    import alma

    t0 = time.perf_counter()
    dispatcher = alma.Experiment(
        run=noop, instances=files, iterations=iterations, workers=WORKERS, state=str(state)
    )
    dispatcher.start()
    finished = dispatcher.join()
    elapsed = time.perf_counter() - t0
    dispatcher.close()
    assert finished, dispatcher.progress
    return elapsed


def check_persisted(files: list[str], iterations: int, state: Path) -> int:
    """Read the state back through a freshly built dispatcher (new SQLite connection)."""
    import alma

    with alma.Experiment(
        run=noop, instances=files, iterations=iterations, workers=WORKERS, state=str(state)
    ) as fresh:
        return fresh.progress.done


def bench_tpe(files: list[str], iterations: int) -> float:
    """Seconds for a bare ThreadPoolExecutor to make the same calls (nothing persisted)."""
    calls = files * iterations
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for _ in pool.map(noop, calls, itertools.repeat(None), itertools.repeat(None)):
            pass
    return time.perf_counter() - t0


def bench_joblib(files: list[str], iterations: int) -> float:
    """Seconds for joblib's threading backend to make the same calls (nothing persisted)."""
    import joblib

    calls = files * iterations
    t0 = time.perf_counter()
    joblib.Parallel(n_jobs=WORKERS, prefer="threads")(
        joblib.delayed(noop)(f, None, None) for f in calls
    )
    return time.perf_counter() - t0


def throughput(tmp: Path, runs: int, rounds: int) -> dict[str, float]:
    """Part (a): median runs/s of each contender over interleaved rounds."""
    data = tmp / "small"
    data.mkdir()
    files = []
    for i in range(100):
        f = data / f"file{i:03d}.txt"
        f.write_text(f"instance {i}\n")
        files.append(str(f))
    iterations = runs // len(files)
    n = iterations * len(files)
    print(f"\n(a) {n:,} no-op runs, {WORKERS} workers, {rounds} interleaved rounds")
    print(f"    {'round':<7}{'alma':>12}{'TPE':>12}{'joblib':>12}   (runs/s)")
    contenders: dict[str, Callable[[int], float]] = {
        "alma": lambda r: bench_alma(files, iterations, tmp / f"bench{r}.sqlite"),
        "tpe": lambda r: bench_tpe(files, iterations),
        "joblib": lambda r: bench_joblib(files, iterations),
    }
    names = list(contenders)
    rates: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        rate: dict[str, float] = {}
        for name in names[r % 3 :] + names[: r % 3]:  # rotate who goes first
            before = reset_peak()
            rate[name] = n / contenders[name](r)
            rates[name].append(rate[name])
            if before >= 0:
                peaks[name].append(peak_mb() - before)
        print(f"    {r + 1:<7}" + "".join(f"{rate[k]:>12,.0f}" for k in names))
        persisted = check_persisted(files, iterations, tmp / f"bench{r}.sqlite")
        if persisted != n:
            sys.exit(f"FAIL: alma persisted {persisted} runs, expected {n}")
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"    {'best':<7}" + "".join(f"{max(rates[k]):>12,.0f}" for k in names))
    print(f"    {'median':<7}" + "".join(f"{median[k]:>12,.0f}" for k in names))
    if all(peaks.values()):
        print(
            f"    {'peak MB':<7}"
            + "".join(f"{statistics.median(peaks[k]):>12.1f}" for k in names)
            + "   (median; above the RSS at its start, all in this process)"
        )
    print(f"    alma persisted all {n:,} runs in every round (read back from a fresh load)")
    return median


# -- (b) a state with many finished runs ------------------------------------------------


def write_big_experiment(folder: Path, instances: int, iterations: int) -> None:
    """Write an experiment on disk: ``instances`` small files, a no-op run module."""
    data = folder / "data"
    data.mkdir(parents=True)
    for i in range(instances):
        (data / f"g{i:05d}.txt").write_text(f"{i}\n")
    (folder / "noop.py").write_text("def run(instance, save_callback, state):\n    return None\n")
    (folder / "big.batch").write_text(json.dumps({"instances": ["data/*.txt"]}))
    experiment = {"load": "noop.py", "batch": "big.batch", "iterations": iterations}
    experiment["workers"] = WORKERS
    (folder / "big.experiment").write_text(json.dumps(experiment))


def reset_peak() -> float:
    """Reset this process's peak resident memory to its current size (Linux 4.0 and
    later: "5" into /proc/self/clear_refs) and return that size in MB; -1 where it
    cannot be (the peak MB row is then left out)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1.0
    return peak_mb()


def peak_mb() -> float:
    """Peak resident memory of this process, in MB.

    VmHWM rather than ru_maxrss where there is one: a child started by ``subprocess``
    inherits its parent's ru_maxrss (the RSS of the parent's image at exec), which
    would make a small parent's child look as big as the benchmark process itself.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(folder: str, what: str) -> dict[str, Any]:
    """In a fresh subprocess: time one operation on the big state, with peak memory."""
    t0 = time.perf_counter()
    import pandas  # noqa: F401 - imported up front so it is not part of the timed step

    import alma.experiment

    out: dict[str, Any] = {"import_s": time.perf_counter() - t0}
    out["base_mb"] = peak_mb()
    t0 = time.perf_counter()
    dispatcher = alma.experiment.load(Path(folder) / "big.experiment")
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = dispatcher.progress
    out["progress_s"] = time.perf_counter() - t0
    out["done"] = p.done
    if what == "start":
        t0 = time.perf_counter()
        dispatcher.start()
        out["finished"] = dispatcher.join()
        out["start_join_s"] = time.perf_counter() - t0
        out["done_after"] = dispatcher.progress.done
    elif what == "results":
        t0 = time.perf_counter()
        frame = dispatcher.results
        out["results_s"] = time.perf_counter() - t0
        out["rows"] = len(frame)
    dispatcher.close()
    out["peak_mb"] = peak_mb()
    return out


def in_subprocess(folder: Path, what: str) -> dict[str, Any]:
    """Run :func:`measure` in a new interpreter and return what it printed."""
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", what, str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        sys.exit(f"FAIL: measuring {what}:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scale(tmp: Path, instances: int, iterations: int) -> dict[str, Any]:
    """Part (b): build the big state, then time load/progress, start+join and results."""
    total = instances * iterations
    print(
        f"\n(b) a state with {instances:,} instances x {iterations:,} iterations = {total:,} runs"
    )
    folder = tmp / "big"
    write_big_experiment(folder, instances, iterations)
    built = in_subprocess(folder, "start")  # runs all of them: builds the state
    if built["done_after"] != total:
        sys.exit(f"FAIL: building the big state ended with {built['done_after']} done runs")
    build = built["start_join_s"]
    size = sum(f.stat().st_size for f in folder.glob("big.experiment.sqlite*")) / 2**20
    print(
        f"    built by running alma with a no-op run (in a subprocess): {build:.1f} s "
        f"({total / build:,.0f} runs/s), peak RSS {built['peak_mb']:.0f} MB; "
        f"state file {size:.0f} MB with its WAL"
    )
    loads = [in_subprocess(folder, "load") for _ in range(2)]
    load = min(loads, key=lambda m: m["load_s"])
    start = in_subprocess(folder, "start")
    results = in_subprocess(folder, "results")
    for m in (*loads, start, results):
        if m["done"] != total:
            sys.exit(f"FAIL: a fresh load saw {m['done']} done runs, expected {total}")
    if not start["finished"] or results["rows"] != total:
        sys.exit(f"FAIL: start/join or results disagree: {start} {results}")
    print(f"    {'step (fresh process each)':<44}{'time':>9}{'peak RSS':>11}{'above base':>12}")

    def mem(m: dict[str, Any]) -> tuple[float, float]:
        return m["peak_mb"], m["peak_mb"] - m["base_mb"]

    rows = [
        ("import alma + pandas", load["import_s"], load["base_mb"], 0.0),
        ("alma.experiment.load()", load["load_s"], None, None),
        (".progress (after load)", load["progress_s"], None, None),
        ("load + progress, whole process", None, *mem(load)),
        (".start() + .join(), nothing owed", start["start_join_s"], *mem(start)),
        (f".results ({total:,} rows)", results["results_s"], *mem(results)),
    ]
    for label, secs, peak, above in rows:
        t = f"{secs:8.3f}s" if secs is not None else ""
        pk = f"{peak:8.0f} MB" if peak is not None else ""
        ab = f"{above:9.0f} MB" if above is not None else ""
        print(f"    {label:<44}{t:>9}{pk:>11}{ab:>12}")
    return {"build_s": build, "load": load, "start": start, "results": results}


# -- main -------------------------------------------------------------------------------


def loadavg() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a few seconds")
    parser.add_argument("--rounds", type=int, help="rounds of part (a) (default 5, quick 3)")
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        what, folder = args.measure
        print(json.dumps(measure(folder, what)))
        return 0
    runs, rounds = (5_000, 3) if args.quick else (20_000, 5)
    instances, iterations = (200, 500) if args.quick else (1000, 1000)
    rounds = args.rounds or rounds
    import joblib

    print(
        f"alma core benchmark{' (--quick)' if args.quick else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"joblib {joblib.__version__}"
    )
    print(f"load average before (1/5/15 min): {loadavg()}")
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="alma-bench-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning from alma here would be a bug
            median = throughput(tmp, runs, rounds)
            scale(tmp, instances, iterations)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r_tpe, r_joblib = median["alma"] / median["tpe"], median["alma"] / median["joblib"]
    verdict = {True: "meets target", False: "BELOW target"}
    print("\nratios (median runs/s over the rounds):")
    print(
        f"    alma / ThreadPoolExecutor = {r_tpe:.2f}  "
        f"(target >= {TPE_TARGET}: {verdict[r_tpe >= TPE_TARGET]})"
    )
    print(
        f"    alma / joblib threads     = {r_joblib:.2f}  "
        f"(target >= {JOBLIB_TARGET}: {verdict[r_joblib >= JOBLIB_TARGET]})"
    )
    total = time.perf_counter() - t_all
    print(f"\nload average after (1/5/15 min): {loadavg()}; total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
