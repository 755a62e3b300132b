"""The group-commit writer: one thread that owns every write to the state file.

Why a thread: a commit costs an fsync-ish round trip through SQLite, and runs can end
tens of thousands of times per second. Workers hand finished runs to this thread and go
on; it commits whatever has gathered every ~COMMIT_INTERVAL in one transaction, and only
then tells the session (``on_commit``) that those runs count as done. A checkpoint is
committed at once and its caller waits, since ``save_callback`` promises durability.
Other writes (``call``: a reset, say) run in this thread too, ordered after everything
queued before them, so no write ever races another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import Interrupted, StateError
from .records import CheckpointRecord, RunKey, RunRecord
from .store import Store

#: Seconds between group commits of finished runs. A commit costs about 0.5 ms of CPU
#: however few runs it holds (more when its thread wakes from sleep, as it does between
#: groups): at 5 ms, with two workers of 10 ms runs, this thread spent 0.15 s of CPU per
#: 600 runs here, taken from the workers; at 50 ms, 0.04 s. A human sees no difference.
COMMIT_INTERVAL = 0.05
#: Finished runs that may wait for a commit before workers are held back.
MAX_QUEUED_RUNS = 20_000

T = TypeVar("T")


class Writer:
    """Background thread that commits finished runs and checkpoints in groups.

    Finished runs wait at most ~COMMIT_INTERVAL; a checkpoint is committed at once and
    its caller waits for the commit, since save_callback promises durability. Other
    writes (``call``) run in this thread too, ordered after everything queued before.
    """

    def __init__(
        self,
        store: Store,
        on_commit: Callable[[list[RunRecord]], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._on_error = on_error
        self._cond = threading.Condition()
        self._runs: list[RunRecord] = []
        self._drop: list[RunKey] = []
        self._ckpts: list[CheckpointRecord] = []
        self._calls: list[_Call] = []
        self._queued = 0  # sequence number of the last item queued
        self._committed = 0  # sequence number of the last item committed
        self._urgent = False
        self._closing = False
        self.error: BaseException | None = None  # why writing failed, if it did
        self._thread = threading.Thread(target=self._loop, name="alma-writer", daemon=True)
        self._thread.start()

    def put_runs(self, rows: list[RunRecord], drop: list[RunKey]) -> None:
        """Queue finished runs for the next group commit; ``drop``: the keys of those that
        had a checkpoint, deleted in the same transaction."""
        with self._cond:
            # Back-pressure: runs finishing faster than SQLite commits them wait here
            # rather than piling up in memory.
            while len(self._runs) >= MAX_QUEUED_RUNS and self._thread.is_alive():
                self._cond.wait(0.1)
            was_empty = not self._runs
            self._runs.extend(rows)
            self._drop.extend(drop)
            self._queued += 1
            if was_empty:
                self._cond.notify()

    def put_checkpoint(self, ckpt: CheckpointRecord) -> None:
        """Queue a checkpoint and return once it is committed.

        If the state cannot be written, the run is aborted (owed again) rather than
        carried on with a checkpoint that ``save_callback`` could not make durable.
        """
        with self._cond:
            self._ckpts.append(ckpt)
            self._queued += 1
            if not self._wait(self._queued):
                raise Interrupted(f"the checkpoint could not be saved: {self.error!r}")

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in the writer thread after the queued commits; return its result."""
        c = _Call(fn)
        with self._cond:
            self._calls.append(c)
            self._queued += 1
            if not self._wait(self._queued):
                raise StateError(f"the state file could not be written: {self.error!r}")
        if c.error is not None:
            raise c.error
        return c.result  # type: ignore[return-value]

    def close(self) -> None:
        """Commit what is queued and end the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _wait(self, seq: int) -> bool:
        """Wait until item ``seq`` is committed; False if it never will be (write failed)."""
        self._urgent = True
        self._cond.notify_all()
        while self._committed < seq and self._thread.is_alive():
            self._cond.wait(0.5)
        return self._committed >= seq

    def _loop(self) -> None:
        """Gather, commit, tell; on a failed commit say so and end (nothing counts)."""
        while True:
            with self._cond:
                while not (self._runs or self._ckpts or self._calls or self._closing):
                    self._cond.wait()
                if not (self._urgent or self._closing):
                    # Let a group gather: one commit for many runs keeps SQLite off the
                    # hot path at tens of thousands of runs per second.
                    self._cond.wait(COMMIT_INTERVAL)
                runs, drop, ckpts, calls = self._runs, self._drop, self._ckpts, self._calls
                self._runs, self._drop, self._ckpts, self._calls = [], [], [], []
                self._cond.notify_all()  # wakes producers held by back-pressure
                seq, self._urgent = self._queued, False
                closing = self._closing
            try:
                if runs or ckpts:
                    self._store.write(runs, ckpts, drop)
                    self._on_commit(runs)
            except BaseException as exc:  # disk full, I/O error: stop; nothing done is lost
                # Nothing of this group counts as committed: waiters learn it failed.
                with self._cond:
                    self.error = exc
                    self._cond.notify_all()
                self._on_error(exc)
                return
            for c in calls:
                c.run()
            with self._cond:
                self._committed = seq
                self._cond.notify_all()
                if closing and not (self._runs or self._ckpts or self._calls):
                    return


class _Call:
    """A function to run in the writer thread, with its outcome."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
