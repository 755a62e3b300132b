"""Which controller shows which dispatcher, and which dispatcher was shown last.

A leaf module: at runtime it imports nothing from alma (``Controller`` and
``Dispatcher`` only for annotations), so the package ``__init__``, ``controller`` and
``magics`` all import it without a cycle. ``Controller`` registers itself here when
built and unregisters on ``close()``; ``alma.notebook.controller_for`` looks controllers
up here; the ``%alma`` magics read :func:`last_dispatcher` and :func:`touch` the
dispatchers they find in the user's namespace.

Everything here is held weakly: the registry alone never keeps a dispatcher (or its
open state file) or a controller alive.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..dispatcher import Dispatcher
    from .controller import Controller

__all__ = [
    "last_dispatcher",
    "open_controllers",
    "register",
    "registered",
    "registered_or_make",
    "touch",
    "unregister",
]

# One controller per dispatcher, so re-displaying a dispatcher (re-running a cell) reuses
# its widget and timer instead of piling up new ones. Weak keys *and* weak values: a
# controller holds its dispatcher, so a strong value would keep its own key (and the open
# state file) alive forever. The mapping alone never keeps either alive; an entry goes
# with its dispatcher, or with Controller.close().
_controllers: weakref.WeakKeyDictionary[Dispatcher, weakref.ref[Controller]] = (
    weakref.WeakKeyDictionary()
)
# Reentrant: registered_or_make() holds it while the new Controller registers itself.
_controllers_lock = threading.RLock()

# The dispatcher shown (or found in the user's namespace by the magics) last: what the
# ``%alma`` magics act on when no experiment was loaded with ``%alma load``. Weak, so
# pointing at an experiment never keeps it alive.
_last: weakref.ref[Dispatcher] | None = None


def registered(dispatcher: Dispatcher) -> Controller | None:
    """The open controller registered for ``dispatcher``, if any."""
    with _controllers_lock:
        ref = _controllers.get(dispatcher)
        controller = ref() if ref is not None else None
        if controller is None or controller.closed:
            return None
        return controller


def registered_or_make(
    dispatcher: Dispatcher, make: Callable[[Dispatcher], Controller]
) -> Controller:
    """The open controller registered for ``dispatcher``, or ``make(dispatcher)`` (which
    is expected to register itself) if there is none; atomic, so two threads asking at
    once get the same controller."""
    with _controllers_lock:
        controller = registered(dispatcher)
        if controller is None:
            controller = make(dispatcher)
        return controller


def open_controllers() -> list[tuple[Dispatcher, Controller]]:
    """Every (dispatcher, open controller) pair, as a list safe to iterate."""
    with _controllers_lock:
        pairs = [(d, ref()) for d, ref in list(_controllers.items())]
    return [(d, c) for d, c in pairs if c is not None and not c.closed]


def register(dispatcher: Dispatcher, controller: Controller) -> None:
    """Record ``controller`` as the one for ``dispatcher`` (a newly built Controller
    does this) and :func:`touch` the dispatcher."""
    with _controllers_lock:
        _controllers[dispatcher] = weakref.ref(controller)
    touch(dispatcher)


def unregister(dispatcher: Dispatcher, controller: Controller) -> None:
    """Forget ``controller`` (Controller.close does this); a newer one stays registered."""
    with _controllers_lock:
        ref = _controllers.get(dispatcher)
        current = ref() if ref is not None else None
        if ref is not None and (current is None or current is controller):
            del _controllers[dispatcher]


def touch(dispatcher: Dispatcher) -> None:
    """Note ``dispatcher`` as the one shown or created last (see :func:`last_dispatcher`)."""
    global _last
    _last = weakref.ref(dispatcher)


def last_dispatcher() -> Dispatcher | None:
    """The dispatcher displayed last in this process (or created last in a cell, as far
    as the ``%alma`` magics saw), if it still exists; None otherwise."""
    return _last() if _last is not None else None
