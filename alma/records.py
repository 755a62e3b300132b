"""The records that travel through alma: what a run is, how it ended, what is stored.

A leaf module (it imports nothing of alma's), so the store, the dispatcher, every
executor and the workers on other machines share one definition of each record.
Fields are named, never indexed: adding a column to a finished run means adding one
field here and one column in :mod:`alma.store`.

Rows written to SQLite are :class:`~typing.NamedTuple` s: named for the code, and
still tuples, so ``executemany`` takes them as they are on the hot path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

#: How a finished run ended (an aborted run has no status: it is simply owed again).
RunStatus = Literal["done", "failed"]
DONE: RunStatus = "done"
FAILED: RunStatus = "failed"

#: Where an experiment stands, as :attr:`alma.Progress.status` says.
Status = Literal["idle", "running", "stopping", "paused", "finished"]


class RunKey(NamedTuple):
    """Which run: the ids in the state file of its instance and its configuration, and
    the iteration."""

    instance: int
    config: int
    iteration: int


@dataclass(frozen=True)
class Config:
    """One configuration of an experiment's parameters (``"params"``): what ``run()``
    receives as keyword arguments. Its identity is :attr:`key`, the canonical JSON text,
    never its position in a list, so a grid can grow or shrink between sessions."""

    #: Parameter name -> JSON value, sorted by name.
    params: Mapping[str, Any]
    #: Canonical JSON of ``params``: the configuration's identity in the state file.
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", canonical_json(self.params))

    def __hash__(self) -> int:
        return hash(self.key)


def canonical_json(value: Any) -> str:
    """The one JSON spelling of ``value``: keys sorted, no spaces, non-ASCII kept."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


#: The configuration of an experiment without ``"params"``.
NO_PARAMS = Config({})


def run_seed(
    instance: str, iteration: int, params: Mapping[str, Any] | None = None, seed: int = 0
) -> int:
    """The seed alma gives the run of ``instance`` (its name as listed in the batch) at
    ``iteration`` with configuration ``params``, for the experiment's ``"seed"``: an
    integer in ``[0, 2**63)``, the same in every session, process and machine.

    It is the first 8 bytes of the BLAKE2b hash of the canonical JSON (keys sorted, no
    spaces, UTF-8) of ``[seed, instance, params, iteration]``, read as a big-endian
    integer and shifted right by one bit; so any Python reproduces it with
    :mod:`hashlib` and :mod:`json` alone.
    """
    return seed_of(instance, iteration, canonical_json(dict(params or {})), seed)


def seed_of(instance: str, iteration: int, config_key: str, seed: int) -> int:
    """:func:`run_seed` for a configuration given by its canonical JSON (its key)."""
    # encode_basestring is json.dumps(instance, ensure_ascii=False) without building an
    # encoder per call (~10x faster: this runs once per run).
    text = f"[{seed},{_json_string(instance)},{config_key},{iteration}]"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


_json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]


@dataclass(slots=True)
class Task:
    """One run owed, as handed to an executor."""

    key: RunKey
    #: The instance as listed in the batch.
    instance: str
    #: Its resolved file path: what ``run()`` receives.
    path: str
    iteration: int
    #: The run's configuration: passed to ``run()`` by name when it declares them.
    params: Mapping[str, Any]
    #: The run's seed (see :func:`run_seed`): passed when ``run()`` declares ``seed``.
    seed: int
    #: The run's last checkpoint (JSON text), or None: what ``run()`` gets as ``state``.
    checkpoint: str | None = None
    #: Unix time its run began (0.0 while it waits in a worker's queue, handed out but
    #: not started), and of its last checkpoint in this session: what front-ends show
    #: of the runs executing.
    started: float = 0.0
    checkpointed: float | None = None


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
    #: Times the run was cut off by its worker leaving (a batch job's walltime, a
    #: preemption, a worker that died) and resumed from its last checkpoint, in this
    #: session; never counted as failed attempts.
    interruptions: int = 0
    #: Unix time it ended, when the executor knows it better than the time it reports
    #: it (a worker reporting several runs at once); else the report's time is used.
    ended_at: float | None = None


class RunRecord(NamedTuple):
    """A finished run, as the ``runs`` table holds it (same order as its columns)."""

    instance: int
    config: int
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
    seed: int
    #: Times the run was interrupted (a stop, its worker lost) and handed out again
    #: within the session that finished it.
    interruptions: int

    @property
    def key(self) -> RunKey:
        return RunKey(self.instance, self.config, self.iteration)


class CheckpointRecord(NamedTuple):
    """A saved checkpoint, as the ``checkpoints`` table holds it."""

    instance: int
    config: int
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

    def __repr__(self) -> str:
        # Read in a notebook (``d.last_error``): the traceback as lines, not as "\n"s.
        where = f"{self.instance} #{self.iteration}" if self.instance else "alma itself"
        text = f"<alma.RunError in {where}: {self.error}>"
        return f"{text}\n{self.traceback.rstrip()}" if self.traceback else text


class ErrorGroup(NamedTuple):
    """Failed runs that ended with the same error (type and message)."""

    #: ``"Type: message"``, as the runs recorded it.
    error: str
    #: How many runs failed with it.
    runs: int
    #: One of them (the first to fail): where to look.
    instance: str
    iteration: int
    traceback: str


class InFlight(NamedTuple):
    """A run executing now, as front-ends show it."""

    instance: str
    iteration: int
    #: Unix time it was handed out.
    started: float
    #: Unix time of its last checkpoint in this session, or None.
    checkpointed: float | None


class JobCounts(NamedTuple):
    """The batch jobs an executor submitted for its workers in a session (SLURM's, with
    ``"slurm"``), as the batch system said at the executor's last look."""

    #: Queued and not running yet (also held, suspended or requeued).
    pending: int
    #: Running.
    running: int
    #: Submitted in this session and no longer in the queue, or ending: finished,
    #: cancelled (a pause cancels them), preempted, timed out, failed.
    gone: int
    #: Whose jobs: the batch system, as front-ends name it.
    system: str = "SLURM"

    @property
    def total(self) -> int:
        """Jobs submitted in this session."""
        return self.pending + self.running + self.gone

    def describe(self) -> str:
        """One line for people: ``SLURM jobs: 1 pending · 2 running · 3 gone``."""
        return (
            f"{self.system} jobs: {self.pending} pending · {self.running} running · "
            f"{self.gone} gone"
        )

    @classmethod
    def combine(cls, counts: Iterable[JobCounts | None]) -> JobCounts | None:
        """The sum of several executors' counts (None when none has jobs)."""
        present = [c for c in counts if c is not None]
        if not present:
            return None
        return cls(
            sum(c.pending for c in present),
            sum(c.running for c in present),
            sum(c.gone for c in present),
            present[0].system,
        )


__all__ = [
    "DONE",
    "FAILED",
    "NO_PARAMS",
    "CheckpointRecord",
    "Config",
    "ErrorGroup",
    "InFlight",
    "JobCounts",
    "Outcome",
    "RunError",
    "RunKey",
    "RunRecord",
    "RunStatus",
    "Status",
    "Task",
    "canonical_json",
    "run_seed",
    "seed_of",
]
