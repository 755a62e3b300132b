"""When the controllers redraw: each one's timer, a watcher that wakes them, and the
kernel's cells.

A controller polls its dispatcher on a timer thread (:class:`Timer`) that ends after
``IDLE_GRACE`` quiet seconds, so an idle notebook runs no thread per controller. What
wakes a sleeping timer:

- a button, a display, a ``%alma`` magic (they call ``Controller.follow``);
- the end of any cell (IPython's ``post_run_cell``), for changes a cell made;
- the **watcher**: one daemon thread per kernel that looks every ``WATCH_INTERVAL``
  seconds at the live controllers and wakes the one whose dispatcher runs while its
  timer sleeps. This is what keeps the display moving during a blocking
  ``d.start(); d.join()`` cell, where no button, display or cell end comes until the
  run is over. Its whole cost is reading ``Dispatcher.running`` (an attribute test) per
  live controller twice a second; it ends when no controller is left. The engine needs
  no callback for it, so it stays free of any front-end.

The kernel's cells: ``pre_run_cell`` / ``post_run_cell`` record whether a cell runs
now, and since when (:func:`cell_busy_for`). ipywidgets handles button clicks on the
shell channel, between cells, so while a cell blocks, a click waits for its end; the
controller says so.

Imports: IPython, lazily, only inside a shell; nothing of alma's at runtime.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: Seconds the timer keeps polling after the dispatcher went quiet, then it ends.
IDLE_GRACE = 2.0
#: Seconds between the watcher's looks at sleeping controllers.
WATCH_INTERVAL = 0.5


class Watched(Protocol):
    """What the timer and the watcher need of a controller."""

    interval: float

    @property
    def closed(self) -> bool: ...

    @property
    def dispatcher(self) -> Any: ...

    def follow(self) -> None: ...

    def _tick(self) -> bool: ...

    def _needs_follow(self, after_cell: bool = False) -> bool: ...

    def update_snapshot(self, now: bool = True) -> None: ...


class Timer:
    """A controller's timer thread: :meth:`start` starts one (or wakes the live one), it
    ends by itself after IDLE_GRACE quiet seconds, and :meth:`end` ends it for good."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        #: Set by end(): no thread starts again (the controller is closed or retired).
        self.closed = False

    @property
    def alive(self) -> bool:
        thread = self.thread
        return thread is not None and thread.is_alive()

    def start(self, controller: Watched) -> None:
        with self._lock:
            if self.closed:
                return
            self.wake.set()
            if self.thread is not None and self.thread.is_alive():
                return
            self.thread = threading.Thread(
                target=_timer_loop,
                args=(weakref.ref(controller), self),
                name="alma-controller",
                daemon=True,
            )
            self.thread.start()

    def may_end(self) -> bool:
        """Called by the thread when idle: end it unless someone just asked for it."""
        with self._lock:
            if self.wake.is_set():
                return False
            self.thread = None
            return True

    def end(self) -> None:
        with self._lock:
            self.closed = True
            thread, self.thread = self.thread, None
            self.wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)


def _timer_loop(ref: weakref.ref[Watched], timer: Timer) -> None:
    """Redraw every ``interval`` while runs go on; end after IDLE_GRACE quiet seconds.

    Holds the controller only weakly between ticks, so a dropped controller ends it.
    """
    quiet_since: float | None = None
    while True:
        c = ref()
        if c is None or c.closed:
            return
        busy = c._tick()
        interval = c.interval
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > IDLE_GRACE and timer.may_end():
            return
        del c
        if timer.wake.wait(interval):
            timer.wake.clear()
            quiet_since = None


# -- the live controllers and the watcher ---------------------------------------------

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_watcher_lock = threading.Lock()
_watcher: threading.Thread | None = None


def add(controller: Watched) -> None:
    """Watch ``controller`` from now on (held weakly); starts the watcher if needed."""
    global _watcher
    with _watcher_lock:
        _live.add(controller)
        if _watcher is None or not _watcher.is_alive():
            _watcher = threading.Thread(target=_watch, name="alma-watcher", daemon=True)
            _watcher.start()


def live() -> list[Any]:
    """The controllers watched now (open or not), as a list safe to iterate."""
    return list(_live)


def _wake_sleepers(controllers: list[Any]) -> None:
    for c in controllers:
        try:
            if not c.closed and c._needs_follow():
                c.follow()
        except Exception:  # never let a UI problem end the watcher
            log.debug("alma watcher: waking a controller failed", exc_info=True)


def _watch() -> None:
    """Every WATCH_INTERVAL: wake the timers of controllers whose dispatcher runs."""
    global _watcher
    while True:
        time.sleep(WATCH_INTERVAL)
        with _watcher_lock:
            controllers = [c for c in _live if not c.closed]
            if not controllers:
                _watcher = None
                return
        _wake_sleepers(controllers)
        del controllers


# -- the kernel's cells ----------------------------------------------------------------

_hooked: set[int] = set()
_cell_started: float | None = None


def current_shell() -> Any:
    """The IPython shell this code runs in, or None (plain Python, no IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def install(shell: Any) -> None:
    """Follow ``shell``'s cells; once per shell."""
    if shell is None or id(shell) in _hooked:
        return
    _hooked.add(id(shell))
    shell.events.register("pre_run_cell", _before_cell)
    shell.events.register("post_run_cell", _after_cell)


def cell_busy_for() -> float:
    """Seconds the cell running now has run (0.0 between cells)."""
    started = _cell_started
    return 0.0 if started is None else time.monotonic() - started


def _before_cell(*_args: Any) -> None:
    global _cell_started
    _cell_started = time.monotonic()


def _after_cell(*_args: Any) -> None:
    global _cell_started
    _cell_started = None
    for c in live():
        try:
            if c.closed or c.dispatcher is None:
                continue
            # Also redraw when a cell changed the state without the timer running, e.g.
            # `d.reset()` in a later cell leaves a shown controller otherwise stale.
            if c._needs_follow(after_cell=True):
                c.follow()
            c.update_snapshot()  # in this cell's context: nbclient keeps only its messages
        except Exception:  # never let a UI problem surface in the user's cell
            log.debug("alma controller: waking the timer failed", exc_info=True)
