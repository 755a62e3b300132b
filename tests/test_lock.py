"""The per-experiment OS lock, against real second processes.

The lock must stop a second process from running the same experiment, say who holds
it, vanish with a killed holder, and never stop anyone from reading.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from helpers import alma_cli, alma_popen, wait_until

import alma
import alma.experiment
from alma.dispatcher import Dispatcher
from alma.lock import ExperimentLock

#: Runs that wait (checkpointing) until a release file appears: a holder that stays busy.
WAITING_RUN = """
import os, time

def run(instance, save_callback, state, iteration):
    release = os.path.join(os.path.dirname(__file__), "release")
    deadline = time.monotonic() + 60
    while iteration > 0 and not os.path.exists(release) and time.monotonic() < deadline:
        save_callback({"t": time.monotonic()})
        time.sleep(0.01)
    return iteration
"""


def _waiting_experiment(make_experiment) -> Path:
    return make_experiment(WAITING_RUN, iterations=2)


def test_second_process_gets_locked_error_naming_pid_and_host(make_experiment, dispatchers) -> None:
    exp = _waiting_experiment(make_experiment)
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    try:
        wait_until(lambda: d.progress.done >= 3)
        out = alma_cli("run", exp)
        assert out.returncode == 4, out.stderr
        assert f"pid {os.getpid()}" in out.stderr
        assert socket.gethostname() in out.stderr
        assert "already running" in out.stderr
        # Forgetting results is writing: refused too, and nothing is deleted.
        for args in (("reset", "--yes", exp), ("reset", "--failed", exp)):
            reset = alma_cli(*args)
            assert reset.returncode == 4, reset.stderr
            assert f"pid {os.getpid()}" in reset.stderr
        assert len(d.results) >= 3
        # Reading stays allowed meanwhile, from another process too.
        status = alma_cli("status", exp)
        assert status.returncode == 0, status.stderr
        assert "data/file0.txt" in status.stdout
        assert f"running in another process (pid {os.getpid()}" in status.stdout
        assert d.running
    finally:
        (exp.parent / "release").touch()
    assert d.join(timeout=30)
    assert "running in another process" not in alma_cli("status", exp).stdout


def test_second_dispatcher_in_this_process_is_locked_out(make_experiment, dispatchers) -> None:
    exp = _waiting_experiment(make_experiment)
    d = alma.experiment.load(exp)
    dispatchers.append(d)
    d.start()
    try:
        other = Dispatcher(d.spec)  # bypasses load()'s reuse of the live dispatcher
        with pytest.raises(alma.LockedError, match="already running in this process"):
            other.start()
        assert not other.running
        with pytest.warns(UserWarning, match="already running"):
            assert alma.experiment.load(exp) is d  # a re-run cell gets the live one
    finally:
        (exp.parent / "release").touch()
    assert d.join(timeout=30)
    other.start()  # free again once the first session ended
    assert other.join(timeout=30)
    other.close()


def test_lock_released_when_holder_is_killed_and_reading_allowed(make_experiment) -> None:
    exp = _waiting_experiment(make_experiment)
    proc = alma_popen("run", "-q", exp)
    try:
        # Reading while another process holds the lock: load, progress, results, state.
        # One reader, loaded (usually) before the state file exists, follows the commits.
        reader = alma.experiment.load(exp)
        assert reader.progress.done == 0
        wait_until(lambda: reader.progress.done >= 3, timeout=30)
        assert len(reader.results) >= 3
        assert reader.state["done"].sum() >= 3
        with pytest.raises(alma.LockedError):
            reader.start()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    (exp.parent / "release").touch()
    d = alma.experiment.load(exp)
    d.start()  # no stale lock: works right after the kill
    assert d.join(timeout=30)
    assert d.progress.done == 6
    d.close()


def test_a_holder_never_sees_itself_as_another_process(tmp_path: Path) -> None:
    """While one thread takes and releases the lock, another asks who holds it (a
    controller's timer does, while the kernel starts and stops its experiment): the
    answer is always nobody else, never this very process caught half-way."""
    lock = ExperimentLock(tmp_path / "x.sqlite")
    seen: list[str] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            holder = lock.holder()
            if holder is not None:
                seen.append(holder)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(2000):
            lock.acquire()
            lock.release()
    finally:
        done.set()
        prober.join()
    assert seen == []
