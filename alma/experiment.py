"""Entry points: ``load(path)`` for experiment files, ``Experiment(...)`` for notebooks.

Both validate everything up front and return a :class:`~alma.dispatcher.Dispatcher`
that has started nothing and locked nothing. Within one process, asking again for an
experiment whose dispatcher is still running hands back that live dispatcher, so
re-running a notebook cell never starts a second one.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .dispatcher import Dispatcher
from .errors import ConfigError
from .runfunc import check_params, function_hash
from .spec import (
    OPTION_FIELDS,
    Options,
    Spec,
    check_state_dir,
    expand_instances,
    parse_options,
    read_batch,
    read_experiment,
)

__all__ = ["Dispatcher", "Experiment", "load"]

#: Every dispatcher made in this process, by state file: any of them may be the running one.
_live: dict[Path, weakref.WeakSet[Dispatcher]] = {}
_live_lock = threading.Lock()


def _dispatcher(spec: Spec) -> Dispatcher:
    with _live_lock:
        made = _live.setdefault(spec.state_path, weakref.WeakSet())
        for live in list(made):
            if live.running:
                warnings.warn(
                    f"{spec.name} is already running in this process; returning the "
                    "live dispatcher (stop it first to reload a changed experiment).",
                    stacklevel=3,
                )
                return live
        dispatcher = Dispatcher(spec)
        made.add(dispatcher)
        return dispatcher


def load(path: str | os.PathLike[str], *, readonly: bool = False) -> Dispatcher:
    """Load an ``.experiment`` file (its batch and run module) and return its Dispatcher.

    Raises ConfigError for a bad experiment, batch or module, StateError for a state
    file alma cannot use. Nothing is run, locked or written. ``readonly=True`` does not
    import the run module: progress, state, results and reset work (fast, even when the
    module's imports are slow or missing), start() refuses.
    """
    if readonly:  # never handed out as the live dispatcher: it cannot run
        return Dispatcher(read_experiment(path, import_run=False))
    return _dispatcher(read_experiment(path))


def Experiment(  # noqa: N802 - reads like a class in notebooks, returns a Dispatcher
    run: Callable[..., Any],
    instances: Sequence[str | os.PathLike[str]] | None = None,
    *,
    batch: str | os.PathLike[str] | None = None,
    iterations: int = Options.iterations,
    workers: int = Options.workers,
    state: str | os.PathLike[str] | None = None,
    order: str = Options.order,
    retries: int = Options.retries,
    executor: Any = Options.executor.name,
    timeout: float | None = Options.timeout,
    params: Any = None,
    seed: int = Options.seed,
    name: str | None = None,
) -> Dispatcher:
    """Define an experiment in code (e.g. a notebook cell) and return its Dispatcher.

    ``instances`` are file paths or globs relative to the working directory; or give a
    ``batch`` file instead. The ``state`` file (default: ``<function name>.sqlite`` in
    the working directory) makes the experiment resumable: after a kernel restart,
    running the same cells again picks up where it stopped. ``name`` (default: the
    function's name) is recorded in the state file, which then refuses (StateError)
    another experiment; pass the old name to keep a renamed function's results. The
    other keywords are the fields of an ``.experiment`` file, with the same defaults
    (declared once, in :class:`alma.spec.Options`).
    """
    where = "Experiment()"
    if not callable(run):
        raise ConfigError(
            f"{where}, argument 'run': expected a function, got {run!r}. "
            "Pass the function itself: Experiment(run=my_run, ...)."
        )
    if (instances is None) == (batch is None):
        raise ConfigError(f"{where}: give exactly one of instances=[...] or batch='x.batch'.")
    if batch is not None:
        names, paths = read_batch(batch)
    else:
        names, paths = expand_instances(instances, Path.cwd(), where)
    given = locals()
    options = parse_options(where, {key: given[key] for key in OPTION_FIELDS})
    check_params(run, options["params"], where)
    # Named after the function by default, so two experiments in one folder never share
    # a state file by accident; the name guards the file against another function.
    default = re.sub(r"\W", "_", getattr(run, "__name__", "") or "experiment")
    name = name or default
    state_path = check_state_dir(where, Path(state or f"{default}.sqlite").resolve())
    return _dispatcher(
        Spec(
            name=name,
            run=run,
            instances=names,
            paths=paths,
            state_path=state_path,
            code_hash=function_hash(run),
            **options,
        )
    )
