"""Run in worker processes: real parallelism for CPU-bound Python, and runs that can be killed.

Design: one driver thread per worker slot in the dispatcher's process, each owning one
long-lived child process and a socket pair to it. The driver loops: pull a task, send it
to its child, relay the child's checkpoints to the dispatcher (acknowledging each only
once it is committed, so ``save_callback`` stays durable), receive the outcome, report
it. No process is started per run, so dispatch costs one small message each way.

Why a plain ``python -c`` child instead of :mod:`multiprocessing`: ``spawn`` and
``forkserver`` re-import the user's ``__main__`` in every child, which re-runs an
unguarded script (and fails); ``fork`` is unsafe in a process that has threads. Our
child imports only alma, then the run function as :func:`alma.runfunc.ship` packed it:
an experiment's run module as its source, anything else with cloudpickle (by
reference when importable, by value when defined in ``__main__``, e.g. a notebook cell).

Because the runs live in other processes, the driver can end them: ``stop()`` kills
every child at once (checkpoints saved before stay and come back as ``state``), a run
over ``timeout`` seconds is killed and recorded as failed, and a child that dies
(segfault, ``os._exit``, the OOM killer) fails only its own run; the slot starts a
fresh child and goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from ..errors import ConfigError, Interrupted
from ..records import DONE, FAILED, Outcome, Task
from ..runfunc import ShippedRun, make_caller, ship, unship
from .base import Executor, RunSource, execute

#: Seconds a new worker process may take to import alma and the run function.
STARTUP_TIMEOUT = 120.0

#: The child's entry point: kept tiny, so the child imports nothing but what it needs.
_CHILD_CODE = "import sys; from alma.executors.processes import _child_main; _child_main()"


def describe_exit(returncode: int | None, pid: int) -> str:
    """Why a worker process ended, in words a user can act on."""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = (
            " (the OOM killer sends SIGKILL: did the run run out of memory?)"
            if -returncode == signal.SIGKILL
            else ""
        )
        return f"WorkerDied: the worker process (pid {pid}) was killed by {name}{hint}"
    return f"WorkerDied: the worker process (pid {pid}) died with exit code {returncode}"


class _AbortedError(Exception):
    """The run was aborted by a stop: it is owed again, not failed."""


class _Child:
    """One worker process and the parent's end of its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.proc = proc
        self.conn = conn

    def kill(self) -> None:
        """End the process and whatever it started, at once (safe to call twice).

        The child leads its own process group, so a solver a run started with
        ``subprocess`` ends with it instead of running on as an orphan. Only before
        the child is reaped: until then its pid, hence the group id, cannot be reused.
        """
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):  # already gone
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()

    def reap(self) -> int | None:
        """Kill, close the socket and wait: no zombie, no leaked descriptor."""
        self.kill()
        with contextlib.suppress(OSError):
            self.conn.close()
        return self.proc.wait()


class ProcessExecutor(Executor):
    """``workers`` long-lived worker processes, each driven by one thread here."""

    enforces_timeout = True
    usage = '"processes"'

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._stopped = False
        self._children: set[_Child] = set()
        self._shipped: ShippedRun | None = None

    # -- Executor interface ----------------------------------------------------------

    def start(self, source: RunSource) -> None:
        if os.name != "posix":
            raise ConfigError(
                'executor "processes" needs a POSIX system (Linux, macOS): its workers talk '
                'over an inherited socket. Use "executor": "threads" or "dask" here.'
            )
        # Pickling problems surface here, in start(), before any run is handed out.
        self._shipped = ship(self.run, "processes", "a worker process", remote=False)

        def drive() -> None:
            child: _Child | None = None
            try:
                while (task := source.next_task()) is not None:
                    try:
                        outcome, child = self._run_task(source, task, child)
                    except _AbortedError:
                        child = None
                        source.abandon(task)
                    except BaseException:  # a bug here must not leave the run in flight
                        child = None
                        source.abandon(task)
                        raise
                    else:
                        source.report(task, outcome)
            finally:
                if child is not None:
                    self._forget(child)
                    child.reap()

        self.start_threads(source, drive, "alma-process-driver")

    def stop(self) -> None:
        """Kill every worker process now; their drivers abandon the runs (owed again)."""
        with self._lock:
            self._stopped = True
            children = list(self._children)
        for child in children:
            child.kill()

    # -- one run -----------------------------------------------------------------------

    def _run_task(
        self, source: RunSource, task: Task, child: _Child | None
    ) -> tuple[Outcome, _Child | None]:
        """Run ``task`` with retries; returns its outcome and the child to reuse (if any).

        Retries live here, not in the child, so a timeout or a dead child counts as one
        failed attempt like an exception does, and each attempt gets the full timeout.
        """
        start = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            ended: Outcome | _Failure
            spawned = child if child is not None else self._spawn()
            if isinstance(spawned, _Child):
                child = spawned
                ended = self._attempt(source, task, child)
                if isinstance(ended, _Failure):  # dead or stuck: the next attempt gets a new one
                    self._forget(child)
                    child.reap()
                    child = None
            else:
                ended = spawned
            if (isinstance(ended, Outcome) and ended.status == DONE) or attempt > self.retries:
                break
        if isinstance(ended, _Failure):
            ended = Outcome(FAILED, None, ended.error, ended.traceback, attempt, 0.0)
        return replace(ended, attempts=attempt, duration=time.perf_counter() - start), child

    def _attempt(self, source: RunSource, task: Task, child: _Child) -> Outcome | _Failure:
        """One attempt in ``child``: the child's outcome, or why the child failed."""
        conn = child.conn
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with contextlib.suppress(OSError):  # the child is gone: the recv below says how
            conn.send(task)
        while True:
            try:
                if deadline is not None and not conn.poll(max(deadline - time.monotonic(), 0.0)):
                    if self._stopped:
                        raise _AbortedError
                    return _Failure(
                        f"TimeoutError: timeout after {self.timeout:g} s; the worker "
                        f"process (pid {child.proc.pid}) was ended"
                    )
                msg = conn.recv()
            except (EOFError, OSError):
                self._forget(child)
                code = child.reap()
                if self._stopped:
                    raise _AbortedError from None
                return _Failure(describe_exit(code, child.proc.pid))
            if isinstance(msg, Outcome):
                return msg
            assert isinstance(msg, _Checkpoint), msg
            task.checkpoint = msg.state
            try:
                source.checkpoint(task, msg.state)  # returns once committed
            except Interrupted:
                self._forget(child)
                child.reap()
                raise _AbortedError from None
            with contextlib.suppress(OSError):
                conn.send(_ACK)

    def _spawn(self) -> _Child | _Failure:
        """Start a worker process and load the run function in it; or say why that
        failed. Raises _AbortedError when a stop came first."""
        assert self._shipped is not None
        parent_sock, child_sock = socket.socketpair()
        with self._lock:
            if self._stopped:
                parent_sock.close()
                child_sock.close()
                raise _AbortedError
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _CHILD_CODE, str(child_sock.fileno())],
                    pass_fds=(child_sock.fileno(),),
                    stdin=subprocess.DEVNULL,
                    # Its own process group: stop and timeouts end what a run started,
                    # and Ctrl-C in a terminal reaches only the dispatcher, which decides.
                    start_new_session=True,
                )
            finally:
                child_sock.close()
            child = _Child(proc, Connection(parent_sock.detach()))
            self._children.add(child)
        try:
            child.conn.send(_Init(list(sys.path), self._shipped))
            if not child.conn.poll(STARTUP_TIMEOUT):
                raise TimeoutError(f"no answer within {STARTUP_TIMEOUT:g} s")
            msg = child.conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self._forget(child)
            code = child.reap()
            if self._stopped:
                raise _AbortedError from None
            why = describe_exit(code, proc.pid) if not isinstance(exc, TimeoutError) else str(exc)
            return _Failure(f"WorkerDied: a new worker process failed to start: {why}")
        if isinstance(msg, _Failure):
            self._forget(child)
            child.reap()
            return _Failure(
                f"the worker process could not load the run function: {msg.error}", msg.traceback
            )
        return child

    def _forget(self, child: _Child) -> None:
        with self._lock:
            self._children.discard(child)


# -- the worker process --------------------------------------------------------------


def _watch_parent() -> None:
    """Exit when the dispatcher's process is gone (kill -9): no orphan burns CPU."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                with contextlib.suppress(OSError):  # with what the run started
                    os.killpg(0, signal.SIGKILL)
                os._exit(1)

    threading.Thread(target=watch, name="alma-parent-watch", daemon=True).start()


def _child_main() -> None:
    """Serve runs over the socket given in argv until the parent closes it."""
    # Ctrl-C in a terminal reaches the whole process group; the dispatcher decides
    # what a stop means (it kills us), so a run must not die of it on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    _watch_parent()
    try:
        init: _Init = conn.recv()
    except (EOFError, OSError):
        return
    try:
        sys.path[:] = init.sys_path
        caller = make_caller(unship(init.run))
    except BaseException as exc:
        conn.send(_Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    conn.send(_READY)

    def checkpoint(task: Task, text: str) -> None:
        # The parent answers once the checkpoint is committed; on a stop it kills this
        # process instead, so there is nothing else to answer.
        conn.send(_Checkpoint(text))
        conn.recv()

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(execute(caller, task, checkpoint, 0))


# -- the messages between the driver and its child -------------------------------------


@dataclass(frozen=True)
class _Init:
    """First message to a child: the parent's import path and the run function."""

    sys_path: list[str]
    run: ShippedRun


@dataclass(frozen=True)
class _Checkpoint:
    """A child's run called ``save_callback``: the parent commits it, then acks."""

    state: str


@dataclass(frozen=True)
class _Failure:
    """Why an attempt ended without an outcome from the run: the child could not start
    or load the run function, died, or ran over the timeout."""

    error: str
    traceback: str | None = None


#: A child's answer to _Init once the run function is loaded.
_READY = "ready"
#: The parent's answer to a checkpoint, once committed.
_ACK = "ok"


__all__ = ["ProcessExecutor", "describe_exit"]
