"""Run on worker threads in the dispatcher's process: the default, and the cheapest.

Workers pull tasks from the session (no future, no queue per run), so dispatch costs
about as much as a bare thread pool. When runs are short, the session's lock would be
taken twice per run (hand out, report) by every worker; so the executor takes a few
runs at a time into a queue that all its workers share (any idle worker takes the next
one: no run waits behind a long one while a worker idles), and reports finished runs a
few at a time. How many is sized from the runs' measured duration, to about
``BATCH_SECONDS`` of work, and is one as soon as runs take longer than that. A run
counts as done only once committed, batch or not. Threads cannot be killed: stop is
cooperative, through ``save_callback`` raising :class:`~alma.errors.Interrupted`; the
queued runs no worker has started are given back at once.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from typing import Any

from ..errors import Interrupted
from ..records import Outcome, Task
from ..runfunc import make_caller
from .base import Executor, RunSource, execute

#: Seconds of work taken from the session at a time, and how often the outcomes of
#: short runs are reported: about how long a finished short run waits for its report.
BATCH_SECONDS = 0.001
#: Most runs taken from the session at a time.
MAX_BATCH = 32


class ThreadExecutor(Executor):
    """``workers`` threads, each looping: take a task, run it, hand in its outcome;
    short runs' outcomes are reported by a helper thread, every ``BATCH_SECONDS``."""

    usage = '"threads"'

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Both deques are shared without a lock: append and popleft are atomic, and a
        # deque is never swapped for another, so nothing put in one can get lost.
        self._queued: deque[Task] = deque()  # taken from the session, not started
        self._ended: deque[tuple[Task, Outcome]] = deque()  # finished, not reported
        self._batch = 1  # runs taken at a time: one until their duration is known
        # Lock order: _refill or _reporting, then the session's mutex; never the reverse.
        self._refill = threading.Lock()  # one worker refills the queue at a time
        self._reporting = threading.Lock()  # held while a batch is being reported
        self._wake = threading.Event()  # outcomes are waiting for the reporter
        self._working = self.workers  # workers not ended yet
        self._source: RunSource | None = None

    def start(self, source: RunSource) -> None:
        caller = make_caller(self.run)
        retries, queued, ended, wake = self.retries, self._queued, self._ended, self._wake
        self._source = source

        def work() -> None:
            try:
                while True:
                    try:
                        task = queued.popleft()
                    except IndexError:
                        with self._refill:  # the others wait for it, then take from it
                            if not queued:
                                queued.extend(source.next_tasks(self._batch))
                            if not queued:  # the session has none: this worker is done
                                return
                        continue
                    task.started = time.time()
                    t0 = time.perf_counter()
                    try:
                        outcome = execute(caller, task, source.checkpoint, retries)
                    except Interrupted:
                        source.abandon(task)
                        continue
                    outcome.ended_at = time.time()  # it may be reported a little later
                    ended.append((task, outcome))
                    seconds = max(time.perf_counter() - t0, 1e-7)
                    self._batch = min(max(math.floor(BATCH_SECONDS / seconds), 1), MAX_BATCH)
                    if self._batch == 1:  # runs of a millisecond or more: report now
                        self._report()
                    elif not wake.is_set():
                        wake.set()
            finally:
                # Everything handed in is reported before the executor says it is done
                # (the last worker's report waits for one the reporter has under way).
                self._report()
                with self._refill:
                    self._working -= 1
                    if not self._working:
                        wake.set()  # the reporter ends

        def reporter() -> None:
            while True:
                wake.wait()
                if not self._working:
                    return
                time.sleep(BATCH_SECONDS)  # let a batch gather
                wake.clear()  # before taking them: one handed in later wakes it again
                try:
                    self._report()
                except BaseException as exc:  # a bug of alma's: shown; those runs are owed
                    source.executor_failed(exc)

        threading.Thread(target=reporter, name="alma-reporter", daemon=True).start()
        self.start_threads(source, work, "alma-worker")

    def _report(self) -> None:
        """Report the finished runs handed in so far (by any worker), in one call."""
        with self._reporting:
            batch = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self._ended.popleft())
            if batch:
                assert self._source is not None
                self._source.report_all(batch)

    def stop(self) -> None:
        """Give back the queued runs no worker has started (they are owed again)."""
        source = self._source
        with contextlib.suppress(IndexError):
            while True:
                task = self._queued.popleft()
                if source is not None:
                    source.abandon(task)
