"""Remote control of a running experiment: ``alma stop`` and a view's ``stop()``.

The channel is a small request file next to the state, ``<state>.stop``, that the
process holding the experiment's lock polls while it runs (:class:`StopWatcher`).

Why a file and not a signal: the lock holder may be a notebook kernel (where SIGINT
interrupts the cell being run and SIGTERM or SIGUSR1 would kill it unless a handler was
installed from its main thread, which ``start()`` called from a widget callback cannot
promise), ``alma run`` in another terminal, or a detached runner; a file reaches all
three alike, works across hosts that share the state's folder, and needs no change to
the state file's schema. Who may ask: the request is honoured only when it is a plain
file owned by the owner of the state file (created ``0600`` with ``O_EXCL`` and
``O_NOFOLLOW``, as the lock is), so another user who can write to the folder cannot
pause someone's runner. Nothing listens on a network interface.

A request names the runner it is for (pid and host, from the lock file), so a request
left over from an earlier runner never pauses the next one: that runner deletes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import StateError
from .lock import Holder

#: Seconds between two looks at the request file: the latency of ``alma stop``.
POLL_INTERVAL = 0.1


def request_path(state_path: Path) -> Path:
    """Where stop requests for the experiment with this state file are written."""
    return state_path.with_name(state_path.name + ".stop")


def _target(holder: Holder) -> str:
    return f"pid {holder.pid} on host {holder.host}\n"


def request_stop(state_path: Path, holder: Holder) -> None:
    """Ask ``holder`` (the lock's holder) to pause, as ``stop()`` does there.

    Raises StateError when the request cannot be written (a read-only folder, a planted
    symlink)."""
    owner = _owner(state_path)
    if os.getuid() != owner:
        raise StateError(
            f"Only the owner of {state_path} (uid {owner}) can stop its runner "
            f"({holder.describe()}); you are uid {os.getuid()}."
        )
    path = request_path(state_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # an earlier request (stale, or the same one again)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.EEXIST:  # another stop raced us: its request says the same
            return
        raise StateError(
            f"Cannot write the stop request {path} ({exc.strerror}); the runner "
            f"({holder.describe()}) was not asked to stop."
        ) from None
    try:
        os.write(fd, _target(holder).encode())
    finally:
        os.close(fd)


def withdraw(state_path: Path) -> None:
    """Remove a request nobody consumed (its runner ended before seeing it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(request_path(state_path))


def _owner(state_path: Path) -> int:
    """uid whose requests count: the state file's owner (this process's, before the
    state file exists)."""
    try:
        return os.stat(state_path).st_uid
    except OSError:
        return os.getuid()


def take_request(state_path: Path, me: Holder) -> bool:
    """True when a valid stop request for ``me`` is waiting (it is consumed). A request
    for another runner (stale) is deleted; one from another user is ignored."""
    path = request_path(state_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # none (the common case), or a planted symlink: never followed
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != _owner(state_path):
            return False
        text = os.read(fd, 200).decode(errors="replace")
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # consumed, or stale: either way nobody else will act on it
    return text == _target(me)


class StopWatcher:
    """A daemon thread in the lock holder that polls for stop requests while a session
    is open, and calls ``on_stop`` (once) when one for this holder arrives."""

    def __init__(self, state_path: Path, me: Holder, on_stop: Callable[[], None]) -> None:
        self._state_path = state_path
        self._me = me
        self._on_stop = on_stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="alma-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop polling (also from inside ``on_stop``, which may end the session)."""
        self._done.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._done.wait(POLL_INTERVAL):
            try:
                asked = take_request(self._state_path, self._me)
            except OSError:  # the folder went away: the session's writer says so loudly
                continue
            if asked and not self._done.is_set():
                self._on_stop()
                return
