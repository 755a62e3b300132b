"""The worker process of the ``"processes"`` executor, and what it says to its driver.

A module of its own because every worker process imports it before it can run
anything, and worker start-up is paid on every start and after every crash: it
imports what a worker needs (the socket framing, :func:`~alma.executors.base.execute`,
the run function's caller) and nothing of the dispatcher's side (``subprocess``, the
driver threads, SQLite). :mod:`alma.executors.processes` is the other end.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, NamedTuple

from ..records import RunKey, Task
from ..runfunc import ShippedRun, make_caller, unship
from .base import execute


class Pipe:
    """One end of the socket between a driver and its child: messages framed as
    :mod:`multiprocessing.connection` frames them (a length, then a pickle), without
    importing it (the child starts faster).

    Reading takes whatever has arrived in one system call and splits it into messages,
    so a burst of short runs' outcomes costs one wake-up and one read here instead of
    two reads each: the parent serves every worker, and its time per run is what
    limits throughput on tiny runs.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        n = len(data)
        head = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        self.sock.sendall(head + data)

    def receive(self, timeout: float | None = None) -> list[Any] | None:
        """The messages that have arrived, waiting up to ``timeout`` seconds (None: as
        long as it takes) for the first; None when none came in time. Raises EOFError
        once the child has closed its end (it died, or was killed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (messages := self._split()):
            if deadline is not None:
                ready, _, _ = select.select(
                    [self.sock], [], [], max(deadline - time.monotonic(), 0)
                )
                if not ready:
                    return None
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError
            self._buf += data
        return messages

    def _split(self) -> list[Any]:
        buf, pos, messages = self._buf, 0, []
        while len(buf) - pos >= 4:
            (size,) = struct.unpack_from("!i", buf, pos)
            head = 4
            if size == -1:
                if len(buf) - pos < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, pos + 4)
                head = 12
            end = pos + head + size
            if len(buf) < end:
                break
            messages.append(pickle.loads(buf[pos + head : end]))
            pos = end
        if pos:
            del buf[:pos]
        return messages

    def close(self) -> None:
        self.sock.close()


# -- the messages between the driver and its child -------------------------------------
#
# Runs and outcomes, the messages of every run, travel as plain tuples: pickling a
# slotted dataclass runs Python code per object (its __getstate__ and __setstate__),
# which took about 40% of the dispatcher's GIL time per run on no-op runs (py-spy).


def to_wire(task: Task) -> tuple[Any, ...]:
    """What a worker process needs of a run: what ``run()`` may receive."""
    return (task.path, task.iteration, task.params, task.seed, task.checkpoint)


#: Runs rebuilt in a worker process carry no key and no instance name: only the
#: driver, which keeps the original Task, reports them.
_NO_KEY = RunKey(-1, -1, -1)


def from_wire(fields: tuple[Any, ...]) -> Task:
    path, iteration, params, seed, checkpoint = fields
    return Task(_NO_KEY, "", path, iteration, params, seed, checkpoint)


class Init(NamedTuple):
    """First message to a child: the parent's import path and the run function."""

    sys_path: list[str]
    run: ShippedRun


class Checkpoint(NamedTuple):
    """A child's run called ``save_callback``: the parent commits it, then acks."""

    state: str


class Failure(NamedTuple):
    """Why an attempt ended without an outcome from the run: the child could not start
    or load the run function, died, or ran over the timeout."""

    error: str
    traceback: str | None = None


#: A child's answer to Init once the run function is loaded.
READY = "ready"
#: The parent's answer to a checkpoint, once committed.
ACK = "ok"


# -- the worker process ----------------------------------------------------------------


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


def main() -> None:
    """Serve runs over the socket given in argv until the parent closes it."""
    # Ctrl-C in a terminal reaches the whole process group; the dispatcher decides
    # what a stop means (it kills us), so a run must not die of it on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Pipe(socket.socket(fileno=int(sys.argv[1])))
    _watch_parent()
    try:
        init: Init = (conn.receive() or [None])[0]  # None only with a timeout
    except (EOFError, OSError):
        return
    try:
        sys.path[:] = init.sys_path
        caller = make_caller(unship(init.run))
    except BaseException as exc:
        conn.send(Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    conn.send(READY)

    queued: deque[Task] = deque()  # runs sent ahead by the driver, in order

    def receive() -> bool:
        """Take what the driver sent: runs to queue, or the answer to a checkpoint."""
        acked = False
        for msg in conn.receive() or ():  # None only with a timeout
            if msg == ACK:
                acked = True
            else:
                queued.extend(map(from_wire, msg))
        return acked

    def checkpoint(task: Task, text: str) -> None:
        # The parent answers once the checkpoint is committed; on a stop it kills this
        # process instead, so there is nothing else to answer. Runs it sent ahead
        # meanwhile wait their turn.
        conn.send(Checkpoint(text))
        while not receive():
            pass

    while True:
        if not queued:
            try:
                receive()
            except (EOFError, OSError):
                return
            continue
        o = execute(caller, queued.popleft(), checkpoint, 0)
        # A plain tuple (see to_wire); ended_at by this machine's clock, as it is
        # reported a little later.
        conn.send((o.status, o.result, o.error, o.traceback, o.attempts, o.duration, time.time()))
