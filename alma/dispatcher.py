"""The Dispatcher: start, stop, resume and watch one experiment.

States::

    idle ──start()──► running ──stop()──► stopping ──(in-flight runs end)──► paused
      ▲                  │                                                     │
      └──────────────────┴──(every run finished)──► finished    start() ◄─────┘

While a session is active the dispatcher holds the experiment's OS lock and the only
writer connection; a background writer thread commits finished runs in groups every few
milliseconds (persistence stays off the hot path) and only then counts them as done.
Front-ends never get callbacks: they poll :attr:`Dispatcher.progress`, a frozen
snapshot, on their own timer, so a broken UI cannot break a run.
"""

from __future__ import annotations

import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import Interrupted, StateError
from .executors import Executor, Outcome, Task, executor_class
from .lock import ExperimentLock
from .spec import Spec
from .store import RunRow, Store

if TYPE_CHECKING:
    import pandas as pd

#: Seconds between group commits of finished runs.
COMMIT_INTERVAL = 0.005
#: Seconds between re-reads of counts that another process changed: a reader (a
#: notebook watching `alma run`, say) polls often, and a recount scans every result.
REFRESH_INTERVAL = 0.5
#: Finished runs that may wait for a commit before workers are held back.
MAX_QUEUED_RUNS = 20_000


@dataclass(frozen=True)
class Progress:
    """A snapshot of an experiment's progress; counts cover the current plan only."""

    #: Runs in the plan: instances in the batch × iterations.
    total: int
    #: Runs finished successfully (committed to the state file).
    done: int
    #: Runs finished with an error (after their retries).
    failed: int
    #: Runs in flight now.
    running: int
    #: Runs still owed: total − done − failed − running (a run that just ended counts
    #: here until its group commit, a few milliseconds later).
    pending: int
    #: idle, running, stopping, paused or finished.
    status: str
    #: Seconds since this session's start (0 when not started in this process).
    elapsed: float = 0.0
    #: Runs finished per second in this session, or None before the first one.
    rate: float | None = None
    #: Estimated seconds left at the current rate, or None when unknown.
    eta: float | None = None

    @property
    def finished(self) -> int:
        """done + failed."""
        return self.done + self.failed


@dataclass(frozen=True)
class RunError:
    """The last failure seen, for front-ends to show."""

    instance: str
    iteration: int
    error: str
    traceback: str


class Dispatcher:
    """Plans, runs, pauses and resumes one experiment. Build it with ``alma.experiment.load``
    or :func:`alma.Experiment`; both validate everything first and start nothing."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self._store = Store(spec.state_path, spec.name)
        self._store.validate()
        self._oslock = ExperimentLock(spec.state_path)
        # Lock order: _session_lock before _mutex, never the other way round. The
        # session lock serialises opening and closing a session (closing joins the
        # writer thread, whose commit callback needs _mutex, so it must not be held).
        self._session_lock = threading.RLock()
        self._mutex = threading.RLock()
        self._idle = threading.Event()
        self._idle.set()
        self._active = False  # a session holds the lock and the writer
        self._stopping = False
        self._plan: Iterator[tuple[int, int]] | None = None
        self._inflight: dict[tuple[int, int], Task] = {}  # executing now
        self._saving: set[tuple[int, int]] = set()  # finished, waiting for the group commit
        self._checkpoints: dict[tuple[int, int], str] = {}
        self._executors: list[Executor] = []
        self._live_executors = 0  # executors that have not called executor_done yet
        self._writer: _Writer | None = None
        self._ids: list[int] = []
        self._position: dict[int, int] = {}
        self._done: list[int] = [0] * len(spec.instances)
        self._failed: list[int] = [0] * len(spec.instances)
        self._cache_version: int | None = None
        self._refreshed_at = -REFRESH_INTERVAL
        self._session_start = 0.0
        self._launched = False  # runs were handed to an executor in this process
        self._session_end: float | None = None
        self._session_finished = 0
        self.last_error: RunError | None = None
        self._refresh_counts()
        name, _ = spec.executor
        if spec.timeout is not None and not executor_class(name).enforces_timeout:
            warnings.warn(
                f'{spec.name}: "timeout": {spec.timeout:g} is not enforced by the {name} '
                "executor (a run there cannot be ended from outside); use "
                '"executor": "processes" to enforce it.',
                stacklevel=3,
            )
        previous = self._store.last_session_code()
        if previous is not None and previous != spec.code_hash:
            warnings.warn(
                f"{spec.name}: the run code changed since the last session "
                f"({previous} -> {spec.code_hash}); results record which code "
                "produced each run in their 'code' column.",
                stacklevel=3,
            )

    # -- public API ------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        """Where the state (results, checkpoints) is saved."""
        return str(self.spec.state_path)

    @property
    def running(self) -> bool:
        """True while runs execute or wind down (running or stopping)."""
        return self._active

    @property
    def running_elsewhere(self) -> str | None:
        """Which process runs this experiment, when another one does (else None)."""
        return self._oslock.holder()

    @property
    def finished(self) -> bool:
        """True when every run of the plan has finished (done or failed)."""
        p = self.progress
        return p.pending + p.running == 0

    @property
    def status(self) -> str:
        """idle, running, stopping, paused or finished."""
        return self.progress.status

    def start(self) -> None:
        """Start (or resume) in the background and return at once.

        Raises LockedError when the experiment runs in another process or kernel.
        Starting a running dispatcher does nothing.
        """
        with self._session_lock:
            with self._mutex:
                if self._active and not self._stopping:
                    return
                opening = not self._active
            if opening:
                if self.finished:  # nothing owed: no session, no lock, no write
                    return
                self._open_session()
            with self._mutex:
                self._stopping = False
                self._plan = self._build_plan()
                # Workers of runs still in flight (a stop that timed out) pull from this
                # plan too once their run ends: start only the missing ones.
                free = self.spec.workers - len(self._inflight)
                launch = self._plan is not None and free > 0
                if launch:
                    self._idle.clear()
                    self._live_executors += 1  # reserved: the session cannot end meanwhile
                nothing_to_do = self._plan is None and not self._live_executors
            if nothing_to_do:
                self._close_session()
                return
        if launch:
            self._launch(free)  # outside the locks: a Dask cluster takes seconds to start

    def _launch(self, workers: int) -> None:
        """Start one more executor with ``workers`` workers pulling from the plan.

        The caller has reserved it in ``_live_executors``. Called without locks held:
        executors may take long to start (processes, clusters), and progress must stay
        readable meanwhile.
        """
        name, options = self.spec.executor
        try:
            executor = executor_class(name)(
                self.spec.run, workers, self.spec.retries, self.spec.timeout, options
            )
            with self._mutex:
                self._executors.append(executor)
                self._launched = True
            executor.start(self)
        except BaseException:
            with self._mutex:
                self._plan = None
            self.executor_done()  # gives the reservation back; ends an idle session
            raise

    def stop(self, timeout: float | None = None) -> bool:
        """Pause: hand out no new run, let in-flight runs end, save everything.

        Runs that call ``save_callback`` are aborted at their next call (after it saved).
        Returns True once nothing is in flight; False if runs still go on after
        ``timeout`` seconds (they are listed in a warning and keep their (instance,
        iteration) until they end; their result is kept).
        """
        with self._mutex:
            if self._active and not self._stopping:
                self._stopping = True
                self._plan = None
                executors = list(self._executors)
            else:
                executors = []
        for ex in executors:
            ex.stop()
        if self._idle.wait(timeout):
            return True
        with self._mutex:
            stuck = sorted((t.instance, t.iteration) for t in self._inflight.values())
        warnings.warn(
            f"{self.spec.name}: {len(stuck)} run(s) still going after "
            f"{timeout} s: {stuck[:10]}. They neither checkpointed nor ended; they "
            "will not be handed out again until they end.",
            stacklevel=2,
        )
        return False

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the session ends; True when every run has finished."""
        self._idle.wait(timeout)
        return self.finished

    @property
    def progress(self) -> Progress:
        """A frozen snapshot: total, done, failed, running, pending, status, rate, ETA."""
        with self._mutex:
            if not self._active:
                self._refresh_counts()
            done, failed, running = sum(self._done), sum(self._failed), len(self._inflight)
            total = self.spec.total
            pending = max(total - done - failed - running, 0)
            if self._active:
                status = "stopping" if self._stopping else "running"
            elif pending + running == 0:
                status = "finished"
            elif self._launched or done + failed:
                status = "paused"
            else:
                status = "idle"
            end = time.monotonic() if self._session_end is None else self._session_end
            elapsed = end - self._session_start if self._session_start else 0.0
            n = self._session_finished
        rate = n / elapsed if n and elapsed > 0 else None
        eta = pending / rate if rate else None
        return Progress(total, done, failed, running, pending, status, elapsed, rate, eta)

    @property
    def results(self) -> pd.DataFrame:
        """One row per finished run: instance, iteration, status, error, duration, …,
        then the result (a dict result gives one column per key). Cheap to read at any
        time, from any process, while runs go on."""
        return self._store.results_frame()

    @property
    def state(self) -> pd.DataFrame:
        """One row per instance of the batch: done, failed, running, pending counts."""
        import pandas as pd

        with self._mutex:
            if not self._active:
                self._refresh_counts()
            running = [0] * len(self.spec.instances)
            for inst, _ in self._inflight:
                pos = self._position.get(inst)
                if pos is not None:
                    running[pos] += 1
            frame = pd.DataFrame(
                {
                    "instance": list(self.spec.instances),
                    "done": list(self._done),
                    "failed": list(self._failed),
                    "running": running,
                }
            )
        frame["pending"] = self.spec.iterations - frame[["done", "failed", "running"]].sum(axis=1)
        frame["iterations"] = self.spec.iterations
        return frame

    def retry_failed(self) -> int:
        """Forget failed runs so they are owed again; returns how many. A running
        dispatcher schedules them at once; otherwise the next start() does."""
        return self.reset(failed_only=True)

    def reset(self, failed_only: bool = False) -> int:
        """Forget finished runs (all, or only the failed ones); returns how many."""

        def forget() -> int:  # in the writer thread: ordered after every queued commit
            n = self._store.delete_runs(failed_only)
            with self._mutex:
                if not failed_only:
                    self._checkpoints.clear()
                self._refresh_counts(force=True)
                if self._active and not self._stopping:
                    # An exhausted plan (None) means idle workers have already left.
                    exhausted.append(self._plan is None)
                    self._plan = self._build_plan()
            return n

        exhausted: list[bool] = []
        with self._session_lock:  # the session cannot end while forget() is queued
            with self._mutex:
                own_session = not self._active
            if own_session:
                self._open_session()
            writer = self._writer
            assert writer is not None
            try:
                n: int = writer.call(forget)
            finally:
                if own_session:
                    self._close_session()
        if exhausted == [True]:
            self._add_workers()
        return n

    def _add_workers(self) -> None:
        """After reset() mid-session: start workers for re-queued runs, up to ``workers``."""
        with self._mutex:
            free = self.spec.workers - len(self._inflight)
            if not self._active or self._stopping or self._plan is None or free <= 0:
                return
            self._live_executors += 1
        self._launch(free)

    def close(self) -> None:
        """Stop (waiting for in-flight runs) and release the state file.

        Once stop() returns, every executor has ended and cleaned up after itself."""
        self.stop()
        self._store.close()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self.progress
        return (
            f"<alma.Dispatcher {self.spec.name!r} {p.status}: {p.done}/{p.total} done, "
            f"{p.failed} failed, {p.running} running>"
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """In a Jupyter kernel, show the live controller; alma.notebook (and ipywidgets)
        is imported only here, so the engine never needs the widget stack."""
        from .notebook import mimebundle

        return mimebundle(self, include, exclude)

    # -- RunSource: what executors call ------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once stop() was asked in this session."""
        return self._stopping

    def next_task(self) -> Task | None:
        """Hand out the next run owed (hot path: one lock, no I/O)."""
        with self._mutex:
            plan = self._plan
            if plan is None:
                return None
            for pos, it in plan:
                key = (self._ids[pos], it)
                if key in self._inflight or key in self._saving:
                    continue
                task = Task(
                    key,
                    self.spec.instances[pos],
                    self.spec.paths[pos],
                    it,
                    self._checkpoints.get(key),
                )
                self._inflight[key] = task
                return task
            self._plan = None
            return None

    def report(self, task: Task, outcome: Outcome) -> None:
        """Queue a finished run for the next group commit."""
        if outcome.status == "failed":
            self.last_error = RunError(
                task.instance, task.iteration, outcome.error or "", outcome.traceback or ""
            )
        row: RunRow = (
            task.key[0],
            task.key[1],
            outcome.status,
            outcome.result,
            outcome.error,
            outcome.traceback,
            outcome.attempts,
            outcome.duration,
            time.time(),
            self.spec.code_hash,
        )
        with self._mutex:
            self._inflight.pop(task.key, None)
            self._saving.add(task.key)
        writer = self._writer
        assert writer is not None
        writer.put_run(row, task.key in self._checkpoints)

    def abandon(self, task: Task) -> None:
        """A run was aborted by a stop: it is owed again (its checkpoint is kept)."""
        with self._mutex:
            self._inflight.pop(task.key, None)

    def checkpoint(self, task: Task, state: str) -> None:
        """Durably save a checkpoint, then abort the run if a stop was asked."""
        writer = self._writer
        assert writer is not None
        writer.put_checkpoint((task.key[0], task.key[1], state, time.time()))
        self._checkpoints[task.key] = state
        if self._stopping:
            raise Interrupted(f"{task.instance} iteration {task.iteration}: stopped")

    def executor_done(self) -> None:
        """An executor has nothing in flight any more; end the session if it was the last."""
        with self._mutex:
            self._live_executors -= 1
            if self._live_executors:
                return
        with self._session_lock:
            with self._mutex:
                if self._live_executors or not self._active:
                    return  # start() came meanwhile, or the session is already closed
            self._close_session()

    # -- internals -------------------------------------------------------------------

    def _committed(self, rows: list[RunRow]) -> None:
        """Writer callback after a group commit: now (and only now) the runs count."""
        with self._mutex:
            for row in rows:
                key = (row[0], row[1])
                self._saving.discard(key)
                self._checkpoints.pop(key, None)
                pos = self._position.get(row[0])
                if pos is not None and row[1] < self.spec.iterations:
                    if row[2] == "done":
                        self._done[pos] += 1
                    else:
                        self._failed[pos] += 1
            self._session_finished += len(rows)

    def _writer_failed(self, exc: BaseException) -> None:
        """The state file could not be written (disk full, I/O error): stop, say why."""
        self.last_error = RunError(
            "",
            -1,
            f"State file {self.spec.state_path}: saving failed ({type(exc).__name__}: "
            f"{exc}). Runs finished before are kept; free disk space (or fix the file's "
            "permissions), then start() again.",
            "",
        )
        threading.Thread(target=self.stop, daemon=True).start()

    def executor_failed(self, exc: BaseException) -> None:
        """An executor's own machinery failed (not a run): show it like a failed run."""
        self.last_error = RunError(
            "",
            -1,
            f"executor failed: {type(exc).__name__}: {exc}",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        )

    def _open_session(self) -> None:
        """Take the OS lock and the writer. Caller holds _session_lock."""
        self._oslock.acquire()
        try:
            ids = self._store.open_writer(
                list(zip(self.spec.instances, self.spec.paths, strict=True)),
                self.spec.iterations,
                self.spec.code_hash,
            )
        except BaseException:
            self._oslock.release()
            raise
        checkpoints = self._store.checkpoints()
        with self._mutex:
            self._ids = [ids[name] for name in self.spec.instances]
            self._position = {i: pos for pos, i in enumerate(self._ids)}
            self._checkpoints = checkpoints
            self._refresh_counts(force=True)
            self._writer = _Writer(self._store, self._committed, self._writer_failed)
            self._active = True
            self._session_start = time.monotonic()
            self._session_end = None
            self._session_finished = 0

    def _close_session(self) -> None:
        """End the session (no executor is left). Caller holds _session_lock, not _mutex:
        the writer commits what is queued, and its callback takes the mutex."""
        with self._mutex:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self._store.close_writer()
        self._oslock.release()
        with self._mutex:
            self._active = False
            self._stopping = False
            self._session_end = time.monotonic()
            self._plan = None
            self._inflight.clear()  # no executor is left: nothing is really in flight
            self._saving.clear()
            self._executors.clear()
            self._cache_version = None
            self._idle.set()

    def _refresh_counts(self, force: bool = False) -> None:
        """Re-read per-instance counts from the store when another connection changed it."""
        if self._active and not force:
            return
        now = time.monotonic()
        if not force and now - self._refreshed_at < REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        version = self._store.data_version() if not force else None
        if version is not None and version == self._cache_version:
            return
        ids = self._store.instance_ids()
        self._ids = [ids.get(name, -1) for name in self.spec.instances]
        self._position = {i: pos for pos, i in enumerate(self._ids) if i >= 0}
        counts = self._store.counts(self.spec.iterations)
        self._done = [counts.get(i, (0, 0))[0] for i in self._ids]
        self._failed = [counts.get(i, (0, 0))[1] for i in self._ids]
        self._cache_version = version

    def _build_plan(self) -> Iterator[tuple[int, int]] | None:
        """Runs still owed, in the experiment's order; None when nothing is owed."""
        marks = self._store.finished(self._ids, self.spec.iterations)
        rows = [marks[i] for i in self._ids]
        for inst, it in [*self._inflight, *self._saving]:  # running, or being saved
            pos = self._position.get(inst)
            if pos is not None and it < self.spec.iterations:
                rows[pos][it] = 1
        if all(row.find(0) < 0 for row in rows):
            return None
        order = _round_robin if self.spec.order == "round-robin" else _by_instance
        return order(rows, self.spec.iterations)


def _round_robin(rows: list[bytearray], iterations: int) -> Iterator[tuple[int, int]]:
    """Iteration 0 of every instance, then iteration 1, …: partial results cover all."""
    last = [row.rfind(0) for row in rows]
    active = [pos for pos, end in enumerate(last) if end >= 0]
    for it in range(iterations):
        active = [pos for pos in active if last[pos] >= it]
        for pos in active:
            if not rows[pos][it]:
                yield pos, it


def _by_instance(rows: list[bytearray], iterations: int) -> Iterator[tuple[int, int]]:
    """Every iteration of the first instance, then the next instance."""
    for pos, row in enumerate(rows):
        it = row.find(0)
        while it >= 0:
            yield pos, it
            it = row.find(0, it + 1)


class _Writer:
    """Background thread that commits finished runs and checkpoints in groups.

    Finished runs wait at most ~COMMIT_INTERVAL; a checkpoint is committed at once and
    its caller waits for the commit, since save_callback promises durability. Other
    writes (``call``) run in this thread too, ordered after everything queued before.
    """

    def __init__(self, store: Store, on_commit: Any, on_error: Any) -> None:
        self._store = store
        self._on_commit = on_commit
        self._on_error = on_error
        self._cond = threading.Condition()
        self._runs: list[RunRow] = []
        self._drop: list[tuple[int, int]] = []
        self._ckpts: list[tuple[int, int, str, float]] = []
        self._calls: list[_Call] = []
        self._queued = 0  # sequence number of the last item queued
        self._committed = 0  # sequence number of the last item committed
        self._urgent = False
        self._closing = False
        self.error: BaseException | None = None  # why writing failed, if it did
        self._thread = threading.Thread(target=self._loop, name="alma-writer", daemon=True)
        self._thread.start()

    def put_run(self, row: RunRow, drop_checkpoint: bool) -> None:
        with self._cond:
            # Back-pressure: runs finishing faster than SQLite commits them wait here
            # rather than piling up in memory.
            while len(self._runs) >= MAX_QUEUED_RUNS and self._thread.is_alive():
                self._cond.wait(0.1)
            self._runs.append(row)
            if drop_checkpoint:
                self._drop.append((row[0], row[1]))
            self._queued += 1
            if len(self._runs) == 1:
                self._cond.notify()

    def put_checkpoint(self, ckpt: tuple[int, int, str, float]) -> None:
        """Queue a checkpoint and return once it is committed.

        If the state cannot be written, the run is aborted (owed again) rather than
        carried on with a checkpoint that ``save_callback`` could not make durable.
        """
        with self._cond:
            self._ckpts.append(ckpt)
            self._queued += 1
            if not self._wait(self._queued):
                raise Interrupted(f"the checkpoint could not be saved: {self.error!r}")

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` in the writer thread after the queued commits; return its result."""
        c = _Call(fn)
        with self._cond:
            self._calls.append(c)
            self._queued += 1
            if not self._wait(self._queued):
                raise StateError(f"the state file could not be written: {self.error!r}")
        if c.error is not None:
            raise c.error
        return c.result

    def flush(self) -> None:
        """Return once everything queued so far is committed."""
        with self._cond:
            self._wait(self._queued)

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

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
