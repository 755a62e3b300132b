"""What is owed and what is done: the order runs go in, and per-instance counts.

The plan is never materialised: it is derived, lazily, from which runs the store says
have finished (one bit per run), so a million-run experiment costs a bytearray per
instance, and a resumed experiment simply continues where the bits are still 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from .records import DONE, RunRecord
from .store import Store

#: Seconds between re-reads of counts that another process changed: a reader (a
#: notebook watching `alma run`, say) polls often, and a recount scans every result.
REFRESH_INTERVAL = 0.5

#: (position of the instance in the batch, iteration), in the order runs are handed out.
Plan = Iterator[tuple[int, int]]


def plan(marks: list[bytearray], order: str, iterations: int) -> Plan:
    """The runs whose mark is 0, in the experiment's ``order``.

    A row of ``marks`` may end before ``iterations``: what lies beyond is owed. Rows are
    only as long as the last finished iteration, so a plan of a billion iterations
    costs nothing until runs finish."""
    if order == "round-robin":
        return _round_robin(marks, iterations)
    return _by_instance(marks, iterations)


def owed_count(marks: list[bytearray], iterations: int) -> int:
    """How many runs ``marks`` leaves owed."""
    joined = b"".join(marks)  # one C pass over every row, not a Python loop per instance
    return iterations * len(marks) - len(joined) + joined.count(0)


def mark(marks: list[bytearray], pos: int, iteration: int) -> None:
    """Mark one run as taken (running or being saved), growing its row if needed."""
    row = marks[pos]
    if iteration >= len(row):
        row.extend(bytes(iteration + 1 - len(row)))
    row[iteration] = 1


def _last_owed(row: bytearray, iterations: int) -> int:
    return iterations - 1 if len(row) < iterations else row.rfind(0)


def _round_robin(rows: list[bytearray], iterations: int) -> Plan:
    """Iteration 0 of every instance, then iteration 1, …: partial results cover all."""
    last = [_last_owed(row, iterations) for row in rows]
    active = [pos for pos, end in enumerate(last) if end >= 0]
    for it in range(iterations):
        active = [pos for pos in active if last[pos] >= it]
        if not active:
            return
        for pos in active:
            row = rows[pos]
            if it >= len(row) or not row[it]:
                yield pos, it


def _by_instance(rows: list[bytearray], iterations: int) -> Plan:
    """Every iteration of the first instance, then the next instance."""
    for pos, row in enumerate(rows):
        it = row.find(0)
        while it >= 0:
            yield pos, it
            it = row.find(0, it + 1)
        yield from ((pos, it) for it in range(len(row), iterations))


class Tally:
    """Done and failed runs per instance of the batch, and the instances' store ids.

    While a session runs, the session adds each group commit (:meth:`add`), so reading
    progress costs no I/O; otherwise :meth:`refresh` re-reads the store when another
    connection changed it, at most every REFRESH_INTERVAL. Not thread-safe: the
    dispatcher's mutex guards it.
    """

    def __init__(self, instances: tuple[str, ...], iterations: int) -> None:
        self.instances = instances
        self.iterations = iterations
        #: Store id of each instance, in batch order (-1: not in the store yet).
        self.ids = [-1] * len(instances)
        #: Store id -> position in the batch.
        self.position: dict[int, int] = {}
        self.done = [0] * len(instances)
        self.failed = [0] * len(instances)
        self._version: int | None = None
        self._refreshed_at = -REFRESH_INTERVAL

    def refresh(self, store: Store, force: bool = False, ids: dict[str, int] | None = None) -> None:
        """Re-read ids and counts from ``store`` if another connection changed it (or
        ``force``; ``ids``: the instance ids, when the caller has just read them)."""
        now = time.monotonic()
        if not force and now - self._refreshed_at < REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        version = None if force else store.data_version()
        if version is not None and version == self._version:
            return
        if ids is None:
            ids = store.instance_ids()
        self.ids = [ids.get(name, -1) for name in self.instances]
        self.position = {i: pos for pos, i in enumerate(self.ids) if i >= 0}
        counts = store.counts(self.iterations)
        self.done = [counts[i].done if i in counts else 0 for i in self.ids]
        self.failed = [counts[i].failed if i in counts else 0 for i in self.ids]
        self._version = version

    def invalidate(self) -> None:
        """The next :meth:`refresh` re-reads the store (our own writes changed it)."""
        self._version = None

    def add(self, rows: Iterable[RunRecord]) -> None:
        """Count runs that have just been committed (in the writer thread, under the
        mutex that next_task needs: kept tight)."""
        position, iterations, done, failed = self.position, self.iterations, self.done, self.failed
        for row in rows:
            pos = position.get(row.instance)
            if pos is not None and row.iteration < iterations:
                if row.status == DONE:
                    done[pos] += 1
                else:
                    failed[pos] += 1

    def marks(self, store: Store) -> list[bytearray]:
        """Per instance in batch order, 1 at every finished iteration (done or failed)."""
        marks = store.finished_marks(self.ids, self.iterations)
        return [marks[i] for i in self.ids]
