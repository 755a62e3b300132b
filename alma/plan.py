"""What is owed and what is done: the order runs go in, and per-instance counts.

The plan is never materialised: it is derived, lazily, from which runs the store says
have finished (one bit per run), so a million-run experiment costs a bytearray per
instance, and a resumed experiment simply continues where the bits are still 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from .records import DONE, Config, RunRecord
from .store import Cell, Store

#: Seconds between re-reads of counts that another process changed: a reader (a
#: notebook watching `alma run`, say) polls often, and a recount scans every result.
REFRESH_INTERVAL = 0.5

#: (row, iteration), in the order runs are handed out. A row is one instance in one
#: configuration (see :meth:`alma.spec.Spec.cell`).
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


#: The id of a row whose instance or configuration is not in the store yet.
UNKNOWN: Cell = (-1, -1)


class Tally:
    """Done and failed runs per row of the plan (an instance in a configuration), and
    the rows' store ids.

    While a session runs, the session adds each group commit (:meth:`add`), so reading
    progress costs no I/O; otherwise :meth:`refresh` re-reads the store when another
    connection changed it, at most every REFRESH_INTERVAL. Not thread-safe: the
    dispatcher's mutex guards it.
    """

    def __init__(
        self, instances: tuple[str, ...], configs: tuple[Config, ...], iterations: int
    ) -> None:
        self.instances = instances
        self.configs = configs
        self.iterations = iterations
        rows = len(instances) * len(configs)
        #: Store ids (instance, configuration) of each row, in plan order.
        self.ids = [UNKNOWN] * rows
        #: Store ids -> row.
        self.position: dict[Cell, int] = {}
        self.done = [0] * rows
        self.failed = [0] * rows
        self._version: int | None = None
        self._refreshed_at = -REFRESH_INTERVAL

    def refresh(
        self,
        store: Store,
        force: bool = False,
        ids: tuple[dict[str, int], dict[str, int]] | None = None,
    ) -> None:
        """Re-read ids and counts from ``store`` if another connection changed it (or
        ``force``; ``ids``: the instance and configuration ids, when the caller has
        just read them)."""
        now = time.monotonic()
        if not force and now - self._refreshed_at < REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        version = None if force else store.data_version()
        if version is not None and version == self._version:
            return
        instance_ids, config_ids = (
            ids
            if ids is not None
            else (
                store.instance_ids(),
                store.config_ids(),
            )
        )
        inst = [instance_ids.get(name, -1) for name in self.instances]
        cfgs = [config_ids.get(c.key, -1) for c in self.configs]
        if len(cfgs) == 1:  # no grid: one row per instance, no product to build
            cid = cfgs[0]
            self.ids = [(i, cid) if i >= 0 and cid >= 0 else UNKNOWN for i in inst]
        else:
            self.ids = [(i, c) if i >= 0 and c >= 0 else UNKNOWN for i in inst for c in cfgs]
        self.position = {cell: pos for pos, cell in enumerate(self.ids) if cell[0] >= 0}
        counts = store.counts(self.iterations)
        zero = (0, 0)
        self.done = [counts.get(cell, zero)[0] for cell in self.ids]
        self.failed = [counts.get(cell, zero)[1] for cell in self.ids]
        self._version = version

    def invalidate(self) -> None:
        """The next :meth:`refresh` re-reads the store (our own writes changed it)."""
        self._version = None

    def add(self, rows: Iterable[RunRecord]) -> None:
        """Count runs that have just been committed (in the writer thread, under the
        mutex that next_task needs: kept tight)."""
        position, iterations, done, failed = self.position, self.iterations, self.done, self.failed
        for row in rows:
            pos = position.get(row[:2])  # (instance, config): a plain tuple, cheap here
            if pos is not None and row.iteration < iterations:
                if row.status == DONE:
                    done[pos] += 1
                else:
                    failed[pos] += 1

    def marks(self, store: Store) -> list[bytearray]:
        """Per row in plan order, 1 at every finished iteration (done or failed)."""
        marks = store.finished_marks(self.ids, self.iterations)
        return [marks[cell] if cell[0] >= 0 else bytearray() for cell in self.ids]
