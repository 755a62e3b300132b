"""The Dispatcher: start, stop, resume and watch one experiment.

States::

    idle ──start()──► running ──stop()──► stopping ──(in-flight runs end)──► paused
      ▲                  │                                                     │
      └──────────────────┴──(every run finished)──► finished    start() ◄─────┘

The dispatcher keeps the public API, the per-instance counts and the lifecycle; what
exists only while runs go on (the OS lock, the writer, the plan, the runs in flight)
belongs to a :class:`~alma.session.Session`, which ``start()`` opens and whose end
drops it. Front-ends never get callbacks: they poll :attr:`Dispatcher.progress`, a
frozen snapshot, on their own timer, so a broken UI cannot break a run.

A dispatcher whose experiment runs in another process (a detached runner, ``alma run``
in a terminal, another kernel) is a live view of it: progress, results and state follow
the state file, :attr:`~Dispatcher.runner` names that process, ``stop()`` asks it to
pause (through :mod:`alma.control`) and ``join()`` waits for it; ``close()`` never
stops it.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import control, jobfile
from .errors import AlmaError, ConfigError, LockedError, Paused
from .executors import executor_class
from .lock import ExperimentLock, Holder
from .plan import Tally
from .records import (
    Config,
    ErrorGroup,
    InFlight,
    JobCounts,
    RunError,
    RunKey,
    Status,
    Task,
    seed_of,
)
from .runfunc import make_caller
from .session import Session, SessionClock, SessionHooks
from .spec import Spec
from .store import Store

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Progress:
    """A snapshot of an experiment's progress; counts cover the current plan only."""

    #: Runs in the plan: instances in the batch × configurations × iterations.
    total: int
    #: Runs finished successfully (committed to the state file).
    done: int
    #: Runs finished with an error (after their retries).
    failed: int
    #: Runs executing now (on Dask: submitted to the cluster). A run a worker holds
    #: queued behind the one it executes counts as pending.
    running: int
    #: Runs still owed: total − done − failed − running (a run that just ended counts
    #: here until its group commit, a few milliseconds later).
    pending: int
    #: idle, running, stopping, paused or finished.
    status: Status
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


class Dispatcher:
    """Plans, runs, pauses and resumes one experiment. Build it with ``alma.experiment.load``
    or :func:`alma.Experiment`; both validate everything first and start nothing."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self._store = Store(spec.state_path, spec.name, spec.seed)
        self._store.validate()
        self._oslock = ExperimentLock(spec.state_path)
        # Lock order: _lifecycle before _mutex, never the other way round (see
        # alma.session). _lifecycle serialises opening and closing a session.
        self._lifecycle = threading.RLock()
        self._mutex = threading.RLock()
        self._idle = threading.Event()  # set while no executor runs
        self._idle.set()
        self._session: Session | None = None
        self._clock = SessionClock()  # of the last session, kept after it ended
        self._launched = False  # runs were handed to an executor in this process
        self._tally = Tally(spec.instances, spec.params, spec.iterations)
        self._hooks = SessionHooks(idle=self._session_idle, error=self._record_error)
        #: The last failure seen (a run's, or of alma's own machinery), or None.
        self.last_error: RunError | None = None
        self._halted: AlmaError | None = None
        self._stopped_remotely = False
        self._tally.refresh(self._store, force=True)
        _warn_at_load(spec, self._store)

    # -- public API ------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        """Where the state (results, checkpoints) is saved."""
        return str(self.spec.state_path)

    @property
    def running(self) -> bool:
        """True while runs execute or wind down (running or stopping)."""
        return self._session is not None

    @property
    def running_elsewhere(self) -> str | None:
        """Which process runs this experiment, when another one does (else None): its
        pid, host, since when and, for a detached runner, its log file."""
        return self._oslock.holder()

    @property
    def runner(self) -> Holder | None:
        """The process that runs this experiment, when another one does, as a record
        (pid, host, since, detached, log); None when none does (or this one does)."""
        return self._oslock.holder_info()

    @property
    def stopped_remotely(self) -> bool:
        """True when the current or last session of this dispatcher was paused by a stop
        asked from another process (``alma stop``, another kernel's ``stop()``)."""
        session = self._session
        return session.stopped_remotely if session is not None else self._stopped_remotely

    @property
    def finished(self) -> bool:
        """True when every run of the plan has finished (done or failed)."""
        p = self.progress
        return p.pending + p.running == 0

    @property
    def status(self) -> Status:
        """idle, running, stopping, paused or finished."""
        return self.progress.status

    def start(self, detach: bool = False) -> None:
        """Start (or resume) in the background and return at once.

        Raises LockedError when the experiment runs in another process or kernel.
        Starting a running dispatcher does nothing.

        ``detach=True`` runs it in a new background process instead, which outlives this
        one (a kernel restart, a closed terminal): it returns once that runner holds the
        experiment's lock; this dispatcher is then a live view of it (``stop()`` pauses
        it, ``join()`` waits for it). Raises what the runner met: ConfigError,
        StateError, or LockedError when the experiment already runs elsewhere.
        """
        if detach:
            self._start_detached()
            return
        if self.spec.run is None:
            raise ConfigError(
                f"{self.spec.name} was loaded for reading only (readonly=True): its run "
                "module was not imported. Load it again without readonly to run it."
            )
        with self._lifecycle:
            session = self._session
            if session is not None and not session.stopping:
                return
            if session is None:
                if self.finished:  # nothing owed: no session, no lock, no write
                    return
                session = self._open_session()
            try:
                workers = session.resume()
            except BaseException:  # e.g. MemoryError: never leave it open and locked
                if not session.live_executors:
                    self._close_session()
                raise
            if workers is None:
                self._close_session()
                return
            if workers:
                self._idle.clear()
                self._launched = True
        if workers:
            session.launch(workers)  # outside the locks: a Dask cluster takes seconds

    def _start_detached(self) -> None:
        from .detach import launch  # the runner machinery is needed only here

        with self._lifecycle:
            if self._session is not None:
                raise LockedError(
                    f"{self.spec.name} is already running in this process; stop() it "
                    "first to run it detached."
                )
            if self.finished:
                return
            launch(self.spec)

    def stop(self, timeout: float | None = None) -> bool:
        """Pause: hand out no new run, let in-flight runs end, save everything.

        Runs that call ``save_callback`` are aborted at their next call (after it saved).
        Returns True once nothing is in flight; False if runs still go on after
        ``timeout`` seconds (they are listed in a warning and keep their (instance,
        iteration) until they end; their result is kept).

        When another process runs the experiment (see :attr:`runner`), asks it to pause
        and returns True once it has released the experiment; False if it still runs
        after ``timeout`` seconds.
        """
        if self._session is None:
            holder = self._oslock.holder_info()
            if holder is not None:
                return self._stop_remote(holder, timeout)
        return self._stop_local(timeout)

    def _stop_remote(self, holder: Holder, timeout: float | None) -> bool:
        control.request_stop(self.spec.state_path, holder)
        if self._wait_remote(holder, timeout):
            control.withdraw(self.spec.state_path)  # a runner that ended before seeing it
            return True
        warnings.warn(
            f"{self.spec.name}: the runner ({holder.describe()}) was asked to pause but "
            f"still runs after {timeout} s (runs in flight that never checkpoint end "
            "first); it pauses once they end.",
            stacklevel=3,
        )
        return False

    def _wait_remote(self, holder: Holder, timeout: float | None) -> bool:
        """Wait until ``holder`` no longer holds the lock; False after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._oslock.holder_info() == holder:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        with self._mutex:  # what the runner committed last shows at once
            self._tally.refresh(self._store, force=True)
        return True

    def _stop_local(self, timeout: float | None = None) -> bool:
        session = self._session
        if session is not None:
            session.stop()
        if self._idle.wait(timeout):
            return True
        stuck = sorted((t.instance, t.iteration) for t in session.in_flight()) if session else []
        warnings.warn(
            f"{self.spec.name}: {len(stuck)} run(s) still going after "
            f"{timeout} s: {stuck[:10]}. They neither checkpointed nor ended; they "
            "will not be handed out again until they end.",
            stacklevel=2,
        )
        return False

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the session has ended; True when it has and every run has finished.

        The session has ended once its executors have cleaned up, the last commit is in,
        the state file is whole on its own (no -wal needed) and the lock is released.

        Interrupted (Ctrl-C, the kernel's interrupt button), it pauses the experiment as
        stop() does, then raises :class:`alma.Paused`; interrupted again while runs wind
        down, it raises at once and they end in the background.

        When another process runs the experiment, waits for that runner to end (paused
        or finished); interrupting this wait leaves the runner running."""
        if self._session is None:
            holder = self._oslock.holder_info()
            if holder is not None:
                return self._wait_remote(holder, timeout) and self.finished
        try:
            return self._idle.wait(timeout) and self.finished
        except KeyboardInterrupt:
            pass  # not inside the handler: the Paused below must not chain the traceback
        stopped = False
        with contextlib.suppress(KeyboardInterrupt):
            self._stop_local()
            stopped = True
        p = self.progress
        how = "paused" if stopped else "pausing (runs in flight end in the background)"
        raise Paused(
            f"alma: {self.spec.name} {how}: {p.done} of {p.total} runs done, {p.failed} "
            "failed. start() continues."
        )

    @property
    def halted(self) -> AlmaError | None:
        """Why the current or last session stopped before every run ended, when alma's
        own machinery failed: a StateError when the state file could not be written (or
        was deleted or replaced meanwhile), an AlmaError when an executor failed; None
        after a session that ended normally or was paused."""
        session = self._session
        return session.halted if session is not None else self._halted

    @property
    def progress(self) -> Progress:
        """A frozen snapshot: total, done, failed, running, pending, status, rate, ETA."""
        status: Status
        with self._mutex:
            session = self._session
            if session is None:
                self._tally.refresh(self._store)
            done, failed = sum(self._tally.done), sum(self._tally.failed)
            running = session.running if session is not None else 0
            total = self.spec.total
            pending = max(total - done - failed - running, 0)
            if session is not None:
                status = "stopping" if session.stopping else "running"
            elif pending + running == 0:
                status = "finished"
            elif self._launched or done + failed:
                status = "paused"
            else:
                status = "idle"
            elapsed, n = self._clock.elapsed(), self._clock.runs
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
        """One row per instance of the batch in each configuration: its parameters, then
        done, failed, running and pending counts."""
        import pandas as pd

        tally, spec = self._tally, self.spec
        with self._mutex:
            session = self._session
            if session is None:
                tally.refresh(self._store)
            running = [0] * spec.cells
            for task in session.in_flight() if session is not None else []:
                pos = tally.position.get(task.key[:2])
                if pos is not None:
                    running[pos] += 1
            done, failed = list(tally.done), list(tally.failed)
        per = len(spec.params)
        names = spec.instances if per == 1 else [n for n in spec.instances for _ in range(per)]
        frame = pd.DataFrame({"instance": list(names)})
        if spec.params[0].params:  # a grid: its parameters, repeated for every instance
            configs = pd.DataFrame.from_records([dict(c.params) for c in spec.params])
            grid = pd.concat([configs] * len(spec.instances), ignore_index=True)
            frame = pd.concat([frame, grid], axis=1)
        frame["done"], frame["failed"], frame["running"] = done, failed, running
        frame["pending"] = spec.iterations - frame[["done", "failed", "running"]].sum(axis=1)
        frame["iterations"] = spec.iterations
        return frame

    @property
    def failures(self) -> list[ErrorGroup]:
        """Failed runs grouped by error (type and message), most frequent first, each
        with an example run and its traceback: what went wrong at a glance, read from the
        state file (so failures of earlier sessions count too)."""
        return self._store.error_groups()

    @property
    def dashboard(self) -> str | None:
        """While it runs, a web page showing the executor at work (the Dask dashboard
        with ``"executor": "dask"``); None otherwise."""
        session = self._session
        return session.dashboard if session is not None else None

    @property
    def jobs(self) -> JobCounts | None:
        """The batch jobs that carry the workers (with ``"executor": "slurm"``): how
        many are pending, running and gone, as SLURM said at the executor's last look
        (every 2 s); None when the executor submits no jobs.

        Also while another process runs the experiment (a detached runner, ``alma run``
        in a terminal): read from ``<state>.jobs``, which that process keeps. Between
        sessions, the counts the last one ended with (a pause cancels the jobs: all
        gone). Cheap: no call to SLURM is made here."""
        session = self._session
        if session is not None:
            return session.jobs
        return jobfile.read(self.spec.state_path, self._oslock.holder_info())

    @property
    def in_flight(self) -> list[InFlight]:
        """The runs executing now, oldest first, with when each started and last
        saved a checkpoint (empty when no session runs in this process)."""
        session = self._session
        tasks = session.in_flight() if session is not None else []
        runs = [InFlight(t.instance, t.iteration, t.started, t.checkpointed) for t in tasks]
        return sorted(runs, key=lambda r: r.started)

    @property
    def configs(self) -> pd.DataFrame:
        """One row per configuration of ``"params"``: its parameters, then done, failed,
        running and pending runs over every instance (one row, no parameter columns,
        without a grid)."""
        state = self.state
        names = sorted({n for c in self.spec.params for n in c.params})
        counts = ["done", "failed", "running", "pending"]
        if not names:
            return state[counts].sum().to_frame().T
        return state.groupby(names, sort=False, dropna=False)[counts].sum().reset_index()

    def replay(self, instance: str, iteration: int, **params: Any) -> Any:
        """Run one run again, here, with exactly the arguments it had (the instance's
        path, the configuration ``params``, its seed and iteration; ``state=None``) and
        return its result. Nothing is written to the state file. Exceptions propagate,
        so ``%debug`` and ``pdb`` work on them; ``save_callback`` does nothing."""
        spec = self.spec
        if spec.run is None:
            raise ConfigError(
                f"{spec.name} was loaded for reading only (readonly=True): its run "
                "module was not imported. Load it again without readonly to replay a run."
            )
        try:
            pos = spec.instances.index(instance)
        except ValueError:
            close = difflib.get_close_matches(instance, spec.instances, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"{spec.name}: no instance {instance!r} in the batch (give its name as "
                f"listed, e.g. {spec.instances[0]!r}).{hint}"
            ) from None
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ConfigError(f"{spec.name}: iteration must be an integer >= 0, got {iteration!r}")
        config = Config(dict(sorted(params.items())))
        known = {c.key for c in spec.params} | set(self._store.config_ids())
        if config.key not in known:
            listed = ", ".join(sorted(known)[:5])
            raise ConfigError(
                f"{spec.name}: no configuration {config.key} in the experiment or its "
                f"results; give the parameters of one of: {listed}."
            )
        name, key = spec.instances[pos], config.key
        task = Task(
            RunKey(-1, -1, iteration),
            name,
            spec.paths[pos],
            iteration,
            config.params,
            seed_of(name, iteration, key, spec.seed),
        )
        return make_caller(spec.run)(task, _no_save, None)

    def retry_failed(self) -> int:
        """Forget failed runs so they are owed again; returns how many. A running
        dispatcher schedules them at once; otherwise the next start() does."""
        return self.reset(failed_only=True)

    def reset(self, failed_only: bool = False) -> int:
        """Forget finished runs (all, or only the failed ones); returns how many."""
        with self._lifecycle:  # the session cannot end while the deletion is queued
            session = self._session
            own = session is None
            if session is None:
                session = self._open_session()
            try:
                n, exhausted = session.forget(failed_only, replan=not own)
            finally:
                if own:
                    self._close_session()
        if exhausted:  # idle workers had left: start some for the re-queued runs
            session.add_workers()
        return n

    def close(self) -> None:
        """Stop (waiting for in-flight runs) and release the state file.

        Once stop() returns, every executor has ended and cleaned up after itself. An
        experiment run by another process (a detached runner) is left running."""
        self._stop_local()
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
        """In a Jupyter kernel, show the live controller.

        The engine's one seam to a front-end: alma.notebook (and ipywidgets) is imported
        here, lazily, and nowhere else, so the engine never needs the widget stack."""
        from .notebook import mimebundle

        return mimebundle(self, include, exclude)

    # -- sessions ----------------------------------------------------------------------

    def _open_session(self) -> Session:
        """Open a session (OS lock, writer). Caller holds _lifecycle."""
        session = Session.open(
            self.spec, self._store, self._oslock, self._tally, self._mutex, self._hooks
        )
        with self._mutex:
            self._session = session
            self._clock = session.clock
            self._halted = None
        return session

    def _close_session(self) -> None:
        """End the session (no executor is left). Caller holds _lifecycle, not _mutex:
        closing joins the writer thread, whose last callback takes the mutex."""
        session = self._session
        if session is None:
            return
        session.close()
        with self._mutex:
            self._session = None
            self._halted = session.halted
            self._stopped_remotely = session.stopped_remotely
        self._idle.set()

    def _session_idle(self, session: Session) -> None:
        """The session's last executor has ended: close it, unless start() came meanwhile."""
        with self._lifecycle:
            with self._mutex:
                if session is not self._session or session.live_executors:
                    return
            self._close_session()

    def _record_error(self, error: RunError) -> None:
        self.last_error = error


def _no_save(state: Any) -> None:
    """save_callback of a replayed run: it writes nothing."""


def _warn_at_load(spec: Spec, store: Store) -> None:
    """What a user should know before starting: an unenforceable timeout, changed code."""
    name = spec.executor.name
    if spec.timeout is not None and not executor_class(name).enforces_timeout:
        warnings.warn(
            f'{spec.name}: "timeout": {spec.timeout:g} is not enforced by the {name} '
            'executor; use "executor": "processes" to enforce it.',
            stacklevel=4,
        )
    previous = store.last_session_code()
    if previous is not None and spec.code_hash and previous != spec.code_hash:
        warnings.warn(
            f"{spec.name}: the run code changed since the last session "
            f"({previous} -> {spec.code_hash}); results record which code "
            "produced each run in their 'code' column.",
            stacklevel=4,
        )
