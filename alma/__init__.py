"""alma: plan, run, pause and resume long file-based experiments, from Jupyter or a terminal.

>>> import alma.experiment
>>> dispatcher = alma.experiment.load("example.experiment")  # validates, starts nothing
>>> dispatcher.start()                                        # runs in the background
>>> dispatcher.stop()                                         # pause; resume with start()
"""

from __future__ import annotations

from .dispatcher import Dispatcher, Progress
from .errors import AlmaError, ConfigError, Interrupted, LockedError, Paused, StateError
from .experiment import Experiment, load
from .records import RunError, run_seed

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
