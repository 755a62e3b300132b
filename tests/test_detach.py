"""Detached runners and remote control, with real processes: ``alma run --detach``,
``alma stop``, ``Dispatcher.start(detach=True)``, a dispatcher as a live view of a runner
elsewhere, and the controller's and magics' buttons for it."""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ExperimentFactory, alma_cli, alma_popen, python_env, wait_until

import alma
import alma.experiment
from alma.control import POLL_INTERVAL, request_path
from alma.lock import ExperimentLock, Holder

#: One line per call (pid, instance, iteration), written before the work: a duplicated
#: run shows up twice. The run waits while a file ``hold`` exists next to the module:
#: a runner that cannot pause until the test lets it.
RUN = """\
import os, time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(instance, save_callback, state, iteration):
    with open(os.path.join(HERE, "calls.log"), "a") as f:
        f.write(f"{os.getpid()} {os.path.basename(instance)} {iteration}\\n")
    deadline = time.monotonic() + 60
    while os.path.exists(os.path.join(HERE, "hold")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(%(sleep)s)
    return {"value": iteration}
"""


def slow_experiment(
    make_experiment: ExperimentFactory,
    iterations: int = 40,
    sleep: float = 0.05,
    **options: Any,
) -> Path:
    return make_experiment(
        RUN % {"sleep": sleep}, instances=3, iterations=iterations, workers=2, **options
    )


def state_of(exp: Path) -> Path:
    return Path(f"{exp}.sqlite")


def runner_of(exp: Path) -> Holder | None:
    return ExperimentLock(state_of(exp)).holder_info()


def calls(exp: Path) -> list[tuple[int, str, int]]:
    log = exp.parent / "calls.log"
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(int(pid), name, int(it)) for pid, name, it in rows]


def done_keys(d: alma.Dispatcher) -> list[tuple[str, int]]:
    res = d.results
    res = res[res["status"] == "done"]
    pairs = zip(res["instance"], res["iteration"], strict=True)
    return sorted((Path(i).name, int(it)) for i, it in pairs)


def gone(pid: int) -> bool:
    """The process has ended and was reaped (no zombie left)."""
    return not Path(f"/proc/{pid}").exists()


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def detach(exp: Path, cwd: Path | None = None) -> int:
    """``alma run --detach EXP``; returns the runner's pid as it printed it."""
    out = alma_cli("run", "--detach", exp, cwd=cwd)
    assert out.returncode == 0, out.stderr
    match = re.search(r"running detached: pid (\d+) on host", out.stdout)
    assert match, out.stdout
    return int(match.group(1))


@pytest.fixture
def no_runner_left() -> Iterator[list[Path]]:
    """Experiments a test detached: whatever happens, no runner outlives the test."""
    made: list[Path] = []
    yield made
    for exp in made:
        (exp.parent / "hold").unlink(missing_ok=True)
        holder = runner_of(exp)
        if holder is not None and holder.host == socket.gethostname():
            try:
                os.kill(holder.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            wait_until(lambda h=holder: gone(h.pid), timeout=10)


# -- alma run --detach, alma stop, alma status ------------------------------------------


@pytest.mark.timeout(120)
def test_detach_returns_at_once_and_the_runner_outlives_the_launching_shell(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    exp = slow_experiment(make_experiment)
    no_runner_left.append(exp)
    shell = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m alma run --detach "{exp}"; echo "rc=$?"'],
        capture_output=True,
        text=True,
        timeout=30,
        env=python_env(),
        stdin=subprocess.DEVNULL,
    )
    assert "rc=0" in shell.stdout, shell.stderr
    pid = int(re.search(r"pid (\d+)", shell.stdout).group(1))  # type: ignore[union-attr]
    log = Path(f"{state_of(exp)}.log")
    assert f"alma stop {exp}" in shell.stdout and str(log) in shell.stdout
    # The shell is gone; the runner goes on, in a session of its own, stdin closed,
    # output to the log next to the state.
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    assert os.readlink(f"/proc/{pid}/fd/2") == str(log)
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    d = alma.experiment.load(exp)
    try:
        first = d.progress.done
        assert first < d.spec.total  # returned while runs go on
        wait_until(lambda: d.progress.done > first, timeout=30)
        hung_up = len(calls(exp))
        os.kill(pid, signal.SIGHUP)  # what closing a terminal sends: it runs on
        wait_until(lambda: len(calls(exp)) >= hung_up + 2, timeout=30)  # new runs start
        hold = exp.parent / "hold"
        hold.write_text("")  # keep it busy while we look at it
        holder = d.runner
        assert holder is not None and holder.pid == pid and holder.detached
        status = alma_cli("status", exp)
        assert (
            f"runner: pid {pid} on host {socket.gethostname()}, detached, since " in status.stdout
        )
        assert f"log: {log}" in status.stdout
        hold.unlink()
        assert d.join(timeout=60)  # the view waits for the runner to end
        assert d.progress.done == d.spec.total and d.running_elsewhere is None
    finally:
        d.close()
    wait_until(lambda: gone(pid), timeout=10)  # ended and reaped: no zombie
    keys = [(name, it) for _, name, it in calls(exp)]
    assert len(keys) == len(set(keys)) == 120
    assert "alma: finished: 120 of 120 runs done" in log.read_text()


@pytest.mark.timeout(120)
def test_alma_stop_pauses_and_a_second_detach_resumes_without_duplicates(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    exp = slow_experiment(make_experiment)
    no_runner_left.append(exp)
    pid = detach(exp)
    d = alma.experiment.load(exp)
    try:
        wait_until(lambda: d.progress.done >= 5, timeout=30)
        stop = alma_cli("stop", exp)
        assert stop.returncode == 0, stop.stderr
        assert "paused: " in stop.stderr
        assert d.running_elsewhere is None  # stop returns once the lock is released
        wait_until(lambda: gone(pid), timeout=10)
        paused = d.progress
        assert paused.status == "paused" and 5 <= paused.done < paused.total
        assert f"{paused.done} of 120 runs done" in stop.stderr
        again = alma_cli("stop", exp)
        assert again.returncode == 0 and "not running" in again.stderr

        second = detach(exp)
        assert second != pid
        assert d.join(timeout=60)
        assert done_keys(d) == sorted({(f"file{i}.txt", it) for i in range(3) for it in range(40)})
    finally:
        d.close()
    keys = [(name, it) for _, name, it in calls(exp)]
    assert len(keys) == len(set(keys)) == 120  # nothing ran twice across the pause
    assert {p for p, _, _ in calls(exp)} == {pid, second}


@pytest.mark.timeout(120)
def test_racing_detach_calls_give_one_runner(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    exp = slow_experiment(make_experiment, iterations=200)
    no_runner_left.append(exp)
    procs = [alma_popen("run", "--detach", exp) for _ in range(4)]
    outs = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 4, 4, 4], outs
    for code, _, err in outs:
        if code == 4:
            assert "already running" in err and "detached" in err
    holder = runner_of(exp)
    assert holder is not None
    wait_until(lambda: len(calls(exp)) >= 10, timeout=30)
    assert alma_cli("stop", exp).returncode == 0
    pids = {p for p, _, _ in calls(exp)}
    assert pids == {holder.pid}  # one runner did every run
    keys = [(name, it) for _, name, it in calls(exp)]
    assert len(keys) == len(set(keys))


@pytest.mark.timeout(60)
def test_a_runner_that_cannot_start_reports_its_code_and_message(
    make_experiment: ExperimentFactory,
) -> None:
    exp = make_experiment("raise RuntimeError('no GPU here')\n")
    out = alma_cli("run", "--detach", exp)
    assert out.returncode == 2  # the runner's ConfigError, raised while importing
    assert "no GPU here" in out.stderr
    assert runner_of(exp) is None

    broken = make_experiment(name="broken")
    state_of(broken).write_bytes(b"not a database, just junk" * 100)
    out = alma_cli("run", "--detach", broken)
    assert out.returncode == 3 and "alma: error:" in out.stderr


@pytest.mark.timeout(120)
def test_terminal_run_paused_by_alma_stop_exits_130(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    exp = slow_experiment(make_experiment)
    no_runner_left.append(exp)
    proc = alma_popen("run", "-q", exp)
    try:
        holder = wait_until(lambda: runner_of(exp), timeout=30)
        assert holder.pid == proc.pid and not holder.detached and holder.log is None
        d = alma.experiment.load(exp)
        assert d.running_elsewhere is not None
        assert d.running_elsewhere.startswith(f"pid {proc.pid} on host {socket.gethostname()}")
        d.close()
        stop = alma_cli("stop", exp)
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(timeout=30) == 130
        assert "paused by a stop request" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(120)
def test_stop_that_times_out_says_so_and_the_runner_pauses_later(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    exp = slow_experiment(make_experiment)
    no_runner_left.append(exp)
    hold = exp.parent / "hold"
    hold.write_text("")  # runs wait: nothing can pause until it goes
    pid = detach(exp)
    wait_until(lambda: len(calls(exp)) == 2, timeout=30)  # both workers are stuck in a run
    stop = alma_cli("stop", "--timeout", "0.5", exp)
    assert stop.returncode == 1
    assert "did not pause within 0.5 s" in stop.stderr and f"pid {pid}" in stop.stderr
    assert runner_of(exp) is not None
    hold.unlink()  # the two runs end; the request was taken: the runner pauses
    wait_until(lambda: gone(pid), timeout=30)
    d = alma.experiment.load(exp)
    assert d.progress.status == "paused" and d.progress.done < d.spec.total
    d.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_of_a_runner_leaves_no_worker_and_resumes(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    exp = slow_experiment(make_experiment, iterations=30, executor="processes")
    no_runner_left.append(exp)
    pid = detach(exp)
    d = alma.experiment.load(exp)
    try:
        wait_until(lambda: d.progress.done >= 4, timeout=60)
        workers = children(pid)
        assert len(workers) == 2
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), timeout=10)
        for worker in workers:  # no orphan goes on burning CPU
            wait_until(lambda w=worker: gone(w), timeout=15)
        assert d.running_elsewhere is None  # the OS released the lock
        before = set(done_keys(d))
        detach(exp)
        assert d.join(timeout=120)
        after = done_keys(d)
        assert before <= set(after) and len(after) == len(set(after)) == 90
    finally:
        d.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user's")
@pytest.mark.timeout(120)
def test_a_stop_request_of_another_user_is_ignored(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    exp = slow_experiment(make_experiment, iterations=100, sleep=0.02)
    no_runner_left.append(exp)
    detach(exp)
    holder = runner_of(exp)
    assert holder is not None
    request = request_path(state_of(exp))
    request.write_text(f"pid {holder.pid} on host {holder.host}\n")
    os.chown(request, 4242, 4242)
    d = alma.experiment.load(exp)
    try:
        # 60 more runs of 20 ms on 2 workers take at least 0.6 s: several polls.
        first, since = d.progress.done, time.monotonic()
        wait_until(lambda: d.progress.done >= first + 60, timeout=30)
        assert time.monotonic() - since > 3 * POLL_INTERVAL
        assert runner_of(exp) == holder and request.exists()  # ignored, left alone
        os.chown(request, os.getuid(), os.getgid())  # the owner's own request is honoured
        wait_until(lambda: runner_of(exp) is None, timeout=30)
        assert d.progress.status == "paused" and not request.exists()
    finally:
        d.close()


# -- Dispatcher: start(detach=True) and the live view -----------------------------------


def work(instance: str, save_callback: Any, state: Any, iteration: int) -> dict[str, Any]:
    """A run function from a module that is not installed: it travels by value."""
    import time

    time.sleep(0.03)
    with open(instance) as f:
        return {"length": len(f.read()), "iteration": iteration}


@pytest.mark.timeout(120)
def test_start_detach_in_code_and_a_view_that_never_stops_the_runner(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"in{i}.txt"
        f.write_text("x" * i)
        files.append(str(f))
    state = tmp_path / "work.sqlite"
    d = alma.Experiment(run=work, instances=files, iterations=30, workers=2, state=state)
    d.start(detach=True)
    holder = d.runner
    assert holder is not None and holder.pid != os.getpid() and holder.detached
    assert not d.running and d.running_elsewhere is not None
    with pytest.raises(alma.LockedError, match="already running"):
        d.start()
    assert not list(tmp_path.glob("work.sqlite.detach-*"))  # the shipped spec is gone
    d.close()
    del d
    gc.collect()  # neither close() nor the collector of a view stops the runner
    view = alma.Experiment(run=work, instances=files, iterations=30, workers=2, state=state)
    try:
        first = view.progress.done
        wait_until(lambda: view.progress.done > first, timeout=30)
        assert view.runner == holder
        assert view.stop() is True  # pauses the runner, returns once it has
        assert view.running_elsewhere is None and view.progress.status == "paused"
        assert view.stopped_remotely is False  # this view was not the one paused
        wait_until(lambda: gone(holder.pid), timeout=10)  # reaped by this process
        view.start(detach=True)
        assert view.join(timeout=60) is True
        res = view.results
        assert len(res) == 90 and set(res["length"]) == {0, 1, 2}
    finally:
        view.close()
    assert f"{holder.pid}" in (tmp_path / "work.sqlite.log").read_text()


# -- the notebook: a real kernel, the controller and the magics -------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kernel_starts_detached_is_killed_and_a_new_kernel_attaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_kernel import Kernel

    for i in range(4):
        (tmp_path / f"g{i}.txt").write_text(str(i))
    cell = """
    import time, alma

    def nbwork(instance, save_callback, state, iteration):
        time.sleep(0.05)
        return {"i": iteration}

    d = alma.Experiment(run=nbwork, instances=["g*.txt"], iterations=100, workers=2)
    """
    kernel = Kernel(tmp_path)
    try:
        kernel.run(cell)
        kernel.run("d.start(detach=True)")
        runner = kernel.eval("d.runner.pid")
        kernel.kill()  # SIGKILL: the runner is not the kernel's to take along
    finally:
        kernel.shutdown()
    state = tmp_path / "nbwork.sqlite"
    monkeypatch.chdir(tmp_path)  # instances are named as listed: "g0.txt", …
    with warnings.catch_warnings():  # "the run code changed": this view never runs it
        warnings.simplefilter("ignore")
        view = alma.Experiment(
            run=work,
            instances=["g*.txt"],
            iterations=100,
            state=state,
            name="nbwork",
        )
    try:
        first = view.progress.done
        wait_until(lambda: view.progress.done > first, timeout=30)  # runs go on
        assert view.runner is not None and view.runner.pid == runner
    finally:
        view.close()
    kernel = Kernel(tmp_path)
    try:
        kernel.run(cell)
        assert kernel.eval("d.runner.pid") == runner
        assert kernel.eval("d.stop()") is True
        paused = kernel.eval("[d.progress.done, d.status, d.running_elsewhere]")
        assert paused[0] < 400 and paused[1:] == ["paused", None]
        kernel.run("d.start(detach=True)")
        assert kernel.eval("d.runner.pid") != runner
        assert kernel.eval("d.join(120)", timeout=150) is True
        assert kernel.eval("[len(d.results), int(d.results['i'].sum())]") == [400, 4 * 4950]
    finally:
        kernel.shutdown()


@pytest.mark.timeout(120)
def test_controller_stop_pauses_a_detached_runner_and_start_resumes_it_detached(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    from alma.notebook.controller import ELSEWHERE, Controller

    exp = slow_experiment(make_experiment)
    no_runner_left.append(exp)
    pid = detach(exp)
    d = alma.experiment.load(exp)
    c = Controller(d)
    try:
        c.follow()
        wait_until(lambda: c.status_label.value == ELSEWHERE, timeout=10)
        assert c.start_button.disabled and not c.stop_button.disabled
        assert c.start_button.description == "Start detached"
        c.stop_button.click()
        wait_until(lambda: c.status_label.value == "paused", timeout=30)
        assert gone(pid) or runner_of(exp) is None
        assert not c.start_button.disabled and c.stop_button.disabled
        c.start_button.click()  # resumes detached: it outlives this process too
        holder = runner_of(exp)
        assert holder is not None and holder.detached and holder.pid not in (pid, os.getpid())
        wait_until(lambda: c.status_label.value == ELSEWHERE, timeout=10)
        assert d.stop() is True
    finally:
        c.close()
        d.close()


@pytest.mark.timeout(120)
def test_magics_stop_a_remote_runner_and_start_detached(
    make_experiment: ExperimentFactory, no_runner_left: list[Path]
) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from alma.notebook.magics import AlmaMagics

    exp = slow_experiment(make_experiment)
    no_runner_left.append(exp)
    ip = InteractiveShell.instance()
    magics = AlmaMagics(shell=ip)
    try:
        magics.alma(f"start --detach {exp}")
        holder = runner_of(exp)
        assert holder is not None and holder.detached
        assert magics.dispatcher is not None and not magics.dispatcher.running
        magics.alma("stop")
        assert runner_of(exp) is None and magics.dispatcher.progress.status == "paused"
    finally:
        if magics.dispatcher is not None:
            magics.dispatcher.close()


@pytest.mark.timeout(60)
def test_a_planted_log_link_is_refused_and_its_target_untouched(
    make_experiment: ExperimentFactory, tmp_path: Path
) -> None:
    exp = slow_experiment(make_experiment)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    Path(f"{state_of(exp)}.log").symlink_to(victim)
    out = alma_cli("run", "--detach", exp)
    assert out.returncode == 3 and "log file" in out.stderr
    assert victim.read_text() == "precious\n" and runner_of(exp) is None
