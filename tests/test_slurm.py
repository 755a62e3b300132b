"""The ``"slurm"`` executor on a real single-node SLURM cluster (``.ci/slurm-up.sh``:
slurmctld, slurmd and munge on this machine, partitions ``debug`` and ``high``, the
second preempting the first).

What is checked against SLURM itself: results as on threads from 2 worker jobs; a
``scancel`` mid-run and a preemption by the higher-priority partition lose and fail
nothing (runs go on from their checkpoints in other jobs); a job near its walltime
hands its runs back and leaves before SLURM kills it; a bad partition is a quick,
clear error with SLURM's words; pause cancels the jobs and resume submits new ones.
These tests are slow (jobs start in seconds) and skipped where no cluster answers,
failed instead under ALMA_SLURM=1 (CI). The quick ones at the end need no cluster.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, alma_cli, python_env, wait_until

import alma
import alma.experiment
from alma.records import JobCounts

pytest.importorskip("distributed")

#: A run of ``steps`` checkpointed steps that says which SLURM jobs it ran in and the
#: step it started from (0: from scratch).
STEPPING_RUN = """
import os
import time

def run(instance, save_callback, state, iteration):
    step = 0 if state is None else state["step"]
    start = step
    jobs = [] if state is None else state["jobs"]
    job = os.environ.get("SLURM_JOB_ID", "")
    if job not in jobs:
        jobs = [*jobs, job]
    while step < {steps}:
        time.sleep({pause})
        step += 1
        save_callback({{"step": step, "jobs": jobs}})
    return {{"start": start, "jobs": ",".join(jobs), "size": len(open(instance).read())}}
"""


def stepping(steps: int, pause: float) -> str:
    return STEPPING_RUN.format(steps=steps, pause=pause)


def our_jobs(name: str) -> dict[str, str]:
    """SLURM job id -> state, for the jobs of one test (by job name)."""
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(line.split() for line in out.stdout.splitlines())


def running_jobs(name: str, n: int) -> list[str] | None:
    jobs = [j for j, state in our_jobs(name).items() if state == "RUNNING"]
    return sorted(jobs) if len(jobs) >= n else None


def checkpointed_in(exp: Path, job: str) -> bool:
    """A checkpoint of a run executing in ``job`` is committed to the state file."""
    with sqlite3.connect(f"file:{exp}.sqlite?mode=ro", uri=True, timeout=5) as db:
        states = [json.loads(s) for (s,) in db.execute("SELECT state FROM checkpoints")]
    return any(s["jobs"][-1] == job and s["step"] >= 1 for s in states)


def load(exp: Path, dispatchers: list[Any]) -> Any:
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    return d


def all_done_once(d: Any, runs: int) -> Any:
    """The results: every run done, once, at the first attempt (nothing failed or retried)."""
    r = d.results
    keys = list(zip(r["instance"], r["iteration"], strict=True))
    assert len(keys) == len(set(keys)) == runs
    assert (r["status"] == "done").all(), r[r["status"] != "done"][["instance", "error"]]
    assert (r["attempts"] == 1).all()
    assert d.progress.failed == 0
    return r


def resumed_from(r: Any, job: str) -> Any:
    """The runs that were in ``job`` and then went on, in another job, from a checkpoint."""
    moved = r[r["jobs"].str.startswith(f"{job},") | r["jobs"].str.contains(f",{job},")]
    return moved[moved["start"] >= 1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_worker_jobs_give_the_table_of_threads(
    make_experiment: ExperimentFactory, dispatchers: list[Any], slurm: dict[str, Any]
) -> None:
    exp = make_experiment(stepping(3, 0.3), instances=4, iterations=2, workers=2)
    tables = {}
    for executor in ["threads", {"slurm": slurm}]:
        fields = json.loads(exp.read_text())
        fields["executor"] = executor
        exp.write_text(json.dumps(fields))
        Path(f"{exp}.sqlite").unlink(missing_ok=True)
        d = load(exp, dispatchers)
        d.start()
        if executor != "threads":
            assert wait_until(lambda: running_jobs(slurm["job_name"], 2), timeout=60)
        assert d.join(timeout=120) is True
        d.close()
        r = all_done_once(d, 8)
        tables[str(executor)] = r[["instance", "iteration", "status", "start", "size"]]
    threads, on_slurm = (t.sort_values(["instance", "iteration"]) for t in tables.values())
    assert threads.reset_index(drop=True).equals(on_slurm.reset_index(drop=True))
    assert wait_until(lambda: not our_jobs(slurm["job_name"]), timeout=30)  # all cancelled


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_scancel_of_a_worker_job_mid_run_loses_and_fails_nothing(
    make_experiment: ExperimentFactory, dispatchers: list[Any], slurm: dict[str, Any]
) -> None:
    exp = make_experiment(
        stepping(8, 0.4), instances=3, iterations=2, workers=2, executor={"slurm": slurm}
    )
    d = load(exp, dispatchers)
    d.start()
    jobs = wait_until(lambda: running_jobs(slurm["job_name"], 2), timeout=60)
    victim = jobs[0]
    wait_until(lambda: checkpointed_in(exp, victim), timeout=60)
    subprocess.run(["scancel", victim], check=True, timeout=30)
    assert d.join(timeout=150) is True
    r = all_done_once(d, 6)
    moved = resumed_from(r, victim)
    assert not moved.empty, r[["instance", "iteration", "start", "jobs"]]
    assert ((r["interruptions"] >= 1) == r.index.isin(moved.index)).all(), r[
        ["instance", "iteration", "start", "jobs", "interruptions"]
    ]
    assert victim not in our_jobs(slurm["job_name"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_near_its_walltime_hands_its_runs_back_and_leaves(
    make_experiment: ExperimentFactory, dispatchers: list[Any], slurm: dict[str, Any]
) -> None:
    """A 1-minute job with a 30 s margin: its worker leaves at about 30 s, after its run
    saved a checkpoint; the run goes on in the next job. SLURM itself would kill the
    job only after 60 s (up to 90 s: it checks limits every 30 s)."""
    slurm.update(walltime="00:01:00", walltime_margin=30)
    exp = make_experiment(
        stepping(20, 1.0), instances=2, iterations=1, workers=1, executor={"slurm": slurm}
    )
    d = load(exp, dispatchers)
    d.start()
    (first,) = wait_until(lambda: running_jobs(slurm["job_name"], 1), timeout=60)
    seen_running = time.monotonic()
    wait_until(lambda: first not in our_jobs(slurm["job_name"]), timeout=120, interval=0.5)
    lived = time.monotonic() - seen_running
    assert lived < 55, f"job {first} lived {lived:.0f} s: it did not leave before its walltime"
    assert d.join(timeout=150) is True
    r = all_done_once(d, 2)
    assert not resumed_from(r, first).empty, r[["instance", "start", "jobs"]]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_preemption_by_a_higher_priority_partition_fails_nothing(
    make_experiment: ExperimentFactory,
    dispatchers: list[Any],
    slurm: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A job in ``high`` needing both CPUs preempts both worker jobs in ``debug``."""
    slurm.update(partition="debug")
    exp = make_experiment(
        stepping(10, 0.4), instances=2, iterations=2, workers=2, executor={"slurm": slurm}
    )
    d = load(exp, dispatchers)
    d.start()
    jobs = wait_until(lambda: running_jobs(slurm["job_name"], 2), timeout=60)
    wait_until(lambda: all(checkpointed_in(exp, j) for j in jobs), timeout=60)
    high = subprocess.run(
        [
            "sbatch", "--parsable", "-p", "high", "-c", "2", "--mem=64M",
            "-J", slurm["job_name"], "-o", str(tmp_path / "high.out"), "--wrap", "sleep 4",
        ],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    assert d.join(timeout=200) is True
    r = all_done_once(d, 4)
    assert high not in our_jobs(slurm["job_name"])  # it ran, and ended
    for job in jobs:
        assert job not in our_jobs(slurm["job_name"])
    resumed = [resumed_from(r, job) for job in jobs]
    assert not all(m.empty for m in resumed), r[["instance", "iteration", "start", "jobs"]]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_bad_partition_is_a_quick_clear_error(
    make_experiment: ExperimentFactory, dispatchers: list[Any], slurm: dict[str, Any]
) -> None:
    slurm.update(partition="no-such-partition")
    exp = make_experiment(stepping(1, 0.1), instances=2, workers=2, executor={"slurm": slurm})
    start = time.monotonic()
    proc = alma_cli("run", exp, timeout=90)
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert "SLURM refuses alma's worker jobs" in said and "invalid partition" in said, said
    assert took < 30
    assert not our_jobs(slurm["job_name"])  # nothing was submitted
    d = load(exp, dispatchers)  # the same through the API: last_error, nothing lost
    with pytest.warns(UserWarning, match="invalid partition"):
        d.start()
        assert d.join(timeout=30) is False  # ended, not finished
    assert d.last_error is not None and "invalid partition" in d.last_error.error
    assert not d.running and d.progress.status == "paused"
    assert d.progress.done == d.progress.failed == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_jobs_whose_worker_cannot_start_end_in_an_error_not_a_loop(
    make_experiment: ExperimentFactory, slurm: dict[str, Any]
) -> None:
    slurm.update(python="/nonexistent/python")
    exp = make_experiment(stepping(1, 0.1), instances=2, workers=2, executor={"slurm": slurm})
    start = time.monotonic()
    proc = alma_cli("run", exp, timeout=90)
    took = time.monotonic() - start
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said
    assert "3 SLURM worker jobs in a row ended before their Dask worker connected" in said
    assert "/nonexistent/python: No such file or directory" in said  # the job's own words
    assert took < 60
    assert not our_jobs(slurm["job_name"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pause_cancels_the_jobs_and_resume_submits_new_ones(
    make_experiment: ExperimentFactory, dispatchers: list[Any], slurm: dict[str, Any]
) -> None:
    exp = make_experiment(
        stepping(8, 0.3), instances=3, iterations=2, workers=2, executor={"slurm": slurm}
    )
    d = load(exp, dispatchers)
    d.start()
    before = wait_until(lambda: running_jobs(slurm["job_name"], 2), timeout=60)
    wait_until(lambda: d.progress.done >= 1, timeout=60)
    assert d.stop(timeout=60) is True
    assert wait_until(lambda: not our_jobs(slurm["job_name"]), timeout=30)
    paused = d.progress
    assert paused.status == "paused" and 1 <= paused.done < 6
    d.start()
    after = wait_until(lambda: running_jobs(slurm["job_name"], 1), timeout=60)
    assert not set(after) & set(before)
    assert d.join(timeout=150) is True
    all_done_once(d, 6)
    assert wait_until(lambda: not our_jobs(slurm["job_name"]), timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_jobs_are_counted_while_running_and_gone_after_pause(
    make_experiment: ExperimentFactory, dispatchers: list[Any], slurm: dict[str, Any]
) -> None:
    """3 single-core jobs on the 2-core node: 2 run, 1 waits. ``alma status`` (another
    process, with no executor) shows what the runner saw; a pause cancels all three."""
    exp = make_experiment(
        stepping(30, 0.3), instances=3, iterations=2, workers=3, executor={"slurm": slurm}
    )
    d = load(exp, dispatchers)
    assert d.jobs is None  # nothing submitted yet
    d.start()
    waiting = JobCounts(pending=1, running=2, gone=0)
    assert wait_until(lambda: d.jobs == waiting, timeout=60, interval=0.1)
    assert sorted(our_jobs(slurm["job_name"]).values()) == ["PENDING", "RUNNING", "RUNNING"]
    status = alma_cli("status", exp)
    assert status.returncode == 0, status.stderr
    assert "SLURM jobs: 1 pending · 2 running · 0 gone" in status.stdout.splitlines(), status.stdout
    assert d.stop(timeout=60) is True
    assert d.jobs == JobCounts(pending=0, running=0, gone=3)
    assert wait_until(lambda: not our_jobs(slurm["job_name"]), timeout=30)
    status = alma_cli("status", exp)
    assert "SLURM jobs: 0 pending · 0 running · 3 gone" in status.stdout.splitlines(), status.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_adaptive_scaling_gives_the_table_of_threads_across_a_pause(
    make_experiment: ExperimentFactory, dispatchers: list[Any], slurm: dict[str, Any]
) -> None:
    """``"adapt"``: Dask's adaptive scaling between 1 job and ``workers``; a pause
    cancels its jobs, a resume adapts again, and the results are those of threads."""
    exp = make_experiment(stepping(3, 0.3), instances=4, iterations=2, workers=2)
    columns = ["instance", "iteration", "status", "size"]
    d = load(exp, dispatchers)
    d.start()
    assert d.join(timeout=60) is True
    d.close()
    threads = all_done_once(d, 8)[columns]
    assert d.jobs is None  # threads submit no jobs
    fields = json.loads(exp.read_text())
    fields["executor"] = {"slurm": {**slurm, "adapt": {"minimum": 1, "interval": 0.5}}}
    exp.write_text(json.dumps(fields))
    Path(f"{exp}.sqlite").unlink()
    d = load(exp, dispatchers)
    d.start()
    assert wait_until(lambda: d.progress.done >= 2, timeout=60, interval=0.1)
    running = d.jobs
    assert running is not None and 1 <= running.running + running.pending <= 2, running
    assert d.stop(timeout=60) is True
    paused = d.jobs
    assert paused is not None and paused.pending == paused.running == 0 and paused.gone >= 1
    assert wait_until(lambda: not our_jobs(slurm["job_name"]), timeout=30)
    d.start()
    assert wait_until(lambda: d.jobs is not None and d.jobs.running >= 1, timeout=60)
    assert d.join(timeout=120) is True
    on_slurm = all_done_once(d, 8)
    # Only the pause cut runs off (at most one per worker): adaptive scaling retired
    # no worker with a run on it.
    assert (on_slurm["interruptions"] > 0).sum() <= 2, on_slurm[["instance", "interruptions"]]
    key = ["instance", "iteration"]
    assert (
        threads.sort_values(key)
        .reset_index(drop=True)
        .equals(on_slurm[columns].sort_values(key).reset_index(drop=True))
    )
    assert wait_until(lambda: not our_jobs(slurm["job_name"]), timeout=30)


# -- no cluster needed ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("5:30", 330), ("02:00:00", 7200), ("1-0", 86400), ("1-2:03", 93780)],
)
def test_walltimes_are_read_as_slurm_reads_them(text: str, seconds: float) -> None:
    from alma.executors.slurm import parse_walltime

    assert parse_walltime(text) == seconds


def test_missing_dask_jobqueue_says_what_to_install(
    make_experiment: ExperimentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "dask_jobqueue" else find_spec(name, *a),
    )
    exp = make_experiment(executor="slurm")
    with pytest.raises(alma.ConfigError, match=r'pip install "pyalma\[slurm\]"'):
        alma.experiment.load(exp)


def test_bad_walltime_margin_is_a_config_error(make_experiment: ExperimentFactory) -> None:
    pytest.importorskip("dask_jobqueue")
    exp = make_experiment(executor={"slurm": {"walltime_margin": "soon"}})
    with pytest.raises(alma.ConfigError, match="walltime_margin is a number of seconds"):
        alma.experiment.load(exp)


def test_no_sbatch_on_path_is_a_config_error_at_start(
    make_experiment: ExperimentFactory,
    dispatchers: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    pytest.importorskip("dask_jobqueue")
    exp = make_experiment(executor="slurm")
    d = load(exp, dispatchers)  # loading works anywhere: status, results
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(alma.ConfigError, match="sbatch, which is not on PATH"):
        d.start()
    assert d.progress.status == "paused"


def test_importing_dask_jobqueue_off_the_main_thread_keeps_ctrl_c() -> None:
    """dask_jobqueue sets SIGINT to sys.exit when imported, and raises off the main
    thread; alma imports it in a thread (as the Start button does) with neither."""
    pytest.importorskip("dask_jobqueue")
    code = textwrap.dedent(
        """
        import signal, threading
        from alma.executors.slurm import import_jobqueue
        errors = []
        def imp():
            try:
                import_jobqueue()
            except BaseException as exc:
                errors.append(repr(exc))
        t = threading.Thread(target=imp)
        t.start(); t.join()
        print(errors, signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=python_env()
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True"]


def test_partition_is_slurms_word_for_queue(make_experiment: ExperimentFactory) -> None:
    pytest.importorskip("dask_jobqueue")
    exp = make_experiment(executor={"slurm": {"partition": "a", "queue": "b"}})
    with pytest.raises(alma.ConfigError, match="partition and queue"):
        alma.experiment.load(exp)


def test_job_script_shows_alma_defaults_under_the_users_options() -> None:
    pytest.importorskip("dask_jobqueue")
    from alma.executors.slurm import job_script

    script = job_script(
        {"partition": "short", "walltime": "02:00:00", "cores": 4, "interface": "lo"}
    )
    lines = script.splitlines()
    for line in ["#SBATCH -p short", "#SBATCH -t 02:00:00", "#SBATCH --no-requeue"]:
        assert line in lines, script
    assert "--cpus-per-task=4" in script and "--mem=4G" in script
    assert "--nworkers 4" in script and "--nthreads 1" in script  # single-threaded workers
    kept = job_script({"job_extra_directives": ["--requeue"], "interface": "lo"})
    assert "--no-requeue" not in kept and "#SBATCH --requeue" in kept.splitlines()


def test_a_worker_near_its_deadline_takes_no_run_then_hands_back() -> None:
    from alma.executors.dask import WorkerExit

    exit_ = WorkerExit()
    exit_.deadline, exit_.margin = time.time() + 100, 10
    assert exit_.may_start() and not exit_.must_leave()
    exit_.ran(120)  # a run longer than the time left: no new one, but no hand-back yet
    assert not exit_.may_start() and not exit_.must_leave()
    exit_.deadline = time.time() + 5  # within the margin: running runs hand back
    assert exit_.must_leave() and exit_.leaving.is_set() and not exit_.may_start()
    sigterm = WorkerExit()  # no deadline: only SIGTERM makes it leave
    assert sigterm.may_start()
    sigterm.leaving.set()
    assert sigterm.must_leave() and not sigterm.may_start()


def test_job_counts_read_as_squeue_says() -> None:
    from alma.executors.slurm import count_jobs

    states = {
        "1": "PENDING",
        "2": "RUNNING",
        "3": "COMPLETING",  # ending: its worker is gone
        "4": "CONFIGURING",  # nodes booting: not running yet
        "5": "SUSPENDED",
        "6": "TIMEOUT",
    }
    ids = ["1", "2", "3", "4", "5", "6", "7", "8"]  # 7, 8: no longer in the queue
    counts = count_jobs(ids, states, gone={"8"})
    assert counts == JobCounts(pending=3, running=1, gone=4)
    assert counts.total == 8
    assert counts.describe() == "SLURM jobs: 3 pending · 1 running · 4 gone"
    assert count_jobs([], {}, set()) == JobCounts(0, 0, 0)
    assert JobCounts.combine([None, JobCounts(1, 2, 3), JobCounts(0, 1, 1)]) == (1, 3, 4, "SLURM")
    assert JobCounts.combine([None]) is None


@pytest.mark.parametrize(
    ("adapt", "said"),
    [
        ({"minimum": -1}, r'"minimum" is a whole number of worker processes >= 0, got -1'),
        ({"minimum": 1.5}, r'"minimum" is a whole number'),
        ({"minimum": True}, r'"minimum" is a whole number'),
        ({"maximum": 4}, r'takes no "maximum": it is the experiment\'s "workers"'),
        ({"minimum": 1, "minmum": 2}, r"unknown key\(s\) \['minmum'\]; it takes minimum, interval"),
        ({"interval": 0}, r'"interval" is a number of seconds > 0, got 0'),
        ({"target_duration": "5s"}, r'"target_duration" is a number of seconds > 0'),
        ({"wait_count": 0}, r'"wait_count" is a whole number >= 1'),
        ("yes", r'"adapt" is true, false or an object, got \'yes\''),
    ],
)
def test_bad_adapt_is_a_config_error_naming_the_field_and_the_fix(
    make_experiment: ExperimentFactory, adapt: Any, said: str
) -> None:
    pytest.importorskip("dask_jobqueue")
    exp = make_experiment(executor={"slurm": {"adapt": adapt}})
    with pytest.raises(alma.ConfigError, match=said) as caught:
        alma.experiment.load(exp)
    message = str(caught.value)
    assert "field 'executor'" in message and '"adapt"' in message
    assert "Write for example" in message or 'Remove "maximum"' in message


def test_adapt_options_are_alma_s_and_never_reach_slurmcluster(
    make_experiment: ExperimentFactory,
) -> None:
    pytest.importorskip("dask_jobqueue")
    from alma.executors.slurm import SlurmExecutor

    for adapt, parsed in [
        (True, {"minimum": 0}),
        (False, None),
        ({}, {"minimum": 0}),
        (
            {"minimum": 3, "interval": 0.5, "wait_count": 2},
            {"minimum": 3, "interval": 0.5, "wait_count": 2},
        ),
    ]:
        exp = make_experiment(executor={"slurm": {"adapt": adapt, "cores": 2}}, workers=5)
        spec = alma.experiment.load(exp, readonly=True).spec
        assert spec.executor.options["adapt"] == parsed
        executor = SlurmExecutor(print, 5, options=spec.executor.options)
        assert executor.adapt == parsed and executor.max_jobs == 3  # 5 workers, 2 per job
        assert "adapt" not in executor.cluster_options


def test_adaptive_scaling_retires_no_worker_with_a_run_on_it() -> None:
    pytest.importorskip("distributed")
    from types import SimpleNamespace

    from alma.executors.slurm import _KeepBusy

    def worker(*keys: str) -> Any:
        return SimpleNamespace(processing=[SimpleNamespace(key=k) for k in keys])

    idle, busy, other = worker(), worker("alma-run-alma-0123-0-0-0-1"), worker("sum-abc")
    assert _KeepBusy().valid_workers_downscaling(None, [idle, busy, other]) == [idle, other]
