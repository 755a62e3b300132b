"""Jupyter front-end: the live :class:`Controller` widget and the ``%alma`` magics.

This package is the only place that imports IPython, ipywidgets and ``tqdm.notebook``,
and it does so lazily. The engine reaches it through one seam only:
``Dispatcher._repr_mimebundle_`` imports :func:`mimebundle` from here when a Dispatcher
is displayed, so scripts and terminals never pay for (or need) the widget stack.
``%load_ext alma`` (``alma.load_ipython_extension``) imports ``magics``.

Who imports whom (no cycles, public names only):

- ``registry``: which controller shows which dispatcher, and the dispatcher shown last;
  a leaf that imports nothing from the package at runtime.
- ``controller``: the :class:`Controller` widget (ipywidgets, tqdm); imports ``registry``.
- ``magics``: the ``%alma`` magics (IPython); imports ``registry`` and uses the
  Controller only through its public methods.
- this ``__init__``: imports ``registry`` and, on first use only, ``controller``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import last_dispatcher, registered_or_make, touch

if TYPE_CHECKING:
    from ..dispatcher import Dispatcher
    from .controller import Controller

__all__ = ["Controller", "controller_for", "last_dispatcher", "mimebundle"]


def controller_for(dispatcher: Dispatcher) -> Controller:
    """The controller of ``dispatcher``, made on first use and reused afterwards."""
    from .controller import Controller

    return registered_or_make(dispatcher, Controller)


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
    touch(dispatcher)
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
