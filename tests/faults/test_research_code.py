"""Input as researchers write it: absurd numbers, run modules that import their
neighbours, and warnings from the user's own libraries."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, alma_cli, listing, python_env

import alma
import alma.experiment


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [("iterations", 2**63, "100,000,000"), ("workers", 10**6, "10,000"), ("retries", -1, "1,000")],
)
def test_numbers_out_of_range_name_the_field_and_the_bound(
    make_experiment: ExperimentFactory, tmp_path: Path, field: str, value: int, bound: str
) -> None:
    exp = make_experiment(**{field: value})
    before = listing(tmp_path)
    done = alma_cli("run", exp)
    assert done.returncode == 2
    assert f"field {field!r}" in done.stderr and bound in done.stderr
    assert listing(tmp_path) == before  # nothing written


def test_more_workers_than_runs_start_no_more_workers_than_runs(
    tmp_path: Path, dispatchers: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alma.executors.threads import ThreadExecutor

    started: list[int] = []
    real_start = ThreadExecutor.start

    def start(self: ThreadExecutor, source: Any) -> None:
        started.append(self.workers)
        real_start(self, source)

    monkeypatch.setattr(ThreadExecutor, "start", start)
    (tmp_path / "a.txt").write_text("a")
    d = alma.Experiment(
        run=len, instances=[str(tmp_path / "a.txt")], iterations=3, workers=5000,
        state=tmp_path / "s.sqlite",
    )  # fmt: skip
    dispatchers.append(d)
    t0 = time.monotonic()
    d.start()
    assert time.monotonic() - t0 < 2  # returns at once
    assert d.join(timeout=20)
    assert started == [3]  # one worker per run owed, not 5,000


SIBLING_RUN = """
from featlib import weight

def run(instance, save_callback, state):
    return {"w": weight(instance)}
"""


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_a_run_module_importing_its_neighbour_works_from_any_folder(
    make_experiment: ExperimentFactory, tmp_path: Path, executor: str
) -> None:
    exp = make_experiment(SIBLING_RUN, folder="project", executor=executor, iterations=2)
    (exp.parent / "featlib.py").write_text("def weight(path):\n    return len(path)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = python_env()
    env["PYTHONPATH"] = env["PYTHONPATH"].replace(str(exp.parent), "")  # not by accident
    console = Path(sys.executable).with_name("alma")  # the console script, not python -m
    done = subprocess.run(
        [str(console), "run", "-q", str(exp)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    r = alma.experiment.load(exp).results
    assert (r["status"] == "done").all() and len(r) == 6 and (r["w"] > 0).all()


def test_a_warning_from_the_users_code_keeps_its_category_and_line(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(
        """
        import warnings

        class ConvergenceWarning(UserWarning):
            pass

        def run(instance, save_callback, state):
            warnings.warn("did not converge", ConvergenceWarning)
            return 1
        """,
        instances=1,
        iterations=1,
    )
    done = alma_cli("run", "-q", exp)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if "did not converge" in x)
    assert line.startswith("warning: ") and "ConvergenceWarning: did not converge" in line
    assert f"(at {exp.with_suffix('.py')}:" in line
    assert not line.startswith("alma: warning")


def test_read_only_commands_do_not_import_the_run_module(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(iterations=2)
    assert alma_cli("run", "-q", exp).returncode == 0
    module = exp.with_suffix(".py")
    # The module now leaves a trace when imported, and imports something missing (a
    # heavy stack, or one installed elsewhere): reading the experiment must not care.
    marker = exp.parent / "imported"
    module.write_text(
        f"open({str(marker)!r}, 'w').close()\nimport alma_heavy_missing_lib\n" + module.read_text()
    )
    for command in ("status", "results"):
        done = alma_cli(command, exp)
        assert done.returncode == 0, done.stderr
        assert not marker.exists(), f"alma {command} imported the run module"
    with pytest.warns(UserWarning, match="run code changed"):
        d = alma.experiment.load(exp, readonly=True)
    assert d.progress.done == 6 and len(d.results) == 6
    with pytest.raises(alma.ConfigError, match="loaded for reading only"):
        d.start()
    done = alma_cli("run", exp)
    assert done.returncode == 2 and "alma_heavy_missing_lib" in done.stderr
