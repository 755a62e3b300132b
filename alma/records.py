"""The records that travel through alma: what a run is, how it ended, what is stored.

A leaf module (it imports nothing of alma's), so the store, the dispatcher, every
executor and the workers on other machines share one definition of each record.
Fields are named, never indexed: adding a column to a finished run means adding one
field here and one column in :mod:`alma.store`.

Rows written to SQLite are :class:`~typing.NamedTuple` s: named for the code, and
still tuples, so ``executemany`` takes them as they are on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

#: How a finished run ended (an aborted run has no status: it is simply owed again).
RunStatus = Literal["done", "failed"]
DONE: RunStatus = "done"
FAILED: RunStatus = "failed"

#: Where an experiment stands, as :attr:`alma.Progress.status` says.
Status = Literal["idle", "running", "stopping", "paused", "finished"]


class RunKey(NamedTuple):
    """Which run: the instance's id in the state file and the iteration."""

    instance: int
    iteration: int


@dataclass(slots=True)
class Task:
    """One run owed, as handed to an executor."""

    key: RunKey
    #: The instance as listed in the batch.
    instance: str
    #: Its resolved file path: what ``run()`` receives.
    path: str
    iteration: int
    #: The run's last checkpoint (JSON text), or None: what ``run()`` gets as ``state``.
    checkpoint: str | None = None


@dataclass(slots=True)
class Outcome:
    """How a run ended, as an executor reports it (and as it crosses process and Dask
    boundaries: pickled by name, never unpacked by position). Not frozen: a frozen
    dataclass costs ~1 µs more per run to build, and one is built for every run."""

    status: RunStatus
    #: The run's return value as JSON text (None when it failed).
    result: str | None
    #: ``"Type: message"`` of the exception when it failed.
    error: str | None
    traceback: str | None
    #: Attempts made, retries included.
    attempts: int
    #: Seconds from the first attempt's start to the end of the last one.
    duration: float
    #: Unix time it ended, when the executor knows it better than the time it reports
    #: it (a worker reporting several runs at once); else the report's time is used.
    ended_at: float | None = None


class RunRecord(NamedTuple):
    """A finished run, as the ``runs`` table holds it (same order as its columns)."""

    instance: int
    iteration: int
    status: RunStatus
    result: str | None
    error: str | None
    traceback: str | None
    attempts: int
    duration: float
    #: Unix time the run was reported.
    ended_at: float
    #: Hash of the code that produced it.
    code: str

    @property
    def key(self) -> RunKey:
        return RunKey(self.instance, self.iteration)


class CheckpointRecord(NamedTuple):
    """A saved checkpoint, as the ``checkpoints`` table holds it."""

    instance: int
    iteration: int
    #: JSON text, given back to ``run()`` as ``state`` when the run resumes.
    state: str
    #: Unix time it was saved.
    saved_at: float


@dataclass(frozen=True)
class RunError:
    """The last failure seen, for front-ends to show.

    For a failed run: its instance, iteration, error and traceback. For a failure of
    alma's own machinery (the state file could not be written, an executor broke):
    ``instance`` is empty and ``iteration`` is -1.
    """

    instance: str
    iteration: int
    error: str
    traceback: str


__all__ = [
    "DONE",
    "FAILED",
    "CheckpointRecord",
    "Outcome",
    "RunError",
    "RunKey",
    "RunRecord",
    "RunStatus",
    "Status",
    "Task",
]
