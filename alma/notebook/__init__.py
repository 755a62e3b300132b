"""Jupyter front-end: the live :class:`Controller` widget and the ``%alma`` magics.

This package is the only place that imports IPython, ipywidgets and ``tqdm.notebook``,
and it does so lazily: the engine (``alma.experiment``, ``alma.dispatcher``) imports
``alma.notebook`` only when a Dispatcher is displayed in a notebook, so scripts and
terminals never pay for (or need) the widget stack.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..dispatcher import Dispatcher
    from .controller import Controller

__all__ = ["Controller", "controller_for", "mimebundle"]

# One controller per dispatcher, so re-displaying a dispatcher (re-running a cell) reuses
# its widget and timer instead of piling up new ones. Weak keys: the mapping alone never
# keeps a dispatcher (and its open state file) alive.
_controllers: weakref.WeakKeyDictionary[Dispatcher, Controller] = weakref.WeakKeyDictionary()
_controllers_lock = threading.RLock()


def controller_for(dispatcher: Dispatcher) -> Controller:
    """The controller of ``dispatcher``, made on first use and reused afterwards."""
    from .controller import Controller

    with _controllers_lock:
        controller = _controllers.get(dispatcher)
        if controller is None or controller.closed:
            controller = Controller(dispatcher)
        return controller


def _register(dispatcher: Dispatcher, controller: Controller) -> None:
    """Record ``controller`` as the one for ``dispatcher`` (called by Controller)."""
    with _controllers_lock:
        _controllers[dispatcher] = controller


def _in_kernel() -> bool:
    """True inside a Jupyter kernel, where widgets can render."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return getattr(shell, "kernel", None) is not None


def mimebundle(dispatcher: Dispatcher, include: Any = None, exclude: Any = None) -> dict[str, Any]:
    """What a Dispatcher shows when displayed: its live controller in a kernel, else its
    repr (plain IPython, or when ipywidgets is not installed)."""
    text = {"text/plain": repr(dispatcher)}
    if not _in_kernel():
        return text
    try:
        controller = controller_for(dispatcher)
    except ImportError:  # the 'notebook' extra is missing: the repr still informs
        return text
    return controller._repr_mimebundle_(include=include, exclude=exclude) or text


def __getattr__(name: str) -> Any:
    # Controller lives in a module that imports ipywidgets; load it on first access only.
    if name == "Controller":
        from .controller import Controller

        return Controller
    raise AttributeError(f"module 'alma.notebook' has no attribute {name!r}")
