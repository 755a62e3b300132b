"""One running dispatcher per experiment, across the processes and kernels of a machine.

An exclusive ``fcntl.flock`` on ``<state>.lock``: the OS releases it when the holder
dies, so a crash or ``kill -9`` never leaves a stale lock behind. The holder writes its
pid and host into the file only so that the error can say who holds it. The file is
never deleted: removing a lock file while another process waits on it breaks the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
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
            # Never creates the file (reading only), never follows a planted symlink.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # no lock file, or a planted symlink (acquire refuses it)
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
