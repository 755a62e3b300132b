"""alma: plan, run, pause and resume long file-based experiments, from Jupyter or a terminal.

>>> import alma.experiment
>>> dispatcher = alma.experiment.load("example.experiment")  # validates, starts nothing
>>> dispatcher.start()                                        # runs in the background
>>> dispatcher.stop()                                         # pause; resume with start()
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from .errors import AlmaError, ConfigError, Interrupted, LockedError, Paused, StateError
from .records import RunError, run_seed

if _typing.TYPE_CHECKING:
    from .dispatcher import Dispatcher, Progress
    from .experiment import Experiment, load

#: Loaded on first use (PEP 562): a worker process imports ``alma.executors.processes``
#: and ``alma.records``, which must not drag in the dispatcher, SQLite and the spec
#: (about 100 ms of every worker's start-up).
_LAZY = {
    "Dispatcher": "dispatcher",
    "Progress": "dispatcher",
    "Experiment": "experiment",
    "load": "experiment",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'alma' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AlmaError",
    "ConfigError",
    "Dispatcher",
    "Experiment",
    "Interrupted",
    "LockedError",
    "Paused",
    "Progress",
    "RunError",
    "StateError",
    "__version__",
    "load",
    "run_seed",
]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext alma``: register the ``%alma`` magics."""
    from .notebook.magics import load_ipython_extension as load

    load(ipython)
