"""Run in worker processes: real parallelism for CPU-bound Python, and runs that can be killed.

Design: one driver thread per worker slot in the dispatcher's process, each owning one
long-lived child process and a socket pair to it. The driver keeps its child a small
window of runs ahead (:class:`_Slot`: sized from the runs' durations, so short runs
never wait for a round trip), relays the child's checkpoints to the dispatcher
(acknowledging each only once it is committed, so ``save_callback`` stays durable),
and reports each outcome as it comes back. No process is started per run.

Why a plain ``python -c`` child instead of :mod:`multiprocessing`: ``spawn`` and
``forkserver`` re-import the user's ``__main__`` in every child, which re-runs an
unguarded script (and fails); ``fork`` is unsafe in a process that has threads. Our
child imports only :mod:`alma.executors.worker` (the child side, light on imports:
start-up is paid on every start and after every crash), then the run function as
:func:`alma.runfunc.ship` packed it:
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
import itertools
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Interrupted
from ..records import DONE, FAILED, Outcome, Task
from ..runfunc import ShippedRun, ship
from .base import Executor, RunSource
from .worker import ACK, Checkpoint, Failure, Init, Pipe, to_wire

#: Seconds a new worker process may take to import alma and the run function.
STARTUP_TIMEOUT = 120.0

#: The child's entry point: kept tiny, so the child imports nothing but what it needs.
#: It imports the alma this process runs (its folder is argv[2]): ``python -c`` puts
#: the current folder first on sys.path, where an ``alma`` folder (a clone, a project's
#: own package) would be imported instead. The child takes this process's sys.path
#: once it has started.
_CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[2]); from alma.executors.worker import main; main()"
)
#: The folder the alma package of this process is in.
_ALMA_HOME = str(Path(__file__).resolve().parents[2])


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

    def __init__(self, proc: subprocess.Popen[bytes], conn: Pipe) -> None:
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
        self.start_threads(source, lambda: _Slot(self, source).drive(), "alma-process-driver")

    def stop(self) -> None:
        """Kill every worker process now; their drivers abandon the runs (owed again)."""
        with self._lock:
            self._stopped = True
            children = list(self._children)
        for child in children:
            child.kill()

    def _spawn(self) -> _Child | Failure:
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
                    [sys.executable, "-c", _CHILD_CODE, str(child_sock.fileno()), _ALMA_HOME],
                    pass_fds=(child_sock.fileno(),),
                    stdin=subprocess.DEVNULL,
                    # Its own process group: stop and timeouts end what a run started,
                    # and Ctrl-C in a terminal reaches only the dispatcher, which decides.
                    start_new_session=True,
                )
            finally:
                child_sock.close()
            child = _Child(proc, Pipe(parent_sock))
            self._children.add(child)
        try:
            child.conn.send(Init(list(sys.path), self._shipped))
            answer = child.conn.receive(STARTUP_TIMEOUT)
            if answer is None:
                raise TimeoutError(f"no answer within {STARTUP_TIMEOUT:g} s")
            (msg,) = answer
        except (EOFError, OSError, TimeoutError) as exc:
            self._forget(child)
            code = child.reap()
            if self._stopped:
                raise _AbortedError from None
            why = describe_exit(code, proc.pid) if not isinstance(exc, TimeoutError) else str(exc)
            return Failure(f"WorkerDied: a new worker process failed to start: {why}")
        if isinstance(msg, Failure):
            self._forget(child)
            child.reap()
            return Failure(
                f"the worker process could not load the run function: {msg.error}", msg.traceback
            )
        return child

    def _forget(self, child: _Child) -> None:
        with self._lock:
            self._children.discard(child)


#: Seconds of queued work a worker process holds beyond the run it executes: enough
#: to cover the round trip to its driver (an outcome back, the next runs out), so the
#: child never waits for work. Each window is sized from the runs' measured duration.
PREFETCH_SECONDS = 0.004
#: Most runs a worker process holds at a time (its window): bounds what a stop or a
#: crash hands back, and what ``progress.running`` shows for very short runs.
MAX_WINDOW = 64
#: Runs longer than this (moving average) get no prefetch: a run queued behind a long
#: one could wait while another worker idles at the end of the plan, which costs more
#: than the round trip it saves.
LONG_RUN = 0.05


@dataclass(slots=True)
class _Entry:
    """A run in a worker's window, with the attempts it has made so far."""

    task: Task
    #: The attempt under way or queued (1 = the first).
    attempt: int = 1
    #: Seconds spent in the attempts that have ended.
    spent: float = 0.0


class _Slot:
    """One worker slot: a driver thread here, one child process, and a window of runs.

    The driver sends the child a few runs ahead (``window``, in the order the child
    runs them), so a short run never waits for a round trip to the driver. The child
    runs them one by one and answers each with its outcome; so the window's head is the
    run executing now, and it started when the previous outcome arrived. Everything
    per-run keys on the head: its ``timeout``, its checkpoints, and a crash, which
    fails the head alone while the rest of the window goes to a fresh child.
    """

    def __init__(self, executor: ProcessExecutor, source: RunSource) -> None:
        self.ex = executor
        self.source = source
        self.child: _Child | None = None
        self.window: deque[_Entry] = deque()  # sent to the child (or to be), in order
        self.sent = 0  # entries of the window the current child has been sent
        self.head_since = 0.0  # when the head started, as seen from here
        self.mean: float | None = None  # moving average of run durations
        self.dry = False  # the session had no more runs: none will come
        self.ended: list[tuple[Task, Outcome]] = []  # runs ended, to report

    def drive(self) -> None:
        """Until nothing is owed or in flight: top up the window, handle one message."""
        try:
            while True:
                self.fill()
                if not self.window:
                    return
                self.step()
        except _AbortedError:
            pass
        finally:
            for entry in self.window:  # a stop, or a bug: none stays in flight
                self.source.abandon(entry.task)
            self.window.clear()
            if self.child is not None:
                self.ex._forget(self.child)
                self.child.reap()

    def target(self) -> int:
        """How many runs the child should hold, from how long runs take."""
        if self.mean is None or self.mean >= LONG_RUN:
            return 1
        return min(1 + math.ceil(PREFETCH_SECONDS / max(self.mean, 1e-6)), MAX_WINDOW)

    def fill(self) -> None:
        """Take runs from the session up to the window's size (once it is half empty,
        so that runs go out to the child several per message)."""
        target = self.target()
        if self.dry or len(self.window) > target // 2:
            return
        tasks = self.source.next_tasks(target - len(self.window))
        self.dry = len(tasks) < target - len(self.window)
        self.window.extend(map(_Entry, tasks))

    def step(self) -> None:
        """Make sure a child holds the window, then handle what it says next."""
        if self.child is None:
            spawned = self.ex._spawn()
            if isinstance(spawned, Failure):
                self.attempt_ended(spawned, 0.0)
                self.flush()
                return
            self.child, self.sent = spawned, 0
        if self.sent < len(self.window):
            idle = self.sent == 0
            batch = [to_wire(e.task) for e in itertools.islice(self.window, self.sent, None)]
            self.sent = len(self.window)
            if idle:
                self.began()
            with contextlib.suppress(OSError):  # the child is gone: the receive says how
                self.child.conn.send(batch)
        try:
            self.receive(self.child)
        finally:
            self.flush()

    def flush(self) -> None:
        """Report the runs that ended, in one call to the session."""
        if self.ended:
            ended, self.ended = self.ended, []
            self.source.report_all(ended)

    def receive(self, child: _Child) -> None:
        """The child's next messages: the head's outcome or checkpoint (then the next
        run's, and so on), or why the child ended (a crash, the timeout, a stop)."""
        timeout = self.ex.timeout
        try:
            left = None if timeout is None else self.head_since + timeout - time.monotonic()
            messages = child.conn.receive(None if left is None else max(left, 0.0))
        except (EOFError, OSError):
            code = self.lose_child()
            self.attempt_ended(
                Failure(describe_exit(code, child.proc.pid)), time.monotonic() - self.head_since
            )
            return
        if messages is None:
            self.lose_child()
            self.attempt_ended(
                Failure(
                    f"TimeoutError: timeout after {timeout:g} s; the worker "
                    f"process (pid {child.proc.pid}) was ended"
                ),
                time.monotonic() - self.head_since,
            )
            return
        for msg in messages:
            if type(msg) is tuple:  # an outcome: the head's attempt ended
                status, result, error, tb, attempts, d, ended_at = msg
                self.mean = d if self.mean is None else 0.8 * self.mean + 0.2 * d
                self.attempt_ended(Outcome(status, result, error, tb, attempts, d, 0, ended_at), d)
                self.began()  # the child has begun the next run it holds
                continue
            assert isinstance(msg, Checkpoint), msg
            self.flush()  # the runs that ended before need not wait for this commit
            task = self.window[0].task
            task.checkpoint = msg.state
            try:
                self.source.checkpoint(task, msg.state)  # returns once committed
            except Interrupted:
                self.lose_child()
                raise _AbortedError from None
            with contextlib.suppress(OSError):
                child.conn.send(ACK)

    def began(self) -> None:
        """The child has begun the window's head, if it holds one: that run's timeout
        counts from now, and it is running (the runs behind it are queued)."""
        self.head_since = time.monotonic()
        if self.sent:
            self.window[0].task.started = time.time()

    def lose_child(self) -> int | None:
        """End the child (dead, stuck or stopped); the window goes to the next one.
        Raises _AbortedError when it ended because of a stop."""
        child, self.child, self.sent = self.child, None, 0
        assert child is not None
        self.ex._forget(child)
        code = child.reap()
        if self.ex._stopped:
            raise _AbortedError
        return code

    def attempt_ended(self, ended: Outcome | Failure, seconds: float) -> None:
        """The head's attempt ended: report the run, or queue its next attempt.

        Retries live here, not in the child, so a timeout or a dead child counts as one
        failed attempt like an exception does, and each attempt gets the full timeout.
        """
        entry = self.window[0]
        entry.spent += seconds
        done = isinstance(ended, Outcome) and ended.status == DONE
        if not done and entry.attempt <= self.ex.retries:
            entry.attempt += 1
            if self.child is not None:  # it goes on with the window: retry at its end
                entry.task.started = 0.0  # queued again
                self.window.rotate(-1)
                self.sent -= 1
            return  # else the head is the first run the next child gets
        self.window.popleft()
        if self.child is not None:
            self.sent -= 1
        if isinstance(ended, Failure):
            ended = Outcome(FAILED, None, ended.error, ended.traceback, entry.attempt, 0.0)
        ended.attempts, ended.duration = entry.attempt, entry.spent
        self.ended.append((entry.task, ended))


__all__ = ["ProcessExecutor", "describe_exit"]
