"""The ``%alma`` line magic: drive one experiment from notebook cells.

``%load_ext alma`` registers it. The magics keep a *current* dispatcher (the last one
loaded with ``%alma load``) so that ``%alma stop`` or ``df = %alma results`` need no
variable. Without one they act on the experiment the notebook shows or made last
(``d = alma.Experiment(...)`` or ``d = alma.experiment.load(...)`` in a cell, or a
displayed dispatcher), so mixing code and magics just works. Everything they do goes
through the Dispatcher's public API, like the controller.

Imports: this module uses :mod:`alma.notebook.registry` (the dispatcher shown last, the
controller shown for a dispatcher) and the Controller's public methods only; it never
imports ``alma.notebook.controller`` itself, so ``%load_ext alma`` does not load
ipywidgets. ``alma.load_ipython_extension`` imports it lazily.
"""

from __future__ import annotations

import shlex
import weakref
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from .registry import last_dispatcher, registered, touch

if TYPE_CHECKING:
    import pandas as pd

    from ..dispatcher import Dispatcher

__all__ = ["AlmaMagics", "load_ipython_extension"]

HELP = """\
%alma: run an alma experiment from notebook cells.

  %alma load PATH      load PATH (.experiment file) and show its controller
  %alma start [PATH]   start or resume (PATH: load it first)
  %alma start --detach [PATH]
                       the same in a background process that outlives the
                       kernel (close the notebook, come back, %alma stop)
  %alma stop           pause: no new runs, in-flight runs end and are saved
                       (also when another process or a detached runner runs it)
  %alma status         one line: status, counts, rate, ETA (and the SLURM
                       jobs: pending, running, gone)
  %alma results        DataFrame of finished runs   (df = %alma results)
  %alma state          DataFrame per instance       (df = %alma state)
  %alma retry          run the failed runs again
  %alma reset [--failed]  forget all finished runs (or only the failed ones)

The magics act on the experiment loaded last with %alma load; without
one, on the experiment displayed or assigned to a variable last (e.g.
d = alma.Experiment(...)). In Python the same is
d = alma.experiment.load(PATH); d.start(); d.stop(); d.results; d.state.
"""

# subcommand -> (smallest, largest) number of arguments
_ARITY = {
    "load": (1, 1),
    "start": (0, 1),
    "stop": (0, 0),
    "status": (0, 0),
    "results": (0, 0),
    "state": (0, 0),
    "retry": (0, 0),
    "reset": (0, 1),
}


def _without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a word outside quotes (``%alma reset  # why``);
    a ``#`` inside a word or in quotes stays (``%alma load runs#2.experiment``)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _usage(problem: str) -> UsageError:
    return UsageError(f"{problem}\n\n{HELP}")


@magics_class
class AlmaMagics(Magics):
    """``%alma`` and its subcommands; holds the current dispatcher."""

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        #: The dispatcher the subcommands act on (set by ``load`` / ``start PATH``); when
        #: None they fall back to ``alma.notebook.last_dispatcher()``.
        self.dispatcher: Dispatcher | None = None
        # Dispatchers already seen in the user's namespace: only a new one (a cell just
        # made it) becomes the fallback, so re-running an old cell order is respected.
        self._seen: weakref.WeakSet[Dispatcher] = weakref.WeakSet()
        if shell is not None:
            self._discover()
            shell.events.register("post_run_cell", self._discover)

    @line_magic
    def alma(self, line: str = "") -> Any:
        """Run an alma experiment from notebook cells; ``%alma`` alone shows help."""
        try:
            words = shlex.split(_without_comment(line))
        except ValueError as exc:
            raise _usage(f"%alma: cannot parse {line!r}: {exc}") from None
        if not words:
            print(HELP)
            return None
        command, args = words[0], words[1:]
        if command in ("help", "-h", "--help"):
            print(HELP)
            return None
        if command not in _ARITY:
            raise _usage(f"%alma: unknown command {command!r}.")
        detach = command == "start" and any(a in ("-d", "--detach") for a in args)
        if detach:
            args = [a for a in args if a not in ("-d", "--detach")]
        low, high = _ARITY[command]
        if not low <= len(args) <= high:
            want = f"{low}" if low == high else f"{low} to {high}"
            raise _usage(f"%alma {command}: expected {want} argument(s), got {len(args)}: {args}")
        if detach:
            return self._start(args[0] if args else None, detach=True)
        return getattr(self, f"_{command}")(*args)

    # -- subcommands -----------------------------------------------------------------

    def _load(self, path: str, hint: bool = True) -> None:
        self.dispatcher = _load(path)
        _show(self.dispatcher)
        said = _finished_hint(self.dispatcher) if hint else None
        if said:
            print(said)

    def _start(self, path: str | None = None, detach: bool = False) -> None:
        if path is not None:
            self._load(path, hint=False)  # said once, below
        d = self._current("start")
        d.start(detach=detach)
        _resync(d)
        print(_summary(d))
        hint = _finished_hint(d)
        if hint:
            print(hint)

    def _stop(self) -> None:
        d = self._current("stop")
        d.stop()
        _resync(d)
        print(_summary(d))

    def _status(self) -> None:
        d = self._current("status")
        _resync(d)
        print(_summary(d))
        if len(d.spec.params) > 1:  # a grid: a line per configuration
            for row in d.configs.to_dict("records"):
                counts = {k: row.pop(k) for k in ("done", "failed", "running", "pending")}
                label = ", ".join(f"{k}={v!r}" for k, v in row.items())
                print(f"  {label}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))

    def _results(self) -> pd.DataFrame:
        return self._current("results").results

    def _state(self) -> pd.DataFrame:
        return self._current("state").state

    def _retry(self) -> None:
        d = self._current("retry")
        n = d.retry_failed()
        hint = "" if d.running or not n else " Start with %alma start."
        print(f"{n} failed run(s) will run again.{hint}")

    def _reset(self, flag: str | None = None) -> None:
        if flag not in (None, "--failed"):
            raise _usage(f"%alma reset: unknown option {flag!r} (only --failed).")
        d = self._current("reset")
        n = d.reset(failed_only=flag == "--failed")
        _resync(d)
        what = "failed run(s)" if flag else "finished run(s)"
        hint = "" if d.running or not n else " Start with %alma start."
        print(f"{n} {what} forgotten.{hint}")

    def _current(self, command: str) -> Dispatcher:
        if self.dispatcher is not None:
            return self.dispatcher
        self._discover()  # e.g. `d = alma.Experiment(...)` earlier in this very cell
        d = last_dispatcher()
        if d is None:
            raise _usage(
                f"%alma {command}: no experiment loaded yet. Run %alma load PATH "
                "(or %alma start PATH) first, or make one in code: "
                "d = alma.Experiment(...) or d = alma.experiment.load(PATH)."
            )
        return d

    def _discover(self, *_args: Any) -> None:
        """Note dispatchers that appeared in the user's namespace since the last look
        (run after every cell): the newest becomes what the magics act on by default."""
        from ..dispatcher import Dispatcher

        namespace = getattr(self.shell, "user_ns", None) or {}
        try:
            values = list(namespace.values())
        except Exception:  # a namespace changing under us: look again after the next cell
            return
        for value in values:
            try:
                if isinstance(value, Dispatcher) and value not in self._seen:
                    self._seen.add(value)
                    touch(value)
            except Exception:  # an odd object in the namespace is none of our business
                continue


def _load(path: str) -> Dispatcher:
    import os

    import alma.experiment

    return alma.experiment.load(os.path.expanduser(path))


def _show(dispatcher: Dispatcher) -> None:
    from IPython.display import display

    display(dispatcher)


def _resync(d: Dispatcher) -> None:
    """Bring the controller shown for ``d`` (if any) up to date from this cell."""
    controller = registered(d)
    if controller is not None:
        controller.resync()
        if d.running or d.running_elsewhere:
            controller.follow()


def _finished_hint(d: Dispatcher) -> str | None:
    """What to do with an experiment that has nothing left to run (None otherwise)."""
    if d.running or d.runner is not None or not d.finished:
        return None
    p = d.progress
    return (
        f"{d.spec.name} has already finished ({p.done}/{p.total} done, {p.failed} failed): "
        "nothing is left to run. To run it again: %alma reset forgets every finished run "
        "(it deletes them from the state file), %alma reset --failed only the failed ones; "
        "then %alma start."
    )


def _summary(d: Dispatcher) -> str:
    p = d.progress
    status: str = p.status
    runner = d.runner
    if runner is not None and not d.running:
        how = "detached, " if runner.detached else ""
        status = f"running elsewhere ({how}pid {runner.pid} on {runner.host})"
    line = (
        f"{d.spec.name}: {status} · {p.done}/{p.total} done, {p.failed} failed, "
        f"{p.running} running, {p.pending} pending"
    )
    holder = d.running_elsewhere if not d.running else None
    if holder:
        line += f" · running elsewhere: {holder}"
    if p.status in ("running", "stopping") and p.rate:
        line += f" · {p.rate:.1f} runs/s"
        if p.eta is not None:
            line += f", ETA {p.eta:.0f} s"
    jobs = d.jobs
    if jobs is not None and jobs.total:
        line += f" · {jobs.describe()}"
    return line


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%alma`` (called by ``%load_ext alma``)."""
    from .shell import quiet_pauses

    ipython.register_magics(AlmaMagics)
    quiet_pauses(ipython)
