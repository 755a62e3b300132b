"""The ``%alma`` magics in an in-process IPython shell (no kernel needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from notebook_helpers import wait_for

from alma.notebook.magics import HELP, AlmaMagics

RUN = """\
import time

def run(instance, save_callback, state, iteration):
    if "bad" in instance:
        raise ValueError("bad instance")
    for step in range(int(open(instance).read())):
        time.sleep(0.01)
        save_callback({"step": step})
    return {"score": iteration * 2}
"""


def write_experiment(root: Path, steps: dict[str, int], iterations: int = 2) -> Path:
    """An experiment whose instance files hold how many 10 ms steps a run takes."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, n in steps.items():
        (root / "data" / name).write_text(str(n))
    (root / "m.py").write_text(RUN)
    (root / "m.batch").write_text(json.dumps({"instances": [f"data/{n}" for n in steps]}))
    exp = root / "m.experiment"
    exp.write_text(
        json.dumps({"load": "m.py", "batch": "m.batch", "iterations": iterations, "workers": 2})
    )
    return exp


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "alma")
    yield ip
    magics = ip.magics_manager.registry["AlmaMagics"]
    d = magics.dispatcher
    if d is not None:
        d.stop(timeout=10)
        d.close()
    magics.dispatcher = None


def magics_of(shell: InteractiveShell) -> AlmaMagics:
    return shell.magics_manager.registry["AlmaMagics"]


def test_bare_magic_prints_help(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    assert shell.run_line_magic("alma", "") is None
    out = capsys.readouterr().out
    assert "%alma load PATH" in out and "%alma retry" in out


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("bogus", "unknown command 'bogus'"),
        ("load", "expected 1 argument(s), got 0"),
        ("load a b", "expected 1 argument(s), got 2"),
        ("stop now", "expected 0 argument(s), got 1"),
        ("start a b", "expected 0 to 1 argument(s), got 2"),
        ("status", "no experiment loaded yet"),
        ("results", "no experiment loaded yet"),
        ("load 'unclosed", "cannot parse"),
    ],
)
def test_wrong_usage_raises_usage_error_with_help(
    shell: InteractiveShell, line: str, problem: str
) -> None:
    with pytest.raises(UsageError) as info:
        shell.run_line_magic("alma", line)
    assert problem in str(info.value)
    assert HELP in str(info.value)


def test_load_start_stop_status_results_state(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    exp = write_experiment(tmp_path, {"a.txt": 1, "b.txt": 1, "slow.txt": 2000})
    assert shell.run_line_magic("alma", f"load {exp}") is None
    d = magics_of(shell).dispatcher
    assert d is not None and d.status == "idle"
    assert (
        "'m' idle: 0/6 done" in capsys.readouterr().out
    )  # displayed (plain repr outside a kernel)

    shell.run_line_magic("alma", "start")
    assert d.running
    assert "m: running" in capsys.readouterr().out

    shell.run_line_magic("alma", "status")
    assert "/6 done" in capsys.readouterr().out

    # while it runs, partial results are DataFrames, as returned values
    results = shell.run_line_magic("alma", "results")
    state = shell.run_line_magic("alma", "state")
    assert isinstance(results, pd.DataFrame) and isinstance(state, pd.DataFrame)
    assert list(state["instance"]) == ["data/a.txt", "data/b.txt", "data/slow.txt"]

    wait_for(lambda: d.progress.done >= 2)  # the quick runs of a.txt and b.txt
    shell.run_line_magic("alma", "stop")  # returns once in-flight runs are saved
    assert not d.running
    out = capsys.readouterr().out
    assert "m: paused" in out
    results = shell.run_line_magic("alma", "results")
    assert set(results["instance"]) <= {"data/a.txt", "data/b.txt"}
    assert len(results) >= 2
    assert (results["score"] == results["iteration"] * 2).all()


def test_start_path_loads_then_starts(shell: InteractiveShell, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, {"a.txt": 1, "b.txt": 1})
    shell.run_line_magic("alma", f"start {exp}")
    d = magics_of(shell).dispatcher
    assert d is not None
    assert d.join(timeout=30)
    df = shell.run_line_magic("alma", "results")
    assert len(df) == 4
    assert sorted(df["score"]) == [0, 0, 2, 2]


def test_retry_runs_failed_again(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    exp = write_experiment(tmp_path, {"a.txt": 1, "bad.txt": 1})
    shell.run_line_magic("alma", f"start {exp}")
    d = magics_of(shell).dispatcher
    assert d is not None
    d.join(timeout=30)
    assert d.progress.failed == 2
    capsys.readouterr()
    shell.run_line_magic("alma", "retry")
    assert "2 failed run(s) will run again. Start with %alma start." in capsys.readouterr().out
    assert d.progress.failed == 0 and d.progress.pending == 2


def test_alma_errors_propagate_unchanged(shell: InteractiveShell, tmp_path: Path) -> None:
    import alma

    with pytest.raises(alma.ConfigError, match=r"nothing\.experiment"):
        shell.run_line_magic("alma", f"load {tmp_path / 'nothing.experiment'}")


def test_extension_registers_through_the_package(tmp_path: Path) -> None:
    registered: list[Any] = []

    class FakeShell:
        def register_magics(self, cls: Any) -> None:
            registered.append(cls)

    import alma

    alma.load_ipython_extension(FakeShell())
    assert registered == [AlmaMagics]
