"""The ``alma`` command, run as a real subprocess (``python -m alma``).

Exit codes are part of the contract (scripts and schedulers branch on them):
0 ok, 1 some runs failed, 2 usage/config, 3 state, 4 locked, 130 paused.
"""

from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path

import pandas as pd
import pytest
from helpers import alma_cli, alma_popen, wait_until

import alma.cli
import alma.experiment

FAILING_RUN = """
def run(instance, iteration):
    if iteration == 1 and instance.endswith("file0.txt"):
        raise ValueError("boom")
    return {"value": iteration * 2}
"""


def test_run_exit_0_when_all_done(make_experiment) -> None:
    exp = make_experiment(iterations=3)
    out = alma_cli("run", exp)
    assert out.returncode == 0, out.stderr
    assert "9 of 9 runs done, 0 failed" in out.stderr
    assert len(alma.experiment.load(exp).results) == 9
    again = alma_cli("run", exp)  # nothing owed: still a success
    assert again.returncode == 0, again.stderr


def test_run_exit_1_with_failures(make_experiment) -> None:
    exp = make_experiment(FAILING_RUN, iterations=2)
    out = alma_cli("run", "-q", exp)
    assert out.returncode == 1, out.stderr
    assert "5 of 6 runs done, 1 failed" in out.stderr


#: Fails in a helper, inside the standard library: the line shown is the helper's.
HELPER_FAILING_RUN = """
import json

def parse(text):
    return json.loads(text)

def run(instance):
    return parse("{not json")
"""


def test_run_with_failures_shows_the_last_error_and_the_fix(make_experiment) -> None:
    exp = make_experiment(HELPER_FAILING_RUN, instances=1, iterations=1)
    out = alma_cli("run", "-q", exp)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.splitlines()
    summary = next(i for i, line in enumerate(lines) if "alma: finished:" in line)
    assert "0 of 1 runs done, 1 failed" in lines[summary]
    last, hint = lines[summary + 1], lines[summary + 2]
    assert last.startswith("alma: last error: data/file0.txt, iteration 0: JSONDecodeError: ")
    assert last.endswith(f"(at {exp.parent / 'example.py'}:5)")  # parse(), not json's code
    assert hint == (
        f"alma: see `alma results {exp}` for every failure; fix, then `alma reset --failed {exp}`"
    )
    assert "Traceback" not in out.stderr


def test_error_location_skips_frames_the_user_cannot_edit() -> None:
    alma_file = str(Path(alma.cli.__file__).parent / "executors" / "base.py")
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/home/u/proj/run.py", line 7, in run\n'
        f'  File "{alma_file}", line 99, in save_callback\n'
        f'  File "{json.__file__}", line 231, in dumps\n'
        "TypeError: Object of type set is not JSON serializable\n"
    )
    assert alma.cli._user_location(tb) == "/home/u/proj/run.py:7"
    assert alma.cli._user_location(tb.replace("/home/u/proj/run.py", alma_file)) is None
    assert alma.cli._user_location("") is None


def test_run_without_failures_prints_no_error(make_experiment) -> None:
    out = alma_cli("run", "-q", make_experiment(iterations=1))
    assert out.returncode == 0, out.stderr
    assert "last error" not in out.stderr and "reset --failed" not in out.stderr


#: Iteration 0 ends at once; later iterations checkpoint every 10 ms until a release
#: file exists, so a signal always lands while a run is in flight.
PAUSABLE_RUN = """
import os, time

def run(instance, save_callback, state, iteration):
    release = os.path.join(os.path.dirname(__file__), "release")
    step = 0 if state is None else state["step"]
    deadline = time.monotonic() + 60
    while iteration and not os.path.exists(release) and time.monotonic() < deadline:
        step += 1
        save_callback({"step": step})
        open(instance + ".checkpointed", "w").close()
        time.sleep(0.01)
    return {"resumed": state is not None}
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_pauses_cleanly_then_a_second_run_finishes(
    sig: signal.Signals, make_experiment
) -> None:
    exp = make_experiment(PAUSABLE_RUN, instances=2, iterations=2, workers=2)
    marks = [exp.parent / "data" / f"file{i}.txt.checkpointed" for i in range(2)]
    proc = alma_popen("run", exp)
    try:
        wait_until(lambda: all(m.exists() for m in marks), timeout=30)  # both in flight
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "paused: 2 of 4 runs done, 0 failed" in stderr
    assert f"alma run {exp}" in stderr  # how to continue
    assert alma.experiment.load(exp).progress.done == 2

    (exp.parent / "release").touch()
    second = alma_cli("run", exp)
    assert second.returncode == 0, second.stderr
    r = alma.experiment.load(exp).results
    assert len(r) == 4 and (r["status"] == "done").all()
    assert r[r["iteration"] == 1]["resumed"].all()  # picked up from the checkpoint


def test_status_prints_the_per_instance_table(make_experiment) -> None:
    exp = make_experiment(FAILING_RUN, iterations=2)
    before = alma_cli("status", exp)
    assert before.returncode == 0, before.stderr
    assert "idle: 0/6 done" in before.stdout
    assert not (exp.parent / "example.experiment.sqlite").exists()  # status writes nothing
    alma_cli("run", "-q", exp)
    out = alma_cli("status", exp)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["instance", "done", "failed", "running", "pending", "iterations"]
    assert lines[1].split() == ["data/file0.txt", "1", "1", "0", "0", "2"]
    assert lines[2].split() == ["data/file1.txt", "2", "0", "0", "0", "2"]
    assert "5/6 done, 1 failed, 0 pending" in out.stdout


#: Holds its worker until the file ``go`` appears next to the experiment.
GATED_RUN = """
import os, time

def run(instance, save_callback, state):
    go = os.path.join(os.path.dirname(os.path.dirname(instance)), "go")
    while not os.path.exists(go):
        time.sleep(0.02)
        save_callback({"waiting": True})
    return 1
"""


def test_status_shows_the_batch_jobs_its_runner_recorded(make_experiment, dispatchers) -> None:
    """What a runner on SLURM writes to <state>.jobs (here by hand: no SLURM needed):
    shown for the process holding the lock, or when final; never a dead runner's."""
    from alma import jobfile
    from alma.lock import Holder
    from alma.records import JobCounts

    exp = make_experiment(GATED_RUN, instances=1, iterations=1)
    state = Path(f"{exp}.sqlite")
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    me = d._oslock.me  # the lock holder (this process), as the lock file names it
    assert me is not None
    assert d.jobs is None and "jobs" not in alma_cli("status", exp).stdout  # threads: none
    jobfile.write(state, me, JobCounts(pending=1, running=2, gone=3))
    out = alma_cli("status", exp)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "SLURM jobs: 1 pending · 2 running · 3 gone"
    dead = Holder(pid=me.pid + 1, host=me.host, since=me.since)  # not the lock's holder
    jobfile.write(state, dead, JobCounts(0, 2, 0))
    assert "jobs" not in alma_cli("status", exp).stdout
    (exp.parent / "go").touch()
    assert d.join(timeout=30) is True
    assert d.jobs is None  # that session's executor submitted none: nothing final
    jobfile.write(state, dead, JobCounts(0, 0, 4), final=True)  # the last session's end
    assert d.jobs == JobCounts(0, 0, 4)
    assert alma_cli("status", exp).stdout.splitlines()[-1] == (
        "SLURM jobs: 0 pending · 0 running · 4 gone"
    )
    d.reset()  # a session opens: an earlier session's jobs are forgotten
    assert d.jobs is None and not jobfile.jobs_path(state).exists()


def test_the_run_bar_shows_the_batch_jobs_when_there_are_some() -> None:
    from types import SimpleNamespace

    from tqdm import tqdm

    from alma.records import JobCounts

    p = SimpleNamespace(finished=3, failed=0, running=2)
    with tqdm(total=10, disable=True) as bar:
        alma.cli._update(bar, p, None)
        assert bar.postfix == "failed=0, running=2"
        alma.cli._update(bar, p, JobCounts(pending=1, running=2, gone=3))
        assert bar.postfix == "failed=0, running=2, SLURM jobs=1/2/3"


def test_a_jobs_record_that_is_not_alma_s_is_ignored(tmp_path: Path) -> None:
    from alma import jobfile

    state = tmp_path / "x.sqlite"
    path = jobfile.jobs_path(state)
    for text in ["", "not json", '{"pending": 1}', '{"pending": "x", "running": 0}']:
        path.write_text(text)
        assert jobfile.read(state, None) is None
    path.unlink()
    target = tmp_path / "elsewhere"
    target.write_text(
        '{"pid": 1, "host": "h", "pending": 0, "running": 0, "gone": 1, "final": true}'
    )
    path.symlink_to(target)
    assert jobfile.read(state, None) is None  # never followed


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_results_to_file(suffix: str, make_experiment, tmp_path: Path) -> None:
    exp = make_experiment(FAILING_RUN, iterations=2)
    alma_cli("run", "-q", exp)
    target = tmp_path / f"x{suffix}"
    out = alma_cli("results", exp, "-o", target)
    assert out.returncode == 0, out.stderr
    assert "wrote 6 rows" in out.stderr
    read = {".csv": pd.read_csv, ".json": pd.read_json, ".parquet": pd.read_parquet}[suffix]
    frame = read(target).sort_values(["instance", "iteration"])
    assert len(frame) == 6
    assert (
        frame["instance"].tolist()
        == ["data/file0.txt"] * 2 + ["data/file1.txt"] * 2 + ["data/file2.txt"] * 2
    )
    assert frame["status"].tolist().count("failed") == 1
    failed = frame[frame["status"] == "failed"]
    assert failed["error"].tolist() == ["ValueError: boom"]
    assert frame[frame["status"] == "done"]["value"].tolist() == [0, 0, 2, 0, 2]


def test_results_to_stdout_as_csv(make_experiment) -> None:
    exp = make_experiment(iterations=1)
    alma_cli("run", "-q", exp)
    out = alma_cli("results", exp)
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.strip().splitlines()
    assert header.split(",")[:4] == ["instance", "iteration", "seed", "status"]
    assert len(rows) == 3


def test_results_unknown_extension_is_a_usage_error(make_experiment, tmp_path: Path) -> None:
    exp = make_experiment(iterations=1)
    alma_cli("run", "-q", exp)
    out = alma_cli("results", exp, "-o", tmp_path / "x.txt")
    assert out.returncode == 2
    assert "'.txt'" in out.stderr and ".csv" in out.stderr
    assert not (tmp_path / "x.txt").exists()


def test_results_to_a_missing_folder_is_a_usage_error(make_experiment, tmp_path: Path) -> None:
    exp = make_experiment(iterations=1)
    alma_cli("run", "-q", exp)
    for suffix in (".csv", ".json", ".parquet"):
        out = alma_cli("results", exp, "-o", f"nodir/x{suffix}", cwd=tmp_path)
        assert out.returncode == 2, out.stderr  # 1 would mean "finished with failed runs"
        assert f"alma: error: cannot write nodir/x{suffix}: " in out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "nodir").exists()


def test_warnings_are_one_alma_line(make_experiment) -> None:
    exp = make_experiment(timeout=5)  # threads cannot enforce a timeout: load warns
    out = alma_cli("status", exp)
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if line.startswith("alma: warning: ")]
    assert len(warned) == 1 and '"timeout": 5 is not enforced' in warned[0]
    assert "UserWarning" not in out.stderr and ".py:" not in out.stderr
    assert len(out.stderr.splitlines()) == 1  # no source line echoed after it


def test_main_restores_the_warning_display(make_experiment, capsys) -> None:
    before = warnings.showwarning
    assert alma.cli.main(["status", str(make_experiment(timeout=5))]) == 0
    assert warnings.showwarning is before
    assert "alma: warning: " in capsys.readouterr().err


def test_reset_failed_then_all(make_experiment) -> None:
    exp = make_experiment(FAILING_RUN, iterations=2)
    alma_cli("run", "-q", exp)
    out = alma_cli("reset", "--failed", exp)
    assert out.returncode == 0, out.stderr
    assert "forgot 1 failed runs" in out.stderr
    p = alma.experiment.load(exp).progress
    assert (p.done, p.failed, p.pending) == (5, 0, 1)

    refused = alma_cli("reset", exp)  # stdin is not a terminal: no silent wipe
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert alma.experiment.load(exp).progress.done == 5

    out = alma_cli("reset", "--yes", exp)
    assert out.returncode == 0, out.stderr
    assert "forgot 5 runs" in out.stderr
    p = alma.experiment.load(exp).progress
    assert (p.done, p.failed, p.pending) == (0, 0, 6)


def test_config_error_exit_2_names_file_and_field(make_experiment) -> None:
    exp = make_experiment()
    exp.write_text(json.dumps({"load": "example.py", "batch": "example.batch", "iteratons": 3}))
    for command in ("run", "status", "results", "reset"):
        out = alma_cli(command, exp)
        assert out.returncode == 2, (command, out.stderr)
        assert "example.experiment" in out.stderr and "Did you mean 'iterations'" in out.stderr
        assert "Traceback" not in out.stderr
    assert not (exp.parent / "example.experiment.sqlite").exists()


def test_state_error_exit_3(make_experiment) -> None:
    exp = make_experiment()
    state = exp.parent / "example.experiment.sqlite"
    state.write_text("not a database, but precious notes\n" * 100)
    before = state.read_bytes()
    out = alma_cli("run", exp)
    assert out.returncode == 3
    assert str(state) in out.stderr and "Traceback" not in out.stderr
    assert state.read_bytes() == before


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert alma_cli().returncode == 2
    assert alma_cli("frobnicate", tmp_path / "x.experiment").returncode == 2
    missing = alma_cli("run", tmp_path / "missing.experiment")
    assert missing.returncode == 2 and "missing.experiment" in missing.stderr


def test_help_documents_the_exit_codes() -> None:
    out = alma_cli("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for code in ("0 ok", "1 some runs failed", "2 bad usage", "3 unusable", "4 already", "130"):
        assert code in text


def test_version() -> None:
    out = alma_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"alma {alma.__version__}"
