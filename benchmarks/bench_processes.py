"""alma's processes executor against the process pools people use instead, on tiny runs.

Run it with ``python benchmarks/bench_processes.py`` (about three minutes on 2 cores) or
add ``--quick`` for a smaller version. For runs of 0, 0.1, 1 and 10 ms (a busy loop:
CPU-bound, like pure Python), 2 workers each:

* **alma**: ``alma.Experiment(run=..., executor="processes", workers=2)`` on a fresh
  state file, ``start()``, ``join()``; every run is committed before it counts as done,
  and the script reads the state back (a fresh dispatcher) to check that all are there;
* **loky**: ``joblib.Parallel(n_jobs=2, backend="loky")`` (auto-batching);
* **PPE 1**: ``concurrent.futures.ProcessPoolExecutor(2).map(..., chunksize=1)``;
* **PPE auto**: the same with ``chunksize = ceil(runs / (4 x workers))``, the rule
  ``multiprocessing.Pool.map`` uses when given none;
* **PPE 1 fs**: PPE 1 with ``mp_context=multiprocessing.get_context("forkserver")``,
  the default start method on Linux from Python 3.14 on. The others fork the measuring
  process, so their workers start with everything already imported; a forkserver's
  workers, like alma's, start from a fresh interpreter (alma does not fork: forking a
  process that has threads, as a Jupyter kernel always does, is unsafe). Put next to
  PPE 1, it shows what of a difference is start-up.

The peers keep results in memory and persist nothing. Each measurement runs in a fresh
Python process with the libraries imported before the clock starts (alma's dispatcher
and executor modules too, which ``import alma`` loads only on first use: about 80 ms
that the timings before 2026-12-02 02:40 UTC counted against alma), so start-up
(worker processes included) is timed for everyone and memory is its own; a first line times
10 no-op runs, which is little but start-up. ``peak MB`` is the measuring process's
peak resident memory (VmHWM) plus the peak of each of its worker processes (sampled
every 20 ms). The contenders
alternate within each round (the order rotates); ratios use each one's median runs/s.
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORKERS = 2
CONTENDERS = ["alma", "loky", "ppe1", "ppe_auto", "ppe1_fs"]
LABELS = {
    "alma": "alma",
    "loky": "loky",
    "ppe1": "PPE 1",
    "ppe_auto": "PPE auto",
    "ppe1_fs": "PPE 1 fs",
}
#: Run lengths (ms) and how many runs each, full and --quick.
SIZES = {0.0: 20_000, 0.1: 10_000, 1.0: 4_000, 10.0: 600}
QUICK = {0.0: 4_000, 0.1: 2_000, 1.0: 400, 10.0: 60}

WORK_MODULE = '''
import time

SECONDS = {seconds!r}

def work(i):
    """Busy for SECONDS: CPU-bound, as pure Python is."""
    if SECONDS:
        end = time.perf_counter() + SECONDS
        while time.perf_counter() < end:
            pass
    return i

def run(instance, save_callback, state, iteration):
    return work(iteration)
'''


class PeakMemory:
    """Peak RSS of this process plus the peak of every worker process it started.

    The sampler runs in the measuring process, whose GIL alma's dispatcher needs on
    tiny runs, so it reads the kernel's lists of child processes (a few µs) rather
    than scanning every process (psutil's ``children()``: about 1 ms per sample, 5% of
    that GIL at one sample per 20 ms).
    """

    def __init__(self) -> None:
        self._peaks: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            for pid in _descendants(os.getpid()):
                try:
                    mb = _vmhwm(pid)
                except OSError:  # ended in between
                    continue
                self._peaks[pid] = max(self._peaks.get(pid, 0.0), mb)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        workers = sum(self._peaks.values())
        parent = _vmhwm(os.getpid())
        return {"parent_mb": parent, "workers_mb": workers, "peak_mb": parent + workers}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc/<pid>/task/<tid>/children (Linux)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:  # ended in between
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _vmhwm(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM")


def measure(contender: str, folder: str, runs: int) -> dict[str, Any]:
    """In a fresh process: time ``runs`` calls by one contender, with peak memory."""
    sys.path.insert(0, folder)
    # Libraries are imported before the clock starts: dispatch is measured, not imports.
    # alma and concurrent.futures load their machinery on first use (PEP 562), so that
    # is imported here too: what each contender's first call would import.
    import concurrent.futures.process
    import multiprocessing

    import joblib
    import work  # the module written for this run length
    from joblib.externals.loky import get_reusable_executor

    import alma
    import alma.executors.processes
    import alma.experiment

    memory = PeakMemory()
    t0 = time.perf_counter()
    if contender == "alma":
        files = [str(Path(folder) / f"f{i}.txt") for i in range(10)]
        state = Path(folder) / f"alma-{time.time_ns()}.sqlite"
        d = alma.Experiment(
            run=work.run,
            instances=files,
            iterations=runs // len(files),
            workers=WORKERS,
            executor="processes",
            state=str(state),
        )
        d.start()
        assert d.join(timeout=600), d.progress
        elapsed = time.perf_counter() - t0
        d.close()
        with alma.Experiment(
            run=work.run, instances=files, iterations=runs // len(files), state=str(state)
        ) as fresh:
            assert fresh.progress.done == runs, fresh.progress
    elif contender == "loky":
        out = joblib.Parallel(n_jobs=WORKERS, backend="loky")(
            joblib.delayed(work.work)(i) for i in range(runs)
        )
        elapsed = time.perf_counter() - t0
        get_reusable_executor().shutdown(wait=True)
        assert len(out) == runs
    else:
        chunk = math.ceil(runs / (4 * WORKERS)) if contender == "ppe_auto" else 1
        context = multiprocessing.get_context("forkserver" if contender == "ppe1_fs" else "fork")
        with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context) as pool:
            n = sum(1 for _ in pool.map(work.work, range(runs), chunksize=chunk))
        elapsed = time.perf_counter() - t0
        assert n == runs
    return {"seconds": elapsed, **memory.stop()}


def in_subprocess(contender: str, folder: Path, runs: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", contender, str(folder), str(runs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        sys.exit(f"FAIL: {contender} in {folder}:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def loadavg() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, one round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument(
        "--ms", type=float, nargs="*", help="only these run lengths (ms): 0, 0.1, 1, 10"
    )
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        contender, folder, runs = args.measure
        print(json.dumps(measure(contender, folder, int(runs))))
        return 0
    import joblib

    import alma

    # Worker processes import alma inside the clock: with its bytecode compiled, as
    # after a pip install, even where PYTHONDONTWRITEBYTECODE keeps Python from
    # writing it (an editable install would otherwise compile alma in every worker).
    compileall.compile_dir(Path(alma.__file__).parent, quiet=1)
    sizes = QUICK if args.quick else SIZES
    if args.ms:
        sizes = {ms: n for ms, n in sizes.items() if ms in args.ms}
    rounds = args.rounds or (1 if args.quick else 3)
    print(
        f"alma processes benchmark{' (--quick)' if args.quick else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, joblib {joblib.__version__}; {WORKERS} workers, "
        f"{rounds} round(s), medians"
    )
    print(f"load average before (1/5/15 min): {loadavg()}")
    header = "".join(f"{LABELS[c]:>20}" for c in CONTENDERS)
    print(f"\n{'run':>7} {'runs':>7}{header}   (runs/s, peak MB)")
    ratios: dict[float, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="alma-bench-proc-") as tmp:
        # Fixed costs first: 10 no-op runs measure starting the workers (and for alma,
        # creating the state file), which longer experiments pay once.
        folder = Path(tmp) / "startup"
        folder.mkdir()
        (folder / "work.py").write_text(WORK_MODULE.format(seconds=0.0))
        for i in range(10):
            (folder / f"f{i}.txt").write_text(f"{i}\n")
        startup = {
            c: statistics.median(in_subprocess(c, folder, 10)["seconds"] for _ in range(rounds))
            for c in CONTENDERS
        }
        cells = "".join(f"{startup[c]:>18.3f} s" for c in CONTENDERS)
        print(f"{'start-up':>7} {10:>7}{cells}   (seconds for 10 no-op runs)", flush=True)
        for ms, runs in sizes.items():
            folder = Path(tmp) / f"ms{ms:g}"
            folder.mkdir()
            (folder / "work.py").write_text(WORK_MODULE.format(seconds=ms / 1000))
            for i in range(10):
                (folder / f"f{i}.txt").write_text(f"{i}\n")
            rates: dict[str, list[float]] = {c: [] for c in CONTENDERS}
            peaks: dict[str, list[float]] = {c: [] for c in CONTENDERS}
            for r in range(rounds):
                for c in CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]:
                    m = in_subprocess(c, folder, runs)
                    rates[c].append(runs / m["seconds"])
                    peaks[c].append(m["peak_mb"])
            med = {c: statistics.median(rates[c]) for c in CONTENDERS}
            cells = "".join(
                f"{med[c]:>12,.0f} {statistics.median(peaks[c]):>5.0f}MB" for c in CONTENDERS
            )
            print(f"{ms:>5g}ms {runs:>7,}{cells}", flush=True)
            ratios[ms] = {c: med["alma"] / med[c] for c in CONTENDERS[1:]}
    print("\nalma / peer (median runs/s); targets: >= 1.0 vs loky on 0 ms, >= 1.0 vs PPE 1")
    print(f"{'run':>7}" + "".join(f"{LABELS[c]:>12}" for c in CONTENDERS[1:]))
    for ms, rs in ratios.items():
        print(f"{ms:>5g}ms" + "".join(f"{rs[c]:>12.2f}" for c in CONTENDERS[1:]))
    print(f"\nload average after (1/5/15 min): {loadavg()}")
    return 0


if __name__ == "__main__":  # the process pools re-import this module in their workers
    sys.exit(main())
