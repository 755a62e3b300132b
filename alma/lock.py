"""One running dispatcher per experiment, across the processes and kernels of a machine.

An exclusive ``fcntl.flock`` on ``<state>.lock``: the OS releases it when the holder
dies, so a crash or ``kill -9`` never leaves a stale lock behind. The holder writes who
it is into the file (:class:`Holder`: pid, host, since when, whether it is a detached
runner and its log), so that errors and ``alma status`` can name it and ``alma stop``
can address it. The file is never deleted: removing a lock file while another process
waits on it breaks the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import NamedTuple

from .errors import LockedError, StateError

#: Bytes of the lock file read back: the holder's two lines, long log paths included.
_HOLDER_BYTES = 8192


class Holder(NamedTuple):
    """Who holds an experiment's lock, as it wrote itself into the lock file."""

    pid: int
    host: str
    #: Local time the holder took the lock, ``YYYY-mm-dd HH:MM:SS``.
    since: str
    #: True for a runner started with ``alma run --detach`` / ``start(detach=True)``.
    detached: bool = False
    #: Where a detached runner writes its output, else None.
    log: str | None = None

    def describe(self) -> str:
        """One line for people: ``pid 12 on host h, since …[, detached, log …]``."""
        text = f"pid {self.pid} on host {self.host}, since {self.since}"
        if self.detached:
            text += ", detached"
        if self.log:
            text += f", log {self.log}"
        return text

    def encode(self) -> bytes:
        """The lock file's text: the line for people, then the same as JSON."""
        return f"{self.describe()}\n{json.dumps(self._asdict())}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        """Parse what :meth:`encode` wrote; None for anything else (e.g. an old alma's
        one-line file, or a file torn by a concurrent truncate)."""
        lines = data.decode(errors="replace").splitlines()
        if len(lines) < 2:
            return None
        try:
            fields = json.loads(lines[1])
            return cls(
                pid=int(fields["pid"]),
                host=str(fields["host"]),
                since=str(fields["since"]),
                detached=bool(fields.get("detached", False)),
                log=None if fields.get("log") is None else str(fields["log"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


#: What this process writes as its role when it takes a lock: set once by a detached
#: runner (``alma run --detach`` starts one), so every lock it takes says so.
_detached_log: str | None = None


def mark_detached(log: Path) -> None:
    """Declare this process a detached runner whose output goes to ``log``."""
    global _detached_log
    _detached_log = str(log)


class ExperimentLock:
    """Exclusive, crash-safe lock on one state file."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self._fd: int | None = None
        #: Who this process wrote into the lock file when it last took the lock.
        self.me: Holder | None = None
        # Taking and releasing are atomic for this object's own probes: between the
        # flock and the record of holding it, holder() (a controller's thread, say)
        # would see the lock held by "someone else", this very process.
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise LockedError naming the holder."""
        with self._mutex:
            self._acquire()

    def _acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            # O_NOFOLLOW: a symlink planted at the lock's path must not make alma write
            # (and truncate) whatever it points to.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateError(
                    f"The lock file {self.path} is a symbolic link; alma does not follow it. "
                    "Remove the link, then start again."
                ) from None
            raise StateError(
                f"Cannot create the lock file {self.path} ({exc.strerror}). Check that the "
                "folder of the state file still exists and is writable."
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)  # a hard link to another file: truncating it would damage that one
            raise StateError(
                f"The lock file {self.path} is not a plain file of its own (hard links: "
                f"{st.st_nlink}); alma will not write to it. Remove it, then start again."
            )
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A reader's holder() probe holds a shared lock for microseconds.
                if attempt < 4:
                    time.sleep(0.01)
        else:
            holder = _first_line(os.pread(fd, _HOLDER_BYTES, 0))
            os.close(fd)
            if holder.startswith(f"pid {os.getpid()} "):
                raise LockedError(
                    f"The experiment using {self.path.with_suffix('')} is already running in "
                    "this process, from another Dispatcher object (e.g. an earlier load). "
                    "Use that one, or call its stop() first."
                )
            raise LockedError(
                f"The experiment using {self.path.with_suffix('')} is already running "
                f"({holder}). Pause it with `alma stop` or its dispatcher's stop(), or "
                "wait for it to finish; loading and reading results stay allowed meanwhile."
            ) from None
        os.ftruncate(fd, 0)
        me = Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            since=time.strftime("%Y-%m-%d %H:%M:%S"),
            detached=_detached_log is not None,
            log=_detached_log,
        )
        os.pwrite(fd, me.encode(), 0)
        self.me = me
        self._fd = fd

    def holder(self) -> str | None:
        """Who holds the lock, when another process (or dispatcher) does; else None."""
        data = self._read_held()
        if data is None:
            return None
        found = Holder.decode(data)
        return found.describe() if found is not None else _first_line(data)

    def holder_info(self) -> Holder | None:
        """The :class:`Holder` of the lock, when another process (or dispatcher) holds it
        and wrote itself in alma's format; else None."""
        data = self._read_held()
        return Holder.decode(data) if data else None

    def _read_held(self) -> bytes | None:
        """The lock file's bytes while someone else holds the lock; else None."""
        with self._mutex:
            return None if self._fd is not None else self._probe()

    def _probe(self) -> bytes | None:
        try:
            # Never creates the file (reading only), never follows a planted symlink.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # no lock file, or a planted symlink (acquire refuses it)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, _HOLDER_BYTES, 0) or b"unknown"
        finally:
            os.close(fd)  # also drops the probe's shared lock
        return None

    def release(self) -> None:
        """Release the lock (closing the descriptor releases the flock)."""
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _first_line(data: bytes) -> str:
    return data.decode(errors="replace").strip().split("\n", 1)[0] or "unknown"
