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

__all__ = ["Controller", "controller_for", "last_dispatcher", "mimebundle"]

# One controller per dispatcher, so re-displaying a dispatcher (re-running a cell) reuses
# its widget and timer instead of piling up new ones. Weak keys *and* weak values: a
# controller holds its dispatcher, so a strong value would keep its own key (and the open
# state file) alive forever. The mapping alone never keeps either alive; an entry goes
# with its dispatcher, or with Controller.close().
_controllers: weakref.WeakKeyDictionary[Dispatcher, weakref.ref[Controller]] = (
    weakref.WeakKeyDictionary()
)
_controllers_lock = threading.RLock()

# The dispatcher shown (or found in the user's namespace by the magics) last: what the
# ``%alma`` magics act on when no experiment was loaded with ``%alma load``. Weak, so
# pointing at an experiment never keeps it alive.
_last: weakref.ref[Dispatcher] | None = None


def controller_for(dispatcher: Dispatcher) -> Controller:
    """The controller of ``dispatcher``, made on first use and reused afterwards."""
    from .controller import Controller

    with _controllers_lock:
        controller = _registered(dispatcher)
        if controller is None:
            controller = Controller(dispatcher)
        return controller


def _registered(dispatcher: Dispatcher) -> Controller | None:
    """The open controller registered for ``dispatcher``, if any."""
    with _controllers_lock:
        ref = _controllers.get(dispatcher)
        controller = ref() if ref is not None else None
        if controller is None or controller.closed:
            return None
        return controller


def _registry() -> list[tuple[Dispatcher, Controller]]:
    """Every (dispatcher, open controller) pair, as a list safe to iterate."""
    with _controllers_lock:
        pairs = [(d, ref()) for d, ref in list(_controllers.items())]
    return [(d, c) for d, c in pairs if c is not None and not c.closed]


def _register(dispatcher: Dispatcher, controller: Controller) -> None:
    """Record ``controller`` as the one for ``dispatcher`` (called by Controller)."""
    with _controllers_lock:
        _controllers[dispatcher] = weakref.ref(controller)
    _touch(dispatcher)


def _unregister(dispatcher: Dispatcher, controller: Controller) -> None:
    """Forget ``controller`` (called by Controller.close); a newer one stays registered."""
    with _controllers_lock:
        ref = _controllers.get(dispatcher)
        current = ref() if ref is not None else None
        if ref is not None and (current is None or current is controller):
            del _controllers[dispatcher]


def _touch(dispatcher: Dispatcher) -> None:
    """Note ``dispatcher`` as the one shown or created last (see ``last_dispatcher``)."""
    global _last
    _last = weakref.ref(dispatcher)


def last_dispatcher() -> Dispatcher | None:
    """The dispatcher displayed last in this process (or created last in a cell, as far
    as the ``%alma`` magics saw), if it still exists; None otherwise."""
    return _last() if _last is not None else None


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
    _touch(dispatcher)
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
