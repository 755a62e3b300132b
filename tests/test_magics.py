"""The ``%alma`` magics in an in-process IPython shell (no kernel needed)."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from notebook_helpers import NOTEBOOKS, wait_for

import alma
import alma.notebook
import alma.notebook.registry
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


def _forget_dispatchers(ip: InteractiveShell) -> None:
    """No experiment of an earlier test may become the magics' fallback."""
    for name, value in list(ip.user_ns.items()):
        if isinstance(value, alma.Dispatcher):
            value.stop(timeout=10)
            value.close()
            del ip.user_ns[name]
    alma.notebook.registry._last = None  # the registry's own state: tests only


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "alma")
    _forget_dispatchers(ip)
    yield ip
    magics = ip.magics_manager.registry["AlmaMagics"]
    d = magics.dispatcher
    if d is not None:
        d.stop(timeout=10)
        d.close()
    magics.dispatcher = None
    _forget_dispatchers(ip)


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


def test_reset_forgets_failed_or_all(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    exp = write_experiment(tmp_path, {"a.txt": 1, "bad.txt": 1})
    shell.run_line_magic("alma", f"start {exp}")
    d = magics_of(shell).dispatcher
    assert d is not None
    d.join(timeout=30)
    assert (d.progress.done, d.progress.failed) == (2, 2)
    capsys.readouterr()
    shell.run_line_magic("alma", "reset --failed")
    assert "2 failed run(s) forgotten. Start with %alma start." in capsys.readouterr().out
    assert (d.progress.done, d.progress.failed) == (2, 0)
    shell.run_line_magic("alma", "reset")
    assert "2 finished run(s) forgotten." in capsys.readouterr().out
    assert d.progress.done == 0 and d.progress.pending == 4
    with pytest.raises(UsageError, match="only --failed"):
        shell.run_line_magic("alma", "reset --all")


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


def define_in_code(shell: InteractiveShell, exp: Path, var: str = "d") -> alma.Dispatcher:
    """What a user does in a cell: ``d = alma.experiment.load(PATH)`` (no magic)."""
    result = shell.run_cell(f"import alma.experiment\n{var} = alma.experiment.load({str(exp)!r})")
    result.raise_error()
    d = shell.user_ns[var]
    assert isinstance(d, alma.Dispatcher)
    return d


def test_magics_act_on_an_experiment_made_in_code(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    d = define_in_code(shell, write_experiment(tmp_path, {"a.txt": 1, "b.txt": 1}))
    shell.run_line_magic("alma", "start")
    assert d.join(timeout=30)
    assert "m: " in capsys.readouterr().out
    df = shell.run_line_magic("alma", "results")
    assert len(df) == 4
    assert shell.run_line_magic("alma", "state") is not None


def test_magics_follow_the_experiment_made_or_shown_last(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = write_experiment(tmp_path / "one", {"a.txt": 1})
    second = write_experiment(tmp_path / "two", {"a.txt": 1, "b.txt": 1, "c.txt": 1})
    define_in_code(shell, first, "d1")
    define_in_code(shell, second, "d2")
    capsys.readouterr()
    shell.run_line_magic("alma", "status")
    assert "0/6 done" in capsys.readouterr().out  # the one made last: two, 3 files x 2

    shell.run_cell("d1")  # displaying an experiment makes it the current one
    capsys.readouterr()
    shell.run_line_magic("alma", "status")
    assert "0/2 done" in capsys.readouterr().out

    # made and used in one cell, before any post-cell hook ran
    third = write_experiment(tmp_path / "three", {"a.txt": 1}, iterations=5)
    shell.run_cell(f"d3 = alma.experiment.load({str(third)!r})\n%alma status").raise_error()
    assert "0/5 done" in capsys.readouterr().out


def test_an_experiment_loaded_by_magic_wins_over_code(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shell.run_line_magic("alma", f"load {write_experiment(tmp_path / 'one', {'a.txt': 1})}")
    define_in_code(shell, write_experiment(tmp_path / "two", {"a.txt": 1, "b.txt": 1}))
    capsys.readouterr()
    shell.run_line_magic("alma", "status")
    assert "0/2 done" in capsys.readouterr().out  # the loaded one (1 file x 2)


def test_the_fallback_never_keeps_an_experiment_alive(
    shell: InteractiveShell, tmp_path: Path
) -> None:
    d = define_in_code(shell, write_experiment(tmp_path, {"a.txt": 1}))
    ref = weakref.ref(d)
    d.close()
    del d, shell.user_ns["d"]
    shell.user_ns.pop("_", None)
    gc.collect()
    assert ref() is None
    with pytest.raises(UsageError, match="no experiment loaded yet"):
        shell.run_line_magic("alma", "status")


def test_quickstart_offers_a_reset_for_an_experiment_already_run(
    shell: InteractiveShell, tmp_path: Path
) -> None:
    """After ``alma run`` the quickstart would show "finished" everywhere: right after
    the load cell it offers ``d.reset()``, commented out so a top-to-bottom run keeps
    the results."""
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    load = next(i for i, s in enumerate(code) if s.startswith("import alma.experiment"))
    start = code.index("d.start()")
    offer = code[load + 1]
    assert load + 1 < start and "# d.reset()" in offer  # before anything starts runs

    exp = write_experiment(tmp_path, {"a.txt": 1, "b.txt": 1})
    shell.run_cell(code[load].replace("../examples/maxcut.experiment", str(exp))).raise_error()
    d = shell.user_ns["d"]
    d.start()
    assert d.join(timeout=30) and d.finished  # what `alma run` leaves behind

    shell.run_cell(offer).raise_error()  # as shipped: nothing is forgotten
    assert d.finished and d.progress.done == 4
    shell.run_cell(offer.replace("# d.reset()", "d.reset()")).raise_error()
    assert d.progress.done == 0 and d.progress.pending == 4 and not d.finished


def test_status_says_how_many_batch_jobs_are_pending_running_and_gone(
    shell: InteractiveShell,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from alma.records import JobCounts

    exp = write_experiment(tmp_path, {"a.txt": 1})
    shell.run_line_magic("alma", f"load {exp}")
    capsys.readouterr()
    shell.run_line_magic("alma", "status")
    assert "jobs" not in capsys.readouterr().out  # threads: none
    monkeypatch.setattr(alma.Dispatcher, "jobs", property(lambda self: JobCounts(1, 2, 3)))
    shell.run_line_magic("alma", "status")
    assert (
        capsys.readouterr().out.rstrip().endswith(" · SLURM jobs: 1 pending · 2 running · 3 gone")
    )


def test_a_finished_experiment_says_so_and_shows_how_to_reset(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    exp = write_experiment(tmp_path, {"a.txt": 1, "bad.txt": 1})
    shell.run_line_magic("alma", f"load {exp}")
    assert "already finished" not in capsys.readouterr().out  # nothing ran yet
    shell.run_line_magic("alma", "start")
    assert "already finished" not in capsys.readouterr().out
    d = magics_of(shell).dispatcher
    assert d is not None and d.join(timeout=30)
    hint = (
        "m has already finished (2/4 done, 2 failed): nothing is left to run. To run it "
        "again: %alma reset forgets every finished run (it deletes them from the state "
        "file), %alma reset --failed only the failed ones; then %alma start."
    )
    shell.run_line_magic("alma", f"load {exp}")  # e.g. the notebook opened the next day
    assert capsys.readouterr().out.strip().endswith(f"\n{hint}")  # under the display
    shell.run_line_magic("alma", "start")  # nothing owed: it says so instead of nothing
    out = capsys.readouterr().out
    assert out.startswith("m: finished · 2/4 done, 2 failed") and out.strip().endswith(hint)
    shell.run_line_magic("alma", f"start {exp}")  # load and start: said once
    out = capsys.readouterr().out
    assert out.count("has already finished") == 1 and out.strip().endswith(hint)
    shell.run_line_magic("alma", "reset --failed  # run the two failures again")
    assert "2 failed run(s) forgotten." in capsys.readouterr().out
    shell.run_line_magic("alma", "start")
    assert "already finished" not in capsys.readouterr().out


def test_magics_notebook_offers_a_reset_before_starting() -> None:
    """Right after its load cell, the magics notebook shows both resets commented out,
    so a top-to-bottom run keeps the results of an experiment already finished."""
    nb = nbformat.read(NOTEBOOKS / "magics.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    load = next(i for i, s in enumerate(code) if s.startswith("%alma load"))
    offer = code[load + 1]
    assert code.index("%alma start") > load + 1
    lines = offer.splitlines()
    assert lines[0].startswith("# %alma reset ") and lines[1].startswith("# %alma reset --failed")
    assert lines[-1] == "%alma status"
    between = nb.cells.index(next(c for c in nb.cells if c.source == offer)) - 1
    assert "%alma reset --failed" in nb.cells[between].source  # the markdown explains both


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("reset --failed  # the two failures", ["reset", "--failed"]),
        ("# nothing", []),
        ("load runs#2.experiment", ["load", "runs#2.experiment"]),
        ("load 'my #1.experiment'  # quoted", ["load", "my #1.experiment"]),
    ],
)
def test_a_hash_starting_a_word_starts_a_comment(line: str, words: list[str]) -> None:
    import shlex

    from alma.notebook.magics import _without_comment

    assert shlex.split(_without_comment(line)) == words
