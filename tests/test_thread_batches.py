"""The threads executor takes short runs a few at a time and reports them in batches;
every run still counts once, only once committed, and a stop gives back the runs
queued but not started."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import make_files, wait_until

import alma


def test_stop_gives_back_the_queued_runs_and_each_run_executes_once(
    tmp_path: Path, dispatchers: list[Any]
) -> None:
    calls: Counter[int] = Counter()
    gate = threading.Event()

    def run(instance: str, save_callback: Any, state: Any, iteration: int) -> int:
        calls[iteration] += 1
        while iteration == 500 and not gate.is_set():  # held until the stop interrupts it
            save_callback({"waiting": True})
            time.sleep(0.01)
        return iteration

    d = alma.Experiment(
        run=run, instances=make_files(tmp_path, 1), iterations=1000, state=tmp_path / "s.sqlite"
    )
    dispatchers.append(d)
    d.start()
    wait_until(lambda: d.progress.done == 500, timeout=30)  # all before it, committed
    t0 = time.monotonic()
    assert d.stop(timeout=10) is True
    assert time.monotonic() - t0 < 2.0
    p = d.progress
    assert (p.done, p.failed, p.running, p.pending) == (500, 0, 0, 500)
    gate.set()
    d.start()
    assert d.join(timeout=30) is True
    r = d.results
    assert len(r) == 1000 and (r["status"] == "done").all()
    assert calls[500] == 2  # interrupted by the stop, then run again
    assert set((calls - Counter({500: 2})).values()) == {1}  # the queued ones: once each
    # Reported in batches, each run still carries the time it ended, in plan order.
    finished = r.sort_values("iteration")["finished"]
    assert finished.is_monotonic_increasing
