"""Run in worker processes: real parallelism for CPU-bound Python, and runs that can be killed.

Design: one driver thread per worker slot in the dispatcher's process, each owning one
long-lived child process and a socket pair to it. The driver loops: pull a task, send it
to its child, relay the child's checkpoints to the dispatcher (acknowledging each only
once it is committed, so ``save_callback`` stays durable), receive the outcome, report
it. No process is started per run, so dispatch costs one small message each way.

Why a plain ``python -c`` child instead of :mod:`multiprocessing`: ``spawn`` and
``forkserver`` re-import the user's ``__main__`` in every child, which re-runs an
unguarded script (and fails); ``fork`` is unsafe in a process that has threads. Our
child imports only alma, then the run function: by path for a file experiment (the
same way the dispatcher imported it), or with cloudpickle for a function defined
elsewhere (a notebook cell is pickled by value).

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
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Interrupted
from .base import Executor, Outcome, RunSource, Task, execute

#: Seconds a new worker process may take to import alma and the run function.
STARTUP_TIMEOUT = 120.0

#: The child's entry point: kept tiny, so the child imports nothing but what it needs.
_CHILD_CODE = "import sys; from alma.executors.processes import _child_main; _child_main()"


def run_payload(run: Callable[..., Any]) -> tuple[str, Any]:
    """How the child finds the run function: ("path", file) or ("pickle", bytes).

    A run loaded from an experiment's module lives in a module alma named ``alma_run_*``
    that no other process can import by name, so the child imports the same file by
    path. Anything else travels with cloudpickle (by reference when importable, by value
    when defined in ``__main__``, e.g. a notebook cell).
    """
    module = getattr(run, "__module__", None) or ""
    if module.startswith("alma_run_"):
        file = getattr(sys.modules.get(module), "__file__", None)
        if file and getattr(run, "__name__", None) == "run":
            return "path", file
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - a dependency of pyalma
        raise ConfigError(
            'executor "processes": the run function must be pickled with cloudpickle, '
            "which is not installed. Install it: pip install cloudpickle."
        ) from None
    try:
        return "pickle", cloudpickle.dumps(run)
    except Exception as exc:
        raise ConfigError(
            f'executor "processes": the run function {getattr(run, "__qualname__", run)!r} '
            f"cannot be sent to a worker process ({type(exc).__name__}: {exc}). Define it at "
            "the top level of a module or notebook cell and do not let it capture "
            "unpicklable objects (open files, locks, connections); or use "
            '"executor": "threads".'
        ) from exc


def load_payload(kind: str, data: Any) -> Callable[..., Any]:
    """Inverse of :func:`run_payload`, in a worker."""
    if kind == "path":
        from ..spec import load_module_run

        return load_module_run(Path(data), data)
    import cloudpickle

    return cloudpickle.loads(data)  # type: ignore[no-any-return]


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

    name = "processes"
    aborts_runs = True
    enforces_timeout = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._stopped = False
        self._children: set[_Child] = set()
        self._payload: tuple[str, Any] | None = None

    # -- Executor interface ----------------------------------------------------------

    def start(self, source: RunSource) -> None:
        if os.name != "posix":
            raise ConfigError(
                'executor "processes" needs a POSIX system (Linux, macOS): its workers talk '
                'over an inherited socket. Use "executor": "threads" or "dask" here.'
            )
        # Pickling problems surface here, in start(), before any run is handed out.
        self._payload = run_payload(self.run)

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
            if child is None:
                child, error = self._spawn()
                if error is not None:
                    if attempt <= self.retries:
                        continue
                    elapsed = time.perf_counter() - start
                    return Outcome("failed", None, error[0], error[1], attempt, elapsed), None
            assert child is not None
            status, result, err, tb, keep = self._attempt(source, task, child)
            if not keep:
                self._forget(child)
                child.reap()
                child = None
            if status == "failed" and attempt <= self.retries:
                continue
            return Outcome(status, result, err, tb, attempt, time.perf_counter() - start), child

    def _attempt(
        self, source: RunSource, task: Task, child: _Child
    ) -> tuple[str, str | None, str | None, str | None, bool]:
        """One attempt: (status, result, error, traceback, child still usable)."""
        conn = child.conn
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with contextlib.suppress(OSError):  # the child is gone: the recv below says how
            conn.send(("run", task.path, task.iteration, task.state))
        while True:
            try:
                if deadline is not None and not conn.poll(max(deadline - time.monotonic(), 0.0)):
                    if self._stopped:
                        raise _AbortedError
                    return (
                        "failed",
                        None,
                        f"TimeoutError: timeout after {self.timeout:g} s; the worker "
                        f"process (pid {child.proc.pid}) was ended",
                        None,
                        False,
                    )
                msg = conn.recv()
            except (EOFError, OSError):
                if self._stopped:
                    self._forget(child)
                    child.reap()
                    raise _AbortedError from None
                self._forget(child)
                code = child.reap()
                return "failed", None, describe_exit(code, child.proc.pid), None, False
            kind = msg[0]
            if kind == "ckpt":
                task.state = msg[1]
                try:
                    source.checkpoint(task, msg[1])  # returns once committed
                except Interrupted:
                    self._forget(child)
                    child.reap()
                    raise _AbortedError from None
                with contextlib.suppress(OSError):
                    conn.send("ok")
            elif kind == "outcome":
                return msg[1], msg[2], msg[3], msg[4], True
            else:  # "interrupted": only after a "stop" reply, which we never send
                raise _AbortedError

    def _spawn(self) -> tuple[_Child | None, tuple[str, str | None] | None]:
        """Start a worker process and load the run function in it.

        Returns (child, None), or (None, (error, traceback)) when the child could not
        load the run function. Raises _AbortedError when a stop came first.
        """
        assert self._payload is not None
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
        kind, data = self._payload
        try:
            child.conn.send(("init", list(sys.path), kind, data))
            if not child.conn.poll(STARTUP_TIMEOUT):
                raise TimeoutError(f"no answer within {STARTUP_TIMEOUT:g} s")
            msg = child.conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self._forget(child)
            code = child.reap()
            if self._stopped:
                raise _AbortedError from None
            why = describe_exit(code, proc.pid) if not isinstance(exc, TimeoutError) else str(exc)
            return None, (f"WorkerDied: a new worker process failed to start: {why}", None)
        if msg[0] != "ready":
            self._forget(child)
            child.reap()
            return None, (
                f"the worker process could not load the run function: {msg[1]}",
                msg[2],
            )
        return child, None

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
        _, path, kind, data = conn.recv()
    except (EOFError, OSError):
        return
    try:
        sys.path[:] = path
        from ..spec import make_caller

        caller = make_caller(load_payload(kind, data))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    conn.send(("ready",))

    def checkpoint(task: Task, text: str) -> None:
        conn.send(("ckpt", text))
        if conn.recv() != "ok":
            raise Interrupted("stopped")

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "run":
            return
        task = Task((0, 0), "", msg[1], msg[2], msg[3])
        try:
            out = execute(caller, task, checkpoint, 0)
        except Interrupted:
            conn.send(("interrupted",))
            continue
        conn.send(("outcome", out.status, out.result, out.error, out.traceback))


__all__ = ["ProcessExecutor", "describe_exit", "load_payload", "run_payload"]
