"""One behaviour suite over every executor, then what only worker processes can do.

The run contract (results, failures, retries, checkpoints, stop and resume) must not
depend on where runs execute, so the core tests take an ``executor`` fixture that
parametrizes them over every registered executor: threads, processes, a local Dask
cluster, and ``test-pool``, written here against the public interface only. The tests after
them cover what only processes promise: stop kills runs at once, a timeout ends a run,
and a worker that dies fails only its own run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import ExperimentFactory, python_env, wait_until

import alma
import alma.executors
import alma.experiment
from alma.runfunc import make_caller


class PoolExecutor(alma.executors.Executor):
    """An executor written as a user would, against the documented interface only: a
    ``concurrent.futures`` thread pool whose workers pull from the session. Registering
    it puts it through the same behaviour suite as the built-in ones."""

    usage = '"test-pool"'

    def start(self, source: alma.executors.RunSource) -> None:
        from concurrent.futures import ThreadPoolExecutor, wait

        caller = make_caller(self.run)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="test-pool")

        def work() -> None:
            while (task := source.next_task()) is not None:
                try:
                    outcome = alma.executors.execute(caller, task, source.checkpoint, self.retries)
                except alma.Interrupted:
                    source.abandon(task)
                else:
                    source.report(task, outcome)

        futures = [pool.submit(work) for _ in range(self.workers)]

        def finish() -> None:
            wait(futures)
            pool.shutdown()
            for f in futures:
                if f.exception() is not None:
                    source.executor_failed(f.exception())  # type: ignore[arg-type]
            source.executor_done()

        threading.Thread(target=finish, daemon=True).start()


alma.executors.register("test-pool", PoolExecutor)

EXECUTORS = [
    # Every registered executor, test-pool included; slurm is slow (jobs start).
    *(name for name in alma.executors.names() if name != "slurm"),
    # Checkpoints through the scheduler's queues, as when workers cannot connect back.
    pytest.param("dask-queues", marks=pytest.mark.slow),
    # Worker jobs on the local SLURM cluster (.ci/slurm-up.sh); skipped without one.
    pytest.param("slurm", marks=pytest.mark.slow),
]


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The ``"executor"`` value of an experiment; dask is a LocalCluster of ``workers``,
    slurm as many single-core worker jobs."""
    if request.param.startswith("dask"):
        pytest.importorskip("distributed")
    if request.param == "slurm":
        return {"slurm": request.getfixturevalue("slurm")}
    if request.param == "dask-queues":
        from alma.executors import dask as dask_executor

        monkeypatch.setattr(dask_executor, "DIRECT_CHECKPOINTS", False)
        return "dask"
    return request.param


def load(path: Path, dispatchers: list[Any]) -> Any:
    d = alma.experiment.load(path)
    dispatchers.append(d)
    return d


# -- the same behaviour on every executor --------------------------------------------

DETERMINISTIC_RUN = """
import hashlib
import random

def run(instance, save_callback, state, iteration):
    with open(instance, "rb") as f:
        data = f.read()
    seed = int(hashlib.sha256(data).hexdigest()[:8], 16) + iteration
    rng = random.Random(seed)
    best = max(rng.random() for _ in range(2000))
    save_callback({"best": best})
    return {"best": best, "length": len(data)}
"""


def test_same_results_table(
    make_experiment: ExperimentFactory, dispatchers: list[Any], executor: Any
) -> None:
    """A deterministic run gives the same table whatever the executor."""
    exp = make_experiment(
        DETERMINISTIC_RUN, instances=5, iterations=3, workers=2, executor=executor
    )
    d = load(exp, dispatchers)
    d.start()
    assert d.join(timeout=90) is True
    results = d.results
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(DETERMINISTIC_RUN), namespace)
    expected = []
    for i in range(5):
        for it in range(3):
            value = namespace["run"](
                str(exp.parent / f"data/file{i}.txt"), lambda s: None, None, it
            )
            expected.append((f"data/file{i}.txt", it, "done", value["best"], value["length"]))
    got = list(
        results[["instance", "iteration", "status", "best", "length"]].itertuples(
            index=False, name=None
        )
    )
    assert sorted(got) == sorted(expected)
    assert (results["attempts"] == 1).all()
    assert d.progress.done == 15 and d.progress.failed == 0


FAILING_RUN = """
def run(instance, save_callback, state):
    if instance.endswith("file1.txt"):
        raise ValueError("cannot read " + instance.rsplit("/", 1)[-1])
    return 7
"""


def test_failures_recorded_with_error_text(
    make_experiment: ExperimentFactory, dispatchers: list[Any], executor: Any
) -> None:
    exp = make_experiment(FAILING_RUN, instances=3, iterations=2, workers=2, executor=executor)
    d = load(exp, dispatchers)
    d.start()
    assert d.join(timeout=90) is True
    r = d.results.set_index(["instance", "iteration"])
    for it in range(2):
        row = r.loc[("data/file1.txt", it)]
        assert row["status"] == "failed"
        assert row["error"] == "ValueError: cannot read file1.txt"
        assert "raise ValueError" in row["traceback"]
    assert (r.drop(index="data/file1.txt")["status"] == "done").all()
    assert d.progress.failed == 2 and d.progress.done == 4
    assert d.last_error is not None and d.last_error.instance == "data/file1.txt"


RETRIED_RUN = """
def run(instance, save_callback, state):
    tries = 0 if state is None else state["tries"]
    save_callback({"tries": tries + 1})
    if tries < 1:
        raise RuntimeError("the first attempt fails")
    return {"tries": tries + 1}
"""


@pytest.mark.parametrize("retries", [0, 1])
def test_retries_resume_from_the_last_checkpoint(
    make_experiment: ExperimentFactory, dispatchers: list[Any], executor: Any, retries: int
) -> None:
    """A retry sees the state its failed attempt saved; without retries the run fails."""
    exp = make_experiment(
        RETRIED_RUN, instances=2, iterations=2, workers=2, retries=retries, executor=executor
    )
    d = load(exp, dispatchers)
    d.start()
    assert d.join(timeout=90) is True
    r = d.results
    assert len(r) == 4
    if retries:
        assert (r["status"] == "done").all()
        assert (r["attempts"] == 2).all()
        assert (r["tries"] == 2).all()
    else:
        assert (r["status"] == "failed").all()
        assert (r["attempts"] == 1).all()
        assert r["error"].str.contains("RuntimeError: the first attempt fails").all()


RESUMABLE_RUN = """
import pathlib
import time

STEPS = 40

def run(instance, save_callback, state, iteration):
    step = 0 if state is None else state["step"]
    first = step
    while step < STEPS:
        step += 1
        save_callback({"step": step})
        # Written only once the checkpoint above is durable: the test stops on it.
        pathlib.Path(f"{instance}.saved{iteration}").touch()
        time.sleep(0.02)
    return {"first": first, "steps": step}
"""


def test_stop_then_resume_is_complete_and_hands_state_back(
    make_experiment: ExperimentFactory, dispatchers: list[Any], executor: Any
) -> None:
    exp = make_experiment(RESUMABLE_RUN, instances=4, iterations=2, workers=2, executor=executor)
    d = load(exp, dispatchers)
    data = exp.parent / "data"
    d.start()
    wait_until(lambda: list(data.glob("*.saved*")), timeout=60)
    assert d.stop(timeout=30) is True
    assert d.status == "paused"
    saved = {
        (f"data/{p.name.split('.saved')[0]}", int(p.name.split(".saved")[1]))
        for p in data.glob("*.saved*")
    }
    before = d.results
    done_before = set(zip(before["instance"], before["iteration"], strict=True))
    assert len(done_before) < 8
    interrupted = saved - done_before
    assert interrupted, "a run had checkpointed and was still going when stopped"

    d.start()
    assert d.join(timeout=90) is True
    r = d.results
    keys = list(zip(r["instance"], r["iteration"], strict=True))
    assert len(keys) == len(set(keys)) == 8
    assert (r["status"] == "done").all() and (r["steps"] == 40).all()
    first = dict(zip(keys, r["first"], strict=True))
    for key in interrupted:
        assert first[key] >= 1, f"{key} restarted from scratch instead of its checkpoint"
    for key in done_before:
        assert key in first  # kept, not re-run away


# -- processes only -------------------------------------------------------------------

SLEEPING_RUN = """
import os
import pathlib
import time

def run(instance, save_callback, state):
    if state is not None:
        return {"resumed": state["phase"], "pid": os.getpid()}
    save_callback({"phase": 1})
    pathlib.Path(f"{instance}.pid{os.getpid()}").touch()
    if pathlib.Path(instance).with_name("hold").exists():
        time.sleep(30)
    return {"resumed": None, "pid": os.getpid()}
"""


def _pids(folder: Path) -> list[int]:
    return [int(p.name.rsplit(".pid", 1)[1]) for p in folder.glob("*.pid*")]


def test_processes_stop_aborts_runs_at_once(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    """stop() kills the worker processes; the runs are owed again and get their state."""
    exp = make_experiment(SLEEPING_RUN, instances=3, iterations=1, workers=2, executor="processes")
    d = load(exp, dispatchers)
    data = exp.parent / "data"
    (data / "hold").touch()
    d.start()
    wait_until(lambda: len(_pids(data)) == 2, timeout=30)
    pids = _pids(data)
    running_at_stop = {p.name.split(".pid")[0] for p in data.glob("*.pid*")}
    t0 = time.monotonic()
    assert d.stop(timeout=10) is True
    assert time.monotonic() - t0 < 2.0
    p = d.progress
    assert (p.done, p.failed, p.running, p.pending) == (0, 0, 0, 3)
    for pid in pids:  # killed and reaped: no process, not even a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    (data / "hold").unlink()
    d.start()
    assert d.join(timeout=60) is True
    r = d.results.set_index("instance")
    assert len(r) == 3 and (r["status"] == "done").all()
    for name in running_at_stop:
        assert r.loc[f"data/{name}", "resumed"] == 1  # the checkpoint came back as state
    (never_started,) = {"file0.txt", "file1.txt", "file2.txt"} - running_at_stop
    assert pd.isna(r.loc[f"data/{never_started}", "resumed"])


def test_processes_stop_also_ends_what_a_run_started(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    """A run that started a program (a solver) via subprocess: stop ends it too."""
    exp = make_experiment(
        """
        import pathlib
        import subprocess
        import sys

        def run(instance, save_callback, state):
            solver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            pathlib.Path(f"{instance}.pid{solver.pid}").touch()
            solver.wait()
        """,
        instances=1,
        iterations=1,
        executor="processes",
    )
    d = load(exp, dispatchers)
    d.start()
    wait_until(lambda: _pids(exp.parent / "data"), timeout=30)
    (solver,) = _pids(exp.parent / "data")
    assert d.stop(timeout=10) is True

    def ended() -> bool:
        try:
            stat = Path(f"/proc/{solver}/stat").read_text()
        except OSError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] == "Z"  # ended, not yet reaped by init

    wait_until(ended, timeout=5)


TIMEOUT_RUN = """
import time

def run(instance, save_callback, state):
    if instance.endswith("file0.txt"):
        time.sleep(60)
    return "quick"
"""


def test_processes_timeout_is_enforced_and_retried(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    exp = make_experiment(
        TIMEOUT_RUN,
        instances=3,
        iterations=1,
        workers=2,
        executor="processes",
        timeout=0.5,
        retries=1,
    )
    d = load(exp, dispatchers)
    t0 = time.monotonic()
    d.start()
    assert d.join(timeout=60) is True
    assert time.monotonic() - t0 < 30
    r = d.results.set_index("instance")
    slow = r.loc["data/file0.txt"]
    assert slow["status"] == "failed"
    assert slow["error"].startswith("TimeoutError: timeout after 0.5 s")
    assert slow["attempts"] == 2
    assert 1.0 <= slow["duration"] < 20
    assert (r.drop(index="data/file0.txt")["status"] == "done").all()


DYING_RUN = """
import os
import signal

def run(instance, save_callback, state, iteration):
    if instance.endswith("file1.txt") and iteration == 0:
        os._exit(3)
    if instance.endswith("file2.txt") and iteration == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()
"""


def test_processes_worker_death_fails_only_its_run(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    exp = make_experiment(DYING_RUN, instances=5, iterations=3, workers=2, executor="processes")
    d = load(exp, dispatchers)
    d.start()
    assert d.join(timeout=60) is True
    r = d.results.set_index(["instance", "iteration"])
    exited = r.loc[("data/file1.txt", 0)]
    assert exited["status"] == "failed"
    assert "WorkerDied" in exited["error"] and "exit code 3" in exited["error"]
    killed = r.loc[("data/file2.txt", 1)]
    assert killed["status"] == "failed" and "SIGKILL" in killed["error"]
    rest = r.drop(index=[("data/file1.txt", 0), ("data/file2.txt", 1)])
    assert len(rest) == 13 and (rest["status"] == "done").all()


def test_processes_run_defined_in_main_script(tmp_path: Path) -> None:
    """A function from ``__main__`` (a notebook cell, a script) reaches the workers by
    value; the script has no ``if __name__ == "__main__"`` guard and is not re-run."""
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("x" * (i + 1))
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os
            import alma

            FACTOR = 10

            def size(path):
                return os.path.getsize(path) * FACTOR

            def my_run(instance, save_callback, state):
                return {"value": size(instance), "pid": os.getpid()}

            exp = alma.Experiment(run=my_run, instances=["f*.txt"], iterations=2, workers=2,
                                  executor="processes", state="s.sqlite")
            exp.start()
            assert exp.join(timeout=60)
            r = exp.results
            print(json.dumps({"values": sorted(r["value"].tolist()),
                              "pids": sorted(set(r["pid"].tolist())),
                              "me": os.getpid(), "status": r["status"].tolist()}))
            exp.close()
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        env=python_env(),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout  # the script ran once, not once per worker
    got = json.loads(lines[0])
    assert got["values"] == [10, 10, 20, 20, 30, 30]
    assert got["me"] not in got["pids"]
    assert set(got["status"]) == {"done"}


def test_shipping_a_module_function_needs_no_cloudpickle(tmp_path: Path) -> None:
    """A run function a worker can import by name travels as plain pickle writes it
    (cloudpickle's import is spared at start); one it cannot (a lambda) still goes
    through cloudpickle. Both come back as working functions."""
    (tmp_path / "runs.py").write_text(
        "def run(instance):\n    return len(instance)\n\nlam = lambda instance: 2 * len(instance)\n"
    )
    code = textwrap.dedent(
        """
        import json, pickle, sys
        import runs
        from alma.runfunc import ship, unship

        plain = ship(runs.run, "processes", "a worker process", remote=False)
        before = "cloudpickle" in sys.modules
        lam = ship(runs.lam, "processes", "a worker process", remote=False)
        print(json.dumps({
            "cloudpickle_before_lambda": before,
            "plain_is_by_reference": unship(plain) is runs.run,
            "same_as_cloudpickle": plain.pickled == __import__("cloudpickle").dumps(
                runs.run, pickle.HIGHEST_PROTOCOL),
            "lambda_result": unship(lam)("abc"),
        }))
        """
    )
    env = python_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "cloudpickle_before_lambda": False,
        "plain_is_by_reference": True,
        "same_as_cloudpickle": True,
        "lambda_result": 6,
    }


def test_processes_unpicklable_run_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dispatchers: list[Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a")
    lock = threading.Lock()

    def run(instance: str, save_callback: Any, state: Any) -> int:
        with lock:
            return 1

    d = alma.Experiment(run=run, instances=["a.txt"], executor="processes")
    dispatchers.append(d)
    with pytest.raises(alma.ConfigError, match="cannot be sent to a worker process"):
        d.start()
    assert not d.running


def test_executor_options_are_validated(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment(executor={"processes": 4})
    with pytest.raises(alma.ConfigError, match=r"'executor'.*takes no options"):
        alma.experiment.load(exp)


KILLED_SCRIPT_RUN = """
import os, pathlib, time

def run(instance, save_callback, state):
    if state is not None:
        return {"resumed_from": state["phase"]}
    save_callback({"phase": "before the kill"})
    pathlib.Path(f"{instance}.pid{os.getpid()}").touch()
    time.sleep(120)
"""


def test_processes_kill_9_of_the_dispatcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dispatchers: list[Any]
) -> None:
    """kill -9 of the kernel or script: its worker processes do not run on as orphans,
    and the experiment resumes from the state file with the checkpoints saved before."""
    for i in range(2):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "runmod.py").write_text(KILLED_SCRIPT_RUN)
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            import alma
            from runmod import run

            exp = alma.Experiment(run=run, instances=["f*.txt"], workers=2,
                                  executor="processes", state="s.sqlite")
            exp.start()
            time.sleep(120)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=python_env())
    try:
        wait_until(lambda: len(_pids(tmp_path)) == 2, timeout=60)
        pids = _pids(tmp_path)
    finally:
        proc.kill()
        proc.wait()

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # ended in between
                continue
            if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has ended too
                return False
        return True

    wait_until(gone, timeout=10, interval=0.1)

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import runmod  # type: ignore[import-not-found]

    monkeypatch.setitem(sys.modules, "runmod", runmod)  # removed again at teardown

    d = alma.Experiment(
        run=runmod.run, instances=["f*.txt"], workers=2, executor="processes", state="s.sqlite"
    )
    dispatchers.append(d)
    d.start()
    assert d.join(timeout=60) is True
    r = d.results
    assert len(r) == 2 and (r["status"] == "done").all()
    assert (r["resumed_from"] == "before the kill").all()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("executor_name", ["processes", "dask"])
def test_run_defined_in_a_kernel_cell(tmp_path: Path, executor_name: str) -> None:
    """The notebook case: a run function (and a helper) defined in cells of a real
    kernel reach worker processes, which cannot import the notebook."""
    if executor_name == "dask":
        pytest.importorskip("distributed")
    from jupyter_client.manager import start_new_kernel

    for i in range(3):
        (tmp_path / f"g{i}.txt").write_text("y" * (i + 1))
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=python_env())
    try:
        cells = [
            "import json, os\nimport alma\nWEIGHT = 3",
            "def weigh(path):\n    return os.path.getsize(path) * WEIGHT",
            "def run(instance, save_callback, state, iteration):\n"
            "    save_callback({'seen': True})\n"
            "    return {'w': weigh(instance) + iteration, 'pid': os.getpid()}",
            f"exp = alma.Experiment(run=run, instances=['g*.txt'], iterations=2, workers=2,\n"
            f"                      executor={executor_name!r}, state='k.sqlite')\n"
            "exp.start()\nassert exp.join(timeout=120)\nr = exp.results\n"
            "print(json.dumps({'w': sorted(r['w'].tolist()), 'pids': sorted(set(r['pid'])),\n"
            "                  'me': os.getpid(), 'status': sorted(set(r['status']))}))\n"
            "exp.close()",
        ]
        out: list[str] = []
        for code in cells:
            reply = kc.execute_interactive(
                code,
                timeout=150,
                output_hook=lambda msg: (
                    out.append(msg["content"].get("text", ""))
                    if msg["msg_type"] == "stream"
                    else None
                ),
            )
            assert reply["content"]["status"] == "ok", reply["content"]
        got = json.loads("".join(out).strip().splitlines()[-1])
        assert got["w"] == [3, 4, 6, 7, 9, 10]
        assert got["status"] == ["done"]
        assert got["me"] not in got["pids"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_processes_run_that_workers_cannot_load_fails_its_runs_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dispatchers: list[Any]
) -> None:
    """A function importable here but not in a fresh process (its module file is gone):
    each run fails with the import error instead of hanging or killing the session."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "vanishing.py").write_text(
        "def run(instance, save_callback, state):\n    return 1\n"
    )
    import vanishing  # type: ignore[import-not-found]

    monkeypatch.setitem(sys.modules, "vanishing", vanishing)
    (tmp_path / "vanishing.py").unlink()
    d = alma.Experiment(run=vanishing.run, instances=["a.txt"], iterations=2, executor="processes")
    dispatchers.append(d)
    d.start()
    assert d.join(timeout=60) is True
    r = d.results
    assert (r["status"] == "failed").all() and len(r) == 2
    assert r["error"].str.contains("could not load the run function").all()
    assert r["error"].str.contains("ModuleNotFoundError: No module named 'vanishing'").all()


def test_parameters_and_seed_reach_run_on_every_executor(
    make_experiment: ExperimentFactory, dispatchers: list[Any], executor: str
) -> None:
    """Each run gets exactly what it declares: its configuration's parameters by name,
    the whole configuration as ``params``, and its seed, the same on every executor."""
    exp = make_experiment(
        """
        def run(instance, save_callback, state, restarts, seed, params, cooling=0.5):
            return {"got": [restarts, cooling, seed], "whole": params}
        """,
        instances=2,
        iterations=2,
        workers=2,
        executor=executor,
        params=[{"restarts": 1}, {"restarts": 10, "cooling": 0.9}],
        seed=7,
    )
    d = load(exp, dispatchers)
    d.start()
    assert d.join(timeout=90) is True
    r = d.results
    assert (r["status"] == "done").all() and len(r) == 8, r["error"].tolist()
    for row in r.itertuples():
        given = {"restarts": row.restarts} | (
            {} if row.cooling != row.cooling else {"cooling": row.cooling}  # NaN: not given
        )
        expected_seed = alma.run_seed(row.instance, row.iteration, given, 7)
        assert row.seed == expected_seed
        assert row.got == [row.restarts, given.get("cooling", 0.5), expected_seed]
        assert row.whole == given
