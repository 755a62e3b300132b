"""What every executor shares: the unit of work, how one run is executed, the interface.

An executor decides *where* runs execute (threads, processes, a Dask cluster). It pulls
:class:`~alma.records.Task` objects from a :class:`RunSource` (the session) and hands
back :class:`~alma.records.Outcome` objects; it never touches the store. ``execute``
below is the one place that calls a user's ``run`` function, so retries, checkpoints and
JSON conversion behave the same on every executor.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..errors import Interrupted
from ..records import DONE, FAILED, JobCounts, Outcome, Task
from ..runfunc import Caller
from ..values import to_json


@dataclass(frozen=True)
class ExecutorChoice:
    """The ``"executor"`` field of an experiment, parsed: a registered name and the
    options that executor's :meth:`Executor.parse_options` accepted."""

    name: str = "threads"
    options: Any = None


class RunSource(Protocol):
    """The session, as executors see it: where tasks come from and outcomes go."""

    def next_task(self) -> Task | None:
        """The next run owed, to start now (its ``started`` is set), or None when there
        is none (or a stop was asked)."""

    def next_tasks(self, n: int) -> list[Task]:
        """Up to ``n`` runs owed at once (empty when there is none): for executors that
        keep a few runs queued per worker. Set a task's ``started`` (``time.time()``)
        when its run begins: until then it counts as pending, not running."""

    def report(self, task: Task, outcome: Outcome) -> None:
        """A run finished (done or failed); the session stores it."""

    def report_all(self, ended: Iterable[tuple[Task, Outcome]]) -> None:
        """Several runs finished: the same as ``report`` for each, in one call."""

    def abandon(self, task: Task) -> None:
        """A run was aborted (stop); it is owed again."""

    def checkpoint(self, task: Task, text: str) -> None:
        """Durably save a checkpoint (JSON text) of a running task; returns once committed.

        Raises :class:`~alma.errors.Interrupted` (after saving) once a stop was asked."""

    def executor_done(self) -> None:
        """Called once by the executor when none of its runs is in flight any more."""

    def executor_failed(self, exc: BaseException) -> None:
        """The executor's own machinery failed (not a run); shown to the user."""

    def jobs_changed(self) -> None:
        """The executor's :attr:`Executor.jobs` changed (it looked at its batch jobs):
        the session records them for other processes (``alma status``)."""


class Executor(ABC):
    """Where runs execute. Subclasses declare their capabilities as class flags, parse
    their own options, and implement :meth:`start` (and :meth:`stop` if they can abort).

    The contract: ``start(source)`` returns at once; the executor pulls tasks with
    ``source.next_task()`` until it returns None, ends each with exactly one of
    ``source.report(task, outcome)`` or ``source.abandon(task)``, relays checkpoints
    through ``source.checkpoint``, and calls ``source.executor_done()`` exactly once,
    when none of its runs is in flight any more (however it ends).
    """

    #: True when a run over ``timeout`` seconds is ended (else alma warns at load).
    enforces_timeout: ClassVar[bool] = False
    #: How the ``"executor"`` field selects it, for error messages.
    usage: ClassVar[str] = ""

    def __init__(
        self,
        run: Callable[..., Any],
        workers: int,
        retries: int = 0,
        timeout: float | None = None,
        options: Any = None,
    ) -> None:
        self.run = run
        self.workers = workers
        self.retries = retries
        self.timeout = timeout
        self.options = options

    @classmethod
    def parse_options(cls, options: Any) -> Any:
        """Validate the options given as ``{"<name>": options}`` (None when the field is
        just the name) and return them normalised; raise ValueError saying what is
        wrong, or ConfigError with the fix (e.g. a package to install). Called at load,
        before anything runs. By default an executor takes no options."""
        if options is not None:
            raise ValueError("it takes no options")
        return None

    @abstractmethod
    def start(self, source: RunSource) -> None:
        """Begin executing tasks pulled from ``source``; must not block."""

    def start_threads(self, source: RunSource, loop: Callable[[], None], name: str) -> None:
        """Run ``loop`` in ``self.workers`` daemon threads; when the last one ends, however
        it ends, call ``source.executor_done()`` (the contract of :meth:`start`)."""
        alive = [self.workers]
        lock = threading.Lock()

        def body() -> None:
            try:
                loop()
            except BaseException as exc:  # a bug of alma's, not a run's: never silent
                source.executor_failed(exc)
            finally:
                with lock:
                    alive[0] -= 1
                    last = alive[0] == 0
                if last:
                    source.executor_done()

        for n in range(self.workers):
            threading.Thread(target=body, name=f"{name}-{n}", daemon=True).start()

    @property
    def dashboard(self) -> str | None:
        """A web page showing this executor at work (e.g. Dask's dashboard), if any."""
        return None

    @property
    def jobs(self) -> JobCounts | None:
        """The batch jobs this executor submitted for its workers (pending, running,
        gone), as the batch system said at its last look; None for an executor that
        submits none. One that has jobs calls ``source.jobs_changed()`` whenever these
        counts change, and once more after its last look (e.g. once the jobs are
        cancelled), before ``executor_done()``."""
        return None

    def stop(self) -> None:  # noqa: B027 - optional hook
        """A stop was asked: ``next_task`` returns None from now on. Abort runs in
        flight if you can (their checkpoints are kept); by default they end at their
        next ``save_callback``, which raises Interrupted."""


_ALMA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the user's code down: alma's own calling frames are noise."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_ALMA_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _load_checkpoint(text: str | None) -> Any:
    """The run's ``state``: its last checkpoint decoded, or None."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # damaged in the state file
        raise ValueError(
            f"the checkpoint saved for this run cannot be read back ({type(exc).__name__}: "
            f"{exc}); it is dropped with this failure, so retrying the failed runs "
            "(alma reset --failed, or retry_failed()) starts this one from scratch"
        ) from None


def execute(
    caller: Caller,
    task: Task,
    checkpoint: Callable[[Task, str], None],
    retries: int,
) -> Outcome:
    """Run ``task`` (retrying failures up to ``retries`` times) and describe how it ended.

    ``checkpoint(task, json_text)`` must make the state durable and may raise
    :class:`~alma.errors.Interrupted`, which propagates: the run is aborted, not failed.
    """

    def save_callback(obj: Any) -> None:
        text = to_json(obj, "checkpoint")
        task.checkpoint = text
        checkpoint(task, text)

    attempt = 0
    start = time.perf_counter()
    while True:
        attempt += 1
        try:
            state = _load_checkpoint(task.checkpoint)
            result = to_json(caller(task, save_callback, state))
        except Interrupted:
            raise  # a stop, not a failure: the run is owed again
        except BaseException as exc:  # even sys.exit() in run() fails only that run
            if attempt <= retries:
                continue
            return Outcome(
                status=FAILED,
                result=None,
                error=f"{type(exc).__name__}: {exc}",
                traceback=_user_traceback(exc),
                attempts=attempt,
                duration=time.perf_counter() - start,
            )
        return Outcome(DONE, result, None, None, attempt, time.perf_counter() - start)


__all__ = ["Executor", "ExecutorChoice", "Outcome", "RunSource", "Task", "execute"]
