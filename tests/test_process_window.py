"""The processes executor's window: each worker process holds a few runs ahead when
runs are short, and every per-run promise still holds for the runs in that window.

A run that crashes its worker fails alone (the runs queued behind it in the dead
process run in a fresh one, once each); a run over ``timeout`` fails alone (the clock of
a queued run starts when it starts, not when it was sent); ``stop()`` with a full window
ends at once and leaves every unfinished run owed, none failed. Every run module logs
each attempt, so a run executed twice or never would show.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, wait_until

import alma.experiment
from alma.executors import processes, worker

#: Each attempt appends "iteration pid" to attempts.log next to the data files.
LOGGING_RUN = """
import os
import pathlib
import signal
import time

def run(instance, save_callback, state, iteration):
    data = pathlib.Path(instance).parent
    with open(data / "attempts.log", "a") as f:  # one short write: lines do not mix
        f.write(f"{{iteration}} {{os.getpid()}}\\n")
    {body}
    return iteration
"""


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the batches of runs the drivers send their worker processes: proof that
    a test's runs went out several at a time, so the window is what is under test."""
    sizes: list[int] = []
    send = worker.Pipe.send

    def spy(self: worker.Pipe, obj: Any) -> None:
        if isinstance(obj, list):
            sizes.append(len(obj))
        send(self, obj)

    monkeypatch.setattr(worker.Pipe, "send", spy)
    return sizes


def _attempts(data: Path) -> Counter[int]:
    lines = (data / "attempts.log").read_text().split()
    return Counter(int(it) for it in lines[::2])


def _load(exp: Path, dispatchers: list[Any]) -> Any:
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    return d


def test_a_crash_in_a_window_fails_only_the_run_that_crashed(
    make_experiment: ExperimentFactory, dispatchers: list[Any], batches: list[int]
) -> None:
    body = "if iteration == 150:\n        os._exit(3)"
    exp = make_experiment(
        LOGGING_RUN.format(body=body), instances=1, iterations=400, executor="processes"
    )
    d = _load(exp, dispatchers)
    d.start()
    assert d.join(timeout=60) is True
    assert max(batches) > 1, batches  # runs were queued behind the one that crashed
    r = d.results.set_index("iteration")
    assert r.loc[150, "status"] == "failed" and "exit code 3" in r.loc[150, "error"]
    rest = r.drop(index=150)
    assert len(rest) == 399 and (rest["status"] == "done").all()
    assert (r["attempts"] == 1).all()
    assert set(_attempts(exp.parent / "data").values()) == {1}  # each run executed once


def test_a_timeout_in_a_window_fails_only_the_run_over_time(
    make_experiment: ExperimentFactory, dispatchers: list[Any], batches: list[int]
) -> None:
    body = "if iteration == 150:\n        time.sleep(60)"
    exp = make_experiment(
        LOGGING_RUN.format(body=body),
        instances=1,
        iterations=400,
        executor="processes",
        timeout=0.5,
        retries=1,
    )
    d = _load(exp, dispatchers)
    t0 = time.monotonic()
    d.start()
    assert d.join(timeout=60) is True
    assert time.monotonic() - t0 < 30
    assert max(batches) > 1, batches
    r = d.results.set_index("iteration")
    slow = r.loc[150]
    assert slow["status"] == "failed" and slow["error"].startswith("TimeoutError")
    assert slow["attempts"] == 2  # each attempt got the whole timeout
    rest = r.drop(index=150)
    assert len(rest) == 399 and (rest["status"] == "done").all()
    assert (rest["attempts"] == 1).all()
    attempts = _attempts(exp.parent / "data")
    assert attempts[150] == 2 and set((attempts - Counter({150: 2})).values()) == {1}


def test_stop_with_a_full_window_ends_at_once_and_owes_the_rest(
    make_experiment: ExperimentFactory, dispatchers: list[Any], batches: list[int]
) -> None:
    body = 'if iteration == 200 and (data / "hold").exists():\n        time.sleep(60)'
    exp = make_experiment(
        LOGGING_RUN.format(body=body), instances=1, iterations=400, executor="processes"
    )
    data = exp.parent / "data"
    (data / "hold").touch()
    d = _load(exp, dispatchers)
    d.start()
    wait_until(lambda: d.progress.done == 200, timeout=30)
    p = d.progress  # the held run runs; those queued behind it in its window wait
    assert (p.done, p.running, p.pending) == (200, 1, 199)
    assert [(r.instance, r.iteration) for r in d.in_flight] == [("data/file0.txt", 200)]
    t0 = time.monotonic()
    assert d.stop(timeout=10) is True
    assert time.monotonic() - t0 < 2.0
    p = d.progress
    assert (p.done, p.failed, p.running, p.pending) == (200, 0, 0, 200)
    (data / "hold").unlink()
    d.start()
    assert d.join(timeout=60) is True
    r = d.results
    assert len(r) == 400 and (r["status"] == "done").all()
    attempts = _attempts(data)
    assert attempts[200] == 2  # held, killed by the stop, then run again
    assert set((attempts - Counter({200: 2})).values()) == {1}  # queued ones: once each


def test_a_crash_in_a_window_is_retried_from_the_checkpoint_it_saved(
    make_experiment: ExperimentFactory, dispatchers: list[Any], batches: list[int]
) -> None:
    """The run that crashed is retried in a fresh worker process, resuming from the
    checkpoint it saved before the crash; the runs queued behind it run once each."""
    body = (
        "if iteration == 150 and state is None:\n"
        '        save_callback({"before": "the crash"})\n'
        "        os._exit(3)\n"
        "    if state is not None:\n"
        "        return state"
    )
    exp = make_experiment(
        LOGGING_RUN.format(body=body),
        instances=1,
        iterations=400,
        executor="processes",
        retries=1,
    )
    d = _load(exp, dispatchers)
    d.start()
    assert d.join(timeout=60) is True
    assert max(batches) > 1, batches
    r = d.results.set_index("iteration")
    assert (r["status"] == "done").all() and len(r) == 400
    assert r.loc[150, "attempts"] == 2 and r.loc[150, "before"] == "the crash"
    assert (r.drop(index=150)["attempts"] == 1).all()
    attempts = _attempts(exp.parent / "data")
    assert attempts[150] == 2 and set((attempts - Counter({150: 2})).values()) == {1}


class _Source:
    """A session with an endless plan, as a worker slot sees it."""

    def __init__(self) -> None:
        self.handed = 0

    def next_tasks(self, n: int) -> list[Any]:
        self.handed += n
        return [object()] * n


@pytest.mark.parametrize(
    ("seconds", "window"),
    [
        (None, 1),  # nothing measured yet: one run, then the outcome says how long
        (0.0, processes.MAX_WINDOW),  # no-op runs: as many as the window holds
        (0.01, 2),  # 10 ms: one run queued behind the running one, never idle
        (processes.LONG_RUN, 1),  # long runs: none queued behind them
    ],
)
def test_the_window_is_sized_from_how_long_runs_take(seconds: float | None, window: int) -> None:
    slot = processes._Slot(None, _Source())  # type: ignore[arg-type]
    slot.mean = seconds
    slot.fill()
    assert len(slot.window) == window
    # The running run ends: the window is topped up once it is half empty, so the
    # runs go out several per message and the worker always has the next one.
    slot.window.popleft()
    slot.fill()
    assert len(slot.window) == (window if window <= 2 else window - 1)
    for _ in range(window // 2):
        slot.window.popleft()
    slot.fill()
    assert len(slot.window) == window


def test_workers_import_the_alma_the_dispatcher_runs(
    make_experiment: ExperimentFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``alma`` folder in the current folder (a clone, a project's own package) is
    not what the workers import: they would fail to start, or run other code."""
    elsewhere = tmp_path / "cwd"
    (elsewhere / "alma").mkdir(parents=True)
    (elsewhere / "alma" / "__init__.py").write_text("raise ImportError('not this alma')\n")
    monkeypatch.chdir(elsewhere)
    exp = make_experiment(instances=2, iterations=2, workers=2, executor="processes")
    d = alma.experiment.load(exp)
    d.start()
    assert d.join(timeout=60) is True
    assert (d.progress.done, d.progress.failed) == (4, 0), d.last_error
    d.close()


@pytest.mark.parametrize("executor", ["processes", "threads"])
def test_runs_queued_in_a_window_are_pending_not_running(
    make_experiment: ExperimentFactory, dispatchers: list[Any], executor: str
) -> None:
    """Short runs go out several at a time to each worker; only the one it executes
    counts as running (``progress``, ``in_flight``, ``state``), never more than the
    workers."""
    exp = make_experiment(
        "import time\n\ndef run(instance, save_callback, state):\n    time.sleep(0.002)\n",
        instances=4,
        iterations=150,
        workers=2,
        executor=executor,
    )
    d = _load(exp, dispatchers)
    seen: list[tuple[int, int, int]] = []
    d.start()
    while not d.finished:
        p = d.progress
        seen.append((p.running, len(d.in_flight), int(d.state["running"].sum())))
        assert p.done + p.failed + p.running + p.pending == 600
    assert d.join(timeout=60) is True
    assert max(max(s) for s in seen) <= 2, Counter(seen)
    assert any(s[0] >= 1 for s in seen), seen  # it was sampled while runs ran
