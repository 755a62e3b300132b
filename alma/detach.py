"""Detached runners: an experiment that runs in its own background process.

``alma run --detach`` and ``Dispatcher.start(detach=True)`` call :func:`launch`, which
starts ``python -m alma _runner`` as a new session (no controlling terminal, so closing
the terminal sends it no SIGHUP), stdin closed, stdout and stderr appended to
``<state>.log``. The runner is an ordinary ``alma run``: it takes the experiment's lock
(the lock decides between racing launches: the loser exits 4), writes into the lock
file that it is detached and where its log is, and pauses on ``alma stop`` (see
:mod:`alma.control`) or SIGTERM. :func:`launch` returns once the runner holds the lock,
or raises what made it exit (ConfigError for 2, StateError for 3, LockedError for 4)
with the runner's own message.

What the runner runs: an experiment read from an ``.experiment`` file is read again
from that file by the runner (``Spec.source``). One defined in code
(``alma.Experiment(run=f)``, e.g. in a notebook cell) travels by value: the Spec and
the function, cloudpickled as the processes executor ships functions
(:func:`alma.runfunc.ship`), in ``<state>.detach-<pid>``, a file created ``0600`` with
``O_EXCL`` and ``O_NOFOLLOW`` that the runner reads only when it is the user's own and
private, then deletes.

Zombies: the launcher reaps its runner in a daemon thread, so a kernel that launched
one and lives on does not collect a zombie when the runner ends; a launcher that ends
first leaves the runner to init, which reaps it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

from .errors import AlmaError, ConfigError, LockedError, StateError
from .lock import ExperimentLock, Holder
from .runfunc import ShippedRun, ship, unship
from .spec import Spec

#: Seconds a runner may take to import alma and the run module and take the lock.
START_TIMEOUT = 120.0
#: Exit codes of ``alma run`` and the errors they stand for (see alma.cli).
_ERRORS: dict[int, type[AlmaError]] = {2: ConfigError, 3: StateError, 4: LockedError}


class Launched(NamedTuple):
    """A runner that :func:`launch` started."""

    pid: int
    log: Path
    #: The runner as the lock file names it; None when it ended at once, with exit code
    #: 0, because nothing was owed.
    holder: Holder | None


def log_path(state_path: Path) -> Path:
    """Where a detached runner of this experiment writes its output."""
    return state_path.with_name(state_path.name + ".log")


def _open_private(path: Path, flags: int, what: str) -> int:
    """Open ``path`` as a plain file of the user's own, following no symlink."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StateError(f"Cannot open the {what} {path} ({exc.strerror}).") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.getuid():
        os.close(fd)
        raise StateError(
            f"The {what} {path} is not a plain file of your own; alma will not use it. "
            "Remove it, then start again."
        )
    return fd


def launch(spec: Spec, timeout: float = START_TIMEOUT) -> Launched:
    """Start a detached runner for ``spec`` and return once it holds the lock."""
    log = log_path(spec.state_path)
    log_fd = _open_private(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "log file")
    offset = os.fstat(log_fd).st_size
    shipped: Path | None = None
    try:
        command = [sys.executable, "-m", "alma", "_runner", "--log", str(log)]
        if spec.source is not None:
            command += ["--experiment", str(spec.source)]
        else:
            shipped = _write_spec(spec)
            command += ["--spec", str(shipped)]
        env = dict(os.environ)
        # The runner imports the same alma as this process, whatever sys.path did here.
        here = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        if env.get("MPLBACKEND", "").startswith("module://"):  # a kernel's inline plots
            del env["MPLBACKEND"]
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            cwd=os.getcwd(),
            env=env,
            close_fds=True,
        )
    except BaseException:
        if shipped is not None:
            with contextlib.suppress(OSError):
                shipped.unlink()
        raise
    finally:
        os.close(log_fd)
    try:
        return _await_lock(spec, proc, log, offset, timeout)
    finally:
        if shipped is not None:
            with contextlib.suppress(OSError):
                shipped.unlink()  # read by now, or never will be


def _await_lock(
    spec: Spec, proc: subprocess.Popen[bytes], log: Path, offset: int, timeout: float
) -> Launched:
    lock = ExperimentLock(spec.state_path)
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        holder = lock.holder_info()
        if holder is not None and holder.pid == proc.pid:
            threading.Thread(target=proc.wait, name="alma-reap", daemon=True).start()
            return Launched(proc.pid, log, holder)
        if code is not None:
            if code == 0:
                return Launched(proc.pid, log, None)
            message = _runner_message(log, offset) or f"see {log}"
            kind = _ERRORS.get(code, AlmaError)
            if kind is AlmaError:
                message = f"the detached runner exited with code {code}: {message}"
            raise kind(message)
        if time.monotonic() > deadline:
            threading.Thread(target=proc.wait, name="alma-reap", daemon=True).start()
            raise AlmaError(
                f"the detached runner (pid {proc.pid}) has not taken the lock after "
                f"{timeout:g} s; it may still be importing the run module. See {log}."
            )
        time.sleep(0.02)


def _runner_message(log: Path, offset: int) -> str:
    """What the runner said about its failure: its ``alma: error:`` lines, else its
    last lines (e.g. a traceback)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read(64_000).decode(errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line.removeprefix("alma: error: ") for line in lines if "alma: error: " in line]
    return "\n".join(errors or lines[-5:])


# -- an experiment defined in code travels by value -----------------------------------


class _Shipment(NamedTuple):
    spec: Spec  # with run None
    run: ShippedRun
    #: The launcher's import path: the runner can import what the function imports.
    path: list[str]


def _write_spec(spec: Spec) -> Path:
    import cloudpickle

    assert spec.run is not None, "an experiment defined in code always has its run"
    shipped = ship(spec.run, spec.executor.name, "a detached runner", remote=True)
    payload = cloudpickle.dumps(
        _Shipment(dataclasses.replace(spec, run=None), shipped, list(sys.path))
    )
    path = spec.state_path.with_name(f"{spec.state_path.name}.detach-{secrets.token_hex(6)}")
    fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "runner file")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
    except BaseException:
        path.unlink()
        raise
    return path


def read_spec(path: Path) -> Spec:
    """In the runner: the Spec that :func:`launch` wrote, with its run function. Only a
    private file of this user's own is unpickled (pickles can run code)."""
    import pickle

    fd = _open_private(path, os.O_RDONLY, "runner file")
    try:
        if os.fstat(fd).st_mode & 0o077:
            raise StateError(f"{path} is readable or writable by others; alma will not load it.")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            data = f.read()
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
    shipment = pickle.loads(data)
    for entry in reversed(shipment.path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    spec: Spec = shipment.spec
    return dataclasses.replace(spec, run=unship(shipment.run))
