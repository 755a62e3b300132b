"""Session edges: a stop that timed out followed by start(), a state file that cannot be
written, a failing executor, the live-dispatcher registry and notebook defaults."""

from __future__ import annotations

import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import make_files, wait_until

import alma
import alma.experiment
from alma.dispatcher import Dispatcher
from alma.session import Session
from alma.store import Store

GATE = threading.Event()


@pytest.fixture
def made() -> Any:
    dispatchers: list[Dispatcher] = []
    yield dispatchers
    GATE.set()
    for d in dispatchers:
        d.stop(timeout=10)
        d.close()
    GATE.clear()


def slow(instance: str) -> int:
    threading.Event().wait(0.002)
    return 1


def held(instance: str) -> str:
    GATE.wait(20)  # never checkpoints: stop() cannot interrupt it
    return "late"


def test_start_right_after_a_timed_out_stop_neither_hangs_nor_loses_the_run(
    tmp_path: Path, made: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = Store.write

    def slow_write(self: Store, *args: Any) -> None:
        threading.Event().wait(0.3)  # a slow disk widens the window start() must survive
        real_write(self, *args)

    monkeypatch.setattr(Store, "write", slow_write)
    d = alma.Experiment(run=held, instances=make_files(tmp_path, 1), state=tmp_path / "s.sqlite")
    made.append(d)
    d.start()
    wait_until(lambda: d.progress.running == 1)
    with pytest.warns(UserWarning, match="still going"):
        assert d.stop(timeout=0.05) is False
    GATE.set()  # the held run ends now; its commit is slow
    wait_until(lambda: d.progress.running == 0)  # ended, its commit not yet done
    starter = threading.Thread(target=d.start, daemon=True)
    starter.start()
    starter.join(timeout=10)
    assert not starter.is_alive(), "start() hung"
    assert d.join(timeout=10)
    assert d.results["result"].tolist() == ["late"]  # its result was kept, once


def test_a_state_file_that_cannot_be_written_stops_with_a_clear_error(
    tmp_path: Path, made: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = Store.write
    calls = [0]

    def failing_write(self: Store, *args: Any) -> None:
        calls[0] += 1
        if calls[0] > 2:
            raise sqlite3.OperationalError("database or disk is full")
        real_write(self, *args)

    monkeypatch.setattr(Store, "write", failing_write)
    d = alma.Experiment(
        run=slow, instances=make_files(tmp_path, 3), iterations=200, state=tmp_path / "s.sqlite"
    )
    made.append(d)
    d.start()
    assert d.join(timeout=20) is False
    wait_until(lambda: not d.running)
    error = d.last_error
    assert error is not None
    assert str(tmp_path / "s.sqlite") in error.error
    assert "database or disk is full" in error.error and "free disk space" in error.error
    monkeypatch.setattr(Store, "write", real_write)
    # What was committed counts, nothing more; a new start finishes the rest.
    again = alma.Experiment(
        run=slow, instances=make_files(tmp_path, 3), iterations=200, state=tmp_path / "s.sqlite"
    )
    made.append(again)
    assert again.progress.done == len(again.results)
    again.start()
    assert again.join(timeout=60)
    assert len(again.results) == 600


def test_a_failing_executor_is_reported_not_silent(
    tmp_path: Path, made: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_report = Session.report_all
    broke = threading.Event()
    lost: list[Any] = []

    def report_all(self: Session, ended: Any) -> None:
        if not broke.is_set():
            broke.set()
            lost.extend(ended)
            raise RuntimeError("bookkeeping bug")
        real_report(self, ended)

    monkeypatch.setattr(Session, "report_all", report_all)
    d = alma.Experiment(
        run=len,
        instances=make_files(tmp_path, 2),
        iterations=3,
        workers=2,
        state=tmp_path / "s.sqlite",
    )
    made.append(d)
    d.start()
    d.join(timeout=20)
    wait_until(lambda: not d.running)
    assert d.last_error is not None
    assert "executor failed: RuntimeError: bookkeeping bug" in d.last_error.error
    assert lost and d.progress.done == 6 - len(lost)  # those runs are owed again
    d.start()
    assert d.join(timeout=20) and d.progress.done == 6


def test_a_pandas_series_result_keeps_its_labels(tmp_path: Path, made: list[Dispatcher]) -> None:
    def run(instance: str) -> pd.Series:
        return pd.Series({"mean": 1.5, "spread": 0.25})

    d = alma.Experiment(run=run, instances=make_files(tmp_path, 1), state=tmp_path / "s.sqlite")
    made.append(d)
    d.start()
    assert d.join(timeout=20)
    row = d.results.iloc[0]
    assert (row["mean"], row["spread"]) == (1.5, 0.25)


def test_experiments_in_one_folder_get_their_own_state_by_default(
    tmp_path: Path, made: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    files = make_files(tmp_path, 2)

    def count_words(instance: str) -> int:
        return 1

    def line_length(instance: str) -> int:
        return 2

    a = alma.Experiment(run=count_words, instances=files)
    made.append(a)
    a.start()
    assert a.join(timeout=20)
    b = alma.Experiment(run=line_length, instances=files)
    made.append(b)
    assert (Path(a.state_path).name, Path(b.state_path).name) == (
        "count_words.sqlite",
        "line_length.sqlite",
    )
    assert b.progress.done == 0  # nothing of count_words' results leaks in
    with pytest.raises(alma.StateError, match="belongs to experiment 'count_words'"):
        alma.Experiment(run=line_length, instances=files, state="count_words.sqlite")


def test_loading_again_finds_the_running_dispatcher_among_several(
    tmp_path: Path, made: list[Dispatcher]
) -> None:
    d = alma.Experiment(run=held, instances=make_files(tmp_path, 1), state=tmp_path / "s.sqlite")
    other = alma.Experiment(
        run=held, instances=make_files(tmp_path, 1), state=tmp_path / "s.sqlite"
    )
    made += [d, other]
    d.start()  # the first one runs; the registry also knows the second, idle one
    with pytest.warns(UserWarning, match="already running"):
        again = alma.Experiment(
            run=held, instances=make_files(tmp_path, 1), state=tmp_path / "s.sqlite"
        )
    assert again is d
    with pytest.raises(alma.LockedError, match="already running in this process"):
        other.start()
    GATE.set()
    assert d.join(timeout=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert d.progress.status == "finished"


def test_dates_and_paths_are_stored_as_text(tmp_path: Path, made: list[Dispatcher]) -> None:
    import datetime

    def run(instance: str) -> dict[str, Any]:
        return {"when": datetime.datetime(2026, 1, 2, 3, 4, 5), "file": Path(instance)}

    files = make_files(tmp_path, 1)
    d = alma.Experiment(run=run, instances=files, state=tmp_path / "s.sqlite")
    made.append(d)
    d.start()
    assert d.join(timeout=20)
    row = d.results.iloc[0]
    assert (row["status"], row["when"], row["file"]) == ("done", "2026-01-02T03:04:05", files[0])
