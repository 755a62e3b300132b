"""One running dispatcher per experiment, across the processes and kernels of a machine.

An exclusive ``fcntl.flock`` on ``<state>.lock``: the OS releases it when the holder
dies, so a crash or ``kill -9`` never leaves a stale lock behind. The holder writes its
pid and host into the file only so that the error can say who holds it. The file is
never deleted: removing a lock file while another process waits on it breaks the lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import LockedError, StateError


class ExperimentLock:
    """Exclusive, crash-safe lock on one state file."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise LockedError naming the holder."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(
                f"Cannot create the lock file {self.path} ({exc.strerror}). Check that the "
                "folder of the state file still exists and is writable."
            ) from None
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A reader's holder() probe holds a shared lock for microseconds.
                if attempt < 4:
                    time.sleep(0.01)
        else:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if holder.startswith(f"pid {os.getpid()} "):
                raise LockedError(
                    f"The experiment using {self.path.with_suffix('')} is already running in "
                    "this process, from another Dispatcher object (e.g. an earlier load). "
                    "Use that one, or call its stop() first."
                )
            raise LockedError(
                f"The experiment using {self.path.with_suffix('')} is already running "
                f"({holder}). Stop it there first, or wait for it to finish; loading and "
                "reading results stay allowed meanwhile."
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(
            fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {stamp}\n".encode(), 0
        )
        self._fd = fd

    def holder(self) -> str | None:
        """Who holds the lock, when another process (or dispatcher) does; else None."""
        if self._fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)  # never creates the file: reading only
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # also drops the probe's shared lock
        return None

    def release(self) -> None:
        """Release the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
