"""A session: everything that exists only while an experiment's runs go on.

:meth:`Session.open` takes the experiment's OS lock and the store's only writer
connection and starts the group-commit writer; :meth:`Session.close` gives them back.
In between, the session is the :class:`~alma.executors.RunSource` that executors talk
to: it hands out tasks from the plan, keeps the runs in flight, commits outcomes and
checkpoints through the writer and counts a run as done only once its commit is in.

Locks (one picture in ARCHITECTURE.md): the dispatcher's lifecycle lock, then the
shared ``mutex``, never the other way round. The mutex guards the plan, the in-flight
and saving sets, the checkpoints and the dispatcher's tally; it is held only for
in-memory work, never across a commit or a join. The writer thread's callbacks take the
mutex, so a session is closed (which joins the writer) without holding it.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import jobfile
from .control import StopWatcher
from .errors import AlmaError, Interrupted, StateError
from .executors import Executor, executor_class
from .lock import ExperimentLock
from .plan import Plan, Tally, mark, owed_count, plan
from .records import (
    FAILED,
    CheckpointRecord,
    JobCounts,
    Outcome,
    RunError,
    RunKey,
    RunRecord,
    Task,
    seed_of,
)
from .spec import Spec
from .store import Store
from .writer import Writer


@dataclass
class SessionClock:
    """When a session started and ended, and how many runs it finished: the rate and
    elapsed time that progress shows, kept after the session is gone."""

    started: float = 0.0
    ended: float | None = None
    #: Runs committed in this session (done or failed).
    runs: int = 0

    def elapsed(self) -> float:
        if not self.started:
            return 0.0
        return (time.monotonic() if self.ended is None else self.ended) - self.started


@dataclass
class SessionHooks:
    """How a session tells its dispatcher what it cannot handle itself."""

    #: The last executor has ended: the session may close.
    idle: Callable[[Session], None]
    #: A run failed, or alma's own machinery did: for front-ends to show.
    error: Callable[[RunError], None]


class Session:
    """One session of one experiment; see the module docstring."""

    def __init__(
        self,
        spec: Spec,
        store: Store,
        lock: ExperimentLock,
        tally: Tally,
        mutex: threading.RLock,
        hooks: SessionHooks,
    ) -> None:
        """Use :meth:`open`, which takes the OS lock and the writer connection first."""
        self.spec = spec
        self._store = store
        self._oslock = lock
        self._tally = tally
        self._lock = mutex
        self._hooks = hooks
        self.clock = SessionClock(started=time.monotonic())
        #: True once stop() was asked: no task is handed out any more.
        self.stopping = False
        #: Why this session stopped before its end: an error of alma's own machinery
        #: (a StateError when the state file could not be written), or None.
        self.halted: AlmaError | None = None
        self._plan: Plan | None = None
        self._owed = 0  # runs the plan held when it was made
        # Keyed by RunKey, a (instance, config, iteration) tuple: plain tuples find them.
        self._inflight: dict[tuple[int, int, int], Task] = {}  # executing now
        self._saving: set[tuple[int, int, int]] = set()  # finished, waiting for their commit
        # Runs interrupted (a stop, a lost worker) and owed again, by key: how often.
        self._interrupted: dict[tuple[int, int, int], int] = {}
        self._checkpoints = store.checkpoints()
        self._executors: list[Executor] = []
        self._live = 0  # executors started (or reserved) that have not called executor_done
        self._writer = Writer(store, self._committed, self._writer_failed)
        #: True once a stop was asked from another process (``alma stop``, another
        #: kernel's ``stop()``) through the request file that the watcher polls.
        self.stopped_remotely = False
        assert lock.me is not None, "open() takes the lock first"
        # The executors' batch jobs as last recorded in <state>.jobs (for other
        # processes); the lock orders the writes of executors' threads and close().
        self._jobs_lock = threading.Lock()
        self._jobs_written: JobCounts | None = None
        self._closed = False
        self._watcher = StopWatcher(spec.state_path, lock.me, self._stop_requested)

    @classmethod
    def open(
        cls,
        spec: Spec,
        store: Store,
        lock: ExperimentLock,
        tally: Tally,
        mutex: threading.RLock,
        hooks: SessionHooks,
    ) -> Session:
        """Take the OS lock and the store's writer; raises LockedError or StateError."""
        lock.acquire()
        try:
            jobfile.clear(spec.state_path)  # an earlier session's jobs are not ours
            ids = store.open_writer(
                spec.instances, spec.paths, spec.params, spec.iterations, spec.code_hash
            )
            with mutex:
                tally.refresh(store, force=True, ids=ids)
                session = cls(spec, store, lock, tally, mutex, hooks)
            session._watcher.start()
            return session
        except BaseException:
            store.close_writer()
            lock.release()
            raise

    def close(self) -> None:
        """Commit what is queued, fold the WAL in, release the OS lock. Caller holds the
        lifecycle lock but not the mutex (the writer's last callback takes it)."""
        with self._lock:
            self._plan = None  # from now on no task is handed out and no worker added
        self._record_jobs(final=True)  # while this process still holds the lock
        self._watcher.close()
        self._writer.close()
        self._store.close_writer()
        self._oslock.release()
        with self._lock:
            self.clock.ended = time.monotonic()
            self._inflight.clear()  # no executor is left: nothing is really in flight
            self._saving.clear()
            self._executors.clear()
            self._tally.invalidate()

    # -- what the dispatcher asks -------------------------------------------------------

    @property
    def live_executors(self) -> int:
        return self._live

    @property
    def running(self) -> int:
        """How many runs execute now (not those handed out that wait in a worker's
        queue behind another)."""
        with self._lock:
            return sum(1 for task in self._inflight.values() if task.started)

    @property
    def dashboard(self) -> str | None:
        """The first executor's web dashboard, if it has one."""
        with self._lock:
            executors = list(self._executors)
        return next((e.dashboard for e in executors if e.dashboard), None)

    @property
    def jobs(self) -> JobCounts | None:
        """The executors' batch jobs (None when none submits any)."""
        with self._lock:
            executors = list(self._executors)
        return JobCounts.combine(e.jobs for e in executors)

    def _record_jobs(self, final: bool = False) -> None:
        """Write the executors' jobs to <state>.jobs when they changed (``final``: the
        session ends; written once more, marked so). Never fails the session."""
        counts = self.jobs
        with self._jobs_lock:
            if self._closed or counts is None:
                return
            if counts == self._jobs_written and not final:
                return
            assert self._oslock.me is not None
            try:
                jobfile.write(self.spec.state_path, self._oslock.me, counts, final)
                self._jobs_written = counts
            except OSError:  # the writer says loudly what is wrong with the folder
                pass
            self._closed = final

    def in_flight(self) -> list[Task]:
        """The runs executing now."""
        with self._lock:
            return [task for task in self._inflight.values() if task.started]

    def resume(self) -> int | None:
        """(Re)plan and reserve an executor for the workers missing; returns how many
        workers to launch (0: enough run already), or None when nothing is owed and no
        executor is left, so the session should close."""
        with self._lock:
            self.stopping = self.stopped_remotely = False
            self._plan, self._owed = self._replan()
            # Workers of runs still in flight (a stop that timed out) pull from this
            # plan too once their run ends: start only the missing ones, and never more
            # than there are runs to do.
            free = min(self.spec.workers - len(self._inflight), self._owed)
            if self._plan is not None and free > 0:
                self._live += 1  # reserved: the session cannot end meanwhile
                return free
            return None if self._plan is None and not self._live else 0

    def add_workers(self) -> None:
        """After a reset mid-session: workers for the re-queued runs, up to ``workers``."""
        with self._lock:
            free = min(self.spec.workers - len(self._inflight), self._owed)
            if self.stopping or self._plan is None or free <= 0:
                return
            self._live += 1
        self.launch(free)

    def launch(self, workers: int) -> None:
        """Start one more executor with ``workers`` workers pulling from the plan.

        The caller has reserved it (:meth:`resume`). Called without locks held:
        executors may take long to start (processes, clusters), and progress must stay
        readable meanwhile.
        """
        choice, run = self.spec.executor, self.spec.run
        try:
            assert run is not None, "Dispatcher.start() refuses a read-only experiment"
            executor = executor_class(choice.name)(
                run, workers, self.spec.retries, self.spec.timeout, choice.options
            )
            with self._lock:
                self._executors.append(executor)
            executor.start(self)
        except BaseException:
            with self._lock:
                self._plan = None
            self.executor_done()  # gives the reservation back; ends an idle session
            raise

    def stop(self) -> None:
        """Hand out no new run; tell the executors, which abort what they can."""
        with self._lock:
            if self.stopping:
                return
            self.stopping = True
            self._plan = None
            executors = list(self._executors)
        for ex in executors:
            ex.stop()

    def _stop_requested(self) -> None:
        """The watcher saw a stop request for this session's lock holder."""
        self.stopped_remotely = True
        self.stop()

    def forget(self, failed_only: bool, replan: bool) -> tuple[int, bool]:
        """Delete finished runs (all, or the failed ones) in the writer thread, after every
        queued commit. Returns how many, and whether the plan had run dry before (idle
        workers have left: the caller adds workers)."""

        def in_writer() -> tuple[int, bool]:
            n = self._store.delete_runs(failed_only)
            with self._lock:
                if not failed_only:
                    self._checkpoints.clear()
                self._tally.refresh(self._store, force=True)
                exhausted = False
                if replan and not self.stopping:
                    exhausted = self._plan is None
                    self._plan, self._owed = self._replan()
            return n, exhausted

        return self._writer.call(in_writer)

    def _replan(self) -> tuple[Plan | None, int]:
        """Runs still owed, in the experiment's order, and how many. Caller holds the
        mutex."""
        rows = self._tally.marks(self._store)
        iterations = self.spec.iterations
        for instance, config, iteration in [*self._inflight, *self._saving]:  # running, saving
            pos = self._tally.position.get((instance, config))
            if pos is not None and iteration < iterations:
                mark(rows, pos, iteration)
        count = owed_count(rows, iterations)
        return (plan(rows, self.spec.order, iterations) if count else None), count

    # -- RunSource: what executors call ------------------------------------------------

    def next_task(self) -> Task | None:
        """Hand out the next run owed, to start now (hot path: one lock, no I/O)."""
        tasks = self.next_tasks(1)
        if not tasks:
            return None
        tasks[0].started = time.time()
        return tasks[0]

    def next_tasks(self, n: int) -> list[Task]:
        """Hand out up to ``n`` runs owed, in plan order, under one lock: executors that
        keep a few runs queued per worker take them several at a time, and set each
        one's ``started`` when it begins. Empty when none is owed (or a stop was
        asked)."""
        tasks: list[Task] = []
        with self._lock:
            plan = self._plan
            if plan is None:
                return tasks
            ids, inflight, saving = self._tally.ids, self._inflight, self._saving
            spec, checkpoints = self.spec, self._checkpoints
            for pos, it in plan:
                key = RunKey(*ids[pos], it)
                if key in inflight or key in saving:
                    continue
                inst, config = spec.cell(pos)
                name = spec.instances[inst]
                task = Task(
                    key,
                    name,
                    spec.paths[inst],
                    it,
                    config.params,
                    seed_of(name, it, config.key, spec.seed),
                    checkpoints.get(key),
                )
                inflight[key] = task
                tasks.append(task)
                if len(tasks) == n:
                    return tasks
            self._plan = None
            return tasks

    def report(self, task: Task, outcome: Outcome) -> None:
        """Queue a finished run for the next group commit."""
        self.report_all(((task, outcome),))

    def report_all(self, ended: Iterable[tuple[Task, Outcome]]) -> None:
        """Queue finished runs (task, outcome) for the next group commit, under one
        lock each for the session and the writer: for executors whose workers end
        several runs between two calls."""
        ended = list(ended)
        for task, outcome in ended:
            if outcome.status == FAILED:
                self._hooks.error(
                    RunError(
                        task.instance, task.iteration, outcome.error or "", outcome.traceback or ""
                    )
                )
        inflight, saving, checkpoints = self._inflight, self._saving, self._checkpoints
        interrupted = self._interrupted
        with self._lock:
            for task, _ in ended:
                inflight.pop(task.key, None)
                saving.add(task.key)
            # Stops this session saw (interrupted) and what the executor recovered
            # from itself (a worker that left: outcome.interruptions).
            counts = [interrupted.pop(t.key, 0) for t, _ in ended] if interrupted else None
            drop = [t.key for t, _ in ended if t.key in checkpoints]
        now, code = time.time(), self.spec.code_hash
        records = [
            RunRecord(  # positional: keywords cost ~0.6 µs per run here
                task.key.instance,
                task.key.config,
                task.key.iteration,
                outcome.status,
                outcome.result,
                outcome.error,
                outcome.traceback,
                outcome.attempts,
                outcome.duration,
                outcome.ended_at or now,
                code,
                task.seed,
                outcome.interruptions + (counts[i] if counts else 0),
            )
            for i, (task, outcome) in enumerate(ended)
        ]
        self._writer.put_runs(records, drop)

    def abandon(self, task: Task) -> None:
        """A run was aborted by a stop: it is owed again (its checkpoint is kept)."""
        with self._lock:
            self._inflight.pop(task.key, None)
            self._interrupted[task.key] = self._interrupted.get(task.key, 0) + 1

    def checkpoint(self, task: Task, text: str) -> None:
        """Durably save a checkpoint, then abort the run if a stop was asked."""
        key = task.key
        self._writer.put_checkpoint(
            CheckpointRecord(key.instance, key.config, key.iteration, text, time.time())
        )
        self._checkpoints[key] = text
        running = self._inflight.get(key)  # executors may hand back a copy of the task
        if running is not None:
            running.checkpointed = time.time()
        if self.stopping:
            raise Interrupted(f"{task.instance} iteration {task.iteration}: stopped")

    def executor_done(self) -> None:
        """An executor has nothing in flight any more; the last one ends the session."""
        with self._lock:
            self._live -= 1
            if self._live:
                return
        self._hooks.idle(self)

    def jobs_changed(self) -> None:
        """An executor's batch jobs changed: record them for other processes."""
        self._record_jobs()

    def executor_failed(self, exc: BaseException) -> None:
        """An executor's own machinery failed (not a run): show it like a failed run.
        An AlmaError says what happened and the fix itself; anything else is a bug."""
        message = str(exc) if isinstance(exc, AlmaError) else f"executor failed: {_describe(exc)}"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.halted = exc if isinstance(exc, AlmaError) else AlmaError(message)
        self._hooks.error(RunError("", -1, message, tb))

    # -- the writer's callbacks (in its thread) ---------------------------------------

    def _committed(self, rows: list[RunRecord]) -> None:
        """After a group commit: now (and only now) the runs count."""
        saving, checkpoints = self._saving, self._checkpoints
        with self._lock:
            for row in rows:
                key = row[:3]  # (instance, config, iteration): a plain tuple, cheap here
                saving.discard(key)
                checkpoints.pop(key, None)
            self._tally.add(rows)
            self.clock.runs += len(rows)

    def _writer_failed(self, exc: BaseException) -> None:
        """The state file could not be written (disk full, I/O error, the file replaced):
        stop, and say why."""
        if isinstance(exc, StateError):  # the store said what happened and what to do
            error = exc
        else:
            error = StateError(
                f"State file {self.spec.state_path}: saving failed ({_describe(exc)}). Runs "
                "finished before are kept; free disk space (or fix the file's permissions), "
                "then start again."
            )
        self.halted = error
        self._hooks.error(RunError("", -1, str(error), ""))
        threading.Thread(target=self.stop, name="alma-stop", daemon=True).start()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
