"""The Dispatcher on worker threads: the run contract, stopping, order and failures.

Runs here are coordinated with threading.Event rather than sleeps, so each test drives
the dispatcher into exactly the situation it checks.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import make_files, wait_until

import alma
import alma.experiment


@pytest.fixture
def experiment(tmp_path: Path, dispatchers: list[Any]) -> Callable[..., alma.Dispatcher]:
    """alma.Experiment over ``n`` fresh files, cleaned up after the test."""

    def make(run: Callable[..., Any], n: int = 2, **kw: Any) -> alma.Dispatcher:
        d = alma.Experiment(run, make_files(tmp_path, n), state=tmp_path / "s.sqlite", **kw)
        dispatchers.append(d)
        return d

    return make


def run_to_end(d: alma.Dispatcher, timeout: float = 30) -> alma.Dispatcher:
    d.start()
    assert d.join(timeout=timeout) is True
    return d


# -- the run contract ---------------------------------------------------------------------

SIGNATURES = {
    "instance only": ("def run(instance):\n    return [instance]\n", lambda p, it: [p]),
    "seed signature": (
        "def run(instance, save_callback, state):\n"
        "    return [instance, callable(save_callback), state]\n",
        lambda p, it: [p, True, None],
    ),
    "with iteration": (
        "def run(instance, save_callback, state, iteration):\n    return [instance, iteration]\n",
        lambda p, it: [p, it],
    ),
    "iteration by name only": (
        "def run(instance, iteration):\n    return [instance, iteration]\n",
        lambda p, it: [p, it],
    ),
    "iteration keyword-only": (
        "def run(instance, *, iteration):\n    return [instance, iteration]\n",
        lambda p, it: [p, it],
    ),
    "other names, by position": (
        "def run(path, save, st):\n    return [path, callable(save), st]\n",
        lambda p, it: [p, True, None],
    ),
    "kwargs": (
        "def run(**kw):\n"
        "    return [kw['instance'], callable(kw['save_callback']), kw['state'],"
        " kw['iteration']]\n",
        lambda p, it: [p, True, None, it],
    ),
    "extra parameter with default": (
        "def run(instance, save_callback, state, iteration, scale=2):\n"
        "    return [instance, iteration * scale]\n",
        lambda p, it: [p, it * 2],
    ),
}


@pytest.mark.parametrize("case", list(SIGNATURES))
def test_run_signatures(case: str, make_experiment, tmp_path: Path, dispatchers) -> None:
    source, expected = SIGNATURES[case]
    exp = make_experiment(source, instances=2, iterations=2)
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    results = run_to_end(d).results
    assert (results["status"] == "done").all(), results["error"].tolist()
    assert len(results) == 4
    for _, row in results.iterrows():
        path = str((tmp_path / row["instance"]).resolve())
        assert row["result"] == expected(path, row["iteration"])


def test_state_is_none_first_then_last_checkpoint(experiment) -> None:
    """Interrupted passes through ``except Exception``, and the resumed run gets the
    checkpoint given to the very save_callback call that raised it."""
    seen: list[Any] = []
    attempted: list[int] = []
    caught: list[BaseException] = []
    entered = threading.Event()

    def run(instance, save_callback, state):
        seen.append(state)
        if state is not None:
            return {"resumed_from": state["step"]}
        step = 0
        try:
            while True:
                step += 1
                attempted.append(step)
                save_callback({"step": step})
                entered.set()
                time.sleep(0.005)
        except Exception as exc:  # user code that catches "everything"
            caught.append(exc)
            return {"resumed_from": -1}

    d = experiment(run, n=1)
    d.start()
    assert entered.wait(10)
    assert d.stop(timeout=5) is True
    assert d.progress.done == 0 and d.progress.pending == 1
    assert caught == [] and seen == [None]
    run_to_end(d)
    assert seen == [None, {"step": attempted[-1]}]
    assert d.results["resumed_from"].tolist() == [attempted[-1]]


def test_save_callback_rejects_non_json_with_type_error(experiment) -> None:
    def run(instance, save_callback, state):
        try:
            save_callback({"obj": object()})
        except TypeError as exc:
            return str(exc)
        return "no error"

    d = run_to_end(experiment(run, n=1))
    message = d.results["result"].iloc[0]
    assert message.startswith("checkpoint['obj']: ")  # says where the bad value sits
    assert "builtins.object" in message and "JSON" in message


def test_an_unstorable_value_deep_in_a_result_is_named_by_its_path(experiment) -> None:
    def run(instance):
        return {"scores": [1, 2, {"best": object()}]}

    row = run_to_end(experiment(run, n=1)).results.iloc[0]
    assert row["status"] == "failed"
    assert row["error"].startswith("TypeError: result['scores'][2]['best']: an object of type")


def test_unstored_checkpoint_fails_the_run_when_not_caught(experiment) -> None:
    def run(instance, save_callback, state):
        save_callback(lambda: None)

    d = run_to_end(experiment(run, n=1))
    row = d.results.iloc[0]
    assert row["status"] == "failed"
    assert row["error"].startswith("TypeError") and "function" in row["error"]


def test_dict_result_becomes_columns_and_scalar_a_result_column(experiment) -> None:
    def run(instance, iteration):
        return {"cut": iteration * 10, "name": Path(instance).name} if iteration else 7

    d = run_to_end(experiment(run, n=2, iterations=2))
    r = d.results.sort_values(["instance", "iteration"])
    assert {"instance", "iteration", "status", "error", "duration"} <= set(r.columns)
    assert r["cut"].tolist()[1::2] == [10, 10]
    assert r["name"].tolist()[1::2] == ["f0.txt", "f1.txt"]
    assert r["result"].tolist()[0::2] == [7, 7]
    assert (r["duration"] >= 0).all()


def test_result_keys_clashing_with_columns_are_prefixed(experiment) -> None:
    d = run_to_end(experiment(lambda instance: {"status": "mine", "error": 0, "x": 1}, n=1))
    row = d.results.iloc[0]
    assert row["status"] == "done" and pd.isna(row["error"])
    assert (row["result_status"], row["result_error"], row["x"]) == ("mine", 0, 1)


RETURNS: dict[str, tuple[Any, Any]] = {
    "numpy float": (np.float64(1.5), 1.5),
    "numpy float32": (np.float32(0.25), 0.25),
    "numpy int": (np.int64(42), 42),
    "numpy bool": (np.bool_(True), True),
    "numpy array": (np.arange(3), [0, 1, 2]),
    "numpy 2d array": (np.ones((2, 2), dtype=np.int32), [[1, 1], [1, 1]]),
    "nested numpy": ([np.int8(1), {"x": np.float64(2.0)}], [1, {"x": 2.0}]),
    "string": ("hello", "hello"),
    "set": ({3, 1, 2}, [1, 2, 3]),
    "tuple": ((1, "a"), [1, "a"]),
    "infinity": (float("inf"), float("inf")),
    "None": (None, None),
}


@pytest.mark.parametrize("case", list(RETURNS))
def test_return_values_are_converted(case: str, experiment) -> None:
    value, expected = RETURNS[case]
    d = run_to_end(experiment(lambda instance: value, n=1))
    row = d.results.iloc[0]
    assert row["status"] == "done"
    assert row["result"] == expected


def test_numpy_values_in_a_dict_result(experiment) -> None:
    d = run_to_end(experiment(lambda instance: {"a": np.float64(0.5), "b": np.arange(2)}, n=1))
    row = d.results.iloc[0]
    assert row["a"] == 0.5 and row["b"] == [0, 1]


def test_unstorable_result_fails_the_run_with_a_clear_error(experiment) -> None:
    class Model:
        pass

    d = run_to_end(experiment(lambda instance: Model(), n=1))
    row = d.results.iloc[0]
    assert row["status"] == "failed"
    assert "Model" in row["error"] and "JSON" in row["error"]
    assert d.progress.failed == 1 and d.progress.done == 0


# -- stopping -------------------------------------------------------------------------------


def test_run_completing_while_stopping_keeps_its_result(experiment) -> None:
    entered, release = threading.Event(), threading.Event()

    def run(instance, iteration):
        entered.set()
        assert release.wait(10)
        return iteration

    d = experiment(run, n=1, iterations=3)
    d.start()
    assert entered.wait(10)
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    wait_until(lambda: d.status == "stopping")
    release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert d.status == "paused"
    assert d.results["result"].tolist() == [0]  # kept, and nothing new was handed out
    p = d.progress
    assert (p.done, p.pending, p.running) == (1, 2, 0)


def test_stop_latency_with_checkpointing_runs(experiment) -> None:
    started = threading.Semaphore(0)

    def run(instance, save_callback, state):
        started.release()
        for step in range(10_000):  # ~100 s if never stopped
            time.sleep(0.01)
            save_callback({"step": step})

    d = experiment(run, n=3, workers=3)
    d.start()
    for _ in range(3):
        assert started.acquire(timeout=10)
    t0 = time.monotonic()
    assert d.stop() is True
    assert time.monotonic() - t0 < 2.0
    assert not d.running and d.progress.running == 0 and d.progress.done == 0


def test_stuck_run_is_reported_not_handed_out_again_and_kept(experiment) -> None:
    release, go = threading.Event(), threading.Event()
    calls: list[tuple[str, int]] = []

    def run(instance, save_callback, state, iteration):
        key = (Path(instance).name, iteration)
        calls.append(key)
        if key == ("f0.txt", 0):
            assert release.wait(20)  # neither checkpoints nor ends until released
            return "released"
        while not go.is_set():  # the others checkpoint, so a stop aborts them
            save_callback({})
            time.sleep(0.005)
        return "quick"

    d = experiment(run, n=2, iterations=3, workers=2)
    try:
        d.start()
        wait_until(lambda: len(calls) == 2)
        with pytest.warns(UserWarning, match=r"f0\.txt', 0\)\]") as record:
            assert d.stop(timeout=0.5) is False
        assert "f1.txt" not in str(record[0].message)  # that one checkpointed and left
        assert d.progress.running == 1 and d.status == "stopping"
        go.set()
        d.start()  # resumes the others on the free worker while the stuck run goes on
        assert d.status == "running"
        wait_until(lambda: d.progress.done == 5)
        assert calls.count(("f0.txt", 0)) == 1
        assert d.progress.running == 1 and not d.finished
    finally:
        release.set()
        go.set()
    assert d.join(timeout=10) is True
    assert calls.count(("f0.txt", 0)) == 1
    r = d.results
    assert len(r) == 6 and (r["status"] == "done").all()
    stuck = r[(r["iteration"] == 0) & r["instance"].str.endswith("f0.txt")]
    assert stuck["result"].tolist() == ["released"]


def test_stop_of_an_idle_dispatcher_returns_true(experiment) -> None:
    d = experiment(lambda instance: 1, n=1)
    assert d.stop(timeout=0.1) is True
    assert d.status == "idle"


# -- order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [None, "round-robin", "instance"])
def test_order(order: str | None, experiment) -> None:
    calls: list[tuple[str, int]] = []

    def run(instance, iteration):
        calls.append((Path(instance).name, iteration))

    kw = {} if order is None else {"order": order}
    d = run_to_end(experiment(run, n=3, iterations=4, workers=1, **kw))
    names = ["f0.txt", "f1.txt", "f2.txt"]
    if order == "instance":
        assert calls == [(n, it) for n in names for it in range(4)]
    else:
        assert calls == [(n, it) for it in range(4) for n in names]
        first = d.results.sort_values("finished", kind="stable").head(3)
        assert set(first["iteration"]) == {0}
        assert len(set(first["instance"])) == 3


def test_round_robin_resumes_with_the_lowest_iteration_owed(experiment) -> None:
    """After a pause, round-robin continues where each instance is, not from scratch."""
    calls: list[tuple[str, int]] = []
    gate = threading.Event()

    def run(instance, iteration):
        calls.append((Path(instance).name, iteration))
        if len(calls) == 4 and not gate.is_set():  # ends only once the stop was asked
            gate.set()
            wait_until(lambda: d.status == "stopping")

    d = experiment(run, n=3, iterations=3, workers=1)
    d.start()
    assert gate.wait(10)
    assert d.stop(timeout=10)
    assert d.progress.done == 4
    calls.clear()
    run_to_end(d)
    assert calls == [("f1.txt", 1), ("f2.txt", 1), ("f0.txt", 2), ("f1.txt", 2), ("f2.txt", 2)]
    assert d.progress.done == 9 and (d.results["status"] == "done").all()


# -- failures -------------------------------------------------------------------------------


def test_failure_recorded_with_type_message_traceback(make_experiment, dispatchers) -> None:
    exp = make_experiment(
        "def run(instance, iteration):\n"
        "    if iteration == 1:\n"
        "        raise ValueError(f'bad input {iteration}')\n"
        "    return iteration\n",
        instances=2,
        iterations=3,
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    assert d.join(timeout=30) is True  # every run finished, failed ones included
    r = d.results
    failed = r[r["status"] == "failed"]
    assert len(failed) == 2 and set(failed["iteration"]) == {1}
    assert set(failed["error"]) == {"ValueError: bad input 1"}
    for tb in failed["traceback"]:
        assert "Traceback" in tb and "raise ValueError" in tb and "example.py" in tb
        assert "alma/" not in tb  # it starts at the user's code, not alma's call frames
    assert (r[r["status"] == "done"]["error"].isna()).all()
    p = d.progress
    assert (p.done, p.failed, p.pending) == (4, 2, 0)
    assert d.last_error is not None and d.last_error.error == "ValueError: bad input 1"
    assert d.last_error.iteration == 1 and "raise ValueError" in d.last_error.traceback
    assert d.state["failed"].tolist() == [1, 1]


def _counting_module(side: Path, fail_times: int) -> str:
    """A run that appends a line per attempt to ``side`` and fails its first attempts."""
    return (
        "def run(instance, iteration):\n"
        f"    with open({str(side)!r}, 'a') as f:\n"
        "        f.write(f'{iteration}\\n')\n"
        f"    n = open({str(side)!r}).read().splitlines().count(str(iteration))\n"
        f"    if n <= {fail_times}:\n"
        "        raise RuntimeError(f'attempt {n} failed')\n"
        "    return n\n"
    )


@pytest.mark.parametrize(("retries", "status", "attempts"), [(2, "done", 3), (1, "failed", 2)])
def test_retries(
    retries: int, status: str, attempts: int, make_experiment, tmp_path, dispatchers
) -> None:
    side = tmp_path / "attempts.log"
    exp = make_experiment(_counting_module(side, 2), instances=1, iterations=2, retries=retries)
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    assert d.join(timeout=30)
    r = d.results
    assert r["status"].tolist() == [status, status]
    assert r["attempts"].tolist() == [attempts, attempts]
    assert sorted(side.read_text().split()) == ["0"] * attempts + ["1"] * attempts
    if status == "done":
        assert r["result"].tolist() == [3, 3]
    else:
        assert r["error"].tolist() == ["RuntimeError: attempt 2 failed"] * 2


def test_failed_runs_stay_failed_across_resume_until_retry_failed(
    make_experiment, tmp_path, dispatchers
) -> None:
    side = tmp_path / "calls.log"
    fixed = tmp_path / "fixed"
    exp = make_experiment(
        "import os\n"
        "def run(instance, iteration):\n"
        f"    with open({str(side)!r}, 'a') as f:\n"
        "        f.write('x\\n')\n"
        f"    if iteration == 0 and not os.path.exists({str(fixed)!r}):\n"
        "        raise OSError('not fixed')\n"
        "    return 1\n",
        instances=2,
        iterations=2,
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    run_to_end(d)
    assert (d.progress.done, d.progress.failed) == (2, 2)
    calls = side.read_text()

    d = alma.experiment.load(exp)  # a later session
    dispatchers.append(d)
    assert (d.progress.done, d.progress.failed, d.progress.pending) == (2, 2, 0)
    assert d.finished
    d.start()
    assert d.join(timeout=10)
    assert side.read_text() == calls  # failed runs were not run again
    assert d.progress.failed == 2

    fixed.touch()
    assert d.retry_failed() == 2
    assert (d.progress.failed, d.progress.pending) == (0, 2)
    run_to_end(d)
    assert (d.progress.done, d.progress.failed) == (4, 0)
    assert len(side.read_text().split()) == 6
    assert (d.results["status"] == "done").all()


def test_retry_failed_while_running(experiment, tmp_path: Path) -> None:
    """Failed runs forgotten mid-session are run in that same session."""
    release = threading.Event()
    fixed = threading.Event()

    def run(instance, iteration):
        if Path(instance).name == "f1.txt":
            assert release.wait(20)
            return "slow"
        if not fixed.is_set():
            raise RuntimeError("broken")
        return "ok"

    d = experiment(run, n=2, iterations=1, workers=2)
    try:
        d.start()
        wait_until(lambda: d.progress.failed == 1)
        fixed.set()
        assert d.retry_failed() == 1
        assert d.progress.failed == 0
    finally:
        release.set()
    assert d.join(timeout=10) is True
    r = d.results.sort_values("instance")
    assert r["result"].tolist() == ["ok", "slow"]
    assert (r["status"] == "done").all()


def test_a_run_calling_sys_exit_fails_only_that_run(experiment) -> None:
    import sys

    def run(instance, iteration):
        if iteration == 0:
            sys.exit(3)
        return iteration

    d = run_to_end(experiment(run, n=1, iterations=3))
    assert d.results["status"].tolist() == ["failed", "done", "done"]
    assert d.results["error"].iloc[0].startswith("SystemExit")


# -- misc dispatcher behaviour -------------------------------------------------------------


def test_context_manager_stops_and_releases(experiment, tmp_path: Path) -> None:
    gate = threading.Event()

    def run(instance, save_callback, state):
        while True:
            gate.set()
            save_callback({})
            time.sleep(0.005)

    with experiment(run, n=1) as d:
        d.start()
        assert gate.wait(10)
        assert d.running
    assert not d.running
    with pytest.warns(UserWarning, match="code changed"):  # another function, same state
        again = alma.Experiment(
            lambda instance: 1, make_files(tmp_path, 1), state=d.state_path, name=d.spec.name
        )
    again.start()  # the lock was released by close()
    assert again.join(10)
    again.close()


def test_progress_and_state_frames(experiment) -> None:
    d = run_to_end(experiment(lambda instance, iteration: iteration, n=3, iterations=2))
    p = d.progress
    assert isinstance(p, alma.Progress)
    assert (p.total, p.done, p.failed, p.running, p.pending, p.status) == (
        6,
        6,
        0,
        0,
        0,
        "finished",
    )
    with pytest.raises(AttributeError):
        p.done = 3  # type: ignore[misc]  # frozen snapshot
    s = d.state
    assert list(s.columns[:6]) == ["instance", "done", "failed", "running", "pending", "iterations"]
    assert s["done"].tolist() == [2, 2, 2] and s["pending"].tolist() == [0, 0, 0]
    json.dumps(d.results.drop(columns=["finished"]).to_dict("records"))  # plain values


def test_restart_after_a_stop_timeout_keeps_to_the_worker_count(experiment) -> None:
    """A start() while a stuck run is still in flight must not run more than ``workers``
    runs at once: that run's worker pulls from the new plan when it ends."""
    release = threading.Event()
    lock = threading.Lock()
    now = [0]
    peak = [0]

    def run(instance, iteration):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            if iteration == 0:
                assert release.wait(20)
            else:
                time.sleep(0.03)
        finally:
            with lock:
                now[0] -= 1

    d = experiment(run, n=1, iterations=8, workers=2)
    try:
        d.start()
        wait_until(lambda: d.progress.done >= 1)
        with pytest.warns(UserWarning, match="still going"):
            assert d.stop(timeout=0.3) is False
        d.start()
        wait_until(lambda: d.progress.done >= 4)
    finally:
        release.set()
    assert d.join(timeout=20) is True
    assert d.progress.done == 8
    assert peak[0] <= 2


def test_status_transitions_and_join_timeout(experiment) -> None:
    release = threading.Event()

    def run(instance, save_callback, state, iteration):
        while iteration == 0 and not release.is_set():
            save_callback({})
            time.sleep(0.005)
        return iteration

    d = experiment(run, n=1, iterations=3, workers=1)
    assert (d.status, d.running, d.finished) == ("idle", False, False)
    try:
        d.start()
        assert d.status == "running" and d.running
        d.start()  # starting a running dispatcher does nothing
        assert d.join(timeout=0.05) is False  # still going
        assert d.stop(timeout=5) is True
        assert (d.status, d.running, d.finished) == ("paused", False, False)
        release.set()
        d.start()
        assert d.join(timeout=10) is True
    finally:
        release.set()
    assert (d.status, d.running, d.finished) == ("finished", False, True)
    p = d.progress
    assert p.rate is not None and p.rate > 0 and p.elapsed > 0
    assert "finished" in repr(d) and "3/3 done" in repr(d)
    d.start()  # nothing owed: returns at once, runs nothing
    assert not d.running and d.status == "finished"


def test_nan_result_is_kept(experiment) -> None:
    d = run_to_end(experiment(lambda instance: float("nan"), n=1))
    assert d.results["status"].tolist() == ["done"]
    assert np.isnan(d.results["result"].iloc[0])


def test_retry_resumes_from_the_failed_attempts_checkpoint(experiment, tmp_path: Path) -> None:
    seen: list[Any] = []

    def run(instance, save_callback, state):
        seen.append(state)
        if state is None:
            save_callback({"progress": 41})
            raise RuntimeError("flaky")
        return state["progress"] + 1

    d = run_to_end(experiment(run, n=1, retries=1))
    assert seen == [None, {"progress": 41}]
    row = d.results.iloc[0]
    assert (row["status"], row["result"], row["attempts"]) == ("done", 42, 2)
    db = sqlite3.connect(f"file:{d.state_path}?mode=ro", uri=True)
    assert db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 0  # deleted
    db.close()


def test_retry_failed_starts_from_scratch(experiment) -> None:
    seen: list[Any] = []

    def run(instance, save_callback, state):
        seen.append(state)
        save_callback({"x": 1})
        if len(seen) == 1:
            raise RuntimeError("first time")
        return "ok"

    d = run_to_end(experiment(run, n=1))
    assert d.progress.failed == 1
    assert d.retry_failed() == 1
    run_to_end(d)
    assert seen == [None, None]  # the failed run's checkpoint was deleted
    assert d.results["result"].tolist() == ["ok"]


def test_results_ordered_by_instance_then_iteration(experiment) -> None:
    d = run_to_end(experiment(lambda instance, iteration: iteration, n=3, iterations=3, workers=3))
    r = d.results
    assert r["iteration"].tolist() == [0, 1, 2] * 3
    assert [Path(i).name for i in r["instance"]] == ["f0.txt"] * 3 + ["f1.txt"] * 3 + ["f2.txt"] * 3


def test_timeout_that_the_executor_cannot_enforce_is_warned_about(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("a")
    with pytest.warns(UserWarning, match='"timeout": 5 is not enforced by the threads'):
        alma.Experiment(run=len, instances=[f], timeout=5, state=tmp_path / "t.sqlite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # processes end a run over time: nothing to say
        alma.Experiment(
            run=len, instances=[f], timeout=5, executor="processes", state=tmp_path / "p.sqlite"
        )


# -- what front-ends show of failures and runs in flight ------------------------------


def test_failures_are_grouped_by_error_with_an_example(
    experiment: Callable[..., alma.Dispatcher],
) -> None:
    def run(instance: str, save_callback: Any, state: Any, iteration: int) -> int:
        if iteration == 0:
            raise ValueError("no convergence")
        if iteration == 1 and instance.endswith("1.txt"):
            raise KeyError("missing")
        return iteration

    d = run_to_end(experiment(run, n=3, iterations=3))
    groups = d.failures
    assert [(g.error, g.runs) for g in groups] == [
        ("ValueError: no convergence", 3),
        ("KeyError: 'missing'", 1),
    ]
    first = groups[0]
    assert first.iteration == 0 and first.instance.endswith(".txt")
    assert "raise ValueError" in first.traceback
    assert groups[1].iteration == 1 and groups[1].instance.endswith("1.txt")
    d.retry_failed()
    assert d.failures == []


def test_last_error_reads_as_lines(experiment: Callable[..., alma.Dispatcher]) -> None:
    def run(instance: str) -> None:
        raise ValueError("bad input")

    d = run_to_end(experiment(run, n=1))
    text = repr(d.last_error)
    first, *rest = text.splitlines()
    assert first.startswith("<alma.RunError in ") and first.endswith(" #0: ValueError: bad input>")
    assert rest[0] == "Traceback (most recent call last):" and "\\n" not in text


def test_in_flight_says_when_each_run_started_and_checkpointed(
    experiment: Callable[..., alma.Dispatcher],
) -> None:
    gate = threading.Event()

    def run(instance: str, save_callback: Any, state: Any, iteration: int) -> int:
        save_callback({"step": 1})
        gate.wait(20)
        return iteration

    d = experiment(run, n=2, iterations=1, workers=2)
    before = time.time()
    d.start()
    try:
        wait_until(
            lambda: len(d.in_flight) == 2 and all(r.checkpointed for r in d.in_flight),
            timeout=10,
        )
        runs = d.in_flight
        assert sorted(r.iteration for r in runs) == [0, 0]
        for r in runs:
            assert before <= r.started <= (r.checkpointed or 0) <= time.time()
    finally:
        gate.set()
    assert d.join(timeout=20)
    assert d.in_flight == []
