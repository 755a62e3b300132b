"""Run on worker threads in the dispatcher's process: the default, and the cheapest.

Each worker pulls the next task straight from the session (no future, no queue per
run), so dispatch costs about as much as a bare thread pool. Threads cannot be killed:
stop is cooperative, through ``save_callback`` raising :class:`~alma.errors.Interrupted`.
"""

from __future__ import annotations

from ..errors import Interrupted
from ..runfunc import make_caller
from .base import Executor, RunSource, execute


class ThreadExecutor(Executor):
    """``workers`` threads, each looping: pull a task, run it, report it."""

    usage = '"threads"'

    def start(self, source: RunSource) -> None:
        caller = make_caller(self.run)

        def work() -> None:
            while (task := source.next_task()) is not None:
                try:
                    outcome = execute(caller, task, source.checkpoint, self.retries)
                except Interrupted:
                    source.abandon(task)
                else:
                    source.report(task, outcome)

        self.start_threads(source, work, "alma-worker")
