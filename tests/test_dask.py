"""Dask with real processes: a ``dask scheduler`` and ``dask worker`` processes on
127.0.0.1, started by the test, as a cluster would run them.

What is checked here and not in the parametrized suite: the run module reaches workers
that do not have its file, a worker killed mid-run loses and duplicates nothing, an
unreachable scheduler fails start() within a bounded time, and a missing package says
what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, python_env, wait_until

import alma
import alma.experiment
from alma.session import Session

distributed = pytest.importorskip("distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A scheduler and worker processes, each in its own process group."""

    def __init__(self, root: Path, workers: int) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = root / "dask.log"
        port = self.address.rsplit(":", 1)[1]
        self._spawn("scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard")
        for _ in range(workers):
            self.add_worker()

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dask", *args],
                cwd=self.root,  # not the repo: the run module is not importable there
                env=python_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # killpg ends the nanny and its worker together
            )
        self.procs.append(proc)
        return proc

    def add_worker(self) -> subprocess.Popen[bytes]:
        return self._spawn(
            "worker",
            self.address,
            "--host",
            "127.0.0.1",
            "--nworkers",
            "1",
            "--nthreads",
            "1",
            "--no-dashboard",
        )

    def worker_pids(self, n: int) -> dict[str, int]:
        """Worker address -> pid of the process running tasks, once n workers are up."""
        with distributed.Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=60)
            return dict(client.run(os.getpid))

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def close(self) -> None:
        for proc in self.procs:
            self.kill(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(proc)
                proc.wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A real scheduler with two single-threaded workers on 127.0.0.1; always torn down."""
    root = tmp_path / "cluster"
    root.mkdir()
    c = Cluster(root, workers=2)
    try:
        c.worker_pids(2)
        yield c
    finally:
        c.close()


KILLABLE_RUN = """
import os
import pathlib
import time

MARKS = pathlib.Path({marks!r})

def run(instance, save_callback, state, iteration):
    name = pathlib.Path(instance).name
    (MARKS / f"{{name}}-{{iteration}}-{{os.getpid()}}").touch()
    if (MARKS / "victim").read_text() == str(os.getpid()):
        time.sleep(120)  # the worker the test kills: surely mid-run when it dies
    step = 0 if state is None else state["step"]
    while step < 3:
        time.sleep(0.1)
        step += 1
        save_callback({{"step": step}})
    return {{"pid": os.getpid()}}
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_worker_killed_mid_run_loses_and_duplicates_nothing(
    make_experiment: ExperimentFactory,
    dispatchers: list[Any],
    cluster: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    exp = make_experiment(
        KILLABLE_RUN.format(marks=str(marks)),
        instances=6,
        iterations=3,
        workers=2,
        executor={"dask": cluster.address},
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    # The workers run in another folder and now cannot find the module at all.
    exp.with_suffix(".py").rename(tmp_path / "moved_away.py")

    reports: Counter[tuple[str, int]] = Counter()
    report_all = Session.report_all

    def counting_report(self: Session, ended: Any) -> None:
        ended = list(ended)
        for task, _ in ended:
            reports[(task.instance, task.iteration)] += 1
        report_all(self, ended)

    # Every report reaches the session's report_all (report calls it): count each run.
    monkeypatch.setattr(Session, "report_all", counting_report)
    pids = cluster.worker_pids(2)
    victim_pid = sorted(pids.values())[0]
    victim = next(p for p in cluster.procs[1:] if _has_descendant(p.pid, victim_pid))
    (marks / "victim").write_text(str(victim_pid))

    d.start()

    def victim_mid_run() -> list[str]:
        r = d.results  # once: rows committed between two reads would not line up
        done = set(zip(r["instance"], r["iteration"], strict=True))
        started = [m.name for m in marks.glob(f"*-{victim_pid}")]
        return [
            m
            for m in started
            if (f"data/{m.rsplit('-', 2)[0]}", int(m.rsplit("-", 2)[1])) not in done
        ]

    killed_runs = wait_until(lambda: d.progress.done >= 2 and victim_mid_run(), timeout=60)
    cluster.kill(victim)
    assert d.join(timeout=180) is True

    r = d.results
    keys = list(zip(r["instance"], r["iteration"], strict=True))
    assert len(keys) == len(set(keys)) == 18
    assert (r["status"] == "done").all(), r[r["status"] != "done"][["instance", "error"]]
    assert set(reports.values()) == {1}, "a run was reported more than once"
    assert len(reports) == 18
    by_key = dict(zip(keys, r["pid"], strict=True))
    for mark in killed_runs:  # finished by the surviving worker
        name, it, _ = mark.rsplit("-", 2)
        assert by_key[(f"data/{name}", int(it))] != victim_pid


RESTARTING_RUN = """
import os
import pathlib
import time

MARKS = pathlib.Path({marks!r})

def run(instance, save_callback, state, iteration):
    step = 0 if state is None else state["step"]
    start = step
    victim = (MARKS / "victim").read_text() == str(os.getpid())
    while step < 4:
        time.sleep(0.1)
        step += 1
        save_callback({{"step": step}})
        if victim and step == 2:  # committed: the test may kill this worker now
            (MARKS / f"{{pathlib.Path(instance).name}}-{{iteration}}").touch()
            time.sleep(120)
    return {{"start": start}}
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_rescheduled_after_its_worker_died_restarts_from_its_last_checkpoint(
    make_experiment: ExperimentFactory,
    dispatchers: list[Any],
    cluster: Cluster,
    tmp_path: Path,
) -> None:
    """Dask reruns the task with the checkpoint it was submitted with (none here); its
    first checkpoint is refused and it starts again from step 2, the last committed."""
    marks = tmp_path / "marks"
    marks.mkdir()
    exp = make_experiment(
        RESTARTING_RUN.format(marks=str(marks)),
        instances=2,
        iterations=2,
        workers=2,
        executor={"dask": cluster.address},
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    pids = cluster.worker_pids(2)
    victim_pid = sorted(pids.values())[0]
    victim = next(p for p in cluster.procs[1:] if _has_descendant(p.pid, victim_pid))
    (marks / "victim").write_text(str(victim_pid))
    d.start()
    (killed,) = wait_until(lambda: list(marks.glob("file*")), timeout=60)
    cluster.kill(victim)
    assert d.join(timeout=180) is True
    r = d.results
    assert len(r) == 4 and (r["status"] == "done").all() and (r["attempts"] == 1).all()
    name, it = killed.name.rsplit("-", 1)
    row = r[(r["instance"] == f"data/{name}") & (r["iteration"] == int(it))]
    assert row["start"].tolist() == [2]
    assert (r.drop(row.index)["start"] == 0).all()


def _has_descendant(root: int, pid: int) -> bool:
    """True when ``pid`` is ``root`` or a descendant of it (Linux /proc)."""
    while pid > 1:
        if pid == root:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


SAME_TABLE_RUN = """
import hashlib
import random

def run(instance, save_callback, state, iteration):
    with open(instance, "rb") as f:
        data = f.read()
    rng = random.Random(int(hashlib.sha256(data).hexdigest()[:8], 16) + iteration)
    value = sum(rng.random() for _ in range(1000))
    save_callback({"value": value})
    return {"value": value, "size": len(data)}
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_experiment_same_table_on_every_executor(
    make_experiment: ExperimentFactory, dispatchers: list[Any], cluster: Cluster
) -> None:
    """Threads, processes, a local Dask cluster and an external scheduler agree."""
    exp = make_experiment(SAME_TABLE_RUN, instances=4, iterations=3, workers=2)
    tables = {}
    for executor in ["threads", "processes", "dask", {"dask": cluster.address}]:
        fields = json.loads(exp.read_text())
        fields["executor"] = executor
        exp.write_text(json.dumps(fields))
        state = Path(f"{exp}.sqlite")
        if state.exists():
            state.unlink()
        d = alma.experiment.load(exp)
        dispatchers.append(d)
        d.start()
        assert d.join(timeout=120) is True
        d.close()
        columns = ["instance", "iteration", "status", "value", "size", "attempts"]
        tables[json.dumps(executor)] = d.results[columns].sort_values(["instance", "iteration"])
    first, *others = tables.values()
    assert len(first) == 12 and (first["status"] == "done").all()
    for other in others:
        assert first.reset_index(drop=True).equals(other.reset_index(drop=True))


def test_unreachable_scheduler_fails_start_within_bounded_time(
    make_experiment: ExperimentFactory, dispatchers: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from alma.executors import dask as dask_executor

    monkeypatch.setattr(dask_executor, "CONNECT_TIMEOUT", 3.0)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    exp = make_experiment(executor={"dask": address})
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    t0 = time.monotonic()
    with pytest.raises(alma.AlmaError, match="cannot reach the Dask scheduler") as info:
        d.start()
    assert time.monotonic() - t0 < 20
    assert address in str(info.value)
    assert not d.running and d.progress.running == 0
    d.close()  # the state file is released: another session can take it
    d2 = alma.experiment.load(exp)
    dispatchers.append(d2)
    assert d2.progress.done == 0


def test_missing_dask_says_what_to_install(
    make_experiment: ExperimentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec

    def without_distributed(name: str, *args: Any) -> Any:
        return None if name == "distributed" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_distributed)
    exp = make_experiment(executor="dask")
    with pytest.raises(alma.ConfigError) as info:
        alma.experiment.load(exp)
    message = str(info.value)
    assert str(exp) in message and "'executor'" in message
    assert 'pip install "pyalma[dask]"' in message


@pytest.mark.parametrize("value", [{"dask": 8786}, {"dask": ""}])
def test_bad_dask_address_is_a_config_error(make_experiment: ExperimentFactory, value: Any) -> None:
    exp = make_experiment(executor=value)
    with pytest.raises(alma.ConfigError, match="tcp://host:8786"):
        alma.experiment.load(exp)


def test_run_module_source_reaches_workers_with_its_tracebacks(tmp_path: Path) -> None:
    """The worker side of shipping a run module: loaded from source under its own file
    name, so a failure's traceback shows the user's file and line."""
    from alma.runfunc import load_module_run, ship, unship

    module = tmp_path / "mod.py"
    module.write_text(
        textwrap.dedent(
            """
            def helper(x):
                return 2 * x

            def run(instance, save_callback, state):
                if instance == "bad":
                    raise KeyError("boom")
                return helper(len(instance))
            """
        )
    )
    run = load_module_run(module, module)
    shipped = ship(run, "dask", "Dask workers", remote=True)
    assert shipped.module is not None
    name = shipped.module[0]
    del sys.modules[name]  # as on a worker that never imported it
    module.unlink()  # ... and does not have the file
    worker_run = unship(shipped)
    assert worker_run("abc", None, None) == 6
    import traceback

    try:
        worker_run("bad", None, None)
    except KeyError:
        text = traceback.format_exc()
    assert f'File "{module}", line 7, in run' in text
    assert 'raise KeyError("boom")' in text


def test_stop_on_external_scheduler_cancels_and_resumes(
    make_experiment: ExperimentFactory, dispatchers: list[Any], cluster: Cluster
) -> None:
    """Stop with more runs submitted than started: nothing lost after resuming."""
    exp = make_experiment(
        """
        import time

        def run(instance, save_callback, state):
            step = 0 if state is None else state["step"]
            while step < 5:
                time.sleep(0.05)
                step += 1
                save_callback({"step": step})
            return step
        """,
        instances=6,
        iterations=2,
        workers=2,
        executor={"dask": cluster.address},
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    wait_until(lambda: d.progress.done >= 1, timeout=60)
    assert d.stop(timeout=30) is True
    p = d.progress
    assert p.running == 0 and p.done + p.pending == 12
    d.start()
    assert d.join(timeout=120) is True
    r = d.results
    assert len(r) == 12 and (r["status"] == "done").all()


def test_local_cluster_that_cannot_start_is_reported(
    make_experiment: ExperimentFactory, dispatchers: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Nanny failed to start.")

    monkeypatch.setattr(distributed, "LocalCluster", broken)
    d = alma.experiment.load(make_experiment(executor="dask"))
    dispatchers.append(d)
    with pytest.warns(UserWarning, match="starting a local Dask cluster failed"):
        d.start()
        d.join(timeout=30)
    assert not d.running and d.progress.done == 0
    assert d.last_error is not None
    assert "Nanny failed to start" in d.last_error.error
    assert "__main__" in d.last_error.error


def test_direct_checkpoint_channel_needs_the_secret() -> None:
    """The dispatcher's direct channel answers only a worker that knows the session's
    secret, and only parses JSON (never unpickles what arrives on the network)."""
    from multiprocessing.connection import Connection

    from alma.executors.dask import _CheckpointServer

    seen: list[tuple[tuple[int, int, int], str]] = []

    def handler(key: tuple[int, int, int], state: str) -> str:
        seen.append((tuple(key), state))
        return "ok"

    server = _CheckpointServer.open("127.0.0.1", handler)
    assert server is not None
    host, port, secret = server.channel

    def connect(hello: bytes) -> Connection:
        sock = socket.create_connection((host, port), timeout=5)
        sock.setblocking(True)
        conn = Connection(sock.detach())
        conn.send_bytes(hello)
        return conn

    try:
        for hello in [json.dumps({"secret": "wrong"}).encode(), b"\x80\x04not json"]:
            intruder = connect(hello)
            intruder.send_bytes(json.dumps([1, 1, 2, '{"x": 1}']).encode())
            with pytest.raises((EOFError, OSError)):
                assert intruder.poll(5)
                intruder.recv_bytes()
            intruder.close()
        assert seen == []
        worker = connect(json.dumps({"secret": secret}).encode())
        worker.send_bytes(json.dumps([1, 1, 2, '{"x": 1}']).encode())
        assert worker.poll(5) and worker.recv_bytes() == b"ok"
        worker.close()
        assert seen == [((1, 1, 2), '{"x": 1}')]
    finally:
        server.close()


def test_stop_cancels_unstarted_runs_and_keeps_finishing_ones(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    """With runs that never checkpoint: stop cancels the submitted runs that have not
    started (they never call run), and the running ones end with their result kept,
    as with threads."""
    exp = make_experiment(
        """
        import os
        import pathlib
        import time

        def run(instance, save_callback, state):
            pathlib.Path(f"{instance}.started{os.getpid()}").touch()
            time.sleep(1.5)
            return "finished"
        """,
        instances=6,
        iterations=1,
        workers=2,
        executor="dask",
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    data = exp.parent / "data"
    d.start()
    wait_until(lambda: len(list(data.glob("*.started*"))) == 2, timeout=60)
    assert d.progress.running == 4  # two running, two submitted ahead
    assert d.stop(timeout=30) is True
    started = list(data.glob("*.started*"))
    assert len(started) == 2  # the two submitted ahead were cancelled, never ran
    r = d.results
    assert len(r) == 2 and (r["result"] == "finished").all()
    assert d.progress.pending == 4


def test_a_local_cluster_takes_localcluster_options(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    """{"dask": {...}}: LocalCluster keyword arguments, on top of alma's defaults."""
    exp = make_experiment(
        "import os\n\ndef run(instance, save_callback, state):\n"
        "    return {'omp': os.environ.get('OMP_NUM_THREADS')}\n",
        instances=2,
        iterations=2,
        workers=2,
        executor={"dask": {"memory_limit": "512MiB", "env": {"ALMA_FROM_OPTIONS": "1"}}},
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    assert d.join(timeout=120)
    r = d.results
    assert (r["status"] == "done").all() and len(r) == 4
    assert set(r["omp"]) == {"1"}  # Dask's workers use one BLAS/OpenMP thread each
    with pytest.raises(alma.ConfigError, match=r"'executor'.*keyword names"):
        alma.Experiment(run=len, instances=[str(exp)], executor={"dask": {"not a name": 1}})


@pytest.mark.slow
def test_a_run_module_importing_its_neighbour_runs_on_an_external_cluster(
    make_experiment: ExperimentFactory, dispatchers: list[Any], cluster: Cluster
) -> None:
    """The workers run in another folder: the neighbour module and package travel to
    them."""
    exp = make_experiment(
        "from featlib_ext import weight\nfrom featpkg_ext.scale import factor\n\n"
        "def run(instance, save_callback, state):\n"
        "    return {'w': weight(instance) * factor()}\n",
        instances=3,
        iterations=2,
        workers=2,
        executor={"dask": cluster.address},
    )
    (exp.parent / "featlib_ext.py").write_text("def weight(path):\n    return 7\n")
    (exp.parent / "featpkg_ext").mkdir()
    (exp.parent / "featpkg_ext" / "__init__.py").write_text("")
    (exp.parent / "featpkg_ext" / "scale.py").write_text("def factor():\n    return 3\n")
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    assert d.join(timeout=120)
    r = d.results
    assert (r["status"] == "done").all(), r["error"].tolist()
    assert r["w"].tolist() == [21] * 6


def test_the_dask_dashboard_is_linked_while_running(
    make_experiment: ExperimentFactory, dispatchers: list[Any]
) -> None:
    from alma.notebook.controller import Controller

    exp = make_experiment(
        """
        import time

        def run(instance, save_callback, state):
            time.sleep(0.5)
            return 1
        """,
        instances=4,
        iterations=2,
        workers=2,
        executor="dask",
    )
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    assert d.dashboard is None  # nothing runs yet
    c = Controller(d)
    try:
        d.start()
        wait_until(lambda: d.dashboard is not None, timeout=60)
        assert str(d.dashboard).startswith("http://127.0.0.1:")
        c.refresh()
        assert (
            f"href='{d.dashboard}'" in c.dashboard.value and "Dask dashboard" in c.dashboard.value
        )
        assert d.stop(timeout=30)
        c.refresh()
        assert d.dashboard is None and c.dashboard.value == ""
    finally:
        c.close()
