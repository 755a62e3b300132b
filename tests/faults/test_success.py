"""Success must mean success: an exit code of 0, or join() returning True, is a promise.

Each test breaks something the way it breaks for users (a full disk, a state file
deleted under a running session, a damaged checkpoint, a slow executor shutdown) and
asserts what the user sees: the exit code, the message, the rows kept.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, alma_cli, alma_popen, python_env, wait_until

import alma
import alma.executors
import alma.experiment
from alma.executors.threads import ThreadExecutor

SLOW_RUN = """
import time

def run(instance, save_callback, state):
    time.sleep(0.02)
    return {"blob": "x" * 2000}
"""


def _state(exp: Path) -> Path:
    return exp.with_name(exp.name + ".sqlite")


def _rows(state: Path) -> int:
    """Rows in ``runs``; 0 while the file exists but its schema is not committed yet."""
    with contextlib.closing(sqlite3.connect(state)) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
            return 0
        return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


class _SlowToEnd(ThreadExecutor):
    """Like threads, but takes a while to clean up after its last run (as Dask does)."""

    released = threading.Event()

    def start(self, source: Any) -> None:
        class Delayed:
            def __getattr__(self, name: str) -> Any:
                return getattr(source, name)

            def executor_done(self) -> None:
                _SlowToEnd.released.wait(10)
                source.executor_done()

        super().start(Delayed())  # type: ignore[arg-type]


def test_join_is_true_only_once_the_session_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alma.executors, "_REGISTRY", dict(alma.executors._REGISTRY))
    alma.executors.register("slow-to-end", _SlowToEnd)
    (tmp_path / "a.txt").write_text("a")
    monkeypatch.chdir(tmp_path)
    d = alma.Experiment(
        run=len, instances=["a.txt"], iterations=3, executor="slow-to-end", state="s.sqlite"
    )
    d.start()
    try:
        wait_until(lambda: d.progress.done == 3)
        assert d.finished and d.running  # every run done, the executor still cleaning up
        assert d.join(timeout=0.2) is False
        _SlowToEnd.released.set()
        assert d.join(timeout=10) is True
        assert not d.running
        # The file alone holds everything: the WAL was folded in before join returned.
        assert (
            not Path(d.state_path + "-wal").exists()
            or not Path(d.state_path + "-wal").stat().st_size
        )
        assert _rows(Path(d.state_path)) == 3
    finally:
        _SlowToEnd.released.set()
        d.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs (needs root; skipped where mounting is refused)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_alma_run_with_exit_3_never_finished(
    small_disk: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"f{i}.txt").write_text(str(i))
    (small_disk / "exp.py").write_text(SLOW_RUN)
    (small_disk / "exp.batch").write_text(
        '{"instances": [' + ", ".join(f'"{data}/f{i}.txt"' for i in range(4)) + "]}"
    )
    exp = small_disk / "exp.experiment"
    exp.write_text('{"load": "exp.py", "batch": "exp.batch", "iterations": 2000, "workers": 2}')
    done = alma_cli("run", "-q", exp, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "alma: finished" not in done.stderr
    assert "alma: stopped:" in done.stderr and "saving failed" in done.stderr
    assert "full" in done.stderr  # SQLite's own words: "database or disk is full"
    kept = _rows(_state(exp))
    assert 0 < kept < 8000  # what was committed before is kept, and counted
    status = alma_cli("status", exp)
    assert status.returncode == 0 and f"{kept}" in status.stdout.replace(",", "")


@pytest.mark.slow
def test_a_state_file_deleted_mid_run_stops_alma_run_loudly(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(SLOW_RUN, instances=3, iterations=2000, workers=2)
    state = _state(exp)
    proc = alma_popen("run", "-q", exp)
    try:
        wait_until(lambda: state.exists() and _rows(state) > 20, timeout=30, interval=0.05)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{state}{suffix}").unlink(missing_ok=True)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert "alma: finished" not in err
    assert "was deleted (or moved away) while this session was writing to it" in err


def test_a_replaced_state_file_is_noticed_at_the_next_commit(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    exp = make_experiment(SLOW_RUN, instances=2, iterations=500, workers=1)
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    state = _state(exp)
    wait_until(lambda: d.progress.done > 5)
    moved = state.with_name("elsewhere.sqlite")
    state.rename(moved)
    state.write_bytes(b"")  # something else now sits at the path
    assert d.join(timeout=30) is False
    assert isinstance(d.halted, alma.StateError)
    assert "was replaced by another file" in str(d.halted)
    assert d.last_error is not None and "replaced" in d.last_error.error
    assert state.read_bytes() == b""  # the newcomer is never written to


def test_a_damaged_checkpoint_fails_its_run_only_and_a_retry_starts_it_afresh(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(
        """
        def run(instance, save_callback, state):
            return {"resumed": state is not None}
        """,
        instances=3,
        iterations=2,
    )
    state = _state(exp)
    assert alma_cli("reset", "--yes", exp).returncode == 0  # creates the state file
    with contextlib.closing(sqlite3.connect(state)) as db:
        inst = db.execute("SELECT id FROM instances WHERE name = 'data/file1.txt'").fetchone()[0]
        db.execute("INSERT INTO checkpoints VALUES (?, 1, 0, ?, 0)", (inst, '{"step": 3'))
        db.commit()
    done = alma_cli("run", "-q", exp)
    assert done.returncode == 1, done.stderr
    assert "cannot be read back" in done.stderr and "data/file1.txt, iteration 0" in done.stderr
    r = alma.experiment.load(exp).results
    failed = r[r["status"] == "failed"]
    assert failed[["instance", "iteration"]].values.tolist() == [["data/file1.txt", 0]]
    assert (r["status"] == "done").sum() == 5
    assert alma_cli("reset", "--failed", "--yes", exp).returncode == 0
    again = alma_cli("run", "-q", exp)
    assert again.returncode == 0, again.stderr
    r = alma.experiment.load(exp).results
    assert (r["status"] == "done").all() and not r["resumed"].any()


def test_an_executor_that_fails_makes_alma_run_exit_non_zero(
    make_experiment: ExperimentFactory, tmp_path: Path
) -> None:
    """An executor that breaks after some runs: the session ends early, exit 1."""
    exp = make_experiment(
        """
        import alma.executors
        from alma.executors.threads import ThreadExecutor

        class Breaking(ThreadExecutor):
            def start(self, source):
                source.executor_failed(RuntimeError("the queue went away"))
                source.executor_done()

        alma.executors.register("breaking", Breaking)

        def run(instance, save_callback, state):
            return 1
        """,
        instances=2,
        iterations=2,
    )
    # The run module registers the executor, so load it through a script that imports
    # it first (the CLI validates the executor field before importing the module).
    script = tmp_path / "go.py"
    script.write_text(
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(exp.parent)!r})\n"
        "import example\n"
        "import json, pathlib\n"
        f"p = pathlib.Path({str(exp)!r}); d = json.loads(p.read_text())\n"
        "d['executor'] = 'breaking'; p.write_text(json.dumps(d))\n"
        "from alma.cli import main\n"
        f"sys.exit(main(['run', '-q', {str(exp)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
    )
    assert done.returncode == 1, done.stderr
    assert "alma: finished" not in done.stderr
    assert "alma: stopped:" in done.stderr and "the queue went away" in done.stderr


def test_bad_input_is_a_clear_config_error(tmp_path: Path, make_experiment: Any) -> None:
    exp = make_experiment()
    exp.write_text(exp.read_text(), encoding="utf-16")
    done = alma_cli("status", exp)
    assert done.returncode == 2
    assert str(exp) in done.stderr and "not UTF-8" in done.stderr and "Traceback" not in done.stderr


def test_sys_exit_while_importing_the_run_module_is_a_config_error(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment("import sys\nsys.exit(0)\n")
    done = alma_cli("run", exp)
    assert done.returncode == 2, done.stderr
    assert "called sys.exit() while being imported" in done.stderr


def test_a_file_name_that_is_not_utf8_is_named_at_load(tmp_path: Path) -> None:
    import os

    (tmp_path / "good.txt").write_text("g")
    fd = os.open(os.path.join(os.fsencode(tmp_path), b"bad\xff.txt"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    with pytest.raises(alma.ConfigError, match=r"field 'instances'.*bad\\xff\.txt.*not valid"):
        alma.Experiment(run=len, instances=[str(tmp_path / "*.txt")], state=tmp_path / "s.sqlite")
    assert not (tmp_path / "s.sqlite").exists()
